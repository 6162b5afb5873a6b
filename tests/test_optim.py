"""Optimizer features: layer-wise LR decay ids for every transformer family, LR multipliers
against separately configured per-group optimizers (and PyTorch param groups), the per-epoch
schedule against timm's formula as deit steps it, and the EMA of the weights.

Resuming a run with an EMA bit for bit is tested end to end (through ``visrep_jax.main``,
SIGKILL + resume) in tests/test_distill.py, together with distillation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from visrep_jax import config_lib, models, optim
from visrep_jax.trainers import common, supervised
from test_trainer import runlocal_config

TINY_DEIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def shapes(name, **overrides):
  return models.variable_shapes(name, **overrides)["params"]


def by_top_level(ids):
  """{top-level module: its layer id} (asserting all its parameters share one id)."""
  out = {}
  for path, i in ids.items():
    top = path.split("/")[0]
    assert out.setdefault(top, i) == i, (path, i, out[top])
  return out


@pytest.mark.parametrize("name,overrides,expected,num_layers", [
    ("vit_test_patch4_16", {},  # DeiT III-style ViT
     dict(patch_embed=0, cls_token=0, pos_embed=0, blocks_0=1, blocks_1=2, norm=3, head=3), 2),
    ("deit_tiny_distilled_patch16_224", TINY_DEIT,
     dict(patch_embed=0, cls_token=0, dist_token=0, pos_embed=0, blocks_0=1, blocks_1=2, norm=3,
          head=3, head_dist=3), 2),
    ("cait_test_patch4_16", {},  # class-attention blocks follow the self-attention trunk
     dict(patch_embed=0, cls_token=0, pos_embed=0, blocks_0=1, blocks_1=2, blocks_token_only_0=3,
          blocks_token_only_1=4, norm=5, head=5), 4),
    ("deit3_demo_convstem_28", {"depth": 2},  # ViT_C: the conv stem is the embedding
     dict(stem_conv_0=0, stem_bn_0=0, stem_conv_1=0, stem_bn_1=0, stem_conv_2=0, stem_bn_2=0,
          patch_embed=0, cls_token=0, pos_embed=0, blocks_0=1, blocks_1=2, norm=3, head=3), 2),
    ("resmlp_test_patch4_16", {},
     dict(patch_embed=0, blocks_0=1, blocks_1=2, norm=3, head=3), 2),
    ("patchconvnet_test", {},
     dict(patch_embed=0, cls_token=0, blocks_0=1, blocks_1=2, blocks_token_only_0=3, norm=4,
          head=4), 3),
])
def test_layer_ids_per_family(name, overrides, expected, num_layers):
  ids, n = optim.layer_ids(shapes(name, **overrides))
  assert n == num_layers
  assert by_top_level(ids) == expected


def test_layer_ids_of_deeper_stacks_are_ordered_numerically():
  params = {f"blocks_{i}": {"kernel": jnp.zeros((2, 2))} for i in range(12)}
  params.update({"blocks_token_only_0": {"kernel": jnp.zeros((2, 2))},
                 "head": {"kernel": jnp.zeros((2, 2))}, "pos_embed": jnp.zeros((1, 2, 2))})
  ids, n = optim.layer_ids(params)
  assert n == 13
  assert ids["blocks_10/kernel"] == 11 and ids["blocks_2/kernel"] == 3
  assert ids["blocks_token_only_0/kernel"] == 13 and ids["head/kernel"] == 14
  assert ids["pos_embed"] == 0


def test_multipliers_combine_layer_decay_and_regexes():
  params = shapes("vit_test_patch4_16")
  m = traverse_util.flatten_dict(
      optim.lr_multipliers(params, 0.5, [("^head/", 10.0), ("kernel$", 2.0)]), sep="/")
  # layer_decay ** (num_layers + 1 - id), num_layers = 2; every matching regex multiplies.
  assert m["head/kernel"] == 20.0 and m["head/bias"] == 10.0
  assert m["norm/scale"] == 1.0
  assert m["blocks_1/attn/qkv/kernel"] == 0.5 * 2.0 and m["blocks_1/attn/qkv/bias"] == 0.5
  assert m["blocks_0/mlp/fc1/kernel"] == 0.25 * 2.0
  assert m["patch_embed/proj/kernel"] == 0.125 * 2.0 and m["cls_token"] == 0.125
  # Nothing to scale: the optimizer state keeps the plain layout (old checkpoints still load).
  c = _opt_config("adamw")
  tx, _ = optim.make_optimizer(c, params, 10, 5)
  plain = optim.adamw(optax.constant_schedule(0.1), 0.1,
                      optim.weight_decay_mask(params, c.optimizer.no_decay))
  assert (jax.tree.structure(jax.eval_shape(tx.init, params))
          == jax.tree.structure(jax.eval_shape(plain.init, params)))


def _opt_config(name, layer_decay=1.0, multipliers=(), lr=0.05, wd=0.1):
  c = config_lib.base_config()
  c.optimizer.name = name
  c.optimizer.lr = lr
  c.optimizer.weight_decay = wd
  c.optimizer.layer_decay = layer_decay
  c.optimizer.lr_multipliers = list(multipliers)
  c.schedule.name = "constant"
  return c


def _toy_params(seed=0):
  rng = np.random.default_rng(seed)
  shapes_ = {"patch_embed/proj/kernel": (4, 3), "patch_embed/proj/bias": (3,),
             "pos_embed": (1, 2, 3), "blocks_0/fc/kernel": (3, 3), "blocks_0/fc/bias": (3,),
             "blocks_1/fc/kernel": (3, 3), "blocks_1/norm/scale": (3,),
             "head/kernel": (3, 2), "head/bias": (2,)}
  flat = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes_.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


def _grads(params, steps, seed=1):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
          for _ in range(steps)]


def _run(tx, params, grads):
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


LAYER_DECAY, MULTS = 0.5, [("^head/", 3.0), ("bias$", 0.1)]


@pytest.mark.parametrize("name", ["adamw", "lamb", "sgd"])
def test_multipliers_equal_separately_configured_groups(name):
  """One optimizer with multipliers == one optimizer per parameter group, each with lr * m and
  the same weight decay (decoupled wd then scales with lr * m, as in PyTorch param groups;
  LAMB's trust ratio stays per parameter)."""
  params, lr = _toy_params(), 0.05
  grads = _grads(params, 3)
  c = _opt_config(name, LAYER_DECAY, MULTS, lr=lr)
  tx, _ = optim.make_optimizer(c, params, total_steps=10, steps_per_epoch=5)
  got = traverse_util.flatten_dict(_run(tx, params, grads), sep="/")

  mults = traverse_util.flatten_dict(optim.lr_multipliers(params, LAYER_DECAY, MULTS), sep="/")
  assert len(set(mults.values())) >= 5  # several groups really differ
  flat_p = traverse_util.flatten_dict(params, sep="/")
  flat_mask = traverse_util.flatten_dict(optim.weight_decay_mask(params, c.optimizer.no_decay),
                                         sep="/")
  flat_g = [traverse_util.flatten_dict(g, sep="/") for g in grads]
  for m in sorted(set(mults.values())):
    keys = [k for k in flat_p if mults[k] == m]
    sub = lambda flat: {k: flat[k] for k in keys}
    kw = {k: v for k, v in c.optimizer.items() if k not in optim._NOT_OPTIMIZER_KWARGS}
    group_tx = optim.OPTIMIZERS.get(name)(lr=lr * m, weight_decay=c.optimizer.weight_decay,
                                          mask=sub(flat_mask), **kw)
    want = _run(group_tx, sub(flat_p), [sub(g) for g in flat_g])
    for k in keys:
      np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-7, err_msg=f"{name} {k}")
    assert not np.allclose(got[keys[0]], flat_p[keys[0]])  # the group did move


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_multipliers_match_pytorch_param_groups(name):
  torch = pytest.importorskip("torch")
  params, lr, wd = _toy_params(), 0.05, 0.1
  grads = _grads(params, 3)
  c = _opt_config(name, LAYER_DECAY, MULTS, lr=lr, wd=wd)
  tx, _ = optim.make_optimizer(c, params, total_steps=10, steps_per_epoch=5)
  got = traverse_util.flatten_dict(_run(tx, params, grads), sep="/")

  mults = traverse_util.flatten_dict(optim.lr_multipliers(params, LAYER_DECAY, MULTS), sep="/")
  decay = traverse_util.flatten_dict(optim.weight_decay_mask(params, c.optimizer.no_decay),
                                     sep="/")
  flat_p = traverse_util.flatten_dict(params, sep="/")
  tp = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in flat_p.items()}
  groups = [{"params": [tp[k]], "lr": lr * mults[k], "weight_decay": wd if decay[k] else 0.0}
            for k in tp]
  if name == "adamw":
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
  else:
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
  for g in grads:
    flat_g = traverse_util.flatten_dict(g, sep="/")
    for k, t in tp.items():
      t.grad = torch.tensor(np.asarray(flat_g[k]))
    opt.step()
  for k, t in tp.items():
    np.testing.assert_allclose(got[k], t.detach().numpy(), rtol=2e-5, atol=1e-6, err_msg=k)


