"""Few-shot heads (visrep_jax/models/fewshot.py): ProtoNet and CrossTransformer against float64
NumPy references written as plain loops; padding, support-order invariance, variable shots,
remat/chunking (values and gradients), one compilation for every episode of a padded shape."""

import functools
import importlib.util
import io
import os
import re
import contextlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import REPO
from visrep_jax.models import fewshot

NO_SUPPORT = fewshot.NO_SUPPORT_LOGIT
NUM_CLASSES = 4  # class 3 has no support (a padded way)
# Variable shots (2, 3, 2, 0) plus 2 padded entries (mask False) with in-range/out-of-range labels.
LABELS = np.array([0, 1, 1, 2, 1, 0, 2, 3, 7])
MASK = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0], bool)


def _episode(seed=0, num_query=3, q_hw=(2, 2), s_hw=(2, 3), dim=5, dtype=np.float32):
  r = np.random.RandomState(seed)
  query = r.randn(num_query, *q_hw, dim).astype(dtype)
  support = r.randn(len(LABELS), *s_hw, dim).astype(dtype)
  return query, support


def _ctx(**kw):
  kw.setdefault("key_dim", 8)
  kw.setdefault("value_dim", 6)
  return fewshot.CrossTransformer(**kw)


def _init(model, query, support, labels=LABELS, mask=MASK, num_classes=NUM_CLASSES):
  return model.init(jax.random.PRNGKey(0), jnp.asarray(query), jnp.asarray(support), labels, mask,
                    num_classes)


def ctx_reference(params, query, support, labels, mask, num_classes, tau=None, l2=False):
  """Eqs. (1)-(3) in float64 with explicit loops over classes, queries, query positions and the
  support images of the class. Returns (logits [Q, C], attention [Q, P, S, M])."""
  wk = np.asarray(params["tformer_keys"]["kernel"], np.float64)
  wv = np.asarray(params["tformer_values"]["kernel"], np.float64)
  tau = np.sqrt(wk.shape[1]) if tau is None else tau
  query, support = np.asarray(query, np.float64), np.asarray(support, np.float64)
  num_q, dim = query.shape[0], query.shape[-1]
  positions, support_positions = query[0, ..., 0].size, support[0, ..., 0].size
  logits = np.full((num_q, num_classes), NO_SUPPORT)
  attention = np.zeros((num_q, positions, len(labels), support_positions))

  def norm(x):
    return x / np.linalg.norm(x) if l2 else x

  for c in range(num_classes):
    members = [j for j in range(len(labels)) if mask[j] and labels[j] == c]
    if not members:
      continue
    for i in range(num_q):
      x = query[i].reshape(positions, dim)
      dist = 0.0
      for p in range(positions):
        q, w = norm(x[p] @ wk), x[p] @ wv
        scores, values, where = [], [], []
        for j in members:
          f = support[j].reshape(support_positions, dim)
          for m in range(support_positions):
            scores.append(norm(f[m] @ wk) @ q / tau)
            values.append(f[m] @ wv)
            where.append((j, m))
        scores = np.array(scores)
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        prototype = np.sum(weights[:, None] * np.array(values), axis=0)
        dist += np.sum((w - prototype) ** 2)
        for (j, m), a in zip(where, weights):
          attention[i, p, j, m] = a
      logits[i, c] = -dist / positions
  return logits, attention


def protonet_reference(query, support, labels, mask, num_classes):
  query, support = np.asarray(query, np.float64), np.asarray(support, np.float64)
  if query.ndim == 4:
    query = query.mean(axis=(1, 2))
  logits = np.full((len(query), num_classes), NO_SUPPORT)
  for c in range(num_classes):
    members = [j for j in range(len(labels)) if mask[j] and labels[j] == c]
    if not members:
      continue
    feats = [support[j].mean(axis=(0, 1)) if support.ndim == 4 else support[j] for j in members]
    proto = np.mean(feats, axis=0)
    for i in range(len(query)):
      logits[i, c] = -np.sum((query[i] - proto) ** 2)
  return logits


# --------------------------------------------------------------------------- CrossTransformer


