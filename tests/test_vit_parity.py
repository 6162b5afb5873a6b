"""Numerical parity of our Flax DeiT III ViT against timm's PyTorch implementation.

Both models get the same (randomly initialised) weights via ``load_torch_checkpoint`` (timm's
DeiT III names ``blocks.i.ls1.gamma`` map to the deit repository's ``gamma_1`` through
``VisionTransformer.torch_rename``) and the same input; eval-mode logits must agree to 1e-4 in
float32. Skipped when torch/timm (the ``[torch]`` extra) are not installed.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from visrep_jax import models  # noqa: E402
from visrep_jax.convert import convert_state_dict, load_torch_checkpoint  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-4


def _randomize_(module: "torch.nn.Module", seed: int):
  """Replaces timm's init by O(1)-scale random values where its init is degenerate.

  timm initialises LayerScale to 1e-6 and LayerNorm to (1, 0): with those every block is
  nearly the identity and a wrong attention/MLP would go unnoticed. Gammas ~0.1-0.5 keep
  activations bounded while making every residual branch matter.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("gamma"):
        p.copy_(0.1 + 0.4 * torch.rand(p.shape, generator=g))
      elif ".norm" in name or name.startswith("norm."):
        base = 1.0 if name.endswith("weight") else 0.0
        p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias"):
        p.copy_(0.02 * torch.randn(p.shape, generator=g))
      elif name in ("pos_embed", "cls_token"):
        p.copy_(0.5 * torch.randn(p.shape, generator=g))


def _shapes(tree):
  return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)


