"""Episode-level augmentations for CrossTransformers (Doersch et al. 2020) on Meta-Dataset.

Three things, all stateless tf ops for the host pipeline (eager or inside ``tf.data``; the
same seed gives the same episode):

* **SimCLR episodes** (paper §3.1, spec §2): ``simclr_episode`` turns an episode into an
  |S|-way instance-discrimination episode; ``maybe_simclr_episode`` does so with probability
  ``prob`` (0.5) and otherwise returns the MD-categorization episode, with the same keys, dtypes
  and shapes either way, so one compiled train step serves both.
* **BOHB-style augmentation** ("+Aug", spec §3): ``bohb_augment``, an AutoAugment-style policy
  of a variable number of stages over rotate / posterize / solarize / colour / contrast /
  brightness / sharpness / shear / translate / cutout, plus the authors' extra
  downsample -> JPEG -> upsample stage (``resize_jpeg``). Applied to MD episodes only.
* **SC-Aug** (Table 1 ablation): the SimCLR-episode augmentation ``simclr_view`` applied to
  ordinary MD episodes, without relabelling.

Episodes are dicts: ``support_images`` [S, H, W, C] (uint8 or float in [0, 255]),
``support_labels`` [S], ``query_images`` [Q, H, W, C], ``query_labels`` [Q], optional
``support_mask`` / ``query_mask`` [S] / [Q] bool (True = real example; missing = all real).
Outputs always carry float32 [0, 255] images (the ``preprocess`` convention: ``normalize``
comes after), int32 labels (-1 on padding), bool masks and a scalar bool ``is_simclr``. Other
keys are passed through; ``query_class_ids`` is rewritten in SimCLR episodes when
``support_class_ids`` is present (the official code does the same).

Config names: ``EPISODE_AUGMENT`` maps names to episode-level factories (``parse`` reads
``"simclr_episodes(prob=0.5, md_augment='bohb')"``); the per-image ops ``bohb_augment`` and
``simclr_augment`` are registered in ``preprocess.OPS`` (``preprocess`` imports this module).

Decisions on what the paper leaves open (paper line numbers as in shared/spec/crosstransformers.md):

1. Query selection (L207-212, footnote 1 L230; spec §2 items 3-4, §8.8). We follow the
   official ``meta_dataset/data/pipeline.py::add_simclr_episodes``: for an original query
   set with q_c queries of class c, min(q_c, s_c) *distinct* support images of class c become
   the new queries (same class distribution as Q, as footnote 1 asks, and never the same
   source twice). |Q'| = sum_c min(q_c, s_c) <= |Q|; the rest of the fixed-size query buffer
   is padding (``query_mask``). The official code takes the *first* images of each class
   (random anyway, as Meta-Dataset shuffles each class); ``select='random'`` (default) picks a
   uniformly random subset within each class so that ordered inputs are safe too;
   ``select='first'`` is the official rule. Without ``query_labels`` the queries are
   ``num_queries`` distinct support images chosen uniformly (the paper's random_sample).
2. Labels (L211-212): support i gets label i; a query's label is the index of its source
   support image. So up to |S| (<= 500 in MD) ways: the head must accept that many classes.
3. rho (C.4 L716-719; spec §8.5): SimCLR v1 defaults, as the official CTX code calls
   ``simclr.data_util.preprocess_for_train(impl='simclrv1')`` with color_jitter_strength 1.0:
   ``sample_distorted_bounding_box`` crop (area 0.08-1, aspect 3/4-4/3, min_object_covered
   0.1, 100 attempts, whole image otherwise) resized bicubic to the input size; horizontal
   flip p=0.5; with p=0.8 colour jitter in random order (additive brightness +-0.8, contrast
   and saturation [0.2, 1.8], hue +-0.2, clip to [0, 1] after each); grey p=0.2. The crop is
   TF's sampler (not ``preprocess.random_resized_crop``, torchvision's 10-try sampler) and the
   jitter is SimCLR's (``preprocess.color_jitter`` is torchvision's: multiplicative
   brightness, no hue), so neither existing op is the same thing. One deviation: the crop is
   clipped to [0, 1] before the jitter (SimCLR clips after each jitter op only), because the
   hue of near-grey overshoot pixels otherwise differs between eager and graph execution.
4. Blur (C.4 L718-719): queries only. The official CTX code calls ``random_blur(p=1.0)``, so
   every query is blurred (``blur_prob=1.0``; SimCLR pretraining uses 0.5). Kernel as SimCLR:
   2 * ((H // 10) // 2) + 1 taps, sigma ~ U(0.1, 2.0), zero ('SAME') padding, clip.
   (``preprocess._gaussian_blur`` pads by reflection with 3-sigma taps: a different op.)
5. Mixing (L203-204; spec §8.7): an independent coin flip per episode, u < prob with u from
   the episode seed (official: ``random_uniform > fraction`` keeps the MD episode). It is
   independent of the class-sampling coin, which lives in the sampler.
6. BOHB ops (L381-382, L702-705; spec §3, §8.6): "the settings discovered for BOHB" [64]
   (Saikia et al. 2020) are not in the paper nor in the official repository (no BOHB code or
   gin there), and could not be read offline. ``BohbPolicy``'s defaults are therefore OUR
   placeholders, AutoAugment-style: 1-3 stages (uniform), each stage picks one of the 13 ops
   uniformly and applies it with p=0.5 at a magnitude level ~ U(0, 10) on AutoAugment's
   scale (rotate 30 deg, shear 0.3, translate 0.45 of the size, posterize 4-8 bits, solarize
   threshold 0-256, colour/contrast/brightness/sharpness factor 0.1-1.9, cutout side up to
   0.5 of the short side filled with grey 128), signed ops get a random sign. Every one of
   these is a field to override from the config once BOHB's values are known.
   "colour shifts" (L704) is read as AutoAugment's Color (saturation blend).
7. Resize/JPEG stage (L705-711): one more op in the selection set, with the same p as the
   others (its probability is not stated). Ratio r ~ U(10 / W, 1) ("a 10 pixel-wide image"),
   size round(r H) x round(r W) (>= 1), antialiased bilinear down, JPEG quality an integer
   ~ U{75..100}, bilinear back up (interpolations not stated).
8. Where BOHB applies (L384-385): MD-categorization episodes only, support and query images
   alike (no restriction stated). SC-Aug (L385-386, L438-447) is rho on every image of every
   MD episode, with the blur on queries only, as in SimCLR episodes (``query_blur``).
9. Order with decoding (spec §2 open point): these ops run on decoded, resized episode images
   (Meta-Dataset's decoder resizes first; the official ``simclr_augment`` gets decoded images).
"""

