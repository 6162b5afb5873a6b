"""RandAugment, random erasing, PIL-exact resizing/decoding, Mixup/CutMix against timm, and
repeated augmentation across devices and processes.

Reference semantics come from the installed timm / Pillow / torchvision. Photos are
scikit-image's sample images (``skimage.data``, shipped with the package; smooth random images
of the same sizes if scikit-image is missing).

Tolerances: colour ops, decoding and LUT ops must be *exactly* PIL's. Geometric ops are allowed a
difference of 1 on at most 1e-4 of the values: PIL computes each sample position and the
interpolated value in C doubles and truncates to uint8, so a value whose exact result is within
~1e-13 of an integer can truncate to either side depending on the order in which the compiler
evaluated the products (measured: <= 1e-5 of the values, all rotations). Resizing is allowed 1
on 1e-3: PIL's 8-bit resampling uses 22-bit fixed-point weights, we use float32 (measured:
<= 2e-4).
"""

import io
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from PIL import Image

from visrep_jax import losses
from visrep_jax.data import augment, mixing, pipeline, preprocess, sources, tf_host

tf = tf_host()
timm_aa = pytest.importorskip("timm.data.auto_augment")
try:
  import skimage.data as skd
except ImportError:  # the [test] extra installs scikit-image; without it, synthetic photos
  skd = None

_SHAPES = {"astronaut": (512, 512, 3), "chelsea": (300, 451, 3), "coffee": (400, 600, 3),
           "camera": (512, 512)}


def photo(name):
  """scikit-image's sample photo ``name``, or a smooth random image of the same shape."""
  if skd is not None:
    return getattr(skd, name)()
  shape = _SHAPES[name]
  rng = np.random.default_rng(sorted(_SHAPES).index(name))
  small = rng.uniform(0, 255, (shape[0] // 16 + 1, shape[1] // 16 + 1) + shape[2:])
  img = np.asarray(Image.fromarray(small.astype(np.uint8).squeeze()).resize(
      shape[1::-1], Image.BICUBIC), np.float64).reshape(shape)
  return np.clip(img + rng.normal(0, 8, shape), 0, 255).astype(np.uint8)


PHOTOS = {
    "astronaut": photo("astronaut")[::4, ::4],              # 128x128 RGB
    "chelsea": photo("chelsea")[::2, ::2],                  # 150x226 RGB
    "camera": photo("camera")[::4, ::4, None],              # 128x128 grey (1 channel)
}
FILL_RGB, FILL_GREY = (124, 116, 104), 117  # timm's img_mean for ImageNet; a grey level
ALL_OPS = sorted(set(augment.RAND_TRANSFORMS) | set(augment.RAND_INCREASING_TRANSFORMS))


def run_op(spec, image, seed=(1, 2)):
  fn = preprocess.parse(spec)
  ex = {"image": tf.constant(image), "label": tf.constant(0, tf.int64)}
  return fn(ex, tf.constant(seed, tf.int32))["image"].numpy()


def run_op_in_tfdata(spec, image, seed=(1, 2)):
  fn = preprocess.parse(spec)
  ds = tf.data.Dataset.from_tensors({"image": image, "label": np.int64(0)})
  ds = ds.map(lambda ex: fn(ex, tf.constant(seed, tf.int32)))
  return next(iter(ds))["image"].numpy()


def map_seeds(fn, n, batch=None):
  """``fn(seed) -> tensors`` over n per-example seeds in a tf.data pipeline (fast), stacked."""
  ds = tf.data.Dataset.range(n).map(
      lambda i: fn(tf.cast(tf.stack([i, 17]), tf.int32))).batch(batch or n)
  return tf.nest.map_structure(lambda x: x.numpy(), next(iter(ds)))


# ---------------------------------------------------------------------------------- RandAugment


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-p0.7-mmax15-mstd101",
                                  "rand-n1-inc0", "rand"])
