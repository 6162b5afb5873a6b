"""scripts/reproduce_fashion_mnist.py: the published benchmark table, the Markdown report and a
3-step smoke run of one family end to end (subprocess, real Fashion-MNIST)."""

import importlib.util
import json
import os

import pytest

from visrep_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
  spec = importlib.util.spec_from_file_location(
      "reproduce_fashion_mnist", os.path.join(ROOT, "scripts", "reproduce_fashion_mnist.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_published_benchmark_and_markdown(tmp_path):
  mod = _script()
  rows = dict(mod.published_benchmark())
  # The numbers the issue quotes from the dataset's README (installed or the stored fallback).
  assert rows["ResNet18"] == pytest.approx(0.949)
  assert rows["WRN-28-10"] == pytest.approx(0.959)
  accs = [a for _, a in mod.published_benchmark()]
  assert accs == sorted(accs, reverse=True)
  # A README without a benchmark table falls back to the stored rows.
  import gzip
  empty = tmp_path / "README.md.gz"
  with gzip.open(empty, "wt") as f:
    f.write("# nothing here\n")
  assert mod.published_benchmark(str(empty)) == mod.PUBLISHED_FALLBACK
  results = [
      {"family": "deit3", "what": "w", "config": "c", "target": 0.92, "wall_s": 600.0,
       "cpu_s": 1200.0, "top1": 0.925},
      {"family": "resnet", "what": "w", "config": "c", "target": 0.94, "wall_s": 60.0,
       "cpu_s": 120.0, "top1": 0.93},
      {"family": "cait", "what": "w", "config": "c", "target": None, "wall_s": 60.0,
       "cpu_s": 120.0, "top1": 0.9},
  ]
  table = mod.markdown(results, [("ResNet18", 0.949)])
  assert "| deit3 | w | 0.9250 | >= 0.92 (met) | 10.0 | 20.0 |" in table
  assert "| resnet | w | 0.9300 | >= 0.94 (NOT met) |" in table
  assert "| cait | w | 0.9000 | - |" in table
  assert "| ResNet18 | 0.9490 |" in table


def test_unknown_family_is_an_error(capsys):
  with pytest.raises(SystemExit):
    _script().main(["--families=deit3,vgg"])
  assert "unknown families ['vgg']" in capsys.readouterr().err


@pytest.mark.skipif(sources.find_fashion_mnist_dir() is None,
                    reason="Fashion-MNIST IDX files not installed (make data)")
def test_smoke_run_writes_the_table(tmp_path, capsys):
  mod = _script()
  out = tmp_path / "fm"
  # A family trained to the end earlier into the same --out with the same overrides keeps its
  # row; an unfinished one (an intermediate eval only), one trained with other overrides (a full
  # run beside smoke runs) and one with a line cut short in metrics.jsonl do not / do.
  smoke = mod.config_overrides([], smoke=True)

  def earlier(family, complete, args, top1=0.931, tail=""):
    (out / family).mkdir(parents=True)
    record = {"wall_s": 1698.0, "cpu_s": 3240.0}
    if complete is not None:  # None: a timing.json from before the complete/args record
      record.update(complete=complete, args=args)
    (out / family / "timing.json").write_text(json.dumps(record))
    (out / family / "metrics.jsonl").write_text(
        json.dumps({"step": 100, "train/loss": 0.5}) + "\n"
        + json.dumps({"step": 10318, "eval/top1": top1}) + "\n" + tail)

  earlier("resnet", True, smoke, tail='{"step": 10400, "train/lo')
  earlier("cait", False, smoke)
  earlier("deit", True, [])
  earlier("resmlp", True, smoke + ["--config.seed=1"])
  earlier("patchconvnet", None, None)
  results = mod.main(["--families=deit3", f"--out={out}", "--smoke"])
  said = capsys.readouterr().out
  # Each earlier run left out says why, in one line.
  for family, why in (("cait", "it did not finish; rerun with --families=cait to resume it."),
                      ("deit", "it was trained with other overrides (none)."),
                      ("resmlp", "it was trained with other overrides (--config.total_epochs=0"),
                      ("patchconvnet", "its timing.json predates the record of finished runs; "
                                       "rerun with --families=patchconvnet to list it")):
    assert f"[{family}] the earlier run in {out / family} is not in the table: {why}" in said, said
  assert [r["family"] for r in results] == ["deit3"]
  r = results[0]
  assert r["step"] == 3 and 0.0 <= r["top1"] <= 1.0 and r["cpu_s"] > 0 and r["wall_s"] > 0
  table = (out / "fashion_mnist.md").read_text()
  assert "| deit3 |" in table and "ResNet18" in table
  assert ("| resnet (earlier run) | ResNet-18, SGD recipe | 0.9310 | >= 0.94 (NOT met) | 28.3 | "
          "54.0 |") in table
  assert table.index("| deit3 |") < table.index("| resnet (earlier run) |")
  assert "| cait" not in table and "| deit |" not in table and "| deit (" not in table
  assert "| resmlp" not in table and "| patchconvnet" not in table
  # Rerunning resumes the finished run (no retraining) and accumulates the timing.
  again = mod.main(["--families=deit3", f"--out={out}", "--smoke"])
  assert again[0]["step"] == 3 and again[0]["wall_s"] > r["wall_s"]
  timing = json.loads((out / "deit3" / "timing.json").read_text())
  assert timing["wall_s"] == pytest.approx(again[0]["wall_s"])
  # An unreadable timing file is reported in one line and the run still resumes.
  (out / "deit3" / "timing.json").write_text("{not json")
  third = mod.main(["--families=deit3", f"--out={out}", "--smoke"])
  assert third[0]["step"] == 3 and third[0]["wall_s"] < again[0]["wall_s"]
  assert json.loads((out / "deit3" / "timing.json").read_text())["wall_s"] == pytest.approx(
      third[0]["wall_s"])
