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
  # EMA of the weights (``config.ema.decay > 0``): {'params': ..., 'model_state': ...}, else {}.
  ema: Any = flax.struct.field(default_factory=dict)


def ema_update(ema: Dict[str, Any], params: Any, model_state: Any, decay: float):
  """timm ``ModelEma``/``ModelEmaV2`` (deit main.py): after every optimizer step,
  ``ema = decay * ema + (1 - decay) * w`` for every entry of the state dict, i.e. the
  parameters *and* the BatchNorm running statistics. No bias correction or warmup; the EMA
  starts as a copy of the initial (or ``init_checkpoint``) weights. Non-float leaves are copied."""
  def lerp(e, w):
    if not jnp.issubdtype(jnp.asarray(w).dtype, jnp.floating):
      return w
    return (decay * e + (1.0 - decay) * w).astype(e.dtype)
  return jax.tree.map(lerp, ema, {"params": params, "model_state": model_state})


def ema_as_state(state: TrainState) -> TrainState:
  """The state with the EMA weights in place of the weights (same tree, same shardings), for
  evaluating the EMA model with the same jitted eval step."""
  return state.replace(params=state.ema["params"], model_state=state.ema["model_state"])


def init_variables(model: nn.Module, rng, image_shape) -> Dict[str, Any]:
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  return model.init({"params": rng, "dropout": rng}, dummy, train=False)


def create_train_state(model: nn.Module, tx_fn: Callable[[Any], optax.GradientTransformation],
                       rng, image_shape, mesh, rule: str = "replicate", ema: bool = False):
  """Initialises the state directly with its final shardings (no host round trip).

  ``tx_fn(params) -> tx`` builds the optimizer (it may depend on the params' tree, e.g. for
  weight-decay masks). ``ema``: keep an EMA of the weights in ``state.ema`` (a copy of the
  initial weights). Returns ``(state, state_shardings, tx)``.
  """
  abstract_vars = jax.eval_shape(functools.partial(init_variables, model, image_shape=image_shape),
                                 rng)
  tx = tx_fn(abstract_vars["params"])

  def init(rng):
    variables = init_variables(model, rng, image_shape)
    params = variables.pop("params")
    model_state = dict(variables)
    ema_vars = {"params": params, "model_state": model_state} if ema else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), model_state=model_state, ema=ema_vars)

  abstract = jax.eval_shape(init, rng)
  shardings = sharding_lib.state_shardings(abstract, mesh, rule)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings, tx


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, num_classes: int,
                    loss_name: str = "softmax_xent", label_smoothing: float = 0.0,
                    mixup: Optional[Dict[str, float]] = None, ema_decay: float = 0.0,
                    teacher: Optional[nn.Module] = None,
                    distill: Optional[Dict[str, Any]] = None):
  """Pure ``train_step(state, batch, rng) -> (state, metrics)`` for classification.

  ``rng`` is the run's base key; the step number is folded into it, so a resumed run draws the
  same randomness. A non-finite loss leaves params, optimizer state and EMA unchanged (the loop
  then stops with a message), so a NaN never reaches a checkpoint.

  ``ema_decay > 0``: ``state.ema`` is updated after the optimizer step (:func:`ema_update`).

  Knowledge distillation (``teacher`` and ``distill = {type: soft|hard, alpha, tau,
  kl_divisor}``): the step is ``train_step(state, batch, rng, teacher_variables)``. The teacher
  runs in eval mode (BatchNorm running statistics, no dropout) on the same mixed images, under
  ``stop_gradient``; its variables are an argument, never part of the state or checkpoints. The
  student's distillation output is ``out['dist_logits']`` (DeiT's distillation token) when the
  model has one, else its class logits (standard KD); the base loss reads the class logits.
  ``loss = (1 - alpha) * base + alpha * distill``; ``base_loss`` and ``distill_loss`` are
  reported beside it.
  """
  loss_fn = losses.LOSSES.get(loss_name)
  mixup = dict(mixup or {})
  distill = dict(distill or {})
  kind = distill.get("type", "none")
  if (teacher is None) != (kind == "none"):
    raise ValueError("distillation needs both a teacher model and distill['type'] in "
                     f"{losses.DISTILLATION.names()} (got teacher={teacher is not None}, "
                     f"type={kind!r})")
  if teacher is not None:
    distill_fn = losses.DISTILLATION.get(kind)
    alpha = float(distill.get("alpha", 0.5))
    tau = float(distill.get("tau", 1.0))
    kl_divisor = distill.get("kl_divisor", "numel")

  def step(state: TrainState, batch, rng, teacher_variables):
    rng = jax.random.fold_in(rng, state.step)
    r_drop, r_mix = jax.random.split(rng)
    images = batch["image"].astype(jnp.float32)
    labels = batch["label"]
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    images, targets, _ = mixing.mix_batch(r_mix, images, targets, **mixup)
    mutable = list(state.model_state.keys())
    if teacher is not None:
      teacher_logits, _ = teacher.apply(teacher_variables, images, train=False)
      teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))

    def compute_loss(params):
      variables = {"params": params, **state.model_state}
      if mutable:
        (logits, out), new_model_state = model.apply(variables, images, train=True,
                                                     rngs={"dropout": r_drop}, mutable=mutable)
      else:
        logits, out = model.apply(variables, images, train=True, rngs={"dropout": r_drop})
        new_model_state = state.model_state
      loss = base = loss_fn(logits, targets, label_smoothing=label_smoothing).mean()
      parts = {}
      if teacher is not None:
        student_kd = out.get("dist_logits", logits) if isinstance(out, dict) else logits
        kd = distill_fn(student_kd, teacher_logits, tau=tau, kl_divisor=kl_divisor).mean()
        loss = losses.combine_distillation(base, kd, alpha)
        parts = {"base_loss": base, "distill_loss": kd}
      return loss, (logits, new_model_state, parts)

    (loss, (logits, new_model_state, parts)), grads = jax.value_and_grad(
        compute_loss, has_aux=True)(state.params)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_ema = state.ema
    if ema_decay > 0:
      new_ema = ema_update(state.ema, new_params, new_model_state, ema_decay)
    finite = jnp.isfinite(loss)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                           opt_state=keep(new_opt_state, state.opt_state),
                           model_state=keep(new_model_state, state.model_state),
                           ema=keep(new_ema, state.ema))
    metrics = {
        "loss": loss,
        **parts,
        "top1": losses.topk_correct(logits, labels, 1).mean(),
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(state.params),
    }
    return new_state, metrics

  if teacher is None:
    def train_step(state: TrainState, batch, rng):
      return step(state, batch, rng, None)
  else:
    def train_step(state: TrainState, batch, rng, teacher_variables):
      return step(state, batch, rng, teacher_variables)
  return train_step


