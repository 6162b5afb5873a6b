#!/usr/bin/env python
"""Train-step time with the models' Dense VJP (visrep_jax.models.layers.dense_dot_general) against
JAX's autodiff of lax.dot_general, in one process, timed in interleaved windows.

  python scripts/benchmark_dense_vjp.py --model=deit3_small_patch16_224 --batch_size=32
  python scripts/benchmark_dense_vjp.py --model=deit3_demo_patch7_28 --batch_size=64 --steps=20

Both steps are the one ``scripts/benchmark.py`` times (forward + backward + AdamW, synthetic
data). Prints seconds per step (median over windows) for each and the speed-up autodiff/ours.
The Dense VJP is used on the CPU backend only; elsewhere both steps are the same.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]

from visrep_jax.utils import malloc as malloc_utils  # noqa: E402  (no jax import)
from visrep_jax.utils import xla as xla_utils  # noqa: E402  (no jax import)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="deit3_small_patch16_224")
  p.add_argument("--batch_size", "--batch-size", type=int, default=32)
  p.add_argument("--resolution", type=int, default=None, help="default: the model's img_size")
  p.add_argument("--steps", type=int, default=2, help="steps per timed window")
  p.add_argument("--repeats", type=int, default=6, help="timed windows per variant")
  return p.parse_args(argv)


def main(args):
  malloc_utils.ensure_tcmalloc(script=__file__)
  xla_utils.set_cpu_flags()
  import jax
  import numpy as np
  import optax
  from visrep_jax import models
  from visrep_jax.models import layers
  from visrep_jax.utils.benchmarking import init_train_state, make_jax_train_step

  try:
    probe = models.create(args.model)
  except ValueError as e:  # unknown name (UnknownNameError) or bad option: one line
    raise SystemExit(f"--model: {e}") from None
  res = args.resolution or getattr(probe, "img_size", 224)
  rng = np.random.RandomState(0)
  x = jax.numpy.asarray(rng.rand(args.batch_size, res, res, 3).astype(np.float32))
  y = jax.numpy.asarray(rng.randint(0, 10, args.batch_size))
  ours = layers.dense_kwargs
  variants = {"autodiff": lambda: {}, "ours": ours}
  runs = {}
  for name, kwargs_fn in variants.items():
    layers.dense_kwargs = kwargs_fn  # read while the step is traced (compiled) below
    try:
      model = models.create(args.model, **({"img_size": res} if hasattr(probe, "img_size")
                                           else {}))
      tx = optax.adamw(1e-3, weight_decay=0.05)
      step = make_jax_train_step(model, tx)
      state = init_train_state(model, tx, x)
      state, loss = step(state, x, y, jax.random.PRNGKey(1))  # compile
      state, loss = step(state, x, y, jax.random.PRNGKey(2))  # warm-up
      loss.block_until_ready()
    finally:
      layers.dense_kwargs = ours
    runs[name] = [step, state]
  print(f"{args.model} @ {res}px, batch {args.batch_size}, backend {jax.default_backend()}, "
        f"{os.cpu_count()} cores, jax {jax.__version__}, allocator "
        f"{malloc_utils.active_allocator()}; {args.repeats} windows x {args.steps} steps")
  times = {name: [] for name in runs}
  for r in range(args.repeats + 1):  # the first round settles the allocator: not counted
    for name, run in runs.items():
      step, state = run
      t = time.perf_counter()
      for i in range(args.steps):
        state, loss = step(state, x, y, jax.random.PRNGKey(i))
      loss.block_until_ready()
      run[1] = state
      if r:
        times[name].append((time.perf_counter() - t) / args.steps)
  for name, ts in times.items():
    print(f"{name:<9} s/step {statistics.median(ts):.4f}   windows: "
          + " ".join(f"{t:.3f}" for t in ts))
  speedup = statistics.median(times["autodiff"]) / statistics.median(times["ours"])
  if jax.default_backend() == "cpu":
    print(f"speed-up of the Dense VJP (autodiff / ours): {speedup:.3f}x")
  else:
    print(f"speed-up of the Dense VJP: n/a (backend {jax.default_backend()}: the models use it "
          f"on CPU only, both steps are the same here; ratio of medians {speedup:.3f})")


if __name__ == "__main__":
  main(parse_args())