from __future__ import annotations

import ast
from typing import Callable, Dict, NamedTuple, Optional, Tuple

from visrep_jax.data import augment, preprocess, tf_host
from visrep_jax.registry import Registry

EPISODE_AUGMENT = Registry("episode augmentation")


def _as_seed(seed):
  """A [2] int32 stateless seed from a Python int or a [2] tensor."""
  tf = tf_host()
  if isinstance(seed, int):
    return tf.constant([seed, 0], tf.int32)
  seed = tf.convert_to_tensor(seed)
  if seed.dtype not in (tf.int32, tf.int64):
    raise ValueError(f"seed must be an int or an int32/int64 [2] tensor, got {seed.dtype}")
  return seed


def _split(seed, n):
  tf = tf_host()
  return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def _uniform(seed, lo=0.0, hi=1.0, shape=()):
  tf = tf_host()
  return tf.random.stateless_uniform(shape, seed=seed, minval=lo, maxval=hi)


# ------------------------------------------------------------------------- SimCLR's rho


class SimclrAugment(NamedTuple):
  """SimCLR v1's training augmentation as the CTX code uses it (decision 3, 4)."""
  strength: float = 1.0                 # color_jitter_strength
  impl: str = "simclrv1"                # 'simclrv1': additive brightness; 'simclrv2': multiplicative
  crop: bool = True
  flip: bool = True
  color: bool = True
  color_prob: float = 0.8
  gray_prob: float = 0.2
  area_range: Tuple[float, float] = (0.08, 1.0)
  blur_prob: float = 1.0                # for the views that get blurred (queries)
  blur_sigma: Tuple[float, float] = (0.1, 2.0)

  def check(self):
    if self.impl not in ("simclrv1", "simclrv2"):
      raise ValueError(f"simclr: impl must be 'simclrv1' or 'simclrv2', got {self.impl!r}")
    for name in ("color_prob", "gray_prob", "blur_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"simclr: {name} must be in [0, 1], got {getattr(self, name)}")
    if self.strength < 0 or 0.2 * self.strength > 0.5:
      raise ValueError(f"simclr: strength must be in [0, 2.5] (hue delta 0.2 * strength <= "
                       f"0.5), got {self.strength}")
    if not 0.0 < self.area_range[0] <= self.area_range[1] <= 1.0:
      raise ValueError(f"simclr: need 0 < area_range[0] <= area_range[1] <= 1, got "
                       f"{self.area_range}")
    if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
      raise ValueError(f"simclr: need 0 < blur_sigma[0] <= blur_sigma[1], got {self.blur_sigma}")
    return self


def _simclr_crop(img, seed, area_range):
  """SimCLR ``crop_and_resize``: TF's distorted-box sampler, then bicubic back to (H, W)."""
  tf = tf_host()
  shape = tf.shape(img)
  h, w = shape[0], shape[1]
  # SimCLR's aspect range is (3/4, 4/3) times w / h of the *output* size, which is the input
  # size here (static: the range is an op attribute).
  ar = img.shape[1] / img.shape[0] if None not in img.shape[:2] else 1.0
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]), seed=seed,
      min_object_covered=0.1, aspect_ratio_range=(3.0 / 4.0 * ar, 4.0 / 3.0 * ar),
      area_range=area_range, max_attempts=100, use_image_if_no_bounding_boxes=True)
  crop = tf.slice(img, begin, size)
  # Clipped here (SimCLR clips only after each colour op): the hue/saturation kernels give
  # different results eagerly and in graphs on bicubic overshoot outside [0, 1].
  out = tf.clip_by_value(tf.image.resize(crop, tf.stack([h, w]), method="bicubic"), 0.0, 1.0)
  out.set_shape(img.shape)
  return out