def _timm_deit_lr(step, spe, lr, epochs, warmup_epochs, warmup_lr, min_lr):
  """By hand: timm CosineLRScheduler._get_lr(t) (one cycle, no warmup_prefix), with deit's
  stepping: scheduler.step(epoch) after epoch `epoch`, so epoch e runs at t = max(e - 1, 0)."""
  t = max(step // spe - 1, 0)
  if t < warmup_epochs:
    return warmup_lr + t * (lr - warmup_lr) / warmup_epochs
  if t >= epochs:
    return min_lr
  return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / epochs))


def test_per_epoch_schedule_follows_timm_as_stepped_by_deit():
  c = config_lib.base_config()
  c.optimizer.lr = 0.4
  c.schedule.update(name="cosine", per_epoch=True, warmup_epochs=3.0, warmup_init_lr=1e-3,
                    min_lr=1e-2)
  spe, epochs = 4, 10
  fn = optim.make_schedule(c, epochs * spe, spe)
  got = np.array([float(fn(s)) for s in range(epochs * spe + 3 * spe)])
  want = np.array([_timm_deit_lr(s, spe, 0.4, epochs, 3, 1e-3, 1e-2) for s in range(len(got))])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  per_epoch = got.reshape(-1, spe)
  assert (per_epoch == per_epoch[:, :1]).all()  # constant within each epoch
  assert per_epoch[0, 0] == per_epoch[1, 0] == pytest.approx(1e-3)  # deit's step(epoch)
  assert per_epoch[4, 0] == pytest.approx(0.01 + 0.5 * 0.39 * (1 + math.cos(math.pi * 3 / 10)))
  # Warmup given in steps: warmup_steps / steps_per_epoch epochs.
  c.schedule.update(warmup_epochs=0.0, warmup_steps=8)
  fn = optim.make_schedule(c, epochs * spe, spe)
  np.testing.assert_allclose([float(fn(s)) for s in range(epochs * spe)],
                             [_timm_deit_lr(s, spe, 0.4, epochs, 2, 1e-3, 1e-2)
                              for s in range(epochs * spe)], rtol=1e-6)


