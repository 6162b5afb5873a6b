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
  """Parses ``"op(a, k=v)|op2"`` into one function ``(example, seed) -> example``."""
  ops = [build_op(s) for s in split_spec(spec)]
  tf = tf_host()

  def apply(example, seed):
    for i, op in enumerate(ops):
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


def _img_op(fn):
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


@OPS.register("decode")
def decode(channels: int = 3):
  """Decodes encoded bytes (JPEG/PNG/GIF/BMP) to uint8; converts grey <-> RGB to ``channels``."""
  tf = tf_host()

  def fn(img, seed):
    del seed
    if img.dtype == tf.string:
      img = tf.io.decode_image(img, channels=channels, expand_animations=False)
      img.set_shape([None, None, channels])
      return img
    img = tf.convert_to_tensor(img)
    c = img.shape[-1]
    if c == channels:
      return img
    if c == 1 and channels == 3:
      return tf.image.grayscale_to_rgb(img)
    if c == 3 and channels == 1:
      return tf.cast(tf.round(tf.image.rgb_to_grayscale(_float(img))), img.dtype)
    raise ValueError(f"decode({channels}): cannot convert {c}-channel images")
  return _img_op(fn)


_METHODS = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "area": "area"}


def _resize(img, hw, method):
  tf = tf_host()
  if method not in _METHODS:
    raise ValueError(f"resize method {method!r} not in {sorted(_METHODS)}")
  # antialias=True matches PIL/torchvision's antialiased downsampling.
  out = tf.image.resize(_float(img), hw, method=method, antialias=method != "nearest")
  return tf.clip_by_value(out, 0.0, 255.0)


@OPS.register("resize")
def resize(size, method: str = "bicubic"):
  """Resizes to ``size`` x ``size`` (or (h, w))."""
  hw = (size, size) if isinstance(size, int) else tuple(size)
  return _img_op(lambda img, seed: _resize(img, hw, method))


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
  return _img_op(fn)


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
  return _img_op(fn)


@OPS.register("random_resized_crop")
def random_resized_crop(size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        method: str = "bicubic", attempts: int = 10):
  """torchvision ``RandomResizedCrop``: up to 10 tries of (area in scale, log-uniform aspect),
  first that fits wins; else a centre crop with the aspect clamped to ``ratio``."""
  tf = tf_host()
  log_r = (math.log(ratio[0]), math.log(ratio[1]))

  def fn(img, seed):
    s1, s2, s3, s4 = _seeds(seed, 4)
    h, w = tf.shape(img)[0], tf.shape(img)[1]
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
    crop = img[top:top + ch, left:left + cw]
    out = _resize(crop, (size, size), method)
    out.set_shape([size, size, img.shape[-1]])
    return out
  return _img_op(fn)


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
  return _img_op(fn)


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
  return _img_op(fn)


# ------------------------------------------------------------------------------------- colour


def _gray(img):
  tf = tf_host()
  # ITU-R 601-2 luma, as PIL's convert('L') and torchvision's rgb_to_grayscale.
  w = tf.constant([0.299, 0.587, 0.114], tf.float32)
  return tf.reduce_sum(img * w, axis=-1, keepdims=True)


def _blend(a, b, factor):
  tf = tf_host()
  return tf.clip_by_value(factor * a + (1.0 - factor) * b, 0.0, 255.0)


@OPS.register("color_jitter")
def color_jitter(brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0):
  """torchvision ``ColorJitter(b, c, s)`` (no hue): factors ~ U[1-x, 1+x], applied in a random
  order; brightness scales, contrast blends with the mean grey level, saturation with grey."""
  tf = tf_host()
  jitters = [(brightness, "b"), (contrast, "c"), (saturation, "s")]
  jitters = [(x, k) for x, k in jitters if x > 0]

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
        return tf.clip_by_value(im * f, 0.0, 255.0)
      g = _gray(im) if rgb else im
      if kind == "c":
        return _blend(im, tf.reduce_mean(g), f)
      return _blend(im, g, f) if rgb else im

    for pos in range(len(jitters)):
      branches = [lambda i=i: apply(jitters[i][1], jitters[i][0], seeds[1 + i], img)
                  for i in range(len(jitters))]
      img = tf.switch_case(tf.cast(order[pos], tf.int32), branches)
    return img
  return _img_op(fn)


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
      g = _gray(img) if rgb else img
      return tf.tile(g, [1, 1, 3]) if rgb else g

    def solarize():
      return tf.where(img >= solarize_threshold, 255.0 - img, img)

    def blur():
      return _gaussian_blur(img, _uniform(s2, *blur_sigma), blur_sigma[1])

    out = tf.switch_case(choice, [gray, solarize, blur])
    out.set_shape(img.shape)
    return out
  return _img_op(fn)


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

  def fn(img, seed):
    return (_float(img) / 255.0 - m) / s
  return _img_op(fn)
