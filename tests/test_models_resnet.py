"""ResNet-18/34/50/101 (visrep_jax.models.resnet): parity with torchvision and timm, train-mode
BatchNorm semantics, parameter counts, the (logits, out) contract and options."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from visrep_jax import models

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from visrep_jax.convert import load_torch_checkpoint  # noqa: E402

TOL = 1e-4


def _randomize_bn_(module, seed):
  """Random BN affine *and* running statistics, random fc bias: with the default init (gamma 1,
  beta 0, mean 0, var 1) a wrong BN mapping or a missing eval-mode fold would go unnoticed."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=g))
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
      elif isinstance(m, torch.nn.Linear):
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
  return module


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _num(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _forward(name, variables, x, **overrides):
  model = models.create(name, **overrides)
  logits, out = jax.jit(lambda v, im: model.apply(v, im, train=False))(variables, jnp.asarray(x))
  return np.asarray(logits), out


def _check(name, ours, expected):
  assert ours.shape == expected.shape and ours.dtype == np.float32
  assert np.abs(expected).max() > 0.1  # non-trivial logits
  err = np.abs(ours - expected).max()
  print(f"{name}: max |jax - torch| = {err:.3g} (max |logit| {np.abs(expected).max():.3g})")
  assert err <= TOL, f"{name}: max |jax - torch| = {err:.3g} > {TOL}"


def test_resnet18_matches_torchvision():
  torch.manual_seed(0)
  tmodel = _randomize_bn_(torchvision.models.resnet18().eval(), seed=1)
  x = np.random.RandomState(0).randn(2, 224, 224, 3).astype(np.float32)
  with torch.no_grad():
    expected = tmodel(_nchw(x)).numpy()
  logits, out = _forward("resnet18", load_torch_checkpoint("resnet18", tmodel.state_dict()), x)
  _check("resnet18 vs torchvision", logits, expected)
  assert out["feature_map"].shape == (2, 7, 7, 512)


def test_resnet50_matches_torchvision_and_timm():
  """One set of weights through torchvision, timm (same key names) and ours."""
  torch.manual_seed(0)
  tv = _randomize_bn_(torchvision.models.resnet50().eval(), seed=2)
  tm = timm.create_model("resnet50", pretrained=False).eval()
  tm.load_state_dict(tv.state_dict())
  x = np.random.RandomState(1).randn(2, 224, 224, 3).astype(np.float32)
  with torch.no_grad():
    expected_tv = tv(_nchw(x)).numpy()
    expected_timm = tm(_nchw(x)).numpy()
    fmap = tm.forward_features(_nchw(x)).numpy().transpose(0, 2, 3, 1)
  logits, out = _forward("resnet50", load_torch_checkpoint("resnet50", tm.state_dict()), x)
  _check("resnet50 vs torchvision", logits, expected_tv)
  _check("resnet50 vs timm", logits, expected_timm)
  assert out["feature_map"].shape == (2, 7, 7, 2048)
  np.testing.assert_allclose(np.asarray(out["feature_map"]), fmap, atol=1e-4)


def test_dilated_resnet34_matches_timm_output_stride_16():
  """CrossTransformers' backbone: layer4 with stride 1, dilation 2 -> 14x14x512 at 224.

  torchvision's BasicBlock refuses dilation (NotImplementedError), so the reference is timm's
  ``output_stride=16``, whose convention (the first 3x3 conv of the dilated stage keeps the
  previous dilation) equals torchvision's for Bottleneck (checked below for ResNet-50)."""
  with pytest.raises(NotImplementedError):
    torchvision.models.resnet34(replace_stride_with_dilation=[False, False, True])
  torch.manual_seed(0)
  tmodel = _randomize_bn_(timm.create_model("resnet34", output_stride=16).eval(), seed=3)
  x = np.random.RandomState(2).randn(1, 224, 224, 3).astype(np.float32)
  with torch.no_grad():
    expected = tmodel(_nchw(x)).numpy()
  dil = dict(replace_stride_with_dilation=(False, False, True))
  variables = load_torch_checkpoint("resnet34", tmodel.state_dict(), **dil)
  logits, out = _forward("resnet34", variables, x, **dil)
  _check("dilated resnet34 vs timm", logits, expected)
  assert out["feature_map"].shape == (1, 14, 14, 512)
  assert [s.shape[1] for s in out["stages"]] == [56, 28, 14, 14]


def test_dilated_resnet50_matches_torchvision():
  torch.manual_seed(0)
  dil = [False, True, True]
  tmodel = _randomize_bn_(torchvision.models.resnet50(replace_stride_with_dilation=dil).eval(), 4)
  x = np.random.RandomState(3).randn(1, 96, 96, 3).astype(np.float32)
  with torch.no_grad():
    expected = tmodel(_nchw(x)).numpy()
  variables = load_torch_checkpoint("resnet50", tmodel.state_dict(),
                                    replace_stride_with_dilation=dil)
  logits, out = _forward("resnet50", variables, x, replace_stride_with_dilation=dil)
  _check("resnet50 dilated (layer3, layer4) vs torchvision", logits, expected)
  assert out["feature_map"].shape == (1, 12, 12, 2048)


def test_train_mode_batchnorm_matches_torch():
  """Train mode: batch statistics in the forward, torch's running-average update (unbiased
  variance, momentum 0.1 == flax 0.9) and the gradients of every parameter."""
  torch.manual_seed(0)
  tmodel = _randomize_bn_(torchvision.models.resnet18(num_classes=10), seed=5).train()
  # np.array: a deep copy (torch updates its running statistics in place below).
  variables = jax.tree.map(np.array, load_torch_checkpoint("resnet18", tmodel.state_dict(),
                                                           num_classes=10))
  rng = np.random.RandomState(4)
  x = rng.randn(4, 64, 64, 3).astype(np.float32)
  w = rng.randn(4, 10).astype(np.float32)
  (tmodel(_nchw(x)) * torch.from_numpy(w)).sum().backward()
  expected_stats = load_torch_checkpoint("resnet18", tmodel.state_dict(),
                                         num_classes=10)["batch_stats"]
  expected_grads = load_torch_checkpoint(
      "resnet18", {**{k: p.grad for k, p in tmodel.named_parameters()},
                   **dict(tmodel.named_buffers())}, num_classes=10)

  model = models.create("resnet18", num_classes=10)

  def loss(params):
    (logits, _), updates = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, jnp.asarray(x), train=True,
        mutable=["batch_stats"])
    return jnp.sum(logits * w), updates["batch_stats"]

  grads, stats = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  for what, ours, ref in (("running stats", stats, expected_stats),
                          ("gradients", grads, expected_grads["params"])):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ours)[0],
                            jax.tree.leaves(ref)):
      scale = max(np.abs(b).max(), 1e-3)
      rel = np.abs(np.asarray(a) - b).max() / scale
      assert rel <= 1e-4, f"{what} {jax.tree_util.keystr(path)}: rel err {rel:.3g}"
    assert jax.tree.structure(ours) == jax.tree.structure(jax.tree.map(jnp.asarray, ref))

  with pytest.raises(ValueError, match="mutable=\\['batch_stats'\\]"):
    model.apply(variables, jnp.asarray(x), train=True)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_parameter_counts_match_papers(name):
  model = models.create(name)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  meta = models.paper_metadata(name)
  assert _num(shapes["params"]) / 1e6 == pytest.approx(meta["params_m"], abs=0.05)
  assert set(shapes) == {"params", "batch_stats"}
  if name == "resnet50":  # ssl-transfer: torchvision ResNet-50 backbone without fc
    nofc = jax.eval_shape(models.create(name, num_classes=0).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 224, 224, 3)))
    assert _num(nofc["params"]) == 23_508_032
    assert "fc" not in nofc["params"]


