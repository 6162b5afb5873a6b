"""Meta-Dataset on disk: dataset specifications, the ten sources, and a per-class record reader.

The format is the one the official converter writes (google-research/meta-dataset,
``dataset_conversion/dataset_to_records.py``; read at commit cff0560): one directory per source,

  <records_root>/<source>/dataset_spec.json    the dataset specification (JSON, layout below)
  <records_root>/<source>/{class_id}.tfrecords one file per class; every record is a
                                               ``tf.train.Example`` with ``image`` (bytes: an
                                               encoded JPEG or PNG) and ``label`` (int64: the
                                               class id)

Class ids are contiguous and ordered by split: train classes ``[0, n_train)``, then the valid
classes, then the test classes (``get_classes(split)`` returns that ``range``).

The three specification classes keep the official names, fields and methods, so an episode sampler
written against the official API (``sampling.EpisodeDescriptionSampler``: ``get_classes``,
``get_total_images_per_class``, ``class_names``, ``get_superclasses``,
``classes_per_superclass``, ``get_class_ids_from_superclass_subclass_inds``,
``get_split_subgraph``, ``class_names_to_ids``, with :func:`get_leaves` and
:func:`get_spanning_leaves` for the DAG) runs on them unchanged. Like the official ones they are
namedtuples (``_replace``, ``_asdict`` work).

``dataset_spec.json`` (official layout, ``indent=2``, written by :func:`save_dataset_spec`):

* every spec: ``"__class__"`` (the class name), ``name``, ``path``, ``file_pattern``
  (``"{}.tfrecords"``), ``class_names`` ``{"<id>": name}``;
* ``DatasetSpecification``: ``classes_per_split`` ``{"TRAIN": n, "VALID": n, "TEST": n}``,
  ``images_per_class`` ``{"<id>": n}`` (or ``{"<id>": {"<pool>": n}}`` with example-level pools);
* ``BiLevelDatasetSpecification`` (Omniglot): ``superclasses_per_split`` (keys as above),
  ``classes_per_superclass`` ``{"<superclass id>": n}``, ``superclass_names``, ``images_per_class``;
* ``HierarchicalDatasetSpecification`` (ILSVRC): ``split_subgraphs`` ``{"TRAIN": [node, ...],
  ...}`` where each node is ``{"wn_id", "words", "children_ids", "parents_ids"}`` (nodes sorted by
  ``wn_id``, id lists sorted), ``images_per_class`` ``{"TRAIN": {"<wn_id>": n}, ...}`` for *every*
  node of that split's graph (the images its leaves span), ``class_names`` ``{"<id>": wn_id}`` with
  ids given to the train leaves sorted by ``wn_id``, then the valid leaves, then the test leaves.

Deviations from the official code (all in the lenient direction; files we write are the official
layout):

* the official loader refuses a WordNet id that appears in the graphs of two splits; we keep the
  three split graphs apart and accept it (``images_per_class`` is keyed by split anyway);
* the official ``get_total_images_per_class(class_id, pool=...)`` raises ``NotImplementedError`` for
  pools; we return the pool's count;
* there is no ``dataset_spec.pkl`` fallback (older official conversions): convert it to JSON with the
  official ``load_dataset_spec(..., convert_from_pkl=True)`` or re-run the conversion;
* ``file_pattern`` ``"{}_{}.tfrecords"`` (sharded classes / pools) is parsed, but the reader, like the
  official one, reads only ``"{}.tfrecords"``.

Sources are read from any filesystem TensorFlow has: a local directory, or a path with a scheme
(``gs://bucket/meta_dataset/ilsvrc_2012`` on a TPU pod, ``s3://`` with TensorFlow's filesystem
plugin, ``ram://`` in tests), which goes through ``tf.io.gfile`` (the Files section below).

TensorFlow is imported lazily (``tf_host()``) by the reader functions and for paths with a scheme
only; the specs, and reading a local ``dataset_spec.json``, are pure Python.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import hashlib
import io
import json
import logging
import os
import uuid
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from visrep_jax.data import DataError, tf_host
from visrep_jax.registry import UnknownNameError, unknown_name_message

SPEC_FILENAME = "dataset_spec.json"
DEFAULT_FILE_PATTERN = "{}.tfrecords"
SHARDED_FILE_PATTERN = "{}_{}.tfrecords"
VALID_FILE_PATTERNS = (DEFAULT_FILE_PATTERN, SHARDED_FILE_PATTERN)


# ----------------------------------------------------------------------------------------------
# Splits.


class Split(enum.Enum):
  """The class-level splits (values as in the official ``learning_spec.Split``)."""
  TRAIN = 0
  VALID = 1
  TEST = 2

  @classmethod
  def parse(cls, value: Union["Split", str, int]) -> "Split":
    """``Split.TRAIN`` from a Split, ``'train'``/``'TRAIN'``, ``'valid'``/``'validation'``/``'val'``,
    ``'test'``, or the enum value."""
    if isinstance(value, cls):
      return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
      return cls(int(value))
    key = str(value).strip().upper()
    key = {"VALIDATION": "VALID", "VAL": "VALID"}.get(key, key)
    if key not in cls.__members__:
      raise ValueError(f"Unknown split {value!r}; valid: train, valid, test.")
    return cls[key]


SPLITS = (Split.TRAIN, Split.VALID, Split.TEST)


def get_classes(split: Split, classes_per_split: Mapping[Split, int]) -> range:
  """The contiguous class ids of ``split``: train first, then valid, then test."""
  split = Split.parse(split)
  offset = sum(classes_per_split[s] for s in SPLITS[:split.value])
  return range(offset, offset + classes_per_split[split])


def _check_restriction(restricted: Mapping[Split, int], available: Mapping[Split, int]):
  for split, n in restricted.items():
    if split not in SPLITS:
      raise ValueError(f"Invalid key {split!r} in restricted_classes_per_split (use Split.*).")
    if n > available[split]:
      raise ValueError(f"restricted_classes_per_split asks for {n} classes of {split.name}, "
                       f"which has only {available[split]}.")


def _check_file_pattern(file_pattern: str):
  if file_pattern not in VALID_FILE_PATTERNS:
    raise ValueError(f"file_pattern must be one of {VALID_FILE_PATTERNS}, got {file_pattern!r}.")


def _total_images(spec, class_id, pool):
  """Shared by the flat and bi-level specs (official ``get_total_images_per_class``)."""
  if class_id is None:
    counts = {json.dumps(v, sort_keys=True) for v in spec.images_per_class.values()}
    if len(counts) != 1:
      raise ValueError("class_id may be omitted only when all classes have the same number of "
                       "images.")
    class_id = next(iter(spec.images_per_class))
  if class_id not in spec.images_per_class:
    raise ValueError(f"Class id {class_id} is not in images_per_class of dataset {spec.name!r} "
                     f"(regenerate its {SPEC_FILENAME}).")
  n = spec.images_per_class[class_id]
  if isinstance(n, Mapping):
    if pool is None:
      raise ValueError(f"Dataset {spec.name!r} has example-level pools {sorted(n)}: pass pool=.")
    if pool not in n:
      raise ValueError(f"Class {class_id} of {spec.name!r} has no pool {pool!r}; pools: {sorted(n)}.")
    return n[pool]
  if pool is not None:
    raise ValueError(f"Dataset {spec.name!r} has no example-level pools (got pool={pool!r}).")
  return n


def _split_names(d: Mapping[Split, object]) -> dict:
  return {s.name: d[s] for s in SPLITS if s in d}


def _str_names(names: Mapping[int, object]) -> dict:
  out = {}
  for k, v in names.items():
    if isinstance(v, bytes):
      v = v.decode()
    elif isinstance(v, (np.integer, int)) and not isinstance(v, bool):
      v = str(v)
    out[int(k)] = v
  return out


# ----------------------------------------------------------------------------------------------
# Specifications.


class DatasetSpecification(
    collections.namedtuple("DatasetSpecification",
                           "name classes_per_split images_per_class class_names path file_pattern")):
  """A flat dataset (Aircraft, CU-Birds, DTD, QuickDraw, Fungi, VGG Flower, Traffic Signs, MSCOCO).

  Fields: ``name``; ``classes_per_split`` ``{Split: n}``; ``images_per_class`` ``{class_id: n}`` (or
  ``{class_id: {pool: n}}``); ``class_names`` ``{class_id: str}``; ``path`` (the records directory);
  ``file_pattern`` (``'{}.tfrecords'``).
  """

  def initialize(self, restricted_classes_per_split: Optional[Mapping[Split, int]] = None):
    """Checks the file pattern; optionally keeps only the first n classes of some splits."""
    _check_file_pattern(self.file_pattern)
    if restricted_classes_per_split is not None:
      _check_restriction(restricted_classes_per_split, self.classes_per_split)
      self.classes_per_split.update(restricted_classes_per_split)

  def get_total_images_per_class(self, class_id: Optional[int] = None,
                                 pool: Optional[str] = None) -> int:
    return _total_images(self, class_id, pool)

  def get_classes(self, split: Split) -> range:
    return get_classes(split, self.classes_per_split)

  @property
  def num_classes(self) -> int:
    return sum(self.classes_per_split[s] for s in SPLITS)

  def to_dict(self) -> dict:
    """JSON-ready dict in the official layout."""
    d = dict(self._asdict())
    d["classes_per_split"] = _split_names(self.classes_per_split)
    d["images_per_class"] = {int(k): v for k, v in self.images_per_class.items()}
    d["class_names"] = _str_names(self.class_names)
    d["__class__"] = type(self).__name__
    return d


class BiLevelDatasetSpecification(
    collections.namedtuple("BiLevelDatasetSpecification",
                           "name superclasses_per_split classes_per_superclass images_per_class "
                           "superclass_names class_names path file_pattern")):
  """A two-level dataset (Omniglot: alphabets -> characters).

  Superclass ids are contiguous by split like class ids; the classes of superclass ``k`` are the
  ``classes_per_superclass[k]`` ids following those of superclasses ``0..k-1``.
  """

  def initialize(self, restricted_classes_per_split: Optional[Mapping[Split, int]] = None):
    _check_file_pattern(self.file_pattern)
    if restricted_classes_per_split is not None:
      _check_restriction(restricted_classes_per_split, self._full_classes_per_split())
    self.__dict__["restricted_classes_per_split"] = restricted_classes_per_split

  def get_total_images_per_class(self, class_id: Optional[int] = None,
                                 pool: Optional[str] = None) -> int:
    return _total_images(self, class_id, pool)

  def get_superclasses(self, split: Split) -> range:
    return get_classes(split, self.superclasses_per_split)

  def _count_classes_in_superclasses(self, superclass_ids: Iterable[int]) -> int:
    return sum(self.classes_per_superclass[i] for i in superclass_ids)

  def _get_split_offset(self, split: Split) -> int:
    first_superclass = self.get_superclasses(split).start
    return self._count_classes_in_superclasses(range(first_superclass))

  def _full_classes_per_split(self) -> Dict[Split, int]:
    return {s: self._count_classes_in_superclasses(self.get_superclasses(s)) for s in SPLITS}

  @property
  def classes_per_split(self) -> Dict[Split, int]:
    """Number of classes of each split (not a field of the official spec; derived here)."""
    counts = self._full_classes_per_split()
    counts.update(self.__dict__.get("restricted_classes_per_split") or {})
    return counts

  @property
  def num_classes(self) -> int:
    return sum(self._full_classes_per_split().values())

  def get_classes(self, split: Split) -> range:
    split = Split.parse(split)
    offset = self._get_split_offset(split)
    return range(offset, offset + self.classes_per_split[split])

  def get_class_ids_from_superclass_subclass_inds(
      self, split: Split, superclass_id: int, class_inds: Sequence[int]) -> Tuple[list, list]:
    """(ids relative to ``split``, absolute ids) of classes ``class_inds`` of ``superclass_id``."""
    first = self._count_classes_in_superclasses(range(superclass_id))
    class_ids = [first + int(i) for i in class_inds]
    offset = self._get_split_offset(split)
    return [c - offset for c in class_ids], class_ids

  def to_dict(self) -> dict:
    d = dict(self._asdict())
    d["superclasses_per_split"] = _split_names(self.superclasses_per_split)
    d["classes_per_superclass"] = {int(k): int(v) for k, v in self.classes_per_superclass.items()}
    d["images_per_class"] = {int(k): v for k, v in self.images_per_class.items()}
    d["superclass_names"] = _str_names(self.superclass_names)
    d["class_names"] = _str_names(self.class_names)
    d["__class__"] = type(self).__name__
    return d


class Synset:
  """A node of a class hierarchy (WordNet synset); ``children``/``parents`` are sets of Synsets.
  Hashed by identity, as the official one: the same wn_id in two split graphs is two nodes."""

  def __init__(self, wn_id: str, words: str = "", children=None, parents=None):
    self.wn_id = wn_id
    self.words = words
    self.children = set(children or ())
    self.parents = set(parents or ())

  def __repr__(self):
    return f"Synset({self.wn_id!r}, {self.words!r}, {len(self.children)} children)"


def get_leaves(nodes: Iterable[Synset]) -> List[Synset]:
  """The nodes without children."""
  return [n for n in nodes if not n.children]


def get_spanning_leaves(nodes: Iterable[Synset]) -> Dict[Synset, set]:
  """Each node -> the set of leaves reachable from it through ``children`` (a leaf spans itself)."""
  memo: Dict[Synset, frozenset] = {}

  def span(node):
    if node not in memo:
      # Iterative post-order, so deep hierarchies do not hit the recursion limit.
      stack = [(node, False)]
      while stack:
        n, expanded = stack.pop()
        if n in memo:
          continue
        if not n.children:
          memo[n] = frozenset((n,))
        elif expanded:
          memo[n] = frozenset().union(*(memo[c] for c in n.children))
        else:
          stack.append((n, True))
          stack.extend((c, False) for c in n.children if c not in memo)
    return memo[node]

  return {n: set(span(n)) for n in nodes}


def get_num_spanning_images(spanning_leaves: Mapping[Synset, set],
                            num_leaf_images: Mapping[str, int]) -> Dict[Synset, int]:
  """Each node -> the images of the leaves it spans (``num_leaf_images`` is keyed by wn_id)."""
  return {n: sum(int(num_leaf_images[l.wn_id]) for l in leaves)
          for n, leaves in spanning_leaves.items()}


def export_graph(nodes: Iterable[Synset]) -> List[dict]:
  """JSON-ready list of ``{wn_id, words, children_ids, parents_ids}``, sorted by wn_id."""
  by_id = {}
  for n in nodes:
    if n.wn_id in by_id:
      raise ValueError(f"Two nodes with WordNet id {n.wn_id!r} in one graph.")
    by_id[n.wn_id] = n
  out = []
  for wn_id in sorted(by_id):
    n = by_id[wn_id]
    children, parents = sorted(c.wn_id for c in n.children), sorted(p.wn_id for p in n.parents)
    outside = [i for i in children + parents if i not in by_id]
    if outside:
      raise ValueError(f"Node {wn_id!r} links to nodes outside the graph: {outside}.")
    out.append({"wn_id": wn_id, "words": n.words, "children_ids": children, "parents_ids": parents})
  return out


def import_graph(node_representations: Sequence[Mapping]) -> set:
  """Inverse of :func:`export_graph`: a set of linked Synsets."""
  by_id: Dict[str, Synset] = {}
  for r in node_representations:
    if r["wn_id"] in by_id:
      raise ValueError(f"Duplicate WordNet id {r['wn_id']!r} in the imported graph.")
    by_id[r["wn_id"]] = Synset(r["wn_id"], r.get("words", ""))
  for r in node_representations:
    node = by_id[r["wn_id"]]
    try:
      node.children.update(by_id[c] for c in r.get("children_ids", ()))
      node.parents.update(by_id[p] for p in r.get("parents_ids", ()))
    except KeyError as e:
      raise ValueError(f"Node {r['wn_id']!r} links to unknown node {e.args[0]!r}.") from None
  return set(by_id.values())


class HierarchicalDatasetSpecification(
    collections.namedtuple("HierarchicalDatasetSpecification",
                           "name split_subgraphs images_per_class class_names path file_pattern")):
  """A dataset whose classes are the leaves of a DAG (ILSVRC-2012 and its WordNet hierarchy).

  ``split_subgraphs`` ``{Split: set of Synset}`` (one separate graph per split);
  ``images_per_class`` ``{Split: {Synset: images spanned}}`` for every node of that graph;
  ``class_names`` ``{class_id: wn_id}`` for the leaves.
  """

  def initialize(self, restricted_classes_per_split: Optional[Mapping[Split, int]] = None):
    counts = self.get_classes_per_split()
    if restricted_classes_per_split is not None:
      _check_restriction(restricted_classes_per_split, counts)
      counts.update(restricted_classes_per_split)
    self.__dict__["_classes_per_split"] = counts

  @property
  def class_names_to_ids(self) -> Dict[str, int]:
    if "_names_to_ids" not in self.__dict__:
      self.__dict__["_names_to_ids"] = {v: k for k, v in self.class_names.items()}
    return self.__dict__["_names_to_ids"]

  @property
  def classes_per_split(self) -> Dict[Split, int]:
    if "_classes_per_split" not in self.__dict__:
      self.initialize()
    return self.__dict__["_classes_per_split"]

  @property
  def num_classes(self) -> int:
    return sum(self.get_classes_per_split().values())

  def get_classes_per_split(self) -> Dict[Split, int]:
    return {s: len(get_leaves(self.split_subgraphs[s])) for s in SPLITS}

  def get_split_subgraph(self, split: Split) -> set:
    return self.split_subgraphs[Split.parse(split)]

  def get_classes(self, split: Split) -> range:
    return get_classes(split, self.classes_per_split)

  def _leaf_counts(self) -> Dict[int, int]:
    """class id -> images, from the leaves of the three graphs."""
    if "_leaf_counts_cache" not in self.__dict__:
      counts = {}
      for s in SPLITS:
        for leaf in get_leaves(self.split_subgraphs[s]):
          if leaf.wn_id in self.class_names_to_ids:
            counts[self.class_names_to_ids[leaf.wn_id]] = int(self.images_per_class[s][leaf])
      self.__dict__["_leaf_counts_cache"] = counts
    return self.__dict__["_leaf_counts_cache"]

  def get_all_classes_same_example_count(self) -> int:
    """The common number of images of every class, or -1 if they differ."""
    counts = set(self._leaf_counts().values())
    return counts.pop() if len(counts) == 1 else -1

  def get_total_images_per_class(self, class_id: Optional[int] = None,
                                 pool: Optional[str] = None) -> int:
    if pool is not None:
      raise ValueError("Hierarchical datasets have no example-level pools.")
    if class_id is None:
      n = self.get_all_classes_same_example_count()
      if n < 0:
        raise ValueError("class_id may be omitted only when all classes have the same number of "
                         "images.")
      return n
    counts = self._leaf_counts()
    if class_id not in counts:
      raise ValueError(f"Class id {class_id} not found in the leaves of {self.name!r}.")
    return counts[class_id]

  def to_dict(self) -> dict:
    d = dict(self._asdict())
    d["split_subgraphs"] = {s.name: export_graph(self.split_subgraphs[s]) for s in SPLITS}
    d["images_per_class"] = {
        s.name: {n.wn_id: int(c) for n, c in self.images_per_class[s].items()} for s in SPLITS}
    d["class_names"] = _str_names(self.class_names)
    d["__class__"] = type(self).__name__
    return d


AnySpec = Union[DatasetSpecification, BiLevelDatasetSpecification, HierarchicalDatasetSpecification]


def make_hierarchical_spec(name: str, split_subgraphs: Mapping[Split, set],
                           num_leaf_images: Mapping[str, int], path: str = "",
                           file_pattern: str = DEFAULT_FILE_PATTERN
                           ) -> HierarchicalDatasetSpecification:
  """Builds the spec from three split graphs and the image count of each leaf (by wn_id).

  Class ids as the official ILSVRC conversion gives them: train leaves sorted by wn_id, then the
  valid leaves, then the test leaves.
  """
  graphs = {Split.parse(s): g for s, g in split_subgraphs.items()}
  class_names, images = {}, {}
  for s in SPLITS:
    for leaf in sorted(get_leaves(graphs[s]), key=lambda n: n.wn_id):
      class_names[len(class_names)] = leaf.wn_id
    images[s] = get_num_spanning_images(get_spanning_leaves(graphs[s]), num_leaf_images)
  return HierarchicalDatasetSpecification(name, graphs, images, class_names, path, file_pattern)


# ----------------------------------------------------------------------------------------------
# Files: a local path goes through os / open() (no TensorFlow needed, nothing changed); a path with
# a scheme (gs://, s3://, ram://, ...) through tf.io.gfile, so a converted source can live in any
# filesystem TensorFlow has (its TFRecord readers take such paths too).


def is_remote_path(path: str) -> bool:
  """True for a path with a filesystem scheme (``gs://bucket/md``): read with tf.io.gfile."""
  return "://" in str(path)


def _access_error(path: str, e: BaseException) -> str:
  return (f"Cannot read {path} ({_one_line(e)}): check the path and the credentials of its "
          "filesystem (s3:// and other schemes need TensorFlow's filesystem plugin, e.g. "
          "tensorflow-io).")


def _gfile(op: str, path: str):
  """``tf.io.gfile.<op>(path)``; a failure other than a missing file (unknown scheme, no
  credentials, network) is a one-line DataError."""
  tf = tf_host()
  try:
    return getattr(tf.io.gfile, op)(path)
  except tf.errors.NotFoundError:
    raise
  except tf.errors.OpError as e:
    raise DataError(_access_error(path, e)) from None


def path_isdir(path: str) -> bool:
  if not is_remote_path(path):
    return os.path.isdir(path)
  if _gfile("isdir", path):
    return True
  _gfile("exists", path)  # isdir says False for an unknown scheme; exists raises (a DataError)
  return False


def path_exists(path: str) -> bool:
  return _gfile("exists", path) if is_remote_path(path) else os.path.exists(path)


def list_dir(path: str) -> List[str]:
  if not is_remote_path(path):
    return os.listdir(path)
  return [name.rstrip("/") for name in _gfile("listdir", path)]


def file_size(path: str) -> int:
  return int(_gfile("stat", path).length) if is_remote_path(path) else os.path.getsize(path)


def file_stamp(path: str) -> Optional[Tuple[int, int]]:
  """``(size, mtime in ns)`` of a file, None if it cannot be read (a file rewritten since has
  another stamp; ``ram://`` files report mtime 0, so only their size tells)."""
  if not is_remote_path(path):
    try:
      st = os.stat(path)
    except OSError:
      return None
    return st.st_size, st.st_mtime_ns
  tf = tf_host()
  try:
    st = tf.io.gfile.stat(path)
  except tf.errors.OpError:
    return None
  return int(st.length), int(st.mtime_nsec)


def open_file(path: str, mode: str = "r"):
  """``open(path, mode)``, or a ``tf.io.gfile.GFile`` (seek, read) for a path with a scheme; its
  read errors are ``tf.errors.OpError``."""
  return tf_host().io.gfile.GFile(path, mode) if is_remote_path(path) else open(path, mode)


def read_text(path: str) -> str:
  if not is_remote_path(path):
    with open(path) as f:
      return f.read()
  tf = tf_host()
  try:
    with tf.io.gfile.GFile(path, "r") as f:
      return f.read()
  except tf.errors.OpError as e:
    raise DataError(_access_error(path, e)) from None


# ----------------------------------------------------------------------------------------------
# JSON.


def as_dataset_spec(dct: dict):
  """``json.load`` object hook: a spec from a dict with ``"__class__"``, other dicts unchanged."""
  kind = dct.get("__class__")
  if kind not in ("DatasetSpecification", "BiLevelDatasetSpecification",
                  "HierarchicalDatasetSpecification"):
    return dct

  def int_keys(d):
    return {int(k): v for k, v in d.items()}

  def split_keys(d):
    return {Split[k]: int(v) for k, v in d.items()}

  if kind == "DatasetSpecification":
    images = {int(k): ({p: int(n) for p, n in v.items()} if isinstance(v, dict) else int(v))
              for k, v in dct["images_per_class"].items()}
    return DatasetSpecification(dct["name"], split_keys(dct["classes_per_split"]), images,
                                int_keys(dct["class_names"]), dct["path"], dct["file_pattern"])
  if kind == "BiLevelDatasetSpecification":
    return BiLevelDatasetSpecification(
        dct["name"], split_keys(dct["superclasses_per_split"]),
        {int(k): int(v) for k, v in dct["classes_per_superclass"].items()},
        {int(k): int(v) for k, v in dct["images_per_class"].items()},
        int_keys(dct["superclass_names"]), int_keys(dct["class_names"]), dct["path"],
        dct["file_pattern"])
  graphs, images = {}, {}
  for s in SPLITS:
    graphs[s] = import_graph(dct["split_subgraphs"][s.name])
    by_id = {n.wn_id: n for n in graphs[s]}
    counts = dct["images_per_class"][s.name]
    unknown = [w for w in counts if w not in by_id]
    if unknown:
      raise ValueError(f"images_per_class[{s.name}] names nodes missing from its graph: "
                       f"{unknown[:5]}.")
    images[s] = {by_id[w]: int(c) for w, c in counts.items()}
  return HierarchicalDatasetSpecification(dct["name"], graphs, images, int_keys(dct["class_names"]),
                                          dct["path"], dct["file_pattern"])


def dataset_spec_to_json(spec: AnySpec) -> str:
  return json.dumps(spec.to_dict(), indent=2)


def dataset_spec_from_json(text: str) -> AnySpec:
  spec = json.loads(text, object_hook=as_dataset_spec)
  if not isinstance(spec, (DatasetSpecification, BiLevelDatasetSpecification,
                           HierarchicalDatasetSpecification)):
    raise ValueError('not a dataset specification (no "__class__" naming a spec class)')
  return spec


def save_dataset_spec(spec: AnySpec, directory: Optional[str] = None) -> str:
  """Writes ``<directory or spec.path>/dataset_spec.json`` atomically (on object stores such as
  gs://, where a rename is a copy, the spec appears once it is complete); returns its path."""
  directory = directory or spec.path
  if not directory:
    raise ValueError("save_dataset_spec needs a directory (the spec's path is empty).")
  target = os.path.join(directory, SPEC_FILENAME)
  tmp = target + ".tmp"
  if is_remote_path(directory):
    gfile = tf_host().io.gfile
    gfile.makedirs(directory)
    with gfile.GFile(tmp, "w") as f:
      f.write(dataset_spec_to_json(spec) + "\n")
    gfile.rename(tmp, target, overwrite=True)
    return target
  os.makedirs(directory, exist_ok=True)
  with open(tmp, "w") as f:
    f.write(dataset_spec_to_json(spec) + "\n")
  os.replace(tmp, target)
  return target


def load_dataset_spec(dataset_records_path: str) -> AnySpec:
  """The spec of the records in ``dataset_records_path`` (local or any TensorFlow filesystem:
  ``gs://...``), with ``path`` set to that directory."""
  if not dataset_records_path or not path_isdir(dataset_records_path):
    raise DataError(f"Meta-Dataset records directory {dataset_records_path!r} does not exist: "
                    "convert the source first (python -m visrep_jax.data.md_convert, or the "
                    "official meta_dataset converter) and point the config at it.")
  json_path = os.path.join(dataset_records_path, SPEC_FILENAME)
  if not path_exists(json_path):
    pkl = path_exists(os.path.join(dataset_records_path, "dataset_spec.pkl"))
    hint = ("only an old dataset_spec.pkl is there: convert it with the official "
            "load_dataset_spec(path, convert_from_pkl=True) or re-run the conversion" if pkl else
            "the conversion did not finish or this is not a records directory; re-run it")
    raise DataError(f"No {SPEC_FILENAME} in {dataset_records_path}: {hint}.")
  try:
    spec = dataset_spec_from_json(read_text(json_path))
  except (ValueError, KeyError, TypeError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DataError(f"Corrupt {json_path} ({msg}); re-run the conversion.") from None
  return spec._replace(path=dataset_records_path)


# ----------------------------------------------------------------------------------------------
# The ten Meta-Dataset sources.

ILSVRC_2012 = "ilsvrc_2012"
OMNIGLOT = "omniglot"
AIRCRAFT = "aircraft"
CU_BIRDS = "cu_birds"
DTD = "dtd"
QUICKDRAW = "quickdraw"
FUNGI = "fungi"
VGG_FLOWER = "vgg_flower"
TRAFFIC_SIGN = "traffic_sign"
MSCOCO = "mscoco"


@dataclasses.dataclass(frozen=True)
class MetaDatasetSource:
  """What is known of a Meta-Dataset source (class counts of the official specs)."""
  name: str
  spec_class: str  # 'DatasetSpecification' | 'BiLevelDatasetSpecification' | 'Hierarchical...'
  classes_per_split: Tuple[int, int, int]  # train, valid, test
  description: str
  superclasses_per_split: Optional[Tuple[int, int, int]] = None

  @property
  def splits(self) -> Tuple[Split, ...]:
    """The splits that have classes (Traffic Signs: TEST only; MSCOCO: VALID and TEST)."""
    return tuple(s for s, n in zip(SPLITS, self.classes_per_split) if n)

  @property
  def num_classes(self) -> int:
    return sum(self.classes_per_split)


SOURCES: Dict[str, MetaDatasetSource] = {s.name: s for s in (
    MetaDatasetSource(ILSVRC_2012, "HierarchicalDatasetSpecification", (712, 158, 130),
                      "ImageNet ILSVRC-2012; WordNet DAG, valid = 'carnivore', test = 'device'"),
    MetaDatasetSource(OMNIGLOT, "BiLevelDatasetSpecification", (883, 81, 659),
                      "Omniglot characters grouped by alphabet", superclasses_per_split=(25, 5, 20)),
    MetaDatasetSource(AIRCRAFT, "DatasetSpecification", (70, 15, 15), "FGVC-Aircraft variants"),
    MetaDatasetSource(CU_BIRDS, "DatasetSpecification", (140, 30, 30), "CUB-200-2011 birds"),
    MetaDatasetSource(DTD, "DatasetSpecification", (33, 7, 7), "Describable Textures"),
    MetaDatasetSource(QUICKDRAW, "DatasetSpecification", (241, 52, 52), "Quick, Draw! doodles"),
    MetaDatasetSource(FUNGI, "DatasetSpecification", (994, 200, 200), "FGVCx fungi"),
    MetaDatasetSource(VGG_FLOWER, "DatasetSpecification", (71, 15, 16), "VGG Flowers-102"),
    MetaDatasetSource(TRAFFIC_SIGN, "DatasetSpecification", (0, 0, 43),
                      "German Traffic Signs (GTSRB), test only"),
    MetaDatasetSource(MSCOCO, "DatasetSpecification", (0, 40, 40),
                      "MS-COCO cropped objects, valid and test only"),
)}
ALL_SOURCES: Tuple[str, ...] = tuple(SOURCES)  # the order of the Meta-Dataset paper's tables
TRAIN_ON_ILSVRC_TRAIN_SOURCES = (ILSVRC_2012,)
# "Train on all datasets": all but Traffic Signs and MSCOCO, which have no train classes.
TRAIN_ON_ALL_TRAIN_SOURCES = tuple(n for n in ALL_SOURCES if SOURCES[n].classes_per_split[0])
EVAL_SOURCES = ALL_SOURCES


def source_info(name: str) -> MetaDatasetSource:
  if name not in SOURCES:
    raise UnknownNameError(unknown_name_message("Meta-Dataset source", name, SOURCES))
  return SOURCES[name]


def check_known_source(spec: AnySpec) -> None:
  """Raises DataError if ``spec`` is a known source whose type or class counts are not the official
  ones (a partial or differently split conversion)."""
  info = SOURCES.get(spec.name)
  if info is None:
    return
  if type(spec).__name__ != info.spec_class:
    raise DataError(f"{spec.name} should have a {info.spec_class}, found {type(spec).__name__} "
                    f"in {spec.path}.")
  counts = tuple(len(spec.get_classes(s)) for s in SPLITS)
  if counts != info.classes_per_split:
    raise DataError(f"{spec.name} in {spec.path} has {counts} train/valid/test classes, the "
                    f"official split is {info.classes_per_split}; re-run its conversion.")


# ----------------------------------------------------------------------------------------------
# Reader.


def _one_line(e: BaseException) -> str:
  text = getattr(e, "message", None) or str(e) or type(e).__name__
  return text.strip().splitlines()[0]


def class_record_path(spec: AnySpec, class_id: int) -> str:
  """Path of the record file of ``class_id`` (one file per class, ``'{}.tfrecords'``)."""
  if spec.file_pattern == SHARDED_FILE_PATTERN:
    raise DataError(f"{spec.name}: sharded/pooled class files ({spec.file_pattern!r}) are not "
                    "supported; the reader expects one '{}.tfrecords' file per class.")
  if spec.file_pattern != DEFAULT_FILE_PATTERN:
    raise DataError(f"{spec.name}: unsupported file_pattern {spec.file_pattern!r}.")
  return os.path.join(spec.path, spec.file_pattern.format(class_id))


def _all_class_ids(spec: AnySpec, split: Optional[Split] = None) -> List[int]:
  splits = SPLITS if split is None else (Split.parse(split),)
  return [c for s in splits for c in spec.get_classes(s)]


def check_class_files(spec: AnySpec, split: Optional[Split] = None) -> None:
  """Raises DataError naming the first missing class file (of ``split``, or of all splits)."""
  if not path_isdir(spec.path):
    raise DataError(f"Meta-Dataset records directory {spec.path!r} of {spec.name} does not exist.")
  paths = [class_record_path(spec, c) for c in _all_class_ids(spec, split)]
  if is_remote_path(spec.path):  # one listing, not one request per class file
    present = set(list_dir(spec.path))
    missing = [p for p in paths if os.path.basename(p) not in present]
  else:
    missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise DataError(f"Missing class file {missing[0]}{more} of {spec.name}: the conversion did not "
                    "finish; re-run it.")


def make_class_dataset(spec: AnySpec, class_id: int, *, shuffle: bool = False,
                       repeat: bool = False, shuffle_buffer_size: int = 1000,
                       shuffle_seed: Optional[int] = None,
                       read_buffer_size_bytes: Optional[int] = None, num_prefetch: int = 0,
                       num_to_take: int = -1):
  """tf.data stream of ``(serialized tf.train.Example, class_id)`` from one class file, as the
  official ``Reader.construct_class_datasets`` builds it (shuffle buffer min(n, buffer size),
  reshuffled each iteration)."""
  tf = tf_host()
  path = class_record_path(spec, class_id)
  if not path_exists(path):
    raise DataError(f"Missing class file {path} (class {class_id} of {spec.name}): the conversion "
                    "did not finish; re-run it.")
  ds = tf.data.TFRecordDataset(path, buffer_size=read_buffer_size_bytes).take(num_to_take)
  if num_prefetch > 0:
    ds = ds.prefetch(num_prefetch)
  if shuffle and shuffle_buffer_size > 0:
    n = num_class_records(spec, class_id)
    ds = ds.shuffle(min(int(n), shuffle_buffer_size), seed=shuffle_seed,
                    reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  ids = tf.data.Dataset.from_tensors(tf.constant(class_id, tf.int64)).repeat()
  return tf.data.Dataset.zip((ds, ids))


def make_class_datasets(spec: AnySpec, split: Split, **kwargs) -> list:
  """One :func:`make_class_dataset` per class of ``split``, in class-id order (the list an
  episode pipeline picks from with ``choose_from_datasets``); defaults: shuffled and repeated."""
  check_class_files(spec, split)
  kwargs.setdefault("shuffle", True)
  kwargs.setdefault("repeat", True)
  return [make_class_dataset(spec, c, **kwargs) for c in spec.get_classes(split)]


def parse_example(example_string):
  """``(encoded image bytes, int64 label)`` of one serialized record (tf graph function)."""
  tf = tf_host()
  features = tf.io.parse_single_example(example_string, {
      "image": tf.io.FixedLenFeature([], tf.string),
      "label": tf.io.FixedLenFeature([], tf.int64)})
  return features["image"], features["label"]


def resize_official(image, image_size: int):
  """Square bilinear resize with align_corners=True (the official ImageDecoder's), float32."""
  tf = tf_host()
  return tf.compat.v1.image.resize_images(image, [image_size, image_size],
                                          method=tf.image.ResizeMethod.BILINEAR,
                                          align_corners=True)


def decode_example(example_string, image_size: int, channels: int = 3):
  """Official ``ImageDecoder``: decode, resize to a square ``image_size`` (bilinear,
  align_corners, aspect ratio not kept), scale to [-1, 1]. Returns ``(float32 image, label)``."""
  tf = tf_host()
  image_bytes, label = parse_example(example_string)
  image = tf.io.decode_image(image_bytes, channels=channels, expand_animations=False)
  image = resize_official(image, image_size)
  image.set_shape([image_size, image_size, channels])
  return 2.0 * (image / 255.0 - 0.5), label


def resize_rounded(image, image_size: int):
  """:func:`resize_official` rounded to integers in [0, 255] (float32); an image already
  ``image_size`` x ``image_size`` is returned unresampled (its pixels stay exact)."""
  tf = tf_host()
  shape = tf.shape(image)
  return tf.cond(
      tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size)),
      lambda: tf.cast(image, tf.float32),
      lambda: tf.clip_by_value(tf.round(resize_official(image, image_size)), 0.0, 255.0))


def _decode_uint8(example_string, image_size: Optional[int], channels: int):
  tf = tf_host()
  image_bytes, label = parse_example(example_string)
  image = tf.io.decode_image(image_bytes, channels=channels, expand_animations=False)
  if image_size:
    image = tf.cast(resize_rounded(image, image_size), tf.uint8)
  return image, label


def num_class_records(spec: AnySpec, class_id: int) -> int:
  """Number of records (images) of ``class_id`` in ``dataset_spec.json``."""
  if isinstance(spec, HierarchicalDatasetSpecification):
    return spec.get_total_images_per_class(class_id)
  if class_id not in spec.images_per_class:
    raise DataError(f"Class id {class_id} is not in {SPEC_FILENAME} of {spec.name} ({spec.path}).")
  n = spec.images_per_class[class_id]
  return sum(n.values()) if isinstance(n, Mapping) else int(n)


def load_class_images(spec: AnySpec, class_id: int, image_size: Optional[int] = None,
                      channels: int = 3, max_images: Optional[int] = None) -> np.ndarray:
  """All images of one class as uint8 ``[N, H, W, C]``, in file order (NumPy access for small
  datasets: index by image number).

  ``image_size``: resize to a square of that side (the official decoder's bilinear resize,
  rounded; images already that size are returned exactly). ``channels``: 3 (as the official decoder),
  1, or 0 to keep what was stored. Raises DataError for a missing file, a corrupt record or image
  (naming the file and record), a label that is not ``class_id``, or a count that differs from the
  spec.
  """
  tf = tf_host()
  path = class_record_path(spec, class_id)
  if not path_exists(path):
    raise DataError(f"Missing class file {path} (class {class_id} of {spec.name}): the conversion "
                    "did not finish; re-run it.")
  ds = tf.data.TFRecordDataset(path)
  if max_images is not None:
    ds = ds.take(max_images)
  ds = ds.map(lambda s: _decode_uint8(s, image_size, channels),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  images = None
  if image_size:  # one size: read in batches (much less per-element overhead)
    try:
      batches = list(ds.batch(256).as_numpy_iterator())
      images = [im for b in batches for im in b[0]]
      labels = [l for b in batches for l in b[1]]
    except tf.errors.OpError:
      images = None  # re-read one record at a time below, to name the bad one
  if images is None:
    images, labels = [], []
    try:
      for image, label in ds.as_numpy_iterator():
        images.append(image)
        labels.append(label)
    except tf.errors.OpError as e:
      raise DataError(f"Corrupt record {len(images)} in {path} ({_one_line(e)}); re-run the "
                      "conversion of this class.") from None
  wrong = [i for i, label in enumerate(labels) if label != class_id]
  if wrong:
    raise DataError(f"Record {wrong[0]} of {path} has label {labels[wrong[0]]}, expected "
                    f"{class_id}: the file does not belong to this class id; re-run the conversion.")
  expected = num_class_records(spec, class_id)
  if max_images is not None:
    expected = min(max_images, expected)
  if len(images) != expected:
    raise DataError(f"{path} holds {len(images)} records but {SPEC_FILENAME} says {expected}: "
                    "the conversion did not finish; re-run it.")
  if not images:
    c = channels or 1
    return np.zeros((0, image_size or 0, image_size or 0, c), np.uint8)
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise DataError(f"Images of class {class_id} in {path} have different sizes "
                    f"({sorted(shapes)[:3]}...); pass image_size= to resize them.")
  return np.stack(images)


# ----------------------------------------------------------------------------------------------
# Random access to single records (the episode pipeline of large sources such as ILSVRC).
#
# A TFRecord file is a sequence of records framed as
#   uint64 length (little endian) | uint32 masked CRC-32C of the length | data[length] |
#   uint32 masked CRC-32C of the data.
# Scanning the 12-byte headers (one seek per record) gives every record's position, so an
# episode reads and decodes only the images it samples instead of whole class files (an ILSVRC
# class file holds ~1300 full-size JPEGs; an episode samples a few of each of up to 50 classes).
# Records are read with TensorFlow's random-access record reader, which checks both CRCs (a
# damaged record is a DataError naming the file and record), or, where that (internal) reader is
# missing, by plain seek + read.

_HEADER = 12  # length + its CRC
_FOOTER = 4   # CRC of the data


def index_class_records(spec: AnySpec, class_id: int) -> np.ndarray:
  """``int64 [N, 2]``: (byte offset of the record, data length) of every record of the class
  file, in file order. Raises DataError for a missing or truncated file, or a record count that
  differs from ``dataset_spec.json``."""
  path = class_record_path(spec, class_id)
  if not path_exists(path):
    raise DataError(f"Missing class file {path} (class {class_id} of {spec.name}): the conversion "
                    "did not finish; re-run it.")
  rows = []
  # A GFile (gs://, ...) reads ahead 512 KiB, so indexing a remote file costs about one read of it.
  read_errors = (tf_host().errors.OpError,) if is_remote_path(path) else ()
  try:
    size = file_size(path)
    with open_file(path, "rb") as f:
      pos = 0
      while pos < size:
        f.seek(pos)
        header = f.read(_HEADER)
        if len(header) < _HEADER:
          raise DataError(f"{path} is truncated in the header of record {len(rows)}: the "
                          "conversion did not finish; re-run it.")
        length = int.from_bytes(header[:8], "little")
        end = pos + _HEADER + length + _FOOTER
        if end > size:
          raise DataError(f"{path} is truncated in record {len(rows)} ({length} bytes "
                          f"announced, {size - pos - _HEADER} left): the conversion did not "
                          "finish; re-run it.")
        rows.append((pos, length))
        pos = end
  except read_errors as e:
    raise DataError(_access_error(path, e)) from None
  expected = num_class_records(spec, class_id)
  if len(rows) != expected:
    raise DataError(f"{path} holds {len(rows)} records but {SPEC_FILENAME} says {expected}: "
                    "the conversion did not finish; re-run it.")
  return np.asarray(rows, np.int64).reshape(-1, 2)


DEFAULT_INDEX_CACHE_DIR = "auto"  # ${XDG_CACHE_HOME:-~/.cache}/visrep_jax/md_index
_index_cache_warned = set()


def resolve_index_cache_dir(cache_dir: str) -> str:
  """'auto' -> ``${XDG_CACHE_HOME:-~/.cache}/visrep_jax/md_index``; '~' expanded locally."""
  if cache_dir == "auto":
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "visrep_jax", "md_index")
  return cache_dir if is_remote_path(cache_dir) else os.path.expanduser(cache_dir)


def cached_class_index(spec: AnySpec, class_id: int, cache_dir: str = DEFAULT_INDEX_CACHE_DIR,
                       stamp: Optional[Tuple[int, int]] = None) -> np.ndarray:
  """:func:`index_class_records`, kept across runs in ``cache_dir`` for remote class files.

  Indexing a class file on an object store reads about the whole file (the GFile read-ahead),
  so every process of every run would read the whole source at its first episodes. The index is
  stored as ``<cache_dir>/<sha1(path, size, mtime)>.npy`` (``cache_dir='auto'``:
  ``${XDG_CACHE_HOME:-~/.cache}/visrep_jax/md_index``; or a gs:// directory that all hosts share) and used again only if it still fits the file: the record count of
  ``dataset_spec.json``, the last record ending at the file's size, and the last record's
  length header read back from the file. Local class files are indexed directly (header reads
  only, fast). ``cache_dir=''`` disables the cache; a cache that cannot be written is reported
  once and skipped. ``stamp``: the file's :func:`file_stamp` if the caller has it (saves a
  round trip).
  """
  path = class_record_path(spec, class_id)
  if not cache_dir or not is_remote_path(path):
    return index_class_records(spec, class_id)
  stamp = stamp or file_stamp(path)
  if stamp is None:
    return index_class_records(spec, class_id)  # reports the missing file
  cache_dir = resolve_index_cache_dir(cache_dir)
  key = hashlib.sha1(f"{path}\0{stamp[0]}\0{stamp[1]}".encode()).hexdigest()
  cache_path = os.path.join(cache_dir, key + ".npy")
  index = _load_cached_index(cache_path, path, stamp[0], num_class_records(spec, class_id))
  if index is None:
    index = index_class_records(spec, class_id)
    _save_cached_index(cache_dir, cache_path, index)
  return index


def _load_cached_index(cache_path: str, path: str, size: int, expected: int
                       ) -> Optional[np.ndarray]:
  try:
    if not path_exists(cache_path):
      return None
    with open_file(cache_path, "rb") as f:
      index = np.load(io.BytesIO(f.read()), allow_pickle=False)
    if (index.dtype != np.int64 or index.shape != (expected, 2) or expected == 0
        or index[0, 0] != 0 or np.any(index[:, 1] < 0)
        or np.any(index[1:, 0] != index[:-1, 0] + _HEADER + index[:-1, 1] + _FOOTER)):
      return None  # every record must start where the previous one ends
    last_offset, last_length = (int(v) for v in index[-1])
    if last_offset + _HEADER + last_length + _FOOTER != size:
      return None
    with open_file(path, "rb") as f:
      f.seek(last_offset)
      header = f.read(_HEADER)
    if len(header) < _HEADER or int.from_bytes(header[:8], "little") != last_length:
      return None
    return index
  except Exception:  # pylint: disable=broad-except  (a bad cache entry is only a miss)
    return None


def _save_cached_index(cache_dir: str, cache_path: str, index: np.ndarray):
  buf = io.BytesIO()
  np.save(buf, index, allow_pickle=False)
  tmp = f"{cache_path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  remote = is_remote_path(cache_dir)
  try:
    if remote:
      gfile = tf_host().io.gfile
      gfile.makedirs(cache_dir)
      try:
        with gfile.GFile(tmp, "wb") as f:
          f.write(buf.getvalue())
        gfile.rename(tmp, cache_path, overwrite=True)
      finally:
        if gfile.exists(tmp):  # a failed rename leaves no partial entry behind
          gfile.remove(tmp)
    else:
      os.makedirs(cache_dir, exist_ok=True)
      try:
        with open(tmp, "wb") as f:
          f.write(buf.getvalue())
        os.replace(tmp, cache_path)
      finally:
        if os.path.exists(tmp):
          os.remove(tmp)
  except Exception as e:  # pylint: disable=broad-except  (the cache is an optimisation)
    if cache_dir not in _index_cache_warned:
      _index_cache_warned.add(cache_dir)
      logging.warning("Cannot write the Meta-Dataset record index cache in %s (%s); remote class "
                      "files will be indexed again next run. Set config.episodes."
                      "index_cache_dir to a writable directory, or '' to silence this.",
                      cache_dir, e)


def _random_record_reader(path: str):
  try:
    from tensorflow.python.lib.io import _pywrap_record_io  # pylint: disable=g-import-not-at-top
    return _pywrap_record_io.RandomRecordReader(path)
  except (ImportError, AttributeError):
    return None


def read_records(path: str, index: np.ndarray, records: Sequence[int]) -> List[bytes]:
  """The serialized records ``records`` (numbers in file order) of ``path``, given its
  :func:`index_class_records` ``index``, read in offset order (any TensorFlow filesystem). CRCs
  are checked by TensorFlow's random-access reader; where that internal API is missing, records
  are read by plain seek + read without CRC checks (a damaged record then fails when it is parsed
  or decoded)."""
  tf = tf_host()  # TensorFlow's error types and reader
  out: Dict[int, bytes] = {}
  wanted = sorted(set(int(r) for r in records))
  r = wanted[0] if wanted else 0
  try:
    reader = _random_record_reader(path)
    if reader is not None:
      try:
        for r in wanted:
          out[r], _ = reader.read(int(index[r, 0]))
      finally:
        reader.close()
    else:
      with open_file(path, "rb") as f:
        for r in wanted:
          offset, length = (int(v) for v in index[r])
          f.seek(offset + _HEADER)
          out[r] = f.read(length)
          if len(out[r]) != length:
            raise IndexError("truncated")
  except (tf.errors.OpError, IndexError, OSError) as e:
    if (is_remote_path(path) and isinstance(e, tf.errors.OpError)
        and not isinstance(e, tf.errors.DataLossError)):  # unavailable, permission, ...
      raise DataError(_access_error(path, e)) from None
    raise DataError(f"Corrupt record {r} in {path} ({_one_line(e)}): the file is damaged or "
                    "changed while it was read; re-run the conversion of this class.") from None
  return [out[int(r)] for r in records]


def decode_records(serialized: Sequence[bytes], image_size: int, channels: int = 3,
                   names: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, np.ndarray]:
  """Decodes serialized records in parallel (one tf.data pass): ``(uint8 [n, size, size, C],
  int64 labels [n])``, the pixels :func:`load_class_images` gives for the same records.
  ``names[i]`` ('R in FILE') names record i in the DataError of a corrupt record."""
  tf = tf_host()
  if not image_size or channels not in (1, 3):
    raise ValueError("decode_records needs an image_size and channels 1 or 3 (one static shape)")
  n = len(serialized)
  if n == 0:
    return np.zeros((0, image_size, image_size, channels), np.uint8), np.zeros((0,), np.int64)
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(serialized), tf.string))
  ds = ds.map(lambda s: _decode_uint8(s, image_size, channels),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  try:
    images, labels = zip(*ds.batch(256).as_numpy_iterator())
    return np.concatenate(images), np.concatenate(labels)
  except tf.errors.OpError:
    pass
  for i, s in enumerate(serialized):  # name the bad record
    try:
      _decode_uint8(tf.constant(s), image_size, channels)
    except tf.errors.OpError as e:
      where = names[i] if names else str(i)
      raise DataError(f"Corrupt record {where} ({_one_line(e)}); re-run the conversion of this "
                      "class.") from None
  raise DataError("Decoding a batch of records failed but every record decodes alone; "
                  "report this with the source's dataset_spec.json.")


def load_split_images(spec: AnySpec, split: Split, image_size: Optional[int] = None,
                      channels: int = 3, max_images_per_class: Optional[int] = None
                      ) -> Dict[int, np.ndarray]:
  """``{class_id: uint8 [N, H, W, C]}`` for every class of ``split`` (see
  :func:`load_class_images`); an episode sampler picks ``images[class_id][i]``."""
  check_class_files(spec, split)
  return {c: load_class_images(spec, c, image_size, channels, max_images_per_class)
          for c in spec.get_classes(split)}