def test_per_epoch_schedule_matches_timm_scheduler():
  torch = pytest.importorskip("torch")
  timm_sched = pytest.importorskip("timm.scheduler")
  lr, epochs, warmup, warmup_lr, min_lr, spe = 5e-4, 12, 5, 1e-6, 1e-5, 3
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.AdamW([p], lr=lr)
  sched = timm_sched.CosineLRScheduler(opt, t_initial=epochs, lr_min=min_lr, warmup_t=warmup,
                                       warmup_lr_init=warmup_lr, cycle_limit=1, t_in_epochs=True)
  timm_lrs = []
  for epoch in range(epochs):  # deit main.py's loop
    timm_lrs.append(opt.param_groups[0]["lr"])
    sched.step(epoch)
  c = config_lib.base_config()
  c.optimizer.lr = lr
  c.schedule.update(name="cosine", per_epoch=True, warmup_epochs=float(warmup),
                    warmup_init_lr=warmup_lr, min_lr=min_lr)
  fn = optim.make_schedule(c, epochs * spe, spe)
  ours = [float(fn(e * spe + spe - 1)) for e in range(epochs)]
  np.testing.assert_allclose(ours, timm_lrs, rtol=1e-6)


@pytest.mark.parametrize("key,value,match", [
    ("optimizer.layer_decay", 0.0, r"layer_decay must be in \(0, 1\]"),
    ("optimizer.layer_decay", 1.5, r"layer_decay must be in \(0, 1\]"),
    ("optimizer.lr_multipliers", [("head", "x")], r"list of \(regex, multiplier\) pairs"),
    ("optimizer.lr_multipliers", [("head",)], r"list of \(regex, multiplier\) pairs"),
    ("optimizer.lr_multipliers", [("(head", 2.0)], "not a valid regular expression"),
    ("optimizer.lr_multipliers", [("head", -1.0)], "must be a finite number >= 0"),
    ("ema.decay", 1.0, r"ema.decay must be in \[0, 1\)"),
])
def test_bad_optimizer_options(key, value, match):
  c = runlocal_config()
  sect, k = key.split(".")
  with c.unlocked():
    c[sect][k] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c, num_devices=1)


