"""ConRec's U-Net (Dippel et al. 2021) with attention-weighted pooling and a projection head.

Architecture as the official Keras code (``models/conrec.py``, see shared/spec/conrec.md):

* encoder e: ``depth`` levels of 2 x (3x3 conv with bias -> BN -> ReLU), ``base_filters * 2**l``
  filters, 2x2 max-pool between levels; phi = the last level (f = 512, h = H / 8 for depth 4);
* decoder d: per level, x2 nearest upsampling (or a 2x2 stride-2 transposed conv), concat with
  the level's encoder feature after a 1x1 conv -> BN -> ReLU, 2 x (3x3 conv -> BN -> ReLU); a
  1x1 conv to the input's channels with a sigmoid (images in [0, 1]);
* pooling a: ``AttentionPool`` (ConRec) or global average pooling (SimCLR U-Net baseline);
* projection head p: ``ProjectionMLP`` (f, f, 128) with BN (SimCLR v2 style).

Registered models (``models.create``):

* ``conrec_unet_encoder``: h = a(e(x)), the representation used for evaluation; 4,867,393
  variables (params + BN statistics) = the paper's 4.867M (Table 2);
* ``conrec_unet_encoder_gap``: GAP instead of attention, 4,693,056 = 4.693M (SimCLR U-Net);
* ``conrec_unet``: the training model. ``logits, out = model.apply(v, masked_images,
  train=True, rngs={'dropout': rng}, mutable=['batch_stats'])`` gives
  ``out['reconstruction']`` (B, H, W, C) = d(e(x~)), ``out['projection']`` z = p(a(e(x~))) for
  NT-Xent, ``out['pre_logits']`` h, ``out['feature_map']`` phi and ``out['attention']``.
  ``pool='gap'`` gives "ConRec with GA pool"; ``decoder=False`` SimCLR(-attention) U-Net.

All three share submodule names (``encoder``, ``attn_pool``, ``decoder``, ``projection``,
``head``), so the ``encoder`` / ``attn_pool`` variables of a trained ``conrec_unet`` are the
variables of ``conrec_unet_encoder``: ``{c: {k: v[c][k] for k in ('encoder', 'attn_pool')}
for c in v}``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from visrep_jax.models.heads import AttentionPool, LinearHead, ProjectionMLP, global_avg_pool
from visrep_jax.models.resnet import BatchNorm, Conv2d, conv_bn
from visrep_jax.models.zoo import register_model

Dtype = Any

# Keras Conv2D defaults (the official code): Glorot-uniform kernels, zero biases.
_KERAS_CONV = dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros,
                   use_bias=True)


def _conv_bn_relu(x, features, kernel, conv_name, bn_name, train, dtype):
  conv = Conv2d(features, kernel, 1, kernel // 2, dtype=dtype, name=conv_name, **_KERAS_CONV)
  return nn.relu(conv_bn(x, conv, BatchNorm(features, dtype=dtype, name=bn_name), train))


class DoubleConv(nn.Module):
  """2 x (3x3 conv -> BN -> ReLU); variables ``conv1``, ``bn1``, ``conv2``, ``bn2``."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for i in (1, 2):
      x = _conv_bn_relu(x, self.features, 3, f"conv{i}", f"bn{i}", train, self.dtype)
    return x


class UNetEncoder(nn.Module):
  """Returns ``(phi, skips)``: the last level's map and the pre-pool maps of the others."""
  depth: int = 4
  base_filters: int = 64
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    block = nn.remat(DoubleConv, static_argnums=(2,)) if self.remat else DoubleConv
    skips = []
    for level in range(self.depth):
      x = block(self.base_filters * 2 ** level, dtype=self.dtype, name=f"down_{level}")(x, train)
      if level < self.depth - 1:
        skips.append(x)
        x = nn.max_pool(x, (2, 2), (2, 2))
    return x, tuple(skips)