def _simclr_color(img, seed, cfg: SimclrAugment):
  """SimCLR ``random_color_jitter``: jitter (p=0.8, random order, clip after each op), then
  grey (p=0.2). ``img`` float in [0, 1]."""
  tf = tf_host()
  s = cfg.strength
  rgb = img.shape[-1] == 3
  s_apply, s_order, s_b, s_c, s_s, s_h, s_gray = _split(seed, 7)

  def brightness(x):
    if cfg.impl == "simclrv1":
      return tf.image.stateless_random_brightness(x, 0.8 * s, s_b)
    return x * _uniform(s_b, max(1.0 - 0.8 * s, 0.0), 1.0 + 0.8 * s)

  def contrast(x):
    return tf.image.stateless_random_contrast(x, 1.0 - 0.8 * s, 1.0 + 0.8 * s, s_c)

  def saturation(x):
    if not rgb:
      return x
    return tf.image.stateless_random_saturation(x, max(1.0 - 0.8 * s, 0.0), 1.0 + 0.8 * s, s_s)

  def hue(x):
    if not rgb:
      return x
    return tf.image.stateless_random_hue(x, 0.2 * s, s_h)

  ops = (brightness, contrast, saturation, hue)

  def jitter(x):
    order = tf.argsort(_uniform(s_order, shape=(4,)))
    for pos in range(4):
      x = tf.switch_case(order[pos], [lambda f=f, x=x: f(x) for f in ops])
      x = tf.clip_by_value(x, 0.0, 1.0)
    return x

  img = tf.cond(_uniform(s_apply) < cfg.color_prob, lambda: jitter(img), lambda: img)
  if rgb:
    gray = tf.tile(tf.image.rgb_to_grayscale(img), [1, 1, 3])
    img = tf.cond(_uniform(s_gray) < cfg.gray_prob, lambda: gray, lambda: img)
  return img


def simclr_blur(img, sigma):
  """SimCLR ``gaussian_blur``: separable, 2 * ((H // 10) // 2) + 1 taps, zero 'SAME' padding.
  ``img`` [H, W, C] float with a static height."""
  tf = tf_host()
  radius = (img.shape[0] // 10) // 2
  if radius == 0:
    return img
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  k = tf.exp(-tf.square(x) / (2.0 * tf.square(tf.cast(sigma, tf.float32))))
  k = k / tf.reduce_sum(k)
  c = img.shape[-1]
  kh = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, c, 1])
  kv = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, c, 1])
  out = tf.nn.depthwise_conv2d(img[None], kh, [1, 1, 1, 1], "SAME")
  out = tf.nn.depthwise_conv2d(out, kv, [1, 1, 1, 1], "SAME")
  return out[0]


def simclr_view(img, seed, cfg: SimclrAugment = SimclrAugment(), blur: bool = False):
  """One SimCLR view of ``img`` [H, W, C] (uint8 or float in [0, 255], static shape): crop,
  flip, colour, and (``blur``) Gaussian blur with probability ``cfg.blur_prob``. Returns
  float32 [0, 255]. The draws of each stage come from their own part of ``seed``, so a view
  with and without blur differs by the blur only."""
  tf = tf_host()
  shape = img.shape
  s_crop, s_flip, s_color, s_blur_apply, s_blur_sigma = _split(_as_seed(seed), 5)
  x = tf.cast(img, tf.float32) / 255.0
  if cfg.crop:
    x = _simclr_crop(x, s_crop, cfg.area_range)
  if cfg.flip:
    x = tf.image.stateless_random_flip_left_right(x, s_flip)
  if cfg.color:
    x = _simclr_color(x, s_color, cfg)
  x = tf.clip_by_value(x, 0.0, 1.0)
  if blur and cfg.blur_prob > 0:
    sigma = _uniform(s_blur_sigma, cfg.blur_sigma[0], cfg.blur_sigma[1])
    x = tf.cond(_uniform(s_blur_apply) < cfg.blur_prob,
                lambda: tf.clip_by_value(simclr_blur(x, sigma), 0.0, 1.0), lambda: x)
  out = x * 255.0
  out.set_shape(shape)
  return out


@preprocess.OPS.register("simclr_augment")
def simclr_augment_op(blur: bool = False, **kwargs):
  """Per-image SimCLR view (SC-Aug on a single image stream); ``kwargs``: ``SimclrAugment``."""
  cfg = _simclr_config(kwargs)
  return preprocess.image_op(lambda img, seed: simclr_view(img, seed, cfg, blur))


def _simclr_config(kwargs) -> SimclrAugment:
  bad = sorted(set(kwargs) - set(SimclrAugment._fields))
  if bad:
    raise ValueError(f"simclr: unknown settings {bad}; valid: {list(SimclrAugment._fields)}")
  return SimclrAugment(**kwargs).check()


