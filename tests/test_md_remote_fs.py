"""Meta-Dataset sources on a TensorFlow filesystem other than the local disk (gs:// on a TPU pod).

TensorFlow's in-memory filesystem ``ram://`` stands in for gs://: a toy source is converted
locally, copied there with tf.io.gfile, and every reader must give exactly what it gives for the
local copy (spec, record index, records, pixels, episodes, classification examples) and the same
one-line errors.
"""

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from visrep_jax.data import DataError, md_classification, md_convert, tf_host
from visrep_jax.data import episode_pipeline as ep_lib
from visrep_jax.data import episodes as episodes_lib
from visrep_jax.data import meta_dataset as md
from conftest import REPO, subprocess_env

CLASS_SPLITS = {"train": [0, 1, 2, 3, 4], "valid": [5], "test": [6, 7]}


def convert_toy(root, n_per_class=12, image_format="png"):
  """A toy source (8 classes, 12 x 10 images) converted into ``root/toy``; its spec."""
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(8), n_per_class)
  rng.shuffle(labels)
  channels = 3 if image_format == "jpeg" else 1
  images = rng.integers(0, 256, (len(labels), 12, 10, channels), dtype=np.uint8)
  return md_convert.convert_arrays(images, labels, os.path.join(root, "toy"), "toy",
                                   class_splits=CLASS_SPLITS, image_format=image_format)


def copy_tree(src, dst):
  gfile = tf_host().io.gfile
  gfile.makedirs(dst)
  for name in os.listdir(src):
    path = os.path.join(src, name)
    if os.path.isdir(path):
      copy_tree(path, dst + "/" + name)
    else:
      gfile.copy(path, dst + "/" + name, overwrite=True)


@pytest.fixture
def copies(tmp_path):
  """``(local root, ram:// root)``, each holding the same converted ``toy`` source."""
  local = str(tmp_path / "md")
  convert_toy(local)
  remote = f"ram://md_{uuid.uuid4().hex}"
  copy_tree(local, remote)
  yield local, remote
  tf_host().io.gfile.rmtree(remote)


def same_error(fn, local, remote):
  """``fn(root)`` raises the same one-line DataError for both roots (paths aside); its text."""
  with pytest.raises(DataError) as e_local:
    fn(local)
  with pytest.raises(DataError) as e_remote:
    fn(remote)
  assert "\n" not in str(e_remote.value)
  assert type(e_remote.value) is type(e_local.value)
  assert str(e_remote.value).replace(remote, local) == str(e_local.value)
  return str(e_remote.value)


def test_ram_filesystem_has_what_the_reader_needs():
  """What ``ram://`` supports (if this fails, the other tests cannot say anything)."""
  tf = tf_host()
  root = f"ram://probe_{uuid.uuid4().hex}"
  tf.io.gfile.makedirs(root)
  with tf.io.TFRecordWriter(root + "/a.tfrecords") as w:
    w.write(b"hello")
    w.write(b"world!!")
  with tf.io.gfile.GFile(root + "/a.tfrecords", "rb") as f:
    f.seek(21)
    assert f.read(8) == (7).to_bytes(8, "little")
  assert tf.io.gfile.stat(root + "/a.tfrecords").length == 2 * 16 + 12
  assert tf.io.gfile.isdir(root) and tf.io.gfile.listdir(root) == ["a.tfrecords"]
  reader = md._random_record_reader(root + "/a.tfrecords")
  assert reader is not None, "TensorFlow's RandomRecordReader is missing"
  assert reader.read(21)[0] == b"world!!"
  reader.close()
  tf.io.gfile.rmtree(root)