def test_ctx_matches_float64_loop_reference_with_variable_shots():
  query, support = _episode(dtype=np.float64)
  with jax.enable_x64(True):
    model = _ctx(dtype=jnp.float64)
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64),
                                    _init(model, query, support))["params"]
    logits, attention = model.apply({"params": params}, jnp.asarray(query), jnp.asarray(support),
                                    LABELS, MASK, NUM_CLASSES, return_attention=True)
    assert logits.dtype == jnp.float64
    logits, attention = np.asarray(logits), np.asarray(attention)
  ref_logits, ref_attention = ctx_reference(params, query, support, LABELS, MASK, NUM_CLASSES)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(attention, ref_attention, rtol=1e-12, atol=1e-14)
  assert np.all(logits[:, 3] == NO_SUPPORT)


def test_ctx_float32_matches_reference_and_attention_sums_to_one_per_class():
  query, support = _episode()
  model = _ctx()
  variables = _init(model, query, support)
  logits, attention = model.apply(variables, query, support, LABELS, MASK, NUM_CLASSES,
                                  return_attention=True)
  assert logits.shape == (3, NUM_CLASSES) and logits.dtype == jnp.float32
  assert attention.shape == (3, 4, len(LABELS), 6) and attention.dtype == jnp.float32
  ref_logits, ref_attention = ctx_reference(variables["params"], query, support, LABELS, MASK,
                                            NUM_CLASSES)
  np.testing.assert_allclose(logits, ref_logits, rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(attention, ref_attention, atol=1e-6)
  per_image = np.asarray(attention).sum(-1)  # [Q, P, S]
  for c in range(3):
    np.testing.assert_allclose(per_image[..., (LABELS == c) & MASK].sum(-1), 1.0, atol=1e-6)
  assert np.all(per_image[..., ~MASK] == 0)


def test_ctx_l2_normalised_keys_and_temperature_option():
  query, support = _episode(seed=1)
  model = _ctx(key_query_norm="l2", temperature=0.1)
  variables = _init(model, query, support)
  logits = model.apply(variables, query, support, LABELS, MASK, NUM_CLASSES)
  ref, _ = ctx_reference(variables["params"], query, support, LABELS, MASK, NUM_CLASSES,
                         tau=0.1, l2=True)
  np.testing.assert_allclose(logits, ref, rtol=2e-5, atol=1e-5)
  default = _ctx().apply(variables, query, support, LABELS, MASK, NUM_CLASSES)
  assert not np.allclose(default, logits, atol=1e-3)  # the option does something


def test_ctx_heads_are_shared_and_bias_free():
  query, support = _episode()
  variables = _init(fewshot.CrossTransformer(), query, support)
  shapes = jax.tree_util.tree_map(jnp.shape, variables)
  assert shapes == {"params": {"tformer_keys": {"kernel": (5, 128)},
                               "tformer_values": {"kernel": (5, 128)}}}
  # Official init: truncated normal, stddev 0.1, cut at 2 sigma.
  kernel = np.asarray(_init(fewshot.CrossTransformer(), np.zeros((2, 4, 4, 256), np.float32),
                            np.zeros((9, 4, 4, 256), np.float32))["params"]["tformer_keys"]["kernel"])
  assert np.abs(kernel).max() <= 0.2 and 0.08 < kernel.std() < 0.095


def test_ctx_identical_image_has_zero_distance():
  """Shared value head (L301-304): a support image equal to the query, constant over positions,
  gives a prototype equal to the query value whatever the attention: distance exactly 0."""
  r = np.random.RandomState(3)
  x = r.randn(5).astype(np.float32)
  query = np.broadcast_to(x, (1, 2, 2, 5)).copy()
  support = r.randn(3, 2, 2, 5).astype(np.float32)
  support[1] = x
  labels, mask = np.array([0, 1, 0]), np.ones(3, bool)
  model = _ctx()
  logits = model.apply(_init(model, query, support, labels, mask, 2), query, support, labels, mask,
                       2)
  assert abs(float(logits[0, 1])) < 1e-6 and float(logits[0, 0]) < -1e-2


def test_ctx_invariant_to_support_order():
  query, support = _episode(seed=2)
  model = _ctx()
  variables = _init(model, query, support)
  perm = np.random.RandomState(0).permutation(len(LABELS))
  a = model.apply(variables, query, support, LABELS, MASK, NUM_CLASSES)
  b = model.apply(variables, query, support[perm], LABELS[perm], MASK[perm], NUM_CLASSES)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # Relabelling is not a permutation of the support set: it must change the logits.
  c = model.apply(variables, query, support, np.roll(LABELS, 1), MASK, NUM_CLASSES)
  assert not np.allclose(a, c, atol=1e-3)


def _loss(model, params, query, support, labels, mask, query_labels):
  logits = model.apply({"params": params}, query, support, labels, mask, NUM_CLASSES)
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, query_labels[:, None], axis=1))


