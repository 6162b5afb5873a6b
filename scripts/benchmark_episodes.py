#!/usr/bin/env python
"""Episode pipeline throughput on a large-image source (ILSVRC-like), with the per-record reader
against decoding whole class files.

Writes (once, into --data) a synthetic Meta-Dataset source of --classes classes x --per_class
JPEGs of --height x --width (smooth random images, ~ImageNet-sized files), then samples
--episodes episodes of Meta-Dataset's variable-way/shot train distribution at --image_size and
prints episodes/s and images/s for

  records     visrep_jax's EpisodeSource: class files indexed once, only the sampled records read
              and decoded (one parallel tf.data pass per episode), LRU cache of decoded images
  whole-class what a reader that decodes whole class files costs for the same episodes
              (meta_dataset.load_class_images of every class an episode uses, no cache: a class
              file of ILSVRC does not stay in memory)

  python scripts/benchmark_episodes.py [--data=/tmp/md_bench] [--classes=40] [--per_class=100]
      [--episodes=5] [--image_size=126] [--cache_gb=0]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--data", default="/tmp/md_episode_bench")
  p.add_argument("--classes", type=int, default=40, help="train classes of the synthetic source")
  p.add_argument("--per_class", type=int, default=100)
  p.add_argument("--height", type=int, default=375)
  p.add_argument("--width", type=int, default=500)
  p.add_argument("--episodes", type=int, default=5)
  p.add_argument("--image_size", type=int, default=126)
  p.add_argument("--cache_gb", type=float, default=0.0,
                 help="decoded-image cache of the records reader (0: none, every image decoded)")
  p.add_argument("--no-whole-class", dest="whole_class", action="store_false")
  return p.parse_args(argv)


def smooth_images(rng, n, h, w):
  """Random smooth colour images (upsampled noise): JPEG sizes like natural photos'."""
  small = rng.integers(0, 256, (n, h // 16 + 1, w // 16 + 1, 3)).astype(np.float32)
  big = np.repeat(np.repeat(small, 16, axis=1), 16, axis=2)[:, :h, :w]
  big += rng.normal(0, 12, big.shape).astype(np.float32)
  return np.clip(big, 0, 255).astype(np.uint8)


def make_source(args) -> str:
  from visrep_jax.data import md_convert
  path = os.path.join(args.data, "synthetic_large")
  if os.path.exists(os.path.join(path, "dataset_spec.json")):
    return path
  rng = np.random.default_rng(0)
  n_valid = n_test = 2
  total = args.classes + n_valid + n_test
  t = time.perf_counter()
  from visrep_jax.data import meta_dataset as md
  images = np.concatenate([smooth_images(rng, args.per_class, args.height, args.width)
                           for _ in range(total)])
  labels = np.repeat(np.arange(total), args.per_class)
  classes = list(range(total))
  spec = md_convert.convert_arrays(
      images, labels, path, "synthetic_large",
      class_splits={"train": classes[:args.classes],
                    "valid": classes[args.classes:args.classes + n_valid],
                    "test": classes[args.classes + n_valid:]},
      image_format="jpeg")
  size = sum(os.path.getsize(md.class_record_path(spec, c)) for c in range(total))
  print(f"wrote {total} classes x {args.per_class} JPEGs {args.height}x{args.width} "
        f"({size / 2**20:.0f} MiB, {size / total / args.per_class / 1024:.0f} KiB/image) in "
        f"{time.perf_counter() - t:.0f}s to {path}")
  return path


def main(args):
  from visrep_jax.data import episode_pipeline as ep_lib
  from visrep_jax.data import episodes as episodes_lib
  from visrep_jax.data import meta_dataset as md
  path = make_source(args)
  descr = episodes_lib.EpisodeDescriptionConfig()  # Meta-Dataset's variable way and shot
  src = ep_lib.EpisodeSource(path, "train", descr, args.image_size,
                             cache_bytes=int(args.cache_gb * (1 << 30)))
  src.sample(seed=10_000)  # warm-up: TF start-up, class indexes of the classes it touches
  decoded0 = src._cache.decoded
  n_img, n_cls, t = 0, 0, time.perf_counter()
  for i in range(args.episodes):
    ep = src.sample(seed=i)
    n_img += int(ep["support_mask"].sum() + ep["query_mask"].sum())
    n_cls += int(ep["num_ways"])
  dt = time.perf_counter() - t
  print(f"{args.episodes} episodes at {args.image_size}px: {n_img / args.episodes:.0f} images and "
        f"{n_cls / args.episodes:.1f} ways per episode on average; "
        f"{src._cache.decoded - decoded0} images decoded")
  print(f"records:     {args.episodes / dt:6.3f} episodes/s  {n_img / dt:7.1f} images/s")
  if args.whole_class:
    t = time.perf_counter()
    for i in range(args.episodes):
      src.sampler.reseed(i)
      d = src.sampler.sample_episode_description()
      for rel, _, _ in d:
        md.load_class_images(src.spec, int(src.sampler.class_set[rel]), args.image_size, 3)
    dw = time.perf_counter() - t
    print(f"whole-class: {args.episodes / dw:6.3f} episodes/s  {n_img / dw:7.1f} images/s "
          f"(records reader {dw / dt:.1f}x faster)")


if __name__ == "__main__":
  main(parse_args())
