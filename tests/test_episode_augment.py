"""SimCLR episodes, SC-Aug and the BOHB-style augmentation (``data/episode_augment.py``)."""

import math

import numpy as np
import pytest

from visrep_jax.data import episode_augment as ea
from visrep_jax.data import preprocess, tf_host
from visrep_jax.registry import UnknownNameError

tf = tf_host()

# Support: classes 0 (3 images), 1 (2), 2 (1), then 2 padding slots. Queries: class 0 x2,
# class 1 x3 (more than its 2 supports), class 2 x2 (more than its 1), then 1 padding slot.
SUPPORT_LABELS = np.array([0, 1, 0, 2, 1, 0, 0, 0])
SUPPORT_MASK = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)
QUERY_LABELS = np.array([1, 0, 1, 2, 0, 1, 2, 0])
QUERY_MASK = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)
EXPECTED_QUOTA = {0: 2, 1: 2, 2: 1}   # min(q_c, s_c)


def smooth_noise(n, size, seed=0, channels=3):
  """Images with both smooth structure and fine detail, uint8."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (n, size // 4, size // 4, channels))
  img = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
  return np.clip(img + rng.normal(0, 30, img.shape), 0, 255).astype(np.uint8)


def episode(size=24, seed=0):
  n = len(SUPPORT_LABELS)
  return {"support_images": smooth_noise(n, size, seed), "support_labels": SUPPORT_LABELS,
          "support_mask": SUPPORT_MASK,
          "query_images": smooth_noise(len(QUERY_LABELS), size, seed + 1),
          "query_labels": QUERY_LABELS, "query_mask": QUERY_MASK,
          "support_class_ids": SUPPORT_LABELS + 100, "query_class_ids": QUERY_LABELS + 100}


def simclr(ep, seed, **kwargs):
  return ea.simclr_episode(ep["support_images"], seed, support_labels=ep["support_labels"],
                           query_labels=ep["query_labels"], support_mask=ep["support_mask"],
                           query_mask=ep["query_mask"], **kwargs)


def highpass_energy(img):
  """Mean squared response of a discrete Laplacian, per image ([N, H, W, C] -> [N])."""
  x = np.asarray(img, np.float64)
  lap = (4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2]
         - x[:, 1:-1, 2:])
  return (lap ** 2).mean(axis=(1, 2, 3))


NO_AUG = ea.SimclrAugment(crop=False, flip=False, color=False, blur_prob=0.0)


# ----------------------------------------------------------------------------- SimCLR episodes


@pytest.mark.parametrize("select", ["random", "first"])
def test_simclr_episode_shapes_masks_and_labels(select):
  ep = episode()
  out = {k: v.numpy() for k, v in simclr(ep, 3, select=select).items()}
  s, q = len(SUPPORT_LABELS), len(QUERY_LABELS)
  assert out["support_images"].shape == (s, 24, 24, 3)
  assert out["query_images"].shape == (q, 24, 24, 3)
  assert out["support_images"].dtype == np.float32 and out["query_images"].dtype == np.float32
  for key in ("support_images", "query_images"):
    assert out[key].min() >= 0.0 and out[key].max() <= 255.0
  assert out["is_simclr"]
  # Each real support image is its own class; padding stays padding.
  np.testing.assert_array_equal(out["support_mask"], SUPPORT_MASK)
  np.testing.assert_array_equal(out["support_labels"], np.where(SUPPORT_MASK, np.arange(s), -1))
  assert not out["support_images"][~SUPPORT_MASK].any()
  # Queries: min(q_c, s_c) distinct real support images per original class, then padding.
  n_real = sum(EXPECTED_QUOTA.values())
  np.testing.assert_array_equal(out["query_mask"], np.arange(q) < n_real)
  src = out["query_labels"][:n_real]
  assert (out["query_labels"][n_real:] == -1).all()
  assert not out["query_images"][n_real:].any()
  assert len(set(src)) == n_real and SUPPORT_MASK[src].all()
  counts = {c: int((SUPPORT_LABELS[src] == c).sum()) for c in EXPECTED_QUOTA}
  assert counts == EXPECTED_QUOTA
  np.testing.assert_array_equal(out["query_class_labels"][:n_real], SUPPORT_LABELS[src])
  if select == "first":  # the official rule: the first images of each class, in support order
    np.testing.assert_array_equal(src, [0, 1, 2, 3, 4])


def test_simclr_queries_are_views_of_their_source():
  """With rho reduced to the identity, each query is exactly its source support image."""
  ep = episode()
  out = simclr(ep, 5, cfg=NO_AUG)
  n_real = int(out["query_mask"].numpy().sum())
  src = out["query_labels"].numpy()[:n_real]
  real = SUPPORT_MASK
  np.testing.assert_allclose(out["support_images"].numpy()[real],
                             ep["support_images"][real].astype(np.float32), atol=1e-3)
  np.testing.assert_allclose(out["query_images"].numpy()[:n_real],
                             ep["support_images"][src].astype(np.float32), atol=1e-3)


def test_simclr_labels_survive_crop_flip_and_blur():
  """Constant images of distinct grey levels keep their level through crop, flip and blur
  (the blur's zero padding only touches the border): each query's centre pixel must equal
  that of the support image its label points to, and no other."""
  n = len(SUPPORT_LABELS)
  levels = 20.0 + 25.0 * np.arange(n)
  images = np.broadcast_to(levels[:, None, None, None], (n, 40, 40, 3)).astype(np.uint8)
  ep = dict(episode(), support_images=images)
  cfg = ea.SimclrAugment(color=False, blur_prob=1.0)
  for seed in range(3):
    out = simclr(ep, seed, cfg=cfg)
    mask = out["query_mask"].numpy()
    centre = out["query_images"].numpy()[mask][:, 20, 20, 0]
    src = out["query_labels"].numpy()[mask]
    np.testing.assert_allclose(centre, levels[src], atol=0.5)
    sup = out["support_images"].numpy()[:, 20, 20, 0]
    np.testing.assert_allclose(sup[SUPPORT_MASK], levels[SUPPORT_MASK], atol=0.5)


def test_blur_only_on_queries():
  """Same seed with the query blur forced on and off: support views are identical (no blur
  there), every query view loses high frequencies."""
  ep = episode(size=40)
  on = simclr(ep, 11, cfg=ea.SimclrAugment(blur_prob=1.0))
  off = simclr(ep, 11, cfg=ea.SimclrAugment(blur_prob=0.0))
  np.testing.assert_array_equal(on["support_images"].numpy(), off["support_images"].numpy())
  np.testing.assert_array_equal(on["query_labels"].numpy(), off["query_labels"].numpy())
  mask = on["query_mask"].numpy()
  e_on = highpass_energy(on["query_images"].numpy()[mask])
  e_off = highpass_energy(off["query_images"].numpy()[mask])
  assert (e_off > 0).all()
  assert (e_on < 0.8 * e_off).all(), (e_on, e_off)


def test_simclr_views_change_images_and_are_deterministic():
  ep = episode()
  a = simclr(ep, 1)
  b = simclr(ep, 1)
  c = simclr(ep, 2)
  for key in ("support_images", "query_images", "query_labels"):
    np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
  assert not np.array_equal(a["support_images"].numpy(), c["support_images"].numpy())
  real = SUPPORT_MASK
  diff = np.abs(a["support_images"].numpy()[real] - ep["support_images"][real])
  assert diff.mean(axis=(1, 2, 3)).min() > 1.0  # every real support view is augmented


def test_simclr_without_query_labels_samples_num_queries():
  ep = episode()
  out = ea.simclr_episode(ep["support_images"], 4, support_mask=SUPPORT_MASK, num_queries=4)
  mask = out["query_mask"].numpy()
  src = out["query_labels"].numpy()
  assert out["query_images"].shape[0] == 4 and mask.all()
  assert len(set(src)) == 4 and SUPPORT_MASK[src].all()
  with pytest.raises(ValueError, match="num_queries"):
    ea.simclr_episode(ep["support_images"], 4)


def test_mixing_probability_and_fixed_structure_in_tf_data():
  """``maybe_simclr_episode`` inside ``Dataset.map``: the SimCLR fraction over many seeds is
  within a 4.5-sigma binomial tolerance of ``prob``, every element has the same shapes, and
  the labels are the SimCLR ones exactly when ``is_simclr``."""
  small = {k: (v[:, :8, :8] if k.endswith("images") else v) for k, v in episode().items()}
  n = 400
  for prob in (0.5,):
    ds = tf.data.Dataset.range(n).map(
        lambda i, prob=prob: ea.maybe_simclr_episode(
            small, tf.stack([tf.cast(i, tf.int32), 7]), prob,
            cfg=ea.SimclrAugment(crop=False, color=False)))
    assert ds.element_spec["support_images"].shape == (8, 8, 8, 3)
    assert ds.element_spec["query_images"].shape == (8, 8, 8, 3)
    flags = []
    for out in ds.batch(n).take(1):
      flags = out["is_simclr"].numpy()
      simclr_labels = np.where(SUPPORT_MASK, np.arange(8), -1)
      md_labels = np.where(SUPPORT_MASK, SUPPORT_LABELS, -1)
      for f, labels in zip(flags, out["support_labels"].numpy()):
        np.testing.assert_array_equal(labels, simclr_labels if f else md_labels)
    k = int(np.sum(flags))
    tol = 4.5 * math.sqrt(n * prob * (1 - prob))
    assert abs(k - n * prob) <= tol, (prob, k)
  # Other probabilities through the coin ``maybe_simclr_episode`` uses (tested below).
  n = 2000
  for prob in (0.2, 0.9):
    coins = tf.data.Dataset.range(n).map(
        lambda i, prob=prob: ea.simclr_coin(tf.stack([tf.cast(i, tf.int32), 7]), prob))
    k = int(next(iter(coins.batch(n))).numpy().sum())
    assert abs(k - n * prob) <= 4.5 * math.sqrt(n * prob * (1 - prob)), (prob, k)


def test_maybe_simclr_episode_eager_matches_tf_data_and_passes_class_ids():
  ep = episode(size=16)
  seeds = [(i, 3) for i in range(6)]
  eager = [ea.maybe_simclr_episode(ep, tf.constant(s)) for s in seeds]
  assert {bool(e["is_simclr"]) for e in eager} == {True, False}  # both branches covered
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(seeds)).map(
      lambda s: ea.maybe_simclr_episode(ep, s))
  for e, g in zip(eager, ds):
    assert set(e) == set(g)
    for key in e:
      np.testing.assert_allclose(e[key].numpy(), g[key].numpy(), atol=1e-3, err_msg=key)
    if bool(e["is_simclr"]):
      src = e["query_labels"].numpy()
      np.testing.assert_array_equal(
          e["query_class_ids"].numpy(), np.where(src >= 0, SUPPORT_LABELS[src] + 100, -1))
    else:
      np.testing.assert_array_equal(e["query_class_ids"].numpy(), QUERY_LABELS + 100)
      np.testing.assert_array_equal(e["query_labels"].numpy(),
                                    np.where(QUERY_MASK, QUERY_LABELS, -1))


def test_simclr_coin_is_what_maybe_uses():
  ep = episode(size=8)
  for i in range(8):
    seed = tf.constant([i, 1])
    assert bool(ea.simclr_coin(seed, 0.5)) == bool(ea.maybe_simclr_episode(ep, seed)["is_simclr"])


# -------------------------------------------------------------------------- BOHB-style ops


OP_IMAGE = smooth_noise(1, 64, seed=5)[0]


def forced(op, level=2.0, prob=1.0):
  return ea.BohbPolicy(ops=(op,), min_stages=1, max_stages=1, prob=prob, magnitude=(level, level))


@pytest.mark.parametrize("op", ea.BOHB_OPS)
def test_each_bohb_op_changes_image_when_forced_and_is_identity_at_p0(op):
  out = ea.bohb_augment(OP_IMAGE, [3, 4], forced(op)).numpy()
  assert out.shape == OP_IMAGE.shape and out.dtype == np.float32
  assert out.min() >= 0 and out.max() <= 255 and np.array_equal(out, np.round(out))
  assert (out != OP_IMAGE).any(axis=-1).mean() > 0.005, op  # > 0.5% of the pixels change
  again = ea.bohb_augment(OP_IMAGE, [3, 4], forced(op)).numpy()
  np.testing.assert_array_equal(out, again)
  same = ea.bohb_augment(OP_IMAGE, [3, 4], forced(op, prob=0.0)).numpy()
  np.testing.assert_array_equal(same, OP_IMAGE.astype(np.float32))


def test_bohb_policy_determinism_and_stage_count():
  policy = ea.BohbPolicy(prob=1.0, min_stages=2, max_stages=3)
  outs = [ea.bohb_augment(OP_IMAGE, [s, 0], policy).numpy() for s in range(4)]
  again = ea.bohb_augment(OP_IMAGE, [0, 0], policy).numpy()
  np.testing.assert_array_equal(outs[0], again)
  assert len({o.tobytes() for o in outs}) == 4
  none = ea.BohbPolicy(min_stages=0, max_stages=0)
  np.testing.assert_array_equal(ea.bohb_augment(OP_IMAGE, [1, 0], none).numpy(), OP_IMAGE)
  zero = ea.BohbPolicy(prob=0.0, probs=(("Rotate", 0.0),))
  np.testing.assert_array_equal(ea.bohb_augment(OP_IMAGE, [1, 0], zero).numpy(), OP_IMAGE)


def test_resize_jpeg_degrades_high_frequencies():
  img = smooth_noise(1, 64, seed=9)
  base = highpass_energy(img)[0]
  fixed = ea.resize_jpeg(img[0], ratio=10 / 64, quality=75).numpy()
  assert fixed.shape == img[0].shape and fixed.dtype == np.uint8
  assert highpass_energy(fixed[None])[0] < 0.2 * base
  for s in range(5):  # random ratio in [10/64, 1] and quality in [75, 100]
    out = ea.resize_jpeg(img[0], [s, 2]).numpy()
    assert highpass_energy(out[None])[0] < 0.9 * base
  # Full size at the best quality still loses detail (JPEG is lossy, chroma is subsampled).
  near = ea.resize_jpeg(img[0], ratio=1.0, quality=100).numpy()
  assert np.abs(near.astype(float) - img[0]).mean() > 0
  assert highpass_energy(near[None])[0] < base


def test_bohb_and_sc_aug_episodes_keep_labels_and_run_in_tf_data():
  ep = episode(size=16)
  for spec in ("bohb(prob=1.0, ops=('Rotate', 'Cutout', 'ResizeJpeg'))", "sc_aug", "none"):
    fn = ea.parse(spec)
    eager = fn(ep, tf.constant([2, 2]))
    graph = next(iter(tf.data.Dataset.from_tensors(tf.constant([2, 2])).map(
        lambda s, fn=fn: fn(ep, s))))
    for key in eager:
      np.testing.assert_allclose(eager[key].numpy(), graph[key].numpy(), atol=1e-3, err_msg=key)
    assert not bool(eager["is_simclr"])
    np.testing.assert_array_equal(eager["support_labels"].numpy(),
                                  np.where(SUPPORT_MASK, SUPPORT_LABELS, -1))
    np.testing.assert_array_equal(eager["query_labels"].numpy(),
                                  np.where(QUERY_MASK, QUERY_LABELS, -1))
    sup = eager["support_images"].numpy()
    assert not sup[~SUPPORT_MASK].any()
    changed = np.abs(sup[SUPPORT_MASK] - ep["support_images"][SUPPORT_MASK]).mean()
    assert (changed > 1.0) == (spec != "none"), spec


def test_parse_and_registered_image_ops():
  fn = ea.parse("simclr_episodes(prob=1.0, md_augment='bohb', bohb={'prob': 0.3}, "
                "blur_prob=0.5)")
  out = fn(episode(size=8), tf.constant([0, 0]))
  assert bool(out["is_simclr"])
  with pytest.raises(UnknownNameError, match="simclr_episodes"):
    ea.parse("simclr_episode")
  with pytest.raises(ValueError, match="unknown settings"):
    ea.parse("bohb(nope=1)")
  with pytest.raises(ValueError, match="unknown ops"):
    ea.parse("bohb(ops=('Rotate', 'Twirl'))")
  with pytest.raises(ValueError, match="prob"):
    ea.parse("simclr_episodes(prob=1.5)")
  pp = preprocess.parse("bohb_augment(prob=1.0)|simclr_augment(blur=True)|normalize('inception')")
  res = pp({"image": tf.constant(OP_IMAGE)}, tf.constant([1, 2]))
  assert res["image"].shape == OP_IMAGE.shape
  assert -1.0 <= float(tf.reduce_min(res["image"])) <= float(tf.reduce_max(res["image"])) <= 1.0


def test_ops_known_without_importing_episode_augment():
  """A config naming simclr_augment / bohb_augment works after importing preprocess alone."""
  import subprocess
  import sys
  code = ("from visrep_jax.data import preprocess; "
          "preprocess.parse('bohb_augment(prob=1.0)|simclr_augment(blur=True)'); print('ok')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
