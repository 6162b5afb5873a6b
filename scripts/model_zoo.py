r"""Prints the model zoo beside the papers' numbers: parameters and GFLOPs (multiply-adds).

    python scripts/model_zoo.py                 # every registered model
    python scripts/model_zoo.py --filter cait   # names containing 'cait'
    python scripts/model_zoo.py --check         # exit 1 if any model is off its paper's numbers

Ours: parameter count from ``jax.eval_shape`` of the model's init and multiply-adds counted
from the traced forward pass (``visrep_jax.models.flops``); nothing is allocated, so even the
632M-parameter ViT-H is listed in seconds. Paper: ``paper_metadata(name)`` (the tables cited in
the ``source`` column). Tolerances for ``--check``: parameters within the papers' rounding
(0.05M, or 0.5%, or the model's ``params_tol_m``), GFLOPs within 3% (or 0.05, the
tables' rounding).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

PARAM_ABS_TOL_M = 0.05
PARAM_REL_TOL = 0.005
GFLOPS_REL_TOL = 0.03
GFLOPS_ROUNDING = 0.05  # the tables print one decimal


def zoo_rows(names):
  from visrep_jax import models
  rows = []
  for name in names:
    meta = models.paper_metadata(name)
    res = meta.get("resolution", 0)
    params_m = models.num_params(name) / 1e6
    gflops = models.flops(name, res) / 1e9
    row = dict(name=name, params_m=params_m, gflops=gflops, paper_params_m=meta.get("params_m"),
               paper_gflops=meta.get("gflops"), top1=meta.get("top1"),
               source=meta.get("source", ""), ok=True, notes=[])
    p = row["paper_params_m"]
    # Some papers round to whole millions (DeiT prints DeiT-Ti's 5.7M as "5M"): ``params_tol_m``.
    tol = meta.get("params_tol_m", max(PARAM_ABS_TOL_M, PARAM_REL_TOL * (p or 0)))
    if p is not None and abs(params_m - p) > tol:
      row["ok"] = False
      row["notes"].append(f"params {params_m:.2f}M vs {p}M")
    g = row["paper_gflops"]
    if g is not None and abs(gflops - g) > max(GFLOPS_REL_TOL * g, GFLOPS_ROUNDING):
      row["ok"] = False
      row["notes"].append(f"GFLOPs {gflops:.2f} vs {g} ({100 * (gflops / g - 1):+.1f}%)")
    rows.append(row)
  return rows


def _fmt(v, spec):
  return format(v, spec) if v is not None else "-"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--filter", default="", help="only names containing this string")
  ap.add_argument("--check", action="store_true", help="exit 1 on any deviation")
  ap.add_argument("--with-test-models", action="store_true",
                  help="also list the tiny test/demo models")
  args = ap.parse_args(argv)
  from visrep_jax import models
  names = [n for n in models.list_models() if args.filter in n]
  if not args.with_test_models:
    names = [n for n in names if "test" not in n and "demo" not in n]
  rows = zoo_rows(names)
  head = (f"{'model':34s} {'params(M)':>9s} {'paper':>7s} {'GFLOPs':>8s} {'paper':>7s} "
          f"{'top-1':>6s}  source")
  print(head)
  print("-" * len(head))
  for r in rows:
    flag = "" if r["ok"] else "   <-- " + "; ".join(r["notes"])
    print(f"{r['name']:34s} {r['params_m']:9.2f} {_fmt(r['paper_params_m'], '7.1f')} "
          f"{r['gflops']:8.2f} {_fmt(r['paper_gflops'], '7.1f')} {_fmt(r['top1'], '6.1f')}  "
          f"{r['source']}{flag}")
  bad = [r for r in rows if not r["ok"]]
  print(f"\n{len(rows)} models, {len(rows) - len(bad)} match their paper's numbers"
        f"{'' if not bad else f', {len(bad)} do not: ' + ', '.join(r['name'] for r in bad)}")
  return 1 if (args.check and bad) else 0


if __name__ == "__main__":
  sys.exit(main())
