r"""Prints episodic workdirs' test accuracies beside the CrossTransformers paper's, as its Table 4.

    python scripts/fewshot_table.py /tmp/ctx /tmp/ctx_simclr_aug           # rows inferred
    python scripts/fewshot_table.py /tmp/my_run --row=ctx14 --table=ctx_table4
    python scripts/fewshot_table.py /tmp/ctx_mini --markdown

One line per workdir (``WORKDIR/fewshot_test.json``, written by the episodic trainer), then the
paper's row: columns are the ten Meta-Dataset sources in the paper's order, each cell
"mean ± CI" in % (ours: Meta-Dataset's 95% CI, 1.96 std / sqrt(episodes); the paper's: as printed,
see the ctx_table4 notes); a source the workdir did not evaluate prints '-'. Sources that are not
Meta-Dataset sources (the mini benchmark's fashion_mnist, digits) get their own columns, with no
paper number.

The paper row is ``--row`` (a key of ``--table``), or is inferred from ``WORKDIR/config.json``:
``fewshot.head`` (protonet / ctx), ``model.replace_stride_with_dilation`` (CTX14 when the last
stage is dilated, else CTX7), ``episodes.augment`` (``simclr`` -> +SimCLR Eps, ``bohb`` -> +Aug,
``sc_aug`` -> +SC-Aug), the test BatchNorm mode (``bn_test_mode`` of fewshot_test.json, else
``fewshot.bn_test_mode``: ProtoNets rows end in ``_ema`` for EMA) and, for ProtoNets, ResNet-18 at
126 px (Table 1's baseline rows). Without ``--table`` the row is looked up in ctx_table4, then
ctx_table1, ctx_table2, ctx_table3 (the tables in visrep_jax/results/tables); a configuration the
paper has no row for (e.g. CTX with support-set BatchNorm) prints ours alone, with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The paper's Table 4 column order, as our Meta-Dataset source names.
MD_SOURCES = ("ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi",
              "vgg_flower", "traffic_sign", "mscoco")
DEFAULT_TABLE = "ctx_table4"
SEARCH_ORDER = ("ctx_table4", "ctx_table1", "ctx_table2", "ctx_table3")


class FewshotTableError(ValueError):
  """A missing workdir / file or a bad argument; printed as one line."""


def _read_json(path: str, what: str, hint: str) -> Dict[str, Any]:
  if not os.path.isfile(path):
    raise FewshotTableError(f"{path} not found: {hint}")
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise FewshotTableError(f"{path} is not a readable {what} ({str(e).splitlines()[0]}).") from None
  if not isinstance(data, dict):
    raise FewshotTableError(f"{path} is not a {what} (expected a JSON object).")
  return data


def load_workdir(workdir: str, need_config: bool) -> Dict[str, Any]:
  """``{name, path, results, bn_test_mode, config}`` of an episodic workdir."""
  if not os.path.isdir(workdir):
    raise FewshotTableError(f"workdir {workdir!r} does not exist.")
  test = _read_json(os.path.join(workdir, "fewshot_test.json"), "few-shot test result",
                    "run the episodic trainer on this workdir first (configs/ctx.py, or "
                    "eval_only to test its checkpoint).")
  results = test.get("results")
  if not isinstance(results, dict):
    raise FewshotTableError(f"{os.path.join(workdir, 'fewshot_test.json')} has no 'results' "
                            "mapping of source -> {accuracy, ci95}.")
  cfg_path = os.path.join(workdir, "config.json")
  config = None
  if need_config or os.path.isfile(cfg_path):
    config = _read_json(cfg_path, "config", "cannot infer the paper row; pass --row=KEY.")
  name = os.path.basename(os.path.normpath(workdir)) or workdir
  bn = test.get("bn_test_mode") or ((config or {}).get("fewshot") or {}).get("bn_test_mode")
  return {"name": name, "path": workdir, "results": results, "bn_test_mode": bn or "ema",
          "config": config}


def infer_row(config: Dict[str, Any], bn_test_mode: Optional[str] = None) -> Tuple[str, str]:
  """(row key, why) of the paper's row for a workdir's config (see the module docstring)."""
  f = config.get("fewshot") or {}
  e = config.get("episodes") or {}
  m = config.get("model") or {}
  head = f.get("head", "protonet")
  augment = str(e.get("augment") or "none")
  bn = bn_test_mode or f.get("bn_test_mode") or "ema"
  simclr, bohb, sc_aug = "simclr" in augment, "bohb" in augment, "sc_aug" in augment
  dilation = m.get("replace_stride_with_dilation") or ()
  dilated = bool(dilation) and bool(list(dilation)[-1])
  if head == "ctx":
    key = "ctx14" if dilated else "ctx7"
    key += "_scaug" * sc_aug + "_simclr" * simclr + "_aug" * bohb
    key += "_lr" * bool(f.get("lr_head"))  # test-time LR on pooled features (CTX + 5 LR)
    key += "_support" * (bn == "support")  # not in the paper: CTX results use EMA
  else:
    key = "protonet"
    if m.get("name") == "resnet18" and e.get("image_size") == 126:
      key += "_r18_126"
    key += "_scaug" * sc_aug + "_simclr" * simclr + "_aug" * bohb
    key += "_ema" * (bn == "ema")
  why = (f"fewshot.head={head}, " + (f"last stage {'dilated' if dilated else 'stride 32'}, "
                                     if head == "ctx" else "")
         + ("fewshot.lr_head=True, " if f.get("lr_head") else "")
         + f"episodes.augment={augment!r}, bn_test_mode={bn}")
  return key, why


def paper_row(key: str, table: Optional[str], explicit: bool):
  """(table, row) of ``key``; None when an inferred key is in no table. An explicit ``--row``
  that is not in the table is an error."""
  from visrep_jax import results
  names = [table] if table else list(SEARCH_ORDER)
  for name in names:
    t = results.load(name)
    if key in t.keys():
      return t, t.row(key)
  if explicit:
    t = results.load(names[0])
    t.row(key)  # raises UnknownNameError listing the valid rows
  return None


def _cell(mean: Optional[float], ci: Optional[float]) -> str:
  if mean is None:
    return "-"
  return f"{mean:.2f}" + ("" if ci is None else f" ± {ci:.2f}")


def build(workdirs: List[str], row: Optional[str] = None, table: Optional[str] = None
          ) -> Dict[str, Any]:
  """The comparison: headers, lines (ours then the paper's, per workdir) and notes."""
  from visrep_jax import results
  if table and not set(MD_SOURCES) & set(results.load(table).columns):  # unknown: UnknownNameError
    raise FewshotTableError(f"table {table!r} has no Meta-Dataset columns; use one of "
                            f"{', '.join(sorted(SEARCH_ORDER))}.")
  if not workdirs:
    raise FewshotTableError("give at least one workdir.")
  runs = [load_workdir(w, need_config=row is None) for w in workdirs]
  extra: List[str] = []
  for r in runs:
    extra += [s for s in r["results"] if s not in MD_SOURCES and s not in extra]
  labels_table = results.load(DEFAULT_TABLE)  # the paper's Table 4 headers
  headers = ["Model"] + [labels_table.columns[s]["label"] if s in labels_table.columns else s
                         for s in MD_SOURCES] + extra
  columns = list(MD_SOURCES) + extra
  lines, notes = [], []
  for r in runs:
    res = r["results"]
    episodes = sorted({int(v.get("episodes", 0)) for v in res.values() if isinstance(v, dict)})
    ep = f" [{'/'.join(map(str, episodes))} ep]" if episodes else ""
    ours = [f"ours: {r['name']}{ep}"]
    for s in columns:
      v = res.get(s)
      if isinstance(v, dict) and v.get("accuracy") is not None:
        ci = v.get("ci95")
        ours.append(_cell(100.0 * float(v["accuracy"]), None if ci is None else 100.0 * float(ci)))
      else:
        ours.append("-")
    lines.append(ours)
    if row:
      key, why = row, "--row"
    else:
      key, why = infer_row(r["config"], r["bn_test_mode"])
    found = paper_row(key, table, explicit=row is not None)
    if found is None:
      where = table or ", ".join(SEARCH_ORDER)
      notes.append(f"{r['name']}: no paper row {key!r} ({why}) in {where}; pass --row=KEY.")
      continue
    t, prow = found
    paper = [f"paper: {prow['label']} [{t.name}/{key}]"]
    for s in columns:
      if s in t.columns:
        paper.append(_cell(prow.get(s), prow.get(s + "_ci")))
      else:
        paper.append("-")
    lines.append(paper)
    notes.append(f"{r['name']}: paper row {t.name}/{key} ({why}; {t.source} Table "
                 f"{', '.join(t.thesis_tables)}, {prow.get('line') or t.thesis_lines}).")
  if extra:
    notes.append(f"{', '.join(extra)}: not Meta-Dataset sources, no paper number.")
  notes.append("Ours: mean ± 1.96 std / sqrt(episodes) (Meta-Dataset's 95% CI); the paper's CI is "
               "as printed in its Table 4 (see the ctx_table4 notes).")
  return {"headers": headers, "lines": lines, "notes": notes}


def format_text(c: Dict[str, Any]) -> str:
  rows = [c["headers"]] + c["lines"]
  widths = [max(len(x) for x in col) for col in zip(*rows)]
  line = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths)).rstrip()
  title = "Meta-Dataset test accuracy (%), mean ± CI: ours beside CrossTransformers (Table 4 layout)"
  out = [title, line(c["headers"]), line(["-" * w for w in widths])]
  out += [line(x) for x in c["lines"]]
  out += [f"  note: {n}" for n in c["notes"]]
  return "\n".join(out)


