"""ResNet-18/34/50/101 in torchvision's layout (v1.5: the stride is on the 3x3 conv).

Parameter names mirror the torchvision / timm state dicts (``conv1``, ``bn1``, ``layer1_0/conv1``,
``layer2_0/downsample_0``, ``downsample_1``, ``fc``), so their checkpoints load with
``visrep_jax.convert.load_torch_checkpoint``. BatchNorm running statistics live in the
``batch_stats`` collection: ``apply(variables, x, train=True, mutable=['batch_stats'])`` normalises
with batch statistics and returns the updated running averages (under ``jit`` with a sharded
batch the statistics are over the global batch, i.e. synchronised BN).

Eval-mode BN is *not* folded into the convolutions: XLA already fuses the per-channel affine, the
residual add and the ReLU into the one elementwise pass that follows each conv, so folding saved
nothing at batch 32 (2-core CPU, ResNet-50) and, by rescaling all 25M weights on every call, cost
30% at batch 1.

Options: ``replace_stride_with_dilation`` (torchvision; e.g. ``(False, False, True)`` for the
CrossTransformers stride-16 backbone: a 14x14 map at 224px), ``zero_init_last`` (gamma of the
last BN of each residual branch = 0, as timm / SimCLR / Goyal et al.), ``drop_path_rate``
(timm's linear per-block rule), ``dropout`` before ``fc``, ``remat`` per block, ``dtype``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from visrep_jax.models import layers
from visrep_jax.models.zoo import register_model

Dtype = Any

# torchvision / timm: kaiming_normal_(mode='fan_out', nonlinearity='relu') for every conv.
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv2d(nn.Module):
  """``torch.nn.Conv2d`` in NHWC: symmetric integer padding, dilation, kernel (kh, kw, in, out)."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Callable = he_normal_fan_out
  bias_init: Optional[Callable] = None  # None: PyTorch's U(+-1/sqrt(fan_in))

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    p = self.padding
    if k > 1 and _tiny_output_on_cpu(x.shape, k, self.stride, p, self.dilation):
      y = _conv_as_matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, p,
                          self.dilation)
    else:
      y = jax.lax.conv_general_dilated(
          x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
          ((p, p), (p, p)), rhs_dilation=(self.dilation, self.dilation),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias_init = self.bias_init or layers.torch_conv_bias_init(k * k * x.shape[-1])
      y = y + self.param("bias", bias_init, (self.features,), jnp.float32).astype(self.dtype)
    return y


def _out_size(n, k, stride, pad, dilation):
  return (n + 2 * pad - dilation * (k - 1) - 1) // stride + 1


def _tiny_output_on_cpu(shape, k, stride, pad, dilation) -> bool:
  """XLA's CPU convolution is 10-20x slower than a matmul when the output map is <= 2x2 (the
  last stage of a ResNet on 28-32px images: 0.25 s instead of 0.01 s for a 3x3 512->512 conv at
  batch 128). Such convs run as an explicit patches-times-kernel matmul instead."""
  if jax.default_backend() != "cpu":
    return False
  ho = _out_size(shape[1], k, stride, pad, dilation)
  wo = _out_size(shape[2], k, stride, pad, dilation)
  return ho * wo <= 4


def _live_taps(n, k, stride, pad, dilation):
  """Kernel offsets (along one axis) that read at least one input pixel, not only padding."""
  out = _out_size(n, k, stride, pad, dilation)
  return [i for i in range(k)
          if any(pad <= i * dilation + stride * r < pad + n for r in range(out))]


def _conv_as_matmul(x, kernel, stride, pad, dilation):
  """The same convolution as ``conv_general_dilated`` (NHWC, HWIO), as im2col + one matmul.

  Taps that only ever read the zero padding are left out (exactly: they add 0 to every output
  and get a zero gradient either way). On a 1x1 map a 3x3 conv is then its centre tap alone, and
  a stride-2 3x3 conv from 2x2 to 1x1 uses 4 taps: ResNet-18's last stage on 28px images costs
  ~1/6 of the full 9-tap product. An input with fewer pixels than live taps goes through
  ``_conv_as_dense`` instead.
  """
  k = kernel.shape[0]
  ho = _out_size(x.shape[1], k, stride, pad, dilation)
  wo = _out_size(x.shape[2], k, stride, pad, dilation)
  rows = _live_taps(x.shape[1], k, stride, pad, dilation)
  cols = _live_taps(x.shape[2], k, stride, pad, dilation)
  if not rows or not cols:  # every output sees padding only
    return jnp.zeros(x.shape[:1] + (ho, wo, kernel.shape[-1]), jnp.result_type(x, kernel))
  if x.shape[1] * x.shape[2] < len(rows) * len(cols):
    return _conv_as_dense(x, kernel, stride, pad, dilation, ho, wo)
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  taps = [xp[:, i * dilation:i * dilation + stride * (ho - 1) + 1:stride,
             j * dilation:j * dilation + stride * (wo - 1) + 1:stride, :]
          for i in rows for j in cols]
  patches = jnp.concatenate(taps, axis=-1)  # (B, ho, wo, taps*C), tap-major like HWIO
  if rows == list(range(rows[0], rows[-1] + 1)) and cols == list(range(cols[0], cols[-1] + 1)):
    w = kernel[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
  else:  # padding wider than k // 2 with a stride can leave a dead tap between live ones
    w = kernel[np.ix_(rows, cols)]
  return jnp.dot(patches, w.reshape(-1, kernel.shape[-1]))


def _conv_as_dense(x, kernel, stride, pad, dilation, ho, wo):
  """The convolution as one (H*W*C) x (ho*wo*O) matrix product, the matrix gathered from the
  kernel (zero where an input pixel is outside an output's window). Cheaper than im2col when the
  input has fewer pixels than the live taps: a 3x3 conv on a 2x2 map costs 16 instead of 36
  C x O products per image (ResNet-18's third stage on 28px images)."""
  b, h, w, c = x.shape
  k, o = kernel.shape[0], kernel.shape[-1]
  index = np.full((h, w, ho, wo), k * k)  # k*k: the appended zero tap
  for yo in range(ho):
    for xo in range(wo):
      for i in range(k):
        for j in range(k):
          yi, xi = stride * yo + i * dilation - pad, stride * xo + j * dilation - pad
          if 0 <= yi < h and 0 <= xi < w:
            index[yi, xi, yo, xo] = i * k + j
  taps = jnp.concatenate([kernel.reshape(k * k, c, o), jnp.zeros((1, c, o), kernel.dtype)])
  dense = taps[index.reshape(h * w, ho * wo)]  # (h*w, ho*wo, C, O)
  dense = dense.transpose(0, 2, 1, 3).reshape(h * w * c, ho * wo * o)
  return jnp.dot(x.reshape(b, h * w * c), dense).reshape(b, ho, wo, o)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with PyTorch's semantics (variables as ``nn.BatchNorm``).

  Params ``scale`` / ``bias``, ``batch_stats`` ``mean`` / ``var``. Training normalises with the
  biased batch variance and updates the running variance with the unbiased one, as
  ``torch.nn.BatchNorm2d`` (and Keras' fused BN) do; ``momentum`` is the flax convention
  (running = momentum * running + (1 - momentum) * batch), i.e. torch momentum 0.1 == 0.9 here.
  Statistics are computed in float32 whatever the compute dtype.

  ``mask`` (B,) bool/float, training only: the batch statistics (and the running-statistics
  update) use the masked-in examples only, while every example is normalised with them. Episodic
  few-shot training uses it to keep padding out of the statistics and to normalise every image of
  an episode with the statistics of its support set alone (in training, Meta-Dataset's
  non-transductive BatchNorm; at test time, CrossTransformers' non-EMA ablation).
  """
  num_features: int
  momentum: float = 0.9
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Callable = nn.initializers.ones
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    f = (self.num_features,)
    scale = self.param("scale", self.scale_init, f, jnp.float32) if self.use_scale else None
    bias = self.param("bias", nn.initializers.zeros, f, jnp.float32) if self.use_bias else None
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, f, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, f, jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      x32 = x.astype(jnp.float32)
      if mask is None:
        mean = jnp.mean(x32, axes)
        # One pass over x (E[x^2] - E[x]^2, as flax's default): both sums fuse into one reduction.
        var = jnp.maximum(jnp.mean(x32 * x32, axes) - mean * mean, 0.0)
        n = x.size // x.shape[-1]
      else:
        w = jnp.asarray(mask, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        n = jnp.maximum(jnp.sum(w) * (x.size // (x.shape[0] * x.shape[-1])), 1.0)
        mean = jnp.sum(x32 * w, axes) / n
        var = jnp.maximum(jnp.sum(x32 * x32 * w, axes) / n - mean * mean, 0.0)
      if not self.is_initializing():
        if not self.is_mutable_collection("batch_stats"):
          raise ValueError("train=True updates the BatchNorm running statistics: call "
                           "model.apply(variables, x, train=True, mutable=['batch_stats']) and "
                           "keep the returned batch_stats")
        m = self.momentum
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
        ra_var.value = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(unbiased)
    else:
      mean, var = ra_mean.value, ra_var.value
    # y = x * mul + add, with the per-channel mul/add computed in float32 on (C,) vectors.
    mul = jax.lax.rsqrt(var + self.epsilon)
    if scale is not None:
      mul = mul * scale
    add = -mean * mul
    if bias is not None:
      add = add + bias
    if train:
      return (x.astype(jnp.float32) * mul + add).astype(self.dtype)
    return (x * mul.astype(x.dtype) + add.astype(x.dtype)).astype(self.dtype)


def conv_bn(x, conv: Conv2d, bn: BatchNorm, train: bool, mask=None):
  return bn(conv(x), train, mask)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34). In a dilated stage the first conv of the first block keeps
  the previous dilation (timm's ``first_dilation``)."""
  planes: int
  stride: int = 1
  dilation: int = 1
  first_dilation: int = 1
  downsample: bool = False
  drop_path: float = 0.0
  zero_init_last: bool = True
  dtype: Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    p, d0, d = self.planes, self.first_dilation, self.dilation
    bn = functools.partial(BatchNorm, dtype=self.dtype)
    conv = functools.partial(Conv2d, dtype=self.dtype)
    y = conv_bn(x, conv(p, 3, self.stride, d0, d0, name="conv1"), bn(p, name="bn1"), train,
                mask)
    y = nn.relu(y)
    last_init = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
    y = conv_bn(y, conv(p, 3, 1, d, d, name="conv2"), bn(p, scale_init=last_init, name="bn2"),
                train, mask)
    return _residual(self, x, y, p, train, mask)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4) convs (ResNet-50/101), torchvision v1.5."""
  planes: int
  stride: int = 1
  dilation: int = 1
  first_dilation: int = 1
  downsample: bool = False
  drop_path: float = 0.0
  zero_init_last: bool = True
  dtype: Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    p, d0 = self.planes, self.first_dilation
    out = p * self.expansion
    bn = functools.partial(BatchNorm, dtype=self.dtype)
    conv = functools.partial(Conv2d, dtype=self.dtype)
    y = nn.relu(conv_bn(x, conv(p, 1, name="conv1"), bn(p, name="bn1"), train, mask))
    y = nn.relu(conv_bn(y, conv(p, 3, self.stride, d0, d0, name="conv2"), bn(p, name="bn2"),
                        train, mask))
    last_init = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
    y = conv_bn(y, conv(out, 1, name="conv3"), bn(out, scale_init=last_init, name="bn3"), train,
                mask)
    return _residual(self, x, y, out, train, mask)


def _residual(block, x, y, out_features, train, mask=None):
  if block.downsample:  # torchvision: Sequential(conv1x1(stride), BN)
    shortcut = conv_bn(x, Conv2d(out_features, 1, block.stride, dtype=block.dtype,
                                 name="downsample_0"),
                       BatchNorm(out_features, dtype=block.dtype, name="downsample_1"), train,
                       mask)
  else:
    shortcut = x.astype(block.dtype)
  y = layers.DropPath(block.drop_path)(y, deterministic=not train)
  return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """torchvision ResNet; ``(logits, out)`` with ``out['feature_map']`` = layer4 output (B,h,w,C),
  ``out['pre_logits']`` its global average, ``out['stages']`` the four stage outputs (C2-C5)."""
  block: str = "bottleneck"             # 'basic' (ResNet-18/34) or 'bottleneck' (50/101/152)
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  num_classes: int = 1000               # 0: no fc, logits = pre_logits (feature extractor)
  img_size: int = 224                   # nominal resolution (any input size works)
  width: int = 64
  replace_stride_with_dilation: Sequence[bool] = (False, False, False)
  downsample_first_stage: bool = False  # 1x1 projection shortcut also in layer1 (meta-dataset)
  # Stem: torchvision's 7x7/2 conv + 3x3/2 max pool. Small images (CIFAR, Fashion-MNIST) usually
  # use stem_kernel=3, stem_stride=1 with (28x28 -> 14x14) or without (CIFAR ResNets) the pool.
  stem_kernel: int = 7
  stem_stride: int = 2
  stem_pool: bool = True
  zero_init_last: bool = True
  drop_path_rate: float = 0.0
  dropout: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False, bn_mask=None):
    """``bn_mask`` (B,): training-mode BatchNorm statistics from these examples only (see
    :class:`BatchNorm`); None: the whole batch."""
    if images.ndim != 4:
      raise ValueError(f"expected NHWC images, got shape {images.shape}")
    if self.block not in ("basic", "bottleneck"):
      raise ValueError(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
    if len(self.replace_stride_with_dilation) != 3:
      raise ValueError("replace_stride_with_dilation must have 3 entries (layer2, layer3, "
                       f"layer4), got {self.replace_stride_with_dilation}")
    block_cls = BasicBlock if self.block == "basic" else Bottleneck
    expansion = block_cls.expansion
    if self.remat:
      block_cls = nn.remat(block_cls, static_argnums=(2,))

    x = images.astype(self.dtype)
    if self.stem_kernel < 1 or self.stem_kernel % 2 == 0 or self.stem_stride < 1:
      raise ValueError(f"stem_kernel must be odd and >= 1 and stem_stride >= 1, got "
                       f"{self.stem_kernel}, {self.stem_stride}")
    x = conv_bn(x, Conv2d(self.width, self.stem_kernel, self.stem_stride, self.stem_kernel // 2,
                          dtype=self.dtype, name="conv1"),
                BatchNorm(self.width, dtype=self.dtype, name="bn1"), train, bn_mask)
    x = nn.relu(x)
    if self.stem_pool:
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))

    total = sum(self.stage_sizes)
    idx = 0
    dilation = 1
    in_features = self.width
    stages = []
    for s, n_blocks in enumerate(self.stage_sizes):
      planes = self.width * 2 ** s
      stride = 1 if s == 0 else 2
      prev_dilation = dilation
      if s > 0 and self.replace_stride_with_dilation[s - 1]:
        dilation *= stride
        stride = 1
      for b in range(n_blocks):
        first = b == 0
        needs_proj = first and (stride != 1 or in_features != planes * expansion
                                or (s == 0 and self.downsample_first_stage))
        dp = self.drop_path_rate * idx / max(total - 1, 1)
        x = block_cls(planes=planes, stride=stride if first else 1, dilation=dilation,
                      first_dilation=prev_dilation if first else dilation,
                      downsample=needs_proj, drop_path=dp, zero_init_last=self.zero_init_last,
                      dtype=self.dtype, name=f"layer{s + 1}_{b}")(x, train, bn_mask)
        in_features = planes * expansion
        idx += 1
      stages.append(x)

    pre_logits = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    out = {"feature_map": x, "stages": tuple(stages), "pre_logits": pre_logits}
    y = nn.Dropout(self.dropout)(pre_logits, deterministic=not train)
    if self.num_classes > 0:
      logits = nn.Dense(self.num_classes, dtype=self.dtype,
                        kernel_init=layers.torch_conv_kernel_init(),
                        bias_init=layers.torch_conv_bias_init(in_features), name="fc")(y)
    else:
      logits = y
    out["logits"] = logits
    return logits.astype(jnp.float32), out


# Params (M); GFLOPs (multiply-adds at 224; He et al. 2016 Table 1 counts 3.8 / 7.6 for the v1
# ResNet-50/101, the v1.5 layout here costs 4.1 / 7.8 as in thesis Table 5.1 and timm); top-1 of
# the torchvision/timm weights in the DeiT paper (thesis Table 3.5), ResNet-34: CrossTransformers.
_RESNETS = {
    "resnet18": dict(block="basic", stage_sizes=(2, 2, 2, 2),
                     _meta=dict(params_m=11.7, gflops=1.8, top1=69.8,
                                source="He et al. Table 1; thesis Table 3.5")),
    "resnet34": dict(block="basic", stage_sizes=(3, 4, 6, 3),
                     _meta=dict(params_m=21.8, gflops=3.6, top1=73.0,
                                source="He et al. Table 1; CrossTransformers paper L432")),
    "resnet50": dict(block="bottleneck", stage_sizes=(3, 4, 6, 3),
                     _meta=dict(params_m=25.6, gflops=4.1, top1=76.2,
                                source="thesis Tables 3.5, 5.1")),
    "resnet101": dict(block="bottleneck", stage_sizes=(3, 4, 23, 3),
                      _meta=dict(params_m=44.5, gflops=7.8, top1=77.4,
                                 source="thesis Table 3.5; v1.5 FLOPs as timm")),
}
for _name, _kw in _RESNETS.items():
  register_model(_name, ResNet, img_size=224, **_kw)
