"""Building blocks shared by the transformer families (ViT/DeiT/DeiT III, CaiT, ...).

Parameter names mirror the official PyTorch modules (``qkv``, ``proj``, ``fc1``, ``fc2``,
``norm1``, ``gamma_1`` ...) so that checkpoint conversion is a rename + transpose.
"""

from __future__ import annotations

import functools
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


@jax.custom_vjp
def gelu_exact(x):
  """Exact (erf) GELU, as PyTorch ``nn.GELU()``; flax's default is the tanh approximation.

  Hand-written VJP: the forward saves only its input and is one elementwise pass; the backward
  recomputes the Gaussian cdf/pdf in one pass. Autodiff of ``x * Phi(x)`` spread the work over
  ~4 fusions and kept erf(x) / exp(-x^2/2) as extra B*N*4D tensors; on CPU these passes are
  memory-bound (with XLA_FLAGS as in visrep_jax.utils.xla, ~2% of a DeiT-S train step).
  """
  return _gelu_fwd(x)[0]


_SQRT_HALF = 1.0 / math.sqrt(2.0)


def _gelu_fwd(x):
  x32 = x.astype(jnp.float32)  # erf in float32 also for bfloat16 activations
  return (x32 * (0.5 + 0.5 * jax.lax.erf(x32 * _SQRT_HALF))).astype(x.dtype), x


