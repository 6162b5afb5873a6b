"""ResMLP (Touvron et al. 2021; thesis ch. 4): residual MLPs with Affine "norms".

Follows facebookresearch/deit ``resmlp_models.py``: linear patch embedding; per block a
cross-patch sublayer ``x += gamma_1 * Lin_N(Aff(x)^T)^T`` (one N x N linear layer over the
token axis, shared by all channels) and a cross-channel sublayer ``x += gamma_2 * MLP(Aff(x))``
(hidden 4d, exact GELU); constant stochastic depth; a final Affine, then the mean over tokens.
There is no class token and no position embedding.

Parameter names mirror the official state dict (``patch_embed.proj``, ``blocks.i.norm1.alpha``,
``blocks.i.attn`` (the token-mixing Linear), ``blocks.i.mlp.fc1``, ``gamma_1``, ``norm``,
``head``); :meth:`ResMLP.torch_rename` maps timm's names (``stem``, ``linear_tokens``,
``mlp_channels``, ``ls1``/``ls2``) onto them.

Inside the trunk the tokens are held as (N, B, D): the cross-patch layer is then one plain
(N x N) @ (N x B*D) matmul and the channel MLP one (N*B x D) @ (D x 4D) matmul, with no
transposes between blocks (in (B, N, D) the token mixing needs a transpose before and after).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from visrep_jax.models import layers
from visrep_jax.models.zoo import register_alias, register_model

Dtype = Any


class Affine(nn.Module):
  """``alpha * x + beta`` per channel (the official ``Affine``; alpha=1, beta=0 at init)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    alpha = self.param("alpha", nn.initializers.ones, (d,), jnp.float32)
    beta = self.param("beta", nn.initializers.zeros, (d,), jnp.float32)
    return x * alpha.astype(self.dtype) + beta.astype(self.dtype)