def test_spec_loads_and_saves_on_ram(copies):
  local, remote = copies
  spec = md.load_dataset_spec(remote + "/toy")
  assert spec.path == remote + "/toy"
  assert spec == md.load_dataset_spec(local + "/toy")._replace(path=remote + "/toy")
  # Written through gfile (tmp file, then rename), nothing left beside it.
  target = md.save_dataset_spec(spec, remote + "/saved/toy")
  assert target == remote + "/saved/toy/" + md.SPEC_FILENAME
  assert tf_host().io.gfile.listdir(remote + "/saved/toy") == [md.SPEC_FILENAME]
  again = md.load_dataset_spec(remote + "/saved/toy")
  assert again == spec._replace(path=remote + "/saved/toy")
  md.save_dataset_spec(again)  # over an existing spec
  assert md.load_dataset_spec(remote + "/saved/toy") == again


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_records_and_pixels_match_the_local_copy(tmp_path, image_format, monkeypatch):
  local = str(tmp_path / "md")
  convert_toy(local, image_format=image_format)
  remote = f"ram://md_{uuid.uuid4().hex}"
  copy_tree(local, remote)
  loc, ram = md.load_dataset_spec(local + "/toy"), md.load_dataset_spec(remote + "/toy")
  md.check_class_files(ram)
  for class_id in range(8):
    index = md.index_class_records(ram, class_id)
    np.testing.assert_array_equal(index, md.index_class_records(loc, class_id))
    assert index.shape == (12, 2)
    records = [7, 2, 11, 0]
    got = md.read_records(md.class_record_path(ram, class_id), index, records)
    assert got == md.read_records(md.class_record_path(loc, class_id), index, records)
    pixels, labels = md.decode_records(got, 16)
    assert labels.tolist() == [class_id] * 4
    np.testing.assert_array_equal(pixels, md.load_class_images(loc, class_id, 16)[records])
    np.testing.assert_array_equal(md.load_class_images(ram, class_id, channels=0),
                                  md.load_class_images(loc, class_id, channels=0))
  # The plain seek + read fallback (no RandomRecordReader) reads through a GFile.
  monkeypatch.setattr(md, "_random_record_reader", lambda path: None)
  index = md.index_class_records(ram, 3)
  assert (md.read_records(md.class_record_path(ram, 3), index, [5, 1])
          == md.read_records(md.class_record_path(loc, 3), index, [5, 1]))
  # The tf.data class streams.
  for a, b in zip(md.make_class_datasets(ram, md.Split.TEST, shuffle=False, repeat=False),
                  md.make_class_datasets(loc, md.Split.TEST, shuffle=False, repeat=False)):
    assert [(bytes(s), int(c)) for s, c in a.as_numpy_iterator()] == [
        (bytes(s), int(c)) for s, c in b.as_numpy_iterator()]
  tf_host().io.gfile.rmtree(remote)


def test_episodes_match_the_local_copy(copies, monkeypatch):
  local, remote = copies
  descr = episodes_lib.EpisodeDescriptionConfig.fixed(3, 2, 3)
  src_ram = ep_lib.open_sources(remote, ["toy"], "train", descr, 12, channels=1)[0]
  src_loc = ep_lib.open_sources(local, ["toy"], "train", descr, 12, channels=1)[0]
  for seed in (1, 2, 3):
    a, b = src_ram.sample(seed=seed), src_loc.sample(seed=seed)
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # A class file rewritten after it was indexed (another size; ram:// files have mtime 0): the
  # next miss re-indexes it and drops its cached images.
  tf = tf_host()
  cache = src_ram._cache
  cid = int(src_ram.sampler.class_set[int(a["support_class_ids"][0])])
  path = md.class_record_path(src_ram.spec, cid)
  old_index, stamp, _ = cache._index[cid]
  assert stamp == (tf.io.gfile.stat(path).length, 0) == md.file_stamp(path)
  assert any(k[0] == cid for k in cache._items)
  tf.io.gfile.remove(path)  # ram:// (TF 2.21) appends to an existing file instead of replacing it
  with tf.io.TFRecordWriter(path) as w:
    for _ in range(12):
      w.write(md_convert.serialize_example(md_convert.encode_image(
          np.full((12, 10, 1), 7, np.uint8)), cid))
  assert md.file_stamp(path) != stamp
  # Remote files are re-checked at most every REMOTE_STAMP_TTL_S seconds (a stat is a round trip).
  assert cache._class_index(cid) is old_index
  monkeypatch.setattr(ep_lib, "REMOTE_STAMP_TTL_S", 0.0)
  new_index = cache._class_index(cid)
  assert not np.array_equal(new_index, old_index)
  np.testing.assert_array_equal(new_index, md.index_class_records(src_ram.spec, cid))
  assert not any(k[0] == cid for k in cache._items)
  assert np.all(cache.get_many([(cid, 0), (cid, 11)])[1] == 7)
  assert md.file_stamp(remote + "/toy/no_such.tfrecords") is None