def _gelu_bwd(x, g):
  x32 = x.astype(jnp.float32)
  # Phi(x) via erfc, deliberately not the forward's erf expression: XLA's CSE would otherwise
  # merge the two, materialise erf(x / sqrt 2) in the forward as a full-size tensor and turn
  # the forward into two memory passes.
  cdf = 0.5 * jax.lax.erfc(-x32 * _SQRT_HALF)
  pdf = jnp.exp(-0.5 * x32 * x32) * (1.0 / math.sqrt(2.0 * math.pi))
  return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense_contract(x, kernel, dimension_numbers, precision, preferred_element_type):
  return jax.lax.dot_general(x, kernel, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


def _dense_contract_fwd(x, kernel, dimension_numbers, precision, preferred_element_type):
  return _dense_contract(x, kernel, dimension_numbers, precision, preferred_element_type), (
      x, kernel)


def _dense_contract_bwd(dimension_numbers, precision, preferred_element_type, res, dy):
  x, kernel = res
  k, n = kernel.shape
  # A cotangent wider than the inputs (preferred_element_type) is kept at its precision, as
  # autodiff does: the operands are promoted to a common dtype, never the cotangent rounded down.
  ct = jnp.promote_types(dy.dtype, x.dtype)
  dy = dy.astype(ct)
  # dx = dy @ kernel^T (as autodiff); dkernel = x^T @ dy contracting over all leading dims of x
  # and dy, written with x first so that the result comes out as (k, n) directly.
  dx = jax.lax.dot_general(dy, kernel.astype(ct), (((dy.ndim - 1,), (1,)), ((), ())),
                           precision=precision, preferred_element_type=preferred_element_type)
  x2, dy2 = x.astype(ct).reshape(-1, k), dy.reshape(-1, n)
  acc = preferred_element_type or jnp.promote_types(kernel.dtype, jnp.float32)
  dkernel = jax.lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())), precision=precision,
                                preferred_element_type=acc)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_dense_contract.defvjp(_dense_contract_fwd, _dense_contract_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """``lax.dot_general`` for ``nn.Dense`` (``lhs[..., k] x kernel[k, n]``), whose VJP computes
  the kernel gradient as ``x^T dy`` with ``x`` first. Same values as autodiff.

  Why: for activations of rank > 2 JAX's transpose rule of ``x @ W`` forms the kernel gradient
  as ``(dy^T x)^T``. XLA CPU folds the outer transpose into the dot by materialising ``dy``
  transposed, which, when ``dy`` is a fusion (the LayerScale / GELU / bias backward), computes
  that fusion a second time in the transposed layout. ``python scripts/benchmark_gemm.py
  --repeats=5`` (2-core CPU, 2026-11-27; DeiT-S shapes, B=32, N=197, rows 'bwd-ad' and 'bwd'):
  a Dense layer's whole backward takes 107.6 -> 76.8 ms (fc1), 84.9 -> 80.7 (fc2),
  81.8 -> 62.4 (qkv), 24.9 -> 21.6 (proj); ``scripts/benchmark_dense_vjp.py`` times whole train
  steps with and without it. Other backends use plain ``lax.dot_general`` (see
  :func:`dense_kwargs`). Reverse mode only (a ``custom_vjp``), as the fused attention and GELU.
  Under ``jax.checkpoint`` with a saving policy (e.g. ``dots_with_no_batch_dims_saveable``) the
  contraction is inside the custom VJP, so the policy does not see it and it is recomputed; the
  models' ``remat`` uses the default policy (save nothing), which is unaffected.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  if (tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or lb or rb or rhs.ndim != 2):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  return _dense_contract(lhs, rhs, ((tuple(lc), tuple(rc)), ((), ())), precision,
                         preferred_element_type)


def dense_kwargs() -> dict:
  """Extra ``nn.Dense`` arguments of the models' linear layers: :func:`dense_dot_general` on the
  CPU backend (where it was measured to help), nothing elsewhere. Decided by the default backend
  when the model is traced; either choice gives the same values."""
  return {"dot_general": dense_dot_general} if jax.default_backend() == "cpu" else {}


def dense_matmul(x, kernel):
  """``x[..., k] @ kernel[k, n]`` for layers that hold their own kernel (1x1 convolutions written
  as products), with the :func:`dense_dot_general` backward on CPU."""
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  return dense_kwargs().get("dot_general", jax.lax.dot_general)(x, kernel, dims)


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
                                     bias_init=nn.initializers.zeros, name=name, **dense_kwargs())
    x = dense(self.hidden_dim, "fc1")(x)
    x = gelu_exact(x)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = dense(out_dim, "fc2")(x)
    return nn.Dropout(self.dropout)(x, deterministic=deterministic)


def _split_heads(qkv, num_heads):
  """(b, n, 3 * d) -> q, k, v, each (b, h, n, head_dim)."""
  b, n, three_d = qkv.shape
  t = qkv.reshape(b, n, 3, num_heads, three_d // (3 * num_heads)).transpose(2, 0, 3, 1, 4)
  return t[0], t[1], t[2]


def _merge_heads(o):
  """(b, h, n, head_dim) -> (b, n, h * head_dim)."""
  b, h, n, hd = o.shape
  return o.transpose(0, 2, 1, 3).reshape(b, n, h * hd)


def _attention_probs(q, k):
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  s = s - jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s)
  return e / jnp.sum(e, axis=-1, keepdims=True)  # float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fused_self_attention(qkv, num_heads):
  """softmax(q k^T / sqrt(head_dim)) v from the fused (b, n, 3 * d) qkv, returning (b, n, d).

  Custom VJP over the whole head split -> attention -> head merge, for two reasons:
  * The softmax backward ``ds = p * (dp - rowsum(dp * p))`` uses ``rowsum(dp * p) =
    rowsum(do * o)``, a reduction over (N, head_dim) instead of (N, N), so the (N, N) part of
    the backward is one elementwise pass between the batched matmuls.
  * dq, dk, dv are written straight into the (b, n, 3 * d) gradient of qkv by one
    concatenate+transpose. Autodiff of the head split instead scattered each of them into a
    zero-padded (3, b, h, n, head_dim) buffer, summed those and transposed again (DeiT-S, B=32,
    2 CPU cores: ~28 ms -> ~12 ms of copies per block backward).
  """
  return _fused_self_attention_fwd(qkv, num_heads)[0]


def _fused_self_attention_fwd(qkv, num_heads):
  q, k, v = _split_heads(qkv, num_heads)
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # scale the (N, d) queries, not (N, N) logits
  p = _attention_probs(q, k).astype(v.dtype)
  o = jnp.einsum("bhqk,bhkd->bhqd", p, v)
  return _merge_heads(o), (q, k, v, p, o)


def _fused_self_attention_bwd(num_heads, res, g):
  q, k, v, p, o = res
  b, h, n, hd = q.shape
  do = g.reshape(b, n, h, hd).transpose(0, 2, 1, 3)
  dv = jnp.einsum("bhqk,bhqd->bhkd", p, do)
  dp = jnp.einsum("bhqd,bhkd->bhqk", do, v, preferred_element_type=jnp.float32)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  ds = (p.astype(jnp.float32) * (dp - delta)).astype(q.dtype)
  dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k) * jnp.asarray(hd ** -0.5, q.dtype)
  dk = jnp.einsum("bhqk,bhqd->bhkd", ds, q)  # q is already scaled
  dqkv = jnp.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4)  # (b, n, 3, h, hd)
  return (dqkv.reshape(b, n, 3 * h * hd),)


_fused_self_attention.defvjp(_fused_self_attention_fwd, _fused_self_attention_bwd)


ATTENTION_IMPLEMENTATIONS = ("bhnd", "xla", "cudnn")


def default_attention_implementation(dropout: bool = False) -> str:
  """What ``self_attention(..., implementation=None)`` runs ('cudnn' is never the default: see
  :func:`self_attention`)."""
  if dropout or jax.default_backend() == "cpu":
    return "bhnd"
  return "xla"


def self_attention(qkv, num_heads: int, dropout_fn: Optional[Callable] = None,
                   implementation: Optional[str] = None):
  """Multi-head scaled dot-product self-attention from a fused qkv projection.

  Args:
    qkv: (batch, tokens, 3 * dim), features ordered [q | k | v], each head-major (timm/deit).
    num_heads: number of heads; scale is head_dim ** -0.5.
    dropout_fn: applied to the attention probabilities (attention dropout in training).
    implementation: 'bhnd' (CPU-tuned, below), 'xla' (``jax.nn.dot_product_attention``, XLA's
      fusions), 'cudnn' (the same function's cuDNN flash attention: GPU only, float16/bfloat16
      inputs, no dropout; JAX 0.11.2 refuses odd token counts in training, e.g. ViT's 197) or
      None: 'bhnd' on the CPU backend or with attention dropout, else 'xla'. On one H100
      (DeiT III-S/16, bf16, batch 256) 'xla' trains at 1.22x timm's throughput (SDPA) and infers
      at 1.00x: ``scripts/gpu_check.sh``.

  Returns: (batch, tokens, dim).

  Why 'bhnd' on CPU: with (batch, heads) leading and the contraction dim last, each of the six
  attention matmuls of forward + backward is a plain batched GEMM for the CPU dot library
  (YNNPACK/oneDNN/Eigen), after a single transpose of q, k and v together. In the (b, n, h, d)
  layout of ``jax.nn.dot_product_attention`` XLA inserts transposes around every matmul
  (forward 2x slower for DeiT-S, B=32, 2 cores), and its autodiff softmax backward makes extra
  passes over the (B, H, N, N) tensor; see ``_fused_self_attention``.
  """
  b, n, three_d = qkv.shape
  d = three_d // 3
  h = num_heads
  if d % h:
    raise ValueError(f"embed dim {d} is not divisible by num_heads {h}")
  hd = d // h
  scale = hd ** -0.5
  if implementation is None:
    implementation = default_attention_implementation(dropout_fn is not None)
  if implementation in ("xla", "cudnn"):
    if dropout_fn is not None:
      raise ValueError(f"attention implementation {implementation!r} does not support attention "
                       "dropout: use 'bhnd' (or attn_dropout=0)")
    qkv = qkv.reshape(b, n, 3, h, hd)
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=scale,
                                       implementation=implementation)
    return out.reshape(b, n, d)
  if implementation != "bhnd":
    raise ValueError(f"unknown attention implementation {implementation!r}; valid: "
                     f"{', '.join(ATTENTION_IMPLEMENTATIONS)} or None (pick by backend)")
  if dropout_fn is None:
    return _fused_self_attention(qkv, h)
  # Attention dropout (rare in practice): plain autodiff.
  q, k, v = _split_heads(qkv, h)
  p = _attention_probs(q * jnp.asarray(scale, q.dtype), k).astype(v.dtype)
  return _merge_heads(jnp.einsum("bhqk,bhkd->bhqd", dropout_fn(p), v))


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
  implementation: Optional[str] = None  # see self_attention; None picks by backend

  @nn.compact
  def __call__(self, x, deterministic: bool):
    d = x.shape[-1]
    h = self.num_heads
    qkv = nn.Dense(3 * d, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=self.kernel_init,
                   bias_init=nn.initializers.zeros, name="qkv", **dense_kwargs())(x)
    dropout_fn = None
    if self.attn_dropout > 0.0 and not deterministic:
      dropout_fn = lambda p: nn.Dropout(self.attn_dropout)(p, deterministic=False)
    out = self_attention(qkv, h, dropout_fn, self.implementation)
    out = nn.Dense(d, dtype=self.dtype, kernel_init=self.kernel_init,
                   bias_init=nn.initializers.zeros, name="proj", **dense_kwargs())(out)
    return nn.Dropout(self.proj_dropout)(out, deterministic=deterministic)


class LayerScaleBlock(nn.Module):
  """Pre-norm transformer block, optionally with LayerScale (DeiT III / CaiT ``gamma_1/2``).

  x = x + DropPath(gamma_1 * Attn(LN(x)));  x = x + DropPath(gamma_2 * MLP(LN(x))).
  ``layerscale_init=None`` gives the plain ViT/DeiT block; ``attn_cls`` replaces the attention
  (same constructor as :class:`Attention`; CaiT passes its talking-heads attention).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  layerscale_init: Optional[float] = 1e-4
  drop_path: float = 0.0
  dropout: float = 0.0
  attn_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  attn_cls: Any = None  # None: Attention
  attn_implementation: Optional[str] = None  # Attention's implementation (None: by backend)

  @nn.compact
  def __call__(self, x, deterministic: bool):
    d = x.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)

    def scale(y, name):
      if self.layerscale_init is None:
        return y
      gamma = self.param(name, nn.initializers.constant(self.layerscale_init), (d,), jnp.float32)
      return y * gamma.astype(y.dtype)

    if self.attn_cls is not None and self.attn_implementation is not None:
      raise ValueError("attn_implementation applies to the default Attention only; configure "
                       f"{getattr(self.attn_cls, '__name__', self.attn_cls)} itself")
    if self.attn_cls is None:
      attn = Attention(self.num_heads, self.qkv_bias, self.attn_dropout, self.dropout,
                       dtype=self.dtype, implementation=self.attn_implementation, name="attn")
    else:
      attn = self.attn_cls(self.num_heads, self.qkv_bias, self.attn_dropout, self.dropout,
                           dtype=self.dtype, name="attn")
    y = attn(norm("norm1")(x), deterministic)
    x = x + DropPath(self.drop_path)(scale(y, "gamma_1"), deterministic)
    y = Mlp(int(d * self.mlp_ratio), dropout=self.dropout, dtype=self.dtype,
            name="mlp")(norm("norm2")(x), deterministic)
    x = x + DropPath(self.drop_path)(scale(y, "gamma_2"), deterministic)
    return x


def check_patch_grid(images, grid, img_size: int, patch_size: int, stem_stride: int = 1):
  """Raises a one-line error when ``images`` do not give the grid the model was built for
  (``stem_stride``: the downsampling of a padded convolutional stem before the patches)."""
  expected = (-(-img_size // stem_stride) // patch_size) ** 2
  if grid[0] * grid[1] != expected:
    raise ValueError(
        f"input {images.shape[1]}x{images.shape[2]} gives {grid[0] * grid[1]} patches but the "
        f"model was built for img_size={img_size} ({expected} patches); create the model with "
        f"img_size={images.shape[1]} (and resample the position embedding of a checkpoint)")


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
