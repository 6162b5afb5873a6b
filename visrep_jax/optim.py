"""Optimizer factory (optax): AdamW, LAMB, SGD, normalised-gradient Adam; warmup + cosine or
exponential schedules (per step, or per
epoch as the deit repo steps timm's scheduler); weight-decay masks; per-parameter learning-rate
multipliers (layer-wise decay, regex groups); gradient clipping. Everything is selected by name
from ``config.optimizer``/``config.schedule``."""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from visrep_jax.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")
# Schedules whose value only changes at epoch boundaries (``schedule.per_epoch=True``).
EPOCH_SCHEDULES = Registry("per-epoch schedule")

# Parameters never decayed, besides every 1-D parameter (biases, norm scales, LayerScale):
# timm's no_weight_decay() = {pos_embed, cls_token} (+ dist_token for DeiT's distilled models is
# *decayed* in the reference, being 3-D; we list it for tokens in general but keep parity opt-in).
DEFAULT_NO_DECAY = (r"(^|/)pos_embed$", r"(^|/)cls_token$", r"(^|/)dist_token$")


def weight_decay_mask(params, no_decay_patterns: Sequence[str] = DEFAULT_NO_DECAY):
  """True where weight decay applies: >= 2-D params whose path matches no ``no_decay`` regex."""
  flat = traverse_util.flatten_dict(params, sep="/")
  pats = [re.compile(p) for p in no_decay_patterns]
  mask = {k: (v.ndim > 1 and not any(p.search(k) for p in pats)) for k, v in flat.items()}
  return traverse_util.unflatten_dict(mask, sep="/")


# --- Schedules ---------------------------------------------------------------------------------

@SCHEDULES.register("cosine")
def cosine(lr: float, total_steps: int, warmup_steps: int = 0, warmup_init_lr: float = 0.0,
           min_lr: float = 0.0):
  """Linear warmup from ``warmup_init_lr`` to ``lr`` then cosine decay to ``min_lr``."""
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=warmup_init_lr, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=min_lr)


@SCHEDULES.register("constant")
def constant(lr: float, total_steps: int, warmup_steps: int = 0, warmup_init_lr: float = 0.0,
             min_lr: float = 0.0):
  del total_steps, min_lr
  if warmup_steps <= 0:
    return optax.constant_schedule(lr)
  return optax.join_schedules(
      [optax.linear_schedule(warmup_init_lr, lr, warmup_steps), optax.constant_schedule(lr)],
      [warmup_steps])


@SCHEDULES.register("exponential")
def exponential(lr: float, total_steps: int, warmup_steps: int = 0, warmup_init_lr: float = 0.0,
                min_lr: float = 0.0, decay_rate: float = 0.915, decay_steps: int = 500,
                staircase: bool = True):
  """``lr * decay_rate ** (step / decay_steps)`` after an optional linear warmup (the decay counts
  from the end of the warmup), floored at ``min_lr``; ``staircase`` floors the exponent, as
  ``tf.compat.v1.train.exponential_decay(staircase=True)`` in Meta-Dataset's learner (the
  CrossTransformers recipe: x0.915 every 500 / 1000 / 2000 episodes)."""
  del total_steps
  if decay_steps <= 0:
    raise ValueError(f"exponential schedule: decay_steps must be > 0, got {decay_steps}")
  decay = optax.exponential_decay(lr, transition_steps=decay_steps, decay_rate=decay_rate,
                                  staircase=staircase, end_value=min_lr if min_lr > 0 else None)
  if warmup_steps <= 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(warmup_init_lr, lr, warmup_steps), decay], [warmup_steps])


