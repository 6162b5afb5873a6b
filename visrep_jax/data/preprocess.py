"""Preprocessing ops for tf.data, chained by a spec string (big_vision's ``pp`` idea).

A spec is ``"op1(args)|op2|op3(k=v)"``; ``parse(spec)`` returns ``fn(example, seed) -> example``.
Every random op is *stateless*: its randomness is a pure function of the per-example seed, so a
pipeline is deterministic for a fixed config seed, whatever the parallelism, and can be resumed
exactly (the pipeline folds the global example index into the seed).

Convention: ``decode`` gives uint8 HxWxC; geometric/colour ops return float32 in [0, 255];
``normalize`` gives the model's float input.
"""

from __future__ import annotations

import ast
import math
from typing import Callable, Dict, List, Tuple

from visrep_jax.data import tf_host
from visrep_jax.registry import Registry

OPS = Registry("preprocessing op")

MEAN_STD = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "none": ((0.0,), (1.0,)),
}

Op = Callable  # (example: dict, seed: tf.Tensor[2] int32) -> dict


def parse(spec: str) -> Callable:
  """Parses ``"op(a, k=v)|op2"`` into one function ``(example, seed) -> example``.

  Op i draws its randomness from ``fold_in(seed, i)``. ``decode`` directly followed by an op
  that can read encoded bytes (``random_resized_crop``) is fused into it: only the crop window
  of a JPEG is decoded (same window, same seed; see ``random_resized_crop``).
  """
  ops = [build_op(s) for s in split_spec(spec)]
  tf = tf_host()
  steps = []  # (seed index, op)
  i = 0
  while i < len(ops):
    nxt = ops[i + 1] if i + 1 < len(ops) else None
    if getattr(ops[i], "decode_channels", None) and hasattr(nxt, "with_decode"):
      steps.append((i + 1, nxt.with_decode(ops[i])))
      i += 2
    else:
      steps.append((i, ops[i]))
      i += 1

  def apply(example, seed):
    for i, op in steps:
      example = op(example, tf.random.experimental.stateless_fold_in(seed, i))
    return example

  return apply


def split_spec(spec: str) -> List[str]:
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"Preprocessing spec must be a non-empty string like "
                     f"'decode|flip_lr|normalize(\"imagenet\")', got {spec!r}.")
  return [s.strip() for s in spec.split("|") if s.strip()]


def build_op(text: str) -> Op:
  """``"name(1, k=2)"`` -> the op built by the registered factory ``name``."""
  try:
    node = ast.parse(text, mode="eval").body
  except SyntaxError:
    raise ValueError(f"Cannot parse preprocessing op {text!r}; write name or name(args).") from None
  if isinstance(node, ast.Name):
    name, args, kwargs = node.id, [], {}
  elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    name = node.func.id
    try:
      args = [ast.literal_eval(a) for a in node.args]
      kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
      raise ValueError(f"Arguments of preprocessing op {text!r} must be literals.") from None
  else:
    raise ValueError(f"Cannot parse preprocessing op {text!r}; write name or name(args).")
  factory = OPS.get(name)
  try:
    return factory(*args, **kwargs)
  except TypeError as e:
    raise ValueError(f"Bad arguments for preprocessing op {text!r}: {e}") from None


def image_op(fn):
  """Wraps ``fn(image, seed) -> image`` into an example op."""
  def op(example, seed):
    example = dict(example)
    example["image"] = fn(example["image"], seed)
    return example
  return op


def _float(img):
  tf = tf_host()
  return tf.cast(img, tf.float32)


def _uniform(seed, lo=0.0, hi=1.0, shape=()):
  tf = tf_host()
  return tf.random.stateless_uniform(shape, seed=seed, minval=lo, maxval=hi)


def _seeds(seed, n):
  tf = tf_host()
  return tf.unstack(tf.random.experimental.stateless_split(seed, n))


# --------------------------------------------------------------------------- decoding / geometry


def _decode_bytes(data, channels):
  """Encoded bytes -> uint8 HxWxC. JPEGs use libjpeg's accurate integer IDCT, which gives
  exactly PIL's (and so torchvision's) pixels; TF's default fast IDCT is off by up to ~7."""
  tf = tf_host()
  img = tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.io.decode_jpeg(data, channels=channels, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(data, channels=channels, expand_animations=False))
  img.set_shape([None, None, channels])
  return img


