"""End-to-end runs of ``python -m visrep_jax.main`` in child processes: CLI errors, the demo on
real Fashion-MNIST, crash/preemption + resume, and two processes with jax.distributed."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, requires_fashion_mnist, subprocess_env

pytestmark = pytest.mark.slow
RUNLOCAL = "configs/deit3.py:runlocal"
# A run long enough to be interrupted: 12 steps, checkpoints every 3, eval at the end only.
LONG = ["--config.total_steps=12", "--config.checkpoint_every_steps=3", "--config.eval_every_steps=0",
        "--config.log_every_steps=1", "--config.plot_curves=False"]


def main(args, workdir, num_devices=1, timeout=600, **env):
  cmd = [sys.executable, "-m", "visrep_jax.main", f"--workdir={workdir}"] + list(args)
  return subprocess.run(cmd, cwd=REPO, env=subprocess_env(num_devices, **env), capture_output=True,
                        text=True, timeout=timeout)


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def final_params(workdir, step=12):
  """(params, opt_state) of a checkpoint, as numpy arrays (whatever topology saved them)."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return state["params"], state["opt_state"]


def assert_trees_equal(a, b):
  import jax
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("args,message", [
    ([f"--config={RUNLOCAL},bogus"], "Unknown config argument 'bogus'"),
    ([f"--config={RUNLOCAL}", "--config.optimizer.lrr=3"], 'Did you mean "lr"'),
    ([f"--config={RUNLOCAL}", "--config.model.name=deit3_smal_patch16_224"],
     "Unknown model 'deit3_smal_patch16_224'. Did you mean 'deit3_small_patch16_224'"),
    ([f"--config={RUNLOCAL}", "--config.dataset.name=imagenet2012", "--config.dataset.data_dir=/nonexistent"],
     "not prepared under /nonexistent"),
    ([f"--config={RUNLOCAL}", "--config.dataset.name=image_folder", "--config.dataset.data_dir=/nonexistent"],
     "Image folder '/nonexistent' does not exist"),
])
def test_cli_errors_are_one_clear_line(tmp_path, args, message):
  r = main(args, tmp_path / "w")
  assert r.returncode == 2, r.stderr[-2000:]
  err = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert len(err) == 1 and message in err[0], r.stderr[-2000:]
  assert "Traceback" not in r.stderr


def test_a_bad_allocator_setting_is_one_clear_line(tmp_path):
  r = main([f"--config={RUNLOCAL}"], tmp_path / "w", VISREP_MALLOC="glibc")
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip().splitlines() == [
      "error: VISREP_MALLOC='glibc' is neither 'auto', 'system' nor an existing allocator "
      "library file: unset it, or give the path of e.g. libtcmalloc_minimal.so.4."]


@requires_fashion_mnist
def test_demo_runs_on_real_fashion_mnist(tmp_path):
  w = tmp_path / "demo"
  r = main(["--config=configs/deit3.py:demo", "--config.total_epochs=0", "--config.total_steps=30",
            "--config.log_every_steps=10", "--config.progress_bar=False"], w)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = metrics(w)
  train = [x for x in rows if "train/loss" in x]
  assert [x["step"] for x in train] == [10, 20, 30]
  assert all(k in train[0] for k in ("train/images_per_sec", "train/lr", "train/top1"))
  assert train[-1]["train/loss"] < train[0]["train/loss"]
  ev = rows[-1]
  assert ev["step"] == 30 and ev["eval/num_examples"] == 10000 and ev["eval/top1"] > 0.3
  assert "Test top-1" in r.stdout and os.path.exists(w / "curves.png")
  assert os.listdir(w / "tensorboard")


def test_crash_and_preemption_resume_exactly(tmp_path):
  ref = tmp_path / "ref"
  r = main([f"--config={RUNLOCAL}"] + LONG, ref)
  assert r.returncode == 0, r.stderr[-3000:]

  # Crash (SIGKILL) after step 7: the step-6 checkpoint may or may not have been committed.
  crash = tmp_path / "crash"
  r = main([f"--config={RUNLOCAL}"] + LONG, crash, VISREP_JAX_DEBUG_SIGNAL_AT_STEP="7:KILL")
  assert r.returncode == -9
  r = main([f"--config={RUNLOCAL}"] + LONG, crash)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resumed from" in r.stdout and "at step 12" not in r.stdout

  # Preemption (SIGTERM) after step 8: a checkpoint at step 8, exit code 143, then resume.
  pre = tmp_path / "preempt"
  r = main([f"--config={RUNLOCAL}"] + LONG, pre, VISREP_JAX_DEBUG_SIGNAL_AT_STEP="8:TERM")
  assert r.returncode == 143, r.stderr[-3000:]
  assert "SIGTERM: saved a checkpoint at step 8" in r.stdout
  assert os.path.isdir(pre / "checkpoints" / "8")
  r = main([f"--config={RUNLOCAL}"] + LONG, pre)
  assert r.returncode == 0 and "Resumed from" in r.stdout and "at step 8" in r.stdout

  p_ref, o_ref = final_params(ref)
  for w in (crash, pre):
    p, o = final_params(w)
    assert_trees_equal(p, p_ref)
    assert_trees_equal(o, o_ref)
    assert metrics(w)[-1] == metrics(ref)[-1]  # final eval metrics, bit for bit
  # keep-last-N: only 2 checkpoints remain.
  assert sorted(os.listdir(ref / "checkpoints")) == ["12", "9"]


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  args = [f"--config={RUNLOCAL}", "--config.total_steps=6", "--config.log_every_steps=1",
          "--config.plot_curves=False"]
  one = tmp_path / "one"
  r = main(args, one, num_devices=4)
  assert r.returncode == 0, r.stderr[-3000:]
  two = tmp_path / "two"
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "visrep_jax.main", f"--workdir={two}", f"--coordinator_address=localhost:{port}",
       "--num_processes=2", f"--process_id={i}"] + args,
      cwd=REPO, env=subprocess_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "on 4 devices (2 processes)" in outs[0][0]
  a, b = metrics(one), metrics(two)
  assert [x["step"] for x in a] == [x["step"] for x in b]
  for x, y in zip(a, b):
    for k in x:
      if k.startswith("eval/") or k in ("train/loss", "train/top1"):
        np.testing.assert_allclose(y[k], x[k], rtol=1e-5, atol=1e-6, err_msg=k)
  p1, _ = final_params(one, 6)
  p2, _ = final_params(two, 6)
  import jax
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), p1, p2)