@EPOCH_SCHEDULES.register("cosine")
def cosine_epochs(lr: float, epochs: float, warmup_epochs: float = 0.0,
                  warmup_init_lr: float = 0.0, min_lr: float = 0.0):
  """timm ``CosineLRScheduler(t_initial=epochs, lr_min=min_lr, warmup_t=warmup_epochs,
  warmup_lr_init=warmup_init_lr)`` (one cycle, no ``warmup_prefix``) as a function of the epoch
  ``t``: ``warmup_init_lr + t * (lr - warmup_init_lr) / warmup_t`` while ``t < warmup_t``, then
  ``min_lr + (lr - min_lr) * (1 + cos(pi * t / epochs)) / 2`` (the cosine is *not* shifted by the
  warmup), and ``min_lr`` from ``t >= epochs`` on."""
  def fn(t):
    t = jnp.asarray(t, jnp.float32)
    cos = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(jnp.pi * t / epochs))
    out = jnp.where(t < epochs, cos, min_lr)
    if warmup_epochs > 0:
      out = jnp.where(t < warmup_epochs,
                      warmup_init_lr + t * (lr - warmup_init_lr) / warmup_epochs, out)
    return out
  return fn


@EPOCH_SCHEDULES.register("constant")
def constant_epochs(lr: float, epochs: float, warmup_epochs: float = 0.0,
                    warmup_init_lr: float = 0.0, min_lr: float = 0.0):
  """Linear warmup over ``warmup_epochs`` (timm's warmup formula), then ``lr``."""
  del epochs, min_lr
  def fn(t):
    t = jnp.asarray(t, jnp.float32)
    if warmup_epochs <= 0:
      return jnp.full_like(t, lr)
    return jnp.where(t < warmup_epochs,
                     warmup_init_lr + t * (lr - warmup_init_lr) / warmup_epochs, lr)
  return fn


def resolve_warmup_steps(config, steps_per_epoch: int) -> int:
  """``schedule.warmup_steps`` if set, else ``round(schedule.warmup_epochs * steps_per_epoch)``."""
  s = config.schedule
  return int(s.warmup_steps or round(s.get("warmup_epochs", 0.0) * steps_per_epoch))


def make_schedule(config, total_steps: int, steps_per_epoch: int) -> Callable[[Any], Any]:
  """The learning rate as a function of the optimizer step count (0 for the first update).

  ``schedule.per_epoch=False``: ``SCHEDULES[name]`` evaluated at every step, warmup in steps
  (``warmup_steps``, or ``warmup_epochs * steps_per_epoch``).

  ``schedule.per_epoch=True``: the deit repo's stepping of timm's scheduler. Epochs are
  ``total_steps / steps_per_epoch`` (``t_initial``), warmup is ``warmup_epochs`` (or
  ``warmup_steps / steps_per_epoch``) and the LR is constant within an epoch. deit's main.py
  calls ``lr_scheduler.step(epoch)`` at the *end* of epoch ``epoch`` (timm's own train.py passes
  ``epoch + 1``), and the scheduler's constructor sets the value for ``t=0``; so epoch ``e`` is
  trained at timm's value for ``t = max(e - 1, 0)``: epochs 0 and 1 both at ``t=0``.
  """
  s = config.schedule
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
  if not s.get("per_epoch", False):
    extra = ({k: s.get(k) for k in ("decay_rate", "decay_steps", "staircase") if k in s}
             if s.name == "exponential" else {})
    return SCHEDULES.get(s.name)(lr=config.optimizer.lr, total_steps=total_steps,
                                 warmup_steps=resolve_warmup_steps(config, steps_per_epoch),
                                 warmup_init_lr=s.warmup_init_lr, min_lr=s.min_lr, **extra)
  epochs = total_steps / steps_per_epoch
  warmup_epochs = (s.warmup_steps / steps_per_epoch if s.warmup_steps
                   else float(s.get("warmup_epochs", 0.0)))
  fn = EPOCH_SCHEDULES.get(s.name)(lr=config.optimizer.lr, epochs=max(epochs, 1e-9),
                                   warmup_epochs=warmup_epochs,
                                   warmup_init_lr=s.warmup_init_lr, min_lr=s.min_lr)

  def schedule(count):
    epoch = jnp.asarray(count, jnp.int32) // steps_per_epoch
    return fn(jnp.maximum(epoch - 1, 0))
  return schedule


# --- Per-parameter learning-rate multipliers ---------------------------------------------------