def test_ema_update_covers_params_and_batchnorm_statistics():
  ema = {"params": {"w": np.full((2,), 1.0, np.float32)},
         "model_state": {"batch_stats": {"mean": np.zeros((2,), np.float32)},
                         "count": np.array(3, np.int32)}}
  new = common.ema_update(jax.tree.map(jnp.asarray, ema), {"w": jnp.array([3.0, 5.0])},
                          {"batch_stats": {"mean": jnp.array([10.0, -10.0])},
                           "count": jnp.array(4, jnp.int32)}, decay=0.75)
  np.testing.assert_allclose(new["params"]["w"], [1.5, 2.0], rtol=1e-7)
  np.testing.assert_allclose(new["model_state"]["batch_stats"]["mean"], [2.5, -2.5], rtol=1e-7)
  assert int(new["model_state"]["count"]) == 4 and new["model_state"]["count"].dtype == jnp.int32


def test_ema_of_a_few_training_steps_matches_numpy():
  """Three jitted train steps of a tiny ViT with an EMA (data parallel on 2 devices)."""
  decay = 0.8
  model = models.create("vit_test_patch4_16", num_classes=10)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  state, shardings, tx = common.create_train_state(
      model, lambda p: optax.adamw(1e-2), jax.random.PRNGKey(0), (16, 16, 3), mesh, ema=True)
  assert state.ema and not state.ema["model_state"]
  ema = jax.device_get(state.ema["params"])
  jax.tree.map(np.testing.assert_array_equal, ema, jax.device_get(state.params))
  step = common.jit_train_step(common.make_train_step(model, tx, 10, ema_decay=decay), shardings,
                               jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
                               mesh)
  rng = np.random.default_rng(0)
  for _ in range(3):
    batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 10, 8).astype(np.int32)}
    state, _ = step(state, batch, jax.random.PRNGKey(1))
    params = jax.device_get(state.params)
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
  got = jax.device_get(state.ema["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, ema)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), got, params))
  assert max(moved) > 1e-4  # the EMA lags the weights
  # Evaluating the EMA: the same tree and shardings, the EMA weights in place of the weights.
  view = common.ema_as_state(state)
  assert jax.tree.structure(view) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(view.params), got)


def test_resume_when_the_ema_setting_changed(tmp_path):
  """A checkpoint written with an EMA resumes without one (dropped), and one written without an
  EMA (or before the EMA existed) resumes with one (started from the restored weights)."""
  from visrep_jax import checkpoint as ckpt_lib
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
  model_state = {"batch_stats": {"mean": jnp.full(3, 2.0)}}
  opt_state = optax.sgd(0.1, momentum=0.9).init(params)

  def make(ema):
    return common.TrainState(step=jnp.array(5, jnp.int32), params=params, opt_state=opt_state,
                             model_state=model_state, ema=ema)

  with_ema = make({"params": jax.tree.map(lambda x: x * 0.5, params),
                   "model_state": jax.tree.map(lambda x: x * 0.5, model_state)})
  old_style = {"step": jnp.array(5, jnp.int32), "params": params, "opt_state": opt_state,
               "model_state": model_state}  # written before TrainState had an `ema`
  for name, saved, target, want_ema in [("ema", with_ema, make({}), {}),
                                        ("none", make({}), with_ema, "copy"),
                                        ("old", old_style, with_ema, "copy"),
                                        ("old2", old_style, make({}), {})]:
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / name), async_save=False)
    ckpt.save(5, saved, {"step": 5}, force=True)
    shardings = jax.tree.map(lambda _: repl, target)
    state, _ = supervised._restore(ckpt, 5, target, shardings)
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, state.params, params)
    jax.tree.map(np.testing.assert_array_equal, state.model_state, model_state)
    if want_ema == "copy":
      jax.tree.map(np.testing.assert_array_equal, state.ema,
                   {"params": params, "model_state": model_state})
    else:
      assert state.ema == {}