# ------------------------------------------------------------------------------- BOHB-style

# AutoAugment-style op names; "TranslateX/Y" are relative to the image size.
BOHB_OPS = ("Rotate", "Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness",
            "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "ResizeJpeg")
_TIMM_NAMES = {"TranslateX": "TranslateXRel", "TranslateY": "TranslateYRel"}


class BohbPolicy(NamedTuple):
  """A variable number of stages, each one op from ``ops`` chosen uniformly, applied with
  probability ``probs.get(op, prob)`` at a level ~ U(magnitude) on AutoAugment's 0-10 scale.
  The defaults are placeholders (decision 6): BOHB's values were not available."""
  ops: Tuple[str, ...] = BOHB_OPS
  min_stages: int = 1
  max_stages: int = 3
  prob: float = 0.5
  probs: Tuple[Tuple[str, float], ...] = ()     # per-op overrides, e.g. (("ResizeJpeg", 0.3),)
  magnitude: Tuple[float, float] = (0.0, 10.0)
  translate_pct: float = 0.45                    # AutoAugment: 150 px of 331
  cutout_frac: float = 0.5                       # cutout side at level 10, of the short side
  fill: int = 128                                # AutoAugment's replace value
  interpolation: str = "bilinear"
  min_width: int = 10                            # resize/JPEG: smallest width (L709)
  jpeg_quality: Tuple[int, int] = (75, 100)      # inclusive (L709-710)

  def prob_of(self, op: str) -> float:
    return dict(self.probs).get(op, self.prob)

  def check(self):
    bad = [o for o in self.ops if o not in BOHB_OPS]
    if bad or not self.ops:
      raise ValueError(f"bohb: unknown ops {bad}; valid: {list(BOHB_OPS)}")
    bad = [o for o, _ in self.probs if o not in BOHB_OPS]
    if bad:
      raise ValueError(f"bohb: probs for unknown ops {bad}; valid: {list(BOHB_OPS)}")
    if not 0 <= self.min_stages <= self.max_stages:
      raise ValueError(f"bohb: need 0 <= min_stages <= max_stages, got {self.min_stages}, "
                       f"{self.max_stages}")
    for p in [self.prob] + [p for _, p in self.probs]:
      if not 0.0 <= p <= 1.0:
        raise ValueError(f"bohb: probabilities must be in [0, 1], got {p}")
    if not 0.0 <= self.magnitude[0] <= self.magnitude[1] <= 10.0:
      raise ValueError(f"bohb: need 0 <= magnitude[0] <= magnitude[1] <= 10, got "
                       f"{self.magnitude}")
    if not 0.0 <= self.cutout_frac <= 1.0 or not 0.0 <= self.translate_pct <= 1.0:
      raise ValueError("bohb: cutout_frac and translate_pct must be in [0, 1]")
    if not 0 <= self.fill <= 255:
      raise ValueError(f"bohb: fill must be in [0, 255], got {self.fill}")
    if self.interpolation not in ("bilinear", "bicubic"):
      raise ValueError(f"bohb: interpolation must be 'bilinear' or 'bicubic', got "
                       f"{self.interpolation!r}")
    if self.min_width < 1 or not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
      raise ValueError(f"bohb: need min_width >= 1 and 1 <= jpeg_quality[0] <= "
                       f"jpeg_quality[1] <= 100, got {self.min_width}, {self.jpeg_quality}")
    return self


def cutout(img, seed, size, fill=128):
  """A ``size`` x ``size`` square (clipped at the borders) centred uniformly in the image, set
  to ``fill`` (DeVries & Taylor; AutoAugment's cutout). uint8 in, uint8 out."""
  tf = tf_host()
  s_y, s_x = _split(seed, 2)
  h, w = tf.shape(img)[0], tf.shape(img)[1]
  cy = tf.random.stateless_uniform([], s_y, 0, h, dtype=tf.int32)
  cx = tf.random.stateless_uniform([], s_x, 0, w, dtype=tf.int32)
  half = size // 2
  rows = tf.range(h)[:, None, None]
  cols = tf.range(w)[None, :, None]
  inside = ((rows >= cy - half) & (rows < cy - half + size)
            & (cols >= cx - half) & (cols < cx - half + size))
  return tf.where(inside, tf.cast(fill, img.dtype), img)


def resize_jpeg(img, seed=None, min_width: int = 10, quality=(75, 100), ratio=None):
  """The authors' extra stage (L707-711): shrink by r ~ U(min_width / W, 1), JPEG at an
  integer quality ~ U{quality}, decode, resize back. ``ratio`` / an int ``quality`` fix the
  draws. uint8 [H, W, C] in, uint8 out."""
  tf = tf_host()
  img = augment._to_uint8(img)
  shape = img.shape
  h, w = tf.shape(img)[0], tf.shape(img)[1]
  hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
  s_ratio, s_quality = _split(_as_seed(0 if seed is None else seed), 2)
  if ratio is None:
    r_min = tf.minimum(float(min_width) / wf, 1.0)
    ratio = _uniform(s_ratio, 0.0, 1.0) * (1.0 - r_min) + r_min
  nh = tf.maximum(tf.cast(tf.round(hf * ratio), tf.int32), 1)
  nw = tf.maximum(tf.cast(tf.round(wf * ratio), tf.int32), 1)
  small = tf.image.resize(tf.cast(img, tf.float32), tf.stack([nh, nw]), "bilinear",
                          antialias=True)
  small = tf.cast(tf.clip_by_value(tf.round(small), 0.0, 255.0), tf.uint8)
  if isinstance(quality, int):
    q = tf.constant(quality, tf.int32)
  else:
    q = tf.random.stateless_uniform([], s_quality, quality[0], quality[1] + 1, dtype=tf.int32)
  small = tf.image.adjust_jpeg_quality(small, q)
  big = tf.image.resize(tf.cast(small, tf.float32), tf.stack([h, w]), "bilinear")
  out = tf.cast(tf.clip_by_value(tf.round(big), 0.0, 255.0), tf.uint8)
  out.set_shape(shape)
  return out


def apply_bohb_op(img, name: str, level, negate, seed, policy: BohbPolicy = BohbPolicy()):
  """One op of the policy at AutoAugment level ``level`` (0-10); uint8 in, uint8 out."""
  tf = tf_host()
  img = augment._to_uint8(img)
  level = tf.cast(level, tf.float64)
  if name == "Posterize":  # AutoAugment's 4-8 bits kept (timm's PosterizeOriginal)
    return augment.posterize(img, 4 + tf.cast(tf.floor(level / 10.0 * 4.0), tf.int32))
  if name == "Cutout":
    side = tf.cast(tf.round(level / 10.0 * policy.cutout_frac
                            * tf.cast(tf.reduce_min(tf.shape(img)[:2]), tf.float64)), tf.int32)
    return cutout(img, seed, side, policy.fill)
  if name == "ResizeJpeg":
    return resize_jpeg(img, seed, policy.min_width, policy.jpeg_quality)
  if name not in BOHB_OPS:
    raise ValueError(f"bohb: unknown op {name!r}; valid: {list(BOHB_OPS)}")
  # Rotate 30 deg, shear 0.3, translate pct, solarize threshold, enhance 0.1-1.9: timm's
  # level mappings, which are AutoAugment's.
  return augment.apply_rand_op(img, _TIMM_NAMES.get(name, name), level, negate,
                               policy.interpolation, policy.fill, policy.translate_pct)


_OUTLINED: Dict[tuple, list] = {}


def bohb_augment(img, seed, policy: BohbPolicy = BohbPolicy()):
  """The BOHB-style policy on one image [H, W, C] (uint8 or float [0, 255]); float32 out."""
  tf = tf_host()
  seed = _as_seed(seed)
  img = augment._to_uint8(img)
  shape = img.shape
  sig = [tf.TensorSpec([None, None, shape[-1]], tf.uint8), tf.TensorSpec([], tf.float64),
         tf.TensorSpec([], tf.bool), tf.TensorSpec([2], seed.dtype)]
  key = (policy, shape[-1], seed.dtype)
  if key not in _OUTLINED:  # traced once; a branch not taken costs one op (see augment.py)
    _OUTLINED[key] = [
        augment._outlined(lambda x, m, n, s, name=name: apply_bohb_op(x, name, m, n, s, policy),
                          sig) for name in policy.ops]
  ops = _OUTLINED[key]
  probs = tf.constant([policy.prob_of(o) for o in policy.ops], tf.float64)
  s_count, s_stages = _split(seed, 2)
  count = tf.random.stateless_uniform([], s_count, policy.min_stages, policy.max_stages + 1,
                                      dtype=tf.int32)
  for stage in range(policy.max_stages):
    s_op, s_apply, s_mag, s_sign, s_arg = _split(
        tf.random.experimental.stateless_fold_in(s_stages, stage), 5)
    op = tf.random.stateless_uniform([], s_op, 0, len(ops), dtype=tf.int32)
    apply = ((tf.random.stateless_uniform([], s_apply, dtype=tf.float64) < tf.gather(probs, op))
             & (stage < count))
    mag = tf.random.stateless_uniform([], s_mag, policy.magnitude[0], policy.magnitude[1],
                                      dtype=tf.float64)
    if policy.magnitude[0] == policy.magnitude[1]:
      mag = tf.constant(policy.magnitude[0], tf.float64)
    negate = tf.random.stateless_uniform([], s_sign, dtype=tf.float64) < 0.5
    branches = [lambda f=f, x=img: f(x, mag, negate, s_arg) for f in ops]
    branches.append(lambda x=img: tf.identity(x))
    img = tf.switch_case(tf.where(apply, op, len(ops)), branches)
    img.set_shape(shape)
  return tf.cast(img, tf.float32)


def _bohb_config(kwargs) -> BohbPolicy:
  bad = sorted(set(kwargs) - set(BohbPolicy._fields))
  if bad:
    raise ValueError(f"bohb: unknown settings {bad}; valid: {list(BohbPolicy._fields)}")
  kwargs = dict(kwargs)
  for k in ("ops", "magnitude", "jpeg_quality"):
    if k in kwargs:
      kwargs[k] = tuple(kwargs[k])
  if "probs" in kwargs:
    probs = kwargs["probs"]
    kwargs["probs"] = tuple(sorted((probs.items() if isinstance(probs, dict) else
                                    [tuple(p) for p in probs])))
  return BohbPolicy(**kwargs).check()


@preprocess.OPS.register("bohb_augment")
def bohb_augment_op(**kwargs):
  """Per-image BOHB-style augmentation; ``kwargs``: ``BohbPolicy`` fields."""
  policy = _bohb_config(kwargs)
  return preprocess.image_op(lambda img, seed: bohb_augment(img, seed, policy))


# ------------------------------------------------------------------------------- episodes


def _mask(mask, n):
  tf = tf_host()
  if mask is None:
    return tf.ones([n], tf.bool)
  return tf.cast(mask, tf.bool)


_MAPS: Dict[tuple, Callable] = {}


def _map_images(key, fn, images, mask, seed):
  """``fn(image, seed_i)`` on each real image (``seed_i`` = fold_in(seed, i)); zeros on
  padding, which costs nothing. float32 [N, H, W, C] out.

  The map is one graph function per (``key``, image spec), traced once and used both eagerly
  (instead of a slow Python loop of eager ops) and inside tf.data, so the two give the same
  pixels. ``key`` must identify ``fn`` (its kind and config)."""
  tf = tf_host()
  images = tf.convert_to_tensor(images)
  seed = _as_seed(seed)
  shape = images.shape[1:]
  cache_key = (key, tuple(shape), images.dtype, seed.dtype)
  if cache_key not in _MAPS:
    def run(imgs, real, s):
      def one(args):
        img, ok, i = args
        out = tf.cond(ok, lambda: tf.cast(fn(img, tf.random.experimental.stateless_fold_in(s, i)),
                                          tf.float32),
                      lambda: tf.zeros(tf.shape(img), tf.float32))
        out.set_shape(shape)
        return out
      return tf.map_fn(one, (imgs, real, tf.range(tf.shape(imgs)[0])),
                       fn_output_signature=tf.TensorSpec(shape, tf.float32))

    _MAPS[cache_key] = tf.function(run, autograph=False, input_signature=[
        tf.TensorSpec([None] + list(shape), images.dtype), tf.TensorSpec([None], tf.bool),
        tf.TensorSpec([2], seed.dtype)])
  out = _MAPS[cache_key](images, tf.cast(mask, tf.bool), seed)
  out.set_shape(images.shape[:1].concatenate(shape))
  return out


def _rank_within_group(groups, real, keys):
  """For each i, the number of real j in the same group with keys[j] < keys[i]."""
  tf = tf_host()
  same = tf.equal(groups[:, None], groups[None, :]) & real[None, :]
  before = keys[None, :] < keys[:, None]
  return tf.reduce_sum(tf.cast(same & before, tf.int32), axis=1)


def simclr_episode(support_images, seed, *, support_labels=None, query_labels=None,
                   support_mask=None, query_mask=None, num_queries=None,
                   select: str = "random", cfg: SimclrAugment = SimclrAugment()):
  """A SimCLR episode (paper L203-213) from a (padded) support set.

  Support image i becomes class i and is replaced by one view rho(x_i) (no blur). The
  queries are other views (crop + colour + blur) of distinct support images: per original
  class c, min(q_c, s_c) of its support images (``query_labels`` given: footnote 1), else
  ``num_queries`` chosen uniformly (decision 1). ``select``: 'random' within each class, or
  'first' (the official rule). Returns a dict of support_images [S, H, W, C] float32,
  support_labels [S] (i, or -1 on padding), support_mask, query_images [Q, H, W, C],
  query_labels [Q] (index of the source support image, -1 on padding), query_mask,
  query_class_labels [Q] (original class of the source, -1 on padding / when
  ``support_labels`` is None), is_simclr. Q = len(query_labels), or ``num_queries``.
  """
  tf = tf_host()
  cfg = cfg.check()
  if select not in ("random", "first"):
    raise ValueError(f"simclr_episode: select must be 'random' or 'first', got {select!r}")
  support_images = tf.convert_to_tensor(support_images)
  if support_images.shape.rank != 4 or None in support_images.shape[1:]:
    raise ValueError(f"simclr_episode: support_images must be [S, H, W, C] with static H, W, "
                     f"C, got {support_images.shape}")
  seed = _as_seed(seed)
  s_select, s_support, s_query = _split(seed, 3)
  n_support = tf.shape(support_images)[0]
  s_real = _mask(support_mask, n_support)
  if support_labels is None:
    classes = tf.zeros([n_support], tf.int32)
  else:
    classes = tf.cast(support_labels, tf.int32)

  if query_labels is not None:
    query_labels = tf.cast(query_labels, tf.int32)
    q_size = query_labels.shape[0] if query_labels.shape[0] is not None else tf.shape(query_labels)[0]
    q_real = _mask(query_mask, tf.shape(query_labels)[0])
    if support_labels is None:
      raise ValueError("simclr_episode: query_labels needs support_labels (footnote 1 matches "
                       "the query class distribution)")
    # q_c for the class of each support image.
    quota = tf.reduce_sum(tf.cast(tf.equal(classes[:, None], query_labels[None, :])
                                  & q_real[None, :], tf.int32), axis=1)
  else:
    if num_queries is None:
      raise ValueError("simclr_episode: give query_labels (same class distribution as Q) or "
                       "num_queries")
    q_size = num_queries
    quota = tf.fill([n_support], tf.cast(num_queries, tf.int32))

  if select == "first":
    keys = tf.range(n_support)
  else:  # a random permutation as keys: no ties
    keys = tf.argsort(tf.argsort(_uniform(s_select, shape=tf.reshape(n_support, [1]))))
  rank = _rank_within_group(classes, s_real, keys)
  keep = s_real & (rank < quota)
  source = tf.cast(tf.reshape(tf.where(keep), [-1]), tf.int32)  # in support order
  n_query = tf.minimum(tf.shape(source)[0], q_size)
  source = source[:n_query]
  pad = q_size - n_query
  q_out_real = tf.concat([tf.ones([n_query], tf.bool), tf.zeros([pad], tf.bool)], 0)
  query_source = tf.concat([source, -tf.ones([pad], tf.int32)], 0)
  if isinstance(q_size, int):  # fixed shapes for one compiled step
    q_out_real.set_shape([q_size])
    query_source.set_shape([q_size])
  query_src_images = tf.gather(support_images, tf.maximum(query_source, 0))

  sup = _map_images(("simclr", cfg, False), lambda x, s: simclr_view(x, s, cfg, blur=False),
                    support_images, s_real, s_support)
  qry = _map_images(("simclr", cfg, True), lambda x, s: simclr_view(x, s, cfg, blur=True),
                    query_src_images, q_out_real, s_query)
  support_idx = tf.where(s_real, tf.range(n_support), -1)
  if support_labels is None:
    query_class = -tf.ones([q_size], tf.int32)
  else:
    query_class = tf.where(q_out_real, tf.gather(classes, tf.maximum(query_source, 0)), -1)
  if isinstance(q_size, int):
    query_class.set_shape([q_size])
  return {"support_images": sup, "support_labels": support_idx, "support_mask": s_real,
          "query_images": qry, "query_labels": query_source, "query_mask": q_out_real,
          "query_class_labels": query_class, "is_simclr": tf.constant(True)}


def md_episode(episode, seed, support_augment: Optional[Tuple[tuple, Callable]] = None,
               query_augment: Optional[Tuple[tuple, Callable]] = None):
  """An MD-categorization episode in the common output format, each real image passed
  through ``*_augment = (key, fn)``'s ``fn(image, seed) -> image`` if given (float32
  [0, 255] out; ``key``: a hashable that identifies ``fn``, see ``_map_images``)."""
  tf = tf_host()
  seed = _as_seed(seed)
  s_support, s_query = _split(seed, 2)
  out = {k: tf.convert_to_tensor(v) for k, v in episode.items()}
  for part, fn, s in (("support", support_augment, s_support), ("query", query_augment, s_query)):
    images = tf.convert_to_tensor(episode[f"{part}_images"])
    real = _mask(episode.get(f"{part}_mask"), tf.shape(images)[0])
    labels = tf.cast(episode[f"{part}_labels"], tf.int32)
    if fn is None:
      images = tf.where(real[:, None, None, None], tf.cast(images, tf.float32), 0.0)
    else:
      images = _map_images(fn[0], fn[1], images, real, s)
    out[f"{part}_images"] = images
    out[f"{part}_labels"] = tf.where(real, labels, -1)
    out[f"{part}_mask"] = real
  out["query_class_labels"] = out["query_labels"]
  out["is_simclr"] = tf.constant(False)
  return out


def _simclr_from_episode(episode, seed, select, cfg):
  tf = tf_host()
  out = {k: tf.convert_to_tensor(v) for k, v in episode.items()}
  new = simclr_episode(episode["support_images"], seed,
                       support_labels=episode["support_labels"],
                       query_labels=episode["query_labels"],
                       support_mask=episode.get("support_mask"),
                       query_mask=episode.get("query_mask"), select=select, cfg=cfg)
  out.update(new)
  if "support_class_ids" in episode and "query_class_ids" in episode:
    src = new["query_labels"]
    ids = tf.gather(episode["support_class_ids"], tf.maximum(src, 0))
    out["query_class_ids"] = tf.where(src >= 0, ids, tf.cast(-1, ids.dtype))
  return out


def simclr_coin(seed, prob: float = 0.5):
  """The per-episode coin of ``maybe_simclr_episode``: True = SimCLR episode."""
  tf = tf_host()
  s_coin, _ = _split(_as_seed(seed), 2)
  return tf.random.stateless_uniform([], s_coin, dtype=tf.float32) < prob


def maybe_simclr_episode(episode, seed, prob: float = 0.5, *, select: str = "random",
                         cfg: SimclrAugment = SimclrAugment(),
                         md_augment: Optional[Tuple[tuple, Callable]] = None):
  """With probability ``prob`` (a coin from ``seed``) the SimCLR episode of ``episode``,
  otherwise the MD episode with ``md_augment = (key, fn)``'s ``fn(image, seed)`` (e.g.
  ``bohb_image_fn(policy)``) on each real image.
  Both have the same keys, dtypes and shapes (fixed by the input's padding)."""
  tf = tf_host()
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"maybe_simclr_episode: prob must be in [0, 1], got {prob}")
  seed = _as_seed(seed)
  _, s_rest = _split(seed, 2)
  coin = simclr_coin(seed, prob)

  def simclr():
    return _simclr_from_episode(episode, s_rest, select, cfg)

  def md():
    return md_episode(episode, s_rest, md_augment, md_augment)

  if prob == 0.0:
    return md()
  if prob == 1.0:
    return simclr()
  return tf.cond(coin, simclr, md)


