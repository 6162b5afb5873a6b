"""Converts a PyTorch checkpoint into an orbax checkpoint that ``visrep_jax.main`` can load.

    python -m visrep_jax.convert --model=deit3_small_patch16_224 \
        --checkpoint=deit_3_small_224_1k.pth --out=/ckpts/deit3_s_in1k
    python -m visrep_jax.main --config=configs/deit3.py:variant=S,eval_only,init=/ckpts/deit3_s_in1k

``--set img_size=384`` (repeatable) builds the model with other options, e.g. to fine-tune at a
new resolution (the position embedding is resampled). ``--prefix`` selects a sub-model of a
larger checkpoint. The output directory holds ``variables/`` (orbax) and ``model.json``.
"""

from __future__ import annotations

import ast
import json
import os
import sys

from absl import app, flags

_MODEL = flags.DEFINE_string("model", None, "registered model name (visrep_jax.models.list_models())")
_CKPT = flags.DEFINE_string("checkpoint", None, ".pth/.pt/.bin/.safetensors/.npz file")
_OUT = flags.DEFINE_string("out", None, "output directory (must not exist or be empty)")
_PREFIX = flags.DEFINE_string("prefix", "", "only keys under this prefix (stripped), e.g. 'module.encoder_q.'")
_SET = flags.DEFINE_multi_string("set", [], "model option override KEY=VALUE, e.g. img_size=384")
_FORCE = flags.DEFINE_bool("force", False, "overwrite a non-empty --out directory")


def _parse_overrides(items):
  out = {}
  for item in items:
    key, eq, val = item.partition("=")
    if not eq or not key.strip():
      raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set img_size=384")
    try:
      out[key.strip()] = ast.literal_eval(val.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = val.strip()
  return out


def convert(model: str, checkpoint: str, out: str, prefix: str = "", overrides=None,
            force: bool = False) -> str:
  """Writes ``out/variables`` (orbax) and ``out/model.json``; returns ``out``."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from visrep_jax import convert as convert_lib
  from visrep_jax import models

  overrides = dict(overrides or {})
  models.MODELS.get(model)  # unknown name -> one-line error with suggestions
  out = os.path.abspath(out)
  if os.path.exists(out) and os.listdir(out) and not force:
    raise FileExistsError(f"--out {out} exists and is not empty; choose a new directory or pass --force")
  variables = convert_lib.load_torch_checkpoint(model, checkpoint, prefix=prefix, **overrides)
  os.makedirs(out, exist_ok=True)
  target = os.path.join(out, "variables")
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(target, jax.tree.map(np.asarray, variables), force=True)
  n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(variables["params"]))
  meta = {"model": model, "overrides": overrides, "source": os.path.abspath(checkpoint),
          "prefix": prefix, "num_params": n, "collections": sorted(variables)}
  with open(os.path.join(out, "model.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return out


def main(argv):
  del argv
  for flag in (_MODEL, _CKPT, _OUT):
    if not flag.value:
      print(f"error: --{flag.name} is required (see --help)", file=sys.stderr)
      return 2
  try:
    out = convert(_MODEL.value, _CKPT.value, _OUT.value, _PREFIX.value,
                  _parse_overrides(_SET.value), _FORCE.value)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError, KeyError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {msg}", file=sys.stderr)
    return 2
  print(f"wrote {out}/variables ({_MODEL.value}); evaluate or fine-tune with "
        f"--config.init_checkpoint={out}")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
