"""Checkpoints with orbax: atomic (temporary dir + rename), keep-last-N, automatic resume."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """``WORKDIR/checkpoints/<step>/{state,meta}``; restores onto the given shardings."""

  def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: Dict[str, Any], force: bool = False) -> bool:
    if step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> Tuple[Any, Dict[str, Any]]:
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"] or {})

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)


def load_params(path: str, abstract_params: Any) -> Any:
  """Loads the ``params`` of a train-state checkpoint (a workdir, its checkpoints dir, or a step
  dir) onto ``abstract_params``' shapes/shardings."""
  path = os.path.abspath(path)
  candidates = [path, os.path.join(path, "checkpoints")]
  for d in candidates:
    if os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d)):
      step = max(int(n) for n in os.listdir(d) if n.isdigit())
      path = os.path.join(d, str(step))
      break
  state_dir = os.path.join(path, "state") if os.path.isdir(os.path.join(path, "state")) else path
  if not os.path.isdir(state_dir):
    raise FileNotFoundError(f"No checkpoint at {path}: expected an orbax checkpoint directory "
                            "(a workdir, WORKDIR/checkpoints or WORKDIR/checkpoints/<step>).")
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.restore(state_dir)
  params = tree["params"] if "params" in tree else tree
  def place(a, x):
    if tuple(a.shape) != tuple(x.shape):
      raise ValueError(f"checkpoint {path}: parameter shape {tuple(x.shape)} != model's {tuple(a.shape)}")
    sharding = getattr(a, "sharding", None)
    return jax.device_put(x, sharding) if sharding is not None else x

  try:
    return jax.tree.map(place, abstract_params, params)
  except ValueError as e:
    raise ValueError(f"checkpoint {path} does not match the model: {e}") from None
