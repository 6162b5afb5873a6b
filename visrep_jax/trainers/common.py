"""Pieces every trainer shares: the train state, sharded initialisation, and jitted pure steps.

Nothing here imports TensorFlow, so benchmarks and accelerator-only scripts can build the very
same ``train_step`` the trainers run.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from visrep_jax import losses, sharding as sharding_lib
from visrep_jax.data import mixing


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # non-trainable collections (e.g. BatchNorm 'batch_stats'); {} for ViTs


def init_variables(model: nn.Module, rng, image_shape) -> Dict[str, Any]:
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  return model.init({"params": rng, "dropout": rng}, dummy, train=False)


def create_train_state(model: nn.Module, tx_fn: Callable[[Any], optax.GradientTransformation],
                       rng, image_shape, mesh, rule: str = "replicate"):
  """Initialises the state directly with its final shardings (no host round trip).

  ``tx_fn(params) -> tx`` builds the optimizer (it may depend on the params' tree, e.g. for
  weight-decay masks). Returns ``(state, state_shardings, tx)``.
  """
  abstract_vars = jax.eval_shape(functools.partial(init_variables, model, image_shape=image_shape),
                                 rng)
  tx = tx_fn(abstract_vars["params"])

  def init(rng):
    variables = init_variables(model, rng, image_shape)
    params = variables.pop("params")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), model_state=dict(variables))

  abstract = jax.eval_shape(init, rng)
  shardings = sharding_lib.state_shardings(abstract, mesh, rule)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings, tx


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, num_classes: int,
                    loss_name: str = "softmax_xent", label_smoothing: float = 0.0,
                    mixup: Optional[Dict[str, float]] = None):
  """Pure ``train_step(state, batch, rng) -> (state, metrics)`` for classification.

  ``rng`` is the run's base key; the step number is folded into it, so a resumed run draws the
  same randomness. A non-finite loss leaves params and optimizer state unchanged (the loop then
  stops with a message), so a NaN never reaches a checkpoint.
  """
  loss_fn = losses.LOSSES.get(loss_name)
  mixup = dict(mixup or {})

  def train_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    r_drop, r_mix = jax.random.split(rng)
    images = batch["image"].astype(jnp.float32)
    labels = batch["label"]
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    images, targets, _ = mixing.mix_batch(r_mix, images, targets, **mixup)
    mutable = list(state.model_state.keys())

    def compute_loss(params):
      variables = {"params": params, **state.model_state}
      if mutable:
        (logits, _), new_model_state = model.apply(variables, images, train=True,
                                                   rngs={"dropout": r_drop}, mutable=mutable)
      else:
        logits, _ = model.apply(variables, images, train=True, rngs={"dropout": r_drop})
        new_model_state = state.model_state
      loss = loss_fn(logits, targets, label_smoothing=label_smoothing).mean()
      return loss, (logits, new_model_state)

    (loss, (logits, new_model_state)), grads = jax.value_and_grad(
        compute_loss, has_aux=True)(state.params)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                           opt_state=keep(new_opt_state, state.opt_state),
                           model_state=keep(new_model_state, state.model_state))
    metrics = {
        "loss": loss,
        "top1": losses.topk_correct(logits, labels, 1).mean(),
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(state.params),
    }
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, num_classes: int):
  """``eval_step(state, batch) -> sums`` over the examples whose ``mask`` is 1."""

  def eval_step(state: TrainState, batch):
    variables = {"params": state.params, **state.model_state}
    logits, _ = model.apply(variables, batch["image"].astype(jnp.float32), train=False)
    labels = batch["label"]
    mask = batch["mask"].astype(jnp.float32)
    targets = jax.nn.one_hot(labels, num_classes)
    xent = optax.softmax_cross_entropy(logits, targets)
    return {
        "top1": (losses.topk_correct(logits, labels, 1) * mask).sum(),
        "top5": (losses.topk_correct(logits, labels, 5) * mask).sum(),
        "loss": (xent * mask).sum(),
        "count": mask.sum(),
    }

  return eval_step


def jit_train_step(train_step, state_shardings, batch_sharding, mesh):
  repl = sharding_lib.replicated(mesh)
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding, repl),
                 out_shardings=(state_shardings, repl), donate_argnums=(0,))


def jit_eval_step(eval_step, state_shardings, batch_sharding, mesh):
  repl = sharding_lib.replicated(mesh)
  return jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding), out_shardings=repl)
