r"""Inference (and optionally training) throughput of one model per family against PyTorch.

    python scripts/benchmark_zoo.py                 # inference, batch 32, 224px
    python scripts/benchmark_zoo.py --train --batch_size 16

Runs ``scripts/benchmark.py --vs-timm`` for each model below (a separate process each, so
compilation caches and thread pools do not interfere) and prints one table of JAX/PyTorch
ratios. PatchConvNet is not in timm: it is compared with the PyTorch re-implementation of the
official code in ``tests/torch_refs/patchconvnet_ref.py`` (the same one the parity tests use).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = [
    # (our name, extra benchmark.py arguments)
    ("deit_small_patch16_224", []),
    ("cait_xxs24_224", []),
    ("resmlp_12_224", []),
    ("patchconvnet_s60", ["--torch_ref", "tests/torch_refs/patchconvnet_ref.py:S60"]),
    ("resnet50", []),
]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--train", action="store_true", help="also time training steps")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--only", default="", help="comma-separated subset of the model names")
  args = ap.parse_args(argv)
  todo = [(m, extra) for m, extra in MODELS if not args.only or m in args.only.split(",")]
  rows = []
  for name, extra in todo:
    cmd = [sys.executable, os.path.join(REPO, "scripts", "benchmark.py"), "--model", name,
           "--batch_size", str(args.batch_size), "--steps", str(args.steps), "--repeats",
           str(args.repeats), "--vs-timm", *extra]
    if not args.train:
      cmd.append("--no-train")
    print("$", " ".join(cmd[1:]), flush=True)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
      print(r.stdout[-2000:], r.stderr[-3000:])
      rows.append((name, "failed", "", ""))
      continue
    table = [l for l in r.stdout.splitlines() if l.startswith(("train ", "infer "))]
    print("\n".join(table), flush=True)
    for mode in ("infer", "train"):
      jax_line = next((l for l in table if l.startswith(mode) and " jax " in l), None)
      ref_line = next((l for l in table if l.startswith(mode) and " jax " not in l), None)
      if jax_line and ref_line:
        jax_ips = float(jax_line.split()[2])
        ref_ips = float(ref_line.split()[2])
        rows.append((name, mode, f"{jax_ips:.2f} / {ref_ips:.2f}", f"{jax_ips / ref_ips:.2f}x"))
  print(f"\nbatch {args.batch_size}, float32, {os.cpu_count()} CPU cores")
  print(f"{'model':26s} {'mode':6s} {'img/s JAX / PyTorch':>22s} {'ratio':>7s}")
  for row in rows:
    print(f"{row[0]:26s} {row[1]:6s} {row[2]:>22s} {row[3]:>7s}")
  return 0 if all(r[1] != "failed" for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
