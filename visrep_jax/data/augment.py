"""RandAugment and random erasing as stateless tf ops, with timm's semantics.

``randaugment`` follows timm's ``rand_augment_transform`` (``timm/data/auto_augment.py``):
the config string (``rand-m9-mstd0.5-inc1``), the transform lists, ``n`` ops drawn with
replacement, each applied with probability ``p``, magnitude ~ N(m, mstd) clipped to
[0, mmax], a random sign for signed ops and the same level -> argument mappings. Each op gives
the pixels PIL gives (colour ops are exact; the affine ops sample like PIL's
``Image.transform``: pixel centres, a fill colour for points that map outside the image,
edge-clamped neighbours, PIL's bilinear and a = -1 bicubic kernels, truncation to uint8).
Images are quantised to uint8 first, since timm works on PIL images.

Two documented differences from timm on new Pillow releases: Posterize that keeps 0 bits
gives a black image (Pillow >= 10 raises instead, so timm crashes on ~2% of its draws at
m9-mstd0.5), and 1-channel images work with any fill (Pillow rejects a 3-value fill for 'L').

``random_erasing`` is timm's ``RandomErasing`` applied to a normalised HxWxC image.
"""

from __future__ import annotations

import math
import re
from typing import Dict, NamedTuple, Sequence, Tuple

from visrep_jax.data import preprocess, tf_host

_LEVEL_DENOM = 10.0

# timm's _RAND_TRANSFORMS (inc0) and _RAND_INCREASING_TRANSFORMS (inc1), in timm's order.
RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel")
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
INTERPOLATIONS = ("bilinear", "bicubic", "random")


class RandAugmentConfig(NamedTuple):
  magnitude: float = 10.0
  num_layers: int = 2
  prob: float = 0.5
  magnitude_std: float = 0.0   # inf: magnitude ~ U(0, m)
  magnitude_max: float = 10.0
  increasing: bool = False

  @property
  def transforms(self) -> Tuple[str, ...]:
    return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


def parse_rand_config(spec: str) -> RandAugmentConfig:
  """timm's RandAugment string: ``rand`` then '-'-separated ``m<int> n<int> p<float>
  mstd<float> mmax<int> inc<0|1>`` in any order (timm's defaults m10 n2 p0.5 mstd0 inc0)."""
  valid = "m<int>, n<int>, p<float>, mstd<float>, mmax<int>, inc<0|1>"
  parts = spec.split("-") if isinstance(spec, str) else []
  if not parts or parts[0] != "rand":
    raise ValueError(f"randaugment: spec must start with 'rand', like 'rand-m9-mstd0.5-inc1'; "
                     f"got {spec!r}")
  cfg = RandAugmentConfig()._asdict()
  for part in parts[1:]:
    m = re.fullmatch(r"([a-z]+)(\d.*)", part)
    if not m or m.group(1) not in ("m", "n", "p", "mstd", "mmax", "inc"):
      raise ValueError(f"randaugment: bad section {part!r} in {spec!r}; valid sections: {valid} "
                       "(timm's transform sets 't...' are not supported)")
    key, val = m.groups()
    try:
      if key == "mstd":
        std = float(val)
        cfg["magnitude_std"] = math.inf if std > 100 else std  # timm: > 100 means uniform
      elif key == "mmax":
        cfg["magnitude_max"] = float(int(val) or _LEVEL_DENOM)  # timm: `mmax or 10`
      elif key == "inc":
        cfg["increasing"] = bool(int(val))
      elif key == "m":
        cfg["magnitude"] = float(int(val))
      elif key == "n":
        cfg["num_layers"] = int(val)
      else:
        cfg["prob"] = float(val)
    except ValueError:
      raise ValueError(f"randaugment: bad value in section {part!r} of {spec!r}; valid sections: "
                       f"{valid}") from None
  if not 0.0 <= cfg["prob"] <= 1.0:
    raise ValueError(f"randaugment: p must be in [0, 1], got {cfg['prob']} in {spec!r}")
  return RandAugmentConfig(**cfg)


