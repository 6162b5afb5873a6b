"""Building blocks shared by the transformer families (ViT/DeiT/DeiT III, CaiT, ...).

Parameter names mirror the official PyTorch modules (``qkv``, ``proj``, ``fc1``, ``fc2``,
``norm1``, ``gamma_1`` ...) so that checkpoint conversion is a rename + transpose.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any

# timm's trunc_normal_(std=.02) truncates at +-2 *absolute*, i.e. +-100 sigma: effectively a
# plain normal. jax's truncated_normal takes bounds in units of sigma.
def trunc_normal(stddev: float = 0.02) -> Callable:
  return nn.initializers.truncated_normal(stddev, lower=-2.0 / stddev, upper=2.0 / stddev)


def torch_conv_kernel_init() -> Callable:
  """PyTorch's default Conv2d/Linear init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv_bias_init(fan_in: int) -> Callable:
  bound = 1.0 / math.sqrt(max(fan_in, 1))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def gelu_exact(x):
  # PyTorch nn.GELU() is the erf form; flax's default is the tanh approximation.
  return nn.gelu(x, approximate=False)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example (rng stream 'dropout')."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Mlp(nn.Module):
  """fc1 -> GELU -> dropout -> fc2 -> dropout (timm ``Mlp``)."""
  hidden_dim: int
  out_dim: Optional[int] = None
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  kernel_init: Callable = trunc_normal(0.02)

  @nn.compact
  def __call__(self, x, deterministic: bool):
    out_dim = self.out_dim or x.shape[-1]
    dense = lambda f, name: nn.Dense(f, dtype=self.dtype, kernel_init=self.kernel_init,
                                     bias_init=nn.initializers.zeros, name=name)
    x = dense(self.hidden_dim, "fc1")(x)
    x = gelu_exact(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = dense(out_dim, "fc2")(x)
    return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class Attention(nn.Module):
  """Multi-head self-attention with the fused ``qkv`` projection of timm/deit.

  The qkv output features are ordered [q | k | v], each head-major, exactly as in PyTorch.
  """
  num_heads: int
  qkv_bias: bool = True
  attn_dropout: float = 0.0
  proj_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  kernel_init: Callable = trunc_normal(0.02)

  @nn.compact
  def __call__(self, x, deterministic: bool):
    b, n, d = x.shape
    h = self.num_heads
    if d % h:
      raise ValueError(f"embed dim {d} is not divisible by num_heads {h}")
    hd = d // h
    qkv = nn.Dense(3 * d, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=self.kernel_init,
                   bias_init=nn.initializers.zeros, name="qkv")(x)
    qkv = qkv.reshape(b, n, 3, h, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, n, h, hd)
    if self.attn_dropout > 0.0 and not deterministic:
      q = q * (hd ** -0.5)
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
      probs = nn.Dropout(self.attn_dropout)(probs, deterministic=deterministic)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    else:
      # XLA's fused attention path (cuDNN flash attention on GPU when available, a fused
      # softmax(QK^T)V elsewhere). Scale = head_dim ** -0.5 as in the references.
      out = jax.nn.dot_product_attention(q, k, v, scale=hd ** -0.5)
    out = out.reshape(b, n, d)
    out = nn.Dense(d, dtype=self.dtype, kernel_init=self.kernel_init,
                   bias_init=nn.initializers.zeros, name="proj")(out)
    return nn.Dropout(self.proj_dropout)(out, deterministic=deterministic)


class LayerScaleBlock(nn.Module):
  """Pre-norm transformer block, optionally with LayerScale (DeiT III / CaiT ``gamma_1/2``).

  x = x + DropPath(gamma_1 * Attn(LN(x)));  x = x + DropPath(gamma_2 * MLP(LN(x))).
  ``layerscale_init=None`` gives the plain ViT/DeiT block.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  layerscale_init: Optional[float] = 1e-4
  drop_path: float = 0.0
  dropout: float = 0.0
  attn_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    d = x.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)

    def scale(y, name):
      if self.layerscale_init is None:
        return y
      gamma = self.param(name, nn.initializers.constant(self.layerscale_init), (d,), jnp.float32)
      return y * gamma.astype(y.dtype)

    y = Attention(self.num_heads, self.qkv_bias, self.attn_dropout, self.dropout,
                  dtype=self.dtype, name="attn")(norm("norm1")(x), deterministic)
    x = x + DropPath(self.drop_path)(scale(y, "gamma_1"), deterministic)
    y = Mlp(int(d * self.mlp_ratio), dropout=self.dropout, dtype=self.dtype,
            name="mlp")(norm("norm2")(x), deterministic)
    x = x + DropPath(self.drop_path)(scale(y, "gamma_2"), deterministic)
    return x


class PatchEmbed(nn.Module):
  """Conv(k=p, s=p) with bias, then flatten to (B, H*W, D) in row-major (h, w) order."""
  patch_size: int
  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"image size {x.shape[1:3]} is not divisible by patch size {p}")
    fan_in = p * p * x.shape[-1]
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                kernel_init=torch_conv_kernel_init(), bias_init=torch_conv_bias_init(fan_in),
                name="proj")(x)
    b, h, w, d = x.shape
    return x.reshape(b, h * w, d), (h, w)
