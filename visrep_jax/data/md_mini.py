"""A mini Meta-Dataset built offline from local data, for few-shot tests, demos and CI.

  python -m visrep_jax.data.md_mini --out=DIR [--max_images_per_class=N]

Writes two sources in the Meta-Dataset format (``meta_dataset``; each a directory with
``dataset_spec.json`` and one ``{class_id}.tfrecords`` per class, 28x28 PNG):

``DIR/fashion_mnist``
    Fashion-MNIST, all 70,000 images (the 60k train then the 10k test IDX files of Debian's
    ``dataset-fashion-mnist``, read by ``sources``), 7,000 per class, one channel. Its 10 classes are
    split by class, each split holding clothes and footwear (fixed, see ``FASHION_MNIST_SPLITS``):

    ======  =====================================================  =========
    split   classes (Fashion-MNIST label)                          class ids
    ======  =====================================================  =========
    train   T-shirt/top (0), Trouser (1), Pullover (2), Dress (3),  0-5
            Sandal (5), Bag (8)
    valid   Coat (4), Sneaker (7)                                   6, 7
    test    Shirt (6), Ankle boot (9)                               8, 9
    ======  =====================================================  =========

    With two classes in each of valid and test, Fashion-MNIST episodes outside training are
    2-way (``configs/ctx.py:mini`` lowers ``min_ways`` to 2 for that): Meta-Dataset's default
    ``min_ways=5`` and fixed 5-way episodes run on ``digits`` and the Fashion-MNIST train split
    only (``test_sources=['digits']``). Ten classes leave no wider split that keeps six for
    training, and no other offline data would make a valid split without leaking a test domain.

``DIR/digits``
    scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1,797 8x8 images
    with values 0-16, 174-183 per class) as an unseen, test-only domain: all 10 classes (``0`` ..
    ``9``, ids 0-9) in the test split. Values are scaled to 0-255 and upsampled to 28x28 (bilinear,
    half-pixel centres), rounded to uint8. Ink is bright on a dark background, as in Fashion-MNIST.

``DIR/md_mini.json`` records what was built (format version, cap); a later call with the same
arguments finds complete sources and does nothing. A partial or differently capped build is
rebuilt (only the two source directories' records and specs are replaced).

``max_images_per_class`` keeps the first N images of every class (tests use a small cap). The full
build takes a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from visrep_jax.data import DataError, tf_host
from visrep_jax.data import md_convert
from visrep_jax.data import meta_dataset as md
from visrep_jax.data import sources

FASHION_MNIST = "fashion_mnist"
DIGITS = "digits"
MINI_SOURCES = (FASHION_MNIST, DIGITS)
MARKER = "md_mini.json"
VERSION = 1
IMAGE_SIZE = 28

# Fashion-MNIST labels per split (see the module docstring).
FASHION_MNIST_SPLITS = {"train": [0, 1, 2, 3, 5, 8], "valid": [4, 7], "test": [6, 9]}
DIGITS_SPLITS = {"train": [], "valid": [], "test": list(range(10))}
DIGIT_NAMES = tuple(str(d) for d in range(10))


def load_fashion_mnist(data_dir: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
  """All 70,000 Fashion-MNIST images ``[N, 28, 28, 1]`` uint8 (train then test) and labels."""
  d = sources.find_fashion_mnist_dir(data_dir)
  if d is None:
    raise DataError("Fashion-MNIST IDX files not found: install Debian's dataset-fashion-mnist "
                    "(apt-get install dataset-fashion-mnist, files in "
                    f"{sources.FASHION_MNIST_DIRS[0]}) or pass the directory holding the four "
                    "*-ubyte.gz files.")
  src = sources.fashion_mnist(data_dir=d)
  parts = [src.arrays(split) for split in ("train", "test")]
  return (np.concatenate([p[0] for p in parts]),
          np.concatenate([p[1] for p in parts]).astype(np.int64))


def load_digits_28() -> Tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits as ``[1797, 28, 28, 1]`` uint8 and labels (see the module docstring)."""
  try:
    from sklearn.datasets import load_digits
  except ImportError:
    raise DataError("scikit-learn is not installed; its bundled digits are the mini benchmark's "
                    "test-only domain: pip install scikit-learn.") from None
  digits = load_digits()
  tf = tf_host()
  x = digits.images.astype(np.float32)[..., None] * (255.0 / 16.0)
  x = tf.image.resize(x, [IMAGE_SIZE, IMAGE_SIZE], method="bilinear", antialias=False).numpy()
  return np.clip(np.round(x), 0, 255).astype(np.uint8), digits.target.astype(np.int64)


