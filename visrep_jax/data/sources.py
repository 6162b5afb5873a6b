"""Data sources: where examples come from, split per process.

A source yields *raw* examples ``{'image': uint8 HxWxC tensor or encoded bytes, 'label': int64}``
for one process's shard of a split. Decoding and augmentation happen in ``preprocess``.

Registered sources (``config.dataset.name``):
  * ``fashion_mnist``  offline from the IDX files of Debian's ``dataset-fashion-mnist``
                       (``/usr/share/datasets/fashion-mnist``), else TFDS's own copy.
  * ``image_folder``   ``data_dir/<split>/<class>/*.{jpg,png,...}`` for users' own data.
  * ``synthetic``      random images (tests, benchmarks).
  * ``tfds:<name>``    any TFDS dataset prepared under ``data_dir`` (e.g. ``tfds:imagenet2012``);
                       plain TFDS names such as ``imagenet2012``, ``cifar10`` work too. Splits
                       may be combined with ``+`` (Flowers-102: ``train+validation``).
  * ``imagenet21k``, ``i_naturalist2019``
                       not in TFDS: image folders under ``data_dir`` (``<split>/<class>/<image>``);
                       see :func:`imagenet21k` and :func:`i_naturalist2019` for the layouts.
  * ``meta_dataset:<source>``
                       the converted records of one Meta-Dataset source (``data_dir/<source>``)
                       as a classification dataset over one class split: splits such as
                       ``train[5%:]:uniform`` or ``valid[:50]`` (see ``md_classification``).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from visrep_jax.data import DataError, tf_host
from visrep_jax.registry import Registry, UnknownNameError, unknown_name_message

SOURCES = Registry("dataset")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
# TFDS datasets we know by plain name (anything else needs the explicit 'tfds:' prefix).
KNOWN_TFDS = ("imagenet2012", "imagenet2012_subset", "imagenet_v2", "imagenet2012_real",
              "cifar10", "cifar100", "oxford_flowers102", "cars196",
              "i_naturalist2018", "mnist", "caltech101", "dtd",
              "oxford_iiit_pet", "food101", "sun397", "patch_camelyon")


def even_split_sizes(n: int, num_shards: int) -> List[int]:
  """Sizes of ``num_shards`` contiguous shards of ``n`` items, as ``tfds.even_splits`` makes them."""
  base, extra = divmod(n, num_shards)
  return [base + (1 if i < extra else 0) for i in range(num_shards)]


def shard_bounds(n: int, index: int, count: int) -> tuple[int, int]:
  sizes = even_split_sizes(n, count)
  start = sum(sizes[:index])
  return start, start + sizes[index]


class Source:
  """Interface of a data source (one dataset, several splits)."""
  num_classes: int
  image_encoded: bool  # True: 'image' holds encoded bytes that the 'decode' op must decode.

  def num_examples(self, split: str) -> int:
    raise NotImplementedError

  def shard_sizes(self, split: str, process_count: int) -> List[int]:
    return even_split_sizes(self.num_examples(split), process_count)

  def make(self, split: str, process_index: int, process_count: int):
    """tf.data.Dataset of this process's shard of ``split`` (finite, in a fixed order)."""
    raise NotImplementedError

  def find_corrupt(self, split: str, process_index: int, process_count: int) -> Optional[str]:
    """Name of the first undecodable example of this shard, or None (used to report errors)."""
    return None

  # Random access (optional): sources that can fetch example i of a split in a tf graph get a
  # training order that is the same whatever the number of processes (see pipeline.make_train).
  random_access = False

  def lookup(self, split: str) -> Callable:
    """``fn(index: tf.int64 scalar) -> raw example`` for the whole split."""
    raise NotImplementedError

  def check_split(self, split: str, splits: Sequence[str]):
    if split not in splits:
      raise DataError(f"Split {split!r} does not exist for this dataset; valid: {', '.join(splits)}.")


# ----------------------------------------------------------------------------------------------
# In-memory arrays (Fashion-MNIST IDX, synthetic).