@OPS.register("decode")
def decode(channels: int = 3):
  """Decodes encoded bytes (JPEG/PNG/GIF/BMP) to uint8; converts grey <-> RGB to ``channels``."""
  tf = tf_host()
  if channels not in (1, 3):
    raise ValueError(f"decode: channels must be 1 or 3, got {channels!r}")

  def fn(img, seed):
    del seed
    if img.dtype == tf.string:
      return _decode_bytes(img, channels)
    img = tf.convert_to_tensor(img)
    c = img.shape[-1]
    if c == channels:
      return img
    if c == 1 and channels == 3:
      return tf.image.grayscale_to_rgb(img)
    if c == 3 and channels == 1:
      return tf.cast(tf.round(tf.image.rgb_to_grayscale(_float(img))), img.dtype)
    raise ValueError(f"decode({channels}): cannot convert {c}-channel images")
  op = image_op(fn)
  op.decode_channels = channels
  return op


_METHODS = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "area": "area"}


def _pil_filter(x, method):
  """PIL's resampling kernels: bicubic (a = -0.5, support 2) and bilinear (triangle, support 1)."""
  tf = tf_host()
  x = tf.abs(x)
  if method == "bilinear":
    return tf.maximum(1.0 - x, 0.0)
  a = -0.5
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def _resample_rows(x, out_size, method, exact: bool = True, block: int = 16):
  """PIL's antialiased 8-bit resampling of the rows of ``x`` [N, M] to ``out_size`` rows.

  PIL (``ImagingResample``): output row i is centred at ``(i + 0.5) * N / out`` and averages
  the input rows within ``support * max(N / out, 1)`` of it, with filter weights normalised to
  sum to 1 and then rounded to 22-bit fixed point; the sum plus one half is truncated. Same here.
  The weights are banded, so each block of ``block`` output rows is a small matmul against the
  window of input rows it needs (fast on one core).

  ``exact``: float64 sums, where every product (8 + 23 bits) and sum (< 2^9 with 22 fractional
  bits) is exact, so the result is PIL's bit for bit. Otherwise float32 sums, ~2x faster: a
  value within ~1e-5 of a half can round the other way, which flips 1 level on ~1e-4 of the
  values of bicubic resizes (a few % for bilinear ones, whose weights often make halves).
  """
  tf = tf_host()
  n = tf.shape(x)[0]
  out_size = tf.convert_to_tensor(out_size, tf.int32)
  scale = tf.cast(n, tf.float64) / tf.cast(out_size, tf.float64)
  filter_scale = tf.maximum(scale, 1.0)
  support = (2.0 if method == "bicubic" else 1.0) * filter_scale
  num_blocks = (out_size + block - 1) // block
  center = (tf.range(num_blocks * block, dtype=tf.float64) + 0.5) * scale
  lo = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)  # C's (int): towards zero
  hi = tf.minimum(tf.cast(center + support + 0.5, tf.int32), n)
  lo = tf.minimum(lo, n - 1)  # rows past out_size (padding to whole blocks) stay in range
  start = tf.reshape(lo, [num_blocks, block])[:, 0]
  end = tf.reduce_max(tf.reshape(hi, [num_blocks, block]), axis=1)
  window = tf.maximum(tf.reduce_max(end - start), 1)
  idx = start[:, None] + tf.range(window)[None, :]  # [blocks, window]
  taps = idx[:, None, :]
  w = _pil_filter((tf.cast(taps, tf.float64) - tf.reshape(center, [num_blocks, block, 1]) + 0.5)
                  * (1.0 / filter_scale), method)
  inside = ((taps >= tf.reshape(lo, [num_blocks, block, 1]))
            & (taps < tf.reshape(hi, [num_blocks, block, 1])))
  w = tf.where(inside, w, 0.0)
  w = tf.math.divide_no_nan(w, tf.reduce_sum(w, axis=2, keepdims=True))
  w = tf.sign(w) * tf.floor(tf.abs(w) * 2.0 ** 22 + 0.5) * 2.0 ** -22  # (int)(w * 2^22 +- 0.5)
  dtype = tf.float64 if exact else tf.float32
  rows = tf.gather(tf.cast(x, dtype), tf.minimum(idx, n - 1))  # [blocks, window, M]
  out = tf.reshape(tf.matmul(tf.cast(w, dtype), rows), [num_blocks * block, -1])[:out_size]
  return tf.cast(tf.clip_by_value(tf.floor(out + 0.5), 0.0, 255.0), tf.float32)


