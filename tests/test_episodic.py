"""Episodic few-shot training end to end on the offline mini benchmark, and the pieces the
trainer adds on top of the sampler and the heads: padding invariance of a whole episode through
the backbone (masked BatchNorm) and head, deterministic episode streams (resume), the confidence
interval, and the config errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, requires_fashion_mnist
from visrep_jax import config_lib, models
from visrep_jax.config_lib import ConfigError
from visrep_jax.data import episode_pipeline as ep_lib
from visrep_jax.models import fewshot
from visrep_jax.trainers import episodic


def test_confidence_interval_is_meta_datasets_formula():
  accs = np.array([0.5, 0.7, 0.9, 0.6])
  assert ep_lib.confidence_interval(accs) == pytest.approx(1.96 * np.std(accs) / 2.0)
  assert np.isnan(ep_lib.confidence_interval([]))


def test_config_errors():
  c = load_config("ctx", "variant=ctx,runlocal")
  c.fewshot.head = "matchingnet"
  with pytest.raises(ConfigError, match="fewshot.head"):
    config_lib.validate(c)
  c = load_config("ctx", "variant=ctx,runlocal")
  c.fewshot.remat_impl = "flash"
  with pytest.raises(ConfigError, match="fewshot.remat_impl.*fused, checkpoint"):
    config_lib.validate(c)
  c = load_config("ctx", "variant=ctx,runlocal")
  c.fewshot.class_sum_impl = "scatter"
  with pytest.raises(ConfigError, match="fewshot.class_sum_impl='scatter' is not valid; choose "
                                        "'' \\(by the backend\\), 'segment' or 'matmul'"):
    config_lib.validate(c)
  c.fewshot.class_sum_impl = "segment"  # and it reaches the head
  config_lib.validate(c)
  assert episodic.make_head(c).class_sum_impl == "segment"
  c.fewshot.class_sum_impl = ""
  assert episodic.make_head(c).class_sum_impl is None
  c = load_config("ctx", "variant=ctx")
  c.episodes.data_dir = ""
  with pytest.raises(ConfigError, match="data_dir is empty"):
    config_lib.validate(c)
  c = load_config("ctx", "variant=ctx,runlocal")
  c.episodes.augment = "simclr_episodes(prob=2)"
  with pytest.raises(ConfigError, match="episodes.augment"):
    config_lib.validate(c)
  with pytest.raises(ConfigError, match="variant="):
    load_config("ctx", "variant=maml")
  # Episode bounds the sampler would only reject at the first episode (in the input thread).
  for key, value, match in (
      ("min_ways", 60, r"min_ways \(60\) must not exceed max_ways_upper_bound \(50\)"),
      ("max_support_set_size", 20, r"max_support_set_size \(20\) is below the number of ways"),
      ("max_support_size_contrib_per_class", 0, "max_support_size_contrib_per_class"),
      ("min_log_weight", 1.0, "min_log_weight"),
      ("min_examples_in_class", -1, "min_examples_in_class")):
    c = load_config("ctx", "variant=ctx")
    c.episodes.data_dir = "/md"
    c.episodes[key] = value
    with pytest.raises(ConfigError, match=match):
      config_lib.validate(c)
  # Fixed ways need no bound of the variable mode.
  c = load_config("ctx", "variant=ctx")
  c.episodes.data_dir = "/md"
  c.episodes.num_ways, c.episodes.num_support, c.episodes.num_query = 5, 1, 15
  c.episodes.min_ways, c.episodes.max_support_set_size = 60, 1
  config_lib.validate(c)


def _write_source(directory, spec, images_per_class):
  """Class files of ``spec`` (tiny black PNGs) and its dataset_spec.json in ``directory``."""
  import tensorflow as tf
  from visrep_jax.data import meta_dataset as md, md_convert
  img = md_convert.encode_image(np.zeros((8, 8, 3), np.uint8))
  for c in range(spec.num_classes if hasattr(spec, "num_classes") else
                 sum(spec.classes_per_superclass.values())):
    with tf.io.TFRecordWriter(md.class_record_path(spec, c)) as w:
      for _ in range(images_per_class):
        w.write(md_convert.serialize_example(img, c))
  md.save_dataset_spec(spec)


def test_fixed_way_episodes_run_on_hierarchical_and_bilevel_sources(tmp_path):
  """5-way 1-shot 15-query episodes open ILSVRC (DAG) and Omniglot (alphabets) sources: the
  ontologies are switched off for fixed ways, as for min_examples_in_class on Omniglot; with
  variable ways they stay on."""
  from visrep_jax.data import meta_dataset as md
  S = md.Synset

  def tree(prefix, groups, leaves):
    root, nodes = S(prefix + "root"), set()
    nodes.add(root)
    for i in range(groups):
      g = S(f"{prefix}g{i}")
      root.children.add(g), g.parents.add(root), nodes.add(g)
      for j in range(leaves):
        leaf = S(f"{prefix}n{i}{j:02d}")
        g.children.add(leaf), leaf.parents.add(g), nodes.add(leaf)
    return nodes

  ilsvrc = str(tmp_path / "ilsvrc_2012")
  os.makedirs(ilsvrc)
  graphs = {md.Split.TRAIN: tree("a", 2, 6), md.Split.VALID: tree("b", 1, 6),
            md.Split.TEST: tree("c", 1, 6)}
  _write_source(ilsvrc, md.make_hierarchical_spec(
      "ilsvrc_2012", graphs, {n.wn_id: 20 for g in graphs.values() for n in md.get_leaves(g)},
      ilsvrc), 20)
  omniglot = str(tmp_path / "omniglot")
  os.makedirs(omniglot)
  _write_source(omniglot, md.BiLevelDatasetSpecification(
      "omniglot", {md.Split.TRAIN: 2, md.Split.VALID: 1, md.Split.TEST: 1},
      {k: 6 for k in range(4)}, {c: 20 for c in range(24)}, {k: f"a{k}" for k in range(4)},
      {c: f"c{c}" for c in range(24)}, omniglot, "{}.tfrecords"), 20)

  def open_source(path, **episodes):
    c = config_lib.base_config()
    c.episodes.update(episodes)
    return ep_lib.EpisodeSource(path, "test", episodic.descr_config(c.episodes), 8,
                                use_hierarchy=True)

  for path in (ilsvrc, omniglot):
    src = open_source(path, num_ways=5, num_support=1, num_query=15)
    assert not (src.sampler.use_dag_hierarchy or src.sampler.use_bilevel_hierarchy)
    ep = src.sample(0)
    assert ep["num_ways"] == 5 and int(np.sum(ep["support_mask"])) == 5
    assert int(np.sum(ep["query_mask"])) == 75
  assert open_source(ilsvrc, min_ways=5).sampler.use_dag_hierarchy
  assert open_source(omniglot, min_ways=5).sampler.use_bilevel_hierarchy
  src = open_source(omniglot, min_ways=5, min_examples_in_class=10)
  assert not src.sampler.use_bilevel_hierarchy and src.sample(0)["num_ways"] >= 5
  # Set by hand, the ignore switches turn the ontologies off for variable ways too.
  assert not open_source(ilsvrc, ignore_dag_ontology=True).sampler.use_dag_hierarchy
  assert not open_source(omniglot, ignore_bilevel_ontology=True).sampler.use_bilevel_hierarchy
  # The config.json of a workdir from before these keys (fewshot_viz, eval of old runs).
  import ml_collections
  old = config_lib.base_config().episodes.to_dict()
  del old["ignore_dag_ontology"], old["ignore_bilevel_ontology"]
  dc = episodic.descr_config(ml_collections.ConfigDict(old))
  assert not dc.ignore_dag_ontology and not dc.ignore_bilevel_ontology


def test_recipe_values_follow_the_paper():
  for variant, decay in (("protonet", 500), ("ctx", 500), ("ctx_simclr", 1000),
                         ("ctx_simclr_aug", 2000)):
    c = load_config("ctx", f"variant={variant},data=/x")
    assert c.schedule.decay_steps == decay and c.schedule.decay_rate == 0.915
    assert c.optimizer.name == "normalized_adam" and c.optimizer.lr == 1.21e-3
    assert c.optimizer.weight_decay == 8.86e-5
    assert c.model.name == "resnet34"
    assert tuple(c.model.replace_stride_with_dilation) == (False, False, variant != "protonet")
    assert c.episodes.ignore_hierarchy_probability == 0.5
    assert c.fewshot.head == ("protonet" if variant == "protonet" else "ctx")
  assert "bohb" in load_config("ctx", "variant=ctx_simclr_aug").episodes.augment
  pn = load_config("protonet", "simclr,bn=support")
  assert pn.fewshot.head == "protonet" and pn.fewshot.bn_test_mode == "support"
  assert pn.episodes.augment.startswith("simclr_episodes") and pn.schedule.decay_steps == 1000
  # The official ResNet-34's layer1 projection shortcut, in both phases (init= must match).
  for name, arg in (("ctx", "variant=ctx"), ("protonet", ""), ("ctx_pretrain", ""),
                    ("ctx", "variant=ctx,mini"), ("ctx_pretrain", "mini")):
    assert load_config(name, arg).model.downsample_first_stage is True, (name, arg)
  # The mini benchmark's schedule (5x shorter) keeps SimCLR's doubling, for ProtoNets as for CTX.
  assert load_config("protonet", "mini").schedule.decay_steps == 100
  assert load_config("protonet", "simclr,mini").schedule.decay_steps == 200
  assert load_config("ctx", "variant=ctx_simclr,mini").schedule.decay_steps == 200


@pytest.mark.parametrize("head", ["protonet", "ctx"])
def test_padding_changes_nothing_through_backbone_and_head(head):
  """The same episode padded to two sizes (garbage in the padding) gives the same query logits
  and the same BatchNorm statistics, in training mode (masked BN) and at test time."""
  backbone = models.create("resnet18", num_classes=0, width=8, stage_sizes=(1, 1, 1, 1),
                           stem_kernel=3, stem_stride=1, stem_pool=False,
                           replace_stride_with_dilation=(False, False, True))
  h = None if head == "protonet" else fewshot.CrossTransformer(key_dim=16, value_dim=16)
  rng = np.random.default_rng(0)
  n_s, n_q, ways = 5, 4, 3
  imgs = rng.integers(0, 256, size=(n_s + n_q, 16, 16, 1)).astype(np.uint8)
  s_lab = np.array([0, 0, 1, 2, 2], np.int32)
  q_lab = np.array([0, 1, 2, 1], np.int32)
  v = backbone.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 1)), train=False)
  params = {"backbone": v["params"]}
  if h is not None:
    fm = backbone.apply(v, jnp.zeros((2, 16, 16, 1)))[1]["feature_map"]
    params["head"] = h.init(jax.random.PRNGKey(1), fm[:1], fm, jnp.zeros((2,), jnp.int32),
                            jnp.ones((2,), bool), num_classes=2)["params"]
  model_state = {"batch_stats": v["batch_stats"]}

  def episode(pad_s, pad_q):
    junk = lambda n: rng.integers(0, 256, size=(n, 16, 16, 1)).astype(np.uint8)
    return {"images": np.concatenate([imgs[:n_s], junk(pad_s), imgs[n_s:], junk(pad_q)]),
            "support_labels": np.concatenate([s_lab, -np.ones(pad_s, np.int32)]),
            "support_mask": np.arange(n_s + pad_s) < n_s,
            "query_labels": np.concatenate([q_lab, -np.ones(pad_q, np.int32)]),
            "query_mask": np.arange(n_q + pad_q) < n_q}

  outs = []
  for pad_s, pad_q, n_ways in ((0, 0, ways), (3, 2, ways + 2)):
    ep = episode(pad_s, pad_q)
    res = {}
    for train, mode in ((True, "ema"), (False, "ema"), (False, "support")):
      logits, upd = episodic.episode_logits(backbone, h, params, model_state, ep, n_ways,
                                            n_s + pad_s, train=train, bn_mode=mode)
      res[(train, mode)] = (np.asarray(logits)[:n_q, :ways], upd)
      loss, acc = episodic.episode_loss_and_accuracy(logits, ep)
      res[(train, mode, "loss")] = (float(loss), float(acc))
    outs.append(res)
  for key in outs[0]:
    a, b = outs[0][key], outs[1][key]
    if len(key) == 3:
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
      continue
    np.testing.assert_allclose(a[0], b[0], rtol=1e-4, atol=1e-3)
    for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
  # Support-set BN statistics differ from the running ones (the two test modes are different).
  assert not np.allclose(outs[0][(False, "ema")][0], outs[0][(False, "support")][0], atol=1e-3)


def test_training_batchnorm_uses_support_statistics_only():
  """Training-mode BatchNorm is not transductive (Meta-Dataset's default): queries are
  normalised with the support set's statistics, so changing one query's image changes no other
  query's logits, and the running statistics move exactly as for the support images alone."""
  backbone = models.create("resnet18", num_classes=0, width=8, stage_sizes=(1, 1, 1, 1),
                           stem_kernel=3, stem_stride=1, stem_pool=False)
  rng = np.random.default_rng(1)
  n_s, n_q = 4, 4
  imgs = rng.integers(0, 256, size=(n_s + n_q, 16, 16, 1)).astype(np.uint8)
  v = backbone.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 1)), train=False)
  params, model_state = {"backbone": v["params"]}, {"batch_stats": v["batch_stats"]}

  def run(images):
    ep = {"images": images, "support_labels": np.array([0, 0, 1, 1], np.int32),
          "support_mask": np.ones(n_s, bool), "query_labels": np.array([0, 1, 0, 1], np.int32),
          "query_mask": np.ones(n_q, bool)}
    logits, upd = episodic.episode_logits(backbone, None, params, model_state, ep, 2, n_s,
                                          train=True)
    return np.asarray(logits), upd

  logits, upd = run(imgs)
  other = imgs.copy()
  other[-1] = 255 - other[-1]
  logits2, upd2 = run(other)
  np.testing.assert_allclose(logits2[:-1], logits[:-1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits2[-1], logits[-1], atol=1e-3)  # the changed query itself moves
  _, ref = backbone.apply(v, episodic.normalize_images(imgs[:n_s]), train=True,
                          mutable=["batch_stats"])
  for a, b, c in zip(jax.tree.leaves(upd), jax.tree.leaves(upd2), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@requires_fashion_mnist
def test_episode_stream_is_a_function_of_the_index(mini_dir):
  c = load_config("ctx", f"variant=ctx,runlocal,data={mini_dir}")
  src = ep_lib.EpisodeSource(os.path.join(mini_dir, "fashion_mnist"), "train",
                             episodic.descr_config(c.episodes), 28, channels=1)
  a = ep_lib.EpisodeStream([src], seed=3, start=0, prefetch=2)
  eps = [next(a) for _ in range(5)]
  worker = a._thread
  a.close()  # waits for the prefetch thread: none is left inside TensorFlow at exit
  assert worker is not None and not worker.is_alive()
  b = ep_lib.EpisodeStream([src], seed=3, start=3, prefetch=0)
  for want in eps[3:]:
    got = next(b)
    for k in ("images", "support_labels", "query_labels", "support_mask", "query_mask"):
      np.testing.assert_array_equal(got[k], want[k])
  # Different episodes, with variable ways and shots, within the configured bounds.
  ways = {int(e["num_ways"]) for e in eps}
  assert len({e["images"].tobytes() for e in eps}) == 5 and ways <= set(range(2, 7))
  for e in eps:
    assert e["support_mask"].sum() <= c.episodes.max_support_set_size
    counts = np.bincount(e["query_labels"][e["query_mask"]], minlength=int(e["num_ways"]))
    assert len(set(counts.tolist())) == 1 and counts[0] <= c.episodes.max_num_query


@requires_fashion_mnist
@pytest.mark.parametrize("variant,extra", [("ctx", ""), ("protonet", ",bn=support")])
def test_runlocal_trains_validates_and_tests(mini_dir, tmp_path, variant, extra):
  c = load_config("ctx", f"variant={variant},runlocal,data={mini_dir}{extra}")
  if variant == "protonet":
    c.episodes.augment = "simclr_episodes(prob=0.5)"  # exercise the augmentation path
  wd = str(tmp_path / "wd")
  results = episodic.train_and_evaluate(c, wd)
  assert set(results) == {"fashion_mnist", "digits"}
  for r in results.values():
    assert 0.0 <= r["accuracy"] <= 1.0 and r["episodes"] == c.episodes.num_test_episodes
    assert r["ci95"] > 0
  saved = json.load(open(os.path.join(wd, "fewshot_test.json")))
  assert saved["results"]["digits"]["accuracy"] == pytest.approx(results["digits"]["accuracy"])
  best = json.load(open(os.path.join(wd, "best_valid.json")))
  assert best["step"] in (3, 6)
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert any("valid/accuracy" in l for l in lines)
  assert all(np.isfinite(l["train/loss"]) for l in lines if "train/loss" in l)
  # Rerunning finds the finished run: nothing is retrained and the test numbers are identical.
  again = episodic.train_and_evaluate(c, wd)
  assert again == results


@requires_fashion_mnist
def test_valid_and_test_episodes_read_their_own_classes(mini_dir):
  """Sampler class ids are split-relative; the images must come from the split's classes."""
  from visrep_jax.data import meta_dataset as md
  c = load_config("ctx", f"variant=ctx,runlocal,data={mini_dir}")
  for split in ("valid", "test"):
    src = ep_lib.EpisodeSource(os.path.join(mini_dir, "fashion_mnist"), split,
                               episodic.descr_config(c.episodes), 28, channels=1)
    ids = list(src.spec.get_classes(md.Split.parse(split)))
    assert ids[0] > 0  # not the train classes' ids
    own = {cid: {im.tobytes() for im in md.load_class_images(src.spec, cid, 28, 1)}
           for cid in ids}
    ep = src.sample(seed=5)
    s = ep["support_mask"].shape[0]
    for part, offset in (("support", 0), ("query", s)):
      labels, mask = ep[f"{part}_labels"], ep[f"{part}_mask"]
      for k in np.flatnonzero(mask):
        img = ep["images"][offset + k].tobytes()
        homes = [cid for cid in ids if img in own[cid]]
        assert homes, f"{split} episode image from outside the split's classes"
      # One label per class: images sharing a label come from one class.
      for lab in set(labels[mask].tolist()):
        homes = {next(cid for cid in ids if ep["images"][offset + k].tobytes() in own[cid])
                 for k in np.flatnonzero(mask & (labels == lab))}
        assert len(homes) == 1


def test_missing_source_is_a_data_error_main_prints_as_one_line(tmp_path):
  from visrep_jax.data import DataError
  c = load_config("ctx", "variant=ctx,runlocal")
  with pytest.raises(DataError, match="does not exist: convert the source first"):
    ep_lib.EpisodeSource(str(tmp_path / "nope"), "train", episodic.descr_config(c.episodes), 28)