def test_config_parsing_matches_timm(spec):
  cfg = augment.parse_rand_config(spec)
  ref = timm_aa.rand_augment_transform(spec, {"translate_const": 100, "img_mean": FILL_RGB})
  assert list(cfg.transforms) == [op.name for op in ref.ops]
  assert cfg.num_layers == ref.num_layers
  op = ref.ops[0]
  assert (cfg.prob, cfg.magnitude) == (op.prob, op.magnitude)
  assert cfg.magnitude_std == op.magnitude_std
  assert cfg.magnitude_max == (op.magnitude_max or 10)


@pytest.mark.parametrize("bad", ["rand-m9-x3", "rand-mfoo", "auto-m9", "rand-m9-tweights",
                                 "rand-p1.5"])
def test_config_errors_say_what_is_valid(bad):
  with pytest.raises(ValueError, match="randaugment"):
    augment.parse_rand_config(bad)
  with pytest.raises(ValueError, match="Bad arguments|randaugment"):
    preprocess.parse(f"randaugment({bad!r})")


def test_bad_arguments():
  with pytest.raises(ValueError, match="interpolation must be one of"):
    preprocess.parse("randaugment(interpolation='nearest')")
  with pytest.raises(ValueError, match="unknown fill preset .* valid"):
    preprocess.parse("randaugment(fill='imagenett')")
  with pytest.raises(ValueError, match="mode must be one of"):
    preprocess.parse("random_erasing(mode='noise')")
  with pytest.raises(ValueError, match="min_area <= max_area"):
    preprocess.parse("random_erasing(min_area=0.5, max_area=0.1)")
  with pytest.raises(ValueError, match="Unknown RandAugment op"):
    augment.apply_rand_op(PHOTOS["camera"], "Blur", 5.0)


def timm_reference(name, img, magnitude, negate, interpolation, fill):
  """timm's op ``name`` at ``magnitude`` (sign forced) on a PIL image, as a numpy array."""
  orig = timm_aa._randomly_negate
  timm_aa._randomly_negate = (lambda v: -v) if negate else (lambda v: v)
  try:
    level_fn = timm_aa.LEVEL_TO_ARG[name]
    args = level_fn(magnitude, {"translate_pct": 0.45}) if level_fn else ()
  finally:
    timm_aa._randomly_negate = orig
  pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
  if name.startswith("Posterize") and args[0] == 0:
    out = np.zeros_like(np.asarray(pil))  # Pillow >= 10 raises for 0 bits; older gave black
  else:
    resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    out = np.asarray(timm_aa.NAME_TO_OP[name](pil, *args, fillcolor=fill, resample=resample))
  return out.reshape(img.shape).astype(np.int32)


@pytest.mark.parametrize("name", ALL_OPS)
def test_each_op_matches_timm_and_pil(name):
  geometric = name in augment.GEOMETRIC
  signed = geometric or (name.endswith("Increasing")
                         and not name.startswith(("Posterize", "Solarize")))
  for photo, img in PHOTOS.items():
    fill = FILL_GREY if img.shape[-1] == 1 else FILL_RGB
    for magnitude in (0.0, 3.7, 9.0, 10.0):
      for negate in ((False, True) if signed else (False,)):
        for interpolation in (("bilinear", "bicubic") if geometric else ("bicubic",)):
          ref = timm_reference(name, img, magnitude, negate, interpolation, fill)
          out = augment.apply_rand_op(tf.constant(img), name, magnitude, negate, interpolation,
                                      fill=fill).numpy().astype(np.int32)
          where = f"{name} on {photo}, m={magnitude}, negate={negate}, {interpolation}"
          assert out.shape == img.shape and out.dtype == np.int32, where
          diff = np.abs(out - ref)
          if geometric:
            assert diff.max() <= 1 and (diff > 0).mean() <= 1e-4, (where, diff.max(),
                                                                    (diff > 0).mean())
          else:
            assert diff.max() == 0, (where, diff.max(), (diff > 0).mean())