def _marker_params(max_images_per_class: Optional[int]) -> dict:
  return {"version": VERSION, "max_images_per_class": max_images_per_class}


def _complete(out_dir: str, max_images_per_class: Optional[int]) -> Optional[Dict[str, md.AnySpec]]:
  """The specs if ``out_dir`` holds a complete build with these parameters, else None."""
  try:
    with open(os.path.join(out_dir, MARKER)) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  if {k: marker.get(k) for k in ("version", "max_images_per_class")} != _marker_params(
      max_images_per_class):
    return None
  specs = {}
  for name in MINI_SOURCES:
    try:
      specs[name] = md.load_dataset_spec(os.path.join(out_dir, name))
      md.check_class_files(specs[name])
    except DataError:
      return None
    if sum(specs[name].images_per_class.values()) != marker.get("images", {}).get(name):
      return None
  return specs


def build_mini_benchmark(out_dir: str, max_images_per_class: Optional[int] = None,
                         fashion_mnist_dir: Optional[str] = None,
                         rebuild: bool = False) -> Dict[str, md.DatasetSpecification]:
  """Writes ``out_dir/fashion_mnist`` and ``out_dir/digits`` (see the module docstring) unless a
  complete build with the same ``max_images_per_class`` is already there; returns their specs."""
  if max_images_per_class is not None and max_images_per_class < 1:
    raise ValueError(f"max_images_per_class must be >= 1, got {max_images_per_class}.")
  if not rebuild:
    specs = _complete(out_dir, max_images_per_class)
    if specs is not None:
      return specs
  os.makedirs(out_dir, exist_ok=True)
  marker = os.path.join(out_dir, MARKER)
  if os.path.exists(marker):
    os.remove(marker)  # from here until the end, the build is incomplete
  images, labels = load_fashion_mnist(fashion_mnist_dir)
  specs = {FASHION_MNIST: md_convert.convert_arrays(
      images, labels, os.path.join(out_dir, FASHION_MNIST), FASHION_MNIST,
      list(sources.FASHION_MNIST_CLASSES), class_splits=FASHION_MNIST_SPLITS,
      max_images_per_class=max_images_per_class, overwrite=True)}
  images, labels = load_digits_28()
  specs[DIGITS] = md_convert.convert_arrays(
      images, labels, os.path.join(out_dir, DIGITS), DIGITS, list(DIGIT_NAMES),
      class_splits=DIGITS_SPLITS, max_images_per_class=max_images_per_class, overwrite=True)
  info = dict(_marker_params(max_images_per_class),
              images={n: int(sum(s.images_per_class.values())) for n, s in specs.items()})
  with open(marker + ".tmp", "w") as f:
    json.dump(info, f, indent=2)
  os.replace(marker + ".tmp", marker)
  return specs


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m visrep_jax.data.md_mini",
                              description="Build the offline mini Meta-Dataset.")
  p.add_argument("--out", required=True, help="output directory (one sub-directory per source)")
  p.add_argument("--max_images_per_class", type=int, default=None)
  p.add_argument("--fashion_mnist_dir", default=None,
                 help=f"directory of the Fashion-MNIST IDX files (default {sources.FASHION_MNIST_DIRS[0]})")
  p.add_argument("--rebuild", action="store_true", help="rebuild even if complete")
  args = p.parse_args(argv)
  try:
    specs = build_mini_benchmark(args.out, args.max_images_per_class, args.fashion_mnist_dir,
                                 args.rebuild)
  except (DataError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for name, spec in specs.items():
    counts = "/".join(str(len(spec.get_classes(s))) for s in md.SPLITS)
    print(f"{name}: {spec.path} ({counts} train/valid/test classes, "
          f"{sum(spec.images_per_class.values())} images)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
