r"""Prototypical Nets on Meta-Dataset as in CrossTransformers' Table 1 ("ProtoNets (Ours)": ResNet-34
at 224, normalised-gradient Adam, EMA BatchNorm at test time) -- ``configs/ctx.py:variant=protonet``
with the same arguments, plus ``simclr`` for the "+SimCLR Eps" rows.

  python -m visrep_jax.main --config=configs/protonet.py:data=DATA,init=PRETRAINED --workdir=/tmp/protonet
  python -m visrep_jax.main --config=configs/protonet.py:simclr,bn=support,data=DATA --workdir=/tmp/pn_simclr
  python -m visrep_jax.main --config=configs/protonet.py:mini --workdir=/tmp/protonet_mini

Arguments: data=DIR, init=DIR, eval_only, bn=ema|support, simclr, mini, runlocal, episodes=N
(see configs/ctx.py).

Expected accuracy (Table 4 / Table 1, %, 600 episodes; visrep_jax/results/tables/ctx_table4.json):
  row                           ILSVRC Omniglot Aircraft Birds Textures QuickDraw Fungi Flowers Signs COCO
  bn=ema                        51.66  57.22    51.63    71.73 69.72    47.31     42.07 87.29   47.45 44.38
  bn=support                    52.51  49.87    56.47    72.81 68.45    51.41     42.16 87.92   54.40 40.60
  simclr (bn=ema)               49.67  65.21    54.46    60.94 63.96    50.64     37.84 88.70   51.61 42.97
  simclr,bn=support             53.69  68.50    58.04    74.07 68.76    53.30     40.73 86.96   58.11 41.70
"""

import importlib.util
import os

from visrep_jax import config_lib


def _ctx_module():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ctx.py")
  spec = importlib.util.spec_from_file_location("visrep_jax_configs_ctx", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  args = config_lib.parse_arg(arg, data="", init="", eval_only=False, bn="ema", simclr=False,
                              mini=False, runlocal=False, episodes=0)
  parts = [f"variant=protonet", f"bn={args.bn}"]
  for key in ("data", "init"):
    if args[key]:
      parts.append(f"{key}={args[key]}")
  for key in ("eval_only", "mini", "runlocal"):
    if args[key]:
      parts.append(key)
  if args.episodes:
    parts.append(f"episodes={args.episodes}")
  c = _ctx_module().get_config(",".join(parts))
  if args.simclr:
    c.episodes.augment = "simclr_episodes(prob=0.5)"
    # SimCLR episodes decay the learning rate half as often (500 -> 1000 episodes; the mini
    # benchmark's 100 -> 200), as configs/ctx.py's ctx_simclr.
    c.schedule.decay_steps *= 2
  return c