def test_ctx_padded_support_entries_change_nothing():
  query, support = _episode(seed=4)
  model = _ctx()
  params = _init(model, query, support)["params"]
  query_labels = jnp.array([0, 2, 1])
  real = MASK.copy()
  # Same episode with 4 more padded entries holding huge, infinite and NaN features, and labels
  # in range, out of range or negative; one has mask True but label -1 (also padding).
  junk = np.stack([np.full(support.shape[1:], v, np.float32) for v in (1e30, -np.inf, np.nan, 3.0)])
  support_p = np.concatenate([support, junk])
  labels_p = np.concatenate([LABELS, [0, 1, 99, -1]])
  mask_p = np.concatenate([MASK, [False, False, False, True]])
  grad = jax.value_and_grad(functools.partial(_loss, model), argnums=(0, 1, 2))
  l0, (gp0, gq0, gs0) = grad(params, query, support, LABELS, real, query_labels)
  l1, (gp1, gq1, gs1) = grad(params, query, support_p, labels_p, mask_p, query_labels)
  assert np.isfinite(l1)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  np.testing.assert_allclose(
      model.apply({"params": params}, query, support_p, labels_p, mask_p, NUM_CLASSES),
      model.apply({"params": params}, query, support, LABELS, real, NUM_CLASSES), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(gp1), jax.tree_util.tree_leaves(gp0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(gq1, gq0, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(gs1[:len(LABELS)], gs0, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(gs1[len(LABELS):]) == 0)
  assert np.all(np.asarray(gs0[~MASK]) == 0)


def test_ctx_class_without_support_gets_no_support_logit_and_finite_gradient():
  query, support = _episode(seed=5)
  model = _ctx()
  params = _init(model, query, support)["params"]
  logits = model.apply({"params": params}, query, support, LABELS, MASK, NUM_CLASSES)
  assert np.all(logits[:, 3] == NO_SUPPORT) and np.all(logits[:, :3] > NO_SUPPORT / 2)
  grads = jax.grad(functools.partial(_loss, model), argnums=(0, 1, 2))(
      params, query, support, LABELS, MASK, jnp.array([0, 1, 2]))
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("remat,impl,chunk", [
    (True, "fused", None), (True, "fused", 2), (True, "fused", 1), (False, "fused", 2),
    (True, "checkpoint", None), (True, "checkpoint", 2), (True, "checkpoint", 1)])
def test_ctx_remat_and_chunking_change_no_value_and_no_gradient(remat, impl, chunk):
  query, support = _episode(seed=6, num_query=5)  # 5 queries: chunk 2 needs a padded chunk
  plain = _ctx()
  params = _init(plain, query, support)["params"]
  query_labels = jnp.array([0, 2, 1, 1, 0])
  model = _ctx(remat=remat, remat_impl=impl, query_chunk_size=chunk)
  args = (params, jnp.asarray(query), jnp.asarray(support), LABELS, MASK, query_labels)

  def value_and_grads(m):
    fn = jax.value_and_grad(functools.partial(_loss, m), argnums=(0, 1, 2))
    return jax.jit(fn)(*args), jax.make_jaxpr(fn)(*args)

  (l0, g0), _ = value_and_grads(plain)
  (l1, g1), jaxpr = value_and_grads(model)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  np.testing.assert_allclose(model.apply({"params": params}, query, support, LABELS, MASK,
                                         NUM_CLASSES),
                             plain.apply({"params": params}, query, support, LABELS, MASK,
                                         NUM_CLASSES), rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # The options are really in the computation.
  text = str(jaxpr)
  forward = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, query, support, LABELS, MASK,
                                                     NUM_CLASSES))(params))
  assert ("custom_vjp_call" in forward) == (remat and impl == "fused")
  assert (("remat" in text) or ("checkpoint" in text)) == (remat and impl == "checkpoint")
  assert ("scan" in text) == (chunk is not None)


def test_class_sum_segment_and_matmul_agree_and_drop_padding():
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(2, 3, 6, 4), jnp.float32)
  seg = jnp.asarray([2, 0, 2, 4, 1, -1])  # 4 (= C) and -1: padding
  ref = np.zeros((2, 3, 4, 4), np.float32)
  for s_, c in enumerate(np.asarray(seg)):
    if 0 <= c < 4:
      ref[:, :, c] += np.asarray(x)[:, :, s_]
  for impl in ("segment", "matmul"):
    np.testing.assert_allclose(fewshot._class_sum(x, seg, 4, impl=impl), ref, rtol=1e-6,
                               atol=1e-6)
  assert np.all(np.asarray(fewshot._class_sum(x, seg, 4))[:, :, 3] == 0)  # class 3: no image
  with pytest.raises(ValueError, match="segment' or 'matmul"):
    fewshot._class_sum(x, seg, 4, impl="scatter")