def fill_values(fill, channels: int) -> Tuple[float, ...]:
  """timm's ``img_mean``: ``min(255, round(255 * mean))`` of a normalisation preset, or explicit
  values (1 or ``channels`` of them). A 3-value fill on a 1-channel image becomes its grey level
  (ITU-R 601-2, as PIL's convert('L'))."""
  if isinstance(fill, str):
    if fill not in preprocess.MEAN_STD:
      raise ValueError(f"randaugment: unknown fill preset {fill!r}; valid: "
                       f"{sorted(preprocess.MEAN_STD)} or 1 or 3 numbers in [0, 255]")
    vals = tuple(float(min(255, round(255 * x))) for x in preprocess.MEAN_STD[fill][0])
  else:
    vals = tuple(float(v) for v in (fill if isinstance(fill, (list, tuple)) else [fill]))
    if not vals or any(not 0 <= v <= 255 for v in vals):
      raise ValueError(f"randaugment: fill must be a preset name or 1 or 3 numbers in [0, 255], "
                       f"got {fill!r}")
  if len(vals) == channels:
    return vals
  if len(vals) == 1:
    return vals * channels
  if len(vals) == 3 and channels == 1:
    r, g, b = vals
    return (float((int(r) * 19595 + int(g) * 38470 + int(b) * 7471 + 0x8000) >> 16),)
  raise ValueError(f"randaugment: fill {fill!r} has {len(vals)} values for a "
                   f"{channels}-channel image")


# ----------------------------------------------------------------------------- colour ops (uint8)


def _to_uint8(img):
  tf = tf_host()
  if img.dtype == tf.uint8:
    return img
  return tf.cast(tf.clip_by_value(tf.round(tf.cast(img, tf.float32)), 0.0, 255.0), tf.uint8)


def _apply_lut(img, lut):
  """``lut``: [256] or [C, 256] int values -> uint8 image (PIL's ``point``, clipped to 8 bits)."""
  tf = tf_host()
  lut = tf.cast(tf.clip_by_value(tf.cast(lut, tf.int64), 0, 255), tf.uint8)
  idx = tf.cast(img, tf.int32)
  if lut.shape.rank == 2:
    idx = idx + tf.range(tf.shape(lut)[0]) * 256
    lut = tf.reshape(lut, [-1])
  return tf.gather(lut, idx)


def _histograms(img):
  """[C, 256] int32 per-channel histograms (PIL ``Image.histogram``)."""
  tf = tf_host()
  c = img.shape[-1]
  idx = tf.cast(img, tf.int32) + tf.range(c) * 256
  return tf.reshape(tf.math.bincount(tf.reshape(idx, [-1]), minlength=256 * c,
                                     maxlength=256 * c), [c, 256])


def _grey(img):
  """PIL ``convert('L')`` of uint8 RGB: (19595 R + 38470 G + 7471 B + 2^15) >> 16, as int32."""
  tf = tf_host()
  x = tf.cast(img, tf.int32)
  if img.shape[-1] == 1:
    return x
  y = x[..., 0:1] * 19595 + x[..., 1:2] * 38470 + x[..., 2:3] * 7471 + 0x8000
  return tf.bitwise.right_shift(y, 16)


def _blend(degenerate, img, factor):
  """PIL ``Image.blend(degenerate, img, factor)``: float32 ``d + f * (i - d)``, clipped,
  truncated to uint8 (``factor`` is a float32 in PIL's C code as here)."""
  tf = tf_host()
  d = tf.cast(degenerate, tf.int32)
  diff = tf.cast(tf.cast(img, tf.int32) - d, tf.float32)
  out = tf.cast(d, tf.float32) + tf.cast(factor, tf.float32) * diff
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)  # cast truncates towards 0


def auto_contrast(img):
  """``ImageOps.autocontrast(img)``: per channel, map [lo, hi] linearly to [0, 255]."""
  tf = tf_host()
  lo = tf.cast(tf.reduce_min(img, axis=[0, 1]), tf.float64)[:, None]
  hi = tf.cast(tf.reduce_max(img, axis=[0, 1]), tf.float64)[:, None]
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  offset = -lo * scale
  ix = tf.range(256, dtype=tf.float64)[None, :]
  lut = tf.floor(ix * scale + offset)  # Python's int() of a value clipped at 0 below
  lut = tf.where(hi > lo, lut, ix)
  return _apply_lut(img, lut)


