"""DeiT (incl. distilled) and CaiT: parity with timm, checkpoint names, paper sizes, options.

Parity: timm model with random O(1)-scale weights (every parameter, so that LayerScale, talking
heads and both heads matter), converted with ``load_torch_checkpoint``; eval-mode logits must
agree to 1e-4 in float32.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from visrep_jax import models  # noqa: E402
from visrep_jax.convert import convert_state_dict, load_torch_checkpoint  # noqa: E402
from visrep_jax.models import layers  # noqa: E402
from visrep_jax.models.cait import CaiT, mix_heads  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-4


def _randomize_(module: "torch.nn.Module", seed: int, fan_in_weights: bool = False):
  """O(1)-scale random values. ``fan_in_weights``: also Linear/Conv weights ~ N(0, 1/fan_in)
  (for the tiny test models, whose timm-init std 0.02 heads would give ~0.01 logits)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if leaf in ("gamma", "gamma_1", "gamma_2"):
        p.copy_(0.1 + 0.4 * torch.rand(p.shape, generator=g))
      elif "norm" in name:
        p.copy_((1.0 if leaf == "weight" else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
      elif leaf in ("pos_embed", "cls_token", "dist_token"):
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
      elif ".proj_l." in name or ".proj_w." in name:  # talking heads: mix the heads strongly
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
      elif leaf == "bias":
        p.copy_(0.02 * torch.randn(p.shape, generator=g))
      elif fan_in_weights and leaf == "weight" and p.ndim >= 2:
        p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
      # Otherwise Linear/Conv weights keep timm's init (std 0.02 / kaiming-uniform).


def _timm(name, seed=1, **kwargs):
  torch.manual_seed(0)
  m = timm.create_model(name, pretrained=False, **kwargs).eval()
  _randomize_(m, seed)
  return m


def _nchw(batch, res, seed=0):
  return np.random.RandomState(seed).randn(batch, 3, res, res).astype(np.float32)


def _apply(model, variables, x_nchw, train=False):
  rngs = {"dropout": jax.random.PRNGKey(0)}
  fn = jax.jit(lambda v, im: model.apply(v, im, train=train, rngs=rngs))
  return fn(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))


def _check(name, logits, expected):
  logits = np.asarray(logits)
  assert logits.shape == expected.shape and logits.dtype == np.float32
  assert np.abs(expected).max() > 0.1  # non-trivial logits, or the tolerance means nothing
  err = np.abs(logits - expected).max()
  print(f"{name}: max |jax - timm| = {err:.3g} (max |logit| {np.abs(expected).max():.3g})")
  assert err <= TOL, f"{name}: max |jax - timm| = {err:.3g} > {TOL}"


def _num_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


# --- DeiT ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,batch,res", [
    ("deit_tiny_patch16_224", 2, 224),
    ("deit_small_patch16_224", 1, 224),
    ("deit_tiny_patch16_224", 1, 384),  # the 384 layout (577 tokens) on the cheapest width
])
def test_deit_logits_match_timm(name, batch, res):
  tmodel = _timm(name, img_size=res)
  variables = load_torch_checkpoint(name, tmodel.state_dict(), img_size=res)
  model = models.create(name, img_size=res)
  x = _nchw(batch, res)
  with torch.no_grad():
    expected = tmodel(torch.from_numpy(x)).numpy()
  logits, out = _apply(model, variables, x)
  _check(f"{name}@{res}", logits, expected)
  assert _num_params(variables["params"]) == sum(p.numel() for p in tmodel.parameters())
  assert out["tokens"].shape == (batch, (res // 16) ** 2, model.embed_dim)


def test_deit_distilled_matches_timm_in_eval_and_train():
  """Eval: our logits == timm's eval output (the average of the two heads). Train mode: class
  head logits, and out['cls_logits'] / out['dist_logits'] == timm's distilled-training tuple."""
  name = "deit_small_distilled_patch16_224"
  tmodel = _timm(name)
  variables = load_torch_checkpoint(name, tmodel.state_dict())
  model = models.create(name)
  x = _nchw(2, 224)
  with torch.no_grad():
    expected = tmodel(torch.from_numpy(x)).numpy()
    tmodel.set_distilled_training(True)
    tmodel.train()  # all drop rates are 0: train mode differs only in the heads' output
    t_cls, t_dist = (t.numpy() for t in tmodel(torch.from_numpy(x)))
  logits, out = _apply(model, variables, x)
  _check(name, logits, expected)
  _check(name + " cls head", out["cls_logits"], t_cls)
  _check(name + " dist head", out["dist_logits"], t_dist)
  np.testing.assert_allclose(logits, (out["cls_logits"] + out["dist_logits"]) / 2, atol=1e-6)
  train_logits, train_out = _apply(model, variables, x, train=True)
  _check(name + " train", train_logits, t_cls)
  _check(name + " train dist head", train_out["dist_logits"], t_dist)
  assert sorted(out) == ["cls_logits", "dist_logits", "grid", "logits", "pre_logits", "tokens"]
  assert out["tokens"].shape == (2, 196, 384) and out["pre_logits"].shape == (2, 384)


@pytest.mark.parametrize("name", ["deit_base_patch16_384", "deit_base_distilled_patch16_384",
                                  "deit_base_distilled_patch16_224"])
def test_deit_base_checkpoint_layout(name):
  """The big models: timm's state dict converts exactly onto ours (names and shapes), no run.
  timm builds on the meta device (no memory, no init); zero-stride arrays stand in for tensors."""
  tmodel = timm.create_model(name, pretrained=False, device="meta")
  zero = np.zeros((), np.float32)
  state = {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in tmodel.state_dict().items()}
  variables = load_torch_checkpoint(name, state)  # strict: raises on any mismatch
  n_prefix = 2 if "distilled" in name else 1
  res = models.create(name).img_size
  assert variables["params"]["pos_embed"].shape == (1, (res // 16) ** 2 + n_prefix, 768)
  assert _num_params(variables["params"]) == sum(p.numel() for p in tmodel.parameters())


DEIT_NAMES = [f"deit_{s}{d}_patch16_{r}" for s, r in
              (("tiny", 224), ("small", 224), ("base", 224), ("base", 384))
              for d in ("", "_distilled")]


@pytest.mark.parametrize("name", DEIT_NAMES)
def test_deit_sizes_match_thesis(name):
  """Thesis Table 3.5 gives whole millions (5M, 22M, 86M; distilled 6M, 22M, 87M)."""
  meta = models.paper_metadata(name)
  count = models.num_params(name) / 1e6
  assert abs(count - meta["params_m"]) < meta["params_tol_m"] == 1.0, (count, meta)
  if "gflops" in meta:
    assert models.flops(name) / 1e9 == pytest.approx(meta["gflops"], rel=0.03)
  defaults = models.default_kwargs(name)
  assert defaults["pos_embed_cls_slot"] and defaults["layerscale_init"] is None
  assert not defaults["drop_path_uniform"]
  assert defaults["distilled"] == ("distilled" in name)


def test_deit_linear_stochastic_depth_rule():
  """DeiT: drop-path rate i / (depth - 1) * drop_path_rate (timm linspace); DeiT III: uniform."""
  def rates(name):
    model = models.create(name, img_size=32, depth=4, drop_path_rate=0.2, num_classes=3)
    seen = []

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, layers.DropPath) and context.method_name == "__call__":
        seen.append(context.module.rate)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      jax.eval_shape(lambda: model.init_with_output(
          {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
          jnp.zeros((1, 32, 32, 3)), train=True))
    return seen[::2]  # two DropPaths per block (attention, MLP), same rate

  np.testing.assert_allclose(rates("deit_small_patch16_224"), [0.0, 0.2 / 3, 0.4 / 3, 0.2])
  np.testing.assert_allclose(rates("deit3_small_patch16_224"), [0.2] * 4)


def _small_deit(**kw):
  return models.create("deit_tiny_distilled_patch16_224", img_size=32, depth=2, num_classes=5, **kw)


def _variables(name):
  """Random variables for the small test configurations, converted from timm (cheaper than a
  jitted Flax init, whose compilation takes seconds on CI)."""
  if name == "cait_test_patch4_16":
    return load_torch_checkpoint(name, _tiny_timm_cait().state_dict())
  tmodel = _timm(name, img_size=32, depth=2, num_classes=5)
  return load_torch_checkpoint(name, tmodel.state_dict(), img_size=32, depth=2, num_classes=5)


def test_deit_distilled_contract_fusion_and_options():
  model = _small_deit()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  variables = _variables("deit_tiny_distilled_patch16_224")
  apply = lambda m, v: jax.jit(m.apply)(v, x)
  p = variables["params"]
  assert p["pos_embed"].shape == (1, 4 + 2, 192)
  assert p["dist_token"].shape == (1, 1, 192) and p["head_dist"]["kernel"].shape == (192, 5)
  assert "gamma_1" not in p["blocks_0"]
  logits, out = apply(model, variables)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert out["tokens"].shape == (2, 4, 192) and out["pre_logits"].shape == (2, 192)
  # 'mean_probs' fusion (the paper's wording): softmax(logits) is the mean of the two softmaxes.
  probs_model = _small_deit(distilled_fusion="mean_probs")
  fused, _ = apply(probs_model, variables)
  expected = (jax.nn.softmax(out["cls_logits"]) + jax.nn.softmax(out["dist_logits"])) / 2
  np.testing.assert_allclose(jax.nn.softmax(fused), expected, atol=1e-6)
  # Headless (num_classes=0): logits are the pre-logits, the mean of the two normalised tokens.
  headless = models.create("deit_tiny_distilled_patch16_224", img_size=32, depth=2, num_classes=0)
  feats, hout = apply(headless, {"params": {k: v for k, v in p.items() if "head" not in k}})
  assert feats.shape == (2, 192)
  np.testing.assert_allclose(feats, hout["pre_logits"], atol=1e-6)
  with pytest.raises(ValueError, match="global_pool must be 'token'"):
    jax.eval_shape(_small_deit(global_pool="avg").init, jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "cait_test_patch4_16"])
def test_train_drop_path_remat_and_bfloat16(name):
  """(ViT remat is covered in test_models.py; here CaiT's, with its class-attention blocks.)"""
  is_cait = name.startswith("cait")
  kw = {} if is_cait else dict(img_size=32, depth=2, num_classes=5)
  model = models.create(name, drop_path_rate=0.3, **kw)
  res = model.img_size
  x = jax.random.normal(jax.random.PRNGKey(1), (4, res, res, 3))
  variables = _variables(name)

  @jax.jit
  def run(params):
    def loss(p, m, rng):
      logits, _ = m.apply({"params": p}, x, train=True, rngs={"dropout": rng})
      return jnp.mean(logits ** 2), logits

    rng = jax.random.PRNGKey(3)
    (_, t1), g1 = jax.value_and_grad(loss, has_aux=True)(params, model, rng)
    (_, t1r), g2 = (jax.value_and_grad(loss, has_aux=True)(params, model.clone(remat=True), rng)
                    if is_cait else ((None, t1), g1))
    t2 = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(4)})[0]
    ref = model.apply({"params": params}, x)[0]
    low, low_out = model.clone(dtype=jnp.bfloat16).apply({"params": params}, x)
    return g1, g2, t1, t1r, t2, ref, low, low_out["tokens"]

  g1, g2, t1, t1r, t2, ref, low, low_tokens = run(variables["params"])
  # remat recomputes the same function (same dropout masks): same logits and gradients.
  np.testing.assert_allclose(t1, t1r, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert all(np.isfinite(a).all() for a in jax.tree_util.tree_leaves(g1))
  assert not np.allclose(t1, t2)  # drop path is active: another rng, other outputs
  # bfloat16 compute: float32 logits close to the float32 model's (params stay float32).
  assert low.dtype == jnp.float32 and low_tokens.dtype == jnp.bfloat16
  assert np.abs(np.asarray(low) - np.asarray(ref)).max() < 0.1 * max(1.0, np.abs(ref).max())


# --- CaiT ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,batch", [
    ("cait_xxs24_224", 2),
    ("cait_s24_224", 1),
    ("cait_xxs24_384", 1),
])
def test_cait_logits_match_timm(name, batch):
  tmodel = _timm(name)
  variables = load_torch_checkpoint(name, tmodel.state_dict())
  model = models.create(name)
  x = _nchw(batch, model.img_size)
  with torch.no_grad():
    expected = tmodel(torch.from_numpy(x)).numpy()
  logits, out = _apply(model, variables, x)
  _check(name, logits, expected)
  n = (model.img_size // 16) ** 2
  assert out["tokens"].shape == (batch, n, model.embed_dim)
  assert _num_params(variables["params"]) == sum(p.numel() for p in tmodel.parameters())


def _tiny_timm_cait(**kw):
  torch.manual_seed(0)
  m = timm.models.cait.Cait(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                            mlp_ratio=2.0, mlp_ratio_token_only=2.0, init_values=0.1,
                            num_classes=10, **kw)
  _randomize_(m, seed=3, fan_in_weights=True)
  return m


def test_cait_official_checkpoint_format_gradients_and_contract():
  """deit-repo CaiT files are {'model': {'module.' + key: tensor}}; gradients (talking heads,
  class attention, LayerScale) match timm's for every parameter; the (logits, out) contract."""
  tmodel = _tiny_timm_cait()
  model = models.create("cait_test_patch4_16")
  assert isinstance(model, CaiT)
  wrapped = {"model": {"module." + k: v for k, v in tmodel.state_dict().items()}, "epoch": 3}
  variables = load_torch_checkpoint("cait_test_patch4_16", wrapped)
  p = variables["params"]
  assert p["pos_embed"].shape == (1, 16, 32)  # no class-token slot
  assert set(p["blocks_0"]["attn"]) == {"qkv", "proj", "proj_l", "proj_w"}
  assert set(p["blocks_token_only_1"]["attn"]) == {"q", "k", "v", "proj"}

  rng = np.random.RandomState(1)
  x = rng.randn(3, 3, 16, 16).astype(np.float32)
  w = rng.randn(3, 10).astype(np.float32)
  tmodel.train()
  (tmodel(torch.from_numpy(x)) * torch.from_numpy(w)).sum().backward()
  expected = convert_state_dict(model, {k: t.grad for k, t in tmodel.named_parameters()})["params"]

  xj = jnp.asarray(x.transpose(0, 2, 3, 1))

  def loss(params):
    logits, _ = model.apply({"params": params}, xj, train=True,
                            rngs={"dropout": jax.random.PRNGKey(0)})
    return jnp.sum(logits * w)

  grads, (logits, out) = jax.jit(lambda q: (jax.grad(loss)(q), model.apply({"params": q}, xj)))(p)
  flat_e = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  flat_g = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
  assert flat_e.keys() == flat_g.keys()
  for path, e in flat_e.items():
    # Floor 1e-2 (gradients here are O(1)): the class-attention key bias has an exactly zero
    # gradient (softmax is shift-invariant), both sides give only ~1e-7 round-off there.
    rel = np.abs(np.asarray(flat_g[path]) - e).max() / max(np.abs(e).max(), 1e-2)
    assert rel <= 1e-4, f"{jax.tree_util.keystr(path)}: max rel err {rel:.3g}"

  with torch.no_grad():
    _check("cait tiny", logits, tmodel.eval()(torch.from_numpy(x)).numpy())
  assert sorted(out) == ["grid", "logits", "pre_logits", "tokens"]
  assert out["tokens"].shape == (3, 16, 32) and out["pre_logits"].shape == (3, 32)
  head = p["head"]
  np.testing.assert_allclose(out["pre_logits"] @ head["kernel"] + head["bias"], logits, atol=1e-5)
  with pytest.raises(ValueError, match="img_size=32"):
    model.apply(variables, jnp.zeros((1, 32, 32, 3)))


def test_cait_avg_pool_matches_timm():
  tmodel = _tiny_timm_cait(global_pool="avg").eval()
  model = models.create("cait_test_patch4_16", global_pool="avg")
  variables = load_torch_checkpoint(model, tmodel.state_dict())
  x = _nchw(2, 16)
  with torch.no_grad():
    expected = tmodel(torch.from_numpy(x)).numpy()
  _check("cait avg pool", _apply(model, variables, x)[0], expected)


def test_head_mixing_equals_linear_over_heads():
  """mix_heads == torch Linear(h, h) on the (b, q, k, h)-permuted maps, as the reference does;
  its gradients == autodiff's."""
  a = np.random.RandomState(0).randn(2, 3, 5, 7).astype(np.float32)
  lin = torch.nn.Linear(3, 3)
  with torch.no_grad():
    expected = lin(torch.from_numpy(a).permute(0, 2, 3, 1)).permute(0, 3, 1, 2).numpy()
  args = (jnp.asarray(a), jnp.asarray(lin.weight.detach().numpy().T),
          jnp.asarray(lin.bias.detach().numpy()))
  np.testing.assert_allclose(mix_heads(*args), expected, atol=1e-6)
  # The hand-written VJP equals autodiff of the plain einsum, for all three arguments.
  cot = jnp.asarray(np.random.RandomState(1).randn(*a.shape).astype(np.float32))
  ref = lambda x, w, b: jnp.einsum("bhqk,hg->bgqk", x, w) + b[None, :, None, None]
  got = jax.grad(lambda *t: jnp.sum(mix_heads(*t) * cot), argnums=(0, 1, 2))(*args)
  want = jax.grad(lambda *t: jnp.sum(ref(*t) * cot), argnums=(0, 1, 2))(*args)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)