# ----------------------------------------------------------------------- config registry


def _no_augment(**kwargs):
  if kwargs:
    raise ValueError(f"none: takes no settings, got {sorted(kwargs)}")
  return lambda episode, seed: md_episode(episode, seed)


def bohb_image_fn(policy: BohbPolicy = BohbPolicy()):
  """``(key, fn)`` for ``md_episode`` / ``maybe_simclr_episode``: the BOHB policy per image."""
  return ("bohb", policy), lambda img, s: bohb_augment(img, s, policy)


def simclr_image_fn(cfg: SimclrAugment = SimclrAugment(), blur: bool = False):
  """``(key, fn)`` for ``md_episode``: one SimCLR view per image (SC-Aug)."""
  return ("simclr", cfg, blur), lambda img, s: simclr_view(img, s, cfg, blur)


def _bohb_episodes(**kwargs):
  fn = bohb_image_fn(_bohb_config(kwargs))
  return lambda episode, seed: md_episode(episode, seed, fn, fn)


def _sc_aug(query_blur: bool = True, **kwargs):
  cfg = _simclr_config(kwargs)
  return lambda episode, seed: md_episode(episode, seed, simclr_image_fn(cfg, False),
                                          simclr_image_fn(cfg, query_blur))


def _simclr_episodes(prob: float = 0.5, md_augment: str = "none", select: str = "random",
                     bohb: Optional[dict] = None, **kwargs):
  cfg = _simclr_config(kwargs)
  if md_augment not in ("none", "bohb"):
    raise ValueError(f"simclr_episodes: md_augment must be 'none' or 'bohb', got {md_augment!r}")
  if bohb and md_augment != "bohb":
    raise ValueError("simclr_episodes: bohb settings given but md_augment is not 'bohb'")
  fn = None
  if md_augment == "bohb":
    fn = bohb_image_fn(_bohb_config(bohb or {}))
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"simclr_episodes: prob must be in [0, 1], got {prob}")
  return lambda episode, seed: maybe_simclr_episode(episode, seed, prob, select=select, cfg=cfg,
                                                    md_augment=fn)