@pytest.mark.parametrize("impl", ["segment", "matmul"])
def test_ctx_class_sum_impl_changes_no_value_and_no_gradient(impl):
  # CrossTransformer.class_sum_impl, plain and fused (prototypes recomputed in the backward,
  # 2-query chunks), against the backend's default in float64; the option reaches the forward.
  with jax.enable_x64(True):
    query, support = _episode(seed=12, num_query=5, dtype=np.float64)
    plain = _ctx(dtype=jnp.float64)
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64),
                                    _init(plain, query, support)["params"])
    args = (params, jnp.asarray(query), jnp.asarray(support))

    def objective(model, params, query, support):
      logits = model.apply({"params": params}, query, support, LABELS, MASK, NUM_CLASSES)
      return jnp.sum(jnp.where(logits > NO_SUPPORT / 2, logits, 0.0) ** 2)

    v0, g0 = jax.value_and_grad(functools.partial(objective, plain), argnums=(0, 1, 2))(*args)
    for model in (_ctx(dtype=jnp.float64, class_sum_impl=impl),
                  _ctx(dtype=jnp.float64, class_sum_impl=impl, remat=True, query_chunk_size=2,
                       keep_prototypes=False)):
      v1, g1 = jax.value_and_grad(functools.partial(objective, model), argnums=(0, 1, 2))(*args)
      np.testing.assert_allclose(v1, v0, rtol=1e-13)
      for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
      forward = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, *args[1:], LABELS, MASK,
                                                         NUM_CLASSES))(params))
      assert ("scatter-add" in forward) == (impl == "segment"), impl
      if impl == "matmul":  # nor in the fused backward's recomputed prototypes
        backward = str(jax.make_jaxpr(jax.grad(functools.partial(objective, model)))(*args))
        assert "scatter-add" not in backward
  with pytest.raises(ValueError, match="class_sum_impl must be one of segment, matmul or None"):
    _init(_ctx(class_sum_impl="scatter"), query.astype(np.float32), support.astype(np.float32))


