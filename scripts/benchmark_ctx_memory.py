#!/usr/bin/env python
"""Memory (and optionally speed) of the CrossTransformer train step with and without remat and
query chunking.

The step is what episodic training runs on top of the backbone: logits of the CTX head ->
softmax cross-entropy (mean over queries) -> gradients w.r.t. the head parameters AND the query
and support feature maps (what backprop into the backbone needs). It is lowered from
``jax.ShapeDtypeStruct`` specs and compiled, never run, so the default episode (50-way,
500 support images, 14x14x512 maps: the largest Meta-Dataset training episode, spec
crosstransformers.md §1.3 / §6) needs no memory; XLA's ``memory_analysis()`` of each compiled
step is printed for the configurations

  plain           the attention tensor [Q, 196, S, 196] of the whole query batch, stored for the
                  backward
  remat           the fused backward (fewshot.ctx_attend_fused, the default remat_impl): only
                  the class log-sum-exps (and the aligned prototypes, if they are no larger
                  than one chunk's attention) are kept; the backward recomputes the attention
                  (q k^T, and p v for the prototypes not kept), formed once there
  ckpt            remat_impl='checkpoint': jax.checkpoint around the attention, whose backward
                  recomputes the whole attention forward
  chunkK          K queries at a time (lax.map) without remat: the forward is chunked, but every
                  chunk's attention is kept for the backward
  remat+chunkK    fused backward, K queries at a time in both passes: peak ~ one chunk's
                  attention (the official ``rematerialize=True`` does this with K = 1)
  remat+chunkK+recompute  the same, the aligned prototypes recomputed in the backward (what
                  the fused backward does when they exceed one chunk's attention, e.g. for
                  Meta-Dataset's 500 padded queries; at 50 queries it keeps them)
  ckpt+chunkK     jax.checkpoint per chunk of K queries

with the ratio of temporary memory plain / config (issue target: >= 3x with remat). Numbers are
for the backend JAX picks (run it on the accelerator for the numbers that matter; CPU buffer
assignment differs). ``--time`` also runs ``--steps`` steps at ``--time_queries`` queries (the
plain step must fit in memory) and prints the step time of each configuration and its slowdown
against plain (issue target: <= 1.3x).

  python scripts/benchmark_ctx_memory.py [--ways=50] [--support=500] [--queries=50] [--hw=14]
      [--channels=512] [--chunk=5[,10,...]] [--dtype=float32] [--time] [--time_queries=10]
      [--steps=5] [--class_sum] [--configs=remat+chunk5,ckpt+chunk5]
      [--class_sum_impl=segment|matmul] [--no_memory]

A configuration that does not compile or run (XLA's GPU autotuner runs kernels while compiling,
so e.g. chunk5 at 500 queries, whose kept attention is 36 GiB, can run out of memory there) is
reported on one line and skipped.

``--class_sum`` times fewshot._class_sum's segment sum (the CPU default) against its one-hot
product (other backends) on one query chunk, at --ways classes and at one class per support image.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from visrep_jax.models import fewshot  # noqa: E402

FIELDS = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
          "alias_size_in_bytes", "generated_code_size_in_bytes")


def make_train_step(model: fewshot.CrossTransformer, num_classes: int):
  """(params, query, support, labels, mask, query_labels) -> (loss, (d params, d query, d support))."""

  def loss_fn(params, query, support, labels, mask, query_labels):
    logits = model.apply({"params": params}, query, support, labels, mask, num_classes)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, query_labels[:, None], axis=1))

  return jax.value_and_grad(loss_fn, argnums=(0, 1, 2))


def configurations(chunks, only=None):
  """The configurations to compare, in print order; ``only``: names to keep ('plain' always)."""
  out = {"plain": dict(remat=False, query_chunk_size=None),
         "remat": dict(remat=True, query_chunk_size=None),
         "ckpt": dict(remat=True, remat_impl="checkpoint", query_chunk_size=None)}
  for k in chunks:
    out[f"chunk{k}"] = dict(remat=False, query_chunk_size=k)
    out[f"remat+chunk{k}"] = dict(remat=True, query_chunk_size=k)
    # The fused backward that recomputes the aligned prototypes, as in training steps whose
    # prototypes exceed one chunk's attention (500 padded queries).
    out[f"remat+chunk{k}+recompute"] = dict(remat=True, query_chunk_size=k,
                                             keep_prototypes=False)
    out[f"ckpt+chunk{k}"] = dict(remat=True, remat_impl="checkpoint", query_chunk_size=k)
  if only:
    unknown = sorted(set(only) - set(out))
    if unknown:
      raise SystemExit(f"error: unknown --configs {', '.join(unknown)}; choose from "
                       f"{', '.join(out)}")
    out = {k: v for k, v in out.items() if k == "plain" or k in only}
  return out


def failure(e: Exception) -> str:
  """One line for a configuration that did not compile or run (e.g. out of memory)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  oom = [l for l in lines if "RESOURCE_EXHAUSTED" in l or "Out of memory" in l]
  return f"{type(e).__name__}: {(oom or lines or [''])[0][:200]}"


