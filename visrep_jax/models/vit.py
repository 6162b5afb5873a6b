"""Vision Transformer family: DeiT (incl. distilled) and DeiT III, one module.

* DeiT III (facebookresearch/deit ``models_v2.vit_models``): the learned position embedding has
  no class-token slot and is added to the patch tokens *before* the class token is prepended;
  LayerScale (init 1e-4) on both residual branches; uniform stochastic depth.
* DeiT (deit ``models.py`` = timm 0.3 ``VisionTransformer`` / ``DistilledVisionTransformer``):
  the position embedding has slots for the class (and distillation) token and is added after
  they are prepended; no LayerScale; stochastic depth grows linearly with depth. The distilled
  models add a ``dist_token`` (token order [cls, dist, patches]) read by a second head
  ``head_dist``.

Both: pre-norm blocks, final LayerNorm, the head reads the class token. Parameter names follow
the official PyTorch state dicts (``blocks.3.gamma_1`` -> ``blocks_3/gamma_1``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from visrep_jax.models import layers
from visrep_jax.models.zoo import register_model

Dtype = Any


class VisionTransformer(nn.Module):
  """ViT / DeiT / DeiT III; the registered names below fix the options of each paper.

  Distilled models (``distilled=True``) return, in eval mode, the fusion of the two heads
  (``distilled_fusion``: 'mean_logits', the average of the logits as deit/timm do, or
  'mean_probs', log of the average of the softmax outputs as the DeiT paper describes, so that
  softmax(logits) is the averaged distribution); in train mode the class head's logits. Both
  heads' logits are always in ``out['cls_logits']`` / ``out['dist_logits']`` for a
  distillation loss; ``pre_logits`` is the average of the two normalised tokens (as timm).
  """
  num_classes: int = 1000
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  layerscale_init: Optional[float] = 1e-4   # None: plain ViT/DeiT block
  drop_path_rate: float = 0.0
  drop_path_uniform: bool = True            # DeiT III: same rate in every block; DeiT: linear
  dropout: float = 0.0
  attn_dropout: float = 0.0
  head_dropout: float = 0.0
  pos_embed_cls_slot: bool = False          # DeiT/timm ViT: True; DeiT III: False
  global_pool: str = "token"                # 'token' (class token) or 'avg' (mean of patches)
  dtype: Dtype = jnp.float32                # compute dtype; parameters stay float32
  remat: bool = False                       # rematerialise each block in the backward pass
  attention: Optional[str] = None           # 'bhnd' | 'xla' | 'cudnn'; None: by backend/dtype
  distilled: bool = False                   # DeiT-distilled: dist_token + head_dist
  distilled_fusion: str = "mean_logits"     # eval-mode fusion of the heads: or 'mean_probs'
  # Convolutional stem (ViT_C of Xiao et al. 2021, "Early convolutions help transformers see
  # better"): one 3x3 stride-2 conv + BatchNorm + ReLU per entry (its output channels), then
  # the patch embedding (``patch_size`` 1 for a 1x1 projection) on the stem's feature map.
  # Empty (default): the plain ViT patch embedding.
  conv_stem: Sequence[int] = ()

  @staticmethod
  def torch_rename(key: str) -> Optional[str]:
    """timm names -> deit-repo names: DeiT III LayerScale ``ls1.gamma`` -> ``gamma_1``."""
    if key.startswith("module."):
      key = key[len("module."):]
    parts = key.split(".")
    if (len(parts) == 4 and parts[0] == "blocks" and parts[2] in ("ls1", "ls2")
        and parts[3] == "gamma"):
      return f"blocks.{parts[1]}.gamma_{parts[2][-1]}"
    return key

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4:
      raise ValueError(f"expected NHWC images, got shape {images.shape}")
    if self.global_pool not in ("token", "avg"):
      raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
    if self.distilled and self.global_pool != "token":
      raise ValueError("distilled models read the class and distillation tokens: "
                       f"global_pool must be 'token', got {self.global_pool!r}")
    if self.distilled_fusion not in ("mean_logits", "mean_probs"):
      raise ValueError("distilled_fusion must be 'mean_logits' or 'mean_probs', got "
                       f"{self.distilled_fusion!r}")
    deterministic = not train
    x = images.astype(self.dtype)
    if any(int(ch) < 1 for ch in self.conv_stem):
      raise ValueError(f"conv_stem lists each stem conv's output channels (positive integers), "
                       f"got {tuple(self.conv_stem)}")
    stride = 1
    for i, ch in enumerate(self.conv_stem):
      x = nn.Conv(int(ch), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False,
                  dtype=self.dtype, kernel_init=nn.initializers.he_normal(),
                  name=f"stem_conv_{i}")(x)
      x = nn.BatchNorm(use_running_average=deterministic, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype, name=f"stem_bn_{i}")(x)
      x = nn.relu(x)
      stride *= 2
    if self.conv_stem and (x.shape[1] % self.patch_size or x.shape[2] % self.patch_size):
      raise ValueError(f"the conv stem turns {images.shape[1]}x{images.shape[2]} images into a "
                       f"{x.shape[1]}x{x.shape[2]} map, not divisible by patch_size="
                       f"{self.patch_size}; use patch_size=1 (a 1x1 projection) or a size that "
                       "divides it")
    x, (gh, gw) = layers.PatchEmbed(self.patch_size, self.embed_dim, self.dtype,
                                    name="patch_embed")(x)
    layers.check_patch_grid(images, (gh, gw), self.img_size, self.patch_size,
                            stem_stride=stride)
    b, n, d = x.shape
    init = layers.trunc_normal(0.02)
    prefix = [jnp.broadcast_to(
        self.param("cls_token", init, (1, 1, d), jnp.float32).astype(self.dtype), (b, 1, d))]
    if self.distilled:
      prefix.append(jnp.broadcast_to(
          self.param("dist_token", init, (1, 1, d), jnp.float32).astype(self.dtype), (b, 1, d)))
    n_prefix = len(prefix)
    if self.pos_embed_cls_slot:
      pos = self.param("pos_embed", init, (1, n + n_prefix, d), jnp.float32).astype(self.dtype)
      x = jnp.concatenate(prefix + [x], axis=1) + pos
    else:
      pos = self.param("pos_embed", init, (1, n, d), jnp.float32).astype(self.dtype)
      x = jnp.concatenate(prefix + [x + pos], axis=1)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)

    block_cls = layers.LayerScaleBlock
    if self.remat:
      block_cls = nn.remat(block_cls, static_argnums=(2,))
    for i in range(self.depth):
      if self.drop_path_uniform or self.depth == 1:
        dp = self.drop_path_rate
      else:
        dp = self.drop_path_rate * i / (self.depth - 1)
      x = block_cls(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                    layerscale_init=self.layerscale_init, drop_path=dp, dropout=self.dropout,
                    attn_dropout=self.attn_dropout, dtype=self.dtype,
                    attn_implementation=self.attention, name=f"blocks_{i}")(x, deterministic)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    tokens = x[:, n_prefix:]
    out = {"tokens": tokens, "grid": (gh, gw)}

    def head(feature, name):
      y = nn.Dropout(self.head_dropout)(feature, deterministic=deterministic)
      if self.num_classes <= 0:
        return y
      return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=init,
                      bias_init=nn.initializers.zeros, name=name)(y)

    if not self.distilled:
      pre_logits = x[:, 0] if self.global_pool == "token" else tokens.mean(axis=1)
      logits = head(pre_logits, "head").astype(jnp.float32)
    else:
      pre_logits = (x[:, 0] + x[:, 1]) / 2
      cls_logits = head(x[:, 0], "head").astype(jnp.float32)
      dist_logits = head(x[:, 1], "head_dist").astype(jnp.float32)
      out["cls_logits"], out["dist_logits"] = cls_logits, dist_logits
      if train:
        logits = cls_logits
      elif self.distilled_fusion == "mean_logits" or self.num_classes <= 0:
        logits = (cls_logits + dist_logits) / 2
      else:  # log of the mean of the two softmax distributions
        logits = jax.nn.logsumexp(
            jnp.stack([jax.nn.log_softmax(cls_logits), jax.nn.log_softmax(dist_logits)]),
            axis=0) - jnp.log(2.0)
    out["pre_logits"] = pre_logits
    out["logits"] = logits
    return logits, out


# --- DeiT (facebookresearch/deit models.py; timm names deit_*) ---------------------------------
# Position embedding with class (and distillation) token slots, no LayerScale, linearly
# increasing stochastic depth. Paper numbers: params and ImageNet top-1 (300 epochs) from thesis
# Table 3.5, GFLOPs (multiply-adds) from Table 3.17 (DeiT-Ti FLOPs are not in the thesis). The
# paper rounds parameters to whole millions (DeiT-Ti: 5.72M printed as "5M", DeiT-Ti-distilled
# 5.91M as "6M", DeiT-B at 384: 86.86M as "86M"), hence ``params_tol_m=1``.
_DEIT = {
    "tiny": dict(embed_dim=192, num_heads=3),
    "small": dict(embed_dim=384, num_heads=6),
    "base": dict(embed_dim=768, num_heads=12),
}
_DEIT_META = {  # (size, distilled, resolution) -> thesis numbers
    ("tiny", False, 224): dict(params_m=5, top1=72.2),
    ("small", False, 224): dict(params_m=22, gflops=4.6, top1=79.8),
    ("base", False, 224): dict(params_m=86, gflops=17.5, top1=81.8),
    ("base", False, 384): dict(params_m=86, gflops=55.4, top1=83.1),
    ("tiny", True, 224): dict(params_m=6, top1=74.5),
    ("small", True, 224): dict(params_m=22, top1=81.2),
    ("base", True, 224): dict(params_m=87, top1=83.4),
    # 84.5 after 300 epochs; the released checkpoint is the 1000-epoch model (85.2).
    ("base", True, 384): dict(params_m=87, gflops=55.5, top1=84.5),
}
for (_size, _distilled, _res), _meta in _DEIT_META.items():
  _name = f"deit_{_size}{'_distilled' if _distilled else ''}_patch16_{_res}"
  register_model(_name, VisionTransformer, img_size=_res, patch_size=16, depth=12,
                 layerscale_init=None, pos_embed_cls_slot=True, drop_path_uniform=False,
                 distilled=_distilled, **_DEIT[_size],
                 _meta=dict(_meta, params_tol_m=1.0,
                            source="thesis Table 3.5 (params, top-1), Table 3.17 (GFLOPs)"))


# --- DeiT III (facebookresearch/deit models_v2.py; timm names deit3_*) -------------------------
# Params/GFLOPs at 224 from thesis Table 6.14; top-1 (ImageNet-1k only) and the 384 fine-tunings
# from Table 6.7. The thesis has no DeiT III Ti top-1 and no Ti/M at 384; for S at 384 it repeats
# the 224 count (22.0M; 22.2M with the larger position embedding).
_DEIT3 = {
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "medium": dict(patch_size=16, embed_dim=512, depth=12, num_heads=8),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
_DEIT3_META = {  # (size, resolution) -> thesis numbers
    ("tiny", 224): dict(params_m=5.7, gflops=1.3),
    ("small", 224): dict(params_m=22.0, gflops=4.6, top1=81.4),
    ("medium", 224): dict(params_m=38.8),
    ("base", 224): dict(params_m=86.6, gflops=17.5, top1=83.8),
    ("large", 224): dict(params_m=304.4, gflops=61.6, top1=84.9),
    ("huge", 224): dict(params_m=632.1, gflops=167.4, top1=85.2),
    ("tiny", 384): {},
    ("small", 384): dict(params_m=22.0, params_tol_m=0.25, gflops=15.5, top1=83.4),  # 22.2M
    ("medium", 384): {},
    ("base", 384): dict(params_m=86.9, gflops=55.5, top1=85.0),
    ("large", 384): dict(params_m=304.8, gflops=191.2, top1=85.8),
}
for (_size, _res), _meta in _DEIT3_META.items():
  _kw = _DEIT3[_size]
  register_model(f"deit3_{_size}_patch{_kw['patch_size']}_{_res}", VisionTransformer,
                 img_size=_res, layerscale_init=1e-4, pos_embed_cls_slot=False,
                 drop_path_uniform=True, **_kw,
                 _meta=dict(_meta, source="thesis Table 6.14 (224: params, GFLOPs), 6.7")
                 if _meta else {})

# Small DeiT III-style ViT for Fashion-MNIST (28x28 -> 4x4 grid of 7x7 patches), `demo` configs.
register_model("deit3_demo_patch7_28", VisionTransformer, img_size=28, patch_size=7,
               embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0, layerscale_init=0.1,
               pos_embed_cls_slot=False, drop_path_uniform=True, num_classes=10)
# The same transformer on a convolutional stem (three 3x3/2 convs, 28x28 -> 4x4 grid of 128-d
# tokens): the `fashion_mnist` configs' ViT (ViT_C of Xiao et al. 2021).
register_model("deit3_demo_convstem_28", VisionTransformer, img_size=28, patch_size=1,
               conv_stem=(32, 64, 128), embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0,
               layerscale_init=0.1, pos_embed_cls_slot=False, drop_path_uniform=True,
               num_classes=10)
# A few-parameter model for unit tests.
register_model("vit_test_patch4_16", VisionTransformer, img_size=16, patch_size=4, embed_dim=32,
               depth=2, num_heads=2, mlp_ratio=2.0, layerscale_init=1e-1, num_classes=10)
