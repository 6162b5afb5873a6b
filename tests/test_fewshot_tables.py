"""The CrossTransformers paper's Tables 1-4 as data (visrep_jax/results/tables/ctx_table*.json),
scripts/fewshot_table.py (our workdirs beside the paper's rows) and the attention figure
(visrep_jax/evaluators/fewshot_viz.py)."""

import contextlib
import importlib.util
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from visrep_jax import models, results
from visrep_jax.evaluators import fewshot_viz
from visrep_jax.models import fewshot
from visrep_jax.trainers import episodic

MD = ["ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd", "quickdraw", "fungi",
      "vgg_flower", "traffic_sign", "mscoco"]
CTX_TABLES = ["ctx_table1", "ctx_table2", "ctx_table3", "ctx_table4"]


# ------------------------------------------------------------------------------------ the tables

def test_tables_load_and_are_well_formed():
  assert set(CTX_TABLES) <= set(results.list_tables())
  for name, lines, section in zip(CTX_TABLES, ("L398-L426", "L461-L490", "L638-L649",
                                               "L792-L818"), ("§5.3", "§5.2", "§5.4", "§5.5")):
    t = results.load(name)
    assert t.name == name and t.thesis_tables == [name[-1]] and t.thesis_lines == lines
    assert t.spec == f"shared/spec/crosstransformers.md {section}"
    assert t.source.startswith("CrossTransformers") and t.decimals == 2
    assert list(t.columns) == MD and t.primary == "ilsvrc_2012"
    assert all(c["dataset"] == k and c["split"] == "test" for k, c in t.columns.items())
    keys = t.keys()
    assert len(keys) == len(set(keys))
    for r in t.rows:
      assert r["label"] and r["model"] is None and r["line"].startswith("L"), (name, r)
      assert all(isinstance(r[c], float) and 0 < r[c] <= 100 for c in MD), (name, r["key"])
      if name == "ctx_table4":
        assert "rank" not in r
        assert all(isinstance(r[c + "_ci"], float) and 0 < r[c + "_ci"] < 2 for c in MD)
      else:
        assert isinstance(r["rank"], float) and 1 <= r["rank"] <= 14
  assert results.load("ctx_table4").keys() == [
      "protonet_ema", "protonet", "protonet_simclr_ema", "protonet_simclr", "ctx7", "ctx14",
      "ctx7_simclr", "ctx14_simclr", "ctx7_simclr_aug", "ctx14_simclr_aug", "ctx14_simclr_aug_lr"]
  t1 = results.load("ctx_table1")
  notes = " ".join(t1.notes)
  assert "digit 3" in notes and "L416" in notes and "cannot be fully excluded" in notes
  status = {r["key"]: r["status"] for r in t1.rows}
  assert all(status[k].startswith("confirmed") for k in
             ("protonet_ema", "protonet", "protonet_simclr_ema", "protonet_simclr"))
  assert all(status[k].startswith("inferred") for k in
             ("protonet_r18_126_ema", "protonet_scaug_ema", "protonet_scaug"))


@pytest.mark.parametrize("ref,value,ci", [
    ("ctx_table4/ctx14", 61.53, 1.02), ("ctx_table4/ctx14_simclr_aug:traffic_sign", 84.80, 0.79),
    ("ctx_table4/ctx7:omniglot", 67.16, 1.32), ("ctx_table4/protonet_ema:vgg_flower", 87.29, 0.69),
    ("ctx_table4/ctx14_simclr_aug_lr:mscoco", 58.48, 1.04),
    ("ctx_table3/ctx7:omniglot", 67.15, None), ("ctx_table3/ctx7_simclr_aug:aircraft", 76.52, None),
    ("ctx_table2/cnaps:aircraft", 36.00, None), ("ctx_table2/tian_lr_distill", 61.58, None),
    ("ctx_table2/ctx14_simclr_aug:dtd", 74.77, None),
    ("ctx_table1/protonet_r18_126_ema:cu_birds", 68.43, None),
    ("ctx_table1/protonet_scaug:vgg_flower", 76.88, None),
    ("ctx_table1/protonet_md:omniglot", 59.98, None),
])
def test_paper_numbers(ref, value, ci):
  assert results.lookup(ref) == value
  table, _, rest = ref.partition("/")
  key, _, col = rest.partition(":")
  assert results.load(table).ci(key, col or None) == ci