def episode_specs(args, num_queries):
  dtype = jnp.dtype(args.dtype)
  return (jax.ShapeDtypeStruct((num_queries, args.hw, args.hw, args.channels), dtype),
          jax.ShapeDtypeStruct((args.support, args.hw, args.hw, args.channels), dtype),
          jax.ShapeDtypeStruct((args.support,), jnp.int32),
          jax.ShapeDtypeStruct((args.support,), jnp.bool_),
          jax.ShapeDtypeStruct((num_queries,), jnp.int32))


def compiled_step(args, config, num_queries):
  model = fewshot.CrossTransformer(dtype=jnp.dtype(args.dtype),
                                   class_sum_impl=args.class_sum_impl, **config)
  specs = episode_specs(args, num_queries)
  params = jax.eval_shape(functools.partial(model.init, num_classes=args.ways),
                          jax.random.PRNGKey(0), *specs[:4])["params"]
  step = jax.jit(make_train_step(model, args.ways))
  t0 = time.perf_counter()
  compiled = step.lower(params, *specs).compile()
  return step, compiled, time.perf_counter() - t0


def median_seconds(fn, steps: int) -> float:
  """Median wall time of ``steps`` calls of ``fn`` (results blocked on) after one warm-up."""
  jax.block_until_ready(fn())
  samples = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    samples.append(time.perf_counter() - t0)
  return statistics.median(samples)


def gib(n):
  return f"{n / 2**30:9.3f} GiB"


def memory_report(args):
  results = {}
  attention = args.queries * args.hw ** 2 * args.support * args.hw ** 2 * 4
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); class sum: "
        f"{args.class_sum_impl or 'by the backend'}; episode: "
        f"{args.ways}-way, {args.support} support, {args.queries} queries (batch of queries "
        f"used here), {args.hw}x{args.hw}x{args.channels} {args.dtype} features; one float32 "
        f"attention tensor [Q, hw, S, hw] = {gib(attention).strip()}")
  for name, config in configurations(args.chunk, args.configs).items():
    try:
      _, compiled, seconds = compiled_step(args, config, args.queries)
    except Exception as e:  # pylint: disable=broad-except
      # XLA's GPU autotuner runs kernels while compiling, so a configuration whose buffers
      # exceed the device memory can fail here; the others are still worth reporting.
      print(f"{name:>14}: did not compile ({failure(e)})")
      continue
    stats = compiled.memory_analysis()
    results[name] = {f: int(getattr(stats, f, 0) or 0) for f in FIELDS}
    print(f"{name:>14}: " + "  ".join(f"{f}={results[name][f]:,}" for f in FIELDS) +
          f"  (compiled in {seconds:.1f}s)")
  if "plain" not in results:
    return results
  base = results["plain"]["temp_size_in_bytes"]
  print("temporary memory (temp_size_in_bytes), ratio plain / config (target: >= 3x):")
  for name, r in results.items():
    print(f"{name:>14}: {gib(r['temp_size_in_bytes'])}   {base / max(r['temp_size_in_bytes'], 1):6.2f}x")
  return results


