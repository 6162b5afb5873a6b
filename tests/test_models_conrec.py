"""ConRec U-Net, attention pooling and projection heads (visrep_jax.models.unet / heads).

The reference for the U-Net is the official Keras code (bayer-science-for-a-better-life/
contrastive-reconstruction, ``models/conrec.py``), rebuilt below layer by layer with Keras and
compared in inference mode; the heads are compared with PyTorch (SimSiam/CAMtrast layout).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from visrep_jax import models
from visrep_jax.models.heads import AttentionPool, LinearHead, ProjectionMLP

torch = pytest.importorskip("torch")  # conftest imports torch before TensorFlow


def _num(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _random_variables(shapes, seed=0):
  """Well-scaled random variables without ``model.init`` (whose jitted compile is slow: see
  test_models_resnet.random_variables)."""
  rng = np.random.RandomState(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      return (rng.randn(*s.shape) * np.sqrt(1.0 / np.prod(s.shape[:-1]))).astype(np.float32)
    if name.endswith("['scale']") or name.endswith("['var']"):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return (0.1 * rng.randn(*s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _shapes(model, x, **kw):
  return jax.eval_shape(lambda im: model.init(jax.random.PRNGKey(0), im, **kw), x)


# ---------------------------------------------------------------------------------------------
# Parameter counts: ConRec Table 2 (#Parameters) counts params + BN statistics.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,count", [("conrec_unet_encoder_gap", 4_693_056),
                                        ("conrec_unet_encoder", 4_867_393)])
def test_conrec_parameter_counts_exact(name, count):
  v = _shapes(models.create(name), jnp.zeros((1, 224, 224, 3)))
  assert _num(v) == count
  assert models.paper_metadata(name)["params_m"] == round(count / 1e6, 3)
  if name == "conrec_unet_encoder":
    assert _num(v["params"]["attn_pool"]) + _num(v["batch_stats"]["attn_pool"]) == 174_337


def test_training_model_contains_the_encoder_variables():
  full = _shapes(models.create("conrec_unet"), jnp.zeros((1, 64, 64, 3)))
  enc = _shapes(models.create("conrec_unet_encoder"), jnp.zeros((1, 64, 64, 3)))
  assert set(full["params"]) == {"encoder", "attn_pool", "decoder", "projection"}
  sub = {c: {k: full[c][k] for k in enc[c]} for c in enc}
  assert jax.tree.map(lambda a: a.shape, sub) == jax.tree.map(lambda a: a.shape, enc)
  proj = full["params"]["projection"]  # SimCLR v2 / ConRec head: 512-512-128, no bias before BN
  assert proj["fc_0"]["kernel"].shape == (512, 512) and "bias" not in proj["fc_0"]
  assert proj["fc_2"]["kernel"].shape == (512, 128) and set(proj["bn_2"]) == {"scale"}


# ---------------------------------------------------------------------------------------------
# Parity with the official Keras architecture
# ---------------------------------------------------------------------------------------------

def _keras_conrec(tf, size, channels, base, depth, upsample, proj_dims):
  """The official ``conrec_model`` (encoder_reduction=GA_ATTENTION) + projection head, with
  every layer named by its Flax path (``.`` for ``/``)."""
  L = tf.keras.layers

  def cbr(x, f, k, conv, bn):
    x = L.Conv2D(f, k, padding="same", name=conv)(x)
    x = L.BatchNormalization(momentum=0.9, epsilon=1e-5, name=bn)(x)
    return L.ReLU()(x)

  inp = tf.keras.Input((size, size, channels))
  x, skips = inp, []
  for lvl in range(depth):
    for i in (1, 2):
      x = cbr(x, base * 2 ** lvl, 3, f"encoder.down_{lvl}.conv{i}", f"encoder.down_{lvl}.bn{i}")
    if lvl < depth - 1:
      skips.append(cbr(x, x.shape[-1], 1, f"decoder.skip_{lvl}_conv", f"decoder.skip_{lvl}_bn"))
      x = L.MaxPooling2D(2)(x)
  phi = x
  f = phi.shape[-1]
  a = L.Dropout(0.5)(phi)
  for i, width in enumerate((f // 2, f // 4, f // 8)):
    a = L.Conv2D(width, 1, padding="same", name=f"attn_pool.conv_{i}")(a)
    a = L.BatchNormalization(name=f"attn_pool.bn_{i}")(a)  # Keras defaults, as the official code
    a = L.ReLU()(a)
  a = L.Conv2D(1, 1, activation="sigmoid", name="attn_pool.conv_out")(a)
  up = L.Conv2D(f, 1, use_bias=False, kernel_initializer="ones", trainable=False, name="attn_up")
  a = up(a)
  h = L.GlobalAveragePooling2D()(L.Multiply()([a, phi])) / L.GlobalAveragePooling2D()(a)
  z = h
  for i, d in enumerate(proj_dims):
    last = i == len(proj_dims) - 1
    z = L.Dense(d, use_bias=False, name=f"projection.fc_{i}")(z)
    z = L.BatchNormalization(momentum=0.9, epsilon=1e-5, center=not last,
                             name=f"projection.bn_{i}")(z)
    z = z if last else L.ReLU()(z)
  x = phi
  for lvl in range(depth - 2, -1, -1):
    if upsample == "nearest":
      x = L.UpSampling2D(2)(x)
    else:
      x = L.Conv2DTranspose(base * 2 ** lvl, 2, strides=2, padding="same",
                            name=f"decoder.up_{lvl}_transpose")(x)
    x = L.Concatenate()([x, skips[lvl]])
    for i in (1, 2):
      x = cbr(x, base * 2 ** lvl, 3, f"decoder.up_{lvl}.conv{i}", f"decoder.up_{lvl}.bn{i}")
  rec = L.Conv2D(channels, 1, activation="sigmoid", name="decoder.head")(x)
  return tf.keras.Model(inp, [rec, h, z])


_KERAS_TO_FLAX = {"kernel": ("params", "kernel"), "bias": ("params", "bias"),
                  "gamma": ("params", "scale"), "beta": ("params", "bias"),
                  "moving_mean": ("batch_stats", "mean"),
                  "moving_variance": ("batch_stats", "var")}


def _randomize_and_convert(kmodel, seed):
  rng = np.random.RandomState(seed)
  variables = {"params": {}, "batch_stats": {}}
  for layer in kmodel.layers:
    if "." not in layer.name or not layer.weights:
      continue
    new = []
    for w in layer.weights:
      leaf = w.path.split("/")[-1]
      value = np.asarray(w.numpy())
      if leaf in ("gamma", "moving_variance"):
        value = rng.uniform(0.5, 1.5, value.shape)
      elif leaf in ("beta", "moving_mean", "bias"):
        value = 0.1 * rng.randn(*value.shape)
      new.append(value.astype(np.float32))
      coll, name = _KERAS_TO_FLAX[leaf]
      node = variables[coll]
      for part in layer.name.split("."):
        node = node.setdefault(part, {})
      node[name] = new[-1]
    layer.set_weights(new)
  return variables


@pytest.mark.parametrize("upsample", ["nearest", "transpose"])
def test_unet_matches_official_keras_model(upsample):
  tf = pytest.importorskip("tensorflow")
  size, channels, base, depth = 32, 3, 8, 4
  tf.keras.utils.set_random_seed(0)
  kmodel = _keras_conrec(tf, size, channels, base, depth, upsample, (64, 64, 16))
  variables = _randomize_and_convert(kmodel, seed=1)
  model = models.create("conrec_unet", base_filters=base, depth=depth, upsample=upsample,
                        projection_dims=(64, 64, 16))
  x = np.random.RandomState(2).rand(2, size, size, channels).astype(np.float32)
  ref = jax.eval_shape(lambda im: model.init(jax.random.PRNGKey(0), im), jnp.asarray(x))
  assert jax.tree.map(lambda a: a.shape, variables) == jax.tree.map(lambda a: a.shape, ref)

  rec_k, h_k, z_k = (np.asarray(t) for t in kmodel(x, training=False))
  h, out = jax.jit(lambda v, im: model.apply(v, im))(variables, jnp.asarray(x))
  assert np.abs(h_k).max() > 0.1 and np.abs(z_k).max() > 0.1 and rec_k.std() > 0.01
  for what, ours, ref_ in (("h", h, h_k), ("z", out["projection"], z_k),
                           ("reconstruction", out["reconstruction"], rec_k)):
    err = np.abs(np.asarray(ours) - ref_).max()
    print(f"ConRec U-Net ({upsample}) {what}: max |jax - keras| = {err:.3g}")
    assert err <= 1e-4, f"{what}: {err:.3g}"
  assert out["feature_map"].shape == (2, 4, 4, 64) and out["attention"].shape == (2, 4, 4, 1)


# ---------------------------------------------------------------------------------------------
# Contract: training and representation models
# ---------------------------------------------------------------------------------------------

def test_conrec_training_forward_grayscale_and_encoder_reuse():
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 1))
  kw = dict(base_filters=8)
  model = models.create("conrec_unet", projection_dims=(64, 64, 16), **kw)
  variables = _random_variables(_shapes(model, x))

  @jax.jit
  def train_fwd(v, im, key):
    return model.apply(v, im, train=True, rngs={"dropout": key}, mutable=["batch_stats"])

  (h, out), new_state = train_fwd(variables, x, jax.random.PRNGKey(1))
  rec = np.asarray(out["reconstruction"])
  assert rec.shape == (2, 32, 32, 1) and rec.min() >= 0 and rec.max() <= 1
  assert out["projection"].shape == (2, 16) and h.shape == (2, 64)
  assert jax.tree.structure(new_state["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])
  assert not np.allclose(new_state["batch_stats"]["encoder"]["down_0"]["bn1"]["mean"],
                         variables["batch_stats"]["encoder"]["down_0"]["bn1"]["mean"])

  # The encoder + attention variables of the training model drive the evaluation model.
  enc = models.create("conrec_unet_encoder", num_classes=0, **kw)
  sub = {c: {k: variables[c][k] for k in ("encoder", "attn_pool")} for c in variables}
  h_enc, enc_out = jax.jit(enc.apply)(sub, x)
  h_full, _ = jax.jit(model.apply)(variables, x)
  assert np.abs(np.asarray(h_full)).max() > 0.1
  np.testing.assert_allclose(h_enc, h_full, rtol=1e-5, atol=1e-6)
  assert enc_out["feature_map"].shape == (2, 4, 4, 64) and h_enc.dtype == jnp.float32

  # bfloat16 compute on a classifier variant; parameters stay float32.
  clf = models.create("conrec_unet_encoder_gap", num_classes=5, dtype=jnp.bfloat16, **kw)
  cv = _random_variables(_shapes(clf, x))
  logits, cout = jax.jit(clf.apply)(cv, x)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert cout["feature_map"].dtype == jnp.bfloat16

  with pytest.raises(ValueError, match="divisible by 8"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 36, 36, 3)))


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------

def test_attention_pool_is_gap_for_constant_attention():
  phi = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 32))
  pool = AttentionPool()
  v = jax.eval_shape(lambda p: pool.init(jax.random.PRNGKey(0), p), phi)
  v = jax.tree.map(lambda s: 0.1 * jnp.ones(s.shape, s.dtype), v)
  v["params"]["conv_out"]["kernel"] = jnp.zeros_like(v["params"]["conv_out"]["kernel"])
  pooled, attn = jax.jit(pool.apply)(v, phi)
  np.testing.assert_allclose(attn, jax.nn.sigmoid(0.1) * np.ones((2, 5, 5, 1)), atol=1e-6)
  np.testing.assert_allclose(pooled, phi.mean(axis=(1, 2)), atol=1e-5)
  # Eq. 4 in general: sum_ij a_ij phi_ij / sum_ij a_ij.
  v["params"]["conv_out"]["kernel"] = 0.5 * jnp.ones_like(v["params"]["conv_out"]["kernel"])
  pooled, attn = jax.jit(pool.apply)(v, phi)
  expected = (attn * phi).sum(axis=(1, 2)) / attn.sum(axis=(1, 2))
  np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)
  assert float(attn.std()) > 0


@pytest.mark.parametrize("cfg,count", [
    # SimCLR v2 / ConRec on ResNet-50: 2048-2048-2048-128, BN (last without beta).
    (dict(), 2 * (2048 * 2048 + 4 * 2048) + 2048 * 128 + 3 * 128),
    # SimCLR v1 paper head: 2048 -> 2048 -> 128 with biases, no BN.
    (dict(num_layers=2, hidden_dim=2048, use_bn=False), 2048 * 2048 + 2048 + 2048 * 128 + 128),
])
def test_projection_mlp_parameter_counts(cfg, count):
  v = jax.eval_shape(lambda x: ProjectionMLP(**cfg).init(jax.random.PRNGKey(0), x),
                     jnp.zeros((2, 2048)))
  assert _num(v) == count


def test_simsiam_projector_and_predictor_match_torch():
  """CAMtrast/SimSiam heads in PyTorch vs ProjectionMLP options (eval and train mode)."""
  nn = torch.nn
  d, hid = 24, 8
  g = torch.Generator().manual_seed(0)
  proj_t = nn.Sequential(nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(),
                         nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(),
                         nn.Linear(d, d), nn.BatchNorm1d(d, affine=False))
  pred_t = nn.Sequential(nn.Linear(d, hid, bias=False), nn.BatchNorm1d(hid), nn.ReLU(),
                         nn.Linear(hid, d))
  for m in list(proj_t) + list(pred_t):
    if isinstance(m, nn.BatchNorm1d):
      m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
      m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
      if m.affine:
        with torch.no_grad():
          m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
          m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))

  def convert(seq):
    v = {"params": {}, "batch_stats": {}}
    linears = [m for m in seq if isinstance(m, nn.Linear)]
    bns = [m for m in seq if isinstance(m, nn.BatchNorm1d)]
    for i, m in enumerate(linears):
      v["params"][f"fc_{i}"] = {"kernel": m.weight.detach().numpy().T.copy()}
      if m.bias is not None:
        v["params"][f"fc_{i}"]["bias"] = m.bias.detach().numpy().copy()
    for i, m in enumerate(bns):
      v["batch_stats"][f"bn_{i}"] = {"mean": m.running_mean.numpy().copy(),
                                     "var": m.running_var.numpy().copy()}
      if m.affine:
        v["params"][f"bn_{i}"] = {"scale": m.weight.detach().numpy().copy(),
                                  "bias": m.bias.detach().numpy().copy()}
    return v

  projector = ProjectionMLP(num_layers=3, hidden_dim=d, out_dim=d, last_bn_scale=False,
                            last_bias=True, init_std=None)
  predictor = ProjectionMLP(num_layers=2, hidden_dim=hid, out_dim=d, last_bn=False,
                            init_std=None)
  x = np.random.RandomState(0).randn(6, d).astype(np.float32)
  for module, seq in ((projector, proj_t), (predictor, pred_t)):
    v = convert(seq)
    ref = jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t), jnp.asarray(x))
    assert jax.tree.map(np.shape, v) == jax.tree.map(lambda a: a.shape, ref)
    with torch.no_grad():
      expected = seq.eval()(torch.from_numpy(x)).numpy()
      expected_train = seq.train()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(module.apply(v, jnp.asarray(x)), expected, atol=1e-5)
    ours_train, _ = module.apply(v, jnp.asarray(x), train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(ours_train, expected_train, atol=1e-4)


def test_linear_head():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 16))
  head = LinearHead(10, init_std=0.0)
  v = head.init(jax.random.PRNGKey(0), x)
  assert np.all(v["params"]["fc"]["kernel"] == 0) and "batch_stats" not in v
  y = head.apply(v, x)
  assert y.shape == (3, 10) and y.dtype == jnp.float32
  probe = LinearHead(10, use_bn=True, dropout=0.5)
  v = jax.eval_shape(lambda t: probe.init(jax.random.PRNGKey(0), t), x)
  assert set(v["batch_stats"]["bn"]) == {"mean", "var"} and "bn" not in v["params"]
  v = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), v)
  y, _ = probe.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)},
                     mutable=["batch_stats"])
  assert y.shape == (3, 10) and np.isfinite(np.asarray(y)).all()