def equalize(img):
  """``ImageOps.equalize(img)`` per channel, with PIL's integer step arithmetic."""
  tf = tf_host()
  h = _histograms(img)
  total = tf.reduce_sum(h, axis=1, keepdims=True)
  nonzero = h > 0
  last_bin = 255 - tf.argmax(tf.cast(tf.reverse(nonzero, [1]), tf.int32), axis=1,
                             output_type=tf.int32)
  last = tf.gather(h, last_bin, batch_dims=1)[:, None]
  step = (total - last) // 255
  ok = (tf.reduce_sum(tf.cast(nonzero, tf.int32), axis=1, keepdims=True) > 1) & (step > 0)
  safe = tf.maximum(step, 1)
  lut = (safe // 2 + tf.cumsum(h, axis=1, exclusive=True)) // safe
  lut = tf.where(ok, lut, tf.range(256)[None, :])
  return _apply_lut(img, lut)


def invert(img):
  return 255 - img


def posterize(img, bits):
  """Keeps the ``bits`` high bits (0 bits: black, as old Pillow; >= 8: unchanged, as timm)."""
  tf = tf_host()
  bits = tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  mask = tf.cast(256 - tf.bitwise.left_shift(1, 8 - bits), tf.uint8)
  return tf.bitwise.bitwise_and(img, mask)


def solarize(img, threshold):
  """``ImageOps.solarize``: values >= threshold (0..256) are inverted."""
  tf = tf_host()
  t = tf.cast(threshold, tf.int32)
  below = (img < tf.cast(tf.clip_by_value(t, 0, 255), tf.uint8)) | (t > 255)
  return tf.where(below, img, 255 - img)


def solarize_add(img, add, threshold=128):
  """timm ``solarize_add``: values < threshold get ``+add`` (0..255, clipped at 255)."""
  tf = tf_host()
  a = tf.cast(tf.clip_by_value(tf.cast(add, tf.int32), 0, 255), tf.uint8)
  added = tf.minimum(img, 255 - a) + a  # saturating uint8 add
  return tf.where(img < threshold, added, img)


def color(img, factor):
  """``ImageEnhance.Color``: blend with the grey image (identity for 1 channel)."""
  tf = tf_host()
  if img.shape[-1] == 1:
    return img
  return _blend(tf.broadcast_to(_grey(img), tf.shape(img)), img, factor)


def contrast(img, factor):
  """``ImageEnhance.Contrast``: blend with the mean grey level, ``int(mean + 0.5)``."""
  tf = tf_host()
  g = _grey(img)
  mean = (tf.cast(tf.reduce_sum(tf.cast(g, tf.int64)), tf.float64)
          / tf.cast(tf.size(g, out_type=tf.int64), tf.float64))
  level = tf.cast(tf.floor(mean + 0.5), tf.int32)
  return _blend(tf.fill(tf.shape(img), level), img, factor)


def brightness(img, factor):
  """``ImageEnhance.Brightness``: blend with black."""
  tf = tf_host()
  return _blend(tf.zeros_like(img), img, factor)


def _smooth(img):
  """PIL ``ImageFilter.SMOOTH`` (3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded); the
  one-pixel border is left as is, as PIL does."""
  tf = tf_host()
  c = img.shape[-1]
  k = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]])
  k = tf.tile(k[:, :, None, None], [1, 1, c, 1])
  x = tf.cast(img, tf.float32)[None]
  inner = tf.nn.depthwise_conv2d(x, k, [1, 1, 1, 1], "VALID")[0]  # exact integer sums
  inner = tf.floor(inner / 13.0 + 0.5)  # sum/13 is never exactly x.5: this is round()
  inner = tf.pad(inner, [[1, 1], [1, 1], [0, 0]])
  h, w = tf.shape(img)[0], tf.shape(img)[1]
  rows = tf.range(h)[:, None, None]
  cols = tf.range(w)[None, :, None]
  border = (rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)
  return tf.where(border, img, tf.cast(inner, tf.uint8))


def sharpness(img, factor):
  """``ImageEnhance.Sharpness``: blend with the SMOOTH-filtered image."""
  return _blend(_smooth(img), img, factor)


