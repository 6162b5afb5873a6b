"""Meta-Dataset records as a supervised classification dataset (``meta_dataset:<source>``).

CrossTransformers' phase 1 (C.1 L621-632) trains the backbone as a plain classifier over the
712 ILSVRC *train-split* classes of Meta-Dataset before the episodic phase. This source reads the
converted records of one source (:mod:`visrep_jax.data.meta_dataset`: ``dataset_spec.json`` and one
``{class_id}.tfrecords`` file per class) as ``{'image': encoded bytes, 'label': int64}`` examples:

  config.dataset.name = 'meta_dataset:ilsvrc_2012'
  config.dataset.data_dir = DIR   # DIR/ilsvrc_2012/dataset_spec.json (or DIR itself is the source)

Splits: ``train``, ``valid`` (``validation``, ``val``) or ``test`` -- Meta-Dataset's *class*
splits -- with labels ``0..K-1`` over that split's classes (class id minus the split's first id),
then optionally

* a per-class image slice, TFDS-like: ``[a:b]`` with image counts (``valid[:50]``: the first 50
  images of every valid class) or percentages (``train[:5%]``: the first 5% of every train
  class, ``round(n * p / 100)``; ``train[5%:]`` is exactly the rest). Record files have no index:
  reading ``[a:]`` skips ``a`` records of every class file, so hold out the *first* part
  (evaluate on ``train[:5%]``, train on ``train[5%:]``);
* a sampling mode, ``:records`` (default) or ``:uniform``:

  - ``records``: every image once per pass, the class files interleaved at random in proportion
    to their sizes (Meta-Dataset's own batch reader, ``reader.BatchReaderMixin``); finite, so it
    is also the evaluation mode;
  - ``uniform``: the class of every example is drawn uniformly over the split's classes, then
    the next image of that class (each class file read in a loop, shuffled with a small buffer
    of ``CLASS_SHUFFLE_BUFFER`` = 16 images: every class holds one, so 712 classes x 16 encoded
    images, about 1.3 GB for ILSVRC; the official episode reader's 1000 would hold most of
    ImageNet): "batches of images sampled uniformly from the training categories" (L622).
    Infinite; for training only (``num_examples`` still counts the slice's images, one nominal
    epoch); the evaluation and probe splits must use ``records``.

``num_classes`` is the number of classes of the *train* split (the classifier's width); set
``config.dataset.num_classes`` to train on another split. The mixing and per-class shuffles use
fixed seeds per process (a resumed run reads the same stream); ``config.seed`` reorders the
stream through the pipeline's shuffle buffer (``config.dataset.shuffle_buffer``; 1000 as
Meta-Dataset's). Several processes each read every class file and keep their share
(``Dataset.shard``).

Preprocessing op registered here: ``md_resize(size)``, the official ``ImageDecoder``'s square
bilinear resize (``align_corners=True``, aspect ratio not kept, rounded to integers), i.e. the
pixels the episode pipeline feeds the episodic phase; with ``normalize('inception')`` (3 channels)
or ``normalize(0.5, 0.5)`` (1 channel) the model sees the same [-1, 1] inputs in both phases
(exactly for PNG records; for JPEG records ``decode`` uses libjpeg's accurate integer IDCT and the
episode pipeline TensorFlow's default one, which can differ by a few levels).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import List, Optional, Tuple

import numpy as np

from visrep_jax.data import DataError, preprocess, sources, tf_host
from visrep_jax.data import meta_dataset as md

PREFIX = "meta_dataset:"
SAMPLING_MODES = ("records", "uniform")
CLASS_SHUFFLE_BUFFER = 16  # per class, uniform mode (see the module docstring)
_MIX_SEED = 0x4D44  # fixed seeds: the stream is a function of the split and the process only

_SPLIT_RE = re.compile(r"^\s*(?P<split>[A-Za-z_]+)\s*(?:\[(?P<lo>[^:\]]*):(?P<hi>[^\]]*)\])?"
                       r"\s*(?::\s*(?P<sampling>[A-Za-z_]+))?\s*$")
_SPLIT_HELP = ("use train, valid or test, optionally with a per-class image slice and a sampling "
               "mode, e.g. 'train[5%:]:uniform', 'train[:5%]', 'valid[:50]'")


@dataclasses.dataclass(frozen=True)
class Bound:
  """One end of a per-class slice: ``value`` images, or ``value`` percent of the class."""
  value: float
  percent: bool

  def resolve(self, n: int) -> int:
    if self.percent:
      return min(n, int(math.floor(n * self.value / 100.0 + 0.5)))
    return min(n, int(self.value))


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """A parsed split string: class split, per-class slice ``[start:stop)``, sampling mode."""
  split: md.Split
  start: Optional[Bound]
  stop: Optional[Bound]
  sampling: str

  def image_range(self, n: int) -> Tuple[int, int]:
    lo = self.start.resolve(n) if self.start else 0
    hi = self.stop.resolve(n) if self.stop else n
    return lo, max(lo, hi)


def _parse_bound(text: str, split: str) -> Optional[Bound]:
  text = text.strip()
  if not text:
    return None
  percent = text.endswith("%")
  number = text[:-1].strip() if percent else text
  try:
    value = float(number) if percent else int(number)
  except ValueError:
    value = -1
  if value < 0 or (percent and value > 100):
    raise DataError(f"Bad slice bound {text!r} in split {split!r}: give a number of images per "
                    "class (e.g. 50) or a percentage from 0% to 100% (e.g. 5%).")
  return Bound(float(value), percent)


def parse_split(split: str) -> SplitSpec:
  """``'train[5%:]:uniform'`` -> ``SplitSpec(Split.TRAIN, 5%, None, 'uniform')``; DataError
  (one line, with the syntax) for anything else."""
  m = _SPLIT_RE.match(str(split))
  if not m:
    raise DataError(f"Cannot parse split {split!r} of a meta_dataset source: {_SPLIT_HELP}.")
  try:
    class_split = md.Split.parse(m.group("split"))
  except ValueError:
    raise DataError(f"Unknown split {m.group('split')!r} in {split!r}: {_SPLIT_HELP}.") from None
  sampling = (m.group("sampling") or "records").lower()
  if sampling not in SAMPLING_MODES:
    raise DataError(f"Unknown sampling mode {sampling!r} in split {split!r}; valid: "
                    f"{', '.join(SAMPLING_MODES)} (e.g. 'train:uniform').")
  start = _parse_bound(m.group("lo") or "", split)
  stop = _parse_bound(m.group("hi") or "", split)
  return SplitSpec(class_split, start, stop, sampling)


def find_source_dir(data_dir: Optional[str], name: str) -> str:
  """``data_dir/name`` (or ``data_dir`` itself when it is the records directory of ``name``);
  ``data_dir`` may be on any TensorFlow filesystem (``gs://bucket/meta_dataset``)."""
  how = ("convert it with python -m visrep_jax.data.md_convert or the official meta_dataset "
         "converter (the offline mini benchmark: python -m visrep_jax.data.md_mini --out=DIR)")
  if not data_dir:
    raise DataError(f"{PREFIX}{name} needs config.dataset.data_dir: the directory holding the "
                    f"converted Meta-Dataset sources, one sub-directory per source ({how}).")
  if not md.path_isdir(data_dir):
    raise DataError(f"Meta-Dataset directory {data_dir!r} (config.dataset.data_dir) does not "
                    f"exist: {how}, and point dataset.data_dir at it.")
  path = os.path.join(data_dir, name)
  if md.path_isdir(path):
    return path
  own = os.path.join(data_dir, md.SPEC_FILENAME)
  if md.path_exists(own):
    try:
      if md.load_dataset_spec(data_dir).name == name:
        return data_dir
    except DataError:
      pass
  found = sorted(d for d in md.list_dir(data_dir)
                 if md.path_exists(os.path.join(data_dir, d, md.SPEC_FILENAME)))
  listing = (f"the converted sources there: {', '.join(found)}" if found
             else "none is converted there")
  raise DataError(f"No Meta-Dataset source {name!r} in {data_dir} (expected "
                  f"{path}/{md.SPEC_FILENAME}; {listing}): {how}.")


@dataclasses.dataclass(frozen=True)
class _View:
  """One split string resolved against the spec: ``(class id, first, stop)`` record ranges."""
  spec: SplitSpec
  ranges: Tuple[Tuple[int, int, int], ...]
  offset: int  # first class id of the split (label = class id - offset)

  def shard_counts(self, index: int, count: int) -> List[int]:
    return [len(range(index, hi - lo, count)) for _, lo, hi in self.ranges]


class MetaDatasetClassification(sources.Source):
  """The records of one converted Meta-Dataset source as a classification dataset (see the
  module docstring for the split syntax)."""
  image_encoded = True
  random_access = False

  def __init__(self, spec: md.AnySpec):
    self.spec = spec
    self.name = spec.name
    self.num_classes = len(spec.get_classes(md.Split.TRAIN))
    self._views = {}

  def classes(self, split: str) -> range:
    """The class ids of the split (label ``i`` is class id ``classes[i]``)."""
    return self.spec.get_classes(self._view(split).spec.split)

  def class_names(self, split: str) -> List[str]:
    return [str(self.spec.class_names[c]) for c in self.classes(split)]

  def _view(self, split: str) -> _View:
    if split in self._views:
      return self._views[split]
    s = parse_split(split)
    ids = self.spec.get_classes(s.split)
    if len(ids) == 0:
      counts = "/".join(str(len(self.spec.get_classes(x))) for x in md.SPLITS)
      raise DataError(f"Meta-Dataset source {self.name} has no {s.split.name.lower()} classes "
                      f"({counts} train/valid/test classes in {self.spec.path}); choose another "
                      "split.")
    md.check_class_files(self.spec, s.split)
    ranges = tuple((c,) + s.image_range(md.num_class_records(self.spec, c)) for c in ids)
    if s.sampling == "uniform":
      empty = [c for c, lo, hi in ranges if hi <= lo]
      if empty:
        raise DataError(f"Split {split!r} of {self.name} leaves class {empty[0]} "
                        f"({self.spec.class_names[empty[0]]}) without images"
                        + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
                        + ": uniform class sampling needs every class; widen the slice.")
    view = _View(s, ranges, ids.start)
    self._views[split] = view
    return view

  def num_examples(self, split: str) -> int:
    return sum(hi - lo for _, lo, hi in self._view(split).ranges)

  def shard_sizes(self, split: str, process_count: int) -> List[int]:
    view = self._view(split)
    return [sum(view.shard_counts(p, process_count)) for p in range(process_count)]

  def _class_records(self, class_id: int, lo: int, hi: int, index: int, count: int):
    tf = tf_host()
    ds = tf.data.TFRecordDataset(md.class_record_path(self.spec, class_id))
    ds = ds.skip(lo).take(hi - lo)
    return ds.shard(count, index) if count > 1 else ds

  def make(self, split: str, process_index: int, process_count: int):
    """This process's examples of ``split``: finite for ``records``, infinite for ``uniform``."""
    tf = tf_host()
    view = self._view(split)
    counts = view.shard_counts(process_index, process_count)
    uniform = view.spec.sampling == "uniform"
    datasets, weights = [], []
    for (class_id, lo, hi), n in zip(view.ranges, counts):
      if n == 0:
        if uniform:
          raise DataError(f"Split {split!r} of {self.name}: process {process_index} of "
                          f"{process_count} gets no image of class {class_id}; widen the slice.")
        continue
      ds = self._class_records(class_id, lo, hi, process_index, process_count)
      if uniform:
        ds = ds.shuffle(min(n, CLASS_SHUFFLE_BUFFER),
                        seed=(_MIX_SEED * 7919 + class_id * 131 + process_index) & 0x7FFFFFFF,
                        reshuffle_each_iteration=True).repeat()
      label = tf.constant(class_id - view.offset, tf.int64)
      datasets.append(tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensors(label).repeat())))
      weights.append(1.0 if uniform else float(n))
    if not datasets:
      raise DataError(f"Split {split!r} of {self.name} has no images for process "
                      f"{process_index} of {process_count}.")
    w = np.asarray(weights, np.float64)
    mixed = tf.data.Dataset.sample_from_datasets(
        datasets, weights=(w / w.sum()).tolist(), seed=_MIX_SEED + process_index,
        stop_on_empty_dataset=False, rerandomize_each_iteration=not uniform)

    def to_example(serialized, label):
      image, _ = md.parse_example(serialized)
      return {"image": image, "label": label}

    return mixed.map(to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def find_corrupt(self, split: str, process_index: int, process_count: int) -> Optional[str]:
    tf = tf_host()
    view = self._view(split)
    for class_id, lo, hi in view.ranges:
      ds = self._class_records(class_id, lo, hi, process_index, process_count)
      i = 0
      try:
        for serialized in ds:
          image, _ = md.parse_example(serialized)
          tf.io.decode_image(image, expand_animations=False)
          i += 1
      except Exception:  # pylint: disable=broad-except  (checksum, proto or image errors)
        k = lo + process_index + i * process_count
        return f"record {k} of {md.class_record_path(self.spec, class_id)}"
    return None


def create(name: str, data_dir: Optional[str] = None, **unused) -> MetaDatasetClassification:
  """The ``meta_dataset:<name>`` source: the records under ``data_dir/<name>``."""
  name = name.strip()
  if not name or "/" in name:
    raise DataError(f"Bad dataset name {PREFIX}{name!r}: give the source's directory name, "
                    f"e.g. {PREFIX}ilsvrc_2012, and its parent as dataset.data_dir.")
  return MetaDatasetClassification(md.load_dataset_spec(find_source_dir(data_dir, name)))


@preprocess.OPS.register("md_resize")
def md_resize(size: int):
  """Meta-Dataset's ``ImageDecoder`` resize: a ``size`` x ``size`` square (aspect ratio not kept),
  bilinear with ``align_corners=True``, rounded to integers (float32 in [0, 255]); images already
  that size are untouched. The pixels of :func:`visrep_jax.data.meta_dataset.load_class_images`."""
  if not isinstance(size, int) or size < 1:
    raise ValueError(f"md_resize: size must be a positive integer, got {size!r}")

  def fn(img, seed):
    del seed
    out = md.resize_rounded(img, size)
    out.set_shape([size, size, img.shape[-1]])
    return out
  return preprocess.image_op(fn)