def test_resume_with_another_model_is_one_error_naming_the_differences(tmp_path):
  """Resuming a workdir with a config whose train state does not fit its checkpoint (another
  model or optimizer) raises CheckpointMismatchError naming what differs, with the layer1
  hint for the few-shot ResNet-34 layouts, the optimizer hint for optimizer-only changes; an
  EMA difference on top of another one reports the other one, not the EMA fallback's."""
  from visrep_jax import checkpoint as ckpt_lib
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  conv = {"kernel": jnp.ones((3, 3, 4, 4))}
  params = {"backbone": {"layer1_0": {"conv1": conv}}, "head": {"kernel": jnp.ones((4, 5))}}
  adam = optax.adam(1e-3)

  def state(p, opt=adam, ema=None):
    return common.TrainState(step=jnp.array(5, jnp.int32), params=p, opt_state=opt.init(p),
                             model_state={}, ema=ema if ema is not None else {})

  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "w"), async_save=False)
  ckpt.save(5, state(params), {"step": 5}, force=True)

  def resume(target):
    with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
      supervised._restore(ckpt, 5, target, jax.tree.map(lambda _: repl, target))
    assert "Use the config it was trained with, in " in str(e.value)
    assert str(tmp_path / "w" / "config.json") in str(e.value)
    assert "\n" not in str(e.value)
    return e.value

  (tmp_path / "w" / "config.json").write_text("{}")  # as the trainers write it

  # Another head (class count): the parameter comes first, with both shapes. Found before
  # orbax reads anything (its reads, failing mid-way, would each print a report at exit).
  orbax_restore, ckpt.manager.restore = ckpt.manager.restore, None
  try:
    e = resume(state(dict(params, head={"kernel": jnp.ones((4, 7))})))
  finally:
    ckpt.manager.restore = orbax_restore
  assert e.shapes[0] == ("['params']['head']['kernel']", (4, 5), (4, 7)), e.shapes
  assert not e.missing and not e.unexpected
  assert "other shapes ['params']['head']['kernel'] (4, 5) (config: (4, 7))" in str(e)
  assert "is config.model the checkpoint's model?" in str(e)
  # Only layer1's projection shortcut differs: the flag to set is named.
  with_shortcut = dict(params, backbone={"layer1_0": {"conv1": conv, "downsample_conv": conv}})
  e = resume(state(with_shortcut))
  assert e.missing[0] == "['params']['backbone']['layer1_0']['downsample_conv']['kernel']"
  assert "set --config.model.downsample_first_stage=False" in str(e)
  # Only the optimizer differs (SGD with momentum instead of Adam).
  e = resume(state(params, opt=optax.sgd(0.1, momentum=0.9)))
  assert all(k.startswith("['opt_state']") for k in e.missing + e.unexpected), e
  assert "the optimizer config (config.optimizer) differs" in str(e)
  # Only the optax chain's length differs (adamw -> lamb in optim.py): no array differs, so
  # orbax's description of the containers, on one line, with the optimizer hint.
  e = resume(state(params, opt=optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4),
                                           optax.scale(-1e-3))))
  assert not (e.missing or e.unexpected or e.shapes)
  assert "the optimizer config (config.optimizer) differs" in str(e)
  # An EMA and another head: the head is reported (the EMA alone would resume).
  e = resume(state(dict(params, head={"kernel": jnp.ones((4, 7))}),
                   ema={"params": params, "model_state": {}}))
  assert e.shapes[0][0] == "['params']['head']['kernel']", e
  # An EMA and layer1's shortcut: the shortcut's entries come first and keep their hint.
  e = resume(state(with_shortcut, ema={"params": with_shortcut, "model_state": {}}))
  assert e.missing[0] == "['params']['backbone']['layer1_0']['downsample_conv']['kernel']"
  assert ("set --config.model.downsample_first_stage=False to match the checkpoint's layer1. "
          "The weight EMA (config.ema.decay) differs too.") in str(e)
  ckpt.close()
  # The few-shot trainer's WORKDIR/best checkpoints name the run's config.json too.
  best = ckpt_lib.Checkpointer(str(tmp_path / "w" / "best"), async_save=False)
  assert best.config_json() == str(tmp_path / "w" / "config.json")
  best.close()
  none = ckpt_lib.Checkpointer(str(tmp_path / "v"), async_save=False)
  assert none.config_json() is None
  none.close()
  # An empty dict facing a filled one is not listed itself, the entries under it are; an empty
  # dict facing nothing is (a checkpoint from before the EMA existed).
  w = np.zeros(2)
  assert ckpt_lib._differences({"ema": {}}, {"ema": {"w": w}}) == (["['ema']['w']"], [], [])
  assert ckpt_lib._differences({"ema": {"w": w}}, {"ema": {}}) == ([], ["['ema']['w']"], [])
  assert ckpt_lib._differences({}, {"ema": {}}) == (["['ema']"], [], [])


