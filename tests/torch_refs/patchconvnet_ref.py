"""PyTorch reference of PatchConvNet, written from a reading of facebookresearch/deit
``patchconvnet_models.py`` (PatchConvNet is not in timm).

Module and attribute names are those of the official file, so ``state_dict()`` has exactly the
official checkpoint keys (``patch_embed.proj.0.0.weight``, ``blocks.i.attn.qkv_pos.4.conv_reduce``,
``blocks_token_only.0.attn.q`` ...). The squeeze-excite is timm's ``SqueezeExcite`` as in the
official code. Only the single-class-token model is implemented (not ``S60_multi``).
Used by tests/test_models_patchconvnet.py and by ``scripts/benchmark.py --torch_ref``.
"""

from __future__ import annotations

import torch
from torch import nn
try:  # timm >= 0.9
  from timm.layers import DropPath
  from timm.models._efficientnet_blocks import SqueezeExcite
except ImportError:  # older timm, as the official code imports them
  from timm.models.layers import DropPath
  from timm.models.efficientnet_blocks import SqueezeExcite


def _norm(dim):
  return nn.LayerNorm(dim, eps=1e-6)


class FeedForward(nn.Module):
  """fc1 -> GELU -> dropout -> fc2 -> dropout (keys ``fc1``, ``fc2``)."""

  def __init__(self, dim, hidden, drop=0.0):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)
    self.drop = nn.Dropout(drop)

  def forward(self, x):
    return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ClassTokenAttention(nn.Module):
  """Learned aggregation: row 0 (the class token) queries all rows; separate q, k, v, proj."""

  def __init__(self, dim, num_heads=1, qkv_bias=True, attn_drop=0.0, proj_drop=0.0):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.q = nn.Linear(dim, dim, bias=qkv_bias)
    self.k = nn.Linear(dim, dim, bias=qkv_bias)
    self.v = nn.Linear(dim, dim, bias=qkv_bias)
    self.attn_drop = nn.Dropout(attn_drop)
    self.proj = nn.Linear(dim, dim)
    self.proj_drop = nn.Dropout(proj_drop)

  def forward(self, u):
    b, n, c = u.shape
    h = self.num_heads
    split = lambda t: t.view(b, -1, h, c // h).transpose(1, 2)  # (b, h, tokens, hd)
    q = split(self.q(u[:, :1])) * self.scale
    k, v = split(self.k(u)), split(self.v(u))
    weights = self.attn_drop(torch.softmax(q @ k.transpose(-1, -2), dim=-1))
    pooled = (weights @ v).transpose(1, 2).reshape(b, 1, c)
    return self.proj_drop(self.proj(pooled))


class PoolingBlock(nn.Module):
  """Class-attention block: updates only the class token."""

  def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, init_values, drop=0.0, attn_drop=0.0):
    super().__init__()
    self.norm1 = _norm(dim)
    self.attn = ClassTokenAttention(dim, num_heads, qkv_bias, attn_drop, drop)
    self.norm2 = _norm(dim)
    self.mlp = FeedForward(dim, int(dim * mlp_ratio), drop)
    self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
    self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))

  def forward(self, x, cls):
    cls = cls + self.gamma_1 * self.attn(self.norm1(torch.cat([cls, x], dim=1)))
    return cls + self.gamma_2 * self.mlp(self.norm2(cls))


class ConvMixer(nn.Module):
  """1x1 conv, GELU, depthwise 3x3, GELU, squeeze-excite, 1x1 conv on (B, N, C) tokens
  viewed as a square (B, C, H, W) map (Sequential ``qkv_pos``)."""

  def __init__(self, dim):
    super().__init__()
    self.qkv_pos = nn.Sequential(
        nn.Conv2d(dim, dim, 1), nn.GELU(),
        nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.GELU(),
        SqueezeExcite(dim, rd_ratio=0.25),
        nn.Conv2d(dim, dim, 1))

  def forward(self, x):
    b, n, c = x.shape
    side = int(round(n ** 0.5))
    y = self.qkv_pos(x.transpose(1, 2).reshape(b, c, side, side))
    return y.flatten(2).transpose(1, 2)


