#!/usr/bin/env python
"""Is the input pipeline the bottleneck? Measures, for a config, (1) the tf.data pipeline alone
(host batches/s), (2) the jitted train step alone on a fixed device batch, and (3) the two
together as the trainer runs them, and prints images/s for each and the ratio pipeline/step.

  python scripts/benchmark_input.py --config=configs/deit3.py:demo [--steps=100]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=False)
flags.DEFINE_integer("steps", 100, "Batches to time for each measurement.")


def main(argv):
  del argv
  import jax
  from visrep_jax.data import pipeline
  from visrep_jax.trainers import supervised
  config = FLAGS.config
  b = supervised.build(config)
  n = FLAGS.steps
  ti = pipeline.make_train(b["source"], config.dataset.train_split, config.dataset.train_pp,
                           config.batch_size, seed=config.seed)
  for _ in range(5):
    next(ti.iterator)
  t = time.perf_counter()
  for _ in range(n):
    batch = next(ti.iterator)
  pipe = n * config.batch_size / (time.perf_counter() - t)

  state = b["state"]
  device_batch = pipeline.to_global(batch, b["batch_sharding"])
  for _ in range(3):
    state, m = b["train_step"](state, device_batch, b["rng"])
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(n):
    state, m = b["train_step"](state, device_batch, b["rng"])
  jax.block_until_ready(m)
  step = n * config.batch_size / (time.perf_counter() - t)

  batches = pipeline.prefetch_to_device(ti.iterator, b["batch_sharding"])
  t = time.perf_counter()
  for _ in range(n):
    state, m = b["train_step"](state, next(batches), b["rng"])
  jax.block_until_ready(m)
  both = n * config.batch_size / (time.perf_counter() - t)

  print(f"model {config.model.name}, dataset {config.dataset.name}, batch {config.batch_size}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} CPU cores")
  print(f"{'input pipeline alone':28s} {pipe:10.1f} img/s")
  print(f"{'train step alone':28s} {step:10.1f} img/s")
  print(f"{'pipeline + step (trainer)':28s} {both:10.1f} img/s")
  print(f"pipeline / step = {pipe / step:.1f}x  (>1: the input pipeline is not the bottleneck); "
        f"trainer reaches {both / step:.0%} of the step-only rate")


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