def test_exponential_schedule_matches_tensorflow_exponential_decay():
  """Meta-Dataset's learner decays with tf.compat.v1.train.exponential_decay(staircase=True)."""
  tf = pytest.importorskip("tensorflow")
  c = config_lib.base_config()
  c.optimizer.lr = 1.21e-3
  c.schedule.update(name="exponential", decay_rate=0.915, decay_steps=500, staircase=True,
                    warmup_steps=0, min_lr=0.0)
  fn = optim.make_schedule(c, total_steps=10_000, steps_per_epoch=100)
  steps = [0, 1, 499, 500, 501, 999, 1000, 4321, 9999]
  for staircase in (True, False):
    c.schedule.staircase = staircase
    fn = optim.make_schedule(c, total_steps=10_000, steps_per_epoch=100)
    for s in steps:
      ref = tf.compat.v1.train.exponential_decay(1.21e-3, s, 500, 0.915, staircase=staircase)
      ref = ref() if callable(ref) else ref  # a callable in eager mode
      np.testing.assert_allclose(float(fn(s)), float(ref), rtol=1e-5, err_msg=f"step {s}")
  # A warmup delays the decay: it counts from the end of the warmup.
  c.schedule.update(staircase=True, warmup_steps=100, warmup_init_lr=0.0)
  fn = optim.make_schedule(c, total_steps=10_000, steps_per_epoch=100)
  np.testing.assert_allclose(float(fn(50)), 1.21e-3 / 2, rtol=1e-5)
  np.testing.assert_allclose(float(fn(599)), 1.21e-3, rtol=1e-5)
  np.testing.assert_allclose(float(fn(600)), 1.21e-3 * 0.915, rtol=1e-5)


