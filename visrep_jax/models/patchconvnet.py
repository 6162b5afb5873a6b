"""PatchConvNet ("Augmenting convolutional networks with attention-based aggregation", thesis
ch. 5): a columnar convnet with a learned single-token attention pooling.

Follows facebookresearch/deit ``patchconvnet_models.py`` (``PatchConvnet``):

* ``ConvStem``: four 3x3 stride-2 convs without bias (3 -> d/8 -> d/4 -> d/2 -> d), exact GELU
  between them (none after the last): a stride-16 map of d channels;
* N trunk blocks ``x += DropPath(gamma_1 * ConvSE(LN(x)))`` with ``ConvSE`` = 1x1 conv, GELU,
  depthwise 3x3, GELU, squeeze-excite (GAP -> 1x1 d->d/4 -> ReLU -> 1x1 -> sigmoid gate),
  1x1 conv; LayerNorm eps 1e-6 over channels; constant stochastic depth;
* one class-attention block (``Layer_scale_init_Block_only_token``): a learned class token
  attends, single head, to itself and all patch tokens; then ``gamma_2 * MLP(LN(cls))``
  (hidden 3d);
* final LayerNorm of the class token and a linear head. No position embedding.

Parameter names mirror the official state dict (``patch_embed.proj.0.0.weight``,
``blocks.i.attn.qkv_pos.{0,2,4,5}``, ``qkv_pos.4.conv_reduce`` ...,
``blocks_token_only.0.attn.{q,k,v,proj}``, ``cls_token``, ``norm``, ``head``).

Unlike the official code (which reshapes tokens to a square map), the trunk runs on an NHWC
map, so any input whose sides are multiples of 16 works (detection / segmentation inputs).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from visrep_jax.models import layers
from visrep_jax.models.zoo import counting_macs, register_alias, register_model

Dtype = Any


class _LinearParams(nn.Module):
  """An ``nn.Linear(d, d)``'s parameters in Dense layout, for products computed by hand."""
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, in_features: int):
    kernel = self.param("kernel", layers.trunc_normal(0.02), (in_features, self.features),
                        jnp.float32)
    if not self.use_bias:
      return kernel, None
    return kernel, self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)


