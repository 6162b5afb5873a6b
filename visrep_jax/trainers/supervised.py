"""Supervised classification training (DeiT / DeiT III / CaiT / ResMLP / ... recipes).

The loop: sharded state -> resume from ``WORKDIR/checkpoints`` if present -> for each step,
global batch -> jitted ``train_step`` -> metrics / eval / checkpoints. SIGTERM (preemption)
saves a checkpoint and exits; restarting the same command resumes exactly. An evaluation that
raises mid-training (e.g. the linear probe's fit) checkpoints its step first; the rerun resumes
there and, when the probe's record lacks that step, evaluates it again before training on.

With ``config.linear_probe`` set, every evaluation also fits a linear probe on the frozen
features (``evaluators.linear_probe``): the best probe's weights go to ``WORKDIR/best`` and
training stops after ``linear_probe.patience`` evaluations in a row below the best
(CrossTransformers' phase-1 early stopping).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from visrep_jax import checkpoint as ckpt_lib
from visrep_jax import config_lib, metrics as metrics_lib, models, optim
from visrep_jax import sharding as sharding_lib
from visrep_jax.data import DataError, pipeline, preprocess, sources
from visrep_jax.evaluators import classification, linear_probe
from visrep_jax.trainers import common


class NonFiniteLossError(FloatingPointError):
  pass


class Preempted(SystemExit):
  """Raised after the SIGTERM checkpoint has been written."""


def _log(msg: str, *args):
  logging.info(msg, *args)
  if jax.process_index() == 0:
    print(msg % args if args else msg, flush=True)


class _SigtermFlag:
  def __init__(self):
    self.set = False
    self._prev = None

  def __enter__(self):
    try:
      self._prev = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. some notebook kernels)
      self._prev = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    self.set = True

  def __exit__(self, *exc):
    if self._prev is not None:
      signal.signal(signal.SIGTERM, self._prev)


def _debug_signal_at_step():
  """``VISREP_JAX_DEBUG_SIGNAL_AT_STEP="7:KILL"`` sends SIGKILL (or TERM, INT) to this process
  after step 7: fault injection for the crash / preemption tests."""
  spec = os.environ.get("VISREP_JAX_DEBUG_SIGNAL_AT_STEP", "")
  if not spec:
    return None, None
  step, _, sig = spec.partition(":")
  return int(step), getattr(signal, "SIG" + (sig or "KILL"))


def resolve_steps(config, num_train_examples: int) -> Dict[str, int]:
  steps_per_epoch = max(1, num_train_examples // config.batch_size)
  if config.total_steps > 0:
    total = int(config.total_steps)
  else:
    total = int(math.ceil(config.total_epochs * steps_per_epoch))
  warmup = optim.resolve_warmup_steps(config, steps_per_epoch)
  return {"total_steps": total, "warmup_steps": warmup, "steps_per_epoch": steps_per_epoch}


def _input_shape(source, split, pp_spec) -> tuple:
  """Shape of one preprocessed example (runs the pp on the first example)."""
  from visrep_jax.data import tf_host
  tf = tf_host()
  pp = preprocess.parse(pp_spec)
  ds = source.make(split, 0, 1).take(1).map(lambda ex: pp(ex, tf.constant([0, 0], tf.int32)))
  try:
    ex = next(iter(ds))
  except tf.errors.InvalidArgumentError:
    bad = source.find_corrupt(split, 0, 1)
    raise DataError(f"Cannot decode the first image of split {split!r}"
                    + (f": {bad}" if bad else "") + ". Remove or replace it.") from None
  return tuple(ex["image"].shape)


def build(config: ml_collections.ConfigDict, devices=None):
  """Everything a run needs, without running it (used by the loop, tests and notebooks).

  ``devices`` restricts the mesh to a subset of the devices (tests compare 1 vs 8 devices).
  """
  devices = jax.devices() if devices is None else list(devices)
  config_lib.validate(config, num_devices=len(devices))
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  if config.episodes.prepare_mini:  # meta_dataset:<source> of the offline mini benchmark
    from visrep_jax.data import md_mini
    md_mini.build_mini_benchmark(config.dataset.data_dir,
                                 config.episodes.mini_max_images_per_class or None)
  ds_kwargs = {"data_dir": config.dataset.data_dir} if config.dataset.data_dir else {}
  source = sources.create(config.dataset.name, **ds_kwargs)
  num_classes = config.dataset.num_classes or source.num_classes
  if not num_classes:
    raise config_lib.ConfigError("The dataset does not say how many classes it has; set "
                                 "config.dataset.num_classes.")
  schedule = resolve_steps(config, source.num_examples(config.dataset.train_split))
  model = models.create(config.model.name, num_classes=num_classes,
                        **config_lib.model_overrides(config))
  image_shape = _input_shape(source, config.dataset.train_split, config.dataset.train_pp)
  total_steps, steps_per_epoch = schedule["total_steps"], schedule["steps_per_epoch"]

  def tx_fn(params):
    return optim.make_optimizer(config, params, total_steps, steps_per_epoch)[0]

  rng = jax.random.PRNGKey(config.seed)
  r_init, r_train = jax.random.split(rng)
  ema_decay = float(config.ema.decay)
  state, state_shardings, tx = common.create_train_state(
      model, tx_fn, r_init, image_shape, mesh, config.sharding, ema=ema_decay > 0)
  lr_fn = optim.make_schedule(config, total_steps, steps_per_epoch)
  mix = {k: float(v) for k, v in config.mixup.items()}
  batch_sharding = sharding_lib.batch_sharding(mesh)
  teacher = _load_teacher(config, num_classes, image_shape, mesh)
  distill = dict(config.distill.to_dict()) if teacher else None
  train_step = common.make_train_step(model, tx, num_classes, config.loss.name,
                                      config.loss.label_smoothing, mix, ema_decay=ema_decay,
                                      teacher=teacher[0] if teacher else None, distill=distill)
  jitted = common.jit_train_step(train_step, state_shardings, batch_sharding, mesh,
                                 teacher_shardings=teacher[2] if teacher else None)
  if teacher:
    teacher_variables = teacher[1]

    def run_train_step(state, batch, rng):  # the teacher's variables ride along, not in the state
      return jitted(state, batch, rng, teacher_variables)
  else:
    run_train_step = jitted
  return dict(mesh=mesh, source=source, num_classes=num_classes, model=model, state=state,
              state_shardings=state_shardings, tx=tx, lr_fn=lr_fn, rng=r_train,
              image_shape=image_shape, batch_sharding=batch_sharding, **schedule,
              teacher=teacher[0] if teacher else None, train_step=run_train_step,
              eval_step=common.jit_eval_step(common.make_eval_step(model, num_classes),
                                             state_shardings, batch_sharding, mesh))


def _load_teacher(config, num_classes: int, image_shape, mesh):
  """``(model, variables, shardings)`` of the distillation teacher, or None without one. Any
  problem with it is a ``ConfigError`` naming the config keys, raised before training starts."""
  d = config.distill
  if d.type == "none":
    return None
  overrides = d.teacher_overrides
  overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides or {})
  overrides.setdefault("dtype", config_lib.model_overrides(config)["dtype"])
  path = d.teacher_checkpoint
  try:
    teacher = common.init_teacher(d.teacher, path, num_classes, image_shape, mesh,
                                  config.sharding, **overrides)
  except FileNotFoundError as e:
    raise config_lib.ConfigError(f"config.distill.teacher_checkpoint={path!r}: {e}") from None
  except ValueError as e:
    raise config_lib.ConfigError(
        f"config.distill.teacher_checkpoint={path!r} does not fit config.distill.teacher="
        f"{d.teacher!r} with {num_classes} classes (set config.distill.teacher_overrides to the "
        f"checkpoint's model options): {e}") from None
  _log("Distillation (%s, alpha %g, tau %g): teacher %s restored from %s.", d.type, d.alpha,
       d.tau, d.teacher, path)
  return teacher


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains (resuming if ``workdir`` has a checkpoint) and returns the final metrics."""
  os.makedirs(workdir, exist_ok=True)
  b = build(config)
  state, total_steps = b["state"], b["total_steps"]
  pc = jax.process_count()
  eval_batch = config.eval_batch_size or config.batch_size
  writer = metrics_lib.MetricWriter(workdir)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)

  start_step = 0
  latest = ckpt.latest_step()
  if latest is not None:
    state, meta = _restore(ckpt, latest, state, b["state_shardings"])
    start_step = int(jax.device_get(state.step))
    _log("Resumed from %s at step %d.", ckpt.directory, start_step)
    old = meta.get("config")
    if old and old != json.loads(config.to_json_best_effort()):
      _log("Note: the config differs from the checkpoint's; continuing with the new one.")
  elif config.init_checkpoint:
    abstract_params = ckpt_lib.abstract_with_shardings(state.params, b["state_shardings"].params)
    abstract_model_state = ckpt_lib.abstract_with_shardings(state.model_state,
                                                            b["state_shardings"].model_state)
    # Fine-tuning re-initialises a head that does not fit (another class count); evaluating
    # must not: a mismatch is then an error, not a random head. Position embeddings are
    # resampled in both cases (evaluating at another resolution is a legitimate experiment).
    params, model_state = ckpt_lib.load_variables(config.init_checkpoint, abstract_params,
                                                  abstract_model_state,
                                                  adapt_head=not config.eval_only)
    state = state.replace(params=params, model_state=model_state or state.model_state)
    if state.ema:  # the EMA starts from the loaded weights (own buffers: the state is donated)
      state = state.replace(ema=jax.tree.map(lambda x: x.copy(), {
          "params": state.params, "model_state": state.model_state}))
    _log("Initialised parameters from %s.", config.init_checkpoint)
  if jax.process_index() == 0:
    # Only now: a resume that does not fit (another model) keeps the record of the trained one.
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  eval_input = pipeline.make_eval(b["source"], config.dataset.eval_split, config.dataset.eval_pp,
                                  eval_batch // pc, skip_corrupt=config.dataset.skip_corrupt)
  probe = linear_probe.from_config(config, b, workdir, resume_step=start_step)

  def run_eval(step):
    res = classification.evaluate(b["eval_step"], state, eval_input, b["batch_sharding"],
                                  progress_bar=config.progress_bar, desc=f"eval@{step}")
    skipped = eval_input.num_examples - res["num_examples"]
    if skipped:
      _log("Skipped %d undecodable evaluation images.", skipped)
    scalars = {f"eval/{k}": v for k, v in res.items()}
    _log("step %d  eval top-1 %.4f  top-5 %.4f  loss %.4f  (%d examples)", step, res["top1"],
         res["top5"], res["loss"], res["num_examples"])
    if state.ema:
      ema = classification.evaluate(b["eval_step"], common.ema_as_state(state), eval_input,
                                    b["batch_sharding"], progress_bar=config.progress_bar,
                                    desc=f"eval-ema@{step}")
      ema = {f"ema_{k}": v for k, v in ema.items() if k != "num_examples"}
      scalars.update({f"eval/{k}": v for k, v in ema.items()})
      res = dict(res, **ema)
      _log("step %d  EMA eval top-1 %.4f  top-5 %.4f  loss %.4f", step, ema["ema_top1"],
           ema["ema_top5"], ema["ema_loss"])
    if probe is not None:
      lp = probe.evaluate(state, step, {"config": json.loads(config.to_json_best_effort())})
      scalars.update({f"eval/{k}": v for k, v in lp.items()})
      res = dict(res, **lp)
      best = ("  (best %.4f at step %d)" % (lp["linear_probe_best_top1"],
                                           lp["linear_probe_best_step"])
              if "linear_probe_best_top1" in lp else "")
      _log("step %d  linear probe top-1 %.4f (fit %.4f) on %s%s", step, lp["linear_probe_top1"],
           lp["linear_probe_fit_top1"], config.linear_probe.score_split, best)
    writer.write_scalars(step, scalars)
    return res

  def save(step, force=False) -> bool:
    """False when ``step`` is already saved (it is not written twice)."""
    meta = {"step": int(step), "config": json.loads(config.to_json_best_effort())}
    return ckpt.save(step, state, meta, force=force)

  def save_after_failed_eval(step, m, error):
    """An evaluation (e.g. the linear probe's fit) raised mid-training: checkpoint the state of
    ``step`` (unless saved already) so that the rerun resumes there, not at the last periodic
    checkpoint. A non-finite loss at ``step`` (likely the cause) is raised instead, unsaved.
    Single-process runs only: the save is a collective, and an evaluation can fail on one
    process alone (process 0 writes the probe record and the metrics), so a multi-process run
    just fails, as before, and resumes at its last checkpoint."""
    if jax.process_count() > 1:
      _log("The evaluation at step %d failed (%s: %s); no checkpoint is written for it in a "
           "multi-process run: the rerun resumes at the last periodic checkpoint.", step,
           type(error).__name__, error)
      return
    try:
      _check_finite(step, m)
    except NonFiniteLossError as nan:
      raise nan from error
    if save(step, force=True):
      _log("The evaluation at step %d failed (%s: %s); saved a checkpoint at step %d in %s: fix "
           "the problem and rerun the same command to resume there.", step,
           type(error).__name__, error, step, ckpt.directory)

  final: Dict[str, Any] = {}
  if config.eval_only:
    final = run_eval(start_step)
    ckpt.close()
    writer.close()
    if probe is not None:
      probe.close()
    return final

  train_input = pipeline.make_train(
      b["source"], config.dataset.train_split, config.dataset.train_pp,
      config.batch_size, seed=config.seed, start_step=start_step,
      shuffle_buffer=config.dataset.shuffle_buffer, repeated_aug=config.dataset.repeated_aug,
      skip_corrupt=config.dataset.skip_corrupt, num_shards=b["mesh"].size)
  batches = pipeline.prefetch_to_device(train_input.iterator, b["batch_sharding"])
  progress = metrics_lib.Progress(total_steps, start_step, config.batch_size)
  _log("Training %s on %s: %d steps (%d per epoch), batch %d on %d devices (%d processes), "
       "workdir %s", config.model.name, config.dataset.name, total_steps, b["steps_per_epoch"],
       config.batch_size, jax.device_count(), pc, workdir)

  pending = []  # device metrics since the last log
  prev = None   # (step, metrics) of the previous step, checked for NaN one step late
  last_eval, last_eval_step = None, None
  stopped = probe is not None and probe.should_stop  # resumed after an early stop
  fault_step, fault_signal = _debug_signal_at_step()
  try:
    with _SigtermFlag() as sigterm:
      step = start_step
      if _agree(probe is not None and not stopped and 0 < start_step < total_steps
                and config.eval_every_steps and start_step % config.eval_every_steps == 0
                and start_step not in {s for s, _ in probe.stopping.history}):
        # Resumed at an evaluation step whose probe result is not in the record (the evaluation
        # failed or was interrupted after the checkpoint): evaluate it now, so that early stopping
        # and the best weights see every evaluation an uninterrupted run sees.
        _log("Evaluating step %d again: its evaluation did not finish before the restart.",
             start_step)
        last_eval, last_eval_step = run_eval(start_step), start_step
        stopped = probe.should_stop
      while step < total_steps and not stopped:
        batch = next(batches)
        state, m = b["train_step"](state, batch, b["rng"])
        step += 1
        if prev is not None:
          _check_finite(*prev)
        prev = (step, m)
        pending.append(m)
        if step % config.log_every_steps == 0 or step == total_steps:
          _check_finite(step, m)
          stats = jax.device_get(pending)
          pending = []
          scalars = {f"train/{k}": float(np.mean([s[k] for s in stats])) for k in stats[0]}
          p = progress.update(step)
          scalars["train/lr"] = float(b["lr_fn"](step - 1))
          scalars["train/images_per_sec"] = p["images_per_sec"]
          writer.write_scalars(step, scalars)
          distill = ("  (base %.4f, distill %.4f)" % (scalars["train/base_loss"],
                                                     scalars["train/distill_loss"])
                     if "train/distill_loss" in scalars else "")
          _log("step %d/%d  loss %.4f%s  lr %.3g  %.1f img/s  ETA %s", step, total_steps,
               scalars["train/loss"], distill, scalars["train/lr"], p["images_per_sec"],
               metrics_lib.format_eta(p["eta_sec"]))
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
          save(step)
        if config.eval_every_steps and step % config.eval_every_steps == 0 and step < total_steps:
          try:
            last_eval, last_eval_step = run_eval(step), step
          except Exception as e:
            save_after_failed_eval(step, m, e)
            raise
          stopped = probe is not None and probe.should_stop
        if step == fault_step and jax.process_index() == 0:
          os.kill(os.getpid(), fault_signal)
          time.sleep(0.5)  # let the handler run (SIGTERM) before the check below
        if _preempted(sigterm.set, step, config.log_every_steps):
          _check_finite(step, m)
          save(step, force=True)
          ckpt.close()
          writer.close()
          _log("SIGTERM: saved a checkpoint at step %d in %s; rerun the same command to resume.",
               step, ckpt.directory)
          raise Preempted(143)
  except BaseException as e:
    if not isinstance(e, Preempted):
      # Let an in-flight checkpoint write finish so that the last good checkpoint is complete.
      ckpt.wait()
    raise
  if prev is not None:
    _check_finite(*prev)
  end = step if stopped else total_steps
  if stopped:
    _log("Early stop at step %d: the linear probe stayed below its best for %d evaluations.",
         step, config.linear_probe.patience)
  save(end, force=True)
  final = last_eval if last_eval is not None and last_eval_step == end else run_eval(end)
  ckpt.close()
  writer.close()
  if probe is not None:
    probe.close()
    best_step, best = probe.stopping.best
    _log("Best linear probe top-1 %.4f at step %d: its weights are in %s.", best, best_step,
         os.path.join(workdir, linear_probe.BEST_DIR))
  if config.plot_curves and jax.process_index() == 0:
    png = metrics_lib.plot_curves(workdir)
    if png:
      _log("Learning curves: %s", png)
  _log("Done. Test top-1 %.4f. Logs: %s/metrics.jsonl, TensorBoard: %s/tensorboard, "
       "checkpoints: %s", final["top1"], workdir, workdir, ckpt.directory)
  return final


def _restore(ckpt, step: int, state, state_shardings):
  """Restores the train state of ``step``. A checkpoint written with the EMA switched the other
  way (``config.ema.decay`` changed, or written before the EMA existed) still resumes: a missing
  EMA starts from the restored weights, an unwanted one is dropped."""
  abstract = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda s: s, state), state_shardings)
  try:
    return ckpt.restore(abstract, step)
  except ckpt_lib.CheckpointMismatchError as e:
    first = e
    if e.shapes or not all(k.startswith("['ema']") for k in e.missing + e.unexpected):
      raise
  fields = {k: getattr(abstract, k) for k in ("step", "params", "opt_state", "model_state")}
  full_ema = {"params": abstract.params, "model_state": abstract.model_state}
  # Written before the EMA existed (no 'ema'), without an EMA ({}), or with one.
  candidates = [fields, dict(fields, ema={}), dict(fields, ema=full_ema)]
  for i, candidate in enumerate(candidates):
    try:
      restored, meta = ckpt.restore(candidate, step)
      break
    except ckpt_lib.CheckpointMismatchError:
      if i == len(candidates) - 1:
        raise first from None
  restored.pop("ema", None)
  restored = common.TrainState(**restored)
  if state.ema:
    restored = restored.replace(ema=jax.tree.map(lambda x: x.copy(), {
        "params": restored.params, "model_state": restored.model_state}))
    _log("The checkpoint has no weight EMA: the EMA starts from its weights at step %d.", step)
  elif i == 2:
    _log("The checkpoint's weight EMA is dropped (config.ema.decay = 0).")
  return restored, meta


def _agree(local_flag: bool) -> bool:
  """Process 0's ``local_flag`` on every process (each read its own copy of the workdir)."""
  if jax.process_count() == 1:
    return bool(local_flag)
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(local_flag))))


def _preempted(local_flag: bool, step: int, every: int) -> bool:
  """True when any process got SIGTERM. Processes agree every ``every`` steps (the checkpoint
  that follows is a collective, so they must all take the same branch at the same step)."""
  if jax.process_count() == 1:
    return local_flag
  if step % every:
    return False
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.array([int(local_flag)], np.int32))
  return bool(np.asarray(flags).any())


def _check_finite(step: int, m: Dict[str, Any]):
  loss = float(jax.device_get(m["loss"]))
  if not math.isfinite(loss):
    raise NonFiniteLossError(
        f"Non-finite training loss ({loss}) at step {step}; the parameters of that step were not "
        "applied and the last checkpoint is intact. Lower optimizer.lr, enable "
        "optimizer.clip_grad_norm, or check the input data.")
