"""The thesis's result tables (visrep_jax.results) and scripts/reproduce.py: tables load and hold
the thesis's numbers; the script prints them, and evaluates a small checkpoint (converted-format
and workdir) with the row's protocol, giving the same top-1 as a direct evaluation."""

import contextlib
import importlib.util
import io
import json
import os

import numpy as np
import pytest

from conftest import REPO

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from visrep_jax import models, results  # noqa: E402
from visrep_jax.registry import UnknownNameError  # noqa: E402


def _script():
  spec = importlib.util.spec_from_file_location("reproduce", os.path.join(REPO, "scripts",
                                                                          "reproduce.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def run(*argv):
  """(exit code, stdout, stderr) of scripts/reproduce.py run in this process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = _script().main(list(argv))
  return rc, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------ the tables

def test_every_table_loads_and_is_well_formed():
  names = results.list_tables()
  assert {"deit_in1k", "deit_distillation", "deit_transfer", "cait_in1k", "cait_transfer",
          "resmlp_in1k", "resmlp_transfer", "patchconvnet_in1k", "patchconvnet_in21k",
          "patchconvnet_transfer", "deit3_in1k", "deit3_in21k", "deit3_transfer"} <= set(names)
  zoo = set(models.list_models(include_aliases=True))
  for name in names:
    t = results.load(name)
    assert t.name == name and t.thesis_tables and t.thesis_lines.startswith("L"), name
    assert t.primary in t.columns and t.spec.startswith("shared/spec/")
    keys = t.keys()
    assert len(keys) == len(set(keys)) and keys, name
    for r in t.rows:
      assert r["label"] and (r["model"] is None or r["model"] in zoo), (name, r)
      values = [r[c] for c in t.columns]
      assert any(v is not None for v in values), (name, r["key"])
      assert all(v is None or (isinstance(v, float) and 0 < v <= 100) for v in values), (name, r)
      for c, info in t.columns.items():
        assert info["dataset"] and info["split"], (name, c)


@pytest.mark.parametrize("ref,value", [
    ("deit_in1k/deit_base", 81.8), ("deit_in1k/deit_base_dist_384_1000ep", 85.2),
    ("deit_in1k/resnet50", 76.2), ("deit_distillation/base_224_token", 83.4),
    ("deit_distillation/tiny_224_hard", 74.3), ("deit_transfer/deit_base_dist_384:inat19", 83.0),
    ("cait_in1k/s36_224", 83.3), ("cait_in1k/m48_448_dist", 86.5),
    ("cait_in1k/s36_384_dist:v2", 76.2), ("cait_transfer/cait_m36:cifar100", 93.3),
    ("resmlp_in1k/s12", 76.6), ("resmlp_in1k/b24_8_dist", 83.6),
    ("resmlp_transfer/resmlp_s12:inat18", 60.2), ("patchconvnet_in1k/s60", 82.1),
    ("patchconvnet_in1k/b36_batchnorm", 83.5), ("patchconvnet_in21k/s60_512:imagenet_longer", 85.4),
    ("patchconvnet_transfer/b120_320:inat18", 79.6), ("deit3_in1k/b_400ep", 83.1),
    ("deit3_in1k/h_best_224", 85.2), ("deit3_in21k/l_240ep_384", 87.7),
    ("deit3_transfer/deit3_large:cars", 94.5),
])
def test_thesis_numbers(ref, value):
  assert results.lookup(ref) == value


def test_missing_entries_are_none_and_bad_names_list_the_valid_ones():
  assert results.lookup("deit_in1k/efficientnet_b7:real") is None
  with pytest.raises(UnknownNameError, match=r"Did you mean 'deit3_in1k'.*Valid: .*cait_in1k"):
    results.load("deit3_inlk")
  with pytest.raises(UnknownNameError, match=r"row of table 'cait_in1k'.*Valid: .*s36_224"):
    results.load("cait_in1k").row("s36")
  with pytest.raises(UnknownNameError,
                     match="column of table 'cait_in1k'.*Valid: imagenet, real, v2"):
    results.lookup("cait_in1k/s36_224:top5")


def test_models_metadata_agree_with_the_tables():
  """The zoo's paper_metadata top-1 and the result tables say the same thing."""
  checks = [("deit_base_patch16_224", "deit_in1k/deit_base"),
            ("deit_base_distilled_patch16_224", "deit_in1k/deit_base_dist"),
            ("cait_s36_384", "cait_in1k/s36_384_dist"), ("cait_m48_448", "cait_in1k/m48_448_dist"),
            ("resmlp_12_224", "resmlp_in1k/s12"), ("patchconvnet_b120", "patchconvnet_in1k/b120"),
            ("deit3_large_patch16_384", "deit3_in1k/l_best_384")]
  for name, ref in checks:
    assert models.paper_metadata(name)["top1"] == results.lookup(ref), (name, ref)


# ---------------------------------------------------------------------------------- the script

def test_list_and_print_tables():
  rc, out, _ = run("--list")
  assert rc == 0
  assert all(name in out for name in results.list_tables())
  assert "Table 6.15" in out
  rc, out, _ = run("--table", "cait_in1k", "--model", "cait_m48_448")
  assert rc == 0 and "m48_448_dist" in out and "86.5" in out and "90.2" in out
  assert "s36_224" not in out and "L1400-L1412" in out
  rc, out, _ = run("--table", "deit_transfer")
  assert rc == 0 and "99.1" in out and "note:" in out


@pytest.mark.parametrize("argv,message", [
    (["--table", "deit3_inlk"], "Unknown results table 'deit3_inlk'. Did you mean 'deit3_in1k'"),
    (["--table", "cait_in1k", "--row", "s36"], "Unknown row of table 'cait_in1k' 's36'"),
    (["--table", "cait_in1k", "--model", "deit_base_patch16_224"],
     "no row of table 'cait_in1k' is for model 'deit_base_patch16_224'"),
    (["--table", "cait_in1k", "--row", "s36_224", "--column", "real", "--checkpoint", "/x"],
     "multi-label evaluation"),
    (["--table", "cait_in1k", "--row", "s36_224", "--checkpoint", "/nonexistent", "--dataset",
      "synthetic", "--split", "test"], "No checkpoint at /nonexistent"),
    ([], "give --table NAME"),
])
def test_errors_are_one_line(argv, message):
  rc, out, err = run(*argv)
  lines = [l for l in err.splitlines() if l.strip()]
  assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def _fit_head(model, variables, pp):
  """Random features + a least-squares classifier on the synthetic train split: a checkpoint
  that is right on most examples (so that a wrong protocol shows in its top-1)."""
  from visrep_jax.data import pipeline, sources
  ev = pipeline.make_eval(sources.create("synthetic"), "train", pp, 128, process_index=0,
                          process_count=1)
  feats = jax.jit(lambda v, x: model.apply(v, x, train=False)[1]["pre_logits"])
  xs, ys = [], []
  for b in ev.batches:
    m = b["mask"].astype(bool)
    xs.append(np.asarray(feats(variables, jnp.asarray(b["image"])))[m])
    ys.append(b["label"][m])
  x, y = np.concatenate(xs), np.concatenate(ys)
  x1 = np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1)
  w = np.linalg.lstsq(x1, np.eye(10)[y], rcond=None)[0]
  params = dict(variables["params"])
  params["head"] = {"kernel": w[:-1].astype(np.float32), "bias": w[-1].astype(np.float32)}
  return dict(variables, params=params)


def _save_converted(out, model_name, seed=0, **overrides):
  """A `python -m visrep_jax.convert --out`-format checkpoint (random trunk, fitted head)."""
  import orbax.checkpoint as ocp
  model = models.create(model_name, **overrides)
  res = model.img_size
  init = jax.jit(lambda key, x: model.init(key, x, train=False))
  variables = init(jax.random.PRNGKey(seed), jnp.zeros((1, res, res, 3)))
  variables = _fit_head(model, variables,
                        f"decode|center_crop({res}, crop_ratio=1.0)|normalize('imagenet')")
  ocp.PyTreeCheckpointer().save(str(out / "variables"), jax.tree.map(np.asarray, dict(variables)))
  (out / "model.json").write_text(json.dumps({"model": model_name, "overrides": overrides,
                                              "collections": sorted(variables)}))
  return model, variables


def _direct_top1(model, variables, pp, split="test"):
  """Top-1 of ``model`` on the synthetic split, evaluated without any of the script's code."""
  from visrep_jax.data import pipeline, sources
  ev = pipeline.make_eval(sources.create("synthetic"), split, pp, 64, process_index=0,
                          process_count=1)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  correct = count = 0
  for b in ev.batches:
    logits = np.asarray(apply(variables, jnp.asarray(b["image"])))
    mask = b["mask"].astype(bool)
    correct += int((logits.argmax(-1) == b["label"])[mask].sum())
    count += int(mask.sum())
  return 100.0 * correct / count, count


def test_reproduce_a_converted_checkpoint(tmp_path):
  """A converted-format checkpoint (model recorded in model.json) evaluated on synthetic data
  with the row's crop ratio; the printed and JSON top-1 equal a direct evaluation."""
  ckpt = tmp_path / "converted"
  model, variables = _save_converted(ckpt, "vit_test_patch4_16", seed=0)
  out_json = tmp_path / "cmp.json"
  rc, out, err = run("--table", "deit3_in1k", "--row", "s_400ep,b_400ep", "--checkpoint",
                     str(ckpt), "--dataset", "synthetic", "--split", "test", "--resolution",
                     "16", "--json", str(out_json))
  assert rc == 0, err
  entries = json.loads(out_json.read_text())
  assert [e["row"] for e in entries] == ["s_400ep", "b_400ep"]
  assert [e["paper"] for e in entries] == [80.4, 83.1]
  pp = "decode|center_crop(16, crop_ratio=1.0)|normalize('imagenet')"
  assert all(e["eval_pp"] == pp and e["model"] == "vit_test_patch4_16" for e in entries)
  expected, n = _direct_top1(model, variables, pp)
  other, _ = _direct_top1(model, variables, pp.replace("1.0", "0.875"))
  assert expected > 30 and abs(other - expected) > 1  # a protocol slip would show
  for e in entries:
    assert e["num_examples"] == n == 128
    assert e["ours"] == pytest.approx(expected, abs=1e-6)
    assert e["delta"] == pytest.approx(expected - e["paper"], abs=1e-6)
  assert "ours beside the thesis" in out and "80.4" in out and f"{expected:.2f}" in out


def test_reproduce_a_workdir_at_another_resolution(tmp_path):
  """A training workdir (model from its config.json, latest step of checkpoints/), evaluated at
  a resolution other than its training one: the position embedding is resampled (DeiT's
  fine-tuning / FixRes protocol) and the row's crop ratio 0.875 is used."""
  from visrep_jax import checkpoint as ckpt_lib
  from visrep_jax.convert import resample_pos_embed
  work = tmp_path / "work"
  model = models.create("vit_test_patch4_16", pos_embed_cls_slot=True, layerscale_init=None)
  variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)), train=False)
  variables = _fit_head(model, variables,
                        "decode|center_crop(16, crop_ratio=1.0)|normalize('imagenet')")
  ck = ckpt_lib.Checkpointer(str(work), async_save=False)
  state = {"step": np.int32(7), "params": jax.tree.map(np.asarray, variables["params"]),
           "model_state": {}}
  ck.save(7, state, {"step": 7}, force=True)
  ck.close()
  (work / "config.json").write_text(json.dumps({"model": {
      "name": "vit_test_patch4_16", "pos_embed_cls_slot": True, "layerscale_init": None,
      "drop_path_rate": 0.1}}))
  out_json = tmp_path / "cmp.json"
  rc, out, err = run("--table", "deit_in1k", "--row", "deit_base_384", "--checkpoint", str(work),
                     "--dataset", "synthetic", "--split", "test", "--resolution", "24",
                     "--json", str(out_json))
  assert rc == 0, err
  (e,) = json.loads(out_json.read_text())
  assert e["paper"] == 83.1 and e["crop_ratio"] == 0.875 and e["resolution"] == 24
  big = model.clone(img_size=24)
  params = dict(variables["params"])
  params["pos_embed"] = resample_pos_embed(np.asarray(params["pos_embed"]), (6, 6), 1, (4, 4))
  expected, _ = _direct_top1(big, {"params": params}, e["eval_pp"])
  assert expected > 15
  assert e["ours"] == pytest.approx(expected, abs=1e-6)
