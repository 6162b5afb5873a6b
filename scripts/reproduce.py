r"""Evaluates a checkpoint and prints its top-1 beside the thesis's, table by table.

    python scripts/reproduce.py --list                     # the stored tables
    python scripts/reproduce.py --table deit3_in1k         # print one table
    python scripts/reproduce.py --table deit3_in1k --checkpoint /ckpts/deit3_s_in1k \
        --model deit3_small_patch16_224 --data_dir $TFDS_DATA_DIR
    python scripts/reproduce.py --table cait_in1k --row s36_384_dist --checkpoint /ckpts/cait_s36_384
    python scripts/reproduce.py --table deit_transfer --column cifar10 --row deit_base \
        --checkpoint /tmp/deit_b_cifar10 --data_dir $TFDS_DATA_DIR

``--checkpoint``: a training workdir (its latest checkpoint; the model comes from its
``config.json``) or the ``--out`` of ``python -m visrep_jax.convert`` (the model comes from its
``model.json``), e.g. an official DeiT / DeiT III / CaiT / ResMLP checkpoint converted to Flax.
The rows compared are those of ``--model`` (``--row`` picks others, comma-separated); each is
evaluated with the row's protocol: its test resolution (the model is built at that size, a
position embedding trained at another one is resampled bicubically) and its crop ratio
(``decode|center_crop(res, crop_ratio=...)|normalize('imagenet')``: Resize the short side to
res / crop_ratio with bicubic antialiasing, then the central res x res crop), on the column's
dataset (``--column``, default the table's primary one: ImageNet-1k validation for the ImageNet
tables). ``--dataset``/``--split``/``--eval_pp``/``--resolution``/``--crop_ratio`` override
the protocol (the tests use synthetic data). ReaL needs multi-label evaluation and is not
evaluated here. ``--json FILE`` writes the comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

NOT_EVALUATED = ("real",)


class ReproduceError(ValueError):
  """A bad argument or an impossible comparison; printed as one line."""


def model_from_checkpoint(path: str) -> Tuple[Optional[str], Dict[str, Any]]:
  """(model name, create() overrides) recorded with a checkpoint, or (None, {})."""
  path = os.path.abspath(path)
  for d in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    meta = os.path.join(d, "model.json")  # python -m visrep_jax.convert --out
    if os.path.isfile(meta):
      with open(meta) as f:
        m = json.load(f)
      return m.get("model"), dict(m.get("overrides") or {})
    cfg = os.path.join(d, "config.json")  # a training workdir
    if os.path.isfile(cfg):
      with open(cfg) as f:
        model = dict(json.load(f).get("model") or {})
      name = model.pop("name", None)
      for k in ("drop_path_rate", "dtype", "remat", "num_classes"):
        model.pop(k, None)
      return name, model
  return None, {}


def select_rows(table, model: Optional[str], rows: Optional[str]) -> List[Dict[str, Any]]:
  from visrep_jax import models
  if rows:
    return [table.row(k.strip()) for k in rows.split(",") if k.strip()]
  if not model:
    raise ReproduceError("give --model (or a checkpoint with a model.json / config.json) or "
                         "--row to choose the rows to compare.")
  picked = table.rows_for_model(models.alias_of(model))
  if not picked:
    with_models = sorted({r["model"] for r in table.rows if r.get("model")})
    raise ReproduceError(
        f"no row of table {table.name!r} is for model {model!r}; pass --row KEY (rows: "
        f"{', '.join(table.keys())}) or a model of the table ({', '.join(with_models)}).")
  return picked


def column_dataset(table, column: str) -> Tuple[str, str]:
  if column not in table.columns:
    raise ReproduceError(f"table {table.name!r} has no column {column!r}; valid: "
                         f"{', '.join(table.columns)}.")
  if column in NOT_EVALUATED:
    raise ReproduceError(f"column {column!r} ({table.columns[column]['label']}) needs "
                         "multi-label evaluation, which this script does not do; choose one of "
                         f"{', '.join(c for c in table.columns if c not in NOT_EVALUATED)}.")
  info = table.columns[column]
  return info["dataset"], info["split"]


def evaluate(checkpoint: str, model_name: str, overrides: Dict[str, Any], dataset: str,
             split: str, eval_pp: str, resolution: Optional[int], data_dir: Optional[str] = None,
             batch_size: int = 128, num_classes: int = 0) -> Dict[str, float]:
  """Top-1 / top-5 / loss of ``checkpoint`` on ``dataset:split`` (fractions, not %)."""
  import jax
  import jax.numpy as jnp
  import optax
  from visrep_jax import checkpoint as ckpt_lib
  from visrep_jax import losses, models
  from visrep_jax import sharding as sharding_lib
  from visrep_jax.data import pipeline, sources
  from visrep_jax.evaluators import classification

  source = sources.create(dataset, **({"data_dir": data_dir} if data_dir else {}))
  num_classes = num_classes or source.num_classes
  if not num_classes:
    raise ReproduceError(f"dataset {dataset!r} does not say its class count: pass --num_classes.")
  model = models.create(model_name, num_classes=num_classes, **overrides)
  if resolution and getattr(model, "img_size", resolution) != resolution:
    model = model.clone(img_size=resolution)  # e.g. DeiT-B at 320: pos_embed resampled below

  devices = jax.devices()
  mesh = sharding_lib.make_mesh((("data", -1),), devices)
  repl = sharding_lib.replicated(mesh)
  image_hw = resolution or getattr(model, "img_size", None) or 224
  channels = _pp_channels(eval_pp)
  abstract = jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)},
      jnp.zeros((1, image_hw, image_hw, channels)), train=False))
  abstract = dict(abstract)
  placed = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), abstract)
  abstract_params = placed.pop("params")
  params, model_state = ckpt_lib.load_variables(checkpoint, abstract_params, placed or None,
                                                adapt_pos_embed=True, adapt_head=False)
  variables = {"params": params, **(model_state or {})}

  def eval_step(variables, batch):
    logits, _ = model.apply(variables, batch["image"].astype(jnp.float32), train=False)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    xent = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, num_classes))
    return {"top1": (losses.topk_correct(logits, labels, 1) * mask).sum(),
            "top5": (losses.topk_correct(logits, labels, 5) * mask).sum(),
            "loss": (xent * mask).sum(), "count": mask.sum()}

  batch_sharding = sharding_lib.batch_sharding(mesh)
  step = jax.jit(eval_step, in_shardings=(repl, batch_sharding), out_shardings=repl)
  local = max(len(devices), batch_size - batch_size % len(devices)) // jax.process_count()
  eval_input = pipeline.make_eval(source, split, eval_pp, local)
  return classification.evaluate(step, variables, eval_input, batch_sharding)


def _pp_channels(spec: str) -> int:
  from visrep_jax.data import preprocess
  for op in preprocess.split_spec(spec):
    if op.startswith("decode(") and op.replace(" ", "").startswith("decode(1"):
      return 1
  return 3


def compare(args) -> List[Dict[str, Any]]:
  from visrep_jax import results
  table = results.load(args.table)
  model, overrides = args.model, {}
  if args.checkpoint:
    recorded, overrides = model_from_checkpoint(args.checkpoint)
    model = model or recorded
    if args.model and recorded and args.model != recorded:
      overrides = {}  # the recorded options belong to another model
  rows = select_rows(table, model, args.row)
  column = args.column or table.primary
  dataset, split = column_dataset(table, column)
  dataset, split = args.dataset or dataset, args.split or split
  out = []
  for row in rows:
    name = model or row.get("model")
    if not name:
      raise ReproduceError(f"row {row['key']!r} has no zoo model: pass --model.")
    res = args.resolution or row.get("resolution") or 224
    crop = args.crop_ratio or row.get("crop_ratio") or 0.875
    pp = args.eval_pp or f"decode|center_crop({res}, crop_ratio={crop})|normalize('imagenet')"
    paper = row.get(column)
    entry = {"table": table.name, "row": row["key"], "label": row["label"], "column": column,
             "model": name, "dataset": dataset, "split": split, "resolution": res,
             "crop_ratio": crop, "eval_pp": pp, "paper": paper}
    if args.checkpoint:
      r = evaluate(args.checkpoint, name, overrides, dataset, split, pp,
                   args.resolution or row.get("resolution"), args.data_dir, args.batch_size,
                   args.num_classes)
      entry.update(ours=100.0 * r["top1"], ours_top5=100.0 * r["top5"], loss=r["loss"],
                   num_examples=int(r["num_examples"]))
      entry["delta"] = None if paper is None else entry["ours"] - paper
    out.append(entry)
  return out


def format_comparison(entries: List[Dict[str, Any]]) -> str:
  head = ["row", "label", "model", "res", "crop", "dataset", "paper", "ours", "delta", "n"]
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  body = [[e["row"], e["label"], e["model"], str(e["resolution"]), str(e["crop_ratio"]),
           f"{e['dataset']}:{e['split']}", fmt(e["paper"], ".1f"), fmt(e.get("ours"), ".2f"),
           fmt(e.get("delta"), "+.2f"), fmt(e.get("num_examples"), "d")] for e in entries]
  widths = [max(len(x) for x in col) for col in zip(head, *body)]
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  t = entries[0]
  title = f"{t['table']} ({t['column']} top-1 %): ours beside the thesis"
  return "\n".join([title, line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=__doc__.split("\n", 2)[2])
  ap.add_argument("--list", action="store_true", help="list the stored tables")
  ap.add_argument("--table", help="table name (see --list)")
  ap.add_argument("--checkpoint", help="workdir or visrep_jax.convert --out directory")
  ap.add_argument("--model", help="zoo model of the checkpoint (default: recorded with it)")
  ap.add_argument("--row", help="comma-separated row keys (default: the rows of --model)")
  ap.add_argument("--column", help="metric column (default: the table's primary column)")
  ap.add_argument("--data_dir", help="TFDS data_dir / image folder root")
  ap.add_argument("--dataset", help="override the column's dataset (e.g. synthetic)")
  ap.add_argument("--split", help="override the column's split (e.g. 'validation[:10%%]')")
  ap.add_argument("--eval_pp", help="override the evaluation preprocessing spec")
  ap.add_argument("--resolution", type=int, help="override the row's test resolution")
  ap.add_argument("--crop_ratio", type=float, help="override the row's crop ratio")
  ap.add_argument("--batch_size", type=int, default=128)
  ap.add_argument("--num_classes", type=int, default=0, help="default: the dataset's")
  ap.add_argument("--json", help="also write the comparison to this JSON file")
  args = ap.parse_args(argv)

  from visrep_jax import results
  from visrep_jax.data import DataError
  from visrep_jax.registry import UnknownNameError
  try:
    if args.list or not args.table:
      if not args.list:
        print("error: give --table NAME (or --list)", file=sys.stderr)
        return 2
      for name in results.list_tables():
        t = results.load(name)
        print(f"{name:24s} Table {', '.join(t.thesis_tables):18s} {len(t.rows):3d} rows  {t.title}")
      return 0
    table = results.load(args.table)
    if not args.checkpoint:
      keys = None
      if args.row or args.model:
        keys = [r["key"] for r in select_rows(table, args.model, args.row)]
      print(table.format(keys=keys))
      for note in table.notes:
        print(f"  note: {note}")
      return 0
    entries = compare(args)
  except (ReproduceError, UnknownNameError, DataError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except ValueError as e:  # e.g. a checkpoint that does not fit the model
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_comparison(entries))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(entries, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
