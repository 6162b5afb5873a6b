"""Model zoo: ``create(name, **overrides)`` returns a Flax linen module.

Every model is called as ``model.apply(variables, images_nhwc, train=...)`` and returns
``(logits, out)`` where ``out['pre_logits']`` is the pooled feature and ``out['tokens']``
(transformers) / ``out['feature_map']`` (convnets) the spatial features.

Each family lives in its own module of this package (vit.py, cait.py, resmlp.py, ...) and
registers its models with ``zoo.register_model`` at import; every module here is imported below,
so a new family file is picked up without editing this one.
"""

from __future__ import annotations

import importlib
import pkgutil

from visrep_jax.registry import UnknownNameError
from visrep_jax.models.zoo import (MODELS, alias_of, create, default_kwargs, flops, list_models, make_module,
                                   num_params, paper_metadata, register_alias, register_model,
                                   variable_shapes)

_NOT_FAMILIES = {"zoo", "layers"}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
  if _info.name not in _NOT_FAMILIES and not _info.name.startswith("_"):
    importlib.import_module(f"{__name__}.{_info.name}")

from visrep_jax.models.vit import VisionTransformer  # noqa: E402

__all__ = ["create", "list_models", "register_model", "MODELS", "UnknownNameError",
           "VisionTransformer", "default_kwargs", "paper_metadata", "make_module", "flops", "num_params",
           "variable_shapes", "register_alias", "alias_of"]