def _resize(img, hw, method, exact: bool = True):
  """Resize to ``hw``; float32 out. 'bicubic' and 'bilinear' are PIL's antialiased ``resize``
  (so torchvision's on PIL images): horizontal pass, round, vertical pass, round; bit-exact, or
  up to 1 level on ~1e-4 of the values with ``exact=False`` (see ``_resample_rows``).
  'nearest' and 'area' are tf.image.resize's."""
  tf = tf_host()
  if method not in _METHODS:
    raise ValueError(f"resize method {method!r} not in {sorted(_METHODS)}")
  if method in ("nearest", "area"):
    return tf.clip_by_value(tf.image.resize(_float(img), hw, method=method), 0.0, 255.0)
  c = img.shape[-1]
  h, w = tf.shape(img)[0], tf.shape(img)[1]
  oh, ow = hw
  x = tf.transpose(_float(img), [1, 0, 2])  # [W, H, C]: resample along the width first
  x = _resample_rows(tf.reshape(x, [w, h * c]), ow, method, exact)
  x = tf.transpose(tf.reshape(x, [ow, h, c]), [1, 0, 2])  # [H, ow, C]
  x = _resample_rows(tf.reshape(x, [h, -1]), oh, method, exact)
  out = tf.reshape(x, [oh, ow, c])
  out.set_shape([oh if isinstance(oh, int) else None, ow if isinstance(ow, int) else None, c])
  return out


@OPS.register("resize")
def resize(size, method: str = "bicubic"):
  """Resizes to ``size`` x ``size`` (or (h, w))."""
  hw = (size, size) if isinstance(size, int) else tuple(size)
  return image_op(lambda img, seed: _resize(img, hw, method))


def _short_side_hw(img, size):
  tf = tf_host()
  h, w = tf.shape(img)[0], tf.shape(img)[1]
  hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
  scale = tf.cast(size, tf.float32) / tf.minimum(hf, wf)
  # torchvision: the short side becomes exactly `size`, the long side int(size * long / short).
  nh = tf.where(h <= w, size, tf.cast(tf.math.floor(hf * scale), tf.int32))
  nw = tf.where(h <= w, tf.cast(tf.math.floor(wf * scale), tf.int32), size)
  return nh, nw


@OPS.register("resize_short")
def resize_short(size: int, method: str = "bicubic"):
  """Resizes so that the short side is ``size`` (torchvision ``Resize(int)``)."""
  def fn(img, seed):
    nh, nw = _short_side_hw(img, size)
    return _resize(img, (nh, nw), method)
  return image_op(fn)


def _center_crop(img, size):
  tf = tf_host()
  h, w = tf.shape(img)[0], tf.shape(img)[1]
  top = (h - size) // 2
  left = (w - size) // 2
  out = img[top:top + size, left:left + size]
  out.set_shape([size, size, img.shape[-1]])
  return out


@OPS.register("center_crop")
def center_crop(size: int, crop_ratio: float = 1.0, method: str = "bicubic"):
  """Evaluation crop: resize the short side to ``int(size / crop_ratio)``, then centre-crop
  ``size`` (DeiT's ``--eval-crop-ratio``; 0.875 for DeiT, 1.0 for DeiT III)."""
  if not 0.0 < crop_ratio <= 1.0:
    raise ValueError(f"center_crop: crop_ratio must be in (0, 1], got {crop_ratio}")
  resize_to = int(size / crop_ratio)

  def fn(img, seed):
    nh, nw = _short_side_hw(img, resize_to)
    return _center_crop(_resize(img, (nh, nw), method), size)
  return image_op(fn)


