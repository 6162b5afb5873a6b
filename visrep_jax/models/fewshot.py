"""Few-shot episode heads: Prototypical Nets and CrossTransformers (CTX).

Both heads take one padded episode with static shapes, so a single compiled function serves
every Meta-Dataset episode (variable ways, variable shots per class):

  query   [Q, D] or [Q, h, w, D]      support [S, D] or [S, h', w', D]
  support_labels [S] int in [0, num_classes)      support_mask [S] bool (None: all real)
  num_classes: a static Python int (the padded number of ways)

A support entry counts only if its mask is True and its label lies in [0, num_classes); other
entries (padding) may hold anything, inf and NaN included: they are replaced by zeros before
any arithmetic, so they change no value and receive a zero gradient. A class with no real
support image (a padded way) gets the logit ``NO_SUPPORT_LOGIT`` (-1e9), finite on purpose:
-inf would turn softmax cross-entropy's ``0 * log p`` for that class into NaN. Padded queries
are the trainer's business (mask them in the loss). Logits are float32.

* ``PrototypicalHead`` / ``prototypical_logits``: Prototypical Nets as in the paper (spec
  crosstransformers.md §1.2, L165-182) and Meta-Dataset's ``PrototypicalNetworkLearner``:
  prototype = mean of the class's support embeddings (feature maps are global-average-pooled
  first, spec §1.1 "final spatial pooling", L241), logit = -||query - prototype||^2, no scale.

* ``CrossTransformer``: spec §1.3 (L221-311, C.2 L662-678), Eqs. (1)-(3), following the official
  ``CrossTransformerLearner`` (reference_implementations.md §2.1). See the class docstring for
  the ambiguities and what was chosen.

* ``logistic_regression_logits`` (host, NumPy + scikit-learn): the "+LR" variant's test-time
  classifier on globally pooled features (spec §1.4, C.3 L680-697); see its docstring.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

Dtype = Any

# Logit of a class with no real support image; see the module docstring.
NO_SUPPORT_LOGIT = -1e9
# CrossTransformer.remat_impl: how the attention is recomputed in the backward pass.
REMAT_IMPLS = ("fused", "checkpoint")
# CrossTransformer.class_sum_impl: how Eq. (2) sums over each class's support images
# (``_class_sum``; None picks by the backend).
CLASS_SUM_IMPLS = ("segment", "matmul")


def _check_num_classes(num_classes) -> int:
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise TypeError(f"num_classes must be a positive Python int (static under jit: pass it with "
                    f"static_argnames/functools.partial), got {num_classes!r}")
  return num_classes


def support_validity(support_labels, support_mask, num_classes: int, dtype=jnp.float32):
  """(valid [S] bool, one_hot [S, C] with zero rows for padding, has_support [C] bool)."""
  labels = jnp.asarray(support_labels).astype(jnp.int32)
  valid = (labels >= 0) & (labels < num_classes)
  if support_mask is not None:
    valid = valid & jnp.asarray(support_mask).astype(bool)
  one_hot = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes, dtype=dtype)
  one_hot = one_hot * valid[:, None].astype(dtype)
  return valid, one_hot, jnp.sum(one_hot, axis=0) > 0


def _zero_padding(x, valid):
  """Padded entries -> 0 (a select: inf/NaN there neither leak forward nor give NaN grads)."""
  return jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def _compute_dtype(x):
  """float32, or float64 for float64 inputs (tests against float64 references)."""
  return jnp.promote_types(jnp.float32, x.dtype)


def _pool(x):
  """Embeddings [N, D], or feature maps [N, h, w, D] global-average-pooled, in float32+."""
  x = jnp.asarray(x)
  if x.ndim not in (2, 4):
    raise ValueError(f"expected embeddings [N, D] or feature maps [N, h, w, D], got {x.shape}")
  x = x.astype(_compute_dtype(x))
  return jnp.mean(x, axis=(1, 2)) if x.ndim == 4 else x


def prototypes(support_embeddings, support_labels, support_mask, num_classes: int):
  """Masked per-class mean: (prototypes [C, D] float32, has_support [C] bool). Padded entries
  are zeroed after pooling (a NaN anywhere in a padded map stays out).

  A class without support has a zero prototype (Meta-Dataset divides 0 by 0 there)."""
  num_classes = _check_num_classes(num_classes)
  emb = _pool(support_embeddings)
  valid, one_hot, has_support = support_validity(support_labels, support_mask, num_classes,
                                                 emb.dtype)
  emb = _zero_padding(emb, valid)
  sums = jnp.einsum("sc,sd->cd", one_hot, emb, precision=jax.lax.Precision.HIGHEST)
  counts = jnp.sum(one_hot, axis=0)
  return sums / jnp.maximum(counts, 1.0)[:, None], has_support


def prototypical_logits(query_embeddings, support_embeddings, support_labels, support_mask,
                        num_classes: int, no_support_logit: float = NO_SUPPORT_LOGIT):
  """Prototypical Nets logits [Q, C] = -squared Euclidean distance to the class prototypes.

  The difference is formed explicitly (as Meta-Dataset does), not as |q|^2 - 2 q.t + |t|^2,
  which cancels catastrophically for large embeddings."""
  protos, has_support = prototypes(support_embeddings, support_labels, support_mask, num_classes)
  query = _pool(query_embeddings)
  dist = jnp.sum(jnp.square(query[:, None, :] - protos[None, :, :]), axis=-1)
  return jnp.where(has_support[None, :], -dist, jnp.asarray(no_support_logit, dist.dtype))


class PrototypicalHead(nn.Module):
  """Prototypical Nets head (no parameters); see ``prototypical_logits``."""
  no_support_logit: float = NO_SUPPORT_LOGIT

  @nn.compact
  def __call__(self, query_embeddings, support_embeddings, support_labels, support_mask=None,
               num_classes: int = None):
    return prototypical_logits(query_embeddings, support_embeddings, support_labels,
                               support_mask, _check_num_classes(num_classes),
                               self.no_support_logit)


# ------------------------------------------------------------------------- CrossTransformer


def _ctx_block(q, w, k, v, labels, valid, num_classes: int, scale: float,
               no_support_logit: float, precision, class_sum_impl: Optional[str] = None):
  """The CTX forward for a block of queries, in the compute dtype (see ``ctx_attend``).

  Returns (logits [n, C], (e [n, P, S, M], beta [n, P, S]), lse [n, P, C], t [n, P, C, e]):
  the attention weights are ``e * beta[..., None]``; ``lse`` is the log-sum-exp of each class's
  attention logits (0 for a class without support) and ``t`` the aligned prototypes, the two
  statistics the fused backward (``ctx_attend_fused``) keeps instead of the attention."""
  f32 = q.dtype
  labels = jnp.asarray(labels).astype(jnp.int32)
  valid_f = valid.astype(f32)
  one_hot = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes, dtype=f32) * valid_f[:, None]
  has_support = jnp.sum(one_hot, axis=0) > 0

  # Eq. (1): a[n, p, s, m] = q_p . k_sm / tau.
  a = jnp.einsum("npd,smd->npsm", q, k, precision=precision) * jnp.asarray(scale, f32)
  max_img = jax.lax.stop_gradient(jnp.max(a, axis=-1))                          # [n, P, S]
  e = jnp.exp(a - max_img[..., None])                                           # [n, P, S, M]
  z_img = jnp.sum(e, axis=-1)                                                   # [n, P, S]
  # Per-class maximum of the per-image maxima (padding dropped: segment id num_classes).
  seg = jnp.where(valid, labels, num_classes)
  max_cls = jax.ops.segment_max(jnp.moveaxis(max_img, -1, 0), seg, num_segments=num_classes)
  max_cls = jnp.where(has_support, jnp.moveaxis(max_cls, 0, -1), 0.0)           # [n, P, C]
  max_back = jnp.take(max_cls, jnp.where(valid, labels, 0), axis=-1)            # [n, P, S]
  ratio = jnp.where(valid, jnp.exp(jnp.where(valid, max_img - max_back, 0.0)), 0.0)
  ratio = jax.lax.stop_gradient(ratio)                                          # <= 1
  # Small matmuls with the one-hot labels (segment sum / gather): full float32 precision even
  # where the default allows TF32 (GPU), as these are the softmax normalisers.
  exact = jax.lax.Precision.HIGHEST
  z_cls = jnp.einsum("nps,sc->npc", z_img * ratio, one_hot, precision=exact)  # >= 1 if has
  z_cls = jnp.where(has_support, z_cls, 1.0)
  # Normaliser of image s's class, gathered by a matmul (padding: 1, avoiding 0/0).
  z_back = jnp.einsum("npc,sc->nps", z_cls, one_hot, precision=exact) + (1.0 - valid_f)
  beta = ratio / z_back                                                         # [n, P, S]

  # Eq. (2): query-aligned prototypes t[n, p, c] = sum_{s in c, m} softmax(a) v_sm.
  u = jnp.einsum("npsm,sme->npse", e, v, precision=precision)                   # [n, P, S, e]
  t = _class_sum(u * beta[..., None], seg, num_classes, precision,
                 class_sum_impl)                                                # [n, P, C, e]

  # Eq. (3): mean over query positions of the squared Euclidean distance; logits = -d.
  dist = jnp.mean(jnp.sum(jnp.square(w[:, :, None, :] - t), axis=-1), axis=1)   # [n, C]
  logits = jnp.where(has_support[None, :], -dist, jnp.asarray(no_support_logit, f32))
  lse = jax.lax.stop_gradient(max_cls + jnp.log(z_cls))                         # [n, P, C]
  return logits, (e, beta), lse, t


def _class_sum(x, seg, num_classes: int, precision=None, impl: Optional[str] = None):
  """x [n, P, S, e] summed over the support images of each class -> [n, P, C, e]; ``seg`` [S]
  holds each image's class, ``num_classes`` (or any id outside [0, C)) for padding, dropped.

  ``impl`` (default: by the backend when traced, as ``layers.dense_kwargs``):
  * 'segment' (CPU): a segment sum, as the official ``unsorted_segment_sum``: O(S e) per query
    position, where the product with the one-hot labels costs O(S C e), 2.6x the q k^T matmul
    itself when every support image is its own class (SimCLR episodes: C = S = 500 at 14x14).
    ``scripts/benchmark_ctx_memory.py --class_sum`` (one 5-query chunk, 500 support images at
    14x14; 2-core CPU, 2026-11-27): matmul / segment 2.94x at 500 classes (552 vs 188 ms),
    1.08x at 50 (131 vs 121 ms).
  * 'matmul' (GPU, TPU): the product with the one-hot labels, on the matrix units and
    deterministic (a floating-point scatter-add runs with atomics on GPU, in varying order, and
    scatters are slow on TPU). The two agree up to float rounding (tested). On one H200
    (2026-11-27) the segment sum is faster in isolation too (5-query chunk: 0.3 vs 0.6 ms at 50
    classes, 0.7 vs 0.8 ms at 500), but the whole step stays within 1.10x of the plain one
    (README), so determinism wins there by default; ``CrossTransformer.class_sum_impl`` (config
    ``fewshot.class_sum_impl``) picks either, and ``scripts/benchmark_ctx_memory.py
    --class_sum_impl=segment`` times whole steps with it."""
  if impl is None:
    impl = "segment" if jax.default_backend() == "cpu" else "matmul"
  if impl == "segment":
    out = jax.ops.segment_sum(jnp.moveaxis(x, 2, 0), seg, num_segments=num_classes)
    return jnp.moveaxis(out, 0, 2)
  if impl != "matmul":
    raise ValueError(f"_class_sum impl must be 'segment' or 'matmul', got {impl!r}")
  one_hot = jax.nn.one_hot(seg, num_classes, dtype=x.dtype)  # out-of-range ids: zero rows
  return jnp.einsum("npse,sc->npce", x, one_hot, precision=precision)


def _keeps_prototypes(n: int, chunk_size: Optional[int], num_classes: int, value_dim: int,
                      num_support: int, support_positions: int) -> bool:
  """Whether ``ctx_attend_fused`` keeps the aligned prototypes t [n, P, C, e] for the backward
  (saving one matmul there) or recomputes them chunk by chunk: kept only when they take no more
  memory than one chunk's attention [chunk, P, S, M], so that the residuals never dominate the
  peak (500 padded queries of a 500-way SimCLR episode would otherwise keep 23 GiB of t)."""
  chunk = n if chunk_size is None else min(chunk_size, n)
  return n * num_classes * value_dim <= chunk * num_support * support_positions


def ctx_attend(queries, query_values, keys, values, support_labels, valid, num_classes: int,
               scale: float, no_support_logit: float = NO_SUPPORT_LOGIT,
               return_attention: bool = False, precision=None,
               class_sum_impl: Optional[str] = None):
  """CTX distances for a block of queries (pure function: the unit that is chunked/remat'ed).

  queries [n, P, d], query_values [n, P, e], keys [S, M, d], values [S, M, e] (padded support
  entries already zero), support_labels [S], valid [S] bool.
  Returns logits [n, C] float32 (and, with ``return_attention``, attention [n, P, S, M]: for
  each query position and class, the weights over that class's (image, position) pairs sum to
  1; padded images get 0).

  The class-wise softmax of Eq. (1) is computed as in the official ``get_support_set_softmax``
  (per-class max, per-class sum of exponentials), factored through the per-image maximum so
  that nothing of size [n, P, S, C] or [S, M, C, e] is formed: with e = exp(a - max_img),
  u_s = sum_m e_sm v_sm (one batched matmul) and the aligned prototype of class c is
  t_c = sum_{s in c} exp(max_img_s - LSE_c) u_s, LSE_c being the log-sum-exp of the class.
  The shifts (maxima) are stop_gradient'ed: they cancel exactly, so gradients are unchanged.
  ``class_sum_impl``: the class sum of Eq. (2), 'segment' or 'matmul' (``_class_sum``; None:
  by the backend).
  """
  f32 = _compute_dtype(queries)
  logits, (e, beta), _, _ = _ctx_block(
      queries.astype(f32), query_values.astype(f32), keys.astype(f32), values.astype(f32),
      support_labels, valid, num_classes, scale, no_support_logit, precision, class_sum_impl)
  if return_attention:
    return logits, e * beta[..., None]
  return logits


def _split_chunks(x, chunk_size: int):
  """[n, ...] -> [num_chunks, chunk_size, ...], the last chunk zero-padded."""
  n = x.shape[0]
  num_chunks = -(-n // chunk_size)
  x = jnp.pad(x, [(0, num_chunks * chunk_size - n)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape((num_chunks, chunk_size) + x.shape[1:])


def _merge_chunks(x, n: int):
  return x.reshape((-1,) + x.shape[2:])[:n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11, 12))
def ctx_attend_fused(queries, query_values, keys, values, support_labels, valid,
                     num_classes: int, scale: float, no_support_logit: float = NO_SUPPORT_LOGIT,
                     chunk_size: Optional[int] = None, precision=None,
                     keep_prototypes: Optional[bool] = None,
                     class_sum_impl: Optional[str] = None):
  """``ctx_attend``'s logits [n, C] with a hand-written, memory-saving backward pass.

  The forward runs ``chunk_size`` queries at a time and keeps, besides the inputs, only each
  class's log-sum-exp [n, P, C] and, when they take no more memory than one chunk's attention
  (``_keeps_prototypes``), the aligned prototypes t [n, P, C, e] (their size is
  n C e / (chunk S M) of one chunk's attention: 0.65 for 50 queries, 50 ways x 500 support
  images at 14x14, e = 128 and 5-query chunks). The backward recomputes the attention chunk by
  chunk, normalised directly with the saved log-sum-exp, as flash attention does: with dt the
  gradient of the prototypes, D_c = dt_c . t_c and p = softmax, dv = p^T dt, dp = dt v^T,
  da = p (dp - D), dq = da k tau^-1, dk = da^T q tau^-1. With t kept it recomputes one matmul
  (q k^T), otherwise two (q k^T, p v, and the class sum), where jax.checkpoint recomputes the
  whole forward and differentiates it by autodiff; the peak memory is about that of
  jax.checkpoint + chunking (one chunk's attention, x3 in the backward). ``keep_prototypes``
  True / False forces the choice (None: ``_keeps_prototypes``); ``class_sum_impl`` as in
  ``ctx_attend``, for the forward and the recomputed prototypes. Values and gradients
  equal autodiff's up to float rounding (tested, both ways). Reverse mode only: forward-mode
  autodiff (jax.jvp, jacfwd, hessian) of a custom_vjp is an error; use
  remat_impl='checkpoint' for it.
  """
  _check_chunk_size(chunk_size)
  return _ctx_fused_fwd(queries, query_values, keys, values, support_labels, valid,
                        num_classes, scale, no_support_logit, chunk_size, precision,
                        keep_prototypes, class_sum_impl)[0]


def _ctx_fused_fwd(queries, query_values, keys, values, support_labels, valid, num_classes,
                   scale, no_support_logit, chunk_size, precision, keep_prototypes=None,
                   class_sum_impl=None):
  f32 = _compute_dtype(queries)
  q, w = queries.astype(f32), query_values.astype(f32)
  k, v = keys.astype(f32), values.astype(f32)
  n = q.shape[0]

  def block(qw):
    logits, _, lse, t = _ctx_block(qw[0], qw[1], k, v, support_labels, valid, num_classes,
                                   scale, no_support_logit, precision, class_sum_impl)
    return logits, lse, t

  keep_t = keep_prototypes
  if keep_t is None:
    keep_t = _keeps_prototypes(n, chunk_size, num_classes, v.shape[-1], k.shape[0], k.shape[1])
  if not keep_t:
    block = (lambda f: lambda qw: f(qw)[:2])(block)
  if chunk_size is None or chunk_size >= n:
    out = block((q, w))
  else:
    out = jax.lax.map(block, (_split_chunks(q, chunk_size), _split_chunks(w, chunk_size)))
    out = tuple(_merge_chunks(o, n) for o in out)
  logits, lse = out[:2]
  t = out[2] if keep_t else None
  residuals = (queries, query_values, keys, values, support_labels, valid, lse, t)
  return logits, residuals


def _ctx_fused_bwd(num_classes, scale, no_support_logit, chunk_size, precision, keep_prototypes,
                   class_sum_impl, residuals, g):
  queries, query_values, keys, values, support_labels, valid, lse, t = residuals
  f32 = lse.dtype
  q, w = queries.astype(f32), query_values.astype(f32)
  k, v = keys.astype(f32), values.astype(f32)
  n, positions = q.shape[0], q.shape[1]
  labels = jnp.where(valid, jnp.asarray(support_labels).astype(jnp.int32), 0)
  has_support = jnp.any((labels[:, None] == jnp.arange(num_classes)) & valid[:, None], axis=0)
  # A class without support has a constant logit: no gradient flows from it.
  g = jnp.where(has_support[None, :], g.astype(f32), 0.0)
  scale = jnp.asarray(scale, f32)
  mask = valid[None, None, :, None]

  seg = jnp.where(valid, labels, num_classes)

  def block(carry, xs):
    dk, dv = carry
    qc, wc, lse_c, g_c = xs[:4]
    a = jnp.einsum("npd,smd->npsm", qc, k, precision=precision) * scale
    lse_s = jnp.take(lse_c, labels, axis=-1)                                    # [n, P, S]
    p = jnp.where(mask, jnp.exp(a - lse_s[..., None]), 0.0)                      # softmax
    if t is None:  # recompute this chunk's aligned prototypes (see _keeps_prototypes)
      t_c = _class_sum(jnp.einsum("npsm,sme->npse", p, v, precision=precision), seg,
                       num_classes, precision, class_sum_impl)
    else:
      t_c = xs[4]
    # logits = -mean_p sum_e (w - t)^2 (classes with support).
    dt = (2.0 / positions) * g_c[:, None, :, None] * (wc[:, :, None, :] - t_c)   # [n, P, C, e]
    dw = -jnp.sum(dt, axis=2)
    d_cls = jnp.sum(dt * t_c, axis=-1)                                           # [n, P, C]
    dt_s = jnp.take(dt, labels, axis=2)                                          # [n, P, S, e]
    dp = jnp.einsum("npse,sme->npsm", dt_s, v, precision=precision)
    da = p * (dp - jnp.take(d_cls, labels, axis=-1)[..., None])
    dv = dv + jnp.einsum("npsm,npse->sme", p, dt_s, precision=precision)
    dq = jnp.einsum("npsm,smd->npd", da, k, precision=precision) * scale
    dk = dk + jnp.einsum("npsm,npd->smd", da, qc, precision=precision) * scale
    return (dk, dv), (dq, dw)

  zeros = (jnp.zeros_like(k), jnp.zeros_like(v))
  per_query = (q, w, lse, g) + (() if t is None else (t,))
  if chunk_size is None or chunk_size >= n:
    (dk, dv), (dq, dw) = block(zeros, per_query)
  else:
    xs = tuple(_split_chunks(x, chunk_size) for x in per_query)
    (dk, dv), (dq, dw) = jax.lax.scan(block, zeros, xs)
    dq, dw = _merge_chunks(dq, n), _merge_chunks(dw, n)
  return (dq.astype(queries.dtype), dw.astype(query_values.dtype), dk.astype(keys.dtype),
          dv.astype(values.dtype), None, None)


ctx_attend_fused.defvjp(_ctx_fused_fwd, _ctx_fused_bwd)


def _check_chunk_size(chunk_size):
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f"query_chunk_size must be >= 1 or None, got {chunk_size}")


def _map_query_chunks(fn, chunk_size: Optional[int], *xs):
  """fn over the leading (query) axis in chunks of ``chunk_size`` with lax.map; the last chunk
  is zero-padded and the padding dropped."""
  _check_chunk_size(chunk_size)
  n = xs[0].shape[0]
  if chunk_size is None or chunk_size >= n:
    return fn(*xs)
  out = jax.lax.map(lambda args: fn(*args), tuple(_split_chunks(x, chunk_size) for x in xs))
  return jax.tree_util.tree_map(lambda o: _merge_chunks(o, n), out)


class CrossTransformer(nn.Module):
  """CrossTransformer head (Doersch et al. 2020): query-aligned prototypes from attention over
  all positions of all support images of each class; logits = -mean_p ||w_p - t^c_p||^2.

  ``apply(variables, query_features [Q,h,w,D], support_features [S,h',w',D], support_labels [S],
  support_mask [S], num_classes, return_attention=False)`` -> logits [Q, num_classes] float32
  (and attention [Q, h*w, S, h'*w'] float32 with ``return_attention``; see ``ctx_attend``).

  Variables: ``params/tformer_keys/kernel`` [D, key_dim] (the shared query/key head Gamma = Omega)
  and ``params/tformer_values/kernel`` [D, value_dim] (Lambda, shared by support and query); the
  names are the official scopes. The official heads are 1x1 convs: kernel[0, 0] of theirs.

  Memory (spec §6 L665-668: the attention maps hold all query-support position pairs, ~38 GB in
  fp32 for 500 queries x 500 support images at 14x14): ``query_chunk_size`` runs the attention
  for that many queries at a time, so the forward's peak scales with the chunk; ``remat``
  recomputes the attention in the backward instead of storing it. Training needs both (chunking
  alone still stores every chunk's attention for the backward; remat alone still forms the
  whole tensor once in the backward); the official learner does the equivalent with one query
  per step (``rematerialize=True``). ``remat_impl``: 'fused' (default) is ``ctx_attend_fused``,
  a hand-written backward that keeps only the class log-sum-exps (and the aligned prototypes
  when they fit in one chunk's attention) and recomputes q k^T (and p v otherwise), chunk by
  chunk; 'checkpoint' wraps each chunk's attention in jax.checkpoint, whose backward re-runs
  the whole attention forward. scripts/benchmark_ctx_memory.py, XLA CPU, 50-way / 500 support /
  50 queries at 14x14x512, temporary memory of the train step: plain 20.2 GiB, chunk 5 8.1,
  fused remat + chunk 5 2.5 (8.1x less), checkpoint remat + chunk 5 2.2 (9.1x); 500 queries:
  plain 201 GiB, fused + chunk 5 2.06 (2.09 with 500 SimCLR ways), checkpoint + chunk 5 2.34.
  Step time (CPU, 10 of those queries): fused remat + chunk 5 0.85x plain, checkpoint remat +
  chunk 5 0.94x; without chunks fused 0.94x, checkpoint 1.16x. On one H200 (50 queries, README):
  plain 12.4 GiB and 30.5 ms; fused remat + chunk 5 2.1 GiB (5.9x less) and 1.10x the step
  time; checkpoint + chunk 5 1.6 GiB and 1.49x; fused remat without chunks 16.9 GiB, more than
  plain. So set ``query_chunk_size`` whenever ``remat`` is on. ``class_sum_impl`` picks Eq. (2)'s
  class sum (``_class_sum``: 'segment' or 'matmul'; None: segment on CPU, matmul elsewhere).
  None of these options changes a value or a gradient (up to float rounding of reordered sums;
  'segment' on GPU adds in a varying order).

  Ambiguities (spec crosstransformers.md §1.3 and §8) and the choices made:
  * "normalized keys and queries" (L246-247, §8.1) vs. Eq. (1)'s division by tau = sqrt(d_k):
    default ``key_query_norm=None`` follows Eq. (1) literally and the official ``_attend``
    (logits * rsqrt(d)); ``key_query_norm='l2'`` L2-normalises keys and queries first
    (reading (b)), with ``temperature`` (default sqrt(key_dim)) replacing tau if given.
  * Bias of the heads (§1.3 "NOT STATED", §8.2): none by default (``use_bias=False``), as the
    official ``functional_backbones.conv`` and lucidrains' ``bias=False``; it also keeps the
    "distance -> 0 for identical images" argument of L302-304 exact.
  * Initialisation (§8.2): truncated normal, stddev 0.1, cut at 2 sigma (``init_std=0.1``), the
    official ``weight_variable`` used for ``tformer_keys``/``tformer_values``;
    ``init_std=None`` gives PyTorch's Conv2d default (lucidrains).
  * Normalisation of features / LayerNorm: none. The heads are linear "with no
    non-linearities" (L665) on the raw backbone map; LayerNorm appears in the paper only in the
    App. B nearest-neighbour backbone (L576-577), not in the head.
  * Weight sharing: one Dense gives support keys and query queries (Gamma = Omega, L305); one
    Dense gives support values and query values (shared Lambda, L301); d_k = d_v = 128 (L664).
  * Softmax domain: jointly over all images and positions of the class (L247, Eq. 1), per query
    position and class: the official segment-softmax, so shots may differ per class.
  * Distance: sum over channels, mean over the h*w query positions (Eq. 3, L276-290; official
    ``reduce_sum(...) / (Hq*Wq)``); logits = -distance with no temperature (L277-278).
  * Attention arithmetic is float32 whatever ``dtype`` (the heads' compute dtype) is (float64
    if the heads output float64).
  """
  key_dim: int = 128
  value_dim: int = 128
  use_bias: bool = False
  init_std: Optional[float] = 0.1
  key_query_norm: Optional[str] = None   # None (Eq. 1) or 'l2'
  temperature: Optional[float] = None    # None: sqrt(key_dim)
  remat: bool = False
  remat_impl: str = "fused"              # 'fused' (ctx_attend_fused) or 'checkpoint'
  query_chunk_size: Optional[int] = None
  keep_prototypes: Optional[bool] = None  # fused remat: None = when they fit in one chunk
  class_sum_impl: Optional[str] = None   # Eq. (2)'s class sum: 'segment' | 'matmul' | None (auto)
  no_support_logit: float = NO_SUPPORT_LOGIT
  precision: Any = None
  dtype: Dtype = jnp.float32

  def _dense(self, dim, name):
    if self.init_std is None:
      init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")  # torch default
    else:
      init = nn.initializers.truncated_normal(self.init_std)  # TF truncated_normal: +-2 sigma
    return nn.Dense(dim, use_bias=self.use_bias, dtype=self.dtype, kernel_init=init,
                    bias_init=nn.initializers.zeros, name=name)

  @nn.compact
  def __call__(self, query_features, support_features, support_labels, support_mask=None,
               num_classes: int = None, return_attention: bool = False):
    num_classes = _check_num_classes(num_classes)
    if query_features.ndim != 4 or support_features.ndim != 4:
      raise ValueError(f"CrossTransformer takes feature maps [N, h, w, D]; got query "
                       f"{query_features.shape}, support {support_features.shape}")
    if query_features.shape[-1] != support_features.shape[-1]:
      raise ValueError(f"query and support channels differ: {query_features.shape} vs "
                       f"{support_features.shape}")
    if self.key_query_norm not in (None, "l2"):
      raise ValueError(f"key_query_norm must be None or 'l2', got {self.key_query_norm!r}")
    if self.remat_impl not in REMAT_IMPLS:
      raise ValueError(f"remat_impl must be one of {', '.join(REMAT_IMPLS)}, got "
                       f"{self.remat_impl!r}")
    _check_chunk_size(self.query_chunk_size)
    if self.class_sum_impl not in CLASS_SUM_IMPLS + (None,):
      raise ValueError(f"class_sum_impl must be one of {', '.join(CLASS_SUM_IMPLS)} or None, "
                       f"got {self.class_sum_impl!r}")
    valid, _, _ = support_validity(support_labels, support_mask, num_classes)
    support_features = _zero_padding(support_features, valid)

    n_q, n_s, dim = query_features.shape[0], support_features.shape[0], query_features.shape[-1]
    query = query_features.reshape(n_q, -1, dim)
    support = support_features.reshape(n_s, -1, dim)
    key_head = self._dense(self.key_dim, "tformer_keys")
    value_head = self._dense(self.value_dim, "tformer_values")
    keys, queries = key_head(support), key_head(query)
    values, query_values = value_head(support), value_head(query)

    if self.key_query_norm == "l2":
      def l2(x):
        x = x.astype(_compute_dtype(x))
        return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))
      keys, queries = l2(keys), l2(queries)
    tau = self.temperature if self.temperature is not None else math.sqrt(self.key_dim)

    if self.remat and self.remat_impl == "fused" and not return_attention:
      return ctx_attend_fused(queries, query_values, keys, values, support_labels, valid,
                              num_classes, 1.0 / tau, self.no_support_logit,
                              self.query_chunk_size, self.precision, self.keep_prototypes,
                              self.class_sum_impl)
    fn = functools.partial(ctx_attend, keys=keys, values=values, support_labels=support_labels,
                           valid=valid, num_classes=num_classes, scale=1.0 / tau,
                           no_support_logit=self.no_support_logit,
                           return_attention=return_attention, precision=self.precision,
                           class_sum_impl=self.class_sum_impl)
    chunked = self.query_chunk_size is not None and self.query_chunk_size < n_q
    if self.remat:
      # Inside lax.map the loop already keeps XLA from merging recomputation into the forward.
      fn = jax.checkpoint(fn, prevent_cse=not chunked)
    return _map_query_chunks(lambda q, w: fn(q, w), self.query_chunk_size, queries, query_values)


# ------------------------------------------------------------- global feature + LR (host side)


def logistic_regression_logits(support_features, support_labels, support_mask, query_features,
                               query_mask, num_classes: int, C: float = 10.0,
                               max_iter: int = 1000):
  """The "+LR" variant's logits [Q, num_classes] float64 for one episode (host, NumPy).

  Features are global-average-pooled (a map [N, h, w, D] is averaged; [N, D] is used as is) and
  l2-normalised; scikit-learn's ``LogisticRegression(C=C)`` is fitted on the real support
  entries (mask True, label in [0, num_classes)) and applied to the real queries (spec §1.4:
  "sklearn's implementation with a multinomial loss C=10, applied to l2-normalized features",
  the settings of Tian et al. [77]). Padded entries are never read: they may hold anything.

  Choices where the paper is silent (spec §8.11):
  * solver 'lbfgs' and ``max_iter=1000``, Tian et al.'s code (scikit-learn fits the multinomial
    loss for >= 3 classes; a 2-way episode gets its binary loss, the only one it offers);
  * "logits" are the log-probabilities ``predict_log_proba``. They differ from
    ``decision_function`` by a per-query constant (the log-partition), so
    argmax(head + lambda * LR) is the same either way; log-probabilities also exist for 2-way
    episodes, where ``decision_function`` has one column.
  Classes without real support get ``NO_SUPPORT_LOGIT``; rows of padded queries are 0 in the
  other columns. With a single support class every real query gets log-probability 0 for it
  (nothing to fit).
  """
  num_classes = _check_num_classes(num_classes)

  def pooled(x):
    x = np.asarray(x, np.float64)
    if x.ndim not in (2, 4):
      raise ValueError(f"expected embeddings [N, D] or feature maps [N, h, w, D], got {x.shape}")
    return x.mean(axis=(1, 2)) if x.ndim == 4 else x

  labels = np.asarray(support_labels).astype(np.int64)
  valid = (labels >= 0) & (labels < num_classes) & np.asarray(support_mask, bool)
  query = pooled(query_features)
  q_real = np.asarray(query_mask, bool)
  out = np.zeros((query.shape[0], num_classes), np.float64)
  classes = np.unique(labels[valid])
  out[:, np.setdiff1d(np.arange(num_classes), classes)] = NO_SUPPORT_LOGIT
  if classes.size < 2 or not q_real.any():
    return out
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import normalize  # l2, rows of norm 0 left as they are
  clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter)
  clf.fit(normalize(pooled(support_features)[valid]), labels[valid])
  rows = np.flatnonzero(q_real)
  out[np.ix_(rows, clf.classes_)] = clf.predict_log_proba(normalize(query[rows]))
  return out
