"""Model zoo: ``create(name, **overrides)`` returns a Flax linen module.

Every model is called as ``model.apply(variables, images_nhwc, train=...)`` and returns
``(logits, out)`` where ``out['pre_logits']`` is the pooled feature and ``out['tokens']`` /
``out['feature_map']`` the spatial features.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict

import flax.linen as nn

from visrep_jax.registry import Registry, UnknownNameError, unknown_name_message
from visrep_jax.models.vit import VisionTransformer

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


# --- DeiT III (facebookresearch/deit models_v2.py; timm names deit3_*) -------------------------
# Params/GFLOPs at 224 from thesis Table 6.14.
_DEIT3 = {
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, _meta=dict(params_m=5.7, gflops=1.3)),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, _meta=dict(params_m=22.0, gflops=4.6)),
    "medium": dict(patch_size=16, embed_dim=512, depth=12, num_heads=8, _meta=dict(params_m=38.8)),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, _meta=dict(params_m=86.6, gflops=17.5)),
    "large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, _meta=dict(params_m=304.4, gflops=61.6)),
    "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, _meta=dict(params_m=632.1, gflops=167.4)),
}
for _size, _kw in _DEIT3.items():
  for _res in (224, 384):
    if _size == "huge" and _res == 384:
      continue
    _kw = dict(_kw)
    register_model(f"deit3_{_size}_patch{_kw['patch_size']}_{_res}", VisionTransformer,
                   img_size=_res, layerscale_init=1e-4, pos_embed_cls_slot=False,
                   drop_path_uniform=True, **_kw)

# Small DeiT III-style ViT for Fashion-MNIST (28x28 -> 4x4 grid of 7x7 patches), `demo` configs.
register_model("deit3_demo_patch7_28", VisionTransformer, img_size=28, patch_size=7,
               embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0, layerscale_init=0.1,
               pos_embed_cls_slot=False, drop_path_uniform=True, num_classes=10)
# A few-parameter model for unit tests.
register_model("vit_test_patch4_16", VisionTransformer, img_size=16, patch_size=4, embed_dim=32,
               depth=2, num_heads=2, mlp_ratio=2.0, layerscale_init=1e-1, num_classes=10)

__all__ = ["create", "list_models", "register_model", "MODELS", "UnknownNameError",
           "VisionTransformer", "default_kwargs", "paper_metadata"]