def test_ctx_fused_keeps_prototypes_only_when_they_fit_in_one_chunk():
  # (queries, chunk, ways, value dim, support images, support positions): the training episode
  # of the benchmark (50 queries, 50 ways, 500 support, 14x14, 5-query chunks) keeps them;
  # 500 padded queries (Meta-Dataset's bound) or 500 SimCLR ways recompute them.
  assert fewshot._keeps_prototypes(50, 5, 50, 128, 500, 196)
  assert not fewshot._keeps_prototypes(500, 5, 50, 128, 500, 196)
  assert not fewshot._keeps_prototypes(500, 5, 500, 128, 500, 196)
  assert fewshot._keeps_prototypes(500, None, 500, 128, 500, 196)  # no chunks: all of a
  assert not fewshot._keeps_prototypes(10, None, 500, 128, 500, 49)  # 7x7: e > M


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("chunk", [None, 1, 2, 3])
def test_ctx_fused_backward_equals_autodiff_in_float64(chunk, keep):
  # Variable shots (2, 3, 2), a class without support, padded entries holding NaN and an
  # out-of-range label, 5 queries (padded last chunk for 2 and 3); every input's gradient;
  # the aligned prototypes kept for the backward or recomputed there.
  with jax.enable_x64(True):
    query, support = _episode(seed=11, num_query=5, dtype=np.float64)
    support[~MASK] = np.nan
    plain = _ctx(dtype=jnp.float64)
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64),
                                    _init(plain, query, support)["params"])
    # Weighted logits (not just a cross-entropy) so every class column gets its own gradient.
    weights = jnp.asarray(np.random.RandomState(1).randn(5, NUM_CLASSES))

    def objective(model, params, query, support):
      logits = model.apply({"params": params}, query, support, LABELS, MASK, NUM_CLASSES)
      return jnp.sum(weights * jnp.where(logits > NO_SUPPORT / 2, logits, 0.0))

    fused = _ctx(dtype=jnp.float64, remat=True, query_chunk_size=chunk, keep_prototypes=keep)
    args = (params, jnp.asarray(query), jnp.asarray(support))
    v0, g0 = jax.value_and_grad(functools.partial(objective, plain), argnums=(0, 1, 2))(*args)
    v1, g1 = jax.value_and_grad(functools.partial(objective, fused), argnums=(0, 1, 2))(*args)
    np.testing.assert_allclose(v1, v0, rtol=1e-13)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
      assert np.all(np.isfinite(a))
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert np.all(np.asarray(g1[2])[~MASK] == 0)  # padded support: zero gradient
    assert np.any(np.abs(np.asarray(g1[2])[MASK]) > 1e-3)
    # The residuals hold the prototypes [Q, P, C, e] exactly when they are kept.
    f = jnp.asarray
    _, res = fewshot._ctx_fused_fwd(f(query[:, :2, 0, :3]), f(query[:, :2, 0, :2]),
                                    f(support[:, :3, 0, :3]), f(support[:, :3, 0, :2]), LABELS,
                                    f(MASK), NUM_CLASSES, 0.5, NO_SUPPORT, chunk, None, keep)
    assert (res[-1] is not None) == keep
    if keep:
      assert res[-1].shape == (5, 2, NUM_CLASSES, 2)


def test_ctx_fused_backward_keeps_input_dtypes_and_checks_its_options():
  query, support = _episode(seed=12, num_query=4)
  bf = dict(dtype=jnp.bfloat16)
  plain, fused = _ctx(**bf), _ctx(remat=True, query_chunk_size=3, **bf)
  params = _init(plain, query, support)["params"]
  q16, s16 = jnp.asarray(query, jnp.bfloat16), jnp.asarray(support, jnp.bfloat16)
  labels = jnp.array([0, 1, 2, 0])
  g0 = jax.grad(functools.partial(_loss, plain), argnums=(1, 2))(params, q16, s16, LABELS, MASK,
                                                                labels)
  g1 = jax.grad(functools.partial(_loss, fused), argnums=(1, 2))(params, q16, s16, LABELS, MASK,
                                                                labels)
  for a, b in zip(g1, g0):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=0.05, atol=0.02 * float(np.max(np.abs(np.asarray(b, np.float32)))))
  with pytest.raises(ValueError, match="remat_impl must be one of fused, checkpoint"):
    _ctx(remat=True, remat_impl="flash").apply({"params": params}, query, support, LABELS, MASK,
                                               NUM_CLASSES)