class UNetDecoder(nn.Module):
  """Reconstruction branch: phi and the encoder skips -> (B, H, W, out_channels)."""
  out_channels: int = 3
  depth: int = 4
  base_filters: int = 64
  upsample: str = "nearest"              # or 'transpose' (Conv2DTranspose 2x2, stride 2)
  output_activation: Optional[str] = "sigmoid"
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, phi, skips, train: bool = False):
    if self.upsample not in ("nearest", "transpose"):
      raise ValueError(f"upsample must be 'nearest' or 'transpose', got {self.upsample!r}")
    if self.output_activation not in (None, "sigmoid"):
      raise ValueError(f"output_activation must be 'sigmoid' or None, got {self.output_activation!r}")
    block = nn.remat(DoubleConv, static_argnums=(2,)) if self.remat else DoubleConv
    x = phi
    for level in range(self.depth - 2, -1, -1):
      f = self.base_filters * 2 ** level
      if self.upsample == "nearest":
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(
            b, 2 * h, 2 * w, c)
      else:
        # transpose_kernel: the gradient-of-conv semantics (and kernel layout (kh, kw, out,
        # in)) of Keras' Conv2DTranspose and torch's ConvTranspose2d.
        x = nn.ConvTranspose(f, (2, 2), (2, 2), padding="VALID", transpose_kernel=True,
                             dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                             name=f"up_{level}_transpose")(x)
      skip = _conv_bn_relu(skips[level], skips[level].shape[-1], 1, f"skip_{level}_conv",
                           f"skip_{level}_bn", train, self.dtype)
      x = jnp.concatenate([x.astype(self.dtype), skip], axis=-1)
      x = block(f, dtype=self.dtype, name=f"up_{level}")(x, train)
    x = Conv2d(self.out_channels, 1, dtype=self.dtype, name="head", **_KERAS_CONV)(x)
    x = x.astype(jnp.float32)
    return jax.nn.sigmoid(x) if self.output_activation == "sigmoid" else x


class ConRecUNet(nn.Module):
  """U-Net encoder + pooling (+ decoder, + projection head, + linear classifier)."""
  num_classes: int = 0                  # 0: logits = pre_logits (h); > 0: linear head
  img_size: int = 224                   # nominal (any multiple of 2**(depth - 1) works)
  depth: int = 4
  base_filters: int = 64
  pool: str = "attention"               # 'attention' (ConRec) or 'gap' (SimCLR U-Net)
  attn_dropout: float = 0.5             # dropout on phi inside the attention branch (official)
  decoder: bool = False                 # reconstruction branch (ConRec training)
  upsample: str = "nearest"
  out_channels: Optional[int] = None    # reconstruction channels; None: the input's
  projection_dims: Sequence[int] = ()   # () = no projection head; ConRec: (512, 512, 128)
  dropout: float = 0.0                  # before the linear classifier
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4:
      raise ValueError(f"expected NHWC images, got shape {images.shape}")
    if self.pool not in ("attention", "gap"):
      raise ValueError(f"pool must be 'attention' or 'gap', got {self.pool!r}")
    m = 2 ** (self.depth - 1)
    if images.shape[1] % m or images.shape[2] % m:
      raise ValueError(f"a depth-{self.depth} U-Net needs a height and width divisible by {m}, "
                       f"got {images.shape[1]}x{images.shape[2]}")
    x = images.astype(self.dtype)
    phi, skips = UNetEncoder(self.depth, self.base_filters, self.remat, self.dtype,
                             name="encoder")(x, train)
    out = {"feature_map": phi}
    if self.pool == "attention":
      h, attn = AttentionPool(dropout=self.attn_dropout, dtype=self.dtype,
                              name="attn_pool")(phi, train)
      out["attention"] = attn
    else:
      h = global_avg_pool(phi)
    out["pre_logits"] = h
    if self.decoder:
      out["reconstruction"] = UNetDecoder(
          self.out_channels or images.shape[-1], self.depth, self.base_filters, self.upsample,
          remat=self.remat, dtype=self.dtype, name="decoder")(phi, skips, train)
    if self.projection_dims:
      dims = tuple(self.projection_dims)
      hidden = dims[0] if len(dims) > 1 else None
      if len(set(dims[:-1])) > 1:
        raise ValueError(f"projection_dims: hidden widths must be equal, got {dims}")
      z = ProjectionMLP(num_layers=len(dims), hidden_dim=hidden, out_dim=dims[-1],
                        dtype=self.dtype, name="projection")(h.astype(self.dtype), train)
      out["projection"] = z.astype(jnp.float32)
    if self.num_classes > 0:
      logits = LinearHead(self.num_classes, dropout=self.dropout, dtype=self.dtype,
                          name="head")(h, train)
    else:
      logits = h
    out["logits"] = logits
    return logits.astype(jnp.float32), out


_META = dict(source="ConRec paper Table 2 (#Parameters incl. BN statistics)")
register_model("conrec_unet_encoder", ConRecUNet, pool="attention",
               _meta=dict(params_m=4.867, **_META))
register_model("conrec_unet_encoder_gap", ConRecUNet, pool="gap",
               _meta=dict(params_m=4.693, **_META))
register_model("conrec_unet", ConRecUNet, pool="attention", decoder=True,
               projection_dims=(512, 512, 128),
               _meta=dict(source="ConRec training model: Table 2's 4.867M is its encoder + pooling"))
