"""Optimizer factory (optax): AdamW, LAMB, SGD; warmup + cosine schedules; weight-decay masks;
gradient clipping. Everything is selected by name from ``config.optimizer``/``config.schedule``."""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from visrep_jax.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")

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


def make_schedule(config, total_steps: int) -> Callable[[Any], Any]:
  s = config.schedule
  return SCHEDULES.get(s.name)(lr=config.optimizer.lr, total_steps=total_steps,
                               warmup_steps=s.warmup_steps, warmup_init_lr=s.warmup_init_lr,
                               min_lr=s.min_lr)


def make_optimizer(config, params, total_steps: int):
  """Returns ``(optax transformation, schedule)`` for ``config.optimizer`` and the params."""
  o = config.optimizer
  schedule = make_schedule(config, total_steps)
  mask = weight_decay_mask(params, tuple(o.no_decay))
  kw = {k: v for k, v in o.items() if k not in ("name", "lr", "weight_decay", "clip_grad_norm",
                                                  "no_decay")}
  tx = OPTIMIZERS.get(o.name)(lr=schedule, weight_decay=o.weight_decay, mask=mask, **kw)
  if o.clip_grad_norm and o.clip_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), tx)
  return tx, schedule
