"""Meta-Dataset format: specs (JSON in the official layout), reader, converter, mini benchmark."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from visrep_jax.data import DataError, tf_host
from visrep_jax.data import md_convert, md_mini
from visrep_jax.data import meta_dataset as md
from conftest import REPO, requires_fashion_mnist, subprocess_env

Split = md.Split
requires_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None and not os.environ.get("CI"),
    reason="scikit-learn (its bundled digits) is not installed (CI installs it)")


def flat_spec(path=""):
  return md.DatasetSpecification(
      "toy", {Split.TRAIN: 3, Split.VALID: 2, Split.TEST: 1}, {i: 10 + i for i in range(6)},
      {i: f"class_{i}" for i in range(6)}, path, "{}.tfrecords")


def bilevel_spec(path=""):
  # Superclasses: train 0, 1 (3 + 2 classes), valid 2 (4 classes), test 3 (2 classes).
  return md.BiLevelDatasetSpecification(
      "toy_omniglot", {Split.TRAIN: 2, Split.VALID: 1, Split.TEST: 1}, {0: 3, 1: 2, 2: 4, 3: 2},
      {i: 20 for i in range(11)}, {0: "Latin", 1: "Greek", 2: "Futhorc", 3: "Tengwar"},
      {i: f"character{i:02d}" for i in range(11)}, path, "{}.tfrecords")


def synthetic_dag():
  """Three split graphs; in TRAIN, leaf n05 has two parents (a DAG, not a tree)."""
  S = md.Synset
  root, a, b = S("n01", "entity"), S("n02", "animal"), S("n03", "pet")
  l1, l2, l3 = S("n09", "dog"), S("n05", "cat"), S("n07", "fish")
  for parent, child in [(root, a), (root, b), (a, l1), (a, l2), (b, l2), (b, l3)]:
    parent.children.add(child)
    child.parents.add(parent)
  v, l4, l5 = S("n10", "device"), S("n12", "phone"), S("n11", "radio")
  t, l6, l7 = S("n20", "food"), S("n21", "bread"), S("n22", "cheese")
  for parent, child in [(v, l4), (v, l5), (t, l6), (t, l7)]:
    parent.children.add(child)
    child.parents.add(parent)
  graphs = {Split.TRAIN: {root, a, b, l1, l2, l3}, Split.VALID: {v, l4, l5},
            Split.TEST: {t, l6, l7}}
  leaf_images = {"n09": 5, "n05": 7, "n07": 11, "n12": 6, "n11": 8, "n21": 9, "n22": 10}
  return graphs, leaf_images


def hierarchical_spec(path=""):
  graphs, leaf_images = synthetic_dag()
  return md.make_hierarchical_spec("toy_ilsvrc", graphs, leaf_images, path)


# ----------------------------------------------------------------------------------------------
# Specs.


def test_flat_spec_class_ranges_and_counts():
  spec = flat_spec()
  spec.initialize()
  assert spec.get_classes(Split.TRAIN) == range(0, 3)
  assert spec.get_classes(Split.VALID) == range(3, 5)
  assert spec.get_classes("test") == range(5, 6)
  assert spec.num_classes == 6
  assert spec.get_total_images_per_class(4) == 14
  with pytest.raises(ValueError, match="same number"):
    spec.get_total_images_per_class()  # classes are imbalanced
  with pytest.raises(ValueError, match="not in images_per_class"):
    spec.get_total_images_per_class(6)
  with pytest.raises(ValueError, match="file_pattern"):
    spec._replace(file_pattern="{}.rec").initialize()
  assert Split.parse("validation") is Split.VALID and Split.parse(2) is Split.TEST


def test_flat_spec_json_round_trip_in_official_layout(tmp_path):
  spec = flat_spec(str(tmp_path))
  path = md.save_dataset_spec(spec)
  raw = json.load(open(path))
  assert raw["__class__"] == "DatasetSpecification"
  assert raw["classes_per_split"] == {"TRAIN": 3, "VALID": 2, "TEST": 1}
  assert raw["images_per_class"]["4"] == 14 and raw["class_names"]["5"] == "class_5"
  assert raw["file_pattern"] == "{}.tfrecords" and raw["path"] == str(tmp_path)
  loaded = md.load_dataset_spec(str(tmp_path))
  assert loaded == spec
  # The loader points the spec at the directory it was read from (as the official one does).
  moved = tmp_path / "moved"
  os.rename(tmp_path / md.SPEC_FILENAME, tmp_path / "x.json")
  moved.mkdir()
  os.rename(tmp_path / "x.json", moved / md.SPEC_FILENAME)
  assert md.load_dataset_spec(str(moved)).path == str(moved)


def test_reads_an_official_spec_file():
  # An excerpt in the exact layout of the official dataset_specs/*_dataset_spec.json.
  text = """{
    "name": "dtd", "classes_per_split": {"TRAIN": 2, "VALID": 1, "TEST": 1},
    "images_per_class": {"0": 120, "1": 120, "2": 120, "3": 120},
    "class_names": {"0": "chequered", "1": "braided", "2": "interlaced", "3": "matted"},
    "path": "/path/to/records/dtd", "file_pattern": "{}.tfrecords",
    "__class__": "DatasetSpecification"}"""
  spec = md.dataset_spec_from_json(text)
  assert isinstance(spec, md.DatasetSpecification)
  assert spec.get_classes(Split.TEST) == range(3, 4) and spec.class_names[2] == "interlaced"
  assert spec.get_total_images_per_class() == 120  # balanced: class_id may be omitted


def test_bilevel_spec_semantics_and_round_trip(tmp_path):
  spec = bilevel_spec(str(tmp_path))
  assert spec.get_superclasses(Split.TRAIN) == range(0, 2)
  assert spec.get_superclasses(Split.TEST) == range(3, 4)
  assert spec.get_classes(Split.TRAIN) == range(0, 5)
  assert spec.get_classes(Split.VALID) == range(5, 9)
  assert spec.get_classes(Split.TEST) == range(9, 11)
  rel, absolute = spec.get_class_ids_from_superclass_subclass_inds(Split.VALID, 2, [0, 3])
  assert (rel, absolute) == ([0, 3], [5, 8])
  rel, absolute = spec.get_class_ids_from_superclass_subclass_inds(Split.TRAIN, 1, [1])
  assert (rel, absolute) == ([4], [4])
  spec.initialize({Split.VALID: 2})
  assert spec.get_classes(Split.VALID) == range(5, 7)
  with pytest.raises(ValueError, match="only 2"):
    spec.initialize({Split.TEST: 3})

  md.save_dataset_spec(bilevel_spec(str(tmp_path)))
  raw = json.load(open(tmp_path / md.SPEC_FILENAME))
  assert raw["__class__"] == "BiLevelDatasetSpecification"
  assert raw["superclasses_per_split"] == {"TRAIN": 2, "VALID": 1, "TEST": 1}
  assert raw["classes_per_superclass"] == {"0": 3, "1": 2, "2": 4, "3": 2}
  assert raw["superclass_names"]["2"] == "Futhorc"
  assert md.load_dataset_spec(str(tmp_path)) == bilevel_spec(str(tmp_path))


def test_hierarchical_spec_dag_semantics():
  spec = hierarchical_spec()
  assert spec.classes_per_split == {Split.TRAIN: 3, Split.VALID: 2, Split.TEST: 2}
  # Class ids: train leaves sorted by wn_id, then valid, then test (official ILSVRC order).
  assert spec.class_names == {0: "n05", 1: "n07", 2: "n09", 3: "n11", 4: "n12", 5: "n21",
                              6: "n22"}
  assert spec.get_classes(Split.VALID) == range(3, 5)
  assert spec.get_total_images_per_class(spec.class_names_to_ids["n05"]) == 7
  assert spec.get_total_images_per_class(4) == 6
  with pytest.raises(ValueError, match="same number"):
    spec.get_total_images_per_class()
  train = spec.get_split_subgraph(Split.TRAIN)
  by_id = {n.wn_id: n for n in train}
  spanning = md.get_spanning_leaves(train)
  assert {l.wn_id for l in spanning[by_id["n03"]]} == {"n05", "n07"}
  assert {l.wn_id for l in spanning[by_id["n01"]]} == {"n05", "n07", "n09"}
  assert spanning[by_id["n09"]] == {by_id["n09"]}
  # Images spanned by a node count a shared leaf once: 5 + 7 + 11.
  assert spec.images_per_class[Split.TRAIN][by_id["n01"]] == 23
  assert spec.images_per_class[Split.TRAIN][by_id["n03"]] == 18
  # What the official sampler computes for DAG episodes: relative ids of each internal node.
  rel = {spec.class_names_to_ids[l.wn_id] - spec.get_classes(Split.TRAIN).start
         for l in spanning[by_id["n02"]]}
  assert rel == {0, 2}
  assert {n.wn_id for n in md.get_leaves(train)} == {"n05", "n07", "n09"}


def test_hierarchical_spec_json_round_trip_in_official_layout(tmp_path):
  spec = hierarchical_spec(str(tmp_path))
  md.save_dataset_spec(spec)
  raw = json.load(open(tmp_path / md.SPEC_FILENAME))
  assert raw["__class__"] == "HierarchicalDatasetSpecification"
  train = raw["split_subgraphs"]["TRAIN"]
  assert [n["wn_id"] for n in train] == ["n01", "n02", "n03", "n05", "n07", "n09"]
  assert train[0] == {"wn_id": "n01", "words": "entity", "children_ids": ["n02", "n03"],
                      "parents_ids": []}
  assert train[3]["parents_ids"] == ["n02", "n03"]
  assert raw["images_per_class"]["TRAIN"]["n01"] == 23
  assert raw["images_per_class"]["TEST"] == {"n20": 19, "n21": 9, "n22": 10}
  assert raw["class_names"]["0"] == "n05"
  loaded = md.load_dataset_spec(str(tmp_path))
  assert isinstance(loaded, md.HierarchicalDatasetSpecification)
  assert loaded.to_dict() == spec.to_dict()
  assert loaded.get_classes(Split.TEST) == range(5, 7)
  assert loaded.get_total_images_per_class(loaded.class_names_to_ids["n07"]) == 11


def test_known_sources():
  assert len(md.ALL_SOURCES) == 10
  assert md.SOURCES[md.ILSVRC_2012].classes_per_split == (712, 158, 130)
  assert md.SOURCES[md.ILSVRC_2012].spec_class == "HierarchicalDatasetSpecification"
  assert md.SOURCES[md.OMNIGLOT].spec_class == "BiLevelDatasetSpecification"
  assert md.SOURCES[md.OMNIGLOT].num_classes == 1623
  assert md.SOURCES[md.TRAFFIC_SIGN].splits == (Split.TEST,)
  assert md.SOURCES[md.MSCOCO].splits == (Split.VALID, Split.TEST)
  assert md.MSCOCO not in md.TRAIN_ON_ALL_TRAIN_SOURCES and len(md.TRAIN_ON_ALL_TRAIN_SOURCES) == 8
  with pytest.raises(ValueError, match="Did you mean 'omniglot'"):
    md.source_info("omniglott")
  wrong = flat_spec()._replace(name=md.DTD)
  with pytest.raises(DataError, match=r"official split is \(33, 7, 7\)"):
    md.check_known_source(wrong)


# ----------------------------------------------------------------------------------------------
# Converter and reader.


def toy_arrays(channels=1, n_per_class=4, num_classes=5, size=(12, 10), seed=0):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_classes), n_per_class)
  rng.shuffle(labels)
  images = rng.integers(0, 256, (len(labels),) + size + (channels,), dtype=np.uint8)
  return images, labels


SPLITS_5 = {"train": [4, 0, 2], "valid": [1], "test": [3]}


def test_convert_arrays_png_reads_back_bit_exactly(tmp_path):
  tf = tf_host()
  images, labels = toy_arrays(channels=1)
  names = ["zero", "one", "two", "three", "four"]
  spec = md_convert.convert_arrays(images, labels, str(tmp_path / "toy"), "toy", names,
                                   class_splits=SPLITS_5)
  assert spec.classes_per_split == {Split.TRAIN: 3, Split.VALID: 1, Split.TEST: 1}
  # New ids: train classes in label order (0, 2, 4), then valid (1), then test (3).
  assert spec.class_names == {0: "zero", 1: "two", 2: "four", 3: "one", 4: "three"}
  assert md.load_dataset_spec(str(tmp_path / "toy")) == spec
  for class_id, label in enumerate([0, 2, 4, 1, 3]):
    expected = images[labels == label]
    got = md.load_class_images(spec, class_id, channels=0)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(md.load_class_images(spec, class_id), np.repeat(expected, 3, -1))
  # Another size: the official decoder's square bilinear resize (align_corners), rounded.
  tf_resized = tf.compat.v1.image.resize_images(
      images[labels == 0].astype(np.float32), [20, 20], align_corners=True).numpy()
  np.testing.assert_array_equal(md.load_class_images(spec, 0, image_size=20, channels=0),
                                np.clip(np.round(tf_resized), 0, 255).astype(np.uint8))
  split_images = md.load_split_images(spec, Split.TRAIN, channels=0)
  assert sorted(split_images) == [0, 1, 2]
  # The tf.data path: (serialized example, class id) per class, decoded as the official decoder.
  datasets = md.make_class_datasets(spec, Split.TEST, shuffle=False, repeat=False)
  (example, cid), = list(datasets[0].take(1))
  assert int(cid) == 4
  image_bytes, label = md.parse_example(example)
  assert int(label) == 4
  np.testing.assert_array_equal(tf.io.decode_png(image_bytes).numpy(), images[labels == 3][0])
  decoded, _ = md.decode_example(example, 16)
  assert decoded.shape == (16, 16, 3) and -1.0 <= float(tf.reduce_min(decoded))
  assert float(tf.reduce_max(decoded)) <= 1.0
  shuffled = md.make_class_datasets(spec, Split.TRAIN, shuffle_seed=1)
  assert len(list(shuffled[0].take(9))) == 9  # repeated by default


def test_convert_arrays_rgb_jpeg_and_cap(tmp_path):
  images, labels = toy_arrays(channels=3, n_per_class=6)
  spec = md_convert.convert_arrays(images, labels, str(tmp_path), "toy_jpeg", splits=(0.6, 0.2, 0.2),
                                   seed=3, image_format="jpeg", max_images_per_class=4)
  assert set(spec.images_per_class.values()) == {4}
  got = md.load_class_images(spec, 0)
  assert got.shape == (4, 12, 10, 3)
  with open(md.class_record_path(spec, 0), "rb") as f:
    assert b"\xff\xd8\xff" in f.read(200)  # JPEG bytes in the record


def test_split_class_indices():
  s = md_convert.split_class_indices(47, (0.7, 0.15, 0.15), seed=0)
  assert [len(s[k]) for k in ("train", "valid", "test")] == [33, 7, 7]  # the official DTD split
  assert sorted(s["train"] + s["valid"] + s["test"]) == list(range(47))
  assert s == md_convert.split_class_indices(47, "0.7,0.15,0.15", seed=0)
  assert s != md_convert.split_class_indices(47, "0.7,0.15,0.15", seed=1)
  assert md_convert.split_class_indices(5, (0, 0, 1))["test"] == [0, 1, 2, 3, 4]
  with pytest.raises(ValueError, match="summing to 1"):
    md_convert.parse_fractions("0.5,0.2,0.2")
  with pytest.raises(ValueError, match="both"):
    md_convert.resolve_class_splits({"train": ["a"], "test": ["a", "b"]}, ["a", "b"])
  with pytest.raises(ValueError, match="leaves 1 classes out"):
    md_convert.resolve_class_splits({"train": ["a"]}, ["a", "b"])


def test_reader_errors_name_the_file(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    md.load_dataset_spec(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="No dataset_spec.json in .*empty"):
    md.load_dataset_spec(str(tmp_path / "empty"))
  (tmp_path / "empty" / md.SPEC_FILENAME).write_text("{not json")
  with pytest.raises(DataError, match="Corrupt .*dataset_spec.json"):
    md.load_dataset_spec(str(tmp_path / "empty"))

  images, labels = toy_arrays(n_per_class=30)
  out = str(tmp_path / "toy")
  spec = md_convert.convert_arrays(images, labels, out, "toy", class_splits=SPLITS_5)
  # Missing class file.
  missing = md.class_record_path(spec, 3)
  os.remove(missing)
  for fn in (lambda: md.check_class_files(spec), lambda: md.load_class_images(spec, 3),
             lambda: md.make_class_datasets(spec, Split.VALID)):
    with pytest.raises(DataError, match="Missing class file " + missing) as e:
      fn()
    assert "\n" not in str(e.value)
  # Corrupt record: bytes flipped in the middle of a file (the record checksum fails).
  corrupt = md.class_record_path(spec, 1)
  data = bytearray(open(corrupt, "rb").read())
  data[len(data) // 2:len(data) // 2 + 8] = b"\x00\x11\x22\x33\x44\x55\x66\x77"
  open(corrupt, "wb").write(bytes(data))
  with pytest.raises(DataError, match=r"Corrupt record \d+ in " + corrupt) as e:
    md.load_class_images(spec, 1)
  assert "\n" not in str(e.value)
  with pytest.raises(DataError, match=r"Corrupt record \d+ in " + corrupt):
    md.load_class_images(spec, 1, image_size=8)  # the batched path names the record too
  # A truncated file.
  truncated = md.class_record_path(spec, 2)
  data = open(truncated, "rb").read()
  open(truncated, "wb").write(data[:len(data) - 5])
  with pytest.raises(DataError, match="Corrupt record 29 in " + truncated):
    md.load_class_images(spec, 2)
  # A well-formed record whose image does not decode.
  tf = tf_host()
  bad = md.class_record_path(spec, 0)
  with tf.io.TFRecordWriter(bad) as w:
    w.write(md_convert.serialize_example(b"not an image", 0))
  with pytest.raises(DataError, match="Corrupt record 0 in " + bad):
    md.load_class_images(spec, 0)
  # A record with another class's label.
  with tf.io.TFRecordWriter(bad) as w:
    w.write(md_convert.serialize_example(md_convert.encode_image(images[0]), 7))
  with pytest.raises(DataError, match="label 7, expected 0"):
    md.load_class_images(spec, 0)
  # A file shorter than the spec says (an interrupted conversion).
  with tf.io.TFRecordWriter(bad) as w:
    w.write(md_convert.serialize_example(md_convert.encode_image(images[0]), 0))
  with pytest.raises(DataError, match="holds 1 records but dataset_spec.json says 30"):
    md.load_class_images(spec, 0)


def test_random_access_reads_what_the_whole_file_reader_reads(tmp_path):
  """Record index + random reads + batch decode give the same pixels and labels as reading the
  whole class file, for any subset in any order (JPEG records, resized)."""
  images, labels = toy_arrays(channels=3, n_per_class=9)
  spec = md_convert.convert_arrays(images, labels, str(tmp_path / "toy"), "toy",
                                   class_splits=SPLITS_5, image_format="jpeg")
  for class_id in (0, 3):
    index = md.index_class_records(spec, class_id)
    assert index.shape == (9, 2) and index[0, 0] == 0 and np.all(np.diff(index[:, 0]) > 0)
    assert os.path.getsize(md.class_record_path(spec, class_id)) == index[-1].sum() + 16
    whole = md.load_class_images(spec, class_id, image_size=16)
    records = [7, 2, 5, 0]
    got, got_labels = md.decode_records(
        md.read_records(md.class_record_path(spec, class_id), index, records), 16)
    np.testing.assert_array_equal(got, whole[records])
    assert got_labels.tolist() == [class_id] * 4


def test_random_access_errors_name_file_and_record(tmp_path):
  images, labels = toy_arrays(n_per_class=6)
  spec = md_convert.convert_arrays(images, labels, str(tmp_path / "toy"), "toy",
                                   class_splits=SPLITS_5)
  path = md.class_record_path(spec, 1)
  index = md.index_class_records(spec, 1)
  # Bytes flipped inside record 3's data: its checksum fails when (and only when) it is read.
  data = bytearray(open(path, "rb").read())
  start = int(index[3, 0]) + 12 + 4
  data[start:start + 4] = bytes(b ^ 0xFF for b in data[start:start + 4])
  open(path, "wb").write(bytes(data))
  assert len(md.read_records(path, index, [0, 5])) == 2
  with pytest.raises(DataError, match=f"Corrupt record 3 in {path}") as e:
    md.read_records(path, index, [0, 3])
  assert "\n" not in str(e.value)
  # A record that parses but whose image does not decode: named by the caller's name.
  good = md.read_records(md.class_record_path(spec, 0), md.index_class_records(spec, 0), [0])[0]
  with pytest.raises(DataError, match="Corrupt record 9 in X"):
    md.decode_records([good, md_convert.serialize_example(b"not an image", 0)], 8,
                      names=["8 in X", "9 in X"])
  # The file shortened or removed after it was indexed: a DataError, not a raw reader error.
  open(path, "wb").write(bytes(data[:int(index[4, 0])]))
  with pytest.raises(DataError, match=f"Corrupt record 5 in {path}.*changed while it was read"):
    md.read_records(path, index, [5])
  os.remove(path)
  with pytest.raises(DataError, match=f"Corrupt record 0 in {path}"):
    md.read_records(path, index, [0])
  # A truncated file and a file with fewer records than the spec.
  open(path, "wb").write(bytes(data[:-5]))
  with pytest.raises(DataError, match=f"{path} is truncated in record 5"):
    md.index_class_records(spec, 1)
  open(path, "wb").write(bytes(data[:int(index[2, 0])]))
  with pytest.raises(DataError, match="holds 2 records but dataset_spec.json says 6"):
    md.index_class_records(spec, 1)


def test_episode_source_decodes_only_the_sampled_images(tmp_path):
  """Episodes read single records: every slot holds exactly the record the sampler picked, the
  first episode decodes only its own images, a repeat decodes none, a small cache evicts, and a
  class file rewritten after indexing is re-indexed (its cached images dropped)."""
  from visrep_jax.data import episode_pipeline as ep_lib
  from visrep_jax.data import episodes as episodes_lib
  tf = tf_host()
  images, labels = toy_arrays(channels=1, n_per_class=40, num_classes=8)
  spec = md_convert.convert_arrays(images, labels, str(tmp_path / "toy"), "toy",
                                   class_splits={"train": [0, 1, 2, 3, 4], "valid": [5],
                                                 "test": [6, 7]})
  descr = episodes_lib.EpisodeDescriptionConfig.fixed(3, 2, 3)
  src = ep_lib.EpisodeSource(spec.path, "train", descr, 12, channels=1)

  def expected_images(seed):
    """The episode's images slot by slot, from the whole-file reader (EpisodeSource.sample's
    index sampling, replayed)."""
    src.sampler.reseed(seed)
    description = src.sampler.sample_episode_description()
    rng = np.random.RandomState(ep_lib.episode_seed(seed, 0, 1))
    idx = episodes_lib.sample_episode_indices(description, src.sampler.images_per_class, rng)
    padded = episodes_lib.pad_episode(idx, src.shapes.support, src.shapes.query, src.shapes.ways)
    out = np.zeros((src.shapes.support + src.shapes.query, 12, 12, 1), np.uint8)
    for part, offset in (("support", 0), ("query", src.shapes.support)):
      for k in np.flatnonzero(padded[f"{part}_mask"]):
        class_id = int(src.sampler.class_set[int(padded[f"{part}_classes"][k])])
        out[offset + k] = md.load_class_images(spec, class_id, 12, 1)[
            int(padded[f"{part}_images"][k])]
    return out

  ep = src.sample(seed=1)
  np.testing.assert_array_equal(ep["images"], expected_images(1))
  n_real = int(ep["support_mask"].sum() + ep["query_mask"].sum())
  assert n_real == 3 * (2 + 3) and src._cache.decoded == n_real  # not 3 classes x 40 images
  again = src.sample(seed=1)
  np.testing.assert_array_equal(again["images"], ep["images"])
  assert src._cache.decoded == n_real  # served from the cache
  src.release_cache()  # what the test evaluation does once a source is done
  assert src._cache._bytes == 0 and not src._cache._items
  np.testing.assert_array_equal(src.sample(seed=1)["images"], ep["images"])
  assert src._cache.decoded == 2 * n_real  # decoded again
  np.testing.assert_array_equal(src.sample(seed=2)["images"], expected_images(2))
  # A cache of one image's bytes keeps at most one image but gives the same episodes.
  small = ep_lib.EpisodeSource(spec.path, "train", descr, 12, channels=1, cache_bytes=144)
  np.testing.assert_array_equal(small.sample(seed=1)["images"], ep["images"])
  assert len(small._cache._items) <= 1 and small._cache._bytes <= 144
  # Re-converting a class (other pixels, same count) after it was indexed and cached.
  class_ids = {int(src.sampler.class_set[int(c)])
               for c in np.unique(ep["support_labels"][ep["support_mask"]])}
  cid = min(class_ids)
  with tf.io.TFRecordWriter(md.class_record_path(spec, cid)) as w:
    for _ in range(40):
      w.write(md_convert.serialize_example(md_convert.encode_image(
          np.full((12, 10, 1), 7, np.uint8)), cid))
  os.utime(md.class_record_path(spec, cid), ns=(1, 1))  # a new stamp even on coarse clocks
  fresh = src.sample(seed=3)
  np.testing.assert_array_equal(fresh["images"], expected_images(3))


def test_episode_stream_close_and_errors(tmp_path):
  """A closed stream refuses more episodes (no hang); a worker error is raised on every call."""
  from visrep_jax.data import episode_pipeline as ep_lib
  from visrep_jax.data import episodes as episodes_lib
  images, labels = toy_arrays(channels=1, n_per_class=10, num_classes=8)
  spec = md_convert.convert_arrays(images, labels, str(tmp_path / "toy"), "toy",
                                   class_splits={"train": [0, 1, 2, 3, 4], "valid": [5],
                                                 "test": [6, 7]})
  src = ep_lib.EpisodeSource(spec.path, "train", episodes_lib.EpisodeDescriptionConfig.fixed(
      3, 2, 3), 12, channels=1)
  stream = ep_lib.EpisodeStream([src], seed=0, prefetch=2)
  next(stream)
  stream.close()
  with pytest.raises(ep_lib.EpisodeError, match="closed"):
    next(stream)
  os.remove(md.class_record_path(spec, 2))
  src._cache._index.clear()
  src._cache._items.clear()
  with ep_lib.EpisodeStream([src], seed=0, prefetch=2) as broken:
    for _ in range(2):  # the same one-line error, not a hang, on the next call too
      with pytest.raises(DataError, match="Missing class file"):
        for _ in range(20):
          next(broken)


def test_converter_refuses_non_empty_output(tmp_path):
  images, labels = toy_arrays()
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  with pytest.raises(DataError, match="not empty; pass --overwrite"):
    md_convert.convert_arrays(images, labels, str(out), "toy", class_splits=SPLITS_5)
  spec = md_convert.convert_arrays(images, labels, str(out), "toy", class_splits=SPLITS_5,
                                   overwrite=True)
  spec2 = md_convert.convert_arrays(images[:12], labels[:12], str(out), "toy", splits=(1, 0, 0),
                                    overwrite=True)
  assert (out / "notes.txt").read_text() == "keep me"
  assert spec2.classes_per_split[Split.TRAIN] == len(set(labels[:12].tolist()))
  assert spec.num_classes == 5
  leftover = sorted(f for f in os.listdir(out) if f.endswith(".tfrecords"))
  assert leftover == [f"{i}.tfrecords" for i in range(spec2.num_classes)]


def make_image_folder(root, num_classes=5, per_class=3):
  """PNG and JPEG files in class sub-directories; returns {class name: [pixels of PNG files]}."""
  tf = tf_host()
  rng = np.random.default_rng(1)
  pngs = {}
  for c in range(num_classes):
    d = root / f"class_{c}"
    d.mkdir(parents=True)
    pngs[f"class_{c}"] = []
    for i in range(per_class):
      image = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
      (d / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
      pngs[f"class_{c}"].append(image)
    (d / "z.jpg").write_bytes(tf.io.encode_jpeg(rng.integers(0, 256, (9, 7, 3), np.uint8)).numpy())
  return pngs


def test_convert_cli_image_folder(tmp_path):
  pngs = make_image_folder(tmp_path / "folder")
  out = tmp_path / "records"
  cmd = [sys.executable, "-m", "visrep_jax.data.md_convert",
         f"--source=imagefolder:{tmp_path / 'folder'}", f"--out={out}", "--name=toy_folder",
         "--splits=0.6,0.2,0.2", "--seed=5"]
  r = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "Wrote toy_folder" in r.stdout and "train/valid/test 3/1/1" in r.stdout
  spec = md.load_dataset_spec(str(out))
  assert spec.name == "toy_folder" and set(spec.images_per_class.values()) == {4}
  for class_id, name in spec.class_names.items():
    got = md.load_class_images(spec, class_id)
    np.testing.assert_array_equal(got[:3], np.stack(pngs[name]))  # PNG files: exact pixels
  # The converter refuses a non-empty output (in-process: same main()).
  assert md_convert.main([f"--source=imagefolder:{tmp_path / 'folder'}", f"--out={out}",
                          "--name=x"]) == 2
  assert md_convert.main([f"--source=imagefolder:{tmp_path / 'folder'}", f"--out={out}",
                          "--name=x", "--overwrite", "--format=jpeg"]) == 0
  assert md.load_dataset_spec(str(out)).name == "x"
  assert md_convert.main([f"--source=imagefolder:{tmp_path / 'nope'}",
                          f"--out={tmp_path / 'o2'}"]) == 2


def test_convert_image_folder_names_a_corrupt_file(tmp_path):
  make_image_folder(tmp_path / "folder", num_classes=3, per_class=1)
  bad = tmp_path / "folder" / "class_1" / "0.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
  with pytest.raises(DataError, match="Cannot decode image " + str(bad)):
    md_convert.convert_image_folder(str(tmp_path / "folder"), str(tmp_path / "out"), "x",
                                    splits=(1, 0, 0))
  assert not os.path.exists(tmp_path / "out" / md.SPEC_FILENAME)  # unfinished: no spec


_TINY_TFDS = None


def tiny_tfds_builder():
  """A 4-class TFDS dataset defined here (registered once per process)."""
  global _TINY_TFDS
  if _TINY_TFDS is None:
    import tensorflow_datasets as tfds

    class MdTinyImages(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 3)),
            "label": tfds.features.ClassLabel(names=["ant", "bee", "cat", "dog"])}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(20):
          yield i, {"image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "label": i % 4}

    _TINY_TFDS = MdTinyImages
  return _TINY_TFDS


def test_convert_tfds(tmp_path):
  builder = tiny_tfds_builder()(data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare()
  spec = md_convert.convert(
      "tfds:md_tiny_images", str(tmp_path / "out"), "tiny", data_dir=str(tmp_path / "tfds"),
      class_splits={"train": ["ant", "bee"], "valid": ["cat"], "test": ["dog"]},
      max_images_per_class=4)
  assert spec.class_names == {0: "ant", 1: "bee", 2: "cat", 3: "dog"}
  assert set(spec.images_per_class.values()) == {4}
  ds = builder.as_dataset(split="train", shuffle_files=False)
  dogs = {ex["image"].tobytes() for ex in ds.as_numpy_iterator() if ex["label"] == 3}
  got = {a.tobytes() for a in md.load_class_images(spec, 3)}  # PNG: exact pixels
  assert got <= dogs and len(got) == 4
  with pytest.raises(DataError, match="not prepared"):
    md_convert.convert("tfds:md_tiny_images", str(tmp_path / "o2"), "x",
                       data_dir=str(tmp_path / "elsewhere"))


# ----------------------------------------------------------------------------------------------
# Mini benchmark.


@requires_sklearn
def test_digits_upsampled_to_28():
  images, labels = md_mini.load_digits_28()
  assert images.shape == (1797, 28, 28, 1) and images.dtype == np.uint8
  assert images.max() == 255 and images.min() == 0
  assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
  # Background stays dark, ink bright: the corners of a digit are background.
  assert images[:, :2, :2].mean() < 10 and images[:, 10:18, 10:18].mean() > 60


@requires_sklearn
@requires_fashion_mnist
def test_mini_benchmark(tmp_path):
  out = str(tmp_path / "mini")
  specs = md_mini.build_mini_benchmark(out, max_images_per_class=6)
  fm, digits = specs[md_mini.FASHION_MNIST], specs[md_mini.DIGITS]
  assert sorted(os.listdir(out)) == ["digits", "fashion_mnist", "md_mini.json"]
  assert [len(fm.get_classes(s)) for s in md.SPLITS] == [6, 2, 2]
  assert [fm.class_names[i] for i in fm.get_classes(Split.TEST)] == ["Shirt", "Ankle boot"]
  assert [fm.class_names[i] for i in fm.get_classes(Split.VALID)] == ["Coat", "Sneaker"]
  assert [fm.class_names[i] for i in fm.get_classes(Split.TRAIN)] == [
      "T-shirt/top", "Trouser", "Pullover", "Dress", "Sandal", "Bag"]
  assert set(fm.images_per_class.values()) == {6}
  assert [len(digits.get_classes(s)) for s in md.SPLITS] == [0, 0, 10]
  assert digits.get_classes(Split.TEST) == range(0, 10) and digits.class_names[3] == "3"
  # Records read back exactly: the first 6 "Shirt" (label 6) images of the train IDX file.
  fm_images, fm_labels = md_mini.load_fashion_mnist()
  np.testing.assert_array_equal(md.load_class_images(fm, 8, channels=0),
                                fm_images[fm_labels == 6][:6])
  np.testing.assert_array_equal(md.load_class_images(fm, 8, image_size=28, channels=0),
                                fm_images[fm_labels == 6][:6])  # already 28x28: not resampled
  d_images, d_labels = md_mini.load_digits_28()
  np.testing.assert_array_equal(md.load_class_images(digits, 7, channels=0),
                                d_images[d_labels == 7][:6])
  # Loaded from disk, the specs are the same; a second build is a no-op.
  assert md.load_dataset_spec(fm.path) == fm
  record = md.class_record_path(fm, 0)
  mtime = os.stat(record).st_mtime_ns
  assert md_mini.build_mini_benchmark(out, max_images_per_class=6)[md_mini.FASHION_MNIST] == fm
  assert os.stat(record).st_mtime_ns == mtime
  # Another cap rebuilds; so does an incomplete build (a class file lost).
  assert set(md_mini.build_mini_benchmark(out, max_images_per_class=3)[
      md_mini.DIGITS].images_per_class.values()) == {3}
  os.remove(md.class_record_path(digits, 9))
  assert md_mini.main([f"--out={out}", "--max_images_per_class=3"]) == 0
  assert os.path.exists(md.class_record_path(digits, 9))
