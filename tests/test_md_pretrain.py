"""CrossTransformers phase 1: Meta-Dataset records as a classification source
(``meta_dataset:<source>``: split classes, relative labels, per-class slices, uniform class
sampling, errors), the linear probe and its early stopping, and the two-phase pipeline end to end
(configs/ctx_pretrain.py:runlocal, then configs/ctx.py:runlocal initialised from its best
checkpoint, the dilated backbone receiving the very same weights)."""

import collections
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, load_config, requires_fashion_mnist, subprocess_env
from visrep_jax import config_lib
from visrep_jax.data import DataError, md_classification, md_convert, pipeline, sources, tf_host
from visrep_jax.data import meta_dataset as md
from visrep_jax.evaluators import linear_probe

# Toy source: original label -> number of images. Train classes 0-3 (unequal sizes), valid 4-5,
# test 6. Pixel (0, 0) holds the original label, pixel (0, 1) the image's index in its class.
SIZES = {0: 30, 1: 10, 2: 20, 3: 5, 4: 12, 5: 12, 6: 8}
SPLITS = {"train": [0, 1, 2, 3], "valid": [4, 5], "test": [6]}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  root = tmp_path_factory.mktemp("md")
  labels = np.concatenate([np.full(n, c) for c, n in SIZES.items()])
  index = np.concatenate([np.arange(n) for n in SIZES.values()])
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (len(labels), 10, 12, 1), dtype=np.uint8)
  images[:, 0, 0, 0], images[:, 0, 1, 0] = labels, index
  md_convert.convert_arrays(images, labels, str(root / "toy"), "toy", class_splits=SPLITS)
  return str(root)


def read(src, split, index=0, count=1, take=None):
  """``[(label, original label, index in class)]`` of one process's examples of ``split`` (its
  first ``take``: a sampled split is endless)."""
  tf = tf_host()
  out = []
  ds = src.make(split, index, count)
  for ex in (ds if take is None else ds.take(take)).as_numpy_iterator():
    px = tf.io.decode_png(ex["image"]).numpy()
    out.append((int(ex["label"]), int(px[0, 0, 0]), int(px[0, 1, 0])))
  return out


def test_records_mode_reads_every_image_of_the_split_once_with_split_relative_labels(toy):
  src = sources.create("meta_dataset:toy", data_dir=toy)
  assert src.num_classes == 4 and list(src.classes("valid")) == [4, 5]
  for split, originals in (("train", SPLITS["train"]), ("valid", SPLITS["valid"]),
                           ("test", SPLITS["test"])):
    got = read(src, split)
    want = [(i, c, k) for i, c in enumerate(originals) for k in range(SIZES[c])]
    assert sorted(got) == sorted(want) and len(got) == src.num_examples(split)
  # The classes are interleaved (not one file after the other): Meta-Dataset's batch reader.
  first = [label for label, _, _ in read(src, "train")[:20]]
  assert len(set(first)) >= 3
  # The source directory itself works as data_dir too.
  alone = sources.create("meta_dataset:toy", data_dir=os.path.join(toy, "toy"))
  assert alone.num_examples("valid") == 24


def test_per_class_slices_partition_every_class(toy):
  src = sources.create("meta_dataset:toy", data_dir=toy)
  head, tail = read(src, "train[:10%]"), read(src, "train[10%:]")
  # round(n / 10) images of every class: 3, 1, 2 and 1 (5 * 10% = 0.5 rounds up).
  assert collections.Counter(c for _, c, _ in head) == {0: 3, 1: 1, 2: 2, 3: 1}
  assert all(k < 3 for _, _, k in head)  # the first images of each class file
  assert sorted(head + tail) == sorted(read(src, "train")) and not set(head) & set(tail)
  assert sorted(k for _, c, k in read(src, "valid[5:8]") if c == 4) == [5, 6, 7]
  assert src.num_examples("valid[:50]") == 24  # a bound beyond the class size is clamped
  # Two processes: disjoint shards that cover the split; shard_sizes says how many each reads.
  a, b = read(src, "train[10%:]", 0, 2), read(src, "train[10%:]", 1, 2)
  assert sorted(a + b) == sorted(tail) and not set(a) & set(b)
  assert src.shard_sizes("train[10%:]", 2) == [len(a), len(b)]


