"""Converts a labelled image dataset into the Meta-Dataset on-disk format (see ``meta_dataset``).

  python -m visrep_jax.data.md_convert --source=imagefolder:/data/flowers --out=/records/flowers \\
      --name=flowers --splits=0.7,0.15,0.15
  python -m visrep_jax.data.md_convert --source=tfds:oxford_flowers102 --data_dir=$TFDS_DATA_DIR \\
      --tfds_split=train+validation+test --out=/records/flowers102 --name=flowers102

Sources: an image folder (``<root>/<class>/<image files>``, classes = sorted sub-directory names),
any TFDS dataset already prepared under ``--data_dir`` (nothing is downloaded), or, from Python,
in-memory arrays (:func:`convert_arrays`). The output directory gets one ``{class_id}.tfrecords``
file per class (``tf.train.Example`` with ``image`` = encoded PNG or JPEG bytes and ``label`` =
int64 class id, as the official converter writes them) and a ``dataset_spec.json``
(``DatasetSpecification``), written last: a directory without it is an unfinished conversion.

Classes are assigned to the train / valid / test splits either explicitly (``class_splits``, or
``--class_splits=FILE.json`` with ``{"train": [...], "valid": [...], "test": [...]}`` listing class
names or labels) or by a seeded random permutation with the given fractions: ``n_valid =
floor(f_valid * n + 0.5)``, ``n_test = floor(f_test * n + 0.5)``, the rest train (DTD: 47 classes at
0.7/0.15/0.15 gives the official 33/7/7). Class ids are then contiguous: the train classes in
increasing original label order, then the valid ones, then the test ones.

Images: PNG (default; lossless, so reading back gives the exact pixels) or JPEG (``--format=jpeg``,
quality ``--jpeg_quality``, 95 by default; the official converter used PIL's default, 75). Files or
TFDS records already in the target format are copied byte for byte, as the official converter does;
others are decoded and re-encoded. Unlike the official converter, channels are kept as stored
(grayscale stays one channel; the reader decodes with 3 channels by default, which gives the same
pixels as an RGB copy); ``--to_rgb`` stores RGB as the official converter does.

An existing non-empty output directory is refused unless ``--overwrite``, which deletes its
``dataset_spec.json`` and ``*.tfrecords`` files (nothing else) before writing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from visrep_jax.data import DataError, tf_host
from visrep_jax.data import meta_dataset as md

IMAGE_FORMATS = ("png", "jpeg")
SPLIT_KEYS = ("train", "valid", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

ClassKey = Union[int, str]


# ----------------------------------------------------------------------------------------------
# Class splits.


def parse_fractions(text: Union[str, Sequence[float]]) -> Tuple[float, float, float]:
  """``'0.7,0.15,0.15'`` -> (0.7, 0.15, 0.15); three non-negative numbers summing to 1."""
  try:
    values = tuple(float(v) for v in (text.split(",") if isinstance(text, str) else text))
  except ValueError:
    raise ValueError(f"Split fractions must be three numbers like 0.7,0.15,0.15, got {text!r}.")
  if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
    raise ValueError(f"Split fractions must be three non-negative numbers (train,valid,test) "
                     f"summing to 1, got {text!r}.")
  return values


def split_class_indices(num_classes: int, fractions=DEFAULT_FRACTIONS,
                        seed: int = 0) -> Dict[str, List[int]]:
  """A seeded random assignment of class indices ``0..num_classes-1`` to the three splits."""
  f_train, f_valid, f_test = parse_fractions(fractions)
  n_valid = int(math.floor(f_valid * num_classes + 0.5))
  n_test = int(math.floor(f_test * num_classes + 0.5))
  if f_train == 0:  # nothing may round into a split asked to be empty
    n_test = num_classes - n_valid
  n_train = num_classes - n_valid - n_test
  if n_train < 0:
    n_test += n_train
    n_train = 0
  perm = np.random.default_rng(seed).permutation(num_classes)
  return {"train": sorted(int(i) for i in perm[:n_train]),
          "valid": sorted(int(i) for i in perm[n_train:n_train + n_valid]),
          "test": sorted(int(i) for i in perm[n_train + n_valid:])}


def resolve_class_splits(class_splits: Mapping[str, Sequence[ClassKey]],
                         class_names: Sequence[str]) -> Dict[str, List[int]]:
  """Explicit splits (class names or indices into ``class_names``) -> sorted indices per split.
  Every class must be in exactly one split."""
  unknown_keys = set(class_splits) - set(SPLIT_KEYS)
  if unknown_keys:
    raise ValueError(f"class_splits keys must be {SPLIT_KEYS}, got {sorted(unknown_keys)}.")
  index = {name: i for i, name in enumerate(class_names)}
  out, seen = {}, {}
  for split in SPLIT_KEYS:
    ids = []
    for key in class_splits.get(split, ()):
      if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        i = int(key)
        if not 0 <= i < len(class_names):
          raise ValueError(f"class_splits[{split!r}] has class index {i}, outside 0..{len(class_names) - 1}.")
      elif key in index:
        i = index[key]
      else:
        raise ValueError(f"class_splits[{split!r}] names unknown class {key!r}.")
      if i in seen:
        raise ValueError(f"Class {class_names[i]!r} is in both {seen[i]!r} and {split!r}.")
      seen[i] = split
      ids.append(i)
    out[split] = sorted(ids)
  missing = [class_names[i] for i in range(len(class_names)) if i not in seen]
  if missing:
    raise ValueError(f"class_splits leaves {len(missing)} classes out, e.g. {missing[:3]}.")
  return out


def _assign_splits(class_names, class_splits, fractions, seed) -> Dict[str, List[int]]:
  if class_splits is not None:
    return resolve_class_splits(class_splits, class_names)
  return split_class_indices(len(class_names), fractions, seed)


# ----------------------------------------------------------------------------------------------
# Writing records.


def prepare_output_dir(out_dir: str, overwrite: bool = False) -> None:
  """Creates ``out_dir``; refuses a non-empty one unless ``overwrite`` (which deletes its spec and
  record files only)."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise DataError(f"Output {out_dir} exists and is not a directory.")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise DataError(f"Output directory {out_dir} is not empty; pass --overwrite "
                      "(overwrite=True) to replace its records.")
    names = os.listdir(out_dir)
    # The spec goes first: a crash mid-way must not leave an old spec over new records.
    for name in sorted(names, key=lambda n: not n.startswith(md.SPEC_FILENAME)):
      if name.startswith(md.SPEC_FILENAME) or name.endswith(".tfrecords"):
        os.remove(os.path.join(out_dir, name))
  os.makedirs(out_dir, exist_ok=True)


