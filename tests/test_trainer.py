"""The supervised trainer: identical numbers on 1 device, 8 devices (data parallel) and FSDP;
NaN handling; mixup/cutmix semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from visrep_jax import config_lib
from visrep_jax.data import mixing, pipeline
from visrep_jax.trainers import supervised
from conftest import load_config


def runlocal_config(**overrides):
  c = load_config("deit3", "runlocal")
  with c.unlocked():
    c.model.drop_path_rate = 0.1
    c.mixup.mixup_alpha = 0.8
    c.mixup.cutmix_alpha = 1.0
    c.loss.name = "sigmoid_xent"
    for k, v in overrides.items():
      obj = c
      *path, last = k.split(".")
      for p in path:
        obj = obj[p]
      obj[last] = v
  return c


def train_losses(config, devices, steps=5):
  b = supervised.build(config, devices=devices)
  ti = pipeline.make_train(b["source"], config.dataset.train_split, config.dataset.train_pp,
                           config.batch_size, seed=config.seed)
  state, losses = b["state"], []
  for _ in range(steps):
    batch = pipeline.to_global(next(ti.iterator), b["batch_sharding"])
    state, m = b["train_step"](state, batch, b["rng"])
    losses.append(float(m["loss"]))
  return np.array(losses), jax.device_get(state.params), state


def test_one_device_vs_data_parallel_vs_fsdp():
  assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
  c1 = runlocal_config()
  l1, p1, _ = train_losses(c1, jax.devices()[:1])
  l8, p8, s8 = train_losses(runlocal_config(), jax.devices())
  cf = runlocal_config(sharding="fsdp", mesh=(("data", 2), ("fsdp", 4)))
  lf, pf, sf = train_losses(cf, jax.devices())
  # The batch really is split over 8 devices, and FSDP really shards the parameters.
  qkv = sf.params["blocks_0"]["attn"]["qkv"]["kernel"]
  assert len(qkv.sharding.device_set) == 8 and qkv.addressable_shards[0].data.shape[1] == 96 // 4
  assert s8.params["blocks_0"]["attn"]["qkv"]["kernel"].sharding.is_fully_replicated
  assert l1[0] != l1[-1]
  np.testing.assert_allclose(l8, l1, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(lf, l1, rtol=2e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p8, p1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), pf, p1)


def test_nonfinite_loss_keeps_params_and_names_the_step():
  c = runlocal_config()
  b = supervised.build(c)
  ti = pipeline.make_train(b["source"], "train", c.dataset.train_pp, c.batch_size, seed=0)
  batch = next(ti.iterator)
  batch["image"] = batch["image"].copy()
  batch["image"][0, 0, 0, 0] = np.nan
  before = jax.device_get(b["state"].params)
  state, m = b["train_step"](b["state"], pipeline.to_global(batch, b["batch_sharding"]), b["rng"])
  assert not np.isfinite(float(m["loss"]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  with pytest.raises(FloatingPointError, match="at step 7.*last checkpoint is intact"):
    supervised._check_finite(7, m)


def test_mixup_targets_and_cutmix_box_area():
  rng = jax.random.PRNGKey(0)
  x = jax.random.normal(rng, (8, 16, 16, 3))
  t = jax.nn.one_hot(jnp.arange(8) % 5, 5)
  for seed in range(20):
    r = jax.random.PRNGKey(seed)
    xm, tm, lam = mixing.mix_batch(r, x, t, mixup_alpha=0.0, cutmix_alpha=1.0)
    np.testing.assert_allclose(tm.sum(-1), 1.0, rtol=1e-6)
    # Fraction of pixels taken from the partner equals 1 - lambda (timm correct_lam).
    from_partner = np.mean(np.all(np.isclose(xm[0], x[7]) & ~np.isclose(x[0], x[7]), axis=-1))
    np.testing.assert_allclose(from_partner, 1.0 - float(lam), atol=1e-6)
    xm, tm, lam = mixing.mix_batch(r, x, t, mixup_alpha=0.8, cutmix_alpha=0.0)
    np.testing.assert_allclose(xm, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tm, lam * t + (1 - lam) * t[::-1], rtol=1e-6)
  # switch_prob: both kinds occur, in about the right proportion.
  kinds = []
  for seed in range(200):
    xm, _, lam = mixing.mix_batch(jax.random.PRNGKey(seed), x, t, 0.8, 1.0, switch_prob=0.5)
    kinds.append(bool(np.allclose(xm, lam * x + (1 - lam) * x[::-1], atol=1e-6)))
  assert 0.35 < np.mean(kinds) < 0.65