def _jit_apply(model, **kw):
  return jax.jit(lambda v, im: model.apply(v, im, **kw))


def random_variables(model, x, seed=0):
  """Non-trivial variables of ``model``'s shapes without running ``model.init``.

  A jitted ``init`` of a BN convnet costs 10-15 s of XLA compilation on this jaxlib (the
  threefry bits of every parameter go through LLVM's optimiser); numpy is instant.
  """
  rng = np.random.RandomState(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      return (rng.randn(*s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))).astype(np.float32)
    if name.endswith("['scale']") or name.endswith("['var']"):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return (0.1 * rng.randn(*s.shape)).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(fill, shapes)


# Option tests use a narrow, 1-block-per-stage ResNet (compiles in a fraction of ResNet-18's time).
TINY = dict(stage_sizes=(1, 1, 1, 1), width=8)


def test_call_contract_options_and_dtypes():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
  model = models.create("resnet18", num_classes=7, **TINY)
  variables = random_variables(model, x)
  logits, out = _jit_apply(model)(variables, x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert set(out) >= {"logits", "pre_logits", "feature_map", "stages"}
  assert out["feature_map"].shape == (2, 2, 2, 64) and out["pre_logits"].shape == (2, 64)
  assert [s.shape[1:] for s in out["stages"]] == [(16, 16, 8), (8, 8, 16), (4, 4, 32),
                                                  (2, 2, 64)]
  np.testing.assert_allclose(out["feature_map"].mean(axis=(1, 2)), out["pre_logits"], atol=1e-5)
  fc = variables["params"]["fc"]
  np.testing.assert_allclose(out["pre_logits"] @ fc["kernel"] + fc["bias"], logits, atol=1e-4)

  # num_classes=0: a feature extractor without fc, logits = pre_logits.
  feats = models.create("resnet18", num_classes=0, **TINY)
  no_fc = {k: {n: t for n, t in v.items() if n != "fc"} for k, v in variables.items()}
  f, _ = _jit_apply(feats)(no_fc, x)
  assert f.shape == (2, 64)
  np.testing.assert_allclose(f, out["pre_logits"], atol=1e-6)

  # bfloat16 compute, float32 parameters and logits.
  b, bout = _jit_apply(models.create("resnet18", num_classes=7, dtype=jnp.bfloat16, **TINY))(
      variables, x)
  assert b.dtype == jnp.float32 and bout["feature_map"].dtype == jnp.bfloat16
  assert all(t.dtype == jnp.float32 for t in jax.tree.leaves(variables))
  a = np.asarray(logits)
  assert np.abs(a - np.asarray(b)).max() <= 0.05 * np.abs(a).max() + 0.05


def test_drop_path_dropout_and_remat_in_train_mode():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  model = models.create("resnet18", num_classes=5, drop_path_rate=0.5, dropout=0.2, **TINY)
  variables = random_variables(model, x)
  train = jax.jit(lambda v, k: model.apply(v, x, train=True, rngs={"dropout": k},
                                           mutable=["batch_stats"]))
  (a, _), _ = train(variables, jax.random.PRNGKey(1))
  (b, _), new = train(variables, jax.random.PRNGKey(2))
  assert np.isfinite(np.asarray(a)).all() and not np.allclose(a, b)
  assert not np.allclose(new["batch_stats"]["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"])
  e1, _ = _jit_apply(model)(variables, x)
  e2, _ = _jit_apply(models.create("resnet18", num_classes=5, **TINY))(variables, x)
  np.testing.assert_allclose(e1, e2, atol=1e-6)  # eval mode ignores the stochastic options

  plain, rematted = (models.create("resnet18", num_classes=5, remat=r, **TINY)
                     for r in (False, True))

  def loss(m, p):
    (l, _), _ = m.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=True,
                        mutable=["batch_stats"])
    return l.sum()

  g0 = jax.jit(jax.grad(lambda p: loss(plain, p)))(variables["params"])
  g1 = jax.jit(jax.grad(lambda p: loss(rematted, p)))(variables["params"])
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5), g0, g1)