class ArraySource(Source):
  image_encoded = False
  random_access = True

  def __init__(self, splits: Dict[str, tuple], num_classes: int):
    self._splits = splits  # split -> (images uint8 [N,H,W,C], labels int [N])
    self.num_classes = num_classes

  def num_examples(self, split):
    self.check_split(split, list(self._splits))
    return len(self._splits[split][1])

  def arrays(self, split):
    self.check_split(split, list(self._splits))
    return self._splits[split]

  def lookup(self, split):
    tf = tf_host()
    images, labels = self.arrays(split)
    images_t, labels_t = tf.constant(images), tf.constant(labels.astype(np.int64))
    return lambda i: {"image": tf.gather(images_t, i), "label": tf.gather(labels_t, i)}

  def make(self, split, process_index, process_count):
    tf = tf_host()
    images, labels = self.arrays(split)
    lo, hi = shard_bounds(len(labels), process_index, process_count)
    return tf.data.Dataset.from_tensor_slices(
        {"image": images[lo:hi], "label": labels[lo:hi].astype(np.int64)})


def _read_idx(path: str) -> np.ndarray:
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f"Cannot read IDX file {path}: {e}. Reinstall it (apt-get install --reinstall "
                    "dataset-fashion-mnist) or delete it so that TFDS is used.") from e
  if len(data) < 4:
    raise DataError(f"Corrupt IDX file {path}: too short.")
  zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
  if zero != 0 or dtype_code != 0x08:
    raise DataError(f"Corrupt IDX file {path}: bad magic number (expected unsigned-byte IDX).")
  dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
  payload = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if payload.size != int(np.prod(dims)):
    raise DataError(f"Corrupt IDX file {path}: expected {int(np.prod(dims))} bytes of data, "
                    f"found {payload.size} (truncated download?).")
  return payload.reshape(dims)


def find_fashion_mnist_dir(data_dir: Optional[str] = None) -> Optional[str]:
  candidates = ([data_dir, os.path.join(data_dir, "fashion-mnist")] if data_dir else []) + list(
      FASHION_MNIST_DIRS)
  for d in candidates:
    if d and os.path.exists(os.path.join(d, "train-images-idx3-ubyte.gz")):
      return d
  return None