def test_fill_is_timm_img_mean_and_works_for_grey_images():
  assert augment.fill_values("imagenet", 3) == (124.0, 116.0, 104.0)
  assert augment.fill_values("fashion_mnist", 1) == (73.0,)
  assert augment.fill_values((10, 20, 30), 3) == (10.0, 20.0, 30.0)
  assert augment.fill_values(50, 3) == (50.0, 50.0, 50.0)
  # PIL's convert('L') of the ImageNet mean colour, for 1-channel images.
  grey = np.asarray(Image.new("RGB", (1, 1), FILL_RGB).convert("L"))[0, 0]
  assert augment.fill_values("imagenet", 1) == (float(grey),)
  # A big translation fills most of the image with the fill colour.
  out = augment.apply_rand_op(PHOTOS["astronaut"], "TranslateXRel", 10.0).numpy()
  np.testing.assert_array_equal(out[:, -57:], np.broadcast_to(FILL_RGB, out[:, -57:].shape))
  assert not np.any(np.all(out[:, :-58] == FILL_RGB, axis=(0, 2)))  # x + 57.6 < 128: moved in


RANDOM_SPECS = ["randaugment", "randaugment('rand-m9-mstd0.5-inc1', interpolation='random')",
                "randaugment('rand-m9-mstd101-n3-p1.0')", "normalize('none')|random_erasing(1.0)",
                "normalize('none')|random_erasing(1.0, mode='rand', max_count=3)",
                "normalize('none')|random_erasing(1.0, mode='const')"]


@pytest.mark.parametrize("spec", RANDOM_SPECS)
@pytest.mark.parametrize("photo", ["chelsea", "camera"])
def test_ops_eager_equal_tfdata_deterministic_seed_dependent(spec, photo):
  img = PHOTOS[photo]
  a = run_op(spec, img)
  np.testing.assert_array_equal(a, run_op_in_tfdata(spec, img))
  np.testing.assert_array_equal(a, run_op(spec, img))
  assert a.shape == img.shape and a.dtype == np.float32
  if spec.startswith("randaugment"):
    assert a.min() >= 0 and a.max() <= 255 and np.all(a == np.round(a))
  outs = [run_op(spec, img, seed=(s, 5)) for s in range(4)]
  assert any(not np.array_equal(outs[0], o) for o in outs[1:])


def test_randaugment_applies_the_sampled_ops_in_order():
  cfg = augment.parse_rand_config("rand-m9-mstd0.5-inc1-n3")
  img = PHOTOS["astronaut"]
  for s in range(4):
    seed = tf.constant([s, 99], tf.int32)
    op = augment.randaugment("rand-m9-mstd0.5-inc1-n3", interpolation="random")
    out = op({"image": tf.constant(img)}, seed)["image"].numpy()
    p = augment.sample_rand_params(seed, cfg)
    ref = tf.constant(img)
    for layer in range(3):
      if p.apply[layer]:
        interp = "bicubic" if p.bicubic[layer] else "bilinear"
        ref = augment.apply_rand_op(ref, cfg.transforms[int(p.op[layer])], p.magnitude[layer],
                                    p.negate[layer], interp)
    np.testing.assert_array_equal(out, ref.numpy().astype(np.float32))