class TokenMixing(nn.Module):
  """The cross-patch ``nn.Linear(N, N)`` applied along the token axis of (N, B, D) tokens.

  ``kernel`` is (N_in, N_out) as a Dense kernel, i.e. the transposed torch weight.
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n = x.shape[0]
    kernel = self.param("kernel", layers.trunc_normal(0.02), (n, n), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (n,), jnp.float32)
    y = jnp.einsum("mo,mbd->obd", kernel.astype(self.dtype), x)
    return y + bias.astype(self.dtype)[:, None, None]


class PatchEmbedNBD(nn.Module):
  """Non-overlapping p x p patches -> (N, B, D) tokens, row-major (h, w) token order.

  Same parameters as ``Conv2d(C, D, k=p, s=p)`` (Flax path ``proj/kernel`` (p, p, C, D),
  ``proj/bias``), computed as one matmul over the flattened patches, which also yields the
  token-major layout directly.
  """
  patch_size: int
  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    b, h, w, c = x.shape
    if h % p or w % p:
      raise ValueError(f"image size {(h, w)} is not divisible by patch size {p}")
    gh, gw = h // p, w // p
    proj = _ConvParams(p, c, self.embed_dim, name="proj")
    kernel, bias = proj()
    patches = x.reshape(b, gh, p, gw, p, c).transpose(1, 3, 0, 2, 4, 5)  # (gh, gw, b, p, p, c)
    patches = patches.reshape(gh * gw, b, p * p * c)
    y = jnp.dot(patches, kernel.astype(self.dtype).reshape(p * p * c, self.embed_dim))
    return y + bias.astype(self.dtype), (gh, gw)


class _ConvParams(nn.Module):
  """Holds the parameters of a (k x k, stride k) Conv2d with bias, in Flax Conv layout."""
  kernel_size: int
  in_features: int
  features: int

  @nn.compact
  def __call__(self):
    k = self.kernel_size
    fan_in = k * k * self.in_features
    kernel = self.param("kernel", layers.torch_conv_kernel_init(),
                        (k, k, self.in_features, self.features), jnp.float32)
    bias = self.param("bias", layers.torch_conv_bias_init(fan_in), (self.features,), jnp.float32)
    return kernel, bias


def _drop_path(module: nn.Module, x, rate: float, deterministic: bool):
  """Stochastic depth for (N, B, D) tokens: one keep/drop per example (axis 1)."""
  if deterministic or rate == 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (1, x.shape[1], 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


class ResMLPBlock(nn.Module):
  """The official ``layers_scale_mlp_blocks`` on (N, B, D) tokens."""
  layerscale_init: float
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    d = x.shape[-1]
    gamma = lambda name: self.param(name, nn.initializers.constant(self.layerscale_init), (d,),
                                    jnp.float32).astype(self.dtype)
    y = TokenMixing(self.dtype, name="attn")(Affine(self.dtype, name="norm1")(x))
    x = x + _drop_path(self, gamma("gamma_1") * y, self.drop_path, deterministic)
    y = layers.Mlp(int(d * self.mlp_ratio), dropout=self.dropout, dtype=self.dtype,
                   name="mlp")(Affine(self.dtype, name="norm2")(x), deterministic)
    x = x + _drop_path(self, gamma("gamma_2") * y, self.drop_path, deterministic)
    return x


class ResMLP(nn.Module):
  num_classes: int = 1000
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  mlp_ratio: float = 4.0
  layerscale_init: float = 0.1   # official: 0.1 (12 blocks), 1e-5 (24), 1e-6 (36, big 24)
  drop_path_rate: float = 0.0    # constant over blocks, as the official code
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4:
      raise ValueError(f"expected NHWC images, got shape {images.shape}")
    deterministic = not train
    x = images.astype(self.dtype)
    x, (gh, gw) = PatchEmbedNBD(self.patch_size, self.embed_dim, self.dtype,
                                name="patch_embed")(x)
    expected = (self.img_size // self.patch_size) ** 2
    if gh * gw != expected:
      raise ValueError(
          f"input {images.shape[1]}x{images.shape[2]} gives {gh * gw} patches but ResMLP was "
          f"built for img_size={self.img_size} ({expected} patches): its cross-patch layers are "
          f"N x N for a fixed N; create the model with img_size={images.shape[1]}")
    block_cls = ResMLPBlock
    if self.remat:
      block_cls = nn.remat(block_cls, static_argnums=(2,))
    for i in range(self.depth):
      x = block_cls(self.layerscale_init, self.mlp_ratio, self.drop_path_rate, self.dropout,
                    self.dtype, name=f"blocks_{i}")(x, deterministic)
    x = Affine(self.dtype, name="norm")(x)
    pre_logits = x.mean(axis=0)
    out = {"tokens": x.transpose(1, 0, 2), "pre_logits": pre_logits, "grid": (gh, gw)}
    if self.num_classes > 0:
      logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=layers.trunc_normal(0.02),
                        bias_init=nn.initializers.zeros, name="head")(pre_logits)
    else:
      logits = pre_logits
    out["logits"] = logits
    return logits.astype(jnp.float32), out

  @staticmethod
  def torch_rename(key: str) -> Optional[str]:
    """timm ``MlpMixer``/``ResBlock`` names -> official deit names (identity on those).

    timm's ``alpha``/``beta`` are (1, 1, dim) instead of (dim,): same names, the converter
    drops the size-1 axes.
    """
    key = re.sub(r"^stem\.", "patch_embed.", key)
    key = re.sub(r"\.linear_tokens\.", ".attn.", key)
    key = re.sub(r"\.mlp_channels\.", ".mlp.", key)
    key = re.sub(r"\.ls([12])$", r".gamma_\1", key)
    return key


# Papers' numbers: thesis Table 4.1/4.3 (params M, GFLOPs = multiply-adds, top-1 IN-1k, no
# distillation). resmlp_big_24_224 is the official resmlpB_24 = ResMLP-B24/8 (patch 8).
_RESMLP = {
    "resmlp_12_224": dict(patch_size=16, embed_dim=384, depth=12, layerscale_init=0.1,
                          _meta=dict(params_m=15.4, gflops=3.0, top1=76.6,
                                     source="thesis Table 4.1 / 4.3 (ResMLP-S12)")),
    "resmlp_24_224": dict(patch_size=16, embed_dim=384, depth=24, layerscale_init=1e-5,
                          _meta=dict(params_m=30.0, gflops=6.0, top1=79.4,
                                     source="thesis Table 4.1 / 4.3 (ResMLP-S24)")),
    "resmlp_36_224": dict(patch_size=16, embed_dim=384, depth=36, layerscale_init=1e-6,
                          _meta=dict(params_m=44.7, top1_distilled=81.1,
                                     source="not in the thesis tables; params: our count of "
                                            "the official architecture; top-1 (distilled): "
                                            "official README_resmlp.md")),
    "resmlp_big_24_224": dict(patch_size=8, embed_dim=768, depth=24, layerscale_init=1e-6,
                              _meta=dict(params_m=129.1, gflops=100.2, top1=81.0,
                                         source="thesis Table 4.3 (ResMLP-B24/8)")),
}
for _name, _kw in _RESMLP.items():
  register_model(_name, ResMLP, img_size=224, **_kw)
# Official builder names (facebookresearch/deit resmlp_models.py).
for _alias, _name in (("resmlp_12", "resmlp_12_224"), ("resmlp_24", "resmlp_24_224"),
                      ("resmlp_36", "resmlp_36_224"), ("resmlpB_24", "resmlp_big_24_224")):
  register_alias(_alias, _name)
# A few-parameter model for unit tests.
register_model("resmlp_test_patch4_16", ResMLP, img_size=16, patch_size=4, embed_dim=32,
               depth=2, layerscale_init=0.1, num_classes=10)
