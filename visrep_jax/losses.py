"""Classification losses. Each takes logits [B, K] and targets [B, K] (one-hot or mixed) and
returns per-example losses [B]; the trainer averages them over the (masked) batch.

Knowledge distillation (DeiT, facebookresearch/deit ``losses.DistillationLoss``) is in
``DISTILLATION``: per-example losses [B] from the student's and the teacher's logits, whose batch
mean equals the reference's value, combined with the base loss by :func:`combine_distillation`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from visrep_jax.registry import Registry

LOSSES = Registry("loss")
DISTILLATION = Registry("distillation type")
KL_DIVISORS = ("numel", "batch")


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


@DISTILLATION.register("soft")
def soft_distillation(student_logits, teacher_logits, tau: float = 1.0,
                      kl_divisor: str = "numel"):
  """``tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))`` per example.

  ``kl_divisor``: the deit repo sums the KL over the batch and the classes and divides by
  ``student.numel() = B * K`` ('numel', its documented "legacy" choice, issues #61/#116), so the
  per-example value here is the KL divided by K; 'batch' divides the sum by B only (the textbook
  batch mean of the KL, K times larger).
  """
  if kl_divisor not in KL_DIVISORS:
    raise ValueError(f"kl_divisor must be one of {KL_DIVISORS}, got {kl_divisor!r}")
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / tau, axis=-1)
  log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / tau, axis=-1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1) * (tau * tau)
  if kl_divisor == "numel":
    kl = kl / student_logits.shape[-1]
  return kl


@DISTILLATION.register("hard")
def hard_distillation(student_logits, teacher_logits, tau: float = 1.0,
                      kl_divisor: str = "numel"):
  """Cross-entropy of the student against the teacher's argmax (no label smoothing)."""
  del tau, kl_divisor
  labels = jnp.argmax(teacher_logits, axis=-1)
  return optax.softmax_cross_entropy_with_integer_labels(student_logits.astype(jnp.float32),
                                                         labels)


def combine_distillation(base_loss, distill_loss, alpha: float):
  """``(1 - alpha) * base + alpha * distillation`` (deit's DistillationLoss)."""
  return (1.0 - alpha) * base_loss + alpha * distill_loss
