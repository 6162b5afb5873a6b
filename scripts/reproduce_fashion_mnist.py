r"""Small-scale reproduction on CPU: each family's recipe scaled down to Fashion-MNIST.

Trains ``configs/<family>.py:fashion_mnist`` for every family asked for (each in its own
process and workdir, so a finished run is skipped and an interrupted one resumes), then writes
a Markdown table of test top-1 with wall-clock and CPU time beside the published Fashion-MNIST
benchmark (the table of the dataset's README, which Debian ships with the data). Families run
trained to the end earlier into the same ``--out`` with the same overrides (and not asked for
now) keep their rows in the table, marked "earlier run", so running the families one at a time
builds one table.

  python scripts/reproduce_fashion_mnist.py --families=deit3,resnet --out=workdirs/fmnist
  python scripts/reproduce_fashion_mnist.py            # every family (several CPU hours)

Targets (issue 4): the DeiT III recipe on a small ViT >= 0.92 and the ResNet-18 recipe >= 0.94,
each within 60 minutes on 2 CPU cores. ``--smoke`` runs 3 steps per family (tests).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# family -> (config, what it trains, target top-1 or None)
FAMILIES: Dict[str, Tuple[str, str, Optional[float]]] = {
    "deit3": ("configs/deit3.py:fashion_mnist", "DeiT III recipe, small ViT (conv stem)", 0.92),
    "resnet": ("configs/resnet.py:fashion_mnist", "ResNet-18, SGD recipe", 0.94),
    "deit": ("configs/deit.py:fashion_mnist", "DeiT recipe, small ViT", None),
    "cait": ("configs/cait.py:fashion_mnist", "CaiT recipe, small CaiT", None),
    "resmlp": ("configs/resmlp.py:fashion_mnist", "ResMLP recipe, small ResMLP", None),
    "patchconvnet": ("configs/patchconvnet.py:fashion_mnist", "PatchConvNet recipe, small S60",
                     None),
}

README = "/usr/share/doc/dataset-fashion-mnist/README.md.gz"
# Rows of that README's benchmark table (used when the file is not installed).
PUBLISHED_FALLBACK = [
    ("WRN-28-10 + Random Erasing", 0.963), ("WRN-28-10", 0.959), ("DenseNet-BC 768K params", 0.954),
    ("MobileNet", 0.950), ("ResNet18", 0.949), ("VGG16 26M parameters", 0.935),
    ("2 Conv+pooling", 0.916), ("MLP 256-128-100", 0.8833), ("Human Performance", 0.835),
]


def published_benchmark(path: str = README) -> List[Tuple[str, float]]:
  """``[(classifier, fashion test accuracy)]`` from the README's benchmark table, best first."""
  if not os.path.exists(path):
    return list(PUBLISHED_FALLBACK)
  rows = []
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for line in f:
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      if len(cells) < 4 or not re.fullmatch(r"0?\.\d+", cells[2]):
        continue
      rows.append((cells[0], float(cells[2])))
  return sorted(rows, key=lambda r: -r[1]) or list(PUBLISHED_FALLBACK)


def final_metrics(workdir: str) -> Dict[str, float]:
  """Last eval/top1 (and the step it was written at) from ``metrics.jsonl`` (a line cut short
  by an interrupted write is skipped)."""
  out: Dict[str, float] = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:
        continue
      if "eval/top1" in rec:
        out = {"top1": rec["eval/top1"], "step": rec["step"]}
  return out


def _read_timing(name: str, timing_path: str) -> Optional[Dict[str, object]]:
  """``timing.json``: ``wall_s``/``cpu_s`` accumulated so far, ``complete`` (the last
  invocation finished training) and ``args`` (its config overrides); None when absent or
  unreadable (said)."""
  if not os.path.exists(timing_path):
    return None
  try:
    with open(timing_path) as f:
      stored = json.load(f)
    for k in ("wall_s", "cpu_s"):
      stored[k] = float(stored[k])
    return stored
  except (ValueError, KeyError, TypeError):
    print(f"[{name}] {timing_path} is unreadable; timing restarts from 0 (the run itself "
          "resumes from its checkpoint).", flush=True)
    return None


def earlier_result(name: str, out_dir: str, extra: List[str]) -> Optional[Dict[str, object]]:
  """The row of a family trained to the end earlier into ``out_dir`` with the same config
  overrides ``extra`` (a smoke or ``--set`` run never shows as a full one), else None."""
  config, what, target = FAMILIES[name]
  workdir = os.path.join(out_dir, name)
  stored = _read_timing(name, os.path.join(workdir, "timing.json"))
  m = final_metrics(workdir)
  if not stored or not m:
    return None
  why = None
  if "complete" not in stored:
    why = ("its timing.json predates the record of finished runs; rerun with "
           f"--families={name} to list it (a finished run resumes and only evaluates)")
  elif not stored["complete"]:
    why = f"it did not finish; rerun with --families={name} to resume it"
  elif stored.get("args") != extra:
    why = f"it was trained with other overrides ({' '.join(stored.get('args') or []) or 'none'})"
  if why:
    print(f"[{name}] the earlier run in {workdir} is not in the table: {why}.", flush=True)
    return None
  return {"family": name, "what": what, "config": config, "target": target, "earlier": True,
          "wall_s": stored["wall_s"], "cpu_s": stored["cpu_s"], **m}