def test_randaugment_draws_match_timm_distribution():
  n = 6000
  cfg = augment.parse_rand_config("rand-m9-mstd0.5-inc1")
  p = map_seeds(lambda s: augment.sample_rand_params(s, cfg)._asdict(), n)
  ops, applied = p["op"].ravel(), p["apply"].ravel()
  # Ops chosen uniformly with replacement from the 15 (std of a count: ~sqrt(800) = 28).
  counts = np.bincount(ops, minlength=15)
  assert counts.shape == (15,) and np.all(np.abs(counts - 2 * n / 15) < 5 * 28), counts
  assert np.mean(p["op"][:, 0] == p["op"][:, 1]) == pytest.approx(1 / 15, abs=0.015)
  assert applied.mean() == pytest.approx(0.5, abs=0.02)
  # Each op runs on 1 - (1 - 0.5 / 15)^2 = 6.6% of the images.
  per_op = [np.mean(np.any((p["op"] == k) & p["apply"], axis=1)) for k in range(15)]
  assert np.all(np.abs(np.array(per_op) - (1 - (1 - 0.5 / 15) ** 2)) < 0.018), per_op
  mag = p["magnitude"].ravel()
  assert mag.min() >= 0.0 and mag.max() <= 10.0
  assert mag.mean() == pytest.approx(9.0, abs=0.03)  # N(9, 0.5) clipped at 10 (+2.3% at 10)
  assert np.mean(mag == 10.0) == pytest.approx(0.0228, abs=0.007)
  assert mag[mag < 10].std() == pytest.approx(0.46, abs=0.03)
  assert p["negate"].mean() == pytest.approx(0.5, abs=0.02)
  uniform = map_seeds(lambda s: augment.sample_rand_params(
      s, augment.parse_rand_config("rand-m9-mstd101")).magnitude, 2000)
  assert uniform.min() >= 0 and uniform.max() <= 9  # mstd > 100: magnitude ~ U(0, m)
  assert uniform.mean() == pytest.approx(4.5, abs=0.15)


def test_randaugment_grey_images_in_a_pipeline():
  """Fashion-MNIST-like 1-channel uint8 images through a training spec."""
  img = tf.constant(PHOTOS["camera"][::4, ::4])  # 32x32x1
  op = preprocess.parse("decode(1)|random_crop(28, pad=2)|randaugment(fill='fashion_mnist')|"
                        "normalize('fashion_mnist')|random_erasing(0.25)")
  outs = map_seeds(lambda s: op({"image": img}, s)["image"], 64)
  assert outs.shape == (64, 28, 28, 1) and np.isfinite(outs).all()
  assert len({o.tobytes() for o in outs}) > 48  # equal only for equal crops and no-op draws


# ------------------------------------------------------------------------------- random erasing


def erased_boxes(n, h, w, spec, value=1.0):
  """random_erasing (const mode) on constant images: per draw the erased box, or None."""
  op = preprocess.parse(spec)
  img = tf.fill([h, w, 3], value)
  outs = map_seeds(lambda s: op({"image": img}, s)["image"], n)
  boxes = []
  for out in outs:
    mask = np.any(out != value, axis=-1)
    if not mask.any():
      boxes.append(None)
      continue
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    box = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
    assert mask.sum() == (box[1] - box[0]) * (box[3] - box[2])  # one filled rectangle
    boxes.append(box)
  return boxes


def test_random_erasing_rate_and_box_bounds():
  h = w = 64
  boxes = erased_boxes(1600, h, w, "random_erasing(0.25, mode='const')")
  hit = [b for b in boxes if b is not None]
  assert len(hit) / len(boxes) == pytest.approx(0.25, abs=0.045)  # 4 std of the rate
  for y0, y1, x0, x1 in hit:
    bh, bw = y1 - y0, x1 - x0
    # h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)): bounds up to rounding.
    assert (math.sqrt(0.02 * h * w) - 1) ** 2 <= bh * bw * 1.0 <= (math.sqrt(h * w / 3) + 1) ** 2
    assert 0.3 * (bw - 0.5) / (bh + 0.5) <= 1.0 and (bh - 0.5) / (bw + 0.5) <= 1 / 0.3
    assert bh < h and bw < w
  areas = np.array([(b[1] - b[0]) * (b[3] - b[2]) for b in hit]) / (h * w)
  assert areas.mean() == pytest.approx((0.02 + 1 / 3) / 2, abs=0.02)  # area ~ U(0.02, 1/3)


