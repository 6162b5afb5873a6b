"""Heads that sit on a backbone's pooled feature or feature map.

* ``LinearHead``: linear classifier / linear probe (optionally BN without affine before it).
* ``ProjectionMLP``: contrastive projection heads: SimCLR v1 (2 layers, ``use_bn=False``), SimCLR
  v2 / ConRec (3 layers, BN everywhere, no bias before BN, last BN without beta), SimSiam /
  CAMtrast projector and predictor (see the class docstring).
* ``AttentionPool``: ConRec's attention-weighted pooling (Eq. 4), usable on any feature map.

All take ``train`` (BatchNorm uses batch statistics and needs ``mutable=['batch_stats']`` then).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from visrep_jax.models import layers
from visrep_jax.models.resnet import BatchNorm, Conv2d, conv_bn

Dtype = Any


def _dense_init(init_std: Optional[float]) -> Callable:
  if init_std is None:
    return layers.torch_conv_kernel_init()  # torch.nn.Linear default
  if init_std == 0.0:
    return nn.initializers.zeros
  return nn.initializers.normal(init_std)


def global_avg_pool(x):
  """(B, h, w, C) -> (B, C), accumulated in float32."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class LinearHead(nn.Module):
  """[BN (no affine)] -> dropout -> Dense. ``init_std``: None = PyTorch default, 0.0 = zeros
  (SimCLR linear eval), > 0 = N(0, std). ``use_bn``: MAE-style linear probing."""
  num_classes: int
  init_std: Optional[float] = None
  use_bn: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.use_bn:
      x = BatchNorm(x.shape[-1], use_scale=False, use_bias=False, epsilon=1e-6, dtype=self.dtype,
                    name="bn")(x, train)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    bias_init = (layers.torch_conv_bias_init(x.shape[-1]) if self.init_std is None
                 else nn.initializers.zeros)
    y = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_dense_init(self.init_std),
                 bias_init=bias_init, name="fc")(x)
    return y.astype(jnp.float32)


class ProjectionMLP(nn.Module):
  """``num_layers`` x (Dense -> [BN] -> ReLU), the last layer without ReLU.

  Defaults = SimCLR v2 (``tf2/model.py::ProjectionHead``) and ConRec: 3 layers, hidden width =
  input width, 128 outputs, N(0, 0.01) init, BN after every Dense (momentum 0.9, eps 1e-5), no
  Dense bias where a BN follows, the last BN without beta (``center=False``).
  Other heads:
    SimCLR v1 (paper): ``num_layers=2, hidden_dim=2048, use_bn=False``.
    SimSiam/CAMtrast projector: ``num_layers=3, hidden_dim=2048, out_dim=2048,
      last_bn_scale=False, last_bias=True, init_std=None``.
    SimSiam predictor: ``num_layers=2, hidden_dim=512, out_dim=2048, last_bn=False,
      init_std=None``.
  Names: ``fc_{i}`` and ``bn_{i}``. ``return_all=True`` returns every layer's output (SimCLR
  fine-tunes from a hidden projection layer).
  """
  num_layers: int = 3
  hidden_dim: Optional[int] = None  # None: the input width
  out_dim: int = 128
  use_bn: bool = True
  last_bn: Optional[bool] = None    # None: same as use_bn
  last_bn_scale: bool = True
  last_bn_center: bool = False
  last_bias: Optional[bool] = None  # None: bias iff no BN follows
  init_std: Optional[float] = 0.01  # None: PyTorch's Linear default
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, return_all: bool = False):
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
    hidden = self.hidden_dim or x.shape[-1]
    outs = []
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      bn = (self.use_bn if self.last_bn is None else self.last_bn) if last else self.use_bn
      bias = (not bn) if (not last or self.last_bias is None) else self.last_bias
      dim = self.out_dim if last else hidden
      x = nn.Dense(dim, use_bias=bias, dtype=self.dtype, kernel_init=_dense_init(self.init_std),
                   bias_init=nn.initializers.zeros, name=f"fc_{i}")(x)
      if bn:
        x = BatchNorm(dim, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                      use_scale=self.last_bn_scale if last else True,
                      use_bias=self.last_bn_center if last else True,
                      dtype=self.dtype, name=f"bn_{i}")(x, train)
      if not last:
        x = nn.relu(x)
      outs.append(x)
    return outs if return_all else x


class AttentionPool(nn.Module):
  """ConRec attention-weighted pooling (Eq. 4): a(phi) = GAP(A * phi) / GAP(A).

  The attention map A (B, h, w, 1) in (0, 1) comes from dropout (train only) -> 3 x (1x1 conv ->
  BN -> ReLU) with f/2, f/4, f/8 filters -> 1x1 conv with one filter -> sigmoid, as in the
  official Keras code; its BN layers have Keras' defaults (momentum 0.99, epsilon 1e-3) and the
  convs Keras' Glorot-uniform kernels with zero biases. The frozen all-ones 1x1 conv the Keras
  code uses to broadcast A over the f channels is a broadcast here (no variables), so f = 512
  gives 174,337 variables (params + BN statistics).
  Returns ``(pooled (B, f) float32, attention (B, h, w, 1))``.
  """
  hidden: Optional[Sequence[int]] = None  # None: (f // 2, f // 4, f // 8)
  dropout: float = 0.5
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, phi, train: bool = False):
    f = phi.shape[-1]
    hidden = self.hidden if self.hidden is not None else (f // 2, f // 4, f // 8)
    a = nn.Dropout(self.dropout)(phi, deterministic=not train)
    init = dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros,
                use_bias=True, dtype=self.dtype)
    for i, h in enumerate(hidden):
      a = conv_bn(a, Conv2d(h, 1, **init, name=f"conv_{i}"),
                  BatchNorm(h, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                            dtype=self.dtype, name=f"bn_{i}"), train)
      a = nn.relu(a)
    a = Conv2d(1, 1, **init, name="conv_out")(a)
    a = jax.nn.sigmoid(a.astype(jnp.float32))
    phi32 = phi.astype(jnp.float32)
    num = jnp.einsum("bhwc,bhw->bc", phi32, a[..., 0])
    pooled = num / jnp.sum(a, axis=(1, 2))
    return pooled, a.astype(self.dtype)
