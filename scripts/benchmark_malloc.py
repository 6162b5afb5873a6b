#!/usr/bin/env python
"""The host allocator's effect on a JAX train step on CPU (visrep_jax/utils/malloc.py).

Runs the same jitted step (forward + backward + AdamW, synthetic data) in one child process per
allocator, and prints per step the wall time, the minor page faults and the system CPU time,
then each allocator's median step time against the system allocator's, from the same run.

  python scripts/benchmark_malloc.py [--model=deit3_small_patch16_224] [--batch_size=32]
      [--steps=4] [--allocators=system,tcmalloc[,jemalloc,hugetlb]]

Allocators: ``system`` (glibc), ``hugetlb`` (glibc with GLIBC_TUNABLES=glibc.malloc.hugetlb=1),
``tcmalloc`` (with the settings ``malloc.ensure_tcmalloc`` uses), ``jemalloc``; one that is not
installed is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from visrep_jax.utils import malloc  # noqa: E402  (no jax import)

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
sys.modules.setdefault("tensorflow", None)
from visrep_jax.utils import xla as xla_utils
xla_utils.set_cpu_flags()
import jax, jax.numpy as jnp, numpy as np, optax
from visrep_jax import models
from visrep_jax.utils import malloc
from visrep_jax.utils.benchmarking import init_train_state, make_jax_train_step
model = models.create({model!r})
size = getattr(model, "img_size", 224)
x = jnp.asarray(np.random.RandomState(0).rand({batch}, size, size, 3).astype(np.float32))
y = jnp.asarray(np.arange({batch}) % 1000)
tx = optax.adamw(1e-3)
state = init_train_state(model, tx, x)
step = make_jax_train_step(model, tx)  # the step scripts/benchmark.py times
state, loss = step(state, x, y, jax.random.PRNGKey(0))
loss.block_until_ready()
rows = []
for i in range({steps}):
  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  state, loss = step(state, x, y, jax.random.PRNGKey(i + 1))
  loss.block_until_ready()
  t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
  rows.append((t1 - t0, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime))
print("RESULT " + json.dumps({{"allocator": malloc.active_allocator(), "rows": rows}}))
"""


def allocator_env(name: str):
  """(environment, None) for the child, or (None, why it is skipped)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", malloc.ENV_DONE)}
  env[malloc.ENV_CHOICE] = "system"  # the child must not re-execute itself
  if name == "system":
    return env, None
  if name == "hugetlb":
    env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    return env, None
  if name == "tcmalloc":
    lib = malloc.find_tcmalloc()
    if lib is None:
      return None, "not installed (apt-get install libtcmalloc-minimal4)"
    env.update(malloc.TCMALLOC_DEFAULTS, LD_PRELOAD=lib)
    return env, None
  if name == "jemalloc":
    lib = malloc.find_library(["libjemalloc.so.2"])
    if lib is None:
      return None, "not installed (apt-get install libjemalloc2)"
    env["LD_PRELOAD"] = lib
    return env, None
  raise SystemExit(f"error: unknown allocator {name!r}; choose from system, hugetlb, tcmalloc, "
                   "jemalloc.")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="deit3_small_patch16_224")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--steps", type=int, default=4, help="timed steps after one untimed step")
  p.add_argument("--allocators", default="system,tcmalloc")
  args = p.parse_args(argv)
  code = CHILD.format(root=ROOT, model=args.model, batch=args.batch_size, steps=args.steps)
  medians = {}
  for name in args.allocators.split(","):
    env, why = allocator_env(name)
    if env is None:
      print(f"{name:>9}: skipped, {why}")
      continue
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode or not lines:
      tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
      print(f"{name:>9}: failed ({tail})")
      continue
    res = json.loads(lines[-1][len("RESULT "):])
    rows = res["rows"]
    medians[name] = statistics.median(t for t, _, _ in rows)
    print(f"{name:>9} ({res['allocator']} mapped): " + "  ".join(
        f"{t:.2f}s/{f // 1000}k faults/{s:.2f}s sys" for t, f, s in rows) +
        f"  median {medians[name]:.2f} s/step")
  if "system" in medians:
    print(f"{args.model}, batch {args.batch_size}: step time vs the system allocator (< 1: faster): "
          + ", ".join(f"{k} {v / medians['system']:.2f}x" for k, v in medians.items()))
  return medians


if __name__ == "__main__":
  main()