CAIT_SIZES = {  # thesis Table 3.15: (params M at 224, heads, depth, LayerScale init, Table 3.16)
    "xxs24": (12.0, 4, 24, 1e-5), "xxs36": (17.3, 4, 36, 1e-6), "xs24": (26.6, 6, 24, 1e-5),
    "xs36": (38.6, 6, 36, 1e-6), "s24": (46.9, 8, 24, 1e-5), "s36": (68.2, 8, 36, 1e-6),
    "s48": (89.5, 8, 48, 1e-6), "m24": (185.9, 16, 24, 1e-5), "m36": (270.9, 16, 36, 1e-6),
    "m48": (356.0, 16, 48, 1e-6),
}
TIMM_CAIT = ["cait_xxs24_224", "cait_xxs24_384", "cait_xxs36_224", "cait_xxs36_384",
             "cait_xs24_384", "cait_s24_224", "cait_s24_384", "cait_s36_384", "cait_m36_384",
             "cait_m48_448"]


def test_cait_zoo_has_timm_names_and_thesis_sizes():
  names = [n for n in models.list_models() if n.startswith("cait_") and "test" not in n]
  assert set(TIMM_CAIT) <= set(names)
  sizes = {n.split("_")[1] for n in names}
  assert sizes == set(CAIT_SIZES)
  for name in names:
    params_m, heads, depth, eps = CAIT_SIZES[name.split("_")[1]]
    kw = models.default_kwargs(name)
    assert (kw["num_heads"], kw["depth"], kw["layerscale_init"]) == (heads, depth, eps), name
    assert kw["embed_dim"] == 48 * heads and kw["img_size"] == int(name.split("_")[2])
    assert models.paper_metadata(name)["params_m"] == params_m
  # layerscale_init is what the LayerScale parameters start at, in both kinds of block.
  from visrep_jax.models.cait import CaiTBlock, ClassAttentionBlock
  x = jnp.ones((1, 3, 8))
  v = jax.eval_shape(lambda k: CaiTBlock(2, layerscale_init=1e-6).init(k, x, True),
                     jax.random.PRNGKey(0))
  assert v["params"]["gamma_1"].shape == (8,)
  ls = ClassAttentionBlock(2, layerscale_init=1e-6).init(jax.random.PRNGKey(0), x, x[:, :1], True)
  np.testing.assert_array_equal(ls["params"]["gamma_1"], np.float32(1e-6))
  np.testing.assert_array_equal(ls["params"]["gamma_2"], np.float32(1e-6))


@pytest.mark.parametrize("size", sorted(CAIT_SIZES))
def test_cait_parameter_counts_match_thesis(size):
  """Counted at 224 from jax.eval_shape (no memory); Table 3.15 rounds to 0.1M (M-48: 1M)."""
  name = next(n for n in models.list_models() if n.startswith(f"cait_{size}_"))
  count = models.num_params(name, img_size=224) / 1e6
  tol = 0.5 if size == "m48" else 0.05
  assert abs(count - CAIT_SIZES[size][0]) <= tol, (name, count)


def test_cait_flops_match_thesis_with_talking_heads_counted():
  """The thesis counts the talking-heads Linear(h, h) maps as multiply-adds; so do we."""
  for name in ("cait_xxs24_224", "cait_s24_384"):
    paper = models.paper_metadata(name)["gflops"]
    assert models.flops(name) / 1e9 == pytest.approx(paper, rel=0.03)