EPISODE_AUGMENT.add("none", _no_augment)
EPISODE_AUGMENT.add("bohb", _bohb_episodes)
EPISODE_AUGMENT.add("sc_aug", _sc_aug)
EPISODE_AUGMENT.add("simclr_episodes", _simclr_episodes)


def parse(spec: str) -> Callable:
  """``"name(k=v, ...)"`` -> ``fn(episode, seed) -> episode``. Names: none, bohb (MD episodes
  with the BOHB policy; ``BohbPolicy`` fields), sc_aug (SimCLR views on MD episodes;
  ``SimclrAugment`` fields, ``query_blur``), simclr_episodes (``prob``, ``md_augment`` 'none'
  or 'bohb', ``bohb`` = dict of ``BohbPolicy`` fields, ``select``, ``SimclrAugment`` fields).
  E.g. CTX+SimCLR Eps+Aug: ``"simclr_episodes(prob=0.5, md_augment='bohb')"``."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"Episode augmentation spec must be a string like "
                     f"\"simclr_episodes(prob=0.5)\", got {spec!r}")
  try:
    node = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError:
    raise ValueError(f"Cannot parse episode augmentation {spec!r}; write name or name(k=v).") from None
  if isinstance(node, ast.Name):
    name, kwargs = node.id, {}
  elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
    name = node.func.id
    try:
      kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
      raise ValueError(f"Arguments of episode augmentation {spec!r} must be literals.") from None
  else:
    raise ValueError(f"Cannot parse episode augmentation {spec!r}; write name or name(k=v) "
                     "(keyword arguments only).")
  factory = EPISODE_AUGMENT.get(name)
  try:
    return factory(**kwargs)
  except TypeError as e:
    raise ValueError(f"Bad arguments for episode augmentation {spec!r}: {e}") from None
