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