def run_family(name: str, out_dir: str, extra: List[str]) -> Dict[str, object]:
  config, what, target = FAMILIES[name]
  workdir = os.path.join(out_dir, name)
  os.makedirs(workdir, exist_ok=True)
  timing_path = os.path.join(workdir, "timing.json")
  stored = _read_timing(name, timing_path)
  timing = {k: stored[k] if stored else 0.0 for k in ("wall_s", "cpu_s")}
  cmd = [sys.executable, "-m", "visrep_jax.main", f"--config={os.path.join(ROOT, config)}",
         f"--workdir={workdir}", *extra]
  print(f"[{name}] {' '.join(cmd)}", flush=True)
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.time()
  with open(os.path.join(workdir, "train.log"), "a") as log:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  # Accumulated over resumed invocations (a finished run adds only its start-up and final eval).
  timing["wall_s"] += time.time() - t0
  timing["cpu_s"] += (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  with open(timing_path, "w") as f:
    json.dump({**timing, "complete": proc.returncode == 0, "args": extra}, f)
  if proc.returncode != 0:
    tail = open(os.path.join(workdir, "train.log")).read()[-2000:]
    raise SystemExit(f"[{name}] failed (exit {proc.returncode}); log {workdir}/train.log:\n{tail}")
  m = final_metrics(workdir)
  return {"family": name, "what": what, "config": config, "target": target, **timing, **m}


def markdown(results: List[Dict[str, object]], published: List[Tuple[str, float]]) -> str:
  lines = ["| family | recipe | test top-1 | target | wall (min) | CPU (min) | config |",
           "|---|---|---|---|---|---|---|"]
  for r in results:
    target = r["target"]
    met = "" if target is None else (" (met)" if r.get("top1", 0) >= target else " (NOT met)")
    family = f"{r['family']} (earlier run)" if r.get("earlier") else r["family"]
    lines.append(f"| {family} | {r['what']} | {r.get('top1', float('nan')):.4f} | "
                 f"{'-' if target is None else f'>= {target}'}{met} | {r['wall_s'] / 60:.1f} | "
                 f"{r['cpu_s'] / 60:.1f} | `{r['config']}` |")
  lines += ["", "Published Fashion-MNIST benchmark (the dataset's README; submitted, untested "
            "numbers):", "", "| classifier | test accuracy |", "|---|---|"]
  lines += [f"| {name} | {acc:.4f} |" for name, acc in published]
  return "\n".join(lines) + "\n"


def config_overrides(settings: List[str], smoke: bool) -> List[str]:
  """The ``--config.*`` flags every family's run gets: ``--set`` values, and the smoke steps."""
  extra = [f"--config.{kv}" for kv in settings]
  if smoke:
    extra += ["--config.total_epochs=0", "--config.total_steps=3", "--config.eval_every_steps=0",
              "--config.checkpoint_every_steps=0", "--config.log_every_steps=1",
              "--config.plot_curves=False", "--config.progress_bar=False"]
  return extra


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--families", default=",".join(FAMILIES),
                 help=f"comma-separated, from: {', '.join(FAMILIES)}")
  p.add_argument("--out", default="workdirs/fashion_mnist", help="one workdir per family here")
  p.add_argument("--smoke", action="store_true", help="3 steps per family (tests)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every family, e.g. --set total_epochs=1")
  args = p.parse_args(argv)
  families = [f.strip() for f in args.families.split(",") if f.strip()]
  bad = [f for f in families if f not in FAMILIES]
  if bad:
    p.error(f"unknown families {bad}; choose from {', '.join(FAMILIES)}")
  extra = config_overrides(args.set, args.smoke)
  os.makedirs(args.out, exist_ok=True)
  results = [run_family(f, args.out, extra) for f in families]
  # Rows of families trained earlier into the same --out, in FAMILIES order after this run's.
  earlier = [earlier_result(f, args.out, extra) for f in FAMILIES if f not in families]
  table = markdown(results + [r for r in earlier if r is not None], published_benchmark())
  path = os.path.join(args.out, "fashion_mnist.md")
  with open(path, "w") as f:
    f.write(table)
  print(table)
  print(f"Table written to {path}")
  return results


if __name__ == "__main__":
  main()
