"""Classification losses. Each takes logits [B, K] and targets [B, K] (one-hot or mixed) and
returns per-example losses [B]; the trainer averages them over the (masked) batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from visrep_jax.registry import Registry

LOSSES = Registry("loss")


def smooth_labels(targets, smoothing: float):
  """timm convention: off = s / K, on = 1 - s + s / K."""
  if smoothing <= 0.0:
    return targets
  k = targets.shape[-1]
  return targets * (1.0 - smoothing) + smoothing / k


@LOSSES.register("softmax_xent")
def softmax_xent(logits, targets, label_smoothing: float = 0.0):
  targets = smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


@LOSSES.register("sigmoid_xent")
def sigmoid_xent(logits, targets, label_smoothing: float = 0.0, binarize: bool = True):
  """BCE as in DeiT III / RSB: ``--bce-loss`` binarises mixed targets (``targets > 0``),
  then mean over classes (PyTorch ``BCEWithLogitsLoss`` reduction='mean' over B*K)."""
  if binarize:
    targets = (targets > 0.0).astype(jnp.float32)
  targets = smooth_labels(targets, label_smoothing)
  per_class = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets)
  return per_class.mean(axis=-1)


def topk_correct(logits, labels, k: int):
  """[B] 1.0 where the label is among the top-k logits."""
  k = min(k, logits.shape[-1])
  topk = jax.lax.top_k(logits, k)[1]
  return (topk == labels[:, None]).any(axis=-1).astype(jnp.float32)
