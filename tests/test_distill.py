"""Knowledge distillation (DeiT): the losses against a PyTorch transcription of the deit repo's
``DistillationLoss``, closed forms inside the jitted train step, a teacher restored from a
checkpoint (BatchNorm statistics in eval mode), start-up errors, and an end-to-end distilled
DeiT run through ``visrep_jax.main`` whose SIGKILL + resume reproduces the uninterrupted run bit
for bit, EMA included."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from visrep_jax import config_lib, losses, models
from visrep_jax import sharding as sharding_lib
from visrep_jax.data import pipeline
from visrep_jax.trainers import common, supervised
from conftest import REPO
from test_main import LONG, assert_trees_equal, main, metrics
from test_optim import TINY_DEIT
from test_trainer import runlocal_config


# --- The losses against the reference ------------------------------------------------------------

def deit_distillation_loss(torch, outputs, outputs_kd, labels, teacher_outputs, kind, alpha, tau):
  """A transcription of facebookresearch/deit losses.py DistillationLoss.forward (base criterion
  = cross-entropy)."""
  F = torch.nn.functional
  base_loss = F.cross_entropy(outputs, labels)
  if kind == "soft":
    T = tau
    distillation_loss = F.kl_div(F.log_softmax(outputs_kd / T, dim=1),
                                 F.log_softmax(teacher_outputs / T, dim=1),
                                 reduction="sum", log_target=True) * (T * T) / outputs_kd.numel()
  else:
    distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
  return base_loss * (1 - alpha) + distillation_loss * alpha, distillation_loss


@pytest.mark.parametrize("kind,tau,alpha", [("soft", 1.0, 0.5), ("soft", 3.0, 0.1),
                                            ("hard", 1.0, 0.5), ("hard", 2.0, 0.3)])
def test_losses_match_the_deit_reference(kind, tau, alpha):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  b, k = 6, 7
  s, s_kd, t = (rng.normal(scale=3.0, size=(b, k)).astype(np.float32) for _ in range(3))
  labels = rng.integers(0, k, b)
  ref_total, ref_kd = deit_distillation_loss(
      torch, torch.tensor(s), torch.tensor(s_kd), torch.tensor(labels), torch.tensor(t),
      kind, alpha, tau)
  fn = losses.DISTILLATION.get(kind)
  kd = fn(jnp.asarray(s_kd), jnp.asarray(t), tau=tau, kl_divisor="numel")
  assert kd.shape == (b,)
  np.testing.assert_allclose(float(kd.mean()), float(ref_kd), rtol=1e-5)
  base = losses.softmax_xent(jnp.asarray(s), jax.nn.one_hot(labels, k)).mean()
  total = losses.combine_distillation(base, kd.mean(), alpha)
  np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-5)
  if kind == "soft":  # 'batch': the KL summed over classes, averaged over examples only
    kd_b = fn(jnp.asarray(s_kd), jnp.asarray(t), tau=tau, kl_divisor="batch").mean()
    np.testing.assert_allclose(float(kd_b), float(ref_kd) * k, rtol=1e-5)
    # The textbook value: tau^2 * mean_b sum_k p_t (log p_t - log p_s).
    p_t = torch.softmax(torch.tensor(t) / tau, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(torch.tensor(s_kd) / tau, 1))).sum(1).mean()
    np.testing.assert_allclose(float(kd_b), float(kl) * tau * tau, rtol=1e-5)


# --- Closed forms inside the train step ----------------------------------------------------------

def _setup(name="vit_test_patch4_16", **overrides):
  """A tiny model, its state on one device, SGD, and a batch (no mixup, no stochastic depth,
  no dropout: train and eval mode give the same logits)."""
  model = models.create(name, num_classes=10, drop_path_rate=0.0, **overrides)
  mesh = sharding_lib.make_mesh((("data", -1),), jax.devices()[:1])
  state, shardings, tx = common.create_train_state(
      model, lambda p: optax.sgd(0.5), jax.random.PRNGKey(0), (16, 16, 3), mesh)
  rng = np.random.default_rng(1)
  batch = {"image": jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
  return model, state, tx, batch


def _step(model, tx, state, batch, teacher=None, teacher_variables=None, **distill):
  if teacher is None:
    fn = common.make_train_step(model, tx, 10)
    return jax.jit(fn)(state, batch, jax.random.PRNGKey(2))
  fn = common.make_train_step(model, tx, 10, teacher=teacher, distill=distill)
  return jax.jit(fn)(state, batch, jax.random.PRNGKey(2), teacher_variables)


def test_teacher_identical_to_the_student_gives_the_closed_forms():
  model, state, tx, batch = _setup()
  tv = jax.tree.map(jnp.copy, {"params": state.params})
  # Soft: KL(p || p) = 0, loss = (1 - alpha) * base.
  _, m = _step(model, tx, state, batch, model, tv, type="soft", alpha=0.3, tau=2.0)
  assert abs(float(m["distill_loss"])) < 1e-6
  np.testing.assert_allclose(float(m["loss"]), 0.7 * float(m["base_loss"]), rtol=1e-6)
  # Hard with labels = the teacher's argmax: distillation loss = base CE, total = base, and the
  # update equals a plain step on those labels.
  teacher_logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(tv, batch["image"])
  batch = dict(batch, label=jnp.argmax(teacher_logits, -1).astype(jnp.int32))
  s_kd, m = _step(model, tx, state, batch, model, tv, type="hard", alpha=0.5)
  np.testing.assert_allclose(float(m["distill_loss"]), float(m["base_loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(m["loss"]), float(m["base_loss"]), rtol=1e-6)
  s_plain, m_plain = _step(model, tx, state, batch)
  np.testing.assert_allclose(float(m["loss"]), float(m_plain["loss"]), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(s_kd.params), jax.device_get(s_plain.params))


def test_distilled_student_uses_its_distillation_head():
  model, state, tx, batch = _setup("deit_tiny_distilled_patch16_224",
                                   **{k: v for k, v in TINY_DEIT.items()})
  teacher = models.create("vit_test_patch4_16", num_classes=10)
  tv = jax.jit(teacher.init)(jax.random.PRNGKey(5), batch["image"])

  @jax.jit
  def reference(params, tv, images):
    return (model.apply({"params": params}, images, train=True)[1],
            teacher.apply(tv, images, train=False)[0])

  out, t_logits = reference(state.params, tv, batch["image"])
  want_kd = optax.softmax_cross_entropy_with_integer_labels(out["dist_logits"],
                                                            jnp.argmax(t_logits, -1)).mean()
  want_base = optax.softmax_cross_entropy_with_integer_labels(out["cls_logits"],
                                                              batch["label"]).mean()
  assert abs(float(want_kd) - float(want_base)) > 1e-3  # the two heads really differ
  new, m = _step(model, tx, state, batch, teacher, tv, type="hard", alpha=0.25)
  np.testing.assert_allclose(float(m["distill_loss"]), float(want_kd), rtol=1e-5)
  np.testing.assert_allclose(float(m["base_loss"]), float(want_base), rtol=1e-5)
  np.testing.assert_allclose(float(m["loss"]), 0.75 * float(want_base) + 0.25 * float(want_kd),
                             rtol=1e-5)
  # Both heads learn (the distillation head only from the teacher).
  for head in ("head", "head_dist"):
    assert not np.allclose(new.params[head]["kernel"], state.params[head]["kernel"])


# --- Teacher checkpoints and start-up errors ----------------------------------------------------

def _write_converted(path, name, num_classes, seed=0, **overrides):
  """A ``python -m visrep_jax.convert``-style directory (``variables/``) for a zoo model, with
  random weights and (for BatchNorm) random running statistics, written without compiling."""
  import orbax.checkpoint as ocp
  model = models.create(name, num_classes=num_classes, **overrides)
  shapes = models.variable_shapes(model, resolution=16)
  rng = np.random.default_rng(seed)
  variables = {col: jax.tree.map(
      lambda x: (rng.uniform(0.5, 2.0, x.shape) if col == "batch_stats"
                 else rng.normal(scale=0.2, size=x.shape)).astype(np.float32), tree)
      for col, tree in shapes.items()}
  ocp.PyTreeCheckpointer().save(os.path.join(path, "variables"), variables, force=True)
  return model, variables


def _distill_config(**overrides):
  return runlocal_config(**{"mixup.mixup_alpha": 0.0, "mixup.cutmix_alpha": 0.0,
                            "model.drop_path_rate": 0.0, "loss.name": "softmax_xent",
                            **overrides})


def test_batchnorm_teacher_runs_in_eval_mode_from_a_converted_checkpoint(tmp_path):
  small = dict(stage_sizes=(1, 1), width=8)  # a two-block ResNet-18 (teacher_overrides)
  teacher, tv = _write_converted(str(tmp_path / "t"), "resnet18", 10, **small)
  c = _distill_config(**{"distill.type": "hard", "distill.alpha": 0.5,
                         "distill.teacher": "resnet18", "distill.teacher_overrides": small,
                         "distill.teacher_checkpoint": str(tmp_path / "t")})
  b = supervised.build(c, devices=jax.devices()[:1])
  assert b["teacher"] is not None and not b["state"].ema
  ti = pipeline.make_train(b["source"], c.dataset.train_split, c.dataset.train_pp, c.batch_size,
                           seed=c.seed)
  batch = next(ti.iterator)
  params = jax.device_get(b["state"].params)
  _, m = b["train_step"](b["state"], pipeline.to_global(batch, b["batch_sharding"]), b["rng"])
  images = jnp.asarray(batch["image"], jnp.float32)
  # The converted running statistics, in eval mode.
  t_logits, _ = jax.jit(lambda v, x: teacher.apply(v, x, train=False))(tv, images)
  s_logits, _ = jax.jit(lambda p, x: b["model"].apply({"params": p}, x, train=True))(params, images)
  want = optax.softmax_cross_entropy_with_integer_labels(s_logits, jnp.argmax(t_logits, -1))
  np.testing.assert_allclose(float(m["distill_loss"]), float(want.mean()), rtol=1e-5)
  # The teacher is not part of the state (nor, therefore, of checkpoints).
  assert set(b["state"].params) == set(params) and "resnet" not in str(
      jax.tree.structure(b["state"]))


def test_teacher_with_another_class_count_is_a_clear_error(tmp_path):
  _write_converted(str(tmp_path / "t"), "vit_test_patch4_16", 7)
  c = _distill_config(**{"distill.type": "soft", "distill.teacher": "vit_test_patch4_16",
                         "distill.teacher_checkpoint": str(tmp_path / "t")})
  with pytest.raises(config_lib.ConfigError,
                     match=r"teacher_checkpoint=.* does not fit config.distill.teacher="
                           r"'vit_test_patch4_16' with 10 classes.*\(7,\)") as e:
    supervised.build(c, devices=jax.devices()[:1])
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("updates,match", [
    ({"distill.type": "soft"}, r"distill.type='soft' needs a teacher"),
    ({"distill.type": "hard", "distill.teacher": "resnet_18"},
     r"config.distill.teacher: Unknown model 'resnet_18'. Did you mean 'resnet18'"),
    ({"distill.type": "hard", "distill.teacher": "resnet18"},
     "needs config.distill.teacher_checkpoint"),
    ({"distill.type": "hard", "distill.teacher": "resnet18",
      "distill.teacher_checkpoint": "/nonexistent/teacher"},
     r"teacher_checkpoint='/nonexistent/teacher' does not exist"),
    ({"distill.type": "hard", "distill.teacher": "resnet18", "distill.teacher_checkpoint": "/",
      "distill.teacher_overrides": {"num_classes": 5}}, "must not set num_classes"),
    ({"distill.type": "hard", "distill.teacher": "resnet18", "distill.teacher_checkpoint": "/",
      "distill.teacher_overrides": {"widht": 2}}, r"teacher_overrides: Unknown option"),
    ({"distill.type": "kd"}, "distill.type='kd' is not valid; choose one of: none, hard, soft"),
    ({"distill.kl_divisor": "mean"}, "choose one of: numel, batch"),
    ({"distill.alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ({"distill.tau": 0.0}, "tau must be > 0"),
])
def test_bad_distillation_config(updates, match):
  c = runlocal_config()
  with c.unlocked():
    for key, value in updates.items():
      sect, k = key.split(".")
      c[sect][k] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c, num_devices=1)


# --- End to end through visrep_jax.main ----------------------------------------------------------

STUDENT_CONFIG = '''
import importlib.util
spec = importlib.util.spec_from_file_location("deit3", {deit3!r})
deit3 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deit3)


def get_config(arg=None):
  c = deit3.get_config("runlocal")
  c.model.name = "deit_tiny_distilled_patch16_224"
  for k, v in {tiny!r}.items():
    c.model[k] = v
  c.distill.type = "hard"
  c.distill.teacher = "vit_test_patch4_16"
  c.distill.teacher_checkpoint = {teacher!r}
  c.ema.decay = 0.9
  return c
'''


@pytest.mark.slow
def test_distilled_deit_end_to_end_with_ema_resumes_exactly(tmp_path):
  """A teacher from a convert-style checkpoint; a distilled DeiT student with EMA; a SIGKILL
  after step 7 and a restart give the uninterrupted run's parameters, optimizer state and EMA bit
  for bit; the teacher never enters a checkpoint. (A training workdir as the teacher goes through
  the same checkpoint.load_variables as init_checkpoint, tested in test_main.py.)"""
  teacher = tmp_path / "teacher"
  _write_converted(str(teacher), "vit_test_patch4_16", 10)
  cfg = tmp_path / "student.py"
  cfg.write_text(STUDENT_CONFIG.format(deit3=os.path.join(REPO, "configs", "deit3.py"),
                                       tiny=TINY_DEIT, teacher=str(teacher)))

  ref = tmp_path / "ref"
  r = main([f"--config={cfg}"] + LONG, ref)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "teacher vit_test_patch4_16 restored from" in r.stdout
  rows = metrics(ref)
  train = [x for x in rows if "train/loss" in x]
  assert len(train) == 12
  for x in train:  # alpha = 0.5
    np.testing.assert_allclose(x["train/loss"],
                               0.5 * x["train/base_loss"] + 0.5 * x["train/distill_loss"],
                               rtol=1e-5)
  final = rows[-1]
  assert {"eval/top1", "eval/ema_top1", "eval/ema_top5", "eval/ema_loss"} <= set(final)
  assert final["eval/ema_loss"] != final["eval/loss"]

  crash = tmp_path / "crash"
  r = main([f"--config={cfg}"] + LONG, crash, VISREP_JAX_DEBUG_SIGNAL_AT_STEP="7:KILL")
  assert r.returncode == -9
  r = main([f"--config={cfg}"] + LONG, crash)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resumed from" in r.stdout

  a, b = _checkpoint(ref), _checkpoint(crash)
  assert set(a) == {"step", "params", "opt_state", "model_state", "ema"}
  assert "dist_token" in a["params"] and "head_dist" in a["params"]
  assert set(a["ema"]["params"]) == set(a["params"])
  for key in ("params", "opt_state", "ema"):
    assert_trees_equal(b[key], a[key])
  assert metrics(crash)[-1] == final  # final eval metrics (EMA ones too), bit for bit


def _checkpoint(workdir, step=12):
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