def timm_erase_rate(h, w, n, **kw):
  import torch
  from timm.data.random_erasing import RandomErasing
  import random
  random.seed(0)
  torch.manual_seed(0)
  re = RandomErasing(probability=1.0, mode="const", device="cpu", **kw)
  hits = 0
  for _ in range(n):
    x = torch.ones(3, h, w)
    re(x)
    hits += int((x != 1).any())
  return hits / n


def test_random_erasing_ten_attempts_like_timm():
  """On a 4x100 image most tries do not fit: the success rate measures the 10-attempt rule."""
  n = 1500
  boxes = erased_boxes(n, 4, 100, "random_erasing(1.0, mode='const')")
  ours = np.mean([b is not None for b in boxes])
  ref = timm_erase_rate(4, 100, n)
  assert 0.3 < ref < 0.95  # the case really tests the attempts
  assert ours == pytest.approx(ref, abs=4 * math.sqrt(2 * 0.25 / n))


def test_random_erasing_values():
  h, w = 96, 96
  ones = np.ones((h, w, 3), np.float32)
  for s in range(3):
    out = run_op("random_erasing(1.0, mode='pixel')", ones, seed=(s, 0))
    region = out[np.any(out != 1.0, axis=-1)]
    assert region.size >= 0.02 * h * w * 3 * 0.9
    assert abs(region.mean()) < 0.2 and 0.8 < region.std() < 1.2  # N(0, 1) per pixel/channel
    assert len(np.unique(region)) > 0.9 * region.size
    out = run_op("random_erasing(1.0, mode='rand')", ones, seed=(s, 0))
    region = out[np.any(out != 1.0, axis=-1)]
    assert np.all(region == region[0]) and not np.allclose(region[0], region[0][0])
    out = run_op("random_erasing(1.0, mode='const')", ones, seed=(s, 0))
    assert set(np.unique(out)) == {0.0, 1.0}
  # count ~ U{1..3} boxes, each of area U(0.02, 1/3) * HW / count.
  op = preprocess.parse("random_erasing(1.0, mode='const', max_count=3)")
  masks = map_seeds(lambda s: op({"image": tf.ones([64, 64, 1])}, s)["image"], 300)[..., 0] == 0
  fractions = masks.mean(axis=(1, 2))
  assert fractions.min() > 0.0 and fractions.max() <= 1 / 3 + 0.05
  rects = [m.sum() == m.any(1).sum() * m.any(0).sum() for m in masks]
  assert 0.2 < np.mean(rects) < 0.8  # one box (or overlapping boxes) vs several


def test_three_augment_picks_each_op_a_third_of_the_time():
  img = tf.constant(PHOTOS["astronaut"][:16, :16].astype(np.float32))
  op = preprocess.parse("three_augment")
  outs = map_seeds(lambda s: op({"image": img}, s)["image"], 900)
  grey = np.repeat((img.numpy() @ np.array([0.299, 0.587, 0.114], np.float32))[..., None], 3, -1)
  sol = np.where(img.numpy() >= 128, 255 - img.numpy(), img.numpy())
  is_grey = np.all(np.abs(outs - grey) < 1e-3, axis=(1, 2, 3))
  is_sol = np.all(outs == sol, axis=(1, 2, 3))
  rates = [is_grey.mean(), is_sol.mean(), 1 - is_grey.mean() - is_sol.mean()]
  assert np.allclose(rates, 1 / 3, atol=0.065), rates  # 4 std of a rate over 900 draws


# ------------------------------------------------------------------ decoding and resizing vs PIL


def jpeg(img, subsampling=0, quality=90):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, "JPEG", quality=quality, subsampling=subsampling)
  return buf.getvalue()