# ------------------------------------------------------------------------------ geometric ops


def _cubic(v1, v2, v3, v4, d):
  """PIL's BICUBIC macro (a = -1 cubic convolution) in Horner form, as in Geometry.c."""
  p2 = -v1 + v3
  p3 = 2.0 * (v1 - v2) + v3 - v4
  p4 = -v1 + v2 - v3 + v4
  return v2 + d * (p2 + d * (p3 + d * p4))


def _linear(v1, v2, d):
  return v1 + (v2 - v1) * d


def _taps(interpolation):
  return (0, 1) if interpolation == "bilinear" else (-1, 0, 1, 2)


def _finish(out, inside, fill):
  """Clip, truncate to uint8 (PIL's (UINT8) cast) and fill the points that fell outside."""
  tf = tf_host()
  out = tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)
  return tf.where(inside[..., None], out, tf.constant([int(f) for f in fill], tf.uint8))


def _check_interpolation(interpolation):
  if interpolation not in ("bilinear", "bicubic"):
    raise ValueError(f"affine: interpolation must be 'bilinear' or 'bicubic', got "
                     f"{interpolation!r}")


def affine(img, matrix, interpolation: str, fill: Sequence[float]):
  """PIL ``img.transform(img.size, Image.AFFINE, matrix, resample, fillcolor=fill)``.

  ``matrix`` (a, b, c, d, e, f) maps the output point (x, y) (pixel centres at +0.5) to the
  input point (a x + b y + c, d x + e y + f). A point outside the input gets ``fill``;
  otherwise PIL's bilinear or bicubic (a = -1) filter with edge-clamped neighbours, in float64,
  truncated to uint8.
  """
  tf = tf_host()
  _check_interpolation(interpolation)
  c = img.shape[-1]
  h, w = tf.shape(img)[0], tf.shape(img)[1]
  hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
  m = _f64(matrix)
  ys = tf.range(hf, dtype=tf.float64)[:, None] + 0.5
  xs = tf.range(wf, dtype=tf.float64)[None, :] + 0.5
  xin = m[0] * xs + m[1] * ys + m[2]
  yin = m[3] * xs + m[4] * ys + m[5]
  inside = (xin >= 0.0) & (xin < wf) & (yin >= 0.0) & (yin < hf)
  xin, yin = xin - 0.5, yin - 0.5
  x0, y0 = tf.floor(xin), tf.floor(yin)
  dx, dy = (xin - x0)[..., None], (yin - y0)[..., None]
  x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
  taps = tf.constant(_taps(interpolation))
  xi = tf.clip_by_value(x0[None] + taps[:, None, None], 0, w - 1)  # [k, H, W]
  yi = tf.clip_by_value(y0[None] + taps[:, None, None], 0, h - 1)
  idx = yi[:, None] * w + xi[None, :]  # [k (rows), k (cols), H, W]
  v = tf.cast(tf.gather(tf.reshape(img, [-1, c]), idx), tf.float64)  # [k, k, H, W, C]
  v = tf.unstack(v, axis=1)  # k arrays [k (rows), H, W, C], one per column tap
  if interpolation == "bilinear":
    rows = tf.unstack(_linear(v[0], v[1], dx), axis=0)
    out = _linear(rows[0], rows[1], dy)
  else:
    rows = tf.unstack(_cubic(v[0], v[1], v[2], v[3], dx), axis=0)
    out = _cubic(rows[0], rows[1], rows[2], rows[3], dy)
  return _finish(out, inside, fill)