def test_ctx_chunked_attention_maps_and_bfloat16_inputs():
  query, support = _episode(seed=7, num_query=5)
  plain, chunked = _ctx(), _ctx(query_chunk_size=2, remat=True)
  variables = _init(plain, query, support)
  l0, a0 = plain.apply(variables, query, support, LABELS, MASK, NUM_CLASSES, return_attention=True)
  l1, a1 = chunked.apply(variables, query, support, LABELS, MASK, NUM_CLASSES,
                         return_attention=True)
  assert a1.shape == a0.shape == (5, 4, len(LABELS), 6)
  np.testing.assert_allclose(a1, a0, atol=1e-7)
  bf = plain.apply(variables, jnp.asarray(query, jnp.bfloat16), jnp.asarray(support, jnp.bfloat16),
                   LABELS, MASK, NUM_CLASSES)
  assert bf.shape == (5, NUM_CLASSES) and bf.dtype == jnp.float32


def test_ctx_one_compilation_for_every_episode_of_a_padded_shape():
  query, support = _episode(seed=8)
  model = _ctx()
  variables = _init(model, query, support)
  traces = []

  @jax.jit
  def logits_fn(variables, query, support, labels, mask):
    traces.append(1)
    return model.apply(variables, query, support, labels, mask, NUM_CLASSES)

  r = np.random.RandomState(0)
  episodes = [(LABELS, MASK),                                   # 3 ways, shots (2, 3, 2)
              (np.array([3, 3, 0, 1, 2, 0, 0, 0, 0]), np.array([1] * 5 + [0] * 4, bool)),
              (np.zeros(9, int), np.ones(9, bool))]             # 1 way, 9 shots
  for labels, mask in episodes:
    out = logits_fn(variables, r.randn(*query.shape).astype(np.float32),
                    r.randn(*support.shape).astype(np.float32), labels, mask)
    ways = len(set(labels[mask]))
    assert int(np.sum(np.asarray(out)[0] > NO_SUPPORT / 2)) == ways
  assert len(traces) == 1 and logits_fn._cache_size() == 1


def test_num_classes_must_be_a_static_int():
  query, support = _episode()
  model = _ctx()
  with pytest.raises(TypeError, match="num_classes"):
    _init(model, query, support, num_classes=jnp.int32(4))
  with pytest.raises(ValueError, match="query_chunk_size"):
    _ctx(query_chunk_size=0).apply(_init(model, query, support), query, support, LABELS, MASK,
                                   NUM_CLASSES)


# ----------------------------------------------------------------------------------- ProtoNet


def test_protonet_matches_reference_on_feature_maps_and_vectors_with_padding():
  query, support = _episode(seed=9, q_hw=(3, 3), s_hw=(3, 3))
  support[~MASK] = np.nan  # padding must not leak
  head = fewshot.PrototypicalHead()
  for q, s in [(query, support), (query.mean(axis=(1, 2)), support.mean(axis=(1, 2)))]:
    logits = head.apply({}, q, s, LABELS, MASK, NUM_CLASSES)
    assert logits.shape == (3, NUM_CLASSES) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, protonet_reference(q, s, LABELS, MASK, NUM_CLASSES),
                               rtol=1e-5, atol=1e-5)
  with jax.enable_x64(True):
    q64, s64 = query.astype(np.float64), support.astype(np.float64)
    logits = fewshot.prototypical_logits(q64, s64, LABELS, MASK, NUM_CLASSES)
    np.testing.assert_allclose(logits, protonet_reference(q64, s64, LABELS, MASK, NUM_CLASSES),
                               rtol=1e-13)
  grads = jax.grad(lambda s: jnp.sum(fewshot.prototypical_logits(query, s, LABELS, MASK,
                                                                 NUM_CLASSES)[:, :3]))(support)
  assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads)[~MASK] == 0)


def test_protonet_closed_form_toy():
  # Class 0: {0, 2} -> prototype 1; class 1: {4} -> prototype 4; class 2: no support.
  support = np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [100.0, 100.0]], np.float32)
  labels, mask = np.array([0, 0, 1, 1]), np.array([1, 1, 1, 0], bool)
  query = np.array([[2.0, 1.0], [4.0, 0.0]], np.float32)
  logits = fewshot.PrototypicalHead().apply({}, query, support, labels, mask, 3)
  np.testing.assert_array_equal(logits, [[-2.0, -5.0, NO_SUPPORT], [-9.0, 0.0, NO_SUPPORT]])
  protos, has = fewshot.prototypes(support, labels, mask, 3)
  np.testing.assert_array_equal(protos, [[1, 0], [4, 0], [0, 0]])
  np.testing.assert_array_equal(has, [True, True, False])


