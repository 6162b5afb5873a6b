"""Metric writing: clu writers (TensorBoard + log) plus ``WORKDIR/metrics.jsonl``, a progress
line with images/s and ETA, and a PNG of the learning curves."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Dict, Mapping, Optional

import numpy as np
import jax


class JsonlWriter:
  """One JSON object per write: ``{"step": s, "train/loss": ..., ...}``."""

  def __init__(self, path: str):
    self.path = path
    os.makedirs(os.path.dirname(path), exist_ok=True)

  def write(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")


class MetricWriter:
  """Writes scalars everywhere at once. Only process 0 writes files."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.is_main = jax.process_index() == 0
    self.workdir = workdir
    self.jsonl = JsonlWriter(os.path.join(workdir, "metrics.jsonl")) if self.is_main else None
    self.clu = None
    if self.is_main and tensorboard:
      from clu import metric_writers  # imports TensorFlow's summary ops
      self.clu = metric_writers.create_default_writer(
          os.path.join(workdir, "tensorboard"), just_logging=False, asynchronous=False)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    if not self.is_main:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self.jsonl.write(step, scalars)
    if self.clu is not None:
      self.clu.write_scalars(step, scalars)
      self.clu.flush()

  def close(self):
    if self.clu is not None:
      self.clu.close()


def read_jsonl(path: str):
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        line = line.strip()
        if line:
          rows.append(json.loads(line))
  return rows


class Progress:
  """Progress line: step, loss, images/s and ETA (logged every ``log_every_steps``)."""

  def __init__(self, total_steps: int, start_step: int, batch_size: int):
    self.total, self.batch = total_steps, batch_size
    self.t0, self.s0 = time.time(), start_step
    self.last_t, self.last_s = self.t0, start_step

  def update(self, step: int) -> Dict[str, float]:
    now = time.time()
    dt, ds = now - self.last_t, step - self.last_s
    ips = ds * self.batch / dt if dt > 0 and ds > 0 else float("nan")
    total_rate = (step - self.s0) / max(now - self.t0, 1e-9)
    eta = (self.total - step) / total_rate if total_rate > 0 else float("nan")
    self.last_t, self.last_s = now, step
    return {"images_per_sec": ips, "eta_sec": eta, "steps_per_sec": ds / dt if dt > 0 else 0.0}


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def plot_curves(workdir: str, out_name: str = "curves.png") -> Optional[str]:
  """PNG of train loss and eval top-1 against step, from ``metrics.jsonl``."""
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  series = {}
  for r in rows:
    for k, v in r.items():
      if k != "step":
        series.setdefault(k, []).append((r["step"], v))
  panels = [k for k in ("train/loss", "eval/loss", "eval/top1", "train/top1", "train/lr")
            if k in series]
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
  axes = np.atleast_1d(axes)
  for ax, k in zip(axes, panels):
    s, v = zip(*series[k])
    ax.plot(s, v, marker="o" if len(s) < 30 else None, markersize=3)
    ax.set_title(k)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, out_name)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