def init_teacher(name: str, checkpoint: str, num_classes: int, image_shape, mesh,
                 rule: str = "replicate", **overrides):
  """A zoo model and its variables restored from ``checkpoint`` (a workdir or a
  ``python -m visrep_jax.convert`` output), placed on ``mesh`` with the parameter sharding
  ``rule``. Returns ``(model, variables, shardings)``.

  The checkpoint must fit exactly (no head re-initialisation or position-embedding resampling):
  raises ``FileNotFoundError`` / ``ValueError`` otherwise."""
  from visrep_jax import checkpoint as ckpt_lib
  from visrep_jax import models
  model = models.create(name, num_classes=num_classes, **overrides)
  abstract = jax.eval_shape(functools.partial(init_variables, model, image_shape=image_shape),
                            jax.random.PRNGKey(0))
  abstract = dict(abstract)
  shardings = sharding_lib.state_shardings(abstract, mesh, rule)
  placed = ckpt_lib.abstract_with_shardings(abstract, shardings)
  abstract_params = placed.pop("params")
  params, model_state = ckpt_lib.load_variables(checkpoint, abstract_params, placed or None,
                                                adapt_pos_embed=False, adapt_head=False)
  variables = {"params": params, **(model_state or {})}
  return model, variables, shardings


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


def jit_train_step(train_step, state_shardings, batch_sharding, mesh, teacher_shardings=None):
  """Jits ``train_step`` with the state donated; ``teacher_shardings`` (the teacher's variables'
  shardings) for the four-argument step of a distillation run."""
  repl = sharding_lib.replicated(mesh)
  in_shardings = (state_shardings, batch_sharding, repl)
  if teacher_shardings is not None:
    in_shardings += (teacher_shardings,)
  return jax.jit(train_step, in_shardings=in_shardings, out_shardings=(state_shardings, repl),
                 donate_argnums=(0,))


def jit_eval_step(eval_step, state_shardings, batch_sharding, mesh):
  """Jits the forward-only ``eval_step``; on CPU with the per-executable options of
  ``visrep_jax.utils.xla.cpu_compiler_options('infer')`` (empty elsewhere)."""
  from visrep_jax.utils import xla as xla_utils  # no TensorFlow, no backend start
  repl = sharding_lib.replicated(mesh)
  return jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding), out_shardings=repl,
                 compiler_options=xla_utils.cpu_compiler_options("infer") or None)