def serialize_example(image_bytes: bytes, label: int) -> bytes:
  """A ``tf.train.Example`` with ``image`` (bytes) and ``label`` (int64), as the official writer."""
  tf = tf_host()
  feature = {
      "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
      "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(image_bytes)])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _check_format(image_format: str) -> str:
  fmt = image_format.lower().replace("jpg", "jpeg")
  if fmt not in IMAGE_FORMATS:
    raise ValueError(f"Unknown image format {image_format!r}; valid: {', '.join(IMAGE_FORMATS)}.")
  return fmt


def _encode_tensor(image, image_format: str, jpeg_quality: int, to_rgb: bool):
  """uint8 HxWxC tensor -> encoded bytes tensor (tf graph function)."""
  tf = tf_host()
  c = image.shape[-1]
  if c in (2, 4) and (to_rgb or image_format == "jpeg"):
    image = image[..., :c - 1]  # drop alpha, as PIL's convert('RGB') does
    c -= 1
  if to_rgb and c == 1:
    image = tf.image.grayscale_to_rgb(image)
  if image_format == "png":
    return tf.io.encode_png(image)
  return tf.io.encode_jpeg(image, quality=jpeg_quality)


def encode_image(image: np.ndarray, image_format: str = "png", jpeg_quality: int = 95,
                 to_rgb: bool = False) -> bytes:
  """One uint8 ``[H, W]`` or ``[H, W, C]`` array -> PNG/JPEG bytes."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"Images must be uint8, got {image.dtype}.")
  if image.ndim == 2:
    image = image[..., None]
  return _encode_tensor(image, _check_format(image_format), jpeg_quality, to_rgb).numpy()


def _sniff_format(data: bytes) -> Optional[str]:
  if data[:8] == b"\x89PNG\r\n\x1a\n":
    return "png"
  if data[:3] == b"\xff\xd8\xff":
    return "jpeg"
  return None


def convert_encoded(data: bytes, what: str, image_format: str = "png", jpeg_quality: int = 95,
                    to_rgb: bool = False) -> bytes:
  """Encoded image bytes -> bytes in ``image_format``: copied when already in that format (and
  channels need no change), else decoded and re-encoded. A bad image raises DataError naming
  ``what`` (a file or record)."""
  tf = tf_host()
  try:
    image = tf.io.decode_image(data, channels=0, expand_animations=False)
  except (tf.errors.OpError, ValueError) as e:
    raise DataError(f"Cannot decode image {what} ({md._one_line(e)}); fix or remove it.") from None
  fmt = _sniff_format(data)
  c = int(image.shape[-1])
  if fmt == image_format and not (to_rgb and c != 3):
    return bytes(data)
  return _encode_tensor(image, image_format, jpeg_quality, to_rgb).numpy()


class RecordWriter:
  """Writes the per-class record files and, on :meth:`finish`, the ``DatasetSpecification``.

  ``class_names[i]`` is the name of original class ``i``; ``splits`` maps ``train``/``valid``/``test``
  to original class indices. New class ids are train, then valid, then test, each in index order.
  """

  def __init__(self, out_dir: str, name: str, class_names: Sequence[str],
               splits: Mapping[str, Sequence[int]]):
    self.out_dir, self.name = os.path.abspath(out_dir), name
    order = [i for s in SPLIT_KEYS for i in splits[s]]
    self.new_id = {orig: new for new, orig in enumerate(order)}
    self.class_names = {new: str(class_names[orig]) for orig, new in self.new_id.items()}
    self.classes_per_split = {md.Split.parse(s): len(splits[s]) for s in SPLIT_KEYS}
    self.counts = {new: 0 for new in self.new_id.values()}
    self._writers = {}

  def path(self, class_id: int) -> str:
    return os.path.join(self.out_dir, md.DEFAULT_FILE_PATTERN.format(class_id))

  def write(self, orig_class: int, image_bytes: bytes) -> None:
    class_id = self.new_id[orig_class]
    writer = self._writers.get(class_id)
    if writer is None:
      writer = self._writers[class_id] = tf_host().io.TFRecordWriter(self.path(class_id))
    writer.write(serialize_example(image_bytes, class_id))
    self.counts[class_id] += 1

  def close_class(self, orig_class: int) -> None:
    writer = self._writers.pop(self.new_id[orig_class], None)
    if writer is not None:
      writer.close()

  def finish(self) -> md.DatasetSpecification:
    for writer in self._writers.values():
      writer.close()
    self._writers = {}
    empty = [self.class_names[c] for c, n in self.counts.items() if n == 0]
    if empty:
      raise DataError(f"{len(empty)} classes of {self.name} got no images (e.g. {empty[:3]}); "
                      "drop them from the class splits or use a source split that has them.")
    spec = md.DatasetSpecification(self.name, dict(self.classes_per_split), dict(self.counts),
                                   dict(self.class_names), self.out_dir, md.DEFAULT_FILE_PATTERN)
    spec.initialize()
    md.save_dataset_spec(spec)
    return spec


# ----------------------------------------------------------------------------------------------
# Sources.


def convert_arrays(images: np.ndarray, labels: np.ndarray, out_dir: str, name: str,
                   class_names: Optional[Sequence[str]] = None, *,
                   splits=DEFAULT_FRACTIONS,
                   class_splits: Optional[Mapping[str, Sequence[ClassKey]]] = None,
                   seed: int = 0, image_format: str = "png", jpeg_quality: int = 95,
                   to_rgb: bool = False, max_images_per_class: Optional[int] = None,
                   overwrite: bool = False) -> md.DatasetSpecification:
  """In-memory uint8 images ``[N, H, W]`` or ``[N, H, W, C]`` with integer labels ``0..K-1``.

  ``class_names`` (length K) defaults to the label numbers. Images keep their order within a class;
  ``max_images_per_class`` keeps the first ones.
  """
  tf = tf_host()
  images, labels = np.asarray(images), np.asarray(labels).astype(np.int64).reshape(-1)
  if images.dtype != np.uint8 or images.ndim not in (3, 4):
    raise ValueError(f"images must be uint8 [N, H, W] or [N, H, W, C], got {images.dtype} "
                     f"{images.shape}.")
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels.")
  if images.ndim == 3:
    images = images[..., None]
  num_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must be in 0..{num_classes - 1}.")
  names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
  fmt = _check_format(image_format)
  split_ids = _assign_splits(names, class_splits, splits, seed)
  prepare_output_dir(out_dir, overwrite)
  writer = RecordWriter(out_dir, name, names, split_ids)
  for orig in writer.new_id:
    idx = np.flatnonzero(labels == orig)[:max_images_per_class]
    if len(idx):
      ds = tf.data.Dataset.from_tensor_slices(images[idx]).map(
          lambda im: _encode_tensor(im, fmt, jpeg_quality, to_rgb),
          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(256)
      for batch in ds.as_numpy_iterator():  # batches: far less per-element iterator overhead
        for data in batch:
          writer.write(orig, data)
    writer.close_class(orig)
  return writer.finish()


def _folder_classes(root: str) -> List[str]:
  if not root or not os.path.isdir(root):
    raise DataError(f"Image folder {root!r} does not exist; expected <root>/<class>/<image files>.")
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise DataError(f"Image folder {root} has no class sub-directories (<root>/<class>/<images>).")
  return classes


def _folder_files(class_dir: str) -> List[str]:
  files = []
  for dirpath, dirnames, names in os.walk(class_dir):
    dirnames.sort()
    files.extend(os.path.join(dirpath, n) for n in sorted(names)
                 if n.lower().endswith(IMAGE_EXTENSIONS))
  return files


def convert_image_folder(root: str, out_dir: str, name: str, *, splits=DEFAULT_FRACTIONS,
                         class_splits: Optional[Mapping[str, Sequence[ClassKey]]] = None,
                         seed: int = 0, image_format: str = "png", jpeg_quality: int = 95,
                         to_rgb: bool = False, max_images_per_class: Optional[int] = None,
                         overwrite: bool = False) -> md.DatasetSpecification:
  """``<root>/<class>/<images>`` (classes: sorted sub-directory names; images: sorted file names,
  sub-directories included)."""
  classes = _folder_classes(root)
  fmt = _check_format(image_format)
  split_ids = _assign_splits(classes, class_splits, splits, seed)
  prepare_output_dir(out_dir, overwrite)
  writer = RecordWriter(out_dir, name, classes, split_ids)
  for orig in writer.new_id:
    files = _folder_files(os.path.join(root, classes[orig]))[:max_images_per_class]
    for path in files:
      with open(path, "rb") as f:
        data = f.read()
      writer.write(orig, convert_encoded(data, path, fmt, jpeg_quality, to_rgb))
    writer.close_class(orig)
  return writer.finish()


def convert_tfds(tfds_name: str, out_dir: str, name: Optional[str] = None, *,
                 data_dir: Optional[str] = None, split: str = "train", image_key: str = "image",
                 label_key: str = "label", splits=DEFAULT_FRACTIONS,
                 class_splits: Optional[Mapping[str, Sequence[ClassKey]]] = None, seed: int = 0,
                 image_format: str = "png", jpeg_quality: int = 95, to_rgb: bool = False,
                 max_images_per_class: Optional[int] = None,
                 overwrite: bool = False) -> md.DatasetSpecification:
  """A TFDS dataset prepared under ``data_dir`` (its ``split``, e.g. ``'train+test'``); classes and
  names from its ``ClassLabel`` feature. Nothing is downloaded."""
  from visrep_jax.data import sources
  src = sources.TfdsSource(tfds_name, data_dir=data_dir, image_key=image_key, label_key=label_key)
  label = src.builder.info.features[label_key]
  num_classes = int(getattr(label, "num_classes", 0) or 0)
  if not num_classes:
    raise DataError(f"TFDS {tfds_name!r} feature {label_key!r} is not a ClassLabel; pass the "
                    "label feature with --label_key.")
  names = list(getattr(label, "names", None) or [str(i) for i in range(num_classes)])
  fmt = _check_format(image_format)
  split_ids = _assign_splits(names, class_splits, splits, seed)
  prepare_output_dir(out_dir, overwrite)
  writer = RecordWriter(out_dir, name or tfds_name, names, split_ids)
  _raise_open_file_limit(num_classes + 64)
  counts = np.zeros(num_classes, np.int64)
  for i, ex in enumerate(src.make(split, 0, 1).as_numpy_iterator()):
    orig = int(ex["label"])
    if max_images_per_class is not None and counts[orig] >= max_images_per_class:
      continue
    what = f"record {i} of TFDS {tfds_name}/{split}"
    writer.write(orig, convert_encoded(ex["image"], what, fmt, jpeg_quality, to_rgb))
    counts[orig] += 1
  return writer.finish()


def _raise_open_file_limit(needed: int) -> None:
  """TFDS conversion keeps one writer per class open."""
  try:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
      resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
  except (ImportError, ValueError, OSError):
    pass


def convert(source: str, out_dir: str, name: str, **kwargs) -> md.DatasetSpecification:
  """``source``: ``imagefolder:/path`` or ``tfds:NAME``."""
  kind, _, arg = source.partition(":")
  if kind in ("imagefolder", "image_folder") and arg:
    kwargs.pop("data_dir", None)
    for key in ("split", "image_key", "label_key"):
      kwargs.pop(key, None)
    return convert_image_folder(arg, out_dir, name, **kwargs)
  if kind == "tfds" and arg:
    return convert_tfds(arg, out_dir, name, **kwargs)
  raise ValueError(f"Unknown source {source!r}; use imagefolder:/path/to/root or tfds:NAME.")


# ----------------------------------------------------------------------------------------------
# CLI. (argparse rather than absl flags: importing this module registers no global flags.)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m visrep_jax.data.md_convert",
      description="Convert an image folder or a prepared TFDS dataset to the Meta-Dataset format.")
  p.add_argument("--source", required=True, help="imagefolder:/path/to/root or tfds:NAME")
  p.add_argument("--out", required=True, help="output records directory (one per source)")
  p.add_argument("--name", default=None, help="dataset name in the spec (default: from --source)")
  p.add_argument("--splits", default="0.7,0.15,0.15",
                 help="train,valid,test class fractions for the seeded random class split")
  p.add_argument("--class_splits", default=None,
                 help='JSON file {"train": [...], "valid": [...], "test": [...]} of class names '
                      "or labels (instead of --splits)")
  p.add_argument("--seed", type=int, default=0, help="seed of the random class split")
  p.add_argument("--format", default="png", choices=IMAGE_FORMATS, help="image encoding")
  p.add_argument("--jpeg_quality", type=int, default=95)
  p.add_argument("--to_rgb", action="store_true", help="store RGB (as the official converter)")
  p.add_argument("--max_images_per_class", type=int, default=None)
  p.add_argument("--overwrite", action="store_true", help="replace records in a non-empty --out")
  p.add_argument("--data_dir", default=None, help="TFDS data_dir (tfds: sources)")
  p.add_argument("--tfds_split", default="train", help="TFDS split(s), e.g. train+test")
  p.add_argument("--image_key", default="image")
  p.add_argument("--label_key", default="label")
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = _parser().parse_args(argv)
  kind, _, arg = args.source.partition(":")
  name = args.name or os.path.basename(os.path.normpath(arg)) or kind
  kwargs = dict(seed=args.seed, image_format=args.format, jpeg_quality=args.jpeg_quality,
                to_rgb=args.to_rgb, max_images_per_class=args.max_images_per_class,
                overwrite=args.overwrite)
  try:
    kwargs["splits"] = parse_fractions(args.splits)
    if args.class_splits:
      with open(args.class_splits) as f:
        kwargs["class_splits"] = json.load(f)
    if kind == "tfds":
      kwargs.update(data_dir=args.data_dir, split=args.tfds_split, image_key=args.image_key,
                    label_key=args.label_key)
    spec = convert(args.source, args.out, name, **kwargs)
  except (DataError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  counts = "/".join(str(spec.classes_per_split[s]) for s in md.SPLITS)
  print(f"Wrote {spec.name} to {spec.path}: {spec.num_classes} classes (train/valid/test "
        f"{counts}), {sum(spec.images_per_class.values())} images.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