@OPS.register("random_resized_crop")
def random_resized_crop(size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        method: str = "bicubic", attempts: int = 10):
  """torchvision ``RandomResizedCrop``: up to 10 tries of (area in scale, log-uniform aspect),
  first that fits wins; else a centre crop with the aspect clamped to ``ratio``.

  The resize is PIL's up to 1 level on ~1e-4 of the values (float32 sums, see
  ``_resample_rows``). After ``decode`` (fused by ``parse``), a JPEG is decoded only inside the
  crop window (``decode_and_crop_jpeg``: same window; for chroma-subsampled JPEGs, pixels at
  the window's edge can differ from a full decode by a few levels, as libjpeg upsamples chroma
  there from fewer neighbours).
  """
  tf = tf_host()
  if method not in _METHODS:
    raise ValueError(f"random_resized_crop: method {method!r} not in {sorted(_METHODS)}")
  if not (0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1]):
    raise ValueError(f"random_resized_crop: need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= "
                     f"ratio[1], got scale={scale}, ratio={ratio}")
  log_r = (math.log(ratio[0]), math.log(ratio[1]))

  def window(h, w, seed):
    s1, s2, s3, s4 = _seeds(seed, 4)
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    area = hf * wf
    target = area * _uniform(s1, scale[0], scale[1], (attempts,))
    aspect = tf.exp(_uniform(s2, log_r[0], log_r[1], (attempts,)))
    cw = tf.round(tf.sqrt(target * aspect))
    ch = tf.round(tf.sqrt(target / aspect))
    ok = (cw > 0) & (ch > 0) & (cw <= wf) & (ch <= hf)
    first = tf.argmax(tf.cast(ok, tf.int32))
    any_ok = tf.reduce_any(ok)
    # Fallback (torchvision): whole image, aspect clamped into `ratio`, centred.
    in_ratio = wf / hf
    fw = tf.where(in_ratio < ratio[0], wf, tf.where(in_ratio > ratio[1], tf.round(hf * ratio[1]), wf))
    fh = tf.where(in_ratio < ratio[0], tf.round(wf / ratio[0]), hf)
    cw = tf.cast(tf.where(any_ok, cw[first], fw), tf.int32)
    ch = tf.cast(tf.where(any_ok, ch[first], fh), tf.int32)
    top_r = tf.random.stateless_uniform((), seed=s3, minval=0, maxval=tf.int32.max, dtype=tf.int32)
    left_r = tf.random.stateless_uniform((), seed=s4, minval=0, maxval=tf.int32.max, dtype=tf.int32)
    top = tf.where(any_ok, top_r % (h - ch + 1), (h - ch) // 2)
    left = tf.where(any_ok, left_r % (w - cw + 1), (w - cw) // 2)
    return top, left, ch, cw

  def finish(crop, channels):
    out = _resize(crop, (size, size), method, exact=False)  # training: speed over the last bit
    out.set_shape([size, size, channels])
    return out

  def fn(img, seed):
    top, left, ch, cw = window(tf.shape(img)[0], tf.shape(img)[1], seed)
    return finish(img[top:top + ch, left:left + cw], img.shape[-1])

  op = image_op(fn)

  def with_decode(decode_op):
    channels = decode_op.decode_channels

    def encoded(data, seed):
      def jpeg():
        shape = tf.image.extract_jpeg_shape(data)
        top, left, ch, cw = window(shape[0], shape[1], seed)
        return tf.io.decode_and_crop_jpeg(data, tf.stack([top, left, ch, cw]), channels=channels,
                                          dct_method="INTEGER_ACCURATE")

      def other():
        img = _decode_bytes(data, channels)
        top, left, ch, cw = window(tf.shape(img)[0], tf.shape(img)[1], seed)
        return img[top:top + ch, left:left + cw]

      crop = tf.cond(tf.io.is_jpeg(data), jpeg, other)
      crop.set_shape([None, None, channels])
      return finish(crop, channels)

    def fused(example, seed):
      if example["image"].dtype != tf.string:
        return op(decode_op(example, seed), seed)
      example = dict(example)
      example["image"] = encoded(example["image"], seed)
      return example
    return fused

  op.with_decode = with_decode
  return op


@OPS.register("random_crop")
def random_crop(size: int, pad: int = 0, pad_mode: str = "reflect"):
  """torchvision ``RandomCrop(size, padding=pad, padding_mode=pad_mode)``."""
  tf = tf_host()
  modes = {"reflect": "REFLECT", "constant": "CONSTANT", "symmetric": "SYMMETRIC"}
  if pad_mode not in modes:
    raise ValueError(f"random_crop: pad_mode must be one of {sorted(modes)}, got {pad_mode!r}")

  def fn(img, seed):
    s1, s2 = _seeds(seed, 2)
    if pad:
      img = tf.pad(img, [[pad, pad], [pad, pad], [0, 0]], mode=modes[pad_mode])
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    top = tf.random.stateless_uniform((), seed=s1, minval=0, maxval=h - size + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform((), seed=s2, minval=0, maxval=w - size + 1, dtype=tf.int32)
    out = _float(img[top:top + size, left:left + size])
    out.set_shape([size, size, img.shape[-1]])
    return out
  return image_op(fn)


@OPS.register("simple_random_crop")
def simple_random_crop(size: int, pad: int = 4, method: str = "bicubic"):
  """DeiT III's Simple Random Crop: short side to ``size``, reflect-pad 4, random ``size`` crop."""
  crop = random_crop(size, pad, "reflect")

  def op(example, seed):
    example = dict(example)
    img = example["image"]
    nh, nw = _short_side_hw(img, size)
    example["image"] = _resize(img, (nh, nw), method)
    return crop(example, seed)
  return op


@OPS.register("flip_lr")
def flip_lr(p: float = 0.5):
  tf = tf_host()

  def fn(img, seed):
    return tf.cond(_uniform(seed) < p, lambda: tf.reverse(_float(img), [1]), lambda: _float(img))
  return image_op(fn)


# ------------------------------------------------------------------------------------- colour


_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert('L') and torchvision's grayscale


def _colour_matmul(img, matrix):
  """Per-pixel colour transform ``img[..., :] @ matrix`` as one matmul (cheaper on one core
  than broadcasting ops and reductions over the channel axis)."""
  tf = tf_host()
  c = img.shape[-1]
  out = tf.matmul(tf.reshape(img, [-1, c]), matrix)
  return tf.reshape(out, tf.concat([tf.shape(img)[:-1], tf.shape(matrix)[-1:]], 0))


def _gray(img, channels: int = 1):
  """Grey level of an RGB float image, repeated over ``channels`` channels."""
  tf = tf_host()
  w = tf.constant([[v] * channels for v in _LUMA], tf.float32)
  return _colour_matmul(img, w)


def _mean_gray(img):
  tf = tf_host()
  c = img.shape[-1]
  means = tf.reduce_mean(tf.reshape(img, [-1, c]), axis=0)
  return tf.tensordot(means, tf.constant(_LUMA, tf.float32), 1) if c == 3 else means[0]


@OPS.register("color_jitter")
def color_jitter(brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0):
  """torchvision ``ColorJitter(b, c, s)`` (no hue): factors ~ U[1-x, 1+x], applied in a random
  order; brightness scales, contrast blends with the mean grey level, saturation with grey;
  values are clipped to [0, 255] after each."""
  tf = tf_host()
  for name, x in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
    if not 0.0 <= x:
      raise ValueError(f"color_jitter: {name} must be >= 0, got {x}")
  jitters = [(brightness, "b"), (contrast, "c"), (saturation, "s")]
  jitters = [(x, k) for x, k in jitters if x > 0]
  eye = tf.eye(3)
  luma_rows = tf.constant([[v] * 3 for v in _LUMA], tf.float32)

  def fn(img, seed):
    img = _float(img)
    if not jitters:
      return img
    rgb = img.shape[-1] == 3
    seeds = _seeds(seed, len(jitters) + 1)
    order = tf.argsort(_uniform(seeds[0], shape=(len(jitters),)))

    def apply(kind, x, s, im):
      f = _uniform(s, max(0.0, 1.0 - x), 1.0 + x)
      if kind == "b":
        return tf.minimum(im * f, 255.0)  # im >= 0 and f >= 0
      if kind == "c":
        return tf.clip_by_value(im * f + (1.0 - f) * _mean_gray(im), 0.0, 255.0)
      if not rgb:
        return im
      # f * im + (1 - f) * grey(im) as one 3x3 colour matrix.
      return tf.clip_by_value(_colour_matmul(im, f * eye + (1.0 - f) * luma_rows), 0.0, 255.0)

    for pos in range(len(jitters)):
      branches = [lambda i=i: apply(jitters[i][1], jitters[i][0], seeds[1 + i], img)
                  for i in range(len(jitters))]
      img = tf.switch_case(tf.cast(order[pos], tf.int32), branches)
    return img
  return image_op(fn)


def _gaussian_blur(img, sigma, max_sigma):
  tf = tf_host()
  radius = int(math.ceil(3.0 * max_sigma))
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  k = tf.exp(-0.5 * tf.square(x / sigma))
  k = k / tf.reduce_sum(k)
  c = img.shape[-1]
  padded = tf.pad(img[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
  kh = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, c, 1])
  kw = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, c, 1])
  out = tf.nn.depthwise_conv2d(padded, kh, [1, 1, 1, 1], "VALID")
  out = tf.nn.depthwise_conv2d(out, kw, [1, 1, 1, 1], "VALID")
  return out[0]


@OPS.register("three_augment")
def three_augment(blur_sigma=(0.1, 2.0), solarize_threshold: float = 128.0):
  """DeiT III 3-Augment: exactly one of {grayscale, solarize, Gaussian blur}, chosen uniformly
  (deit ``augment.py``: Grayscale(p=1) / Solarize(128) / GaussianBlur(radius~U[0.1, 2]))."""
  tf = tf_host()

  def fn(img, seed):
    s1, s2 = _seeds(seed, 2)
    img = _float(img)
    rgb = img.shape[-1] == 3
    choice = tf.random.stateless_uniform((), seed=s1, minval=0, maxval=3, dtype=tf.int32)

    def gray():
      return _gray(img, 3) if rgb else img

    def solarize():
      return tf.where(img >= solarize_threshold, 255.0 - img, img)

    def blur():
      return _gaussian_blur(img, _uniform(s2, *blur_sigma), blur_sigma[1])

    out = tf.switch_case(choice, [gray, solarize, blur])
    out.set_shape(img.shape)
    return out
  return image_op(fn)


@OPS.register("normalize")
def normalize(mean="imagenet", std=None):
  """``(x / 255 - mean) / std`` to float32; ``mean`` may name a preset (imagenet, inception,
  fashion_mnist, none) or give per-channel values."""
  tf = tf_host()
  if isinstance(mean, str):
    if mean not in MEAN_STD:
      raise ValueError(f"normalize: unknown preset {mean!r}; valid: {sorted(MEAN_STD)}")
    mean, std = MEAN_STD[mean]
  if std is None:
    raise ValueError("normalize: give std with explicit mean values")
  m = tf.constant(mean if isinstance(mean, (list, tuple)) else [mean], tf.float32)
  s = tf.constant(std if isinstance(std, (list, tuple)) else [std], tf.float32)

  scale, shift = 1.0 / (255.0 * s), -m / s  # (x / 255 - m) / s as one multiply-add

  n_values = int(m.shape[0])

  def fn(img, seed):
    channels = img.shape[-1]
    if n_values > 1 and channels is not None and channels != n_values:
      # Broadcasting would silently turn e.g. a grayscale image into 3 channels.
      raise ValueError(f"normalize: {n_values} mean/std values for {channels}-channel images; "
                       "use a preset or values with one entry per channel (e.g. "
                       "normalize('fashion_mnist') or normalize(0.5, 0.5) for grayscale)")
    return _float(img) * scale + shift
  return image_op(fn)


# RandAugment and random erasing (augment), SimCLR views and the BOHB-style policy
# (episode_augment) register their ops here; imported last, as they use this module. Every op
# name a config can use is then known as soon as ``preprocess`` is imported.
from visrep_jax.data import augment  # noqa: E402,F401
from visrep_jax.data import episode_augment  # noqa: E402,F401