@pytest.mark.parametrize("name,batch", [
    ("deit3_small_patch16_224", 2),
    ("deit3_base_patch16_224", 2),
    ("deit3_small_patch16_384", 1),
])
def test_deit3_logits_match_timm(name, batch):
  torch.manual_seed(0)
  tmodel = timm.create_model(name, pretrained=False).eval()
  _randomize_(tmodel, seed=1)

  model = models.create(name)
  res = model.img_size
  params = load_torch_checkpoint(name, tmodel.state_dict())["params"]
  # The converted tree must have exactly the structure and shapes of our own init.
  ref = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)))
  assert _shapes(params) == _shapes(ref["params"])

  x = np.random.RandomState(0).randn(batch, 3, res, res).astype(np.float32)
  with torch.no_grad():
    expected = tmodel(torch.from_numpy(x)).numpy()
  logits, out = jax.jit(lambda v, im: model.apply(v, im, train=False))(
      {"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  logits = np.asarray(logits)

  assert logits.shape == expected.shape == (batch, 1000)
  assert logits.dtype == np.float32
  # Logits must be non-trivial for the tolerance to mean something.
  assert np.abs(expected).max() > 0.1
  err = np.abs(logits - expected).max()
  print(f"{name}: max |jax - timm| = {err:.3g} (max |logit| {np.abs(expected).max():.3g})")
  assert err <= TOL, f"{name}: max |jax - timm| = {err:.3g} > {TOL}"


def test_deit3_gradients_match_timm():
  """The hand-written VJPs (attention, GELU) must give timm's gradients for every parameter."""
  name, batch = "deit3_small_patch16_224", 2
  torch.manual_seed(0)
  tmodel = timm.create_model(name, pretrained=False).train()  # all drop rates are 0
  _randomize_(tmodel, seed=2)
  model = models.create(name)
  params = load_torch_checkpoint(name, tmodel.state_dict())["params"]

  rng = np.random.RandomState(1)
  x = rng.randn(batch, 3, 224, 224).astype(np.float32)
  w = rng.randn(batch, 1000).astype(np.float32)  # random cotangent for the logits
  (tmodel(torch.from_numpy(x)) * torch.from_numpy(w)).sum().backward()
  expected = convert_state_dict(model, {k: p.grad for k, p in tmodel.named_parameters()})["params"]

  def loss(p):
    logits, _ = model.apply({"params": p}, jnp.asarray(x.transpose(0, 2, 3, 1)), train=True,
                            rngs={"dropout": jax.random.PRNGKey(0)})
    return jnp.sum(logits * w)

  grads = jax.jit(jax.grad(loss))(params)
  flat_e = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  flat_g = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
  assert flat_e.keys() == flat_g.keys()
  worst = 0.0
  for path, e in flat_e.items():
    g = np.asarray(flat_g[path])
    scale = max(np.abs(e).max(), 1e-3)
    rel = np.abs(g - e).max() / scale
    worst = max(worst, rel)
    assert rel <= 1e-4, f"{jax.tree_util.keystr(path)}: max rel err {rel:.3g}"
  print(f"{name}: worst relative gradient error {worst:.3g}")


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_attention_implementations_agree(dtype, tol):
  """The CPU-tuned (b, h, n, d) attention with its custom VJP equals jax.nn.dot_product_attention
  in value and gradient (also in bfloat16); attention dropout with rate 0 changes nothing."""
  from visrep_jax.models import layers
  qkv = jax.random.normal(jax.random.PRNGKey(0), (2, 17, 3 * 32), jnp.float32)
  cot = jax.random.normal(jax.random.PRNGKey(1), (2, 17, 32), jnp.float32)

  def run(impl, dropout_fn=None):
    f = lambda t: layers.self_attention(t.astype(dtype), 4, dropout_fn, impl).astype(jnp.float32)
    out, vjp = jax.vjp(f, qkv)
    return out, vjp(cot)[0]

  ref_out, ref_grad = run("xla")
  for impl, dropout_fn in (("bhnd", None), ("bhnd", lambda p: p)):
    out, grad = run(impl, dropout_fn)
    np.testing.assert_allclose(out, ref_out, atol=tol, rtol=tol)
    np.testing.assert_allclose(grad, ref_grad, atol=tol, rtol=tol)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_attention_matches_xla():
  """On GPU: cuDNN flash attention (opt-in) equals XLA's attention (the GPU default) on the same
  bfloat16 inputs, in value and gradient (256 tokens: cuDNN refuses odd counts in training)."""
  from visrep_jax.models import layers
  assert layers.default_attention_implementation() == "xla"
  qkv = jax.random.normal(jax.random.PRNGKey(0), (4, 256, 3 * 384), jnp.float32)
  cot = jax.random.normal(jax.random.PRNGKey(1), (4, 256, 384), jnp.float32)

  def run(impl):
    f = lambda t: layers.self_attention(t.astype(jnp.bfloat16), 6, None, impl).astype(jnp.float32)
    out, vjp = jax.vjp(f, qkv)
    return np.asarray(out), np.asarray(vjp(cot)[0])

  (o_ref, g_ref), (o, g) = run("xla"), run("cudnn")
  for got, ref in ((o, o_ref), (g, g_ref)):
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 1e-2, rel


def test_attention_implementation_choice(monkeypatch):
  """The model-level ``attention`` field reaches every block: 'xla' and the CPU default 'bhnd'
  give the same ViT logits; an unknown name is a one-line error listing the valid ones."""
  from visrep_jax import models
  from visrep_jax.models import layers
  assert layers.default_attention_implementation(dropout=True) == "bhnd"
  assert layers.default_attention_implementation() == (
      "bhnd" if jax.default_backend() == "cpu" else "xla")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 1))
  kw = dict(num_classes=10, img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=2)
  base = models.VisionTransformer(**kw)
  variables = base.init(jax.random.PRNGKey(1), x)
  ref = base.apply(variables, x)[0]
  calls = []
  original = layers.self_attention
  monkeypatch.setattr(layers, "self_attention",
                      lambda qkv, h, dropout_fn=None, impl=None:
                      calls.append(impl) or original(qkv, h, dropout_fn, impl))
  out = models.VisionTransformer(**kw, attention="xla").apply(variables, x)[0]
  assert calls == ["xla"] * 3  # every block
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'.*bhnd, xla, cudnn"):
    models.VisionTransformer(**kw, attention="flash").apply(variables, x)


def test_gelu_gradient_matches_autodiff():
  from visrep_jax.models import layers
  x = jnp.linspace(-6.0, 6.0, 1001)
  g = jax.grad(lambda t: layers.gelu_exact(t).sum())(x)
  ref = jax.grad(lambda t: jax.nn.gelu(t, approximate=False).sum())(x)
  np.testing.assert_allclose(g, ref, atol=1e-6)
  np.testing.assert_allclose(layers.gelu_exact(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