def test_classification_source_matches_the_local_copy(copies):
  local, remote = copies
  assert md_classification.find_source_dir(remote, "toy") == remote + "/toy"
  assert md_classification.find_source_dir(remote + "/toy", "toy") == remote + "/toy"
  ram = md_classification.create("toy", data_dir=remote)
  loc = md_classification.create("toy", data_dir=local)
  for split in ("train", "valid[:6]"):
    assert ram.num_examples(split) == loc.num_examples(split)
    a = [(bytes(e["image"]), int(e["label"])) for e in ram.make(split, 0, 1).as_numpy_iterator()]
    b = [(bytes(e["image"]), int(e["label"])) for e in loc.make(split, 0, 1).as_numpy_iterator()]
    assert a == b and len(a) == loc.num_examples(split)
  msg = same_error(lambda root: md_classification.find_source_dir(root, "other"), local, remote)
  assert "the converted sources there: toy" in msg


def test_missing_files_give_the_local_errors(copies):
  local, remote = copies
  tf = tf_host()
  for root in (local, remote):
    tf.io.gfile.remove(f"{root}/toy/3.tfrecords")
  spec = lambda root: md.load_dataset_spec(root + "/toy")
  msg = same_error(lambda root: md.check_class_files(spec(root)), local, remote)
  assert msg.startswith(f"Missing class file {remote}/toy/3.tfrecords of toy")
  for fn in (lambda root: md.load_class_images(spec(root), 3),
             lambda root: md.index_class_records(spec(root), 3),
             lambda root: md.make_class_datasets(spec(root), md.Split.TRAIN),
             lambda root: md_classification.create("toy", data_dir=root).num_examples("train"),
             lambda root: ep_lib.EpisodeSource(root + "/toy", "train", descr_1way(), 12)):
    assert "Missing class file" in same_error(fn, local, remote)
  # A missing source directory, a directory without a spec, a corrupt spec.
  assert "does not exist" in same_error(lambda root: md.load_dataset_spec(root + "/nowhere"),
                                        local, remote)
  assert "does not exist" in same_error(
      lambda root: ep_lib.EpisodeSource(root + "/nowhere", "train", descr_1way(), 12),
      local, remote)
  for root in (local, remote):
    tf.io.gfile.makedirs(root + "/empty")
  assert "No dataset_spec.json in" in same_error(
      lambda root: md.load_dataset_spec(root + "/empty"), local, remote)
  for root in (local, remote):
    with tf.io.gfile.GFile(f"{root}/empty/{md.SPEC_FILENAME}", "w") as f:
      f.write("{not json")
  assert "Corrupt" in same_error(lambda root: md.load_dataset_spec(root + "/empty"),
                                 local, remote)
  # A truncated class file.
  for root in (local, remote):
    with tf.io.gfile.GFile(f"{root}/toy/2.tfrecords", "rb") as f:
      data = f.read()
    tf.io.gfile.remove(f"{root}/toy/2.tfrecords")  # ram:// would append, not replace
    with tf.io.gfile.GFile(f"{root}/toy/2.tfrecords", "wb") as f:
      f.write(data[:-5])
  assert "is truncated in record 11" in same_error(
      lambda root: md.index_class_records(spec(root), 2), local, remote)


def descr_1way():
  return episodes_lib.EpisodeDescriptionConfig.fixed(1, 1, 1)


def test_an_unknown_filesystem_is_a_one_line_error():
  """A scheme TensorFlow does not have (s3:// without its plugin): says so, not 'does not
  exist'."""
  for fn in (lambda: md.load_dataset_spec("nosuchfs://bucket/md/toy"),
             lambda: md_classification.find_source_dir("nosuchfs://bucket/md", "toy")):
    with pytest.raises(DataError, match=r"Cannot read nosuchfs://bucket/md.*'nosuchfs' not "
                                        r"implemented.*filesystem plugin") as e:
      fn()
    assert "\n" not in str(e.value)