def shift_rows(img, coord, interpolation: str, fill: Sequence[float]):
  """The affine transforms that move pixels along rows only (ShearX, TranslateX): ``coord``
  [H, W] (or [1, W]) is PIL's input x coordinate of each output pixel centre, the y coordinate
  being the pixel's own. PIL's 2-D filter then reduces exactly to this 1-D one (its vertical
  weight is exactly 0), so the result is the same as ``affine`` at a quarter of the cost."""
  tf = tf_host()
  _check_interpolation(interpolation)
  w = tf.shape(img)[1]
  inside = (coord >= 0.0) & (coord < tf.cast(w, tf.float64))
  xin = coord - 0.5
  x0 = tf.floor(xin)
  d = (xin - x0)[..., None]
  x0 = tf.cast(x0, tf.int32)
  per_row = coord.shape[0] != 1
  x = tf.cast(img, tf.float64)
  v = []
  for t in _taps(interpolation):
    idx = tf.clip_by_value(x0 + t, 0, w - 1)
    v.append(tf.gather(x, idx, axis=1, batch_dims=1) if per_row else tf.gather(x, idx[0], axis=1))
  out = _linear(*v, d) if interpolation == "bilinear" else _cubic(*v, d)
  inside = tf.broadcast_to(inside, tf.shape(img)[:2])
  return _finish(out, inside, fill)


def rotate_matrix(degrees, height, width):
  """PIL ``Image.rotate(degrees)`` (about the centre, same size) as an output->input affine."""
  tf = tf_host()
  a = -_f64(degrees) * (math.pi / 180.0)
  # PIL rounds the matrix entries to 15 decimals: round(math.cos(angle), 15).
  cos = tf.round(tf.cos(a) * 1e15) / 1e15
  sin = tf.round(tf.sin(a) * 1e15) / 1e15
  cx = tf.cast(width, tf.float64) / 2.0
  cy = tf.cast(height, tf.float64) / 2.0
  c = cos * -cx + sin * -cy + cx
  f = -sin * -cx + cos * -cy + cy
  return tf.stack([cos, sin, c, -sin, cos, f])


# ------------------------------------------------------------------------------------ RandAugment


def _level_args(name: str, magnitude, negate, translate_pct: float):
  """timm's LEVEL_TO_ARG for ``name`` (float64 magnitude; ``negate`` a bool tensor)."""
  tf = tf_host()
  lvl = _f64(magnitude) / _LEVEL_DENOM
  sign = tf.where(negate, tf.constant(-1.0, tf.float64), tf.constant(1.0, tf.float64))
  if name == "Rotate":
    return sign * (lvl * 30.0)
  if name in ("ShearX", "ShearY"):
    return sign * (lvl * 0.3)
  if name in ("TranslateXRel", "TranslateYRel"):
    return sign * (lvl * translate_pct)
  if name == "Posterize":
    return tf.floor(lvl * 4.0)
  if name == "PosterizeIncreasing":
    return 4.0 - tf.floor(lvl * 4.0)
  if name == "Solarize":
    return tf.floor(lvl * 256.0)
  if name == "SolarizeIncreasing":
    return 256.0 - tf.floor(lvl * 256.0)
  if name == "SolarizeAdd":
    return tf.floor(lvl * 110.0)
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return lvl * 1.8 + 0.1
  if name.endswith("Increasing"):
    return tf.maximum(tf.constant(0.1, tf.float64), 1.0 + sign * (lvl * 0.9))
  return None


_COLOUR_FNS = {"Color": color, "Contrast": contrast, "Brightness": brightness,
               "Sharpness": sharpness}


