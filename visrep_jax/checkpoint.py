"""Checkpoints with orbax: atomic (temporary dir + rename), keep-last-N, automatic resume."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the configured model: one given as ``init_checkpoint``, or the
  workdir's own checkpoint when a run resumes with another config (missing or unexpected
  entries, other shapes); ``visrep_jax.main`` prints it as one line. ``missing``,
  ``unexpected`` and ``shapes`` (``(key, stored, wanted)``) list the differences where known."""

  def __init__(self, message: str, missing=(), unexpected=(), shapes=()):
    super().__init__(message)
    self.missing, self.unexpected, self.shapes = list(missing), list(unexpected), list(shapes)


def _mismatch_hint(missing, unexpected) -> str:
  """What to do about a checkpoint whose entries differ from the model's."""
  keys = list(missing) + list(unexpected)
  if keys and all("['layer1_0']['downsample" in k for k in keys):
    # Only the projection shortcut of layer1's first block differs: meta-dataset's ResNet-34
    # has it, torchvision's not (the few-shot configs switched to it on 2026-11-27).
    return (f"set --config.model.downsample_first_stage="
            f"{not any('downsample' in k for k in missing)} to match the checkpoint's layer1")
  return "is config.model the checkpoint's model?"


def _key_names(path) -> str:
  """A tree path as ``['a']['b'][0]`` whether its entries are dict keys, attributes (a
  ``TrainState``) or indices, so that a train state and orbax's stored tree compare."""
  out = []
  for k in path:
    name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
    out.append(f"[{name}]" if isinstance(name, int) else f"['{name}']")
  return "".join(out)


def _leaves(tree) -> Dict[str, Any]:
  """Arrays (anything with a shape) and empty dicts (e.g. a train state's ``ema={}``) by key."""
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: x is None or hasattr(x, "shape") or (isinstance(x, dict) and not x))[0]
  return {_key_names(p): x for p, x in leaves if x is not None}


def _differences(stored, wanted):
  """(missing, unexpected, shapes) between two trees of arrays / shape structs / metadata. An
  empty dict facing a filled one (``ema={}`` against an EMA, no BatchNorm statistics against
  some) is not listed itself: the other side's entries under it are."""
  s, w = _leaves(stored), _leaves(wanted)

  def only_here(k, here, there):
    return k not in there and not (isinstance(here[k], dict) and
                                   any(o.startswith(k) for o in there))

  # Parameters and model state first, then the optimizer's moments, then the weight EMA.
  order = lambda k: (k.startswith("['ema']"), k.startswith("['opt_state']"), k)
  missing = sorted((k for k in w if only_here(k, w, s)), key=order)
  unexpected = sorted((k for k in s if only_here(k, s, w)), key=order)
  shapes = sorted(((k, tuple(s[k].shape), tuple(w[k].shape)) for k in w
                   if k in s and hasattr(s[k], "shape") and hasattr(w[k], "shape")
                   and tuple(s[k].shape) != tuple(w[k].shape)), key=lambda t: order(t[0]))
  return missing, unexpected, shapes