class Conv1x1(nn.Module):
  """``nn.Conv2d(cin, cout, 1)`` on NHWC as one matmul; kernel (1, 1, cin, cout) as nn.Conv."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    kernel = self.param("kernel", layers.torch_conv_kernel_init(), (1, 1, cin, self.features),
                        jnp.float32)
    bias = self.param("bias", layers.torch_conv_bias_init(cin), (self.features,), jnp.float32)
    y = layers.dense_matmul(x, kernel.reshape(cin, self.features).astype(self.dtype))
    return y + bias.astype(self.dtype)


class DepthwiseConv3x3(nn.Module):
  """``nn.Conv2d(C, C, 3, padding=1, groups=C)`` on NHWC; kernel (3, 3, 1, C) as nn.Conv.

  'shift' computes it as nine shifted multiply-adds of the zero-padded map, which XLA fuses
  into one elementwise loop; 'conv' uses a grouped ``lax.conv_general_dilated``.
  """
  dtype: Dtype = jnp.float32
  implementation: str = "shift"

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param("kernel", layers.torch_conv_kernel_init(), (3, 3, 1, c), jnp.float32)
    bias = self.param("bias", layers.torch_conv_bias_init(9), (c,), jnp.float32)
    kernel = kernel.astype(self.dtype)
    bias = bias.astype(self.dtype)
    if self.implementation == "conv" or counting_macs():  # models.flops counts convs, dots
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=c)
      return y + bias
    if self.implementation != "shift":
      raise ValueError(f"unknown depthwise implementation {self.implementation!r}")
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = bias
    for i in range(3):
      for j in range(3):
        y = y + xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
    return y


class SqueezeExcite(nn.Module):
  """timm ``SqueezeExcite(dim, rd_ratio=0.25)``: x * sigmoid(expand(relu(reduce(mean_hw x))))."""
  rd_ratio: float = 0.25
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    rd = int(round(c * self.rd_ratio))  # Python round, as timm
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)  # (B, C)
    s = jax.nn.relu(Conv1x1(rd, self.dtype, name="conv_reduce")(s))
    s = jax.nn.sigmoid(Conv1x1(c, self.dtype, name="conv_expand")(s))
    return x * s[:, None, None, :]


class ConvBlocksSE(nn.Module):
  """The official ``Conv_blocks_se`` (Sequential ``qkv_pos``) on an NHWC map."""
  dtype: Dtype = jnp.float32
  depthwise_impl: str = "shift"

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = layers.gelu_exact(Conv1x1(c, self.dtype, name="qkv_pos_0")(x))
    x = layers.gelu_exact(DepthwiseConv3x3(self.dtype, self.depthwise_impl, name="qkv_pos_2")(x))
    x = SqueezeExcite(0.25, self.dtype, name="qkv_pos_4")(x)
    return Conv1x1(c, self.dtype, name="qkv_pos_5")(x)


class TrunkBlock(nn.Module):
  """``Layer_scale_init_Block``: x + DropPath(gamma_1 * ConvSE(LN(x)))."""
  layerscale_init: float
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  depthwise_impl: str = "shift"

  @nn.compact
  def __call__(self, x, deterministic: bool):
    d = x.shape[-1]
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
    y = ConvBlocksSE(self.dtype, self.depthwise_impl, name="attn")(y)
    gamma = self.param("gamma_1", nn.initializers.constant(self.layerscale_init), (d,),
                       jnp.float32)
    return x + layers.DropPath(self.drop_path)(y * gamma.astype(y.dtype), deterministic)


class LearnedAggregation(nn.Module):
  """``Learned_Aggregation_Layer``: the class token (row 0) attends to all rows of ``u``.

  Computed without materialising K and V for all tokens (exact up to rounding):
  q . (W_k u_n + b_k) = (W_k^T q) . u_n + const (the constant cancels in the softmax), and
  sum_n a_n (W_v u_n + b_v) = W_v (sum_n a_n u_n) + (sum_n a_n) b_v.
  That replaces two (N x d) @ (d x d) products by O(N d) work.

  Returns the aggregated (B, D) vector and the attention weights (B, heads, N).
  """
  num_heads: int = 1
  qkv_bias: bool = True
  attn_dropout: float = 0.0
  proj_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, u, deterministic: bool):
    b, n, d = u.shape
    h = self.num_heads
    if d % h:
      raise ValueError(f"embed dim {d} is not divisible by num_heads {h}")
    hd = d // h
    init = layers.trunc_normal(0.02)
    dense = lambda name, bias=True: nn.Dense(d, use_bias=bias, dtype=self.dtype,
                                             kernel_init=init, bias_init=nn.initializers.zeros,
                                             name=name, **layers.dense_kwargs())
    q = dense("q", self.qkv_bias)(u[:, 0])  # (B, D)
    q = (q * jnp.asarray(hd ** -0.5, q.dtype)).reshape(b, h, hd)
    wk, bk = _LinearParams(d, self.qkv_bias, name="k")(d)
    wv, bv = _LinearParams(d, self.qkv_bias, name="v")(d)
    wk = wk.astype(self.dtype).reshape(d, h, hd)
    wv = wv.astype(self.dtype).reshape(d, h, hd)
    dropout = lambda a: nn.Dropout(self.attn_dropout)(
        a, deterministic=deterministic).astype(self.dtype)
    if counting_macs():
      # models.flops: the papers count the K and V projections of every token; same values.
      k = jnp.einsum("bnd,dhe->bhne", u, wk)
      v = jnp.einsum("bnd,dhe->bhne", u, wv)
      if self.qkv_bias:
        k = k + bk.astype(self.dtype).reshape(h, 1, hd)
        v = v + bv.astype(self.dtype).reshape(h, 1, hd)
      a = jax.nn.softmax(jnp.einsum("bhe,bhne->bhn", q, k).astype(jnp.float32), axis=-1)
      o = jnp.einsum("bhn,bhne->bhe", dropout(a), v).reshape(b, d)
    else:
      qk = jnp.einsum("dhe,bhe->bhd", wk, q)                                    # (B, h, D)
      s = jnp.einsum("bhd,bnd->bhn", qk, u, preferred_element_type=jnp.float32)  # (B, h, N)
      a = jax.nn.softmax(s, axis=-1)
      a_used = dropout(a)
      pooled = jnp.einsum("bhn,bnd->bhd", a_used, u)                            # (B, h, D)
      o = jnp.einsum("bhd,dhe->bhe", pooled, wv)                                # (B, h, hd)
      if bv is not None:
        bv = bv.astype(self.dtype).reshape(h, hd)
        if self.attn_dropout > 0.0 and not deterministic:  # the weights no longer sum to one
          bv = bv * jnp.sum(a_used, axis=-1, keepdims=True)
        o = o + bv
      o = o.reshape(b, d)
    o = nn.Dense(d, dtype=self.dtype, kernel_init=init, bias_init=nn.initializers.zeros,
                 name="proj", **layers.dense_kwargs())(o)
    return nn.Dropout(self.proj_dropout)(o, deterministic=deterministic), a


class ClassAttentionBlock(nn.Module):
  """``Layer_scale_init_Block_only_token`` (no drop-path, as in the official model)."""
  num_heads: int = 1
  mlp_ratio: float = 3.0
  qkv_bias: bool = True
  layerscale_init: float = 1e-4
  dropout: float = 0.0
  attn_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cls, deterministic: bool):
    """x: (B, N, D) patch tokens; cls: (B, D). Returns the new cls and the attention."""
    d = cls.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)
    gamma = lambda name: self.param(name, nn.initializers.constant(self.layerscale_init), (d,),
                                    jnp.float32).astype(self.dtype)
    u = norm("norm1")(jnp.concatenate([cls[:, None], x], axis=1))
    y, attn = LearnedAggregation(self.num_heads, self.qkv_bias, self.attn_dropout, self.dropout,
                                 self.dtype, name="attn")(u, deterministic)
    cls = cls + gamma("gamma_1") * y
    y = layers.Mlp(int(d * self.mlp_ratio), dropout=self.dropout, dtype=self.dtype,
                   name="mlp")(norm("norm2")(cls), deterministic)
    return cls + gamma("gamma_2") * y, attn


class ConvStem(nn.Module):
  """The official ``ConvStem`` (module ``patch_embed``): four 3x3 / stride-2 / pad-1 convs
  without bias, exact GELU between them; stride 16. Conv ``k`` is ``proj.{2k}.0``."""
  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    widths = [self.embed_dim // 8, self.embed_dim // 4, self.embed_dim // 2, self.embed_dim]
    for i, f in enumerate(widths):
      if i:
        x = layers.gelu_exact(x)
      x = nn.Conv(f, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False,
                  dtype=self.dtype, kernel_init=layers.torch_conv_kernel_init(),
                  name=f"proj_{2 * i}_0")(x)
    return x


class PatchConvNet(nn.Module):
  num_classes: int = 1000
  img_size: int = 224          # default input size only: there is no position embedding
  patch_size: int = 16         # fixed by the stem (4 stride-2 convs)
  embed_dim: int = 384
  depth: int = 60
  num_heads: int = 1           # of the class-attention pooling
  mlp_ratio_clstk: float = 3.0
  qkv_bias: bool = True
  layerscale_init: float = 1e-4
  drop_path_rate: float = 0.0  # constant over trunk blocks (dpr_constant=True)
  dropout: float = 0.0         # pooling block MLP / projection dropout (official drop_rate)
  attn_dropout: float = 0.0
  depthwise_impl: str = "shift"  # see DepthwiseConv3x3
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4:
      raise ValueError(f"expected NHWC images, got shape {images.shape}")
    if self.patch_size != 16:
      raise ValueError("PatchConvNet's convolutional stem has stride 16; patch_size must be 16")
    if images.shape[1] % 16 or images.shape[2] % 16:
      raise ValueError(f"image sides {images.shape[1:3]} must be multiples of 16")
    deterministic = not train
    x = ConvStem(self.embed_dim, self.dtype, name="patch_embed")(images.astype(self.dtype))
    b, gh, gw, d = x.shape

    block_cls = TrunkBlock
    if self.remat:
      block_cls = nn.remat(block_cls, static_argnums=(2,))
    for i in range(self.depth):
      x = block_cls(self.layerscale_init, self.drop_path_rate, self.dtype, self.depthwise_impl,
                    name=f"blocks_{i}")(x, deterministic)

    tokens = x.reshape(b, gh * gw, d)
    cls = self.param("cls_token", layers.trunc_normal(0.02), (1, 1, d), jnp.float32)
    cls = jnp.broadcast_to(cls.astype(self.dtype).reshape(1, d), (b, d))
    cls, attn = ClassAttentionBlock(self.num_heads, self.mlp_ratio_clstk, self.qkv_bias,
                                    self.layerscale_init, self.dropout, self.attn_dropout,
                                    self.dtype, name="blocks_token_only_0")(tokens, cls,
                                                                            deterministic)
    norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")
    pre_logits = norm(cls)
    out = {
        "pre_logits": pre_logits,
        "feature_map": norm(x),  # the official forward normalises all tokens with `norm`
        "attention": attn[:, :, 1:].reshape(b, self.num_heads, gh, gw),  # pooling weights
    }
    if self.num_classes > 0:
      logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=layers.trunc_normal(0.02),
                        bias_init=nn.initializers.zeros, name="head")(pre_logits)
    else:
      logits = pre_logits
    out["logits"] = logits
    return logits.astype(jnp.float32), out


# Papers' numbers: thesis Table 5.1 (IN-1k, 224: params M, GFLOPs = MACs, top-1) and Table 5.2 /
# README_patchconvnet.md (IN-21k pre-trained, fine-tuned at 384).
_PCN = {
    "s60": dict(embed_dim=384, depth=60, layerscale_init=1e-4,
                _meta=dict(params_m=25.2, gflops=4.0, top1=82.1, source="thesis Table 5.1")),
    "s120": dict(embed_dim=384, depth=120, layerscale_init=1e-6,
                 _meta=dict(params_m=47.7, gflops=7.5, top1=83.2, source="thesis Table 5.1")),
    "b60": dict(embed_dim=768, depth=60, layerscale_init=1e-6,
                _meta=dict(params_m=99.4, gflops=15.8, top1=83.5, source="thesis Table 5.1")),
    "b120": dict(embed_dim=768, depth=120, layerscale_init=1e-6,
                 _meta=dict(params_m=188.6, gflops=29.9, top1=84.1, source="thesis Table 5.1")),
    "l60": dict(embed_dim=1024, depth=60, layerscale_init=1e-6,
                _meta=dict(params_m=176.0, gflops=28.1, top1_in21k=85.7,
                           source="thesis Table 5.2 (IN-21k pre-trained; params: our count)")),
    "l120": dict(embed_dim=1024, depth=120, layerscale_init=1e-6,
                 _meta=dict(params_m=334.3, gflops=53.0, top1_in21k=86.1,
                            source="thesis Table 5.2 (IN-21k pre-trained; params: our count)")),
}
_PCN_384 = {  # IN-21k pre-trained, fine-tuned at 384 (thesis Table 5.2 bracketed / README)
    "s60": dict(params_m=25.2, gflops=11.8, top1_in21k=84.9),
    "b60": dict(params_m=99.4, gflops=46.5, top1_in21k=86.5),
    "b120": dict(params_m=188.6, gflops=87.7, top1_in21k=86.9),
}
for _size, _kw in _PCN.items():
  _kw = dict(_kw)
  register_model(f"patchconvnet_{_size}", PatchConvNet, img_size=224, **_kw)
  # The official builder names (S60, S120, ...).
  register_alias(_size.upper(), f"patchconvnet_{_size}")
  if _size in _PCN_384:
    _kw["_meta"] = dict(_PCN_384[_size], source="thesis Table 5.2 / README_patchconvnet.md")
    register_model(f"patchconvnet_{_size}_384", PatchConvNet, img_size=384, **_kw)
# A few-parameter model for unit tests.
register_model("patchconvnet_test", PatchConvNet, img_size=32, embed_dim=32, depth=2,
               layerscale_init=0.1, num_classes=10)