def test_cpu_host_device_split_keeps_the_math(tmp_path):
  """config.cpu_devices=2 runs the step data parallel over two XLA host devices: the same
  losses and parameters as one device."""
  args = [f"--config={RUNLOCAL}", "--config.total_steps=4", "--config.log_every_steps=1",
          "--config.plot_curves=False"]
  runs = {}
  for n in (1, 2):
    w = tmp_path / f"d{n}"
    # No XLA_FLAGS from the test environment: main sets the flags itself.
    r = main(args + [f"--config.cpu_devices={n}"], w, XLA_FLAGS="")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"on {n} devices (1 processes)" in r.stdout
    runs[n] = w
  a, b = metrics(runs[1]), metrics(runs[2])
  assert [x["step"] for x in a] == [x["step"] for x in b] and len(a) >= 4
  for x, y in zip(a, b):
    for k in x:
      if k.startswith("eval/") or k in ("train/loss", "train/top1"):
        np.testing.assert_allclose(y[k], x[k], rtol=1e-5, atol=1e-6, err_msg=k)
  import jax
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6),
               final_params(runs[1], 4)[0], final_params(runs[2], 4)[0])


def test_eval_only_and_init_checkpoint(tmp_path):
  ref = tmp_path / "ref"
  args = [f"--config={RUNLOCAL}", "--config.total_steps=4", "--config.plot_curves=False"]
  assert main(args, ref).returncode == 0
  final = metrics(ref)[-1]
  # eval_only in the same workdir: restores the last checkpoint, evaluates, trains nothing.
  r = main(args + ["--config.eval_only=True"], ref)
  assert r.returncode == 0, r.stderr[-3000:]
  assert metrics(ref)[-1]["eval/top1"] == final["eval/top1"]
  # init_checkpoint in a fresh workdir: the parameters come from the other run.
  other = tmp_path / "other"
  r = main(args + ["--config.eval_only=True", f"--config.init_checkpoint={ref}"], other)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Initialised parameters from" in r.stdout
  assert metrics(other)[-1]["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-6)
  r = main(args + ["--config.eval_only=True", f"--config.init_checkpoint={tmp_path / 'none'}"], tmp_path / "x")
  assert r.returncode == 2 and "No checkpoint at" in r.stderr
  # A checkpoint of another model: one line naming the mismatch, no traceback.
  r = main(args + ["--config.eval_only=True", f"--config.init_checkpoint={ref}",
                   "--config.model.name=resnet18", "--config.model.drop_path_rate=0.0"],
           tmp_path / "y")
  assert r.returncode == 2, r.stderr[-3000:]
  assert "does not match the model's parameters" in r.stderr and "Traceback" not in r.stderr
  # Resuming the workdir with another model: one line, and its config.json (the record of the
  # trained model, which the eval tools rebuild it from) is kept.
  with open(ref / "config.json") as f:
    trained_config = f.read()
  r = main(args + ["--config.model.name=resnet18", "--config.model.drop_path_rate=0.0"], ref)
  assert r.returncode == 2, r.stderr[-3000:]
  assert "does not fit this config's train state" in r.stderr, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  with open(ref / "config.json") as f:
    assert f.read() == trained_config


def test_batchnorm_model_trains_and_its_statistics_are_checkpointed(tmp_path):
  """A ResNet (BatchNorm batch_stats as model_state) trains data-parallel on 2 devices; the
  running statistics move, are checkpointed, and init_checkpoint restores them (the eval loss
  of the restored model equals the trained one's only if they are)."""
  ref = tmp_path / "ref"
  args = [f"--config={RUNLOCAL}", "--config.total_steps=4", "--config.plot_curves=False",
          "--config.model.name=resnet18", "--config.model.drop_path_rate=0.0"]
  r = main(args, ref, num_devices=2)
  assert r.returncode == 0, r.stderr[-3000:]
  final = metrics(ref)[-1]
  assert np.isfinite(final["eval/loss"])
  import orbax.checkpoint as ocp
  tree = ocp.PyTreeCheckpointer().restore(str(ref / "checkpoints" / "4" / "state"))
  var = np.asarray(tree["model_state"]["batch_stats"]["bn1"]["var"])
  assert not np.allclose(var, 1.0), "BatchNorm running variance never updated"
  other = tmp_path / "other"
  r = main(args + ["--config.eval_only=True", f"--config.init_checkpoint={ref}"], other)
  assert r.returncode == 0, r.stderr[-3000:]
  assert metrics(other)[-1]["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-5)