def _listing(keys, n=6) -> str:
  return f"{keys[:n]}{' ...' if len(keys) > n else ''}"


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
    """The train state and meta of ``step`` (default: the latest). A stored state whose entries
    or shapes differ from ``abstract_state`` (the run resumes with another model or optimizer
    config) raises ``CheckpointMismatchError`` naming the differences."""
    step = self.latest_step() if step is None else step
    differences = self._differences(abstract_state, step)
    if differences and differences[2]:
      # Other shapes: fail before orbax starts reading (it would fail mid-read, leaving its
      # reads unawaited, and each of them prints a report at exit).
      raise self._mismatch(step, *differences)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except ValueError as e:
      orbax_says = " ".join(l.strip() for l in str(e).splitlines() if l.strip())
      if differences is None or not (any(differences) or "structure" in orbax_says.lower()):
        raise
      raise self._mismatch(step, *differences, orbax_says=orbax_says) from None
    return restored["state"], dict(restored["meta"] or {})

  def _differences(self, abstract_state: Any, step: int):
    """(missing, unexpected, shapes) between the stored state of ``step`` and ``abstract_state``
    from orbax's metadata; None when that cannot be read (orbax's restore then speaks)."""
    try:
      meta = self.manager.item_metadata(step)["state"]
      return _differences(getattr(meta, "tree", meta), abstract_state)
    except Exception:  # pylint: disable=broad-except
      return None

  def _mismatch(self, step, missing, unexpected, shapes, orbax_says: str = ""):
    keys = [k for k in missing + unexpected + [k for k, _, _ in shapes]
            if not k.startswith("['ema']")]
    if not (missing or unexpected or shapes):
      # Only containers differ, e.g. an optax chain of another length (adamw -> lamb) whose
      # extra entries hold no arrays: orbax's own description, on one line.
      found = orbax_says[:400]
      hint = ("the optimizer config (config.optimizer) differs from the checkpoint's."
              if "opt_state" in orbax_says else "is config.model the checkpoint's model?")
    else:
      found = "; ".join(part for part in (
          missing and f"missing {_listing(missing)}",
          unexpected and f"unexpected {_listing(unexpected)}",
          shapes and "other shapes " + ", ".join(f"{k} {a} (config: {b})"
                                                 for k, a, b in shapes[:4])
          + (" ..." if len(shapes) > 4 else "")) if part)
      if keys and all(k.startswith("['opt_state']") for k in keys):
        hint = "the optimizer config (config.optimizer) differs from the checkpoint's."
      elif keys:
        hint = _mismatch_hint([k for k in missing if k in keys],
                              [k for k in unexpected if k in keys])
        hint += "" if hint.endswith("?") else "."
      else:
        hint = ""
      if len(keys) < len(missing) + len(unexpected) + len(shapes):
        hint += (" The weight EMA (config.ema.decay) differs too." if hint else
                 "The weight EMA (config.ema.decay) differs.")
    config_json = self.config_json()
    return CheckpointMismatchError(
        f"the checkpoint {self.directory}/{step} does not fit this config's train state: "
        f"{found} ({hint.strip()} Use the config it was trained with"
        f"{', in ' + config_json if config_json else ''}, or another --workdir.)",
        missing, unexpected, shapes)

  def config_json(self) -> Optional[str]:
    """The ``config.json`` of the run that wrote these checkpoints (``WORKDIR/checkpoints`` or
    ``WORKDIR/best/checkpoints``), if there is one."""
    d = os.path.dirname(self.directory)
    for candidate in (d, os.path.dirname(d)):
      if os.path.exists(os.path.join(candidate, "config.json")):
        return os.path.join(candidate, "config.json")
    return None

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def set_aside(path: str, reason: str) -> Optional[str]:
  """Renames an existing ``path`` (e.g. a ``best`` checkpoint whose record was lost) to
  ``path.set-aside-<time>`` so that nothing is overwritten or deleted; returns the new name
  (None when ``path`` does not exist). Every process checks, then process 0 renames; all of them
  pass both barriers whatever they found, so none can wait for another forever."""
  import time
  exists = os.path.exists(path)
  _sync(f"set_aside:check:{path}")
  new = None
  if exists:
    new = base = f"{path}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      k = 1
      while os.path.exists(new):  # set aside twice within a second
        new, k = f"{base}-{k}", k + 1
      os.rename(path, new)
      logging.warning("%s: %s; moved to %s (nothing deleted).", path, reason, new)
  _sync(f"set_aside:{path}")
  return new


def has_checkpoint(path: str) -> bool:
  """Whether ``path`` is a non-empty directory (e.g. a ``best`` checkpoint directory)."""
  return os.path.isdir(path) and bool(os.listdir(path))


