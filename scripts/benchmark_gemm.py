#!/usr/bin/env python
"""The float32 GEMMs of one DeiT-S block's linear layers, JAX (XLA CPU) against PyTorch, timed
interleaved in one process: forward (x @ W), input gradient (dy @ W^T) and weight gradient
(x^T @ dy, contracting over batch x tokens), for the qkv, proj, fc1 and fc2 shapes; then each
layer's whole backward (both gradients) for an incoming gradient scaled per feature (as in a
LayerScale block): 'bwd-ad' is JAX's autodiff of lax.dot_general, 'bwd' the models' Dense
contraction with its hand-written VJP (visrep_jax.models.layers.dense_dot_general).

  python scripts/benchmark_gemm.py [--batch=32] [--tokens=197] [--repeats=3]

Prints milliseconds per GEMM (per pair of GEMMs for the 'bwd' rows; median) and the ratio
torch/JAX time (> 1: JAX faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]

from visrep_jax.utils import xla as xla_utils  # noqa: E402

xla_utils.set_cpu_flags()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from visrep_jax.models import layers  # noqa: E402

SHAPES = {"qkv": (384, 1152), "proj": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384)}


def median_ms(fn, n):
  ts = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return 1e3 * statistics.median(ts)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--tokens", type=int, default=197)
  p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median of each)")
  p.add_argument("--iters", type=int, default=5, help="timed calls per round")
  args = p.parse_args()
  import torch
  torch.set_num_threads(os.cpu_count())
  m = args.batch * args.tokens
  print(f"M = {m} tokens, jax {jax.__version__}, torch {torch.__version__}, "
        f"{os.cpu_count()} cores")
  print(f"{'layer':<5} {'gemm':<6} {'jax ms':>8} {'torch ms':>9} {'torch/jax':>9}")
  rng = np.random.default_rng(0)
  for name, (k, n) in SHAPES.items():
    x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    dy = rng.standard_normal((m, n), np.float32)
    jx, jw, jdy = jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)
    tx, tw, tdy = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(dy)
    gamma = rng.uniform(0.5, 2.0, (n,)).astype(np.float32)
    jgamma, tgamma = jnp.asarray(gamma), torch.from_numpy(gamma)
    dims = (((2,), (0,)), ((), ()))
    # As in the models: activations are (batch, tokens, features). (The transpose rule of a
    # rank-3 contraction differs from the rank-2 one: it forms the kernel gradient transposed.)
    jx3 = jx.reshape(args.batch, args.tokens, k)
    jdy3 = jdy.reshape(args.batch, args.tokens, n)

    def dense_backward(dot):
      # A Dense layer's whole backward (input and kernel gradients) for an incoming gradient
      # that is itself computed (scaled per feature, as by LayerScale or a bias/GELU backward).
      return jax.jit(lambda a, b, g, s: jax.vjp(lambda u, v: dot(u, v, dims), a, b)[1](g * s))

    def torch_backward():
      g = tdy * tgamma
      return g @ tw.t(), tx.t() @ g

    cases = {
        "fwd": (jax.jit(lambda a, b: a @ b), (jx, jw), lambda: tx @ tw),
        "dinput": (jax.jit(lambda a, b: a @ b.T), (jdy, jw), lambda: tdy @ tw.t()),
        "dweight": (jax.jit(lambda a, b: a.T @ b), (jx, jdy), lambda: tx.t() @ tdy),
        # Both gradients of the layer: JAX's autodiff of lax.dot_general, then the models'
        # nn.Dense contraction (visrep_jax.models.layers.dense_dot_general).
        "bwd-ad": (dense_backward(jax.lax.dot_general), (jx3, jw, jdy3, jgamma), torch_backward),
        "bwd": (dense_backward(layers.dense_dot_general), (jx3, jw, jdy3, jgamma),
                torch_backward),
    }
    for gemm, (jf, jargs, tf) in cases.items():
      jax.block_until_ready(jf(*jargs))
      tf()
      jt, tt = [], []
      for _ in range(args.repeats):
        jt.append(median_ms(lambda: jax.block_until_ready(jf(*jargs)), args.iters))
        tt.append(median_ms(tf, args.iters))
      j, t = statistics.median(jt), statistics.median(tt)
      print(f"{name:<5} {gemm:<6} {j:8.1f} {t:9.1f} {t / j:9.2f}", flush=True)


if __name__ == "__main__":
  main()
