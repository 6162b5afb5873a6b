"""Pieces shared by the benchmark scripts (``scripts/benchmark*.py``): the plain supervised train
step they time, XLA's FLOP count of a compiled step and the machine's matmul peak.

Import this after setting XLA flags (``visrep_jax.utils.xla.set_cpu_flags``): it imports JAX.
It never imports TensorFlow, so the benchmarks also run on hosts with JAX only.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax


def make_jax_train_step(model, tx, state_sharding=None, batch_sharding=None):
  """Returns ``step(state, images, labels, rng) -> (state, loss)``, jitted, state donated.

  ``state`` is ``{'params', 'opt_state', 'model_state'}`` (``model_state``: e.g. BatchNorm
  ``batch_stats``, updated in train mode; ``{}`` for transformers). One forward + backward with
  softmax cross-entropy and one ``tx`` update, nothing else: the step the benchmarks compare
  with the equivalent PyTorch loop.
  """

  def loss_fn(params, model_state, images, labels, rng):
    variables = {"params": params, **model_state}
    if model_state:
      (logits, _), new_state = model.apply(variables, images, train=True, rngs={"dropout": rng},
                                           mutable=list(model_state))
    else:
      logits, _ = model.apply(variables, images, train=True, rngs={"dropout": rng})
      new_state = model_state
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, new_state

  def step(state, images, labels, rng):
    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["model_state"], images, labels, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "model_state": dict(model_state)}, loss

  # Donating the state lets XLA update parameters and Adam moments in place: no second copy of
  # ~3x the parameter bytes per step. Explicit shardings (state replicated, batch split) keep
  # the output state's layout that of the input, so each step's output feeds the next.
  if state_sharding is None:
    return jax.jit(step, donate_argnums=(0,))
  return jax.jit(step, donate_argnums=(0,),
                 in_shardings=(state_sharding, batch_sharding, batch_sharding, state_sharding),
                 out_shardings=(state_sharding, state_sharding))


def init_train_state(model, tx, images, seed: int = 0):
  """``{'params', 'opt_state', 'model_state'}`` for :func:`make_jax_train_step`, initialised on
  the first image of ``images``."""
  variables = model.init(jax.random.PRNGKey(seed), images[:1], train=False)
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return {"params": params, "opt_state": tx.init(params), "model_state": model_state}


def cost_flops(compiled, n_devices: int) -> float:
  """FLOPs of one call of ``compiled`` over all devices: XLA's cost analysis of an SPMD
  executable counts one device's share (the batch is split evenly over the devices here)."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax returned one dict per computation
    ca = ca[0] if ca else {}
  return float((ca or {}).get("flops", float("nan"))) * n_devices


def measure_matmul_peak(dtype=jnp.float32, n: int = 4096, iters: int = 5) -> float:
  """FLOP/s of a large jnp.dot in ``dtype`` on this machine (best of ``iters``)."""
  a = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(2), (n, n), dtype)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = float("inf")
  for _ in range(iters):
    t = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best
