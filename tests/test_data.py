"""Data sources, preprocessing ops and the train/eval pipelines."""

import os

import numpy as np
import pytest

from visrep_jax.data import DataError, pipeline, preprocess, sources, tf_host
from conftest import requires_fashion_mnist

tf = tf_host()


def run_op(spec, image, seed=(1, 2)):
  fn = preprocess.parse(spec)
  ex = {"image": tf.constant(image), "label": tf.constant(0, tf.int64)}
  return fn(ex, tf.constant(seed, tf.int32))["image"].numpy()


def run_op_in_tfdata(spec, image, seed=(1, 2)):
  fn = preprocess.parse(spec)
  ds = tf.data.Dataset.from_tensors({"image": image, "label": np.int64(0)})
  ds = ds.map(lambda ex: fn(ex, tf.constant(seed, tf.int32)))
  return next(iter(ds))["image"].numpy()


IMG = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)

RANDOM_SPECS = ["random_resized_crop(32)", "random_crop(32, pad=4)", "simple_random_crop(32)",
                "flip_lr", "three_augment", "color_jitter(0.3, 0.3, 0.3)"]


@pytest.mark.parametrize("spec", RANDOM_SPECS + ["center_crop(32, crop_ratio=0.875)",
                                                 "resize(20)", "resize_short(24)",
                                                 "normalize('imagenet')", "decode(3)"])
def test_op_eager_equals_tfdata_and_is_deterministic(spec):
  a = run_op(spec, IMG)
  b = run_op_in_tfdata(spec, IMG)
  np.testing.assert_allclose(a, b, atol=1e-4)
  np.testing.assert_array_equal(a, run_op(spec, IMG))


@pytest.mark.parametrize("spec", RANDOM_SPECS)
def test_random_ops_depend_on_seed(spec):
  outs = [run_op(spec, IMG, seed=(s, 7)) for s in range(6)]
  assert any(not np.allclose(outs[0], o) for o in outs[1:])


def test_geometry_shapes_and_value_range():
  for spec, shape in [("random_resized_crop(32)", (32, 32, 3)), ("simple_random_crop(32)", (32, 32, 3)),
                      ("center_crop(32, crop_ratio=0.875)", (32, 32, 3)), ("resize_short(24)", (24, 32, 3))]:
    out = run_op(spec, IMG)
    assert out.shape == shape, spec
    assert out.min() >= 0 and out.max() <= 255


def test_center_crop_ratio_semantics():
  # crop_ratio 1.0 on a square image of the target size is the identity.
  sq = IMG[:32, :32]
  np.testing.assert_allclose(run_op("center_crop(32, crop_ratio=1.0)", sq), sq, atol=1e-3)
  # crop_ratio 0.5: resize short side to 64 (x2), then take the centre 32x32 = centre 16x16 of input.
  up = run_op("center_crop(32, crop_ratio=0.5)", sq)
  ref = run_op("resize(64)", sq)[16:48, 16:48]
  np.testing.assert_allclose(up, ref, atol=1e-3)


def test_flip_probability():
  img = np.arange(4 * 4 * 1, dtype=np.uint8).reshape(4, 4, 1)
  flips = [not np.array_equal(run_op("flip_lr", img, (s, 0)), img) for s in range(400)]
  assert 0.42 < np.mean(flips) < 0.58


def test_three_augment_picks_each_transform_uniformly():
  img = IMG[:16, :16]
  gray = run_op("resize(16)", img).astype(np.float32) @ np.array([0.299, 0.587, 0.114])
  kinds = []
  for s in range(300):
    out = run_op("three_augment", img, (s, 3))
    if np.allclose(out, np.repeat(gray[..., None], 3, -1), atol=1e-3):
      kinds.append("gray")
    elif np.allclose(out, np.where(img >= 128, 255 - img.astype(np.float32), img), atol=1e-3):
      kinds.append("solarize")
    else:
      kinds.append("blur")
      # Blurring never adds contrast; sigma ~ U[0.1, 2] is ~identity at the low end.
      assert out.std() <= img.astype(np.float32).std() + 1e-3
  counts = {k: kinds.count(k) for k in ("gray", "solarize", "blur")}
  assert all(70 < c < 130 for c in counts.values()), counts


