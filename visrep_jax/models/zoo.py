"""The model registry: ``register_model`` (used by each family module) and ``create``."""

from __future__ import annotations

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


def list_models() -> list[str]:
  return MODELS.names()


def default_kwargs(name: str) -> Dict[str, Any]:
  MODELS.get(name)
  return dict(_SPECS[name][1])


def paper_metadata(name: str) -> Dict[str, Any]:
  MODELS.get(name)
  return dict(_SPECS[name][2])