def apply_rand_op(img, name: str, magnitude, negate=False, interpolation: str = "bicubic",
                  fill="imagenet", translate_pct: float = 0.45):
  """One timm RandAugment op at a given (already noised and clipped) magnitude, on a uint8
  HxWxC image; returns uint8. ``negate`` flips the sign of signed ops (timm's
  ``_randomly_negate``)."""
  tf = tf_host()
  if name not in RAND_TRANSFORMS and name not in RAND_INCREASING_TRANSFORMS:
    raise ValueError(f"Unknown RandAugment op {name!r}; valid: "
                     f"{sorted(set(RAND_TRANSFORMS) | set(RAND_INCREASING_TRANSFORMS))}")
  img = _to_uint8(img)
  arg = _level_args(name, magnitude, tf.convert_to_tensor(negate), translate_pct)
  if name == "AutoContrast":
    return auto_contrast(img)
  if name == "Equalize":
    return equalize(img)
  if name == "Invert":
    return invert(img)
  if name.startswith("Posterize"):
    return posterize(img, arg)
  if name.startswith("SolarizeAdd"):
    return solarize_add(img, arg)
  if name.startswith("Solarize"):
    return solarize(img, arg)
  base = name[:-len("Increasing")] if name.endswith("Increasing") else name
  if base in _COLOUR_FNS:
    return _COLOUR_FNS[base](img, arg)
  fill = fill_values(fill, img.shape[-1])
  if interpolation == "random":
    raise ValueError("apply_rand_op: pass 'bilinear' or 'bicubic' (randaugment draws 'random')")
  h, w = tf.shape(img)[0], tf.shape(img)[1]
  if name == "Rotate":
    return affine(img, rotate_matrix(arg, h, w), interpolation, fill)
  # Shear and translate move pixels along one axis: PIL's 2-D filter reduces to a 1-D one.
  # PIL's coordinate of output pixel (x, y) along that axis, computed as PIL does:
  # a * (x + 0.5) + b * (y + 0.5) + c with (a, b, c) = (1, factor, 0) or (1, 0, pixels).
  vertical = name in ("ShearY", "TranslateYRel")
  if vertical:
    img = tf.transpose(img, [1, 0, 2])
    h, w = w, h
  along = tf.range(tf.cast(w, tf.float64), dtype=tf.float64)[None, :] + 0.5
  if name in ("ShearX", "ShearY"):
    across = tf.range(tf.cast(h, tf.float64), dtype=tf.float64)[:, None] + 0.5
    coord = along + arg * across
  else:
    coord = along + arg * tf.cast(w, tf.float64)
  out = shift_rows(img, coord, interpolation, fill)
  return tf.transpose(out, [1, 0, 2]) if vertical else out


class RandParams(NamedTuple):
  """The random draws of one RandAugment application (each field has ``num_layers`` entries)."""
  op: object         # int32 index into the transform list (chosen with replacement)
  apply: object      # bool: the layer's op runs (probability p)
  magnitude: object  # float64, noised and clipped
  negate: object     # bool: sign flip for signed ops (probability 1/2)
  bicubic: object    # bool: bicubic rather than bilinear (used when interpolation='random')


def sample_rand_params(seed, cfg: RandAugmentConfig) -> RandParams:
  """Stateless draws for one image: the same for the same seed, whatever the pipeline."""
  tf = tf_host()
  n = cfg.num_layers
  s = tf.unstack(tf.random.experimental.stateless_split(seed, 6))
  op = tf.random.stateless_uniform([n], s[0], 0, len(cfg.transforms), dtype=tf.int32)
  # timm skips a layer when random() > p.
  apply = tf.random.stateless_uniform([n], s[1], dtype=tf.float64) <= cfg.prob
  if cfg.magnitude_std == math.inf:
    mag = tf.random.stateless_uniform([n], s[2], 0.0, cfg.magnitude, dtype=tf.float64)
  elif cfg.magnitude_std > 0:
    mag = cfg.magnitude + cfg.magnitude_std * tf.random.stateless_normal([n], s[2],
                                                                         dtype=tf.float64)
  else:
    mag = tf.fill([n], tf.constant(cfg.magnitude, tf.float64))
  mag = tf.clip_by_value(mag, 0.0, cfg.magnitude_max)
  negate = tf.random.stateless_uniform([n], s[3], dtype=tf.float64) > 0.5
  bicubic = tf.random.stateless_uniform([n], s[4], dtype=tf.float64) < 0.5
  return RandParams(op, apply, mag, negate, bicubic)


def _outlined(fn, signature):
  """``fn`` as a graph function that Grappler does not inline: a branch of a ``switch_case``
  that is not taken then costs one dead op instead of all of its ops (~2.5 us each on one
  core, which added up to ~2 ms per image for RandAugment's 15 branches)."""
  tf = tf_host()
  return tf.function(fn, input_signature=signature, autograph=False,
                     experimental_attributes={"_noinline": True})


_OUTLINED_OPS: Dict[tuple, list] = {}


