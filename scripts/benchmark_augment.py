#!/usr/bin/env python
"""Training augmentation throughput on ONE CPU core: our tf.data ops vs timm/torchvision.

Both sides decode the same JPEGs (scikit-image's sample photos, resized to ImageNet-like
sizes around 500x375 and re-encoded at quality 90, 4:2:0) and produce normalised 224x224
float tensors, batched. Recipes:

  deit3  DeiT III (``--ThreeAugment``): RandomResizedCrop(0.08-1, bicubic) -> flip ->
         one of {grayscale, solarize, Gaussian blur} -> ColorJitter(0.3, 0.3, 0.3) -> normalize.
         torch side: PIL decode, timm RandomResizedCropAndInterpolation, RandomHorizontalFlip,
         RandomChoice(Grayscale(3), Solarize (ImageOps), PIL GaussianBlur(r ~ U[0.1, 2])),
         ColorJitter, ToTensor, Normalize (as deit's augment.py).
  deit   DeiT: RRC(bicubic) -> flip -> RandAugment rand-m9-mstd0.5-inc1 -> normalize ->
         random erasing 0.25 (timm ``create_transform(224, is_training=True,
         auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', re_prob=0.25)``).

One core each: TensorFlow with a private threadpool of 1 thread and intra/inter-op
parallelism 1 (no autotuned parallelism or injected prefetch); PyTorch in this single process
with ``torch.set_num_threads(1)``. The two are timed alternately ``--repeats`` times and the
script prints, for both, img/s by wall clock and per CPU-second (images / process CPU time:
the per-core rate, less sensitive to other processes), their medians and ranges, the ratios
ours/torch, and the CPU use (process CPU time / wall time: <= ~1.0 means one core at most).

Numbers need a quiet machine: other processes competing for the core make both sides slower
by different amounts; run it several times and look at the spread.

  python scripts/benchmark_augment.py [--recipe=deit3|deit] [--images=600] [--repeats=3]
                                      [--breakdown]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time

# torch, torchvision and timm must be imported before TensorFlow (clashing bundled native
# libraries crash the process otherwise).
import torch  # noqa: E402
import timm  # noqa: E402,F401  (imports torchvision)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # quiet one-time oneDNN notices

SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (333, 500), (500, 375), (640, 480),
         (400, 300)]  # (width, height), ImageNet-like
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
          "hubble_deep_field", "retina", "colorwheel"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

SPECS = {
    "deit3": ("decode|random_resized_crop(224, scale=(0.08, 1.0), method='bicubic')|flip_lr|"
              "three_augment|color_jitter(0.3, 0.3, 0.3)|normalize('imagenet')"),
    "deit": ("decode|random_resized_crop(224, scale=(0.08, 1.0), method='bicubic')|flip_lr|"
             "randaugment('rand-m9-mstd0.5-inc1', interpolation='bicubic')|"
             "normalize('imagenet')|random_erasing(0.25, mode='pixel')"),
}


def make_jpegs(count: int):
  """``count`` JPEG byte strings: the sample photos at the SIZES, cycled."""
  import skimage.data
  from PIL import Image
  out = []
  photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
  for i in range(len(photos) * len(SIZES)):
    im = photos[i % len(photos)].resize(SIZES[i % len(SIZES)], Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    out.append(buf.getvalue())
  return [out[i % len(out)] for i in range(count)]


# ------------------------------------------------------------------------------------- torch


def torch_transform(recipe: str):
  import random
  from PIL import ImageFilter, ImageOps
  from torchvision import transforms as T
  from timm.data import create_transform
  from timm.data.transforms import RandomResizedCropAndInterpolation

  if recipe == "deit":
    # timm's Posterize with 0 bits (m >= 10 after noise) crashes on Pillow >= 10, which rejects
    # bits=0; give the black image older Pillow gave (and our op gives).
    from timm.data import auto_augment

    def posterize(img, bits, **_):
      return img.point(lambda v: 0) if bits <= 0 else auto_augment.posterize(img, bits)
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
      auto_augment.NAME_TO_OP[name] = posterize
    return create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                            interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1,
                            mean=MEAN, std=STD)

  class Solarize:
    def __call__(self, img):
      return ImageOps.solarize(img)

  class GaussianBlur:
    def __call__(self, img):
      return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

  return T.Compose([
      RandomResizedCropAndInterpolation(224, scale=(0.08, 1.0), interpolation="bicubic"),
      T.RandomHorizontalFlip(),
      T.RandomChoice([T.Grayscale(num_output_channels=3), Solarize(), GaussianBlur()]),
      T.ColorJitter(0.3, 0.3, 0.3),
      T.ToTensor(),
      T.Normalize(MEAN, STD),
  ])


def run_torch(jpegs, recipe: str, batch: int) -> float:
  from PIL import Image
  transform = torch_transform(recipe)
  imgs = []
  start = time.perf_counter()
  for data in jpegs:
    imgs.append(transform(Image.open(io.BytesIO(data)).convert("RGB")))
    if len(imgs) == batch:
      torch.stack(imgs)
      imgs = []
  return time.perf_counter() - start


# ---------------------------------------------------------------------------------------- ours


def tf_one_core():
  from visrep_jax.data import tf_host
  tf = tf_host()
  try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
  except RuntimeError:  # already initialised: the dataset options below still pin it
    pass
  return tf


def tf_dataset(jpegs, spec: str, batch: int):
  from visrep_jax.data import preprocess
  tf = tf_one_core()
  pp = preprocess.parse(spec)
  base = tf.constant([0, 1234], tf.int64)

  def fn(i, data):
    seed = tf.cast(tf.random.experimental.stateless_fold_in(base, i), tf.int32)
    return pp({"image": data, "label": tf.constant(0, tf.int64)}, seed)["image"]

  ds = tf.data.Dataset.from_tensor_slices(jpegs).enumerate().map(fn)
  ds = ds.batch(batch) if batch else ds  # decoded images of different sizes: no batch
  opts = tf.data.Options()
  opts.threading.private_threadpool_size = 1
  opts.threading.max_intra_op_parallelism = 1
  opts.autotune.enabled = False
  opts.experimental_optimization.inject_prefetch = False
  opts.experimental_optimization.map_parallelization = False
  return ds.with_options(opts)


def run_tf(ds) -> float:
  start = time.perf_counter()
  for _ in ds:
    pass
  return time.perf_counter() - start


def cpu_use(runs):
  return statistics.median(c for _, c in runs)


def timed(fn):
  """(wall seconds, process CPU seconds / wall seconds)."""
  cpu = time.process_time()
  wall = fn()
  return wall, (time.process_time() - cpu) / wall


def breakdown(jpegs, spec: str, batch: int):
  """Wall time of each prefix of the spec (decode, +crop, +flip, ...), per image. The crop
  after decode is fused with it (only the crop window is decoded), so its increment can be
  below zero."""
  ops = [s.strip() for s in spec.split("|")]
  prev = 0.0
  for k in range(1, len(ops) + 1):
    prefix = "|".join(ops[:k])
    ds = tf_dataset(jpegs, prefix, batch if k > 1 else None)
    run_tf(ds)  # warm-up (tracing)
    t = min(run_tf(ds) for _ in range(2)) / len(jpegs) * 1e3
    print(f"  {ops[k - 1]:70s} {t:7.3f} ms/img cumulative, +{t - prev:6.3f}")
    prev = t


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--recipe", choices=sorted(SPECS), default="deit3")
  parser.add_argument("--images", type=int, default=600)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--breakdown", action="store_true", help="time each op of our pipeline")
  args = parser.parse_args(argv)
  if args.images < args.batch or args.repeats < 1:
    parser.error("--images must be >= --batch and --repeats >= 1")

  torch.set_num_threads(1)
  torch.set_num_interop_threads(1)
  tf_one_core()
  jpegs = make_jpegs(args.images)
  spec = SPECS[args.recipe]
  ds = tf_dataset(jpegs, spec, args.batch)
  run_tf(tf_dataset(jpegs[:args.batch], spec, args.batch))  # trace once
  run_torch(jpegs[:args.batch], args.recipe, args.batch)
  ours, theirs = [], []
  for _ in range(args.repeats):
    ours.append(timed(lambda: run_tf(ds)))
    theirs.append(timed(lambda: run_torch(jpegs, args.recipe, args.batch)))
  wall = lambda runs: [args.images / w for w, _ in runs]
  per_cpu = lambda runs: [args.images / (w * c) for w, c in runs]
  fmt = lambda xs: f"{statistics.median(xs):6.1f} (runs {', '.join(f'{x:.1f}' for x in xs)})"
  print(f"recipe {args.recipe}: {args.images} JPEGs ~500x375 -> 224x224, batch {args.batch}, "
        f"one core each, {args.repeats} alternating runs")
  print("                  img/s (wall clock)                img/s per CPU-second")
  for name, runs in (("ours  (tf.data)", ours), ("torch (PIL/tv) ", theirs)):
    print(f"  {name}: {fmt(wall(runs)):34s} {fmt(per_cpu(runs))}")
  for name, rate in (("wall clock", wall), ("CPU time", per_cpu)):
    ratios = [a / b for a, b in zip(rate(ours), rate(theirs))]
    print(f"  ratio ours/torch ({name}): {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")
  print(f"  CPU use (process CPU time / wall time): ours {cpu_use(ours):.2f}, "
        f"torch {cpu_use(theirs):.2f}")
  if args.breakdown:
    print("our pipeline, op by op:")
    breakdown(jpegs, spec, args.batch)


if __name__ == "__main__":
  main()
