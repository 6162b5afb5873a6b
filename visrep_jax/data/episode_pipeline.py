"""Meta-Dataset episodes for training and evaluation: spec + sampler + images + augmentation.

One :class:`EpisodeSource` per (source directory, split) samples episodes with the official
algorithm (:mod:`visrep_jax.data.episodes`), takes the images from the converted records
(:mod:`visrep_jax.data.meta_dataset`) and pads everything to static shapes, so that one compiled
step serves every episode. :class:`EpisodeStream` mixes the training sources, applies the episode
augmentation (:mod:`visrep_jax.data.episode_augment`: SimCLR episodes, BOHB, SC-Aug) and prefetches
on a background thread.

Determinism: episode ``t`` of a stream is a function of ``(seed, t)`` only (the sampler's RNG,
the image choice and the augmentation are all re-seeded from it), so a resumed run sees the same
episodes, and every evaluation of every model sees the same test episodes.

An episode is a dict of NumPy arrays (S / Q = padded support / query sizes, N = padded ways):
  images        uint8 or float32 [S + Q, H, W, C] (support first; float32 [0, 255] after an
                augmentation)
  support_labels int32 [S] in [0, N) (padding: -1);  support_mask bool [S]
  query_labels  int32 [Q] in [0, N) (padding: -1);   query_mask bool [Q]
  support_class_ids int32 [S]: the class of each support image among the split's classes
                (0 .. num_classes - 1, padding: -1; an :class:`EpisodeStream` of several sources
                offsets each source's ids so they are distinct); kept by SimCLR episodes, whose
                labels are support indices (the auxiliary train-class loss of "+LR" reads it)
  num_ways      int32 [] (real ways; a SimCLR episode has one way per support image)
  is_simclr     bool []
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from visrep_jax.data import DataError
from visrep_jax.data import episodes as episodes_lib
from visrep_jax.data import meta_dataset as md

# A class file on a remote filesystem (gs://, ...) is checked for changes at most this often
# (seconds): its stat is a network round trip, and an episode may miss images of 50 classes.
REMOTE_STAMP_TTL_S = 60.0


class EpisodeError(DataError):
  """A configuration or data problem of the episode pipeline (one line, says what to do;
  ``python -m visrep_jax.main`` prints it as ``error: ...`` without a traceback)."""


def episode_seed(seed: int, index: int, salt: int = 0) -> int:
  """A 31-bit seed for episode ``index`` of a stream seeded with ``seed``."""
  return int(np.random.SeedSequence([int(seed), int(index), int(salt)]).generate_state(1)[0]
             & 0x7FFFFFFF)


class _ImageCache:
  """Decoded images (uint8 [H, W, C]) by (class id, record number), kept up to ``max_bytes``
  (least recently used first out).

  Reads only the records an episode samples: each class file is indexed once (record offsets,
  :func:`meta_dataset.index_class_records`), then the missing images of an episode are read by
  offset and decoded together in one parallel tf.data pass. So memory and time per episode scale
  with the episode, not with the class files (ILSVRC: ~1300 full-size JPEGs per class).
  """

  def __init__(self, spec, image_size: int, channels: int, max_bytes: int,
               index_cache_dir: str = md.DEFAULT_INDEX_CACHE_DIR):
    self.spec, self.image_size, self.channels = spec, image_size, channels
    self.index_cache_dir = index_cache_dir
    self.max_bytes = max_bytes
    self._items: "collections.OrderedDict[Tuple[int, int], np.ndarray]" = (
        collections.OrderedDict())
    # class -> (index, (size, mtime), time of the last stamp check)
    self._index: Dict[int, Tuple[np.ndarray, Any, float]] = {}
    self._bytes = 0
    self._lock = threading.Lock()
    self.decoded = 0  # images decoded so far (cache misses)

  def _class_index(self, class_id: int) -> np.ndarray:
    """The class file's record index, rebuilt when the file changed since it was indexed (a
    re-run conversion; its decoded images are dropped from the cache too). A remote file is
    checked at most every ``REMOTE_STAMP_TTL_S`` seconds."""
    path = md.class_record_path(self.spec, class_id)
    now = time.monotonic()
    with self._lock:
      cached = self._index.get(class_id)
    if (cached is not None and md.is_remote_path(path)
        and now - cached[2] < REMOTE_STAMP_TTL_S):
      return cached[0]
    # (size, mtime); None: index_class_records reports the missing file.
    stamp = md.file_stamp(path)
    if cached is not None and cached[1] == stamp:
      with self._lock:
        self._index[class_id] = (cached[0], stamp, now)
      return cached[0]
    index = md.cached_class_index(self.spec, class_id, self.index_cache_dir, stamp)
    with self._lock:
      if cached is not None:  # the file changed: its decoded images are stale
        for key in [k for k in self._items if k[0] == class_id]:
          self._bytes -= self._items.pop(key).nbytes
      self._index[class_id] = (index, stamp, now)
    return index

  def clear(self):
    """Drops the decoded images (the record indexes stay)."""
    with self._lock:
      self._items.clear()
      self._bytes = 0

  def get_many(self, keys: Sequence[Tuple[int, int]]) -> List[np.ndarray]:
    """The images of ``keys`` ((class id, record number) pairs), in that order."""
    found: Dict[Tuple[int, int], np.ndarray] = {}
    with self._lock:
      for key in keys:
        if key in self._items:
          self._items.move_to_end(key)
          found[key] = self._items[key]
    missing = sorted({k for k in keys if k not in found})
    if missing:
      serialized, names = [], []
      for class_id, group in itertools.groupby(missing, key=lambda k: k[0]):
        records = [r for _, r in group]
        index = self._class_index(class_id)
        bad = [r for r in records if not 0 <= r < len(index)]
        if bad:
          raise EpisodeError(f"record {bad[0]} of class {class_id} of {self.spec.name} does not "
                             f"exist (the class has {len(index)}): dataset_spec.json and the "
                             "class files disagree; re-run the conversion.")
        path = md.class_record_path(self.spec, class_id)
        serialized += md.read_records(path, index, records)
        names += [f"{r} in {path}" for r in records]
      images, labels = md.decode_records(serialized, self.image_size, self.channels, names)
      for (class_id, _), label, name in zip(missing, labels, names):
        if label != class_id:
          raise DataError(f"Record {name} has label {label}, expected {class_id}: the file "
                          "does not belong to this class id; re-run the conversion.")
      with self._lock:
        self.decoded += len(missing)
        for key, image in zip(missing, images):
          image = image.copy()  # its own buffer: a view would keep the whole batch alive
          found[key] = image
          if key not in self._items:
            self._items[key] = image
            self._bytes += image.nbytes
        while self._bytes > self.max_bytes and self._items:
          _, old = self._items.popitem(last=False)
          self._bytes -= old.nbytes
    return [found[k] for k in keys]


@dataclasses.dataclass
class EpisodeShapes:
  """Static episode sizes: ``ways`` (N), ``support`` (S), ``query`` (Q)."""
  ways: int
  support: int
  query: int

  def union(self, other: "EpisodeShapes") -> "EpisodeShapes":
    return EpisodeShapes(max(self.ways, other.ways), max(self.support, other.support),
                         max(self.query, other.query))


class EpisodeSource:
  """Episodes of one Meta-Dataset source (a converted directory: local, or on any TensorFlow
  filesystem such as ``gs://``) and split.

  ``use_hierarchy``: the ImageNet DAG / Omniglot alphabets when the spec has them (the official
  ``use_dag_ontology`` / ``use_bilevel_ontology`` for ILSVRC / Omniglot); the DAG is ignored for
  a fraction ``ignore_hierarchy_probability`` of the episodes (CrossTransformers: 0.5 in
  training). ``index_cache_dir``: where the record indexes of remote class files are kept
  across runs (:func:`meta_dataset.cached_class_index`; '' to disable).
  """

  def __init__(self, path: str, split, descr_config: episodes_lib.EpisodeDescriptionConfig,
               image_size: int, *, channels: int = 3, use_hierarchy: bool = True,
               ignore_hierarchy_probability: float = 0.0, cache_bytes: int = 4 << 30,
               index_cache_dir: str = md.DEFAULT_INDEX_CACHE_DIR):
    if not md.path_isdir(path):
      raise EpisodeError(f"Meta-Dataset source directory {path!r} does not exist: convert the "
                         "source first (python -m visrep_jax.data.md_convert, or "
                         "python -m visrep_jax.data.md_mini for the mini benchmark).")
    self.path = path
    self.spec = md.load_dataset_spec(path)
    self.split = md.Split.parse(split)
    self.name = self.spec.name
    hierarchical = isinstance(self.spec, md.HierarchicalDatasetSpecification)
    bilevel = isinstance(self.spec, md.BiLevelDatasetSpecification)
    n = len(self.spec.get_classes(self.split))
    self.num_classes = n
    if n == 0:
      raise EpisodeError(f"{self.name} has no {self.split.name.lower()} classes; pick another "
                         "split or source.")
    md.check_class_files(self.spec, self.split)
    try:
      self.sampler = episodes_lib.EpisodeDescriptionSampler(
          self.spec, self.split, descr_config,
          use_dag_hierarchy=use_hierarchy and hierarchical,
          use_bilevel_hierarchy=use_hierarchy and bilevel,
          ignore_hierarchy_probability=ignore_hierarchy_probability, episode_sampling_seed=0)
    except ValueError as e:
      raise EpisodeError(f"{self.name} ({self.split.name.lower()} split): {e}") from None
    ways, support, query = self.sampler.max_episode_sizes()
    self.shapes = EpisodeShapes(ways, support, query)
    self.image_size = image_size
    self.channels = channels
    self._cache = _ImageCache(self.spec, image_size, channels, cache_bytes, index_cache_dir)

  def release_cache(self):
    """Frees the decoded images kept for this source (e.g. once its test episodes are done)."""
    self._cache.clear()

  def sample(self, seed: int, shapes: Optional[EpisodeShapes] = None) -> Dict[str, np.ndarray]:
    """The episode of ``seed``, padded to ``shapes`` (default: this source's maxima)."""
    shapes = shapes or self.shapes
    self.sampler.reseed(seed)  # episode t: a function of (seed, t) alone
    description = self.sampler.sample_episode_description()  # split-relative class ids
    rng = np.random.RandomState(episode_seed(seed, 0, 1))
    idx = episodes_lib.sample_episode_indices(description, self.sampler.images_per_class, rng)
    padded = episodes_lib.pad_episode(idx, shapes.support, shapes.query, shapes.ways)
    class_set = self.sampler.class_set  # relative -> dataset class id
    size, c = self.image_size, self.channels
    images = np.zeros((shapes.support + shapes.query, size, size, c), np.uint8)
    slots, keys = [], []
    for part, offset in (("support", 0), ("query", shapes.support)):
      classes, within = padded[f"{part}_classes"], padded[f"{part}_images"]
      for k in np.flatnonzero(padded[f"{part}_mask"]):
        slots.append(offset + k)
        keys.append((int(class_set[int(classes[k])]), int(within[k])))
    for slot, image in zip(slots, self._cache.get_many(keys)):
      images[slot] = image
    return {
        "images": images,
        "support_labels": np.where(padded["support_mask"], padded["support_labels"], -1
                                   ).astype(np.int32),
        "support_mask": padded["support_mask"],
        "query_labels": np.where(padded["query_mask"], padded["query_labels"], -1
                                 ).astype(np.int32),
        "query_mask": padded["query_mask"],
        "support_class_ids": padded["support_classes"].astype(np.int32),  # split-relative, -1 pad
        "num_ways": np.int32(padded["num_classes"]),
        "is_simclr": np.bool_(False),
    }


def augment_episode(episode: Dict[str, np.ndarray], fn: Callable, seed: int
                    ) -> Dict[str, np.ndarray]:
  """Applies an :func:`episode_augment.parse` function to a padded episode (eagerly, in TF) and
  returns the same layout with float32 [0, 255] images."""
  s = episode["support_mask"].shape[0]
  ep = {"support_images": episode["images"][:s], "query_images": episode["images"][s:],
        "support_labels": np.maximum(episode["support_labels"], 0),
        "query_labels": np.maximum(episode["query_labels"], 0),
        "support_mask": episode["support_mask"], "query_mask": episode["query_mask"],
        "support_class_ids": episode["support_class_ids"]}
  out = fn(ep, np.array([seed, 0], np.int64))
  out = {k: np.asarray(v) for k, v in out.items()}
  is_simclr = bool(out["is_simclr"])
  return {
      "images": np.concatenate([out["support_images"], out["query_images"]]).astype(np.float32),
      "support_labels": out["support_labels"].astype(np.int32),
      "support_mask": out["support_mask"].astype(bool),
      "query_labels": out["query_labels"].astype(np.int32),
      "query_mask": out["query_mask"].astype(bool),
      # Support images keep their order (and class) in SimCLR episodes too.
      "support_class_ids": np.where(out["support_mask"], out["support_class_ids"], -1
                                    ).astype(np.int32),
      "num_ways": np.int32(int(out["support_mask"].sum()) if is_simclr else episode["num_ways"]),
      "is_simclr": np.bool_(is_simclr),
  }


class EpisodeStream:
  """Episodes ``start, start + 1, ...`` from one or more sources (chosen uniformly per episode,
  as Meta-Dataset's multi-source training), augmented, padded to the union of the sources'
  shapes, prefetched ``prefetch`` ahead on a background thread. ``support_class_ids`` of source
  k are offset by the classes of sources 0..k-1: ids in [0, ``num_classes``) over the stream."""

  def __init__(self, sources: Sequence[EpisodeSource], seed: int, start: int = 0,
               augment: Optional[Callable] = None, prefetch: int = 2,
               shapes: Optional[EpisodeShapes] = None):
    if not sources:
      raise EpisodeError("No episode sources: list at least one in config.episodes.")
    self.sources = list(sources)
    self.seed, self.index = int(seed), int(start)
    self.augment = augment
    shp = self.sources[0].shapes
    for s in self.sources[1:]:
      shp = shp.union(s.shapes)
    self.shapes = shapes or shp
    counts = [s.num_classes for s in self.sources]
    self.class_offsets = np.cumsum([0] + counts[:-1])
    self.num_classes = int(sum(counts))
    self._queue: "queue.Queue" = queue.Queue(maxsize=max(prefetch, 1))
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._prefetch = prefetch
    self._error: Optional[BaseException] = None

  def episode(self, index: int) -> Dict[str, np.ndarray]:
    seed = episode_seed(self.seed, index)
    k = np.random.RandomState(episode_seed(self.seed, index, 2)).randint(
        len(self.sources)) if len(self.sources) > 1 else 0
    src = self.sources[k]
    ep = src.sample(seed, self.shapes)
    ids = ep["support_class_ids"]
    ep["support_class_ids"] = np.where(ids >= 0, ids + self.class_offsets[k], -1).astype(np.int32)
    if self.augment is not None:
      ep = augment_episode(ep, self.augment, episode_seed(self.seed, index, 3))
    ep["source"] = src.name
    return ep

  def _put(self, item) -> bool:
    """Queues ``item`` unless the stream is closed first; returns whether it was queued."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _worker(self):
    i = self.index
    try:
      while not self._stop.is_set():
        item = self.episode(i)
        i += 1
        if not self._put(item):
          return
    except BaseException as e:  # surfaced in __next__
      self._put(e)

  def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    if self._error is not None:  # the worker failed (and stopped): the same error every time
      raise self._error
    if self._stop.is_set():
      raise EpisodeError("This EpisodeStream is closed; create a new one (start=index) to go on.")
    if self._prefetch <= 0:
      ep = self.episode(self.index)
      self.index += 1
      return ep
    if self._thread is None:
      self._thread = threading.Thread(target=self._worker, daemon=True)
      self._thread.start()
    item = self._queue.get()
    if isinstance(item, BaseException):
      self._error = item
      raise item
    self.index += 1
    return item

  def close(self, timeout: float = 300.0):
    """Stops the prefetch thread and waits for it (it finishes the episode it is building): a
    thread left inside TensorFlow while the interpreter exits can abort the process."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout)
      if self._thread.is_alive():
        logging.warning("The episode prefetch thread is still building an episode after %.0f s; "
                        "leaving it (a daemon thread).", timeout)
      self._thread = None

  def __enter__(self) -> "EpisodeStream":
    return self

  def __exit__(self, *exc):
    self.close()


def open_sources(data_dir: str, names: Sequence[str], split, descr_config, image_size: int,
                 **kwargs) -> List[EpisodeSource]:
  """``EpisodeSource`` for each ``data_dir/<name>`` (a source's converted directory)."""
  if not data_dir:
    raise EpisodeError("config.episodes.data_dir is empty: point it at the directory holding "
                       "the converted Meta-Dataset sources (one sub-directory per source).")
  return [EpisodeSource(os.path.join(data_dir, n), split, descr_config, image_size, **kwargs)
          for n in names]


def confidence_interval(accuracies: Sequence[float]) -> float:
  """Meta-Dataset's 95% confidence interval of the mean over episodes:
  ``1.96 * std / sqrt(n)`` (population std, as ``np.std``)."""
  a = np.asarray(accuracies, np.float64)
  if a.size == 0:
    return float("nan")
  return float(1.96 * a.std() / np.sqrt(a.size))