def test_normalize_values():
  out = run_op("normalize('imagenet')", np.full((2, 2, 3), 255, np.uint8))
  np.testing.assert_allclose(out[0, 0], (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rtol=1e-6)
  gray = run_op("normalize('fashion_mnist')", np.full((2, 2, 1), 255, np.uint8))
  np.testing.assert_allclose(gray, np.full((2, 2, 1), (1 - 0.2860) / 0.3530), rtol=1e-5)
  # 3-channel statistics on grayscale images: an error, not a silent 3-channel output.
  with pytest.raises(ValueError, match="3 mean/std values for 1-channel images"):
    run_op("normalize('imagenet')", np.full((2, 2, 1), 255, np.uint8))


def test_unknown_op_and_bad_args():
  with pytest.raises(Exception, match="Did you mean 'flip_lr'"):
    preprocess.parse("flip_rl")
  with pytest.raises(ValueError, match="Bad arguments for preprocessing op"):
    preprocess.parse("random_crop(size=3, bogus=1)")


# ------------------------------------------------------------------------------------ pipelines


def array_source(n=37, size=8, classes=5):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8)
  labels = np.arange(n) % classes
  return sources.ArraySource({"train": (images, labels), "test": (images, labels)}, classes)


@pytest.mark.parametrize("processes", [1, 2, 3])
@pytest.mark.parametrize("local_batch", [4, 8])
def test_eval_counts_every_example_once(processes, local_batch):
  n = 37
  src = array_source(n)
  seen = []
  num_batches = set()
  for p in range(processes):
    ev = pipeline.make_eval(src, "test", "decode(1)", local_batch, process_index=p,
                            process_count=processes)
    num_batches.add(ev.num_batches)
    count = 0
    for batch in ev.batches:
      assert batch["image"].shape[0] == local_batch  # static shapes for every batch
      count += 1
      valid = batch["mask"] == 1
      seen.extend(batch["image"][valid].reshape(int(valid.sum()), 64).tolist())
      assert (batch["image"][~valid] == 0).all()
    assert count == ev.num_batches
  assert len(num_batches) == 1  # every process runs the same number of eval steps
  assert len(seen) == n
  assert sorted(map(tuple, seen)) == sorted(map(tuple, src.arrays("test")[0].reshape(n, -1).tolist()))


def _batches(src, global_batch, processes, start_step=0, steps=3, seed=0, **kw):
  """Global batches as the concatenation of every process's local batch."""
  per_process = []
  for p in range(processes):
    ti = pipeline.make_train(src, "train", "decode(1)|random_crop(8, pad=1)", global_batch, seed,
                             start_step=start_step, process_index=p, process_count=processes, **kw)
    per_process.append([next(ti.iterator) for _ in range(steps)])
  return [np.concatenate([pp[s]["image"] for pp in per_process]) for s in range(steps)]


def test_train_order_is_the_same_for_any_number_of_processes():
  src = array_source(37)
  one = _batches(src, 12, 1)
  for procs in (2, 3, 4):
    for a, b in zip(one, _batches(src, 12, procs)):
      np.testing.assert_array_equal(a, b)


def test_train_resume_gives_the_same_batches():
  src = array_source(37)
  full = _batches(src, 8, 2, steps=6)
  resumed = _batches(src, 8, 2, start_step=4, steps=2)
  np.testing.assert_array_equal(full[4], resumed[0])
  np.testing.assert_array_equal(full[5], resumed[1])


def test_train_epochs_are_permutations_and_seeds_matter():
  src = array_source(40)
  ti = pipeline.make_train(src, "train", "decode(1)", 10, seed=3)
  images = np.concatenate([next(ti.iterator)["image"] for _ in range(8)])  # 2 epochs
  flat = lambda a: sorted(map(tuple, a.reshape(len(a), -1).tolist()))
  ref = flat(src.arrays("train")[0])
  assert flat(images[:40]) == ref and flat(images[40:]) == ref
  assert not np.array_equal(images[:40], images[40:])  # reshuffled every epoch
  other = pipeline.make_train(src, "train", "decode(1)", 10, seed=4)
  assert not np.array_equal(next(other.iterator)["image"], images[:10])


def test_repeated_augmentation_repeats_each_image():
  src = array_source(40)
  ti = pipeline.make_train(src, "train", "decode(1)", 12, seed=0, repeated_aug=3)
  b = next(ti.iterator)
  np.testing.assert_array_equal(b["label"][0:3], [b["label"][0]] * 3)
  np.testing.assert_array_equal(b["image"][0], b["image"][2])  # no random op: identical copies
  assert len({tuple(x.ravel()) for x in b["image"]}) == 4


