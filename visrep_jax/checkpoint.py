"""Checkpoints with orbax: atomic (temporary dir + rename), keep-last-N, automatic resume."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
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


def _restore_as_numpy(directory: str) -> Any:
  """Restores any orbax PyTree checkpoint as host numpy arrays, whatever devices wrote it (the
  caller places them onto its own shardings)."""
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(directory)
  meta = getattr(meta, "item_metadata", None) or meta
  tree_meta = getattr(meta, "tree", meta)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree_meta,
                              is_leaf=lambda x: not isinstance(x, (dict, list, tuple)))
  return ckptr.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def load_variables(path: str, abstract_params: Any, abstract_model_state: Any = None
                   ) -> Tuple[Any, Any]:
  """Loads ``(params, model_state)`` for ``init_checkpoint`` onto the abstract shapes/shardings.

  ``path``: a training workdir, its ``checkpoints`` dir or a step dir (the train state's
  ``params`` / ``model_state`` are used), or the output of ``python -m visrep_jax.convert``
  (``variables/`` with ``params`` and e.g. ``batch_stats``). ``model_state`` is ``{}`` when the
  model has none; a model with BatchNorm statistics requires them in the checkpoint.
  """
  path = os.path.abspath(path)
  for d in (path, os.path.join(path, "checkpoints")):
    if os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d)):
      step = max(int(n) for n in os.listdir(d) if n.isdigit())
      path = os.path.join(d, str(step))
      break
  state_dir = path
  for sub in ("state", "variables"):
    if os.path.isdir(os.path.join(path, sub)):
      state_dir = os.path.join(path, sub)
      break
  if not os.path.isdir(state_dir):
    raise FileNotFoundError(f"No checkpoint at {path}: expected an orbax checkpoint directory "
                            "(a workdir, WORKDIR/checkpoints, WORKDIR/checkpoints/<step>, or the "
                            "--out of python -m visrep_jax.convert).")
  tree = _restore_as_numpy(state_dir)
  if not isinstance(tree, dict) or "params" not in tree:
    raise ValueError(f"checkpoint {path} has no 'params' (top-level keys: "
                     f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__})")
  params = tree["params"]
  stored_state = tree.get("model_state") or {k: v for k, v in tree.items()
                                             if k not in ("params", "step", "opt_state")}

  def place(a, x):
    if tuple(a.shape) != tuple(x.shape):
      raise ValueError(f"shape {tuple(x.shape)} != model's {tuple(a.shape)}")
    x = np.asarray(x, dtype=a.dtype)  # e.g. float32 weights into bfloat16 parameters
    sharding = getattr(a, "sharding", None)
    return jax.device_put(x, sharding) if sharding is not None else x

  def restore(abstract, stored, what):
    a_flat = dict(jax.tree_util.tree_flatten_with_path(abstract)[0])
    s_flat = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
    missing = sorted(jax.tree_util.keystr(k) for k in a_flat if k not in s_flat)
    extra = sorted(jax.tree_util.keystr(k) for k in s_flat if k not in a_flat)
    if missing or extra:
      raise ValueError(
          f"checkpoint {path} does not match the model's {what}: missing {missing[:8]}"
          f"{' ...' if len(missing) > 8 else ''}, unexpected {extra[:8]}"
          f"{' ...' if len(extra) > 8 else ''} (is config.model the checkpoint's model?)")
    try:
      return jax.tree.map(place, abstract, stored)
    except ValueError as e:
      raise ValueError(f"checkpoint {path} does not match the model's {what}: {e}") from None

  params = restore(abstract_params, params, "parameters")
  model_state = {}
  if abstract_model_state:
    model_state = restore(abstract_model_state,
                          {k: stored_state.get(k, {}) for k in abstract_model_state},
                          "state (e.g. BatchNorm statistics)")
  return params, model_state


def load_params(path: str, abstract_params: Any) -> Any:
  """The ``params`` of :func:`load_variables`."""
  return load_variables(path, abstract_params)[0]