def test_dilation_gives_stride_16_map_and_same_variables():
  shapes = {}
  for dil in ((False, False, False), (False, False, True)):
    model = models.create("resnet34", num_classes=0, replace_stride_with_dilation=dil)
    (_, out), v = jax.eval_shape(lambda im: model.init_with_output(jax.random.PRNGKey(0), im),
                                 jnp.zeros((1, 224, 224, 3)))
    shapes[dil] = (jax.tree.map(lambda t: t.shape, v), out["feature_map"].shape)
  assert shapes[(False, False, False)][1] == (1, 7, 7, 512)
  assert shapes[(False, False, True)][1] == (1, 14, 14, 512)
  assert shapes[(False, False, False)][0] == shapes[(False, False, True)][0]
  # meta-dataset's ResNet-34 also projects the shortcut of the first block of layer1.
  v = jax.eval_shape(models.create("resnet34", downsample_first_stage=True).init,
                     jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  assert v["params"]["layer1_0"]["downsample_0"]["kernel"].shape == (1, 1, 64, 64)
  assert "downsample_0" not in v["params"]["layer1_1"]
  with pytest.raises(ValueError, match="3 entries"):
    models.create("resnet18", replace_stride_with_dilation=(True,)).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def test_init_zero_init_last_and_torch_init():
  from visrep_jax.models.resnet import Bottleneck
  x = jnp.ones((2, 8, 8, 16))
  v = jax.jit(lambda k: Bottleneck(planes=8, stride=2, downsample=True, zero_init_last=True)
              .init(k, x, False))(jax.random.PRNGKey(0))
  p = v["params"]
  assert np.all(p["bn3"]["scale"] == 0)  # zero_init_last (ResNet(zero_init_last=False): ones)
  assert np.all(p["bn1"]["scale"] == 1) and np.all(p["downsample_1"]["scale"] == 1)
  assert np.all(v["batch_stats"]["bn2"]["var"] == 1) and np.all(v["batch_stats"]["bn2"]["mean"] == 0)
  # kaiming_normal(fan_out, relu): std sqrt(2 / (out * kh * kw)); conv2 is 3x3x8 -> 8.
  assert np.std(p["conv2"]["kernel"]) == pytest.approx(np.sqrt(2 / 72), rel=0.2)
  assert p["downsample_0"]["kernel"].shape == (1, 1, 16, 32)


def test_small_image_stem_matches_torchvision():
  """Fashion-MNIST/CIFAR stem (3x3 stride-2 conv on 1 channel, no max pool) vs torchvision with
  the same surgery; the last stage runs at 2x2, where convs take the matmul path on CPU."""
  torch.manual_seed(0)
  tmodel = torchvision.models.resnet18(num_classes=10)
  tmodel.conv1 = torch.nn.Conv2d(1, 64, 3, 2, 1, bias=False)
  tmodel.maxpool = torch.nn.Identity()
  tmodel = _randomize_bn_(tmodel, seed=3).eval()
  kw = dict(num_classes=10, stem_kernel=3, stem_stride=2, stem_pool=False)
  x = np.random.RandomState(1).randn(3, 28, 28, 1).astype(np.float32)
  with torch.no_grad():
    expected = tmodel(_nchw(x)).numpy()
  variables = load_torch_checkpoint("resnet18", tmodel.state_dict(), in_chans=1, **kw)
  logits, out = _forward("resnet18", variables, x, **kw)
  _check("resnet18 small stem vs torchvision", logits, expected)
  assert out["feature_map"].shape == (3, 2, 2, 512)
  with pytest.raises(ValueError, match="stem_kernel must be odd"):
    models.create("resnet18", stem_kernel=4).init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))