def write_image_folder(root, corrupt=None):
  from PIL import Image
  rng = np.random.default_rng(0)
  for split, n in (("train", 6), ("val", 5)):
    for c in ("cat", "dog"):
      os.makedirs(os.path.join(root, split, c), exist_ok=True)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            os.path.join(root, split, c, f"{i}.png"))
  if corrupt:
    with open(os.path.join(root, *corrupt), "wb") as f:
      f.write(b"\x89PNG\r\n\x1a\n this is not an image")


def test_image_folder(tmp_path):
  write_image_folder(str(tmp_path))
  src = sources.create("image_folder", data_dir=str(tmp_path))
  assert src.num_classes == 2 and src.num_examples("train") == 12 and src.num_examples("val") == 10
  ti = pipeline.make_train(src, "train", "decode|resize(16)", 4, seed=0)
  b = next(ti.iterator)
  assert b["image"].shape == (4, 16, 16, 3) and set(b["label"]) <= {0, 1}
  ev = pipeline.make_eval(src, "val", "decode|center_crop(16)", 4)
  assert sum(int(b["mask"].sum()) for b in ev.batches) == 10


def test_corrupt_image_names_the_file(tmp_path):
  write_image_folder(str(tmp_path), corrupt=("val", "dog", "3.png"))
  src = sources.create("image_folder", data_dir=str(tmp_path))
  ev = pipeline.make_eval(src, "val", "decode|center_crop(16)", 4)
  with pytest.raises(DataError, match=r"val/dog/3.png.*skip_corrupt=True"):
    list(ev.batches)
  ev = pipeline.make_eval(src, "val", "decode|center_crop(16)", 4, skip_corrupt=True)
  assert sum(int(b["mask"].sum()) for b in ev.batches) == 9  # 10 - 1 skipped, counted by caller
  ti = pipeline.make_train(src, "val", "decode|resize(16)", 10, seed=0)
  with pytest.raises(DataError, match=r"val/dog/3.png"):
    next(ti.iterator)


def test_missing_data_errors(tmp_path):
  with pytest.raises(DataError, match="does not exist. Set dataset.data_dir"):
    sources.create("image_folder", data_dir=str(tmp_path / "nope"))
  with pytest.raises(DataError, match="not prepared under .*visrep_jax.data.prepare --dataset=imagenet2012"):
    sources.create("imagenet2012", data_dir=str(tmp_path))
  with pytest.raises(DataError, match="Split 'valid' does not exist"):
    array_source().num_examples("valid")


def _tiny_tfds_builder():
  """A real TFDS dataset (PNG-encoded, prepared on disk) with 20 train / 13 test examples."""
  import tensorflow_datasets as tfds

  class VisrepTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(12, 12, 3)),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(20, 0), "test": self._generate_examples(13, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        yield i, {"image": rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "label": i % 3}

  return VisrepTinyImages


def test_tfds_source(tmp_path):
  builder = _tiny_tfds_builder()(data_dir=str(tmp_path))
  builder.download_and_prepare()
  src = sources.create("tfds:visrep_tiny_images", data_dir=str(tmp_path))
  assert src.num_classes == 3 and src.num_examples("test") == 13
  counts = []
  for p in range(2):
    ev = pipeline.make_eval(src, "test", "decode|center_crop(8)", 4, process_index=p, process_count=2)
    counts.append(sum(int(b["mask"].sum()) for b in ev.batches))
  assert counts == [7, 6]
  spec = "decode|random_crop(8, pad=2)|flip_lr"
  ti = pipeline.make_train(src, "train", spec, 8, seed=0)
  first = [next(ti.iterator)["image"] for _ in range(4)]
  assert first[0].shape == (8, 8, 8, 3)
  resumed = pipeline.make_train(src, "train", spec, 8, seed=0, start_step=3)
  np.testing.assert_array_equal(first[3], next(resumed.iterator)["image"])


@requires_fashion_mnist
def test_fashion_mnist_offline():
  src = sources.create("fashion_mnist")
  assert isinstance(src, sources.ArraySource)
  assert src.num_examples("train") == 60000 and src.num_examples("test") == 10000
  images, labels = src.arrays("test")
  assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
  assert np.bincount(labels).tolist() == [1000] * 10


def test_corrupt_idx_file(tmp_path):
  import gzip
  for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
    with gzip.open(tmp_path / name, "wb") as f:
      f.write(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
  with pytest.raises(DataError, match="Corrupt IDX file .*truncated"):
    sources.create("fashion_mnist", data_dir=str(tmp_path))