@pytest.mark.parametrize("table,key,rank", [
    ("ctx_table1", "protonet_r18_126_ema", 5.55), ("ctx_table1", "protonet_simclr", 1.90),
    ("ctx_table1", "protonet_md", 5.35), ("ctx_table2", "ctx14_simclr_aug", 2.60),
    ("ctx_table2", "cnaps", 13.55), ("ctx_table3", "ctx14_simclr_aug", 2.05)])
def test_ranks(table, key, rank):
  assert results.load(table).row(key)["rank"] == rank


# The spec's DERIVED 10-source means (§5.2-5.4), recomputed from the stored rows.
@pytest.mark.parametrize("table,key,mean", [
    ("ctx_table2", "ctx14", 67.58), ("ctx_table2", "ctx14_simclr", 71.52),
    ("ctx_table2", "ctx14_simclr_aug", 73.15), ("ctx_table2", "ctx14_simclr_aug_lr", 71.41),
    ("ctx_table2", "protonet_ema", 57.05), ("ctx_table2", "protonet_md", 56.10),
    ("ctx_table2", "tian_lr_distill", 68.29), ("ctx_table2", "meta_baseline", 64.99),
    ("ctx_table1", "protonet_simclr", 60.39), ("ctx_table1", "protonet", 57.66),
    ("ctx_table1", "protonet_simclr_ema", 56.60), ("ctx_table1", "protonet_r18_126", 55.74),
    ("ctx_table1", "protonet_r18_126_ema", 55.48), ("ctx_table1", "protonet_scaug", 52.22),
    ("ctx_table1", "protonet_scaug_ema", 51.73),
    ("ctx_table3", "ctx7", 64.83), ("ctx_table3", "ctx7_simclr", 69.29),
    ("ctx_table3", "ctx7_simclr_aug", 71.59), ("ctx_table3", "ctx14_simclr_aug", 73.15)])
def test_derived_means(table, key, mean):
  t = results.load(table)
  assert abs(np.mean([t.value(key, c) for c in MD]) - mean) <= 0.005 + 1e-9


def test_table4_means_are_tables_1_to_3():
  t4 = results.load("ctx_table4")
  others = [results.load(n) for n in CTX_TABLES[:3]]
  diffs = []
  for key in t4.keys():
    found = [t for t in others if key in t.keys()]
    assert found, key
    for t in found:
      diffs += [(t.name, key, c, t.value(key, c), t4.value(key, c)) for c in MD
                if t.value(key, c) != t4.value(key, c)]
  assert diffs == [("ctx_table3", "ctx7", "omniglot", 67.15, 67.16)]
  # Table 2's CTX rows are Table 3's CTX14 rows.
  t2, t3 = others[1], others[2]
  for key in ("ctx14", "ctx14_simclr", "ctx14_simclr_aug"):
    assert [t2.value(key, c) for c in MD] == [t3.value(key, c) for c in MD]


def test_loader_extension_is_backward_compatible():
  old = results.load("cait_in1k")
  assert old.source == "thesis" and old.decimals == 1 and old.ci("s36_224") is None
  assert "(thesis Table" in old.format()
  text = results.load("ctx_table4").format(keys=["ctx14"])
  assert "61.53±1.02" in text and "(CrossTransformers" in text and "Table 4, L792-L818" in text
  assert "49.10" in results.load("ctx_table1").format()


# -------------------------------------------------------------------------- scripts/fewshot_table