def _sync(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


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


def load_variables(path: str, abstract_params: Any, abstract_model_state: Any = None, *,
                   adapt_pos_embed: bool = True, adapt_head: bool = True,
                   init_params: Any = None) -> Tuple[Any, Any]:
  """Loads ``(params, model_state)`` for ``init_checkpoint`` onto the abstract shapes/shardings.

  ``path``: a training workdir (its ``best`` checkpoint when the trainer kept one: the linear
  probe's or the few-shot validation's choice), its ``checkpoints`` dir or a step dir (the train state's
  ``params`` / ``model_state`` are used), or the output of ``python -m visrep_jax.convert``
  (``variables/`` with ``params`` and e.g. ``batch_stats``). ``model_state`` is ``{}`` when the
  model has none; a model with BatchNorm statistics requires them in the checkpoint.

  Fine-tuning (DeiT's ``--finetune``), each with a log line (WARNING) saying what was done:

  * ``adapt_pos_embed``: a ``pos_embed`` whose token count differs (another resolution, e.g. a
    224 checkpoint into a 384 model) is resampled with :func:`visrep_jax.convert.resample_pos_embed`
    (bicubic as PyTorch, ``align_corners=False``); class / distillation token slots are kept.
  * ``adapt_head``: a classifier head (top-level ``head``, ``head_dist`` or ``fc``) whose shapes
    differ (another class count, e.g. ImageNet-21k -> 1k) or that only one side has is dropped
    and re-initialised: from ``init_params`` (the model's fresh initial parameters) when given,
    else kernel ~ N(0, 0.02^2) truncated at 2 std and zero bias (the zoo transformers' head init).
    Pass ``adapt_head=False`` to evaluate: a mismatched head is then an error.

  Any other mismatch raises ``ValueError`` naming the parameters.
  """
  path = os.path.abspath(path)
  best = os.path.join(path, "best")  # a workdir whose trainer kept a model-selection best
  best_steps = os.path.join(best, "checkpoints")  # a Checkpointer's layout
  if os.path.isdir(best_steps) and any(n.isdigit() for n in os.listdir(best_steps)):
    logging.warning("init_checkpoint %s: using its selected checkpoint %s (pass %s/checkpoints "
                    "for the last one)", path, best, path)
    path = best
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
    raise CheckpointMismatchError(
        f"checkpoint {path} has no 'params' (top-level keys: "
        f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__})")
  params = tree["params"]
  stored_state = tree.get("model_state") or {k: v for k, v in tree.items()
                                             if k not in ("params", "step", "opt_state")}

  def place(key, a, x):
    x = np.asarray(x, dtype=a.dtype)  # e.g. float32 weights into bfloat16 parameters
    sharding = getattr(a, "sharding", None)
    return jax.device_put(x, sharding) if sharding is not None else x

  def restore(abstract, stored, what):
    missing, extra, shapes = _differences(stored, abstract)
    if missing or extra:
      raise CheckpointMismatchError(
          f"checkpoint {path} does not match the model's {what}: missing {_listing(missing, 8)}"
          f", unexpected {_listing(extra, 8)} ({_mismatch_hint(missing, extra)})",
          missing, extra)
    if shapes:
      raise CheckpointMismatchError(
          f"checkpoint {path} does not match the model's {what}: " + ", ".join(
              f"{k} has shape {a}, the model's {b}" for k, a, b in shapes[:4])
          + (" ..." if len(shapes) > 4 else ""), shapes=shapes)
    try:
      return jax.tree_util.tree_map_with_path(place, abstract, stored)
    except ValueError as e:
      raise CheckpointMismatchError(
          f"checkpoint {path} does not match the model's {what}: {e}") from None

  params = _adapt_for_finetuning(path, abstract_params, params, adapt_pos_embed, adapt_head,
                                 init_params)
  params = restore(abstract_params, params, "parameters")
  model_state = {}
  if abstract_model_state:
    model_state = restore(abstract_model_state,
                          {k: stored_state.get(k, {}) for k in abstract_model_state},
                          "state (e.g. BatchNorm statistics)")
  return params, model_state


def load_params(path: str, abstract_params: Any, **kwargs) -> Any:
  """The ``params`` of :func:`load_variables`."""
  return load_variables(path, abstract_params, **kwargs)[0]


# ----------------------------------------------------------------------------------------------
# Fine-tuning adaptations of an init checkpoint (new resolution, new class count).

HEAD_MODULES = ("head", "head_dist", "fc")


