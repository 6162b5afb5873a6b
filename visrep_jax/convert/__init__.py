"""PyTorch checkpoints (timm and the official repositories) -> Flax variables.

    variables = load_torch_checkpoint("deit_small_patch16_224", "deit_small_patch16_224-cd65a155.pth")
    logits, out = models.create("deit_small_patch16_224").apply(variables, images)

Accepted inputs: a state dict (torch tensors or numpy arrays) or a file: ``.pth`` / ``.pt`` /
``.bin`` / ``.tar`` (``torch.load``, weights only; needs the ``[torch]`` extra), ``.safetensors``
(no torch needed) or ``.npz``. Wrappers (``{"model": ...}``, ``{"state_dict": ...}``,
``{"model_ema": ...}``) and ``module.`` prefixes (DistributedDataParallel) are removed.

The mapping is generic because every Flax module in :mod:`visrep_jax.models` mirrors the
PyTorch attribute names: ``blocks.3.attn.qkv.weight`` is ``params/blocks_3/attn/qkv/kernel``
(a numeric component joins the preceding name with ``_``). Leaves:

* ``weight`` -> ``kernel`` of a Dense ([out, in] -> [in, out]), Conv ([O, I, kh, kw] -> [kh, kw,
  I, O], depthwise included) or Conv1d ([O, I, k] -> [k, I, O]); or ``scale`` of a norm layer;
* ``running_mean`` / ``running_var`` -> ``batch_stats`` ``mean`` / ``var``;
  ``num_batches_tracked`` is dropped;
* anything else (``bias``, ``cls_token``, ``gamma_1``, ``alpha`` ...) is copied by name.

A model class whose two published namings differ (timm vs the official repository) provides a
static ``torch_rename(key) -> key | None`` that maps the other naming onto the one it mirrors.
Absolute position embeddings are resampled to the model's resolution (bicubic, as PyTorch's
``F.interpolate(..., mode='bicubic', align_corners=False)``), keeping class/distillation tokens.
Anything left over is an error listing the offending names: never a silent partial load.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

__all__ = ["load_torch_checkpoint", "convert_state_dict", "read_state_dict",
           "resample_pos_embed", "CheckpointMismatchError", "torch_key_to_path"]

_WRAPPER_KEYS = ("model", "state_dict", "model_state", "model_ema", "state_dict_ema", "net")
_POS_EMBED_NAMES = ("pos_embed",)


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model (missing, unexpected or mis-shaped entries)."""


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------

def _to_numpy(t) -> np.ndarray:
  if hasattr(t, "detach"):  # torch.Tensor, without importing torch here
    t = t.detach().cpu()
    if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
      t = t.float()
    t = t.numpy()
  return np.asarray(t)


def _is_tensor_like(v) -> bool:
  return hasattr(v, "shape") and hasattr(v, "dtype")