def test_uniform_sampling_draws_classes_uniformly_not_by_size(toy):
  """Through the training pipeline: 2,400 training examples of train classes holding 30, 10, 20
  and 5 images. Uniform sampling gives each class 1/4 (binomial sd 21 of 600); the records mode
  gives them in proportion to their sizes (46%, 15%, 31%, 8%)."""
  src = sources.create("meta_dataset:toy", data_dir=toy)

  def labels(split, n=2400, batch=200):
    inp = pipeline.make_train(src, split, "decode(1)|normalize(0.5, 0.5)", batch, seed=0,
                              shuffle_buffer=100, process_index=0, process_count=1)
    return np.concatenate([next(inp.iterator)["label"] for _ in range(n // batch)])

  uniform = np.bincount(labels("train:uniform"), minlength=4)
  assert np.all(np.abs(uniform - 600) < 100), uniform
  records = np.bincount(labels("train"), minlength=4) / 2400
  np.testing.assert_allclose(records, np.array([30, 10, 20, 5]) / 65, atol=0.03)
  # Every image of the smallest class is drawn, and only the slice's images.
  seen = {(c, k) for _, c, k in read(src, "train[1:]:uniform", take=300)}
  assert {k for c, k in seen if c == 3} == {1, 2, 3, 4} and all(k >= 1 for _, k in seen)


def test_md_resize_gives_the_pixels_of_the_episode_pipeline(toy):
  """``md_resize`` is Meta-Dataset's decoder resize, as ``load_class_images`` (the episodes)."""
  from visrep_jax.data import preprocess
  tf = tf_host()
  src = sources.create("meta_dataset:toy", data_dir=toy)
  spec = md.load_dataset_spec(os.path.join(toy, "toy"))
  want = md.load_class_images(spec, 4, image_size=16, channels=1)  # valid class 0
  pp = preprocess.parse("decode(1)|md_resize(16)")
  got = {}
  for ex in src.make("valid", 0, 1):
    if int(ex["label"]) == 0:
      raw = tf.io.decode_png(ex["image"]).numpy()
      got[int(raw[0, 1, 0])] = pp(ex, tf.constant([0, 0], tf.int32))["image"].numpy()
  assert len(got) == 12
  for k, image in got.items():
    np.testing.assert_array_equal(image, want[k].astype(np.float32))


@pytest.mark.parametrize("name,data,split,message", [
    ("toy", None, "train", "needs config.dataset.data_dir"),
    ("toy", "/nonexistent/md", "train",
     r"'/nonexistent/md' \(config.dataset.data_dir\) does not exist: convert it"),
    ("nope", "TOY", "train",
     "No Meta-Dataset source 'nope' in .*the converted sources there: .*toy"),
    ("toy", "TOY", "training", "Unknown split 'training' in 'training': use train, valid or test"),
    ("toy", "TOY", "train:balanced", "Unknown sampling mode 'balanced'.*valid: records, uniform"),
    ("toy", "TOY", "train[:150%]", "Bad slice bound '150%'"),
    ("toy", "TOY", "train[a:]", "Bad slice bound 'a'"),
    ("toy", "TOY", "train[30:]:uniform",
     r"leaves class 0 \(0\) without images \(and 3 more\): .*widen the slice"),
    ("only_test", "TOY", "train", "has no train classes \\(0/0/2 train/valid/test"),
])
def test_bad_input_is_one_line_data_error(toy, name, data, split, message):
  if name == "only_test" and not os.path.exists(os.path.join(toy, name)):
    md_convert.convert_arrays(np.zeros((4, 4, 4), np.uint8), np.array([0, 0, 1, 1]),
                              os.path.join(toy, name), name, class_splits={"test": [0, 1]})
  with pytest.raises(DataError, match=message) as e:
    src = sources.create(f"meta_dataset:{name}", data_dir=toy if data == "TOY" else data)
    src.num_examples(split)
  assert "\n" not in str(e.value)


def test_config_validation(toy):
  c = load_config("ctx_pretrain", f"runlocal,data={toy}")
  config_lib.validate(c, num_devices=8)
  assert c.dataset.train_split.endswith(":uniform") and c.linear_probe.fit_split
  assert load_config("ctx_pretrain", "sampling=records").dataset.train_split == "train[5%:]:records"
  with pytest.raises(config_lib.ConfigError, match="sampling='iid' is not valid"):
    load_config("ctx_pretrain", "sampling=iid")
  bad = load_config("ctx_pretrain", f"runlocal,data={toy}")
  bad.linear_probe.score_split = ""
  with pytest.raises(config_lib.ConfigError, match="needs both fit_split and score_split"):
    config_lib.validate(bad)
  bad = load_config("ctx_pretrain", f"runlocal,data={toy}")
  bad.eval_every_steps = 0
  with pytest.raises(config_lib.ConfigError, match="patience=4 stops on periodic evaluations"):
    config_lib.validate(bad)
  bad = load_config("ctx_pretrain", f"runlocal,data={toy}")
  bad.dataset.name = "meta_datset:toy"
  with pytest.raises(config_lib.ConfigError, match=r"meta_dataset:<Meta-Dataset source>"):
    config_lib.validate(bad)


def test_full_recipe_is_the_documented_one():
  c = load_config("ctx_pretrain", "data=/x")
  assert (c.model.name, tuple(c.model.replace_stride_with_dilation)) == (
      "resnet34", (False, False, False))
  assert c.dataset.name == "meta_dataset:ilsvrc_2012" and "md_resize(224)" in c.dataset.train_pp
  assert (c.batch_size, c.total_steps, c.optimizer.lr) == (256, 75_000, 0.00375640851370052)
  assert (c.schedule.decay_rate, c.schedule.decay_steps) == (0.9967524905880909, 1000)
  assert (c.linear_probe.fit_split, c.linear_probe.score_split) == ("valid[:50]", "valid[50:100]")
  # The pre-trained backbone is the one configs/ctx.py trains (stride 32 here, dilated there).
  ctx = load_config("ctx", "variant=ctx,data=/x")
  assert c.model.name == ctx.model.name and ctx.model.replace_stride_with_dilation[-1]
  for mini in ("mini", "runlocal"):
    pre, ep = load_config("ctx_pretrain", mini), load_config("ctx", f"variant=ctx,{mini}")
    keys = set(ep.model.keys()) - {"replace_stride_with_dilation"}
    assert {k: pre.model[k] for k in keys} == {k: ep.model[k] for k in keys}, mini


def test_linear_probe_separates_separable_features_and_is_at_chance_on_noise():
  rng = np.random.default_rng(0)
  k, d = 5, 32
  centres = rng.normal(0, 1, (k, d)) * 3

  def data(n, separable):
    y = rng.integers(0, k, n)
    x = rng.normal(0, 1, (n, d)) + (centres[y] if separable else 0)
    return x, y

  res = linear_probe.fit_and_score(*data(200, True), *data(500, True))
  assert res["top1"] > 0.95 and res["fit_top1"] > 0.95
  res = linear_probe.fit_and_score(*data(200, False), *data(2000, False))
  assert abs(res["top1"] - 1 / k) < 0.05  # chance, though the fit set is learnt
  with pytest.raises(DataError, match="needs at least 2"):
    linear_probe.fit_and_score(np.ones((4, 3)), np.zeros(4), np.ones((2, 3)), np.zeros(2))


def test_set_aside_renames_and_keeps_everything(tmp_path):
  from visrep_jax import checkpoint as ckpt_lib
  d = tmp_path / "best" / "checkpoints" / "7"
  d.mkdir(parents=True)
  (d / "x").write_text("weights")
  new = ckpt_lib.set_aside(str(tmp_path / "best"), "test")
  assert not (tmp_path / "best").exists()
  assert open(os.path.join(new, "checkpoints", "7", "x")).read() == "weights"
  assert ckpt_lib.set_aside(str(tmp_path / "best"), "test") is None  # nothing there: no-op
  (tmp_path / "best").mkdir()  # set aside again within the same second: another name
  again = ckpt_lib.set_aside(str(tmp_path / "best"), "test")
  assert again != new and os.path.isdir(again) and os.path.isdir(new)


def test_early_stopping_counts_evaluations_since_the_best_and_resumes(tmp_path):
  path = str(tmp_path / "lp.json")
  es = linear_probe.EarlyStopping(path, patience=2)
  flags = [es.update(s, v) for s, v in ((10, 0.5), (20, 0.6), (30, 0.6), (40, 0.55))]
  assert flags == [True, True, True, False]  # a tie is no decline: the later one is the best
  assert es.best == (30, 0.6) and es.evals_since_best == 1 and not es.should_stop
  assert not es.update(50, 0.59) and es.evals_since_best == 2 and es.should_stop
  es.save()
  record = json.load(open(path))
  assert record["best"] == {"step": 30, "linear_probe_top1": 0.6} and record["stopped"]
  # Resumed from the checkpoint of step 40: the evaluation at 50 is forgotten, not double-counted.
  again = linear_probe.EarlyStopping(path, patience=2, resume_step=40)
  assert again.history == [(10, 0.5), (20, 0.6), (30, 0.6), (40, 0.55)]
  assert again.evals_since_best == 1 and not again.should_stop
  assert again.update(40, 0.7) and again.best == (40, 0.7)  # re-evaluating a step replaces it
  assert not linear_probe.EarlyStopping(path, patience=0).should_stop  # 0: never stops


@requires_fashion_mnist
def test_training_stops_when_the_probe_declines_and_stays_stopped(mini_dir, tmp_path,
                                                                  monkeypatch):
  """Scripted probe scores 0.9, 0.8, 0.7, ...: with patience 2 the run stops at the third
  evaluation (step 3 of 10), keeps step 1's weights as the best, and a rerun trains no further."""
  from visrep_jax.trainers import supervised
  scores = iter([0.9, 0.8, 0.7, 0.6] + [0.5] * 20)
  real = linear_probe.fit_and_score
  monkeypatch.setattr(linear_probe, "fit_and_score",
                      lambda *a, **k: dict(real(*a, **k), top1=next(scores)))
  c = load_config("ctx_pretrain", f"runlocal,data={mini_dir},patience=2,steps=10")
  c.eval_every_steps = 1
  c.log_every_steps = 1
  c.dataset.eval_split = "train[:1]"  # small evaluations: 6 images, probe 2 x 2 x 5 images
  c.linear_probe.fit_split, c.linear_probe.score_split = "valid[:5]", "valid[5:10]"
  wd = str(tmp_path / "w")
  final = supervised.train_and_evaluate(c, wd)
  assert final["linear_probe_top1"] == 0.7 and final["linear_probe_best_step"] == 1
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert max(r["step"] for r in rows if "train/loss" in r) == 3
  assert [r["eval/linear_probe_top1"] for r in rows if "eval/linear_probe_top1" in r] == [
      0.9, 0.8, 0.7]
  assert os.listdir(os.path.join(wd, "best", "checkpoints")) == ["1"]
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3"]
  record = json.load(open(os.path.join(wd, "linear_probe.json")))
  assert record["stopped"] and record["best"]["step"] == 1
  supervised.train_and_evaluate(c, wd)  # resumes at the stop: evaluates (0.6), trains nothing
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert max(r["step"] for r in rows if "train/loss" in r) == 3
  # A damaged record restarts, but the best weights it described are set aside, not replaced.
  with open(os.path.join(wd, "linear_probe.json"), "w") as f:
    f.write("{not json")
  supervised.train_and_evaluate(c, wd)
  aside = [n for n in os.listdir(wd) if n.startswith("best.set-aside-")]
  assert len(aside) == 1, os.listdir(wd)
  assert os.listdir(os.path.join(wd, aside[0], "checkpoints")) == ["1"]
  assert os.listdir(os.path.join(wd, "best", "checkpoints")) != ["1"]  # the new record's best
  # A missing record (deleted, or a crash between the weights and the record): the same.
  kept = os.listdir(os.path.join(wd, "best", "checkpoints"))
  os.remove(os.path.join(wd, "linear_probe.json"))
  supervised.train_and_evaluate(c, wd)
  aside = sorted(n for n in os.listdir(wd) if n.startswith("best.set-aside-"))
  assert len(aside) == 2, os.listdir(wd)
  assert any(os.listdir(os.path.join(wd, a, "checkpoints")) == kept for a in aside)


@requires_fashion_mnist
def test_a_failing_probe_checkpoints_its_step_and_the_rerun_resumes_exactly(mini_dir, tmp_path,
                                                                             monkeypatch, capsys):
  """The probe's fit raises at the second evaluation (step 4; periodic checkpoints are off): the
  error propagates and the state of step 4 is checkpointed. The rerun (probe fixed) resumes at
  step 4, evaluates it again and stops, as the uninterrupted run does, at step 6 (patience 2,
  probe scores 0.9, 0.8, 0.7) with the same parameters, losses and probe record."""
  from visrep_jax import checkpoint as ckpt_lib
  from visrep_jax.trainers import supervised
  real = linear_probe.fit_and_score

  def scripted(fail_at=None):
    scores, calls = iter([0.9, 0.8, 0.7] + [0.6] * 20), [0]

    def fit_and_score(*a, **k):
      calls[0] += 1
      if calls[0] == fail_at:
        raise RuntimeError("scripted probe failure")
      return dict(real(*a, **k), top1=next(scores))
    return fit_and_score

  c = load_config("ctx_pretrain", f"runlocal,data={mini_dir},patience=2,steps=10")
  c.eval_every_steps, c.checkpoint_every_steps, c.log_every_steps = 2, 0, 1
  c.dataset.eval_split = "train[:1]"  # small evaluations: 6 images, probe 2 x 2 x 5 images
  c.linear_probe.fit_split, c.linear_probe.score_split = "valid[:5]", "valid[5:10]"

  def result(wd):
    rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    losses = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    record = json.load(open(os.path.join(wd, "linear_probe.json")))
    step = max(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")))
    state = ckpt_lib._restore_as_numpy(os.path.join(wd, "checkpoints", str(step), "state"))
    return losses, record, step, state

  monkeypatch.setattr(linear_probe, "fit_and_score", scripted())
  ref = str(tmp_path / "ref")
  supervised.train_and_evaluate(c, ref)
  want_losses, want_record, want_step, want_state = result(ref)
  assert want_step == 6 and [s for s, _ in want_losses] == [1, 2, 3, 4, 5, 6]
  assert want_record["history"] == [[2, 0.9], [4, 0.8], [6, 0.7]] and want_record["stopped"]

  monkeypatch.setattr(linear_probe, "fit_and_score", scripted(fail_at=2))
  wd = str(tmp_path / "w")
  with pytest.raises(RuntimeError, match="scripted probe failure"):
    supervised.train_and_evaluate(c, wd)
  assert os.listdir(os.path.join(wd, "checkpoints")) == ["4"]
  assert "The evaluation at step 4 failed (RuntimeError: scripted probe failure)" in (
      capsys.readouterr().out)
  # The same command, the probe fixed: the scores go on where the failed run left them.
  supervised.train_and_evaluate(c, wd)
  out = capsys.readouterr().out
  assert "at step 4." in out and "Evaluating step 4 again" in out, out[-2000:]
  losses, record, step, state = result(wd)
  assert losses == want_losses and record == want_record and step == want_step
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want_state)[0])
  flat_got = dict(jax.tree_util.tree_flatten_with_path(state)[0])
  assert flat_got.keys() == flat_want.keys()
  for k in flat_want:
    np.testing.assert_array_equal(flat_got[k], flat_want[k], err_msg=jax.tree_util.keystr(k))


def run_main(args, workdir):
  cmd = [sys.executable, "-m", "visrep_jax.main", f"--workdir={workdir}"] + list(args)
  r = subprocess.run(cmd, cwd=REPO, env=subprocess_env(1), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  return r.stdout + r.stderr


@pytest.fixture(scope="module")
def pretrained(mini_dir, tmp_path_factory):
  """Phase 1 through the command line: configs/ctx_pretrain.py:mini,runlocal."""
  wd = str(tmp_path_factory.mktemp("pretrain") / "w")
  log = run_main([f"--config=configs/ctx_pretrain.py:mini,runlocal,data={mini_dir}"], wd)
  return wd, log


@requires_fashion_mnist
def test_phase_one_logs_the_probe_and_keeps_its_best(pretrained):
  wd, log = pretrained
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  probes = {r["step"]: r["eval/linear_probe_top1"] for r in rows if "eval/linear_probe_top1" in r}
  assert sorted(probes) == [3, 6]
  assert all(r["eval/num_examples"] == 24 for r in rows if "eval/num_examples" in r)  # train[:4]
  record = json.load(open(os.path.join(wd, "linear_probe.json")))
  best_step = max(probes, key=lambda s: (probes[s], s))  # the last of the best
  assert record["best"]["step"] == best_step
  assert record["best"]["linear_probe_top1"] == probes[best_step]
  assert [tuple(h) for h in record["history"]] == sorted(probes.items())
  assert os.listdir(os.path.join(wd, "best", "checkpoints")) == [str(best_step)]
  config = json.load(open(os.path.join(wd, "config.json")))
  assert config["dataset"]["train_split"] == "train[4:]:uniform"
  assert "linear probe top-1" in log and f"{wd}/best" in log


@requires_fashion_mnist
def test_phase_two_initialises_from_the_best_checkpoint(pretrained, mini_dir, tmp_path):
  wd, _ = pretrained
  out = str(tmp_path / "ctx")
  log = run_main([f"--config=configs/ctx.py:variant=protonet,mini,runlocal,data={mini_dir},"
                  f"init={wd}"], out)
  # A workdir given as init: its best (linear-probe) checkpoint, not the last one.
  assert f"using its selected checkpoint {wd}/best" in log
  assert "classifier 'fc' dropped" in log  # the 6-way pre-training head
  results = json.load(open(os.path.join(out, "fewshot_test.json")))["results"]
  assert set(results) == {"fashion_mnist", "digits"}


@requires_fashion_mnist
def test_the_dilated_backbone_receives_the_same_weights(pretrained):
  """The episodic trainer's init call (checkpoint.load_variables on the backbone's abstract
  variables, head adaptation on) gives the dilated network every pre-trained parameter and
  BatchNorm statistic unchanged; only the stride of the last stage differs (4x4 vs 2x2 maps)."""
  from visrep_jax import checkpoint as ckpt_lib, models
  wd, _ = pretrained
  ctx = load_config("ctx", "variant=ctx,runlocal")
  assert tuple(ctx.model.replace_stride_with_dilation) == (False, False, True)
  backbone = models.create(ctx.model.name, num_classes=0, **config_lib.model_overrides(ctx))
  x = np.zeros((2, 28, 28, 1), np.float32)
  abstract = jax.eval_shape(lambda: backbone.init(jax.random.PRNGKey(0), x, train=False))
  abstract = dict(abstract)
  params, model_state = ckpt_lib.load_variables(os.path.join(wd, "best"), abstract.pop("params"),
                                                abstract, adapt_head=True)
  step = os.listdir(os.path.join(wd, "best", "checkpoints"))[0]
  stored = ckpt_lib._restore_as_numpy(os.path.join(wd, "best", "checkpoints", step, "state"))
  assert "fc" in stored["params"] and "fc" not in params
  want = {"params": {k: v for k, v in stored["params"].items() if k != "fc"},
          **stored["model_state"]}
  got = {"params": params, **model_state}
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  assert flat_got.keys() == flat_want.keys()
  for k in flat_want:
    np.testing.assert_array_equal(np.asarray(flat_got[k]), np.asarray(flat_want[k]), err_msg=str(k))
  fmap = backbone.apply(got, x, train=False)[1]["feature_map"]
  pre = load_config("ctx_pretrain", "runlocal")
  plain = models.create(pre.model.name, num_classes=6, **config_lib.model_overrides(pre))
  plain_map = plain.apply({"params": stored["params"], **stored["model_state"]},
                          x)[1]["feature_map"]
  assert fmap.shape[1:3] == (4, 4) and plain_map.shape[1:3] == (2, 2)


def test_a_corrupt_record_file_is_a_one_line_data_error(toy, tmp_path):
  """A damaged TFRecord (here: one class file with a flipped byte inside a record) stops
  training with a DataError naming the problem, not a TensorFlow traceback."""
  import shutil
  root = tmp_path / "md"
  shutil.copytree(os.path.join(toy, "toy"), root / "toy")
  files = sorted(f for f in os.listdir(root / "toy") if f.endswith(".tfrecords"))
  assert files, os.listdir(root / "toy")
  path = root / "toy" / files[0]
  data = bytearray(path.read_bytes())
  data[40] ^= 0xFF  # inside the first record's payload: its CRC no longer matches
  path.write_bytes(bytes(data))
  src = sources.create("meta_dataset:toy", data_dir=str(root))
  inp = pipeline.make_train(src, "train", "decode(1)|normalize(0.5, 0.5)", 8, seed=0,
                            shuffle_buffer=10, process_index=0, process_count=1)
  with pytest.raises(DataError, match="is corrupt") as e:
    for _ in range(20):
      next(inp.iterator)
  assert "\n" not in str(e.value)


def test_a_one_class_probe_split_fails_at_start_up(toy, tmp_path):
  """The toy source's test split has one class: the probe cannot be fitted on it, and says so
  when it is built, not at its first evaluation."""
  c = load_config("ctx_pretrain", f"runlocal,data={toy}")
  c.dataset.name = "meta_dataset:toy"
  c.linear_probe.fit_split, c.linear_probe.score_split = "test[:4]", "test[4:]"
  src = sources.create("meta_dataset:toy", data_dir=toy)
  with pytest.raises(DataError, match="has 1 class\\(es\\); it needs at least 2"):
    linear_probe.LinearProbe(c, None, src, None, None, None, str(tmp_path), track=False)