# ---------------------------------------------------------------------------------- benchmark


def test_memory_benchmark_script_runs_on_a_tiny_episode(monkeypatch):
  spec = importlib.util.spec_from_file_location(
      "benchmark_ctx_memory", os.path.join(REPO, "scripts", "benchmark_ctx_memory.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = module.main(["--ways=3", "--support=6", "--queries=4", "--hw=2", "--channels=8",
                           "--chunk=2", "--class_sum", "--steps=1"])
  text = out.getvalue()
  assert "temp_size_in_bytes" in text and "remat+chunk2" in text, text
  assert set(results) == {"plain", "remat", "ckpt", "chunk2", "remat+chunk2",
                          "remat+chunk2+recompute", "ckpt+chunk2"}
  assert all(r["temp_size_in_bytes"] > 0 for r in results.values())
  # --class_sum: both implementations at 3 classes and at one class per support image (6).
  assert "3 classes: segment" in text and "6 classes: segment" in text
  assert "matmul / segment" in text

  # --configs keeps plain and the named ones; a configuration that does not compile (XLA's GPU
  # autotuner can run out of memory) is one line and the others are still reported and timed.
  real_compiled_step = module.compiled_step

  def compiled_step(args, config, num_queries):
    if config.get("remat_impl") == "checkpoint":
      raise RuntimeError("NOT_FOUND: All configs failed during profiling\n"
                         "EXECUTION FAILED: RESOURCE_EXHAUSTED: Out of memory while trying to "
                         "allocate 35.79GiB")
    return real_compiled_step(args, config, num_queries)

  module.compiled_step = compiled_step
  impls = []
  real_class_sum = fewshot._class_sum

  def class_sum(*a, **kw):
    impls.append(a[4] if len(a) > 4 else kw.get("impl"))
    return real_class_sum(*a, **kw)

  monkeypatch.setattr(fewshot, "_class_sum", class_sum)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = module.main(["--ways=3", "--support=6", "--queries=4", "--hw=2", "--channels=8",
                           "--chunk=2", "--configs=remat+chunk2,ckpt+chunk2", "--time",
                           "--time_queries=4", "--steps=1", "--class_sum_impl=matmul"])
  text = out.getvalue()
  assert impls and set(impls) == {"matmul"}, impls  # --class_sum_impl reaches every step
  assert "class sum: matmul" in text, text
  assert set(results) == {"plain", "remat+chunk2"}, text
  assert ("ckpt+chunk2: did not compile (RuntimeError: EXECUTION FAILED: RESOURCE_EXHAUSTED: "
          "Out of memory while trying to allocate 35.79GiB)") in text, text
  timed = [l.split(":")[0].strip() for l in text.split("timing:")[1].splitlines()[1:]
           if " ms  slowdown vs plain" in l]
  assert timed == ["plain", "remat+chunk2", "ckpt+chunk2"], text
  # --no_memory: timings only (no compile-only memory report).
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    results = module.main(["--ways=3", "--support=6", "--queries=4", "--hw=2", "--channels=8",
                           "--chunk=2", "--configs=remat+chunk2", "--time", "--time_queries=4",
                           "--steps=1", "--no_memory"])
  assert results == {} and "temp_size_in_bytes" not in out.getvalue()
  assert "remat+chunk2:" in out.getvalue().split("timing:")[1], out.getvalue()
  with pytest.raises(SystemExit, match=re.escape("unknown --configs remat+chunk3; choose from "
                                                 "plain, remat, ckpt, chunk2, remat+chunk2")):
    module.main(["--ways=3", "--support=6", "--queries=4", "--hw=2", "--channels=8",
                 "--chunk=2", "--configs=remat+chunk3"])
