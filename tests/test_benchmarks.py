"""The benchmark scripts run (tiny sizes), print their tables, and the training benchmark never
imports TensorFlow (it must run on accelerator hosts that have JAX only)."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, requires_fashion_mnist, subprocess_env

pytestmark = pytest.mark.slow

NO_TF = """
import runpy, sys
sys.argv = {argv!r}
try:
  runpy.run_path("scripts/benchmark.py", run_name="__main__")
except SystemExit as e:
  if e.code: raise
assert sys.modules.get("tensorflow") is None, "benchmark imported TensorFlow"
print("NO_TF_OK")
"""


def test_benchmark_runs_without_tensorflow():
  argv = ["benchmark.py", "--model=vit_test_patch4_16", "--batch_size=8", "--resolution=16",
          "--steps=1", "--warmup=1", "--repeats=1"]
  r = subprocess.run([sys.executable, "-c", NO_TF.format(argv=argv)], cwd=REPO,
                     env=subprocess_env(1), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "NO_TF_OK" in r.stdout
  out = r.stdout.lower()
  assert "train" in out and "img/s" in out and "mfu" in out


def test_benchmark_batchnorm_convnet_against_torch():
  """A BatchNorm model (batch_stats updated in the train step) against timm, and a non-timm
  PyTorch reference through --torch_ref, both at a tiny size."""
  pytest.importorskip("timm")
  for extra in (["--model=resnet18", "--resolution=32"],
                ["--model=patchconvnet_test", "--no-train",
                 "--torch_ref=tests/torch_refs/patchconvnet_ref.py:create_test"]):
    r = subprocess.run([sys.executable, "scripts/benchmark.py", "--batch_size=2", "--steps=1",
                        "--warmup=1", "--repeats=1", "--vs-timm", *extra], cwd=REPO,
                       env=subprocess_env(1), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "JAX/timm throughput" in r.stdout, r.stdout[-2000:]


@requires_fashion_mnist
def test_input_benchmark_reports_pipeline_vs_step():
  r = subprocess.run([sys.executable, "scripts/benchmark_input.py", "--config=configs/deit3.py:demo",
                      "--steps=5"], cwd=REPO, env=subprocess_env(1), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "input pipeline alone" in r.stdout and "pipeline / step =" in r.stdout


def test_episode_benchmark_compares_record_and_whole_class_readers(tmp_path):
  r = subprocess.run([sys.executable, "scripts/benchmark_episodes.py", f"--data={tmp_path}",
                      "--classes=6", "--per_class=12", "--height=40", "--width=50",
                      "--episodes=2", "--image_size=16"],
                     cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "wrote 10 classes x 12 JPEGs 40x50" in r.stdout
  m = re.search(r"2 episodes at 16px: (\d+) images .*; (\d+) images decoded", r.stdout)
  # Without a cache every image of the 2 episodes (m[1] on average) is decoded once.
  assert m and int(m[1]) > 0 and abs(2 * int(m[1]) - int(m[2])) <= 1, r.stdout
  assert "whole-class:" in r.stdout and "records reader" in r.stdout


def test_gemm_benchmark_prints_every_shape_and_gemm():
  pytest.importorskip("torch")
  r = subprocess.run([sys.executable, "scripts/benchmark_gemm.py", "--batch=1", "--tokens=8",
                      "--repeats=1", "--iters=1"],
                     cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [l.split() for l in r.stdout.splitlines() if l.split()[:1] in (["qkv"], ["proj"],
                                                                         ["fc1"], ["fc2"])]
  assert len(rows) == 20 and all(float(row[-1]) > 0 for row in rows)
  assert {row[1] for row in rows} == {"fwd", "dinput", "dweight", "bwd-ad", "bwd"}


def test_benchmark_compares_host_device_counts():
  """--host_devices=1,2: one child process per count (XLA flags are process-wide), the batch
  split over the CPU devices, the same model FLOPs per image reported by both."""
  r = subprocess.run([sys.executable, "scripts/benchmark.py", "--model=vit_test_patch4_16",
                      "--batch_size=8", "--resolution=16", "--steps=1", "--warmup=1",
                      "--repeats=1", "--host_devices", "1,2"], cwd=REPO,
                     env=subprocess_env(1, XLA_FLAGS=""), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  parts = out.split("===== --host_devices=")
  assert [p.split("\n", 1)[0] for p in parts[1:]] == ["1", "2"], out[-3000:]
  assert parts[1].count("CpuDevice") == 1 and parts[2].count("CpuDevice") == 2
  flops = [re.search(r"forward GFLOPs/img \(XLA cost analysis\): (\S+)", p).group(1)
           for p in parts[1:]]
  assert flops[0] == flops[1] and float(flops[0]) > 0, flops
  rows = re.findall(r"^\s+(\d) (train|infer)\s+\S+\s+(\S+)x", out, re.M)
  assert [(n, m) for n, m, _ in rows] == [("1", "train"), ("1", "infer"), ("2", "train"),
                                          ("2", "infer")], out[-1500:]
  assert rows[0][2] == "1.00"


def test_dense_vjp_benchmark_times_both_variants():
  r = subprocess.run([sys.executable, "scripts/benchmark_dense_vjp.py", "--model=vit_test_patch4_16",
                      "--batch_size=4", "--steps=1", "--repeats=2"],
                     cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = {l.split()[0]: l for l in r.stdout.splitlines() if l.split()[:1] in (["autodiff"], ["ours"])}
  assert set(rows) == {"autodiff", "ours"}
  for line in rows.values():
    assert float(line.split()[2]) > 0 and len(line.split("windows:")[1].split()) == 2
  m = re.search(r"autodiff / ours\): ([0-9.]+)x", r.stdout)
  assert m and float(m[1]) > 0, r.stdout


@pytest.mark.parametrize("script", ["scripts/benchmark.py", "scripts/benchmark_dense_vjp.py"])
def test_benchmarks_reject_an_unknown_model_in_one_line(script):
  r = subprocess.run([sys.executable, script, "--model=no_such_model"], cwd=REPO,
                     env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert r.returncode != 0
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "--model: Unknown model 'no_such_model'. Valid:" in r.stderr
  assert "vit_test_patch4_16" in r.stderr  # the valid names are listed