def format_markdown(c: Dict[str, Any]) -> str:
  esc = lambda s: s.replace("|", "\\|")
  out = ["| " + " | ".join(esc(h) for h in c["headers"]) + " |",
         "|" + "---|" * len(c["headers"])]
  out += ["| " + " | ".join(esc(x) for x in cells) + " |" for cells in c["lines"]]
  out += [""] + [f"- {esc(n)}" for n in c["notes"]]
  return "\n".join(out)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("workdirs", nargs="+", metavar="WORKDIR")
  ap.add_argument("--row", help="the paper row to compare with (default: from config.json)")
  ap.add_argument("--table", help=f"the paper table of --row (default: {DEFAULT_TABLE}, then "
                                  "ctx_table1-3)")
  ap.add_argument("--markdown", action="store_true", help="a Markdown table")
  args = ap.parse_args(argv)
  from visrep_jax.registry import UnknownNameError
  try:
    c = build(args.workdirs, args.row, args.table)
  except (FewshotTableError, UnknownNameError) as e:
    msg = (str(e).splitlines() or [repr(e)])[0]
    print(f"error: {msg}", file=sys.stderr)
    return 2
  print(format_markdown(c) if args.markdown else format_text(c))
  return 0


if __name__ == "__main__":
  sys.exit(main())