def rand_augment(img, params: RandParams, cfg: RandAugmentConfig, interpolation: str = "bicubic",
                 fill="imagenet", translate_pct: float = 0.45):
  """Applies the layers described by ``params`` in order; uint8 in, uint8 out."""
  tf = tf_host()
  img = _to_uint8(img)
  shape = img.shape
  names = cfg.transforms
  signature = [tf.TensorSpec([None, None, shape[-1]], tf.uint8), tf.TensorSpec([], tf.float64),
               tf.TensorSpec([], tf.bool), tf.TensorSpec([], tf.bool)]

  def make(name):
    def run(x, mag, neg, bicubic):
      if name in GEOMETRIC and interpolation == "random":
        return tf.cond(bicubic,
                       lambda: apply_rand_op(x, name, mag, neg, "bicubic", fill, translate_pct),
                       lambda: apply_rand_op(x, name, mag, neg, "bilinear", fill, translate_pct))
      return apply_rand_op(x, name, mag, neg, interpolation, fill, translate_pct)
    return _outlined(run, signature)

  key = (names, interpolation, fill if isinstance(fill, (str, int, float)) else tuple(fill),
         translate_pct, shape[-1])
  if key not in _OUTLINED_OPS:  # traced once, reused by every pipeline and eager call
    _OUTLINED_OPS[key] = [make(name) for name in names]
  ops = _OUTLINED_OPS[key]
  for layer in range(cfg.num_layers):
    args = (params.magnitude[layer], params.negate[layer], params.bicubic[layer])
    branches = [lambda op=op, x=img, args=args: op(x, *args) for op in ops]
    branches.append(lambda x=img: tf.identity(x))
    index = tf.where(params.apply[layer], params.op[layer], len(names))
    img = tf.switch_case(index, branches)
    img.set_shape(shape)
  return img


@preprocess.OPS.register("randaugment")
def randaugment(spec: str = "rand-m9-mstd0.5-inc1", interpolation: str = "bicubic",
                fill="imagenet", translate_pct: float = 0.45):
  """timm RandAugment (``--aa rand-m9-mstd0.5-inc1``) on a [0, 255] image; returns float32.

  ``interpolation``: 'bicubic' or 'bilinear' for every geometric op (timm's ``create_transform``
  passes the training interpolation: bicubic in DeiT), or 'random' (timm's bare
  ``rand_augment_transform``: bilinear or bicubic per op). ``fill``: the colour of pixels moved
  in from outside, timm's ``img_mean`` = round(255 * mean) of a normalisation preset (default
  'imagenet': (124, 116, 104)) or explicit values.
  """
  tf = tf_host()
  cfg = parse_rand_config(spec)
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"randaugment: interpolation must be one of {list(INTERPOLATIONS)}, "
                     f"got {interpolation!r}")
  fill_values(fill, 3 if not isinstance(fill, (int, float)) else 1)  # validates early
  if not 0.0 <= translate_pct <= 1.0:
    raise ValueError(f"randaugment: translate_pct must be in [0, 1], got {translate_pct}")

  def fn(img, seed):
    params = sample_rand_params(seed, cfg)
    return tf.cast(rand_augment(img, params, cfg, interpolation, fill, translate_pct), tf.float32)
  return preprocess.image_op(fn)


# --------------------------------------------------------------------------------- random erasing


_ERASE_MODES = ("pixel", "rand", "const")


def erase_box(seed, height, width, min_area, max_area, log_aspect, count, attempts=10):
  """timm's box search: up to ``attempts`` tries of (area ~ U(min, max) * HW / count,
  log-uniform aspect), h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)); the first
  with h < H and w < W wins, placed uniformly. Returns (found, top, left, h, w)."""
  tf = tf_host()
  s = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  hf, wf = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  area = hf * wf
  target = tf.random.stateless_uniform([attempts], s[0], min_area, max_area,
                                       dtype=tf.float64) * area / tf.cast(count, tf.float64)
  aspect = tf.exp(tf.random.stateless_uniform([attempts], s[1], log_aspect[0], log_aspect[1],
                                              dtype=tf.float64))
  bh = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)  # round half to even, as Python
  bw = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  ok = (bw < width) & (bh < height)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  found = tf.reduce_any(ok)
  bh, bw = bh[first], bw[first]
  # random.randint(0, H - h) is inclusive of both ends.
  top = tf.random.stateless_uniform([], s[2], 0, tf.maximum(height - bh + 1, 1), dtype=tf.int32)
  left = tf.random.stateless_uniform([], s[3], 0, tf.maximum(width - bw + 1, 1), dtype=tf.int32)
  return found, top, left, bh, bw