class TrunkBlock(nn.Module):

  def __init__(self, dim, drop_path, init_values):
    super().__init__()
    self.norm1 = _norm(dim)
    self.attn = ConvMixer(dim)
    self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
    self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))

  def forward(self, x):
    return x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))


class ConvStem(nn.Module):
  """Four 3x3 stride-2 convs without bias, GELU between; each conv in its own Sequential."""

  def __init__(self, in_chans, dim):
    super().__init__()
    widths = [in_chans, dim // 8, dim // 4, dim // 2, dim]
    mods = []
    for i in range(4):
      if i:
        mods.append(nn.GELU())
      mods.append(nn.Sequential(nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1, bias=False)))
    self.proj = nn.Sequential(*mods)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class PatchConvnetRef(nn.Module):

  def __init__(self, embed_dim=384, depth=60, num_classes=1000, in_chans=3, num_heads=1,
               qkv_bias=True, init_scale=1e-4, mlp_ratio_clstk=3.0, drop_rate=0.0,
               attn_drop_rate=0.0, drop_path_rate=0.0, img_size=224):
    super().__init__()
    self.num_classes = num_classes
    self.patch_embed = ConvStem(in_chans, embed_dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.blocks = nn.ModuleList(
        [TrunkBlock(embed_dim, drop_path_rate, init_scale) for _ in range(depth)])
    self.blocks_token_only = nn.ModuleList([
        PoolingBlock(embed_dim, num_heads, mlp_ratio_clstk, qkv_bias, init_scale, drop_rate,
                     attn_drop_rate)])
    self.norm = _norm(embed_dim)
    self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
    nn.init.trunc_normal_(self.cls_token, std=0.02)
    self.apply(self._init)

  @staticmethod
  def _init(m):
    if isinstance(m, nn.Linear):
      nn.init.trunc_normal_(m.weight, std=0.02)
      if m.bias is not None:
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
      nn.init.ones_(m.weight)
      nn.init.zeros_(m.bias)

  def forward_features(self, x):
    x = self.patch_embed(x)
    for blk in self.blocks:
      x = blk(x)
    cls = self.cls_token.expand(x.shape[0], -1, -1)
    for blk in self.blocks_token_only:
      cls = blk(x, cls)
    return self.norm(torch.cat([cls, x], dim=1))[:, 0]

  def forward(self, x):
    return self.head(self.forward_features(x))


_CONFIGS = {
    "S60": dict(embed_dim=384, depth=60, init_scale=1e-4),
    "S120": dict(embed_dim=384, depth=120, init_scale=1e-6),
    "B60": dict(embed_dim=768, depth=60, init_scale=1e-6),
    "B120": dict(embed_dim=768, depth=120, init_scale=1e-6),
    "L60": dict(embed_dim=1024, depth=60, init_scale=1e-6),
    "L120": dict(embed_dim=1024, depth=120, init_scale=1e-6),
}


def create(name: str, **kwargs) -> PatchConvnetRef:
  """``create('S60')`` (or 'patchconvnet_s60'); kwargs override the builder's arguments."""
  key = name.upper().replace("PATCHCONVNET_", "").split("_")[0]
  return PatchConvnetRef(**{**_CONFIGS[key], **kwargs})


def S60(**kw): return create("S60", **kw)  # noqa: E704
def S120(**kw): return create("S120", **kw)  # noqa: E704
def B60(**kw): return create("B60", **kw)  # noqa: E704
def B120(**kw): return create("B120", **kw)  # noqa: E704
def L60(**kw): return create("L60", **kw)  # noqa: E704
def L120(**kw): return create("L120", **kw)  # noqa: E704


def create_test(**kw):
  """The twin of ``models.create('patchconvnet_test')`` (for the benchmark's tests)."""
  return PatchConvnetRef(**{**dict(embed_dim=32, depth=2, init_scale=0.1, num_classes=10), **kw})