def time_report(args):
  r = np.random.RandomState(0)
  q = args.time_queries
  ways = min(args.ways, args.support)
  labels = np.arange(args.support) % ways
  data = (r.randn(q, args.hw, args.hw, args.channels).astype(args.dtype),
          r.randn(args.support, args.hw, args.hw, args.channels).astype(args.dtype),
          labels.astype(np.int32), np.ones(args.support, bool),
          (np.arange(q) % ways).astype(np.int32))
  data = jax.device_put(data)
  times = {}
  print(f"timing: {q} queries, {args.steps} steps after one warm-up, median step time; class "
        f"sum: {args.class_sum_impl or 'by the backend'}")
  chunks = [c for c in args.chunk if c < q] or [1]
  configs = configurations(chunks)
  if args.configs:  # chunk sizes >= the queries are not timed
    configs = {k: v for k, v in configs.items() if k == "plain" or k in args.configs}
  for name, config in configs.items():
    model = fewshot.CrossTransformer(dtype=jnp.dtype(args.dtype),
                                     class_sum_impl=args.class_sum_impl, **config)
    try:
      params = model.init(jax.random.PRNGKey(0), *data[:4], args.ways)["params"]
      step = jax.jit(make_train_step(model, args.ways))
      times[name] = median_seconds(lambda: step(params, *data), args.steps)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name:>14}: did not run ({failure(e)})")
      if name == "plain":
        print("the plain step must run for the slowdowns: lower --time_queries")
        return times
      continue
    print(f"{name:>14}: {times[name] * 1e3:9.1f} ms  slowdown vs plain "
          f"{times[name] / times['plain']:5.2f}x (target <= 1.30x)")
  return times


def class_sum_report(args):
  """Eq. (2)'s class sum on one chunk's [chunk, hw^2, S, 128] input, both implementations of
  ``fewshot._class_sum`` in this run, at --ways classes and at one class per support image
  (SimCLR episodes); prints each median time and the ratio matmul / segment."""
  chunk = min(args.chunk)
  x = jax.device_put(np.random.RandomState(0).randn(
      chunk, args.hw ** 2, args.support, 128).astype(np.float32))
  times = {}
  print(f"class sum: [{chunk}, {args.hw ** 2}, {args.support}, 128] -> classes, {args.steps} runs "
        "after one warm-up, median")
  for ways in sorted({min(args.ways, args.support), args.support}):
    seg = jnp.asarray(np.arange(args.support) % ways, jnp.int32)
    for impl in ("segment", "matmul"):
      fn = jax.jit(functools.partial(fewshot._class_sum, seg=seg, num_classes=ways, impl=impl))
      times[(ways, impl)] = median_seconds(lambda: fn(x), args.steps)
    print(f"  {ways:4d} classes: segment {times[(ways, 'segment')] * 1e3:8.1f} ms, matmul "
          f"{times[(ways, 'matmul')] * 1e3:8.1f} ms, matmul / segment "
          f"{times[(ways, 'matmul')] / times[(ways, 'segment')]:5.2f}x")
  return times


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--ways", type=int, default=50)
  p.add_argument("--support", type=int, default=500)
  p.add_argument("--queries", type=int, default=50,
                 help="queries in the compiled step (Meta-Dataset: up to 10 per class)")
  p.add_argument("--hw", type=int, default=14, help="feature map side (14: dilated ResNet-34)")
  p.add_argument("--channels", type=int, default=512)
  p.add_argument("--chunk", type=lambda s: [int(x) for x in s.split(",")], default=[5],
                 help="comma-separated query chunk sizes")
  p.add_argument("--configs", type=lambda s: [x for x in s.split(",") if x], default=None,
                 help="comma-separated configurations to run (plain always runs), e.g. "
                      "remat+chunk5,ckpt+chunk5; default: all")
  p.add_argument("--dtype", default="float32", help="feature/head dtype (attention is float32)")
  p.add_argument("--time", action="store_true", help="also time steps (needs the memory)")
  p.add_argument("--time_queries", type=int, default=10)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--class_sum_impl", choices=fewshot.CLASS_SUM_IMPLS, default=None,
                 help="the class sum of Eq. (2) in every configuration's step (default: by "
                      "the backend, segment on CPU, matmul elsewhere)")
  p.add_argument("--no_memory", action="store_true",
                 help="skip the memory report (compile-only), e.g. when only --time is wanted")
  p.add_argument("--class_sum", action="store_true",
                 help="also time the two implementations of the class sum of Eq. (2)")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  results = {} if args.no_memory else memory_report(args)
  if args.time:
    time_report(args)
  if args.class_sum:
    class_sum_report(args)
  return results


if __name__ == "__main__":
  main()