def _script():
  spec = importlib.util.spec_from_file_location(
      "fewshot_table_script", os.path.join(REPO, "scripts", "fewshot_table.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def run_table(*argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = _script().main(list(argv))
  return rc, out.getvalue(), err.getvalue()


def _workdir(path, head="ctx", dilated=True, augment="none", bn="ema", results_=None,
             config=True, lr_head=False):
  os.makedirs(path, exist_ok=True)
  if config:
    cfg = {"trainer": "episodic",
           "model": {"name": "resnet34", "replace_stride_with_dilation": [False, False, dilated]},
           "episodes": {"augment": augment, "image_size": 224},
           "fewshot": {"head": head, "bn_test_mode": bn, "lr_head": lr_head}}
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(cfg, f)
  if results_ is not None:
    with open(os.path.join(path, "fewshot_test.json"), "w") as f:
      json.dump({"results": results_, "best_valid": {"accuracy": 0.5, "step": 10},
                 "bn_test_mode": bn}, f)
  return str(path)


def _res(acc, ci, episodes=600):
  return {"accuracy": acc, "ci95": ci, "loss": 1.0, "episodes": episodes}


def _markdown_rows(out):
  rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in out.splitlines()
          if line.startswith("| ")]
  return rows[0], rows[1:]


def test_fewshot_table_infers_the_paper_row(tmp_path):
  wd = _workdir(tmp_path / "ctx_aug", augment="simclr_episodes(prob=0.5, md_augment='bohb')",
                results_={"ilsvrc_2012": _res(0.6012, 0.0101), "omniglot": _res(0.8, 0.0123),
                          "fashion_mnist": _res(0.7, 0.02)})
  rc, out, err = run_table(wd, "--markdown")
  assert rc == 0, err
  header, (ours, paper) = _markdown_rows(out)
  assert header[:3] == ["Model", "ILSVRC", "Omniglot"] and header[-1] == "fashion_mnist"
  assert len(header) == 12
  assert ours[0] == "ours: ctx_aug [600 ep]" and paper[0].endswith("[ctx_table4/ctx14_simclr_aug]")
  assert ours[1:3] == ["60.12 ± 1.01", "80.00 ± 1.23"] and ours[3:11] == ["-"] * 8
  assert ours[11] == "70.00 ± 2.00" and paper[11] == "-"
  assert paper[1] == "61.42 ± 1.08" and paper[10] == "57.87 ± 1.05"
  assert "not Meta-Dataset sources" in out

  rc, text, _ = run_table(wd)  # the plain-text layout says the same
  assert rc == 0 and "60.12 ± 1.01" in text and "61.42 ± 1.08" in text
  assert "paper row ctx_table4/ctx14_simclr_aug" in text


@pytest.mark.parametrize("kw,key,ilsvrc", [
    (dict(head="protonet", dilated=False), "protonet_ema", "51.66 ± 1.10"),
    (dict(head="protonet", dilated=False, bn="support"), "protonet", "52.51 ± 1.10"),
    (dict(head="protonet", dilated=False, augment="simclr_episodes(prob=0.5)", bn="support"),
     "protonet_simclr", "53.69 ± 1.07"),
    (dict(dilated=False), "ctx7", "58.65 ± 1.04"),
    (dict(augment="simclr_episodes(prob=0.5)"), "ctx14_simclr", "61.54 ± 1.01"),
    (dict(augment="simclr_episodes(prob=0.5, md_augment='bohb')", lr_head=True),
     "ctx14_simclr_aug_lr", "60.82 ± 1.03"),
    (dict(head="protonet", dilated=False, augment="sc_aug"), "protonet_scaug_ema", "47.58"),
])
def test_fewshot_table_rows_by_config(tmp_path, kw, key, ilsvrc):
  wd = _workdir(tmp_path / "w", results_={"dtd": _res(0.5, 0.01)}, **kw)
  rc, out, err = run_table(wd, "--markdown")
  assert rc == 0, err
  _, (ours, paper) = _markdown_rows(out)
  assert paper[0].endswith(f"/{key}]") and paper[1] == ilsvrc
  assert ours[1] == "-" and ours[5] == "50.00 ± 1.00"


def test_fewshot_table_row_option_and_unmatched_configs(tmp_path):
  # --row needs no config.json; --table picks the table.
  wd = _workdir(tmp_path / "a", config=False, results_={"omniglot": _res(0.7, 0.01)})
  rc, out, err = run_table(wd, "--row=ctx7", "--table=ctx_table3", "--markdown")
  assert rc == 0, err
  _, (ours, paper) = _markdown_rows(out)
  assert paper[0] == "paper: CTX7 [ctx_table3/ctx7]" and paper[2] == "67.15"
  # CTX with support-set BN is in no table: ours alone, and a note.
  wd2 = _workdir(tmp_path / "b", bn="support", results_={"omniglot": _res(0.7, 0.01)})
  wd3 = _workdir(tmp_path / "c", results_={"omniglot": _res(0.7, 0.01)})
  rc, out, err = run_table(wd2, wd3)
  assert rc == 0, err
  assert "no paper row 'ctx14_support'" in out and out.count("paper: ") == 1
  assert "paper: CTX14 [ctx_table4/ctx14]" in out


@pytest.mark.parametrize("setup,args,message", [
    ("none", [], "does not exist"),
    ("no_results", [], "fewshot_test.json not found"),
    ("no_config", [], "config.json not found: cannot infer the paper row; pass --row"),
    ("corrupt", [], "is not a readable few-shot test result"),
    ("ok", ["--row=ctx99"], "Unknown row of table 'ctx_table4' 'ctx99'"),
    ("ok", ["--table=deit_in1k"], "has no Meta-Dataset columns"),
])
def test_fewshot_table_errors_are_one_line(tmp_path, setup, args, message):
  wd = str(tmp_path / "wd")
  if setup == "no_results":
    _workdir(wd)
  elif setup == "no_config":
    _workdir(wd, config=False, results_={"omniglot": _res(0.7, 0.01)})
  elif setup == "corrupt":
    _workdir(wd)
    with open(os.path.join(wd, "fewshot_test.json"), "w") as f:
      f.write("{not json")
  elif setup == "ok":
    _workdir(wd, results_={"omniglot": _res(0.7, 0.01)})
  rc, out, err = run_table(wd, *args)
  assert rc == 2 and out == ""
  assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------- attention figure

@pytest.fixture(scope="module")
def tiny_ctx():
  backbone = models.create("resnet18", num_classes=0, width=8, stage_sizes=(1, 1, 1, 1),
                           stem_kernel=3, stem_stride=1, stem_pool=False,
                           replace_stride_with_dilation=(False, False, True))
  head = fewshot.CrossTransformer(key_dim=8, value_dim=8)
  x = jnp.zeros((2, 16, 16, 3))
  v = backbone.init(jax.random.PRNGKey(0), x, train=False)
  fm = backbone.apply(v, x)[1]["feature_map"]
  params = {"backbone": v["params"],
            "head": head.init(jax.random.PRNGKey(1), fm[:1], fm, jnp.zeros((2,), jnp.int32),
                              jnp.ones((2,), bool), num_classes=2)["params"]}
  return backbone, head, params, {"batch_stats": v["batch_stats"]}


def _episode():
  """3 ways; class 1 has 3 support images; 2 padded support and 1 padded query slots."""
  rng = np.random.default_rng(0)
  s_lab = np.array([0, 1, 2, 1, 0, 1, -1, -1], np.int32)
  q_lab = np.array([1, 0, 2, -1], np.int32)
  return {"images": rng.integers(0, 256, size=(12, 16, 16, 3)).astype(np.uint8),
          "support_labels": s_lab, "support_mask": s_lab >= 0,
          "query_labels": q_lab, "query_mask": q_lab >= 0, "num_ways": np.int32(3)}


def test_attention_figure(tiny_ctx, tmp_path):
  backbone, head, params, state = tiny_ctx
  ep = _episode()
  out = str(tmp_path / "figs" / "attention.png")
  path, data = fewshot_viz.attention_figure(backbone, head, params, state, ep, query_index=0,
                                            max_support=2, out_png=out, return_data=True)
  assert path == out and os.path.getsize(out) > 1000
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert data["feature_shape"] == (4, 4) and data["positions"] == [(2, 2), (1, 1), (3, 3)]
  assert data["label"] == 1
  np.testing.assert_array_equal(data["class_support"], [1, 3, 5])
  np.testing.assert_array_equal(data["plotted_support"], [1, 3])
  assert data["attention"].shape == (3, 3, 4, 4) and (data["attention"] >= 0).all()
  # Per query position, the attention over all the class's support images (and positions) is 1.
  np.testing.assert_allclose(data["mass"].sum(axis=1), 1.0, atol=1e-5)

  # The same numbers as the head's own attention and the trainer's logits.
  images = episodic.normalize_images(ep["images"])
  fmap = backbone.apply({"params": params["backbone"], **state}, images, train=False)[1][
      "feature_map"]
  _, att = head.apply({"params": params["head"]}, fmap[8:], fmap[:8], ep["support_labels"],
                      ep["support_mask"], num_classes=3, return_attention=True)
  att = np.asarray(att)[0][[2 * 4 + 2, 1 * 4 + 1, 3 * 4 + 3]][:, [1, 3, 5]].reshape(3, 3, 4, 4)
  np.testing.assert_allclose(data["attention"], att, rtol=1e-4, atol=1e-6)
  logits, _ = episodic.episode_logits(backbone, head, params, state, ep, 3, 8, train=False)
  np.testing.assert_allclose(data["logits"], np.asarray(logits)[0], rtol=1e-4, atol=1e-4)


def test_attention_figure_positions_bn_support_and_errors(tiny_ctx, tmp_path):
  backbone, head, params, state = tiny_ctx
  ep = _episode()
  out = str(tmp_path / "a.png")
  _, data = fewshot_viz.attention_figure(backbone, head, params, state, ep, query_index=2,
                                         query_positions=[(0, 3)], out_png=out, bn_mode="support",
                                         return_data=True)
  assert data["label"] == 2 and data["positions"] == [(0, 3)]
  np.testing.assert_array_equal(data["plotted_support"], [2])
  np.testing.assert_allclose(data["mass"].sum(axis=1), 1.0, atol=1e-5)
  logits, _ = episodic.episode_logits(backbone, head, params, state, ep, 3, 8, train=False,
                                      bn_mode="support")
  np.testing.assert_allclose(data["logits"], np.asarray(logits)[2], rtol=1e-4, atol=1e-4)
  with pytest.raises(fewshot_viz.FewshotVizError, match="query 3 is padding"):
    fewshot_viz.attention_figure(backbone, head, params, state, ep, query_index=3, out_png=out)
  with pytest.raises(fewshot_viz.FewshotVizError, match="outside the 4x4 feature map"):
    fewshot_viz.attention_figure(backbone, head, params, state, ep, query_positions=[(4, 0)],
                                 out_png=out)
  with pytest.raises(fewshot_viz.FewshotVizError, match="CrossTransformer head"):
    fewshot_viz.attention_figure(backbone, None, params, state, ep, out_png=out)


@pytest.mark.parametrize("head,message", [
    ("protonet", "attention maps need the CrossTransformer head"), (None, "does not exist")])
def test_attention_cli_errors_are_one_line(tmp_path, head, message):
  wd = str(tmp_path / "wd")
  if head:
    _workdir(wd, head=head)
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    rc = fewshot_viz.main(["--workdir", wd])
  assert rc == 2 and message in err.getvalue() and err.getvalue().count("\n") == 1