def test_exponential_schedule_config_errors():
  c = config_lib.base_config()
  c.total_steps = 10
  c.schedule.update(name="exponential", decay_steps=0)
  with pytest.raises(config_lib.ConfigError, match="decay_steps must be a positive integer"):
    config_lib.validate(c)
  c.schedule.update(decay_steps=10, decay_rate=1.5)
  with pytest.raises(config_lib.ConfigError, match="decay_rate must be in"):
    config_lib.validate(c)


def _adam_reference_step(p, m, v, g, t, lr, b1, b2, eps):
  """One bias-corrected Adam step (eps outside the sqrt) on NumPy arrays, in place."""
  m[:] = b1 * m + (1 - b1) * g
  v[:] = b2 * v + (1 - b2) * g ** 2
  p[:] = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)


def _reference_setup(seed):
  rng = np.random.default_rng(seed)
  params = {"w": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32)}
  copies = [{k: np.array(x) for k, x in params.items()},
            {k: np.zeros_like(x) for k, x in params.items()},
            {k: np.zeros_like(x) for k, x in params.items()}]
  return rng, params, optim.weight_decay_mask(params), copies


def test_normalized_adam_normalises_the_regularised_gradient_then_applies_adam():
  """Against a NumPy statement of the recipe: g = grad + wd * w (masked: no decay on 1-D),
  g /= ||g|| over all parameters, then Adam (bias-corrected, eps outside the sqrt)."""
  rng, params, mask, (p, m, v2) = _reference_setup(0)
  lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-8
  tx = optim.normalized_adam(lr, wd, mask, b1=b1, b2=b2, eps=eps)
  state = tx.init(params)
  jp = jax.tree.map(jnp.asarray, params)
  # Gradients of very different scales per step: Adam alone is nearly scale-invariant per step,
  # but its moments weigh the steps by their scale, so only the normalised version matches.
  for t in range(1, 4):
    grads = {k: rng.normal(size=v.shape).astype(np.float32) * (10.0 ** t) for k, v in p.items()}
    g = {"w": grads["w"] + wd * p["w"], "b": grads["b"]}
    norm = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in g.values()))
    for k in p:
      _adam_reference_step(p[k], m[k], v2[k], g[k] / norm, t, lr, b1, b2, eps)
    upd, state = tx.update(jax.tree.map(jnp.asarray, grads), state, jp)
    jp = optax.apply_updates(jp, upd)
    for k in p:
      np.testing.assert_allclose(np.asarray(jp[k]), p[k], rtol=1e-5, atol=1e-6)


def test_adam_adds_the_l2_penalty_to_the_gradient_not_decoupled():
  """optimizer 'adam' (Meta-Dataset's pre-training): Adam on grad + wd * w (masked), against
  NumPy; AdamW's decoupled decay at the same value gives different parameters."""
  rng, params, mask, (p, m, v2) = _reference_setup(1)
  lr, wd, b1, b2, eps = 1e-2, 0.5, 0.9, 0.999, 1e-8
  tx = optim.adam(lr, wd, mask, b1=b1, b2=b2, eps=eps)
  decoupled = optim.adamw(lr, wd, mask, b1=b1, b2=b2, eps=eps)
  state, dstate = tx.init(params), decoupled.init(params)
  jp = dp = jax.tree.map(jnp.asarray, params)
  for t in range(1, 4):
    grads = {k: rng.normal(size=v.shape).astype(np.float32) * 0.1 for k, v in p.items()}
    for k in p:
      gk = grads[k] + (wd * p[k] if k == "w" else 0.0)
      _adam_reference_step(p[k], m[k], v2[k], gk, t, lr, b1, b2, eps)
    upd, state = tx.update(jax.tree.map(jnp.asarray, grads), state, jp)
    jp = optax.apply_updates(jp, upd)
    dupd, dstate = decoupled.update(jax.tree.map(jnp.asarray, grads), dstate, dp)
    dp = optax.apply_updates(dp, dupd)
  for k in p:
    np.testing.assert_allclose(np.asarray(jp[k]), p[k], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jp["b"]), np.asarray(dp["b"]), rtol=1e-6)  # no decay
  assert np.abs(np.asarray(jp["w"]) - np.asarray(dp["w"])).max() > 1e-3
