"""Model zoo contract: create() by name, (logits, out), sizes, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visrep_jax import models


def init(model, size, channels=3, batch=2):
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, channels))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  return variables, x


def num_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,params_m", [("deit3_tiny_patch16_224", 5.7),
                                           ("deit3_small_patch16_224", 22.0),
                                           ("deit3_base_patch16_224", 86.6)])
def test_deit3_parameter_counts_match_thesis(name, params_m):
  model = models.create(name)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  assert num_params(shapes["params"]) / 1e6 == pytest.approx(params_m, abs=0.06)
  assert models.paper_metadata(name)["params_m"] == params_m


def test_deit3_layout():
  model = models.create("deit3_small_patch16_224")
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"]
  assert shapes["pos_embed"].shape == (1, 196, 384)  # no class-token slot
  assert shapes["cls_token"].shape == (1, 1, 384)
  assert shapes["blocks_0"]["attn"]["qkv"]["kernel"].shape == (384, 1152)
  assert shapes["blocks_0"]["gamma_1"].shape == (384,)
  assert shapes["blocks_11"]["mlp"]["fc1"]["kernel"].shape == (384, 1536)
  assert shapes["patch_embed"]["proj"]["kernel"].shape == (16, 16, 3, 384)


def test_call_contract_and_layerscale_init():
  model = models.create("vit_test_patch4_16", num_classes=7, layerscale_init=1e-4)
  variables, x = init(model, 16)
  np.testing.assert_allclose(variables["params"]["blocks_0"]["gamma_2"], 1e-4)
  logits, out = model.apply(variables, x, train=False)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert out["pre_logits"].shape == (2, 32)
  assert out["tokens"].shape == (2, 16, 32)
  # pre_logits is the normalised class token: head(pre_logits) == logits.
  head = variables["params"]["head"]
  np.testing.assert_allclose(out["pre_logits"] @ head["kernel"] + head["bias"], logits, atol=1e-5)


def test_unknown_name_and_option():
  with pytest.raises(models.UnknownNameError, match="Valid: .*deit3_small_patch16_224"):
    models.create("deit4_small")
  with pytest.raises(ValueError, match="Unknown option"):
    models.create("deit3_small_patch16_224", depht=3)


def test_wrong_resolution_is_a_clear_error():
  model = models.create("vit_test_patch4_16")
  variables, _ = init(model, 16)
  with pytest.raises(ValueError, match="img_size=32"):
    model.apply(variables, jnp.zeros((1, 32, 32, 3)))


def test_stochastic_depth_and_determinism():
  model = models.create("vit_test_patch4_16", drop_path_rate=0.5)
  variables, x = init(model, 16, batch=8)
  a, _ = model.apply(variables, x, train=False)
  b, _ = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(a, b)
  t1, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  t2, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  assert not np.allclose(t1, t2)
  # Without drop path, train mode equals eval mode (no other stochastic layer).
  plain = models.create("vit_test_patch4_16")
  t, _ = plain.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  np.testing.assert_allclose(t, a, atol=1e-6)


def test_remat_changes_no_value_or_gradient():
  m0 = models.create("vit_test_patch4_16")
  m1 = models.create("vit_test_patch4_16", remat=True)
  variables, x = init(m0, 16)

  def loss(model, params):
    return model.apply({"params": params}, x, train=False)[0].sum()

  np.testing.assert_allclose(loss(m0, variables["params"]), loss(m1, variables["params"]), rtol=1e-6)
  g0 = jax.grad(lambda p: loss(m0, p))(variables["params"])
  g1 = jax.grad(lambda p: loss(m1, p))(variables["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g0, g1)


def test_bfloat16_compute():
  m32 = models.create("vit_test_patch4_16")
  m16 = models.create("vit_test_patch4_16", dtype=jnp.bfloat16)
  variables, x = init(m32, 16)
  a, _ = m32.apply(variables, x)
  b, out = m16.apply(variables, x)
  assert b.dtype == jnp.float32 and out["tokens"].dtype == jnp.bfloat16
  assert jax.tree.leaves(variables)[0].dtype == jnp.float32  # params stay float32
  np.testing.assert_allclose(a, b, atol=0.1)


def test_demo_model_takes_grayscale():
  model = models.create("deit3_demo_patch7_28")
  variables, x = init(model, 28, channels=1)
  assert model.apply(variables, x)[0].shape == (2, 10)


def test_conv_stem_vit():
  """ViT_C: 3x3/2 conv + BatchNorm + ReLU stages before a 1x1 patch embedding; BatchNorm
  statistics are updated in training and used in evaluation; the plain ViT has no stem."""
  model = models.create("deit3_demo_convstem_28")
  variables, x = init(model, 28, channels=1, batch=4)
  stem = {k: v["kernel"].shape for k, v in variables["params"].items() if k.startswith("stem_conv")}
  assert stem == {"stem_conv_0": (3, 3, 1, 32), "stem_conv_1": (3, 3, 32, 64),
                  "stem_conv_2": (3, 3, 64, 128)}
  assert variables["params"]["patch_embed"]["proj"]["kernel"].shape == (1, 1, 128, 128)
  assert set(variables["batch_stats"]) == {"stem_bn_0", "stem_bn_1", "stem_bn_2"}
  logits, out = model.apply(variables, x)
  assert logits.shape == (4, 10) and out["grid"] == (4, 4) and out["tokens"].shape == (4, 16, 128)
  (t_logits, _), new_state = model.apply(variables, x, train=True, mutable=["batch_stats"])
  # Running mean = 0.9 * old (0) + 0.1 * the batch mean of the first conv's output (torch's
  # momentum 0.1).
  assert np.all(variables["batch_stats"]["stem_bn_0"]["mean"] == 0)
  conv = jax.lax.conv_general_dilated(x, variables["params"]["stem_conv_0"]["kernel"], (2, 2),
                                      ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(new_state["batch_stats"]["stem_bn_0"]["mean"],
                             0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  # Training normalises by the batch, evaluation by the running statistics.
  assert not np.allclose(t_logits, logits, atol=1e-4)
  with pytest.raises(ValueError, match="img_size=56"):
    model.apply(variables, jnp.zeros((1, 56, 56, 1)))
  with pytest.raises(ValueError, match="4x4 map, not divisible by patch_size=3; use patch_size=1"):
    models.create("deit3_demo_convstem_28", patch_size=3).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match=r"positive integers\), got \(32, 0\)"):
    models.create("deit3_demo_convstem_28", conv_stem=(32, 0)).init(jax.random.PRNGKey(0), x)
  plain = init(models.create("deit3_demo_patch7_28"), 28, channels=1)[0]
  assert "batch_stats" not in plain and not any(k.startswith("stem_") for k in plain["params"])


@pytest.mark.parametrize("shape,dtype,tol", [((6, 5), jnp.float32, 1e-6),
                                             ((3, 7, 5), jnp.float32, 1e-6),
                                             ((2, 3, 4, 5), jnp.float32, 1e-6),
                                             ((3, 7, 5), jnp.bfloat16, 2e-2),
                                             ((3, 7, 5), jnp.float64, 1e-13)])
def test_dense_dot_general_matches_autodiff(shape, dtype, tol):
  """The Dense contraction with the hand-written VJP: same value, input gradient and kernel
  gradient (and dtypes) as lax.dot_general under autodiff, for inputs of any rank and float64
  kept in float64."""
  from visrep_jax.models import layers
  with jax.enable_x64(dtype == jnp.float64):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, shape, dtype)
    w = jax.random.normal(kw, (shape[-1], 4), dtype)
    g = jax.random.normal(kg, shape[:-1] + (4,), dtype)
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    scale = jnp.linspace(0.5, 2.0, 4).astype(dtype)  # the cotangent is a fusion, as in a block

    def run(dot):
      y, vjp = jax.vjp(lambda a, b: dot(a, b, dims), x, w)
      return (y, *vjp(g * scale))

    got = jax.jit(lambda: run(layers.dense_dot_general))()
    ref = jax.jit(lambda: run(jax.lax.dot_general))()
    for a, b in zip(got, ref):
      assert a.dtype == b.dtype == dtype and a.shape == b.shape
      np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                 atol=tol, rtol=tol)
  # Other contractions are plain lax.dot_general (and still differentiable).
  other = (((0,), (0,)), ((), ()))
  a2 = jax.random.normal(kx, (5, 3))
  np.testing.assert_array_equal(layers.dense_dot_general(a2, a2, other),
                                jax.lax.dot_general(a2, a2, other))


def test_dense_backward_does_not_transpose_the_incoming_gradient():
  """Why dense_dot_general exists: under autodiff XLA CPU materialises the (scaled) incoming
  gradient transposed, (n, m), to form the kernel gradient; with it the kernel gradient reads
  the gradient in place. Checked on the optimised HLO of a LayerScale-like backward."""
  from visrep_jax.models import layers
  if jax.default_backend() != "cpu":
    pytest.skip("an XLA CPU layout property")
  m, k, n = 96, 40, 56
  x, g = jnp.ones((4, m // 4, k)), jnp.ones((4, m // 4, n))
  w, gamma = jnp.ones((k, n)), jnp.ones((n,))
  dims = (((2,), (0,)), ((), ()))

  def hlo(dot):
    f = lambda x, g, w, gamma: jax.vjp(lambda a, b: dot(a, b, dims), x, w)[1](g * gamma)
    text = jax.jit(f).lower(x, g, w, gamma).compile().as_text()
    return text[text.index("ENTRY"):]

  transposed_gradient = f"f32[{n},{m}]"
  if transposed_gradient not in hlo(jax.lax.dot_general):
    pytest.skip(f"this XLA ({jax.__version__}) no longer transposes the gradient under "
                "autodiff: dense_dot_general may no longer be needed")
  assert transposed_gradient not in hlo(layers.dense_dot_general)


def _count_custom_vjp_calls(jaxpr) -> int:
  from visrep_jax.models.zoo import _sub_jaxprs
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name.startswith("custom_vjp_call")
    n += sum(_count_custom_vjp_calls(sub) for sub in _sub_jaxprs(eqn))
  return n


@pytest.mark.parametrize("name,dense_per_block", [("vit_test_patch4_16", 4),
                                                  ("cait_test_patch4_16", None),
                                                  ("patchconvnet_test", None)])
def test_models_use_the_dense_vjp_on_cpu(monkeypatch, name, dense_per_block):
  """Every block's linear layers go through dense_dot_general on CPU (counted in the jaxpr: the
  ViT's qkv, proj, fc1, fc2), and the parameters' gradients equal plain autodiff's."""
  from visrep_jax.models import layers
  if jax.default_backend() != "cpu":
    pytest.skip("dense_dot_general is the CPU choice")
  assert layers.dense_kwargs() == {"dot_general": layers.dense_dot_general}
  model = models.create(name)
  size = getattr(model, "img_size", 16)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 3))
  variables = model.init(jax.random.PRNGKey(2), images)
  loss = lambda p: model.apply({"params": p}, images)[0].sum()
  # A new function each time: make_jaxpr caches traces by function.
  count = lambda: _count_custom_vjp_calls(
      jax.make_jaxpr(lambda p: loss(p))(variables["params"]).jaxpr)
  got, with_ours = jax.grad(loss)(variables["params"]), count()
  monkeypatch.setattr(layers, "dense_kwargs", lambda: {})
  ref, without = jax.grad(loss)(variables["params"]), count()
  if dense_per_block is not None:
    assert with_ours - without == dense_per_block * model.depth
  else:
    assert with_ours > without
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                         got, ref)