def test_local_spec_reading_needs_no_tensorflow(tmp_path):
  """Local paths keep the pure-Python spec reader (the benchmarks run without TensorFlow)."""
  spec = md_convert.convert_arrays(np.zeros((4, 4, 4, 1), np.uint8), np.array([0, 0, 1, 1]),
                                   str(tmp_path / "toy"), "toy", splits=(0.5, 0.0, 0.5))
  code = ("import sys; sys.modules['tensorflow'] = None\n"
          "from visrep_jax.data import meta_dataset as md\n"
          f"spec = md.load_dataset_spec({spec.path!r})\n"
          "md.save_dataset_spec(spec)\n"
          "md.check_class_files(spec)\n"
          "print(spec.name, md.file_stamp(md.class_record_path(spec, 0))[0] > 0,\n"
          "      md.index_class_records(spec, 0).shape)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["toy", "True", "(2,", "2)"]


def test_remote_record_indexes_are_cached_across_runs(copies, tmp_path, monkeypatch, caplog):
  """A remote class file is indexed once per cache directory (local or itself remote); an entry
  that no longer fits the file is rebuilt; local files and cache_dir='' never touch a cache."""
  local, remote = copies
  spec = md.load_dataset_spec(remote + "/toy")
  expected = md.index_class_records(spec, 0)
  for cache_dir in (str(tmp_path / "idx"), f"ram://idx_{uuid.uuid4().hex}"):
    np.testing.assert_array_equal(md.cached_class_index(spec, 0, cache_dir), expected)
    gfile = tf_host().io.gfile
    (entry,) = gfile.glob(cache_dir + "/*.npy")
    # A second run reads the entry instead of the class file's records.
    with monkeypatch.context() as m:
      m.setattr(md, "index_class_records", lambda *a: pytest.fail("re-indexed a cached file"))
      np.testing.assert_array_equal(md.cached_class_index(spec, 0, cache_dir), expected)
    # An entry that does not fit the file (its last record shortened, or a record in the middle
    # moved) is rebuilt.
    import io
    for row, col in ((-1, 1), (3, 0)):
      bad = expected.copy()
      bad[row, col] -= 1
      buf = io.BytesIO()
      np.save(buf, bad)
      with gfile.GFile(entry, "wb") as f:
        f.write(buf.getvalue())
      np.testing.assert_array_equal(md.cached_class_index(spec, 0, cache_dir), expected)
      with gfile.GFile(entry, "rb") as f:
        np.testing.assert_array_equal(np.load(io.BytesIO(f.read())), expected)
    assert gfile.glob(cache_dir + "/*") == [entry]  # no temporary files left behind
  # Local class files and a disabled cache: indexed directly, nothing written.
  local_spec = md.load_dataset_spec(local + "/toy")
  np.testing.assert_array_equal(md.cached_class_index(local_spec, 0, str(tmp_path / "loc")),
                                expected)
  np.testing.assert_array_equal(md.cached_class_index(spec, 0, ""), expected)
  assert not os.path.exists(tmp_path / "loc")
  # An unwritable cache directory is reported once and skipped.
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with caplog.at_level("WARNING"):
    for _ in range(2):
      np.testing.assert_array_equal(md.cached_class_index(spec, 1, str(blocker / "idx")),
                                    md.index_class_records(spec, 1))
  assert sum("Cannot write the Meta-Dataset record index cache" in r.message
             for r in caplog.records) == 1


def test_episode_sources_use_the_index_cache(copies, tmp_path):
  _, remote = copies
  descr = episodes_lib.EpisodeDescriptionConfig.fixed(3, 2, 3)
  cache_dir = str(tmp_path / "idx")
  src = ep_lib.open_sources(remote, ["toy"], "train", descr, 12, channels=1,
                            index_cache_dir=cache_dir)[0]
  src.sample(seed=1)
  assert len(os.listdir(cache_dir)) == 3  # one entry per class of the 3-way episode
