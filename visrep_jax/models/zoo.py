"""The model registry: ``register_model`` (used by each family module) and ``create``."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict

import flax.linen as nn

from visrep_jax.registry import Registry

MODELS = Registry("model")

# name -> (module class, default kwargs, metadata)
_SPECS: Dict[str, tuple] = {}


def register_model(name: str, cls, **defaults):
  meta = defaults.pop("_meta", {})

  def build(**overrides):
    return make_module(cls, {**defaults, **overrides}, name)

  MODELS.add(name, build)
  _SPECS[name] = (cls, defaults, meta)


_ALIASES: Dict[str, str] = {}


def register_alias(alias: str, name: str):
  """Another name for the registered model ``name`` (e.g. an official repository's builder name,
  ``S60`` for ``patchconvnet_s60``). ``create`` accepts it; ``list_models`` omits it."""
  cls, defaults, meta = _SPECS[name]
  register_model(alias, cls, **defaults, _meta=meta)
  _ALIASES[alias] = name


def alias_of(name: str) -> str:
  """The canonical name of ``name`` (itself unless it is an alias)."""
  return _ALIASES.get(name, name)


def make_module(cls, kwargs: Dict[str, Any], name: str = "") -> nn.Module:
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  bad = sorted(set(kwargs) - fields)
  if bad:
    raise ValueError(
        f"Unknown option(s) {bad} for model {name or cls.__name__}. Valid: {', '.join(sorted(fields))}.")
  return cls(**kwargs)


def create(name: str, **overrides) -> nn.Module:
  """Builds the registered model ``name``; ``overrides`` replace its default hyper-parameters."""
  return MODELS.get(name)(**overrides)


def list_models(include_aliases: bool = False) -> list[str]:
  names = MODELS.names()
  return names if include_aliases else [n for n in names if n not in _ALIASES]


def default_kwargs(name: str) -> Dict[str, Any]:
  MODELS.get(name)
  return dict(_SPECS[name][1])


def paper_metadata(name: str) -> Dict[str, Any]:
  MODELS.get(name)
  return dict(_SPECS[name][2])


# --------------------------------------------------------------------------------------------
# Sizes: parameter counts and FLOPs, without allocating the model
# --------------------------------------------------------------------------------------------

_COUNTING_MACS = [False]


@contextlib.contextmanager
def counting_macs_scope():
  """Within this scope :func:`counting_macs` is True (what :func:`flops` does while tracing)."""
  previous = _COUNTING_MACS[0]
  _COUNTING_MACS[0] = True
  try:
    yield
  finally:
    _COUNTING_MACS[0] = previous


def counting_macs() -> bool:
  """True while :func:`flops` traces a model. A module that computes a product with elementwise
  ops for speed (e.g. CaiT's head mixing) should then express it as a dot so it is counted."""
  return _COUNTING_MACS[0]


def _input_size(model: nn.Module, resolution) -> int:
  return int(resolution or getattr(model, "img_size", None) or 224)


def variable_shapes(name_or_model, resolution: int = 0, **overrides):
  """``jax.eval_shape`` of the model's variables (no memory is allocated)."""
  import jax
  import jax.numpy as jnp
  model = create(name_or_model, **overrides) if isinstance(name_or_model, str) else name_or_model
  res = _input_size(model, resolution)
  x = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
  return jax.eval_shape(lambda im: model.init(
      {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, im, train=False), x)


def num_params(name_or_model, **overrides) -> int:
  """Number of trainable parameters (the ``params`` collection)."""
  import jax
  import numpy as np
  shapes = variable_shapes(name_or_model, **overrides)
  return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(shapes["params"])))


def _sub_jaxprs(eqn):
  from jax.extend import core as jcore
  for v in eqn.params.values():
    for item in (v if isinstance(v, (list, tuple)) else (v,)):
      if isinstance(item, jcore.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jcore.Jaxpr):
        yield item


def _count_macs(jaxpr) -> int:
  import numpy as np
  total = 0
  for eqn in jaxpr.eqns:
    prim = eqn.primitive.name
    if prim == "dot_general":
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      free_rhs = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
      total += int(np.prod(lhs, dtype=np.int64)) * int(np.prod(free_rhs, dtype=np.int64))
    elif prim == "conv_general_dilated":
      out = eqn.outvars[0].aval.shape
      rhs = eqn.invars[1].aval.shape
      dn = eqn.params["dimension_numbers"]
      o_dim, i_dim = dn.rhs_spec[0], dn.rhs_spec[1]
      per_out = int(np.prod(rhs, dtype=np.int64)) // rhs[o_dim]  # kh * kw * (in / groups)
      total += int(np.prod(out, dtype=np.int64)) * per_out
      del i_dim
    subs = list(_sub_jaxprs(eqn))
    if prim == "cond":  # one branch runs: count the most expensive
      total += max((_count_macs(sub) for sub in subs), default=0)
      continue
    for sub in subs:
      # A scan repeats its body `length` times; a while body is counted once (trip count unknown).
      reps = eqn.params.get("length", 1) if prim == "scan" else 1
      total += reps * _count_macs(sub)
  return total


def flops(name_or_model, resolution: int = 0, **overrides) -> int:
  """Multiply-accumulates of one eval-mode forward pass of one image at ``resolution``.

  This is what the papers (DeiT, CaiT, ResMLP, PatchConvNet, ResNet) report as "FLOPs":
  matrix products and convolutions, one per multiply-add, elementwise ops not counted.
  Counted exactly from the traced computation (no compilation, no memory allocated).
  """
  import jax
  import jax.numpy as jnp
  model = create(name_or_model, **overrides) if isinstance(name_or_model, str) else name_or_model
  res = _input_size(model, resolution)
  if res != _input_size(model, 0) and hasattr(model, "img_size"):
    model = model.clone(img_size=res)
  variables = variable_shapes(model, res)
  x = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
  with counting_macs_scope():
    jaxpr = jax.make_jaxpr(lambda v, im: model.apply(v, im, train=False))(variables, x)
  return _count_macs(jaxpr.jaxpr)