def read_state_dict(path_or_state_dict: Any, prefix: str = "") -> Dict[str, np.ndarray]:
  """Returns a flat ``{name: numpy array}`` from a file or a (possibly wrapped) state dict.

  ``prefix`` selects a sub-model (e.g. ``"module.encoder_q."`` of a MoCo checkpoint) and is
  stripped; ``module.`` prefixes are always stripped.
  """
  obj = path_or_state_dict
  source = "state dict"
  if isinstance(obj, (str, os.PathLike)):
    source = os.fspath(obj)
    obj = _read_file(source)
  if not isinstance(obj, Mapping):
    raise CheckpointMismatchError(
        f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
  # Unwrap {"model": state_dict, "optimizer": ..., "epoch": ...} style training checkpoints.
  # A wrapper key holding a mapping wins over stray tensors beside it (e.g. the ImageNet example's
  # {'state_dict': ..., 'best_acc1': tensor(76.1)}).
  for _ in range(3):
    inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is not None:
      obj = inner
      continue
    if not any(_is_tensor_like(v) for v in obj.values()):
      raise CheckpointMismatchError(
          f"{source}: no tensors found; top-level keys are {sorted(map(str, obj))[:20]}. Pass the "
          "state dict itself, or a file whose weights are under one of " + ", ".join(_WRAPPER_KEYS))
    break
  while prefix.startswith("module."):  # keys lose their DDP 'module.' below; so does the prefix
    prefix = prefix[len("module."):]
  out: Dict[str, np.ndarray] = {}
  for k, v in obj.items():
    if not _is_tensor_like(v):
      continue  # e.g. metadata strings stored beside the tensors
    k = str(k)
    while k.startswith("module."):
      k = k[len("module."):]
    if prefix:
      if not k.startswith(prefix):
        continue
      k = k[len(prefix):]
    out[k] = _to_numpy(v)
  if not out:
    raise CheckpointMismatchError(f"{source}: no tensors" + (f" under prefix {prefix!r}" if prefix else ""))
  return out


def _read_file(path: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  lower = path.lower()
  if lower.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file
    except ImportError:
      raise ImportError("reading .safetensors needs the safetensors package: "
                        "pip install 'visrep_jax[torch]' (or pip install safetensors)") from None
    try:
      return load_file(path)
    except Exception as e:  # noqa: BLE001 - report any parse error in one line
      if "bfloat16" in str(e):  # numpy has no bfloat16: read through torch if it is there
        try:
          from safetensors.torch import load_file as torch_load_file
        except ImportError:
          raise ImportError(f"{path} holds bfloat16 tensors, which need PyTorch to read: "
                            "pip install 'visrep_jax[torch]'") from None
        return torch_load_file(path)
      raise CheckpointMismatchError(f"{path}: not a readable safetensors file ({e})") from None
  if lower.endswith(".npz"):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  try:
    import torch
  except ImportError:
    raise ImportError(f"reading {os.path.basename(path)} needs PyTorch: pip install "
                      "'visrep_jax[torch]' (or convert the file to .safetensors elsewhere)") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = ""
    if "weights_only" in str(e) or "Weights only" in str(e):
      hint = (" -- the file pickles more than tensors (e.g. the training args); if you trust it, "
              "save its weights alone: torch.save(torch.load(f, weights_only=False)['model'], "
              "'weights.pth')")
    raise CheckpointMismatchError(f"{path}: torch.load failed ({msg}){hint}") from None


# --------------------------------------------------------------------------------------------
# Names and layouts
# --------------------------------------------------------------------------------------------

def torch_key_to_path(key: str) -> Tuple[str, ...]:
  """``'layer1.0.downsample.0.weight'`` -> ``('layer1_0', 'downsample_0', 'weight')``."""
  parts: List[str] = []
  for p in key.split("."):
    if p.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{p}"
    else:
      parts.append(p)
  return tuple(parts)


def _flatten(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[Tuple[str, ...], Any]) -> Dict[str, Any]:
  out: Dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def _weight_to_kernel(w: np.ndarray) -> np.ndarray:
  if w.ndim == 2:
    return w.T
  if w.ndim == 3:
    return w.transpose(2, 1, 0)
  if w.ndim == 4:
    return w.transpose(2, 3, 1, 0)
  return w


def _squeezed(shape) -> Tuple[int, ...]:
  return tuple(d for d in shape if d != 1)


# --------------------------------------------------------------------------------------------
# Position-embedding resampling (PyTorch bicubic, align_corners=False, no antialias)
# --------------------------------------------------------------------------------------------

def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution weights for offsets t in [0, 1): taps at -1, 0, 1, 2."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of torch's 1-D bicubic interpolation (borders clamped)."""
  scale = n_in / n_out
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    src = (i + 0.5) * scale - 0.5
    base = int(np.floor(src))
    w = _cubic_weights(np.array(src - base))
    for tap in range(4):
      j = min(max(base - 1 + tap, 0), n_in - 1)
      m[i, j] += w[tap]
  return m


def resample_pos_embed(pos_embed: np.ndarray, new_grid: Tuple[int, int], num_extra: int,
                       old_grid: Optional[Tuple[int, int]] = None) -> np.ndarray:
  """Resamples a (1, num_extra + h*w, D) position embedding to ``new_grid``.

  The first ``num_extra`` tokens (class / distillation) are kept as they are; the patch grid is
  interpolated bicubically exactly as ``torch.nn.functional.interpolate(mode='bicubic',
  align_corners=False)`` (what the DeiT fine-tuning code does).
  """
  pe = np.asarray(pos_embed, np.float32)
  if pe.ndim != 3 or pe.shape[0] != 1:
    raise ValueError(f"position embedding must be (1, tokens, dim), got {pe.shape}")
  extra, grid = pe[:, :num_extra], pe[:, num_extra:]
  n = grid.shape[1]
  if old_grid is None:
    side = int(round(np.sqrt(n)))
    if side * side != n:
      raise ValueError(f"cannot infer the grid of a position embedding with {n} patch tokens "
                       f"({num_extra} extra); pass old_grid")
    old_grid = (side, side)
  if old_grid[0] * old_grid[1] != n:
    raise ValueError(f"old_grid {old_grid} does not match {n} patch tokens")
  g = grid.reshape(old_grid[0], old_grid[1], -1).astype(np.float64)
  if tuple(old_grid) != tuple(new_grid):
    mh = _resize_matrix(old_grid[0], new_grid[0])
    mw = _resize_matrix(old_grid[1], new_grid[1])
    g = np.einsum("ih,hwd->iwd", mh, g)
    g = np.einsum("jw,iwd->ijd", mw, g)
  g = g.reshape(1, new_grid[0] * new_grid[1], -1).astype(np.float32)
  return np.concatenate([extra, g], axis=1)


def _pos_embed_grid(model, num_tokens: int) -> Optional[Tuple[int, int]]:
  img, patch = getattr(model, "img_size", None), getattr(model, "patch_size", None)
  if not img or not patch:
    return None
  side = img // patch
  return (side, side) if side * side <= num_tokens else None


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------

def model_variable_shapes(model, img_size: Optional[int] = None,
                          in_chans: int = 3) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """Flat ``{(collection, ...path): shape}`` of ``model``'s variables (no real init)."""
  import jax
  import jax.numpy as jnp
  res = img_size or getattr(model, "img_size", None) or 224
  x = jax.ShapeDtypeStruct((1, res, res, in_chans), jnp.float32)
  rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
  shapes = jax.eval_shape(lambda r, im: model.init(r, im, train=False), rngs, x)
  return {k: tuple(v.shape) for k, v in _flatten(dict(shapes)).items()}


def _describe(items: Iterable[str], limit: int = 12) -> str:
  items = sorted(items)
  more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def convert_state_dict(model, state_dict: Mapping[str, Any], *, resample: bool = True,
                       rename: Optional[Callable[[str], Optional[str]]] = None,
                       in_chans: int = 3) -> Dict[str, Any]:
  """Maps a flat PyTorch state dict onto ``model``'s variables; strict (see module doc).
  ``in_chans``: input channels the model is built for (1 for grey-level images)."""
  target = model_variable_shapes(model, in_chans=in_chans)
  rename = rename or getattr(type(model), "torch_rename", None)
  flat: Dict[Tuple[str, ...], np.ndarray] = {}
  unexpected: List[str] = []
  mismatched: List[str] = []
  origin: Dict[Tuple[str, ...], str] = {}

  for key, value in state_dict.items():
    tkey = rename(key) if rename is not None else key
    if tkey is None:
      continue
    v = _to_numpy(value)
    path = torch_key_to_path(tkey)
    *prefix, leaf = path
    prefix = tuple(prefix)
    if leaf == "num_batches_tracked":
      continue
    candidates: List[Tuple[Tuple[str, ...], np.ndarray]]
    if leaf == "weight":
      candidates = [(("params",) + prefix + ("kernel",), _weight_to_kernel(v)),
                    (("params",) + prefix + ("scale",), v),
                    (("params",) + prefix + ("embedding",), v)]
    elif leaf in ("running_mean", "running_var"):
      candidates = [(("batch_stats",) + prefix + (leaf[len("running_"):],), v)]
    else:
      candidates = [(("params",) + prefix + (leaf,), v)]
    hit = next(((p, a) for p, a in candidates if p in target), None)
    if hit is None:
      unexpected.append(key)
      continue
    p, a = hit
    want = target[p]
    if tuple(a.shape) != want:
      if leaf in _POS_EMBED_NAMES and resample and a.ndim == 3 and len(want) == 3 \
          and a.shape[-1] == want[-1]:
        a = _resample_for(model, a, want, key)
      elif _squeezed(a.shape) == _squeezed(want):
        a = a.reshape(want)
      else:
        mismatched.append(f"{key} {tuple(v.shape)} -> {'/'.join(p)} {want}")
        continue
    if p in flat:
      raise CheckpointMismatchError(f"{key} and {origin[p]} both map to {'/'.join(p)}")
    flat[p] = np.array(a, dtype=np.float32, copy=True)  # never share memory with torch tensors
    origin[p] = key

  missing = ["/".join(p) for p in target if p not in flat]
  if unexpected or missing or mismatched:
    name = type(model).__name__
    msg = [f"checkpoint does not match {name}:"]
    if mismatched:
      msg.append(f"{len(mismatched)} with wrong shapes: {_describe(mismatched)}")
    if missing:
      msg.append(f"{len(missing)} model variables not in the checkpoint: {_describe(missing)}")
    if unexpected:
      msg.append(f"{len(unexpected)} checkpoint entries the model does not have: {_describe(unexpected)}")
    msg.append("Check the model name / options (num_classes=, img_size=) against the checkpoint.")
    raise CheckpointMismatchError(" ".join(msg[:1]) + " " + "; ".join(msg[1:-1]) + ". " + msg[-1])
  return _unflatten(flat)


def _resample_for(model, a: np.ndarray, want: Tuple[int, ...], key: str) -> np.ndarray:
  new_grid = _pos_embed_grid(model, want[1])
  if new_grid is None:
    raise CheckpointMismatchError(f"{key}: shape {a.shape} != model's {want} and the model has "
                                  "no img_size/patch_size to resample to")
  num_extra = want[1] - new_grid[0] * new_grid[1]
  old_n = a.shape[1] - num_extra
  side = int(round(np.sqrt(max(old_n, 0))))
  if old_n <= 0 or side * side != old_n:
    raise CheckpointMismatchError(
        f"{key}: cannot resample {a.shape} to {want}: {a.shape[1]} tokens minus {num_extra} "
        "class/distillation tokens is not a square grid")
  return resample_pos_embed(a, new_grid, num_extra, (side, side))


def load_torch_checkpoint(name_or_model: Any, path_or_state_dict: Any, *, prefix: str = "",
                          resample: bool = True, in_chans: int = 3,
                          **model_overrides) -> Dict[str, Any]:
  """Flax variables (``{'params': ..., ['batch_stats': ...]}``, numpy float32) for a model.

  ``name_or_model``: a registered name (``models.create(name, **model_overrides)`` is built, so
  e.g. ``img_size=384`` loads a 224 checkpoint at 384 with a resampled position embedding) or a
  module instance. ``path_or_state_dict``: a file or a state dict, see the module docstring.
  """
  if isinstance(name_or_model, str):
    from visrep_jax import models
    model = models.create(name_or_model, **model_overrides)
  else:
    if model_overrides:
      raise TypeError("model overrides are only accepted with a model name")
    model = name_or_model
  sd = read_state_dict(path_or_state_dict, prefix=prefix)
  try:
    return convert_state_dict(model, sd, resample=resample, in_chans=in_chans)
  except CheckpointMismatchError as e:
    where = path_or_state_dict if isinstance(path_or_state_dict, (str, os.PathLike)) else "state dict"
    label = name_or_model if isinstance(name_or_model, str) else type(model).__name__
    raise CheckpointMismatchError(f"{where} -> {label}: {e}") from None