# Parameters of the input embedding: layer id 0 under layer-wise decay.
EMBED_NAMES = ("patch_embed", "cls_token", "pos_embed", "dist_token", "stem", "conv1", "bn1")
# ... and the ViT_C convolutional stem's layers (``stem_conv_<i>``, ``stem_bn_<i>``).
_STEM_RE = re.compile(r"^stem_(?:conv|bn)_\d+$")
# A repeated block: a path component ``<stack>_<index>`` whose stack is ``blocks`` (the trunk of
# ViT / DeiT / CaiT / ResMLP / PatchConvNet), ``blocks_<name>`` (e.g. CaiT's and PatchConvNet's
# ``blocks_token_only``), or a ResNet stage ``layer<k>``.
_BLOCK_RE = re.compile(r"^(?P<stack>blocks(?:_[A-Za-z][A-Za-z_]*?)?|layer\d+)_(?P<index>\d+)$")


def _natural_key(s: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _block_of(path: Tuple[str, ...]) -> Optional[Tuple[str, int]]:
  for part in path:
    m = _BLOCK_RE.match(part)
    if m:
      return m.group("stack"), int(m.group("index"))
  return None


def layer_ids(params) -> Tuple[Dict[str, int], int]:
  """``({'a/b/kernel': layer id}, num_layers)`` for layer-wise LR decay (BEiT / DeiT III).

  Derived from the parameter paths alone, so every zoo family works without per-model tables:

  * id 0: the embedding, i.e. paths whose first component is one of ``EMBED_NAMES``
    (``patch_embed``, ``cls_token``, ``pos_embed``, ``dist_token``; ResNet's stem) or a layer of
    a ViT's convolutional stem (``stem_conv_<i>`` / ``stem_bn_<i>``);
  * blocks: the first path component matching ``<stack>_<i>`` (see ``_BLOCK_RE``). Stacks are
    numbered one after the other in forward order, the trunk ``blocks`` first, then the other
    stacks in natural name order (CaiT / PatchConvNet: ``blocks_token_only`` after ``blocks``;
    ResNet: ``layer1`` ... ``layer4``); the j-th block overall gets id ``j + 1``, so for a plain
    ViT ``blocks_i`` -> ``i + 1``. ``num_layers`` is the number of blocks of all stacks;
  * id ``num_layers + 1``: everything else (final norm, heads, ...).
  """
  flat = traverse_util.flatten_dict(params)
  blocks = {}
  for path in flat:
    b = _block_of(tuple(str(p) for p in path))
    if b is not None:
      blocks.setdefault(b[0], set()).add(b[1])
  stacks = sorted(blocks, key=lambda s: (s != "blocks", _natural_key(s)))
  offset, start = 0, {}
  for s in stacks:
    start[s] = offset
    offset += max(blocks[s]) + 1
  num_layers = offset
  ids = {}
  for path in flat:
    path = tuple(str(p) for p in path)
    b = _block_of(path)
    if path[0] in EMBED_NAMES or _STEM_RE.match(path[0]):
      ids["/".join(path)] = 0
    elif b is not None:
      ids["/".join(path)] = start[b[0]] + b[1] + 1
    else:
      ids["/".join(path)] = num_layers + 1
  return ids, num_layers


def lr_multipliers(params, layer_decay: float = 1.0,
                   multipliers: Sequence[Tuple[str, float]] = ()) -> Any:
  """A tree like ``params`` of Python floats: the product of the layer-wise decay
  ``layer_decay ** (num_layers + 1 - layer_id)`` (see :func:`layer_ids`) and the multiplier of
  every ``(regex, m)`` in ``multipliers`` whose regex ``re.search``-es the ``'a/b/kernel'`` path."""
  ids, num_layers = layer_ids(params) if layer_decay != 1.0 else ({}, 0)
  pats = [(re.compile(p), float(m)) for p, m in multipliers]

  def mult(path, _):
    key = "/".join(str(getattr(k, "key", k)) for k in path)
    m = layer_decay ** (num_layers + 1 - ids[key]) if ids else 1.0
    for p, f in pats:
      if p.search(key):
        m *= f
    return m

  return jax.tree_util.tree_map_with_path(mult, params)


def scale_by_multipliers(multipliers) -> optax.GradientTransformation:
  """Multiplies each update by its parameter's factor (a tree like the params). Applied to the
  optimizer's final update, it equals PyTorch param groups with ``lr * m``: the decoupled weight
  decay term is scaled too (``lr * m * wd``) and LAMB's per-parameter trust ratio is kept."""
  return optax.stateless(
      lambda updates, params=None: jax.tree.map(lambda u, m: u * m, updates, multipliers))


# --- Optimizers --------------------------------------------------------------------------------

@OPTIMIZERS.register("adamw")
def adamw(lr, weight_decay, mask, b1=0.9, b2=0.999, eps=1e-8, **unused):
  return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)