def test_decode_is_pils_decode():
  for sub in (0, 2):
    data = jpeg(photo("chelsea"), sub)
    ours = run_op("decode", tf.constant(data))
    np.testing.assert_array_equal(ours, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_resize_is_pils_resize(method):
  """Bit-exact (``resize``, ``center_crop``, ...); the fast path of random_resized_crop may
  flip one level where PIL's fixed-point sum is within ~1e-5 of a half (float32 sums)."""
  resample = Image.BICUBIC if method == "bicubic" else Image.BILINEAR
  img = photo("coffee")
  for crop, size in [((0, 0, 400, 600), (224, 224)), ((13, 40, 150, 170), (224, 224)),
                     ((5, 7, 256, 256), (224, 224)), ((0, 0, 28, 28), (224, 224)),
                     ((5, 7, 300, 250), (96, 120))]:
    y, x, h, w = crop
    part = img[y:y + h, x:x + w]
    ref = np.asarray(Image.fromarray(part).resize(size[::-1], resample)).astype(int)
    np.testing.assert_array_equal(run_op(f"resize({size}, method={method!r})", part), ref)
    if method == "bicubic":  # random_resized_crop's fast path (its default method)
      fast = preprocess._resize(tf.constant(part), size, method, exact=False).numpy()
      diff = np.abs(fast - ref)
      assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (crop, (diff > 0).mean())
  # DeiT's evaluation transform: Resize(int(224 / 0.875), bicubic) + CenterCrop(224).
  from torchvision import transforms as T
  ref = T.Compose([T.Resize(256, T.InterpolationMode.BICUBIC), T.CenterCrop(224)])(
      Image.fromarray(img))
  np.testing.assert_array_equal(run_op("center_crop(224, crop_ratio=0.875)", img), np.asarray(ref))


def test_decode_fused_with_random_resized_crop():
  """``decode|random_resized_crop`` decodes only the crop window: same window and pixels (PNG,
  4:4:4 JPEG); 4:2:0 JPEGs differ by a few levels at the window's edge only."""
  img = photo("astronaut")
  dec, rrc = preprocess.build_op("decode"), preprocess.build_op("random_resized_crop(64)")
  fused = rrc.with_decode(dec)
  png = io.BytesIO()
  Image.fromarray(img).save(png, "PNG")
  for data, exact in [(png.getvalue(), True), (jpeg(img, 0), True), (jpeg(img, 2), False)]:
    for s in range(4):
      seed = tf.constant([s, 3], tf.int32)
      ex = {"image": tf.constant(data), "label": tf.constant(0, tf.int64)}
      a = fused(ex, seed)["image"].numpy()
      b = rrc(dec(ex, seed), seed)["image"].numpy()
      if exact:
        np.testing.assert_array_equal(a, b)
      else:
        assert np.abs(a - b).max() <= 8 and np.mean(np.abs(a - b) > 0) < 0.2
  # parse() fuses: decode is step 0, the crop keeps its own seed (step 1).
  seed = tf.constant([7, 7], tf.int32)
  ex = {"image": tf.constant(jpeg(img, 0)), "label": tf.constant(0, tf.int64)}
  np.testing.assert_array_equal(
      preprocess.parse("decode|random_resized_crop(64)")(ex, seed)["image"].numpy(),
      fused(ex, tf.random.experimental.stateless_fold_in(seed, 1))["image"].numpy())


# -------------------------------------------------------------------------------- Mixup / CutMix


_MIX = {}


def mix(seed, images, targets, **kw):
  key = tuple(sorted(kw.items()))
  if key not in _MIX:  # one compilation per setting
    _MIX[key] = jax.jit(lambda r, x, t: mixing.mix_batch(r, x, t, **kw))
  return _MIX[key](jax.random.PRNGKey(seed), images, targets)


def test_mixed_targets_sum_to_one_and_cutmix_area_is_lambda():
  b, h, w, k = 8, 12, 10, 5
  images = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None], (b, h, w, 1))
  targets = jax.nn.one_hot(jnp.arange(b) % k, k)
  for seed in range(25):
    out, t, lam = mix(seed, images, targets, mixup_alpha=0.8, cutmix_alpha=1.0)
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
    assert 0.0 <= lam <= 1.0
    out, t, lam = mix(seed, images, targets, cutmix_alpha=1.0)
    partner = np.asarray(out[0, ..., 0]) == b - 1
    assert np.all(np.asarray(out[0, ..., 0])[~partner] == 0)
    # correct_lam: lambda is exactly 1 - (pasted area) / (H W), and the box is a rectangle.
    assert float(lam) == pytest.approx(1.0 - partner.mean(), abs=1e-6)
    if partner.any():
      rows, cols = np.nonzero(partner.any(1))[0], np.nonzero(partner.any(0))[0]
      assert partner.sum() == len(rows) * len(cols)
    np.testing.assert_allclose(t, lam * targets + (1 - lam) * targets[::-1], rtol=1e-6)


