"""Mixup and CutMix on the device, inside the jitted train step (timm ``Mixup``, mode='batch').

One lambda per global batch; the partner of example i is example B-1-i (timm's ``flip``).
With both alphas > 0, CutMix is chosen with probability ``switch_prob``. CutMix uses timm's
``correct_lam``: lambda is recomputed from the clipped box area. Targets are mixed with the same
lambda, so each row still sums to 1.

Label smoothing is applied by the loss, after mixing: ``smooth(lam * y + (1 - lam) * y')`` with
``smooth(t) = (1 - s) * t + s / K``. Because lam + (1 - lam) = 1 this equals timm's
``Mixup(label_smoothing=s)`` targets ``lam * smooth(y) + (1 - lam) * smooth(y')``
(tests/test_augment.py checks it against timm's ``mixup_target``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cutmix_box(rng, lam, height: int, width: int):
  """timm ``rand_bbox``: box of side sqrt(1-lam) * (H, W) centred uniformly, clipped."""
  r_cy, r_cx = jax.random.split(rng)
  cut = jnp.sqrt(1.0 - lam)
  ch = (height * cut).astype(jnp.int32)
  cw = (width * cut).astype(jnp.int32)
  cy = jax.random.randint(r_cy, (), 0, height)
  cx = jax.random.randint(r_cx, (), 0, width)
  y0, y1 = jnp.clip(cy - ch // 2, 0, height), jnp.clip(cy + ch // 2, 0, height)
  x0, x1 = jnp.clip(cx - cw // 2, 0, width), jnp.clip(cx + cw // 2, 0, width)
  return y0, y1, x0, x1


def mix_batch(rng, images, targets, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
              prob: float = 1.0, switch_prob: float = 0.5):
  """Returns mixed ``(images [B,H,W,C], targets [B,K], lam)``."""
  if mixup_alpha < 0.0 or cutmix_alpha < 0.0:
    raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 (0 turns one off), got "
                     f"{mixup_alpha}, {cutmix_alpha}")
  if not (0.0 <= prob <= 1.0 and 0.0 <= switch_prob <= 1.0):
    raise ValueError(f"mixup prob and switch_prob must be in [0, 1], got {prob}, {switch_prob}")
  if mixup_alpha <= 0.0 and cutmix_alpha <= 0.0:
    return images, targets, jnp.ones((), jnp.float32)
  r_apply, r_switch, r_mix, r_cut, r_box = jax.random.split(rng, 5)
  apply = jax.random.uniform(r_apply) < prob
  if mixup_alpha > 0.0 and cutmix_alpha > 0.0:
    use_cutmix = jax.random.uniform(r_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0.0)
  lam_mix = jax.random.beta(r_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.ones(())
  lam_cut = jax.random.beta(r_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.ones(())
  _, h, w, _ = images.shape
  y0, y1, x0, x1 = cutmix_box(r_box, lam_cut, h, w)
  lam_cut = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
  lam = jnp.where(use_cutmix, lam_cut, lam_mix).astype(jnp.float32)
  lam = jnp.where(apply, lam, 1.0)
  other = images[::-1]
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  cut_images = jnp.where(inside[None, :, :, None], other, images)
  mixed = lam.astype(images.dtype) * images + (1.0 - lam).astype(images.dtype) * other
  out = jnp.where(apply & use_cutmix, cut_images, jnp.where(apply, mixed, images))
  out_targets = lam * targets + (1.0 - lam) * targets[::-1]
  return out, out_targets, lam