@OPTIMIZERS.register("lamb")
def lamb(lr, weight_decay, mask, b1=0.9, b2=0.999, eps=1e-6, **unused):
  # apex FusedLAMB (DeiT III): trust ratio on every parameter, decoupled wd inside the update.
  return optax.lamb(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)


@OPTIMIZERS.register("sgd")
def sgd(lr, weight_decay, mask, momentum=0.9, nesterov=False, **unused):
  return optax.chain(optax.add_decayed_weights(weight_decay, mask),
                     optax.sgd(lr, momentum=momentum or None, nesterov=nesterov))


@OPTIMIZERS.register("adam")
def adam(lr, weight_decay, mask, b1=0.9, b2=0.999, eps=1e-8, **unused):
  """Adam on the gradient of loss + L2 penalty (``weight_decay * w`` added to the gradient, as
  Meta-Dataset's ``weight_decay * l2_loss`` term): coupled, unlike AdamW's decoupled decay."""
  return optax.chain(optax.add_decayed_weights(weight_decay, mask),
                     optax.adam(lr, b1=b1, b2=b2, eps=eps))


@OPTIMIZERS.register("normalized_adam")
def normalized_adam(lr, weight_decay, mask, b1=0.9, b2=0.999, eps=1e-8, **unused):
  """CrossTransformers' optimizer (L361-363, L657): the gradient of loss + L2 penalty
  (``weight_decay * w`` added to the gradient, as Meta-Dataset's ``l2_regularizer`` loss term:
  coupled, not AdamW's decoupled decay), normalised to unit global L2 norm, then Adam."""
  return optax.chain(optax.add_decayed_weights(weight_decay, mask),
                     optax.normalize_by_update_norm(scale_factor=1.0, eps=1e-12),
                     optax.adam(lr, b1=b1, b2=b2, eps=eps))


_NOT_OPTIMIZER_KWARGS = ("name", "lr", "weight_decay", "clip_grad_norm", "no_decay",
                         "layer_decay", "lr_multipliers")


def make_optimizer(config, params, total_steps: int, steps_per_epoch: int):
  """Returns ``(optax transformation, schedule)`` for ``config.optimizer`` and the params
  (arrays or ``jax.ShapeDtypeStruct``s: only their paths and ranks are read).

  Order: global-norm clipping of the raw gradients, the optimizer (with the schedule and the
  weight decay), then the per-parameter LR multipliers (only when some multiplier is not 1, so
  runs without them keep the same optimizer state layout)."""
  o = config.optimizer
  schedule = make_schedule(config, total_steps, steps_per_epoch)
  mask = weight_decay_mask(params, tuple(o.no_decay))
  kw = {k: v for k, v in o.items() if k not in _NOT_OPTIMIZER_KWARGS}
  tx = OPTIMIZERS.get(o.name)(lr=schedule, weight_decay=o.weight_decay, mask=mask, **kw)
  mults = lr_multipliers(params, float(o.get("layer_decay", 1.0)),
                         [tuple(m) for m in o.get("lr_multipliers", ())])
  if any(m != 1.0 for m in jax.tree.leaves(mults)):
    tx = optax.chain(tx, scale_by_multipliers(mults))
  if o.clip_grad_norm and o.clip_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), tx)
  return tx, schedule