@pytest.mark.parametrize("shape,k,stride,pad,dilation", [
    ((2, 2, 2, 8), 3, 1, 1, 1), ((2, 1, 1, 8), 3, 1, 1, 1), ((2, 4, 4, 8), 3, 2, 1, 1),
    ((2, 3, 5, 8), 3, 2, 1, 1), ((2, 4, 4, 8), 3, 1, 2, 2), ((2, 3, 3, 4), 5, 1, 2, 1),
    ((2, 2, 2, 8), 3, 2, 1, 1), ((2, 1, 3, 8), 3, 1, 1, 1), ((2, 1, 1, 4), 5, 2, 3, 1),
    ((2, 1, 1, 4), 3, 4, 3, 1), ((2, 2, 3, 8), 3, 1, 1, 1), ((2, 2, 2, 8), 3, 1, 2, 2),
    ((2, 3, 2, 8), 5, 2, 2, 1), ((2, 2, 2, 8), 3, 3, 2, 1), ((2, 3, 2, 8), 3, 3, 3, 2)])
def test_conv_as_matmul_equals_xla_conv(shape, k, stride, pad, dilation):
  from visrep_jax.models import resnet
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(*shape).astype(np.float32))
  w = jnp.asarray(rng.randn(k, k, shape[-1], 6).astype(np.float32))

  def ref(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                        rhs_dilation=(dilation, dilation),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def ours(x, w):
    return resnet._conv_as_matmul(x, w, stride, pad, dilation)

  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  g_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) ** 2), argnums=(0, 1))(x, w)
  g_ours = jax.grad(lambda x, w: jnp.sum(ours(x, w) ** 2), argnums=(0, 1))(x, w)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_as_matmul_skips_taps_that_read_only_padding():
  from visrep_jax.models import resnet
  live = resnet._live_taps  # (n, k, stride, pad, dilation) -> kernel offsets along one axis
  assert live(1, 3, 1, 1, 1) == [1]  # ResNet-18 layer4 at 28px: the centre tap only
  assert live(2, 3, 2, 1, 1) == [1, 2]  # layer4's strided conv, 2x2 -> 1x1: 2x2 taps
  assert live(2, 3, 1, 1, 1) == [0, 1, 2]  # a 2x2 map, stride 1: every tap is read
  assert live(1, 5, 2, 3, 1) == [1, 3]  # wide padding and a stride: a dead tap in the middle
  assert live(1, 3, 4, 3, 1) == []  # every output sees padding only

  def matmul_rhs_shapes(x_shape, w_shape):  # 3x3, stride 1, padding 1
    jaxpr = jax.make_jaxpr(lambda x, w: resnet._conv_as_matmul(x, w, 1, 1, 1))(
        jnp.ones(x_shape), jnp.ones(w_shape)).jaxpr
    return [e.invars[1].aval.shape for e in jaxpr.eqns if e.primitive.name == "dot_general"]

  assert matmul_rhs_shapes((2, 1, 1, 512), (3, 3, 512, 512)) == [(512, 512)]  # not 9 * 512 rows
  # A 2x2 map: every tap is live, so one (4 * C) x (4 * O) product instead of (B*4, 9*C) x O.
  assert matmul_rhs_shapes((2, 2, 2, 16), (3, 3, 16, 8)) == [(4 * 16, 4 * 8)]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_bn_mask_keeps_padding_out_of_batch_statistics(name):
  """Training-mode BN with ``bn_mask``: the masked-in rows get exactly the outputs and running
  statistics of a batch made of them alone, whatever the padded rows hold (episodic padding),
  and the padded rows are normalised with the same statistics."""
  from visrep_jax import models
  m = models.create(name, num_classes=5, width=8, img_size=32)
  rng = np.random.default_rng(0)
  real = jnp.asarray(rng.normal(size=(5, 32, 32, 3)), jnp.float32)
  junk = jnp.asarray(rng.normal(size=(3, 32, 32, 3)) * 100.0 + 7.0, jnp.float32)
  v = m.init(jax.random.PRNGKey(0), real, train=False)
  ref, ref_state = m.apply(v, real, train=True, mutable=["batch_stats"])
  mask = jnp.array([1, 0, 1, 1, 0, 1, 0, 1], bool)
  order = [0, 5, 1, 2, 6, 3, 7, 4]  # real rows at the mask's True positions
  batch = jnp.concatenate([real, junk])[jnp.array(order)]
  out, state = m.apply(v, batch, train=True, bn_mask=mask, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(out[0])[np.asarray(mask)], np.asarray(ref[0]),
                             rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # Without the mask the junk rows move the statistics (the test can tell them apart).
  out_nomask, _ = m.apply(v, batch, train=True, mutable=["batch_stats"])
  assert not np.allclose(np.asarray(out_nomask[0])[np.asarray(mask)], np.asarray(ref[0]),
                         atol=1e-2)
  # Support-set statistics: stats from the first rows only, applied to every row.
  sup = jnp.array([1, 1, 1, 0, 0], bool)
  ref_sup, _ = m.apply(v, real[:3], train=True, mutable=["batch_stats"])
  out_sup, _ = m.apply(v, real, train=True, bn_mask=sup, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(out_sup[0])[:3], np.asarray(ref_sup[0]), rtol=1e-4,
                             atol=1e-4)