def pos_embed_extra_tokens(stored_tokens: int, target_tokens: int) -> int:
  """Number of class/distillation slots (0, 1 or 2) that make both token counts
  ``extra + square grid`` (DeiT: 1 or 2; DeiT III, CaiT: 0)."""
  def is_square(n):
    r = int(round(np.sqrt(n))) if n > 0 else 0
    return r > 0 and r * r == n
  options = [e for e in (0, 1, 2) if is_square(stored_tokens - e) and is_square(target_tokens - e)]
  if len(options) != 1:
    raise CheckpointMismatchError(
        f"cannot resample a position embedding of {stored_tokens} tokens to {target_tokens}: "
        "the checkpoint and the model need the same number of class/distillation tokens (0, 1 "
        "or 2) before a square patch grid (is only one of them a distilled model?)")
  return options[0]


def _head_init(shape, dtype, key: str, seed: int = 0) -> np.ndarray:
  if key.endswith("kernel"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    while True:  # truncate at 2 std (jax.nn.initializers.truncated_normal's bounds)
      bad = np.abs(x) > 2.0
      if not bad.any():
        break
      x[bad] = rng.standard_normal(int(bad.sum()))
    return (0.02 * x).astype(dtype)
  return np.zeros(shape, dtype)


def _adapt_for_finetuning(path: str, abstract_params: Any, stored: Any, adapt_pos_embed: bool,
                          adapt_head: bool, init_params: Any = None) -> Any:
  """``stored`` params with the resolution / class-count changes of a fine-tuning applied."""
  from flax import traverse_util
  if not isinstance(stored, dict) or not (adapt_pos_embed or adapt_head):
    return stored
  a_flat = traverse_util.flatten_dict(_plain(abstract_params))
  s_flat = dict(traverse_util.flatten_dict(_plain(stored)))
  i_flat = traverse_util.flatten_dict(_plain(init_params)) if init_params is not None else {}

  if adapt_pos_embed:
    for k, a in a_flat.items():
      if k[-1] == "pos_embed" and k in s_flat and tuple(s_flat[k].shape) != tuple(a.shape):
        old, new = tuple(s_flat[k].shape), tuple(a.shape)
        if len(old) != 3 or len(new) != 3 or old[0] != 1 or old[2] != new[2]:
          continue  # not a (1, tokens, dim) embedding of the same width: reported below
        extra = pos_embed_extra_tokens(old[1], new[1])
        g_old, g_new = int(round(np.sqrt(old[1] - extra))), int(round(np.sqrt(new[1] - extra)))
        from visrep_jax.convert import resample_pos_embed
        s_flat[k] = resample_pos_embed(np.asarray(s_flat[k], np.float32), (g_new, g_new), extra,
                                       (g_old, g_old))
        logging.warning("init_checkpoint %s: resampled %s from a %dx%d to a %dx%d patch grid "
                        "(bicubic, %d class/distillation token(s) kept).", path, "/".join(k),
                        g_old, g_old, g_new, g_new, extra)

  if adapt_head:
    heads = sorted({k[0] for k in list(a_flat) + list(s_flat)
                    if len(k) > 1 and k[0] in HEAD_MODULES})
    for head in heads:
      a_keys = {k for k in a_flat if k[0] == head}
      s_keys = {k for k in s_flat if k[0] == head}
      if a_keys == s_keys and all(tuple(s_flat[k].shape) == tuple(a_flat[k].shape) for k in a_keys):
        continue
      for k in s_keys:
        del s_flat[k]
      for k in a_keys:
        a = a_flat[k]
        if k in i_flat and tuple(i_flat[k].shape) == tuple(a.shape):
          s_flat[k] = np.asarray(i_flat[k])
        else:
          s_flat[k] = _head_init(tuple(a.shape), np.dtype(a.dtype), k[-1])
      shapes = lambda keys, flat: ", ".join(f"{'/'.join(k[1:])} {tuple(flat[k].shape)}"
                                            for k in sorted(keys)) or "none"
      logging.warning("init_checkpoint %s: classifier '%s' dropped and re-initialised "
                      "(checkpoint: %s; model: %s).", path, head,
                      shapes(s_keys, dict(traverse_util.flatten_dict(_plain(stored)))),
                      shapes(a_keys, a_flat))
  return traverse_util.unflatten_dict(s_flat)


def _plain(tree: Any) -> Any:
  """Nested plain dicts (FrozenDict and friends unfrozen) for flax.traverse_util."""
  if hasattr(tree, "items"):
    return {k: _plain(v) for k, v in tree.items()}
  return tree