@SOURCES.register("fashion_mnist")
def fashion_mnist(data_dir: Optional[str] = None, **kwargs) -> Source:
  """Fashion-MNIST: 60k train / 10k test, 28x28x1, 10 classes."""
  d = find_fashion_mnist_dir(data_dir)
  if d is not None:
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
      images = _read_idx(os.path.join(d, f"{prefix}-images-idx3-ubyte.gz"))[..., None]
      labels = _read_idx(os.path.join(d, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
      if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split} in {d}: {len(images)} images but {len(labels)} labels.")
      splits[split] = (images, labels)
    return ArraySource(splits, num_classes=10)
  try:
    return TfdsSource("fashion_mnist", data_dir=data_dir, **kwargs)
  except DataError as e:
    raise DataError(
        "Fashion-MNIST not found: install Debian's package (apt-get install dataset-fashion-mnist, "
        "IDX files in /usr/share/datasets/fashion-mnist), put the four *-ubyte.gz IDX files in "
        f"dataset.data_dir, or prepare it with TFDS where a network exists ({e})") from None


@SOURCES.register("synthetic")
def synthetic(num_examples: int = 512, image_size: int = 32, channels: int = 3,
              num_classes: int = 10, seed: int = 0, eval_examples: Optional[int] = None,
              **unused) -> Source:
  """Random uint8 images whose label is learnable (class-dependent mean brightness)."""
  rng = np.random.default_rng(seed)

  def make(n):
    labels = rng.integers(0, num_classes, n).astype(np.int64)
    base = (labels[:, None, None, None] * (200 // max(num_classes - 1, 1))).astype(np.int16)
    noise = rng.integers(0, 56, (n, image_size, image_size, channels))
    return (base + noise).clip(0, 255).astype(np.uint8), labels

  ev = eval_examples if eval_examples is not None else max(num_examples // 4, 1)
  return ArraySource({"train": make(num_examples), "test": make(ev), "validation": make(ev)},
                     num_classes)


# ----------------------------------------------------------------------------------------------
# Image folders.


class ImageFolderSource(Source):
  """``root/<split>/<class_name>/<image>``; classes are the sorted sub-directory names."""
  image_encoded = True
  random_access = True

  def __init__(self, root: str):
    if not root or not os.path.isdir(root):
      raise DataError(f"Image folder {root!r} does not exist. Set dataset.data_dir to a directory "
                      "laid out as <data_dir>/<split>/<class>/<image files>.")
    self.root = root
    self.splits = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not self.splits:
      raise DataError(f"Image folder {root} has no split sub-directories (expected e.g. "
                      f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg).")
    self.classes = sorted(d for d in os.listdir(os.path.join(root, self.splits[0]))
                          if os.path.isdir(os.path.join(root, self.splits[0], d)))
    self.num_classes = len(self.classes)
    self._files: Dict[str, tuple] = {}

  def files(self, split):
    self.check_split(split, self.splits)
    if split not in self._files:
      paths, labels = [], []
      split_dir = os.path.join(self.root, split)
      for c in sorted(os.listdir(split_dir)):
        if not os.path.isdir(os.path.join(split_dir, c)):
          continue
        if c not in self.classes:
          raise DataError(f"Class directory {os.path.join(split_dir, c)} is not in split "
                          f"{self.splits[0]!r}; every split needs the same class directories.")
        for root, _, names in os.walk(os.path.join(split_dir, c)):
          for name in sorted(names):
            if name.lower().endswith(IMAGE_EXTENSIONS):
              paths.append(os.path.join(root, name))
              labels.append(self.classes.index(c))
      if not paths:
        raise DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}/<class>/.")
      self._files[split] = (paths, np.asarray(labels, np.int64))
    return self._files[split]

  def num_examples(self, split):
    return len(self.files(split)[0])

  def lookup(self, split):
    tf = tf_host()
    paths, labels = self.files(split)
    paths_t, labels_t = tf.constant(paths), tf.constant(labels)
    return lambda i: {"image": tf.io.read_file(tf.gather(paths_t, i)),
                      "label": tf.gather(labels_t, i)}

  def make(self, split, process_index, process_count):
    tf = tf_host()
    paths, labels = self.files(split)
    lo, hi = shard_bounds(len(paths), process_index, process_count)
    ds = tf.data.Dataset.from_tensor_slices({"path": paths[lo:hi], "label": labels[lo:hi]})
    return ds.map(lambda ex: {"image": tf.io.read_file(ex["path"]), "label": ex["label"]},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def find_corrupt(self, split, process_index, process_count):
    tf = tf_host()
    paths, _ = self.files(split)
    lo, hi = shard_bounds(len(paths), process_index, process_count)
    for p in paths[lo:hi]:
      try:
        tf.io.decode_image(tf.io.read_file(p), channels=3, expand_animations=False)
      except Exception:  # pylint: disable=broad-except
        return p
    return None


@SOURCES.register("image_folder")
def image_folder(data_dir: Optional[str] = None, **unused) -> Source:
  return ImageFolderSource(data_dir)


def _named_image_folder(name: str, data_dir: Optional[str], layout: str) -> Source:
  if not data_dir or not os.path.isdir(data_dir):
    raise DataError(f"{name} is not in TFDS: set dataset.data_dir to an image folder laid out as "
                    f"{layout} (got data_dir={data_dir!r}).")
  return ImageFolderSource(data_dir)


@SOURCES.register("imagenet21k")
def imagenet21k(data_dir: Optional[str] = None, **unused) -> Source:
  """ImageNet-21k (DeiT III / PatchConvNet pre-training) as an image folder: the winter-2021 or
  fall-2011 release's ``<wnid>.tar`` archives extracted to ``<data_dir>/train/<wnid>/*.JPEG``,
  and a held-out split with the same class directories, ``<data_dir>/val/<wnid>/*.JPEG`` (e.g.
  50 images per class moved out of train)."""
  return _named_image_folder("imagenet21k", data_dir,
                             "<data_dir>/train/<wnid>/*.JPEG and <data_dir>/val/<wnid>/*.JPEG")


@SOURCES.register("i_naturalist2019")
def i_naturalist2019(data_dir: Optional[str] = None, **unused) -> Source:
  """iNaturalist 2019 (1,010 categories, 265,240 train / 3,003 val images) as an image folder:
  ``<data_dir>/{train,val}/<category_id>/<image>.jpg``, built from the challenge's
  ``train2019.json`` / ``val2019.json`` (each image linked into the directory of its
  ``category_id``; zero-padding the ids, e.g. ``0042``, keeps the sorted class order numeric)."""
  return _named_image_folder("i_naturalist2019", data_dir,
                             "<data_dir>/{train,val}/<category_id>/<image>.jpg")


# ----------------------------------------------------------------------------------------------
# TFDS.


class TfdsSource(Source):
  """A TFDS dataset already prepared under ``data_dir`` (nothing is downloaded at run time
  unless ``download=True``)."""
  image_encoded = True

  def __init__(self, name: str, data_dir: Optional[str] = None, download: bool = False,
               manual_dir: Optional[str] = None, image_key: str = "image",
               label_key: str = "label", **unused):
    tf_host()
    import tensorflow_datasets as tfds
    self.tfds = tfds
    self.name = name
    self.image_key, self.label_key = image_key, label_key
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends
      raise DataError(f"TFDS has no dataset {name!r} ({e}).") from None
    if download:
      cfg = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
      self.builder.download_and_prepare(download_config=cfg)
    if not self.builder.is_prepared():
      where = self.builder.data_dir
      raise DataError(
          f"TFDS dataset {name!r} is not prepared under {where}. Prepare it once with "
          f"`python -m visrep_jax.data.prepare --dataset={name} --data_dir=DIR"
          + (" --manual_dir=DIR_WITH_ARCHIVES" if name.startswith("imagenet") else "")
          + "` and set dataset.data_dir=DIR.")
    info = self.builder.info
    label = info.features[label_key]
    self.num_classes = int(getattr(label, "num_classes", 0) or 0)
    self.splits = sorted(info.splits.keys())

  def check_split(self, split, splits):
    # TFDS split expressions: 'train', 'train[:90%]', 'train+validation'.
    for part in split.split("+"):
      super().check_split(part.split("[")[0].strip(), splits)

  def num_examples(self, split):
    self.check_split(split, self.splits)
    return self.builder.info.splits[split].num_examples

  def shard_sizes(self, split, process_count):
    subs = self.tfds.even_splits(split, n=process_count)
    return [self.builder.info.splits[s].num_examples for s in subs]

  def make(self, split, process_index, process_count):
    tf = tf_host()
    self.check_split(split, self.splits)
    sub = self.tfds.even_splits(split, n=process_count)[process_index]
    ds = self.builder.as_dataset(
        split=sub, shuffle_files=False,
        decoders={self.image_key: self.tfds.decode.SkipDecoding()},
        read_config=self.tfds.ReadConfig(interleave_cycle_length=1, skip_prefetch=True))
    ik, lk = self.image_key, self.label_key
    return ds.map(lambda ex: {"image": ex[ik], "label": tf.cast(ex[lk], tf.int64)},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def find_corrupt(self, split, process_index, process_count):
    tf = tf_host()
    for i, ex in enumerate(self.make(split, process_index, process_count)):
      try:
        tf.io.decode_image(ex["image"], expand_animations=False)
      except Exception:  # pylint: disable=broad-except
        sub = self.tfds.even_splits(split, n=process_count)[process_index]
        return f"record {i} of TFDS split {self.name}/{sub}"
    return None


def create(name: str, **kwargs) -> Source:
  """Creates a source by dataset name (see the module docstring)."""
  if name in SOURCES:
    return SOURCES.get(name)(**kwargs)
  if name.startswith("tfds:"):
    return TfdsSource(name[len("tfds:"):], **kwargs)
  if name.startswith(md_classification.PREFIX):
    return md_classification.create(name[len(md_classification.PREFIX):], **kwargs)
  if name in KNOWN_TFDS:
    return TfdsSource(name, **kwargs)
  raise UnknownNameError(unknown_name_message(
      "dataset", name, SOURCES.names() + list(KNOWN_TFDS)
      + ["tfds:<any TFDS name>", md_classification.PREFIX + "<Meta-Dataset source>"]))


def valid_dataset_name(name: str) -> bool:
  return (name in SOURCES or name.startswith("tfds:") or name in KNOWN_TFDS
          or name.startswith(md_classification.PREFIX))


# Meta-Dataset records as a classification source (and its `md_resize` preprocessing op);
# imported last, as it subclasses Source.
from visrep_jax.data import md_classification  # noqa: E402