@pytest.mark.parametrize("cutmix", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_cutmix_with_smoothing_equals_timm(cutmix, smoothing, monkeypatch):
  """Our loss smooths the mixed targets; timm smooths the one-hots then mixes: identical."""
  import torch
  import timm.data.mixup as timm_mixup
  from timm.loss import SoftTargetCrossEntropy
  b, h, w, k = 6, 16, 16, 10
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, h, w, 3)).astype(np.float32)
  labels = rng.integers(0, k, b)
  logits = rng.normal(size=(b, k)).astype(np.float32)
  kw = dict(mixup_alpha=0.0, cutmix_alpha=1.0) if cutmix else dict(mixup_alpha=0.8)
  for seed in range(5):
    out, t, lam = mix(seed, jnp.asarray(x), jax.nn.one_hot(labels, k), **kw)
    out, t, lam = np.asarray(out), np.asarray(t), float(lam)
    if lam == 1.0:
      continue
    ref = timm_mixup.Mixup(mixup_alpha=kw["mixup_alpha"], cutmix_alpha=kw.get("cutmix_alpha", 0.0),
                           label_smoothing=smoothing, num_classes=k)
    monkeypatch.setattr(ref, "_params_per_batch", lambda: (0.5 if cutmix else lam, cutmix))
    if cutmix:  # timm's box = ours (read off the output), then timm recomputes lam from it
      pasted = np.any(out != x, axis=(0, 3))
      rows, cols = np.nonzero(pasted.any(1))[0], np.nonzero(pasted.any(0))[0]
      box = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) if pasted.any() else (0, 0, 0, 0)
      monkeypatch.setattr(timm_mixup, "rand_bbox", lambda *a, **kw: box)
    xt, tt = ref(torch.tensor(x).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels))
    np.testing.assert_allclose(out, xt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    ours = losses.smooth_labels(jnp.asarray(t), smoothing)
    np.testing.assert_allclose(ours, tt.numpy(), atol=1e-6)
    loss = losses.LOSSES.get("softmax_xent")(jnp.asarray(logits), jnp.asarray(t),
                                             label_smoothing=smoothing)
    ref_loss = SoftTargetCrossEntropy()(torch.tensor(logits), tt)
    assert float(loss.mean()) == pytest.approx(float(ref_loss), rel=1e-5)


def test_mix_batch_bad_arguments():
  with pytest.raises(ValueError, match="must be >= 0"):
    mixing.mix_batch(jax.random.PRNGKey(0), jnp.zeros((2, 4, 4, 1)), jnp.zeros((2, 3)),
                     mixup_alpha=-1.0)


# ---------------------------------------------------------------------- repeated augmentation


class StreamingSource(sources.ArraySource):
  """The same arrays without random access: exercises the streaming (TFDS-like) path."""
  random_access = False


def unique_source(n=48, streaming=False):
  rng = np.random.default_rng(0)
  images = rng.integers(1, 200, (n, 6, 6, 1), dtype=np.uint8)
  labels = np.arange(n)  # the label identifies the image
  cls = StreamingSource if streaming else sources.ArraySource
  return cls({"train": (images, labels)}, n)


SPEC = "decode(1)|color_jitter(0.5)"  # a continuous random factor: copies differ if seeds differ


def global_batches(src, processes, shards, steps, start_step=0, batch=24, r=3):
  per_process = []
  for p in range(processes):
    ti = pipeline.make_train(src, "train", SPEC, batch, seed=0, start_step=start_step,
                             repeated_aug=r, process_index=p, process_count=processes,
                             num_shards=shards, shuffle_buffer=16)
    per_process.append([next(ti.iterator) for _ in range(steps)])
  return [{k: np.concatenate([pp[s][k] for pp in per_process]) for k in ("image", "label")}
          for s in range(steps)]


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_repeated_copies_land_on_different_devices_and_processes(shards):
  n, r, g = 48, 3, 24
  src = unique_source(n)
  runs = {p: global_batches(src, p, shards, steps=6) for p in ((1, 2) if shards > 1 else (1,))}
  batches = runs[1]
  for p, other in runs.items():  # the same global batches whatever the number of processes
    for a, b in zip(batches, other):
      np.testing.assert_array_equal(a["image"], b["image"])
  seen = []
  for b in batches:
    shard_of = np.repeat(np.arange(shards), g // shards)
    for label in np.unique(b["label"]):
      at = np.nonzero(b["label"] == label)[0]
      assert len(at) == r  # all r copies in this batch (g is a multiple of r)
      assert len(set(shard_of[at])) == min(r, shards)  # round-robin over the devices
      if shards == 4:  # devices 0-1 on process 0, 2-3 on process 1: copies on both
        assert len(set(shard_of[at] // 2)) == 2
      copies = b["image"][at]
      assert not np.array_equal(copies[0], copies[1]) and not np.array_equal(copies[1], copies[2])
    seen.extend(b["label"].tolist())
  # 6 steps = 3 epochs of 48 examples: every image exactly r times, 16 distinct per epoch.
  assert sorted(np.bincount(seen, minlength=n)) == [r] * n
  assert len(set(seen[:n])) == n // r


def test_repeated_aug_resume_and_r1_ignores_shards():
  src = unique_source()
  full = global_batches(src, 2, 4, steps=5)
  resumed = global_batches(src, 2, 4, steps=2, start_step=3)
  for a, b in zip(full[3:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
  plain = [global_batches(src, 1, s, steps=2, r=1) for s in (1, 4)]
  np.testing.assert_array_equal(plain[0][1]["image"], plain[1][1]["image"])


@pytest.mark.parametrize("processes", [1, 2])
def test_repeated_aug_streaming_source_deals_copies_over_local_devices(processes):
  src = unique_source(streaming=True)
  shards, g, r = 4, 24, 3
  local_shards = shards // processes
  for p in range(processes):
    ti = pipeline.make_train(src, "train", SPEC, g, seed=0, repeated_aug=r, process_index=p,
                             process_count=processes, num_shards=shards)
    for _ in range(3):
      b = next(ti.iterator)
      shard_of = np.repeat(np.arange(local_shards), g // shards)
      for label in np.unique(b["label"]):
        at = np.nonzero(b["label"] == label)[0]
        assert len(set(shard_of[at])) == min(len(at), local_shards)


def test_num_shards_errors():
  src = unique_source()
  with pytest.raises(ValueError, match="num_shards=5 must be >= 1 and divide the global batch"):
    pipeline.make_train(src, "train", SPEC, 24, seed=0, repeated_aug=3, num_shards=5)
  with pytest.raises(ValueError, match="multiple of the 4 processes"):
    pipeline.make_train(src, "train", SPEC, 24, seed=0, repeated_aug=3, num_shards=2,
                        process_index=0, process_count=4)