@preprocess.OPS.register("random_erasing")
def random_erasing(p: float = 0.25, mode: str = "pixel", min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3, max_aspect=None,
                   min_count: int = 1, max_count: int = 1):
  """timm ``RandomErasing`` on a *normalised* image (put it after ``normalize``).

  With probability ``p``, erase ``count ~ U{min_count..max_count}`` boxes, each found by
  ``erase_box`` (a box whose 10 tries all fail is skipped). The erased values are in normalised
  units: 'pixel' N(0, 1) per pixel and channel, 'rand' N(0, 1) per channel, 'const' 0.
  """
  tf = tf_host()
  if mode not in _ERASE_MODES:
    raise ValueError(f"random_erasing: mode must be one of {list(_ERASE_MODES)}, got {mode!r}")
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"random_erasing: p must be in [0, 1], got {p}")
  if not 0.0 < min_area <= max_area <= 1.0:
    raise ValueError(f"random_erasing: need 0 < min_area <= max_area <= 1, got "
                     f"{min_area}, {max_area}")
  max_aspect = max_aspect or 1.0 / min_aspect
  if not 0.0 < min_aspect <= max_aspect:
    raise ValueError(f"random_erasing: need 0 < min_aspect <= max_aspect, got "
                     f"{min_aspect}, {max_aspect}")
  if not 1 <= min_count <= max_count:
    raise ValueError(f"random_erasing: need 1 <= min_count <= max_count, got "
                     f"{min_count}, {max_count}")
  log_aspect = (math.log(min_aspect), math.log(max_aspect))

  def erase(img, seed):
    s_count, s_boxes, s_values = _split(seed, 3)
    h, w, c = tf.shape(img)[0], tf.shape(img)[1], img.shape[-1]
    count = tf.random.stateless_uniform([], s_count, min_count, max_count + 1, dtype=tf.int32)
    box_seeds = _split(s_boxes, max_count)
    value_seeds = _split(s_values, max_count)
    rows = tf.range(h)[:, None, None]
    cols = tf.range(w)[None, :, None]
    for i in range(max_count):
      found, top, left, bh, bw = erase_box(box_seeds[i], h, w, min_area, max_area, log_aspect,
                                           count)
      active = found & (i < count)
      bh, bw = bh * tf.cast(active, tf.int32), bw * tf.cast(active, tf.int32)
      inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
      if mode == "pixel":  # noise for the box only, placed with a pad
        noise = tf.random.stateless_normal([bh, bw, c], value_seeds[i], dtype=img.dtype)
        values = tf.pad(noise, [[top, h - top - bh], [left, w - left - bw], [0, 0]])
      elif mode == "rand":
        values = tf.random.stateless_normal([c], value_seeds[i], dtype=img.dtype)
      else:
        values = tf.zeros([c], img.dtype)
      img = tf.where(inside, values, img)
    return img

  outlined = {}  # (channels, seed dtype) -> erase as an outlined function, traced once

  def fn(img, seed):
    s_apply, s_erase = _split(seed, 2)
    img = tf.cast(img, tf.float32)
    key = (img.shape[-1], seed.dtype)
    if key not in outlined:  # outlined: no cost in the 1 - p of images left alone
      outlined[key] = _outlined(erase, [tf.TensorSpec([None, None, key[0]], tf.float32),
                                        tf.TensorSpec([2], seed.dtype)])
    # timm: skipped when random() > p.
    hit = tf.random.stateless_uniform([], s_apply, dtype=tf.float64) <= p
    out = tf.cond(hit, lambda: outlined[key](img, s_erase), lambda: img)
    out.set_shape(img.shape)
    return out
  return preprocess.image_op(fn)


def _f64(x):
  """float64 tensor; Python floats go straight to float64 (tf.cast would round via float32)."""
  tf = tf_host()
  if isinstance(x, (tf.Tensor, tf.Variable)):
    return tf.cast(x, tf.float64)
  return tf.constant(x, tf.float64)


def _split(seed, n):
  tf = tf_host()
  return tf.unstack(tf.random.experimental.stateless_split(seed, n))
