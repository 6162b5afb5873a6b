"""visrep_jax.convert: file formats, wrappers, strictness, position-embedding resampling, CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from visrep_jax import convert, models  # noqa: E402
from visrep_jax import checkpoint as ckpt_lib  # noqa: E402
from conftest import REPO, subprocess_env  # noqa: E402

pytestmark = pytest.mark.torch

# timm twin of models.create("vit_test_patch4_16") (DeiT III layout: no class slot, LayerScale).
TINY_TIMM = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                 num_classes=10, no_embed_class=True, init_values=0.1)


def _tiny_timm(seed=0, **kw):
  from timm.models.vision_transformer import VisionTransformer
  torch.manual_seed(seed)
  m = VisionTransformer(**{**TINY_TIMM, **kw}).eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in m.parameters():
      p.copy_(0.3 * torch.randn(p.shape, generator=g))
  return m


def _logits(name, variables, x_nchw, **overrides):
  model = models.create(name, **overrides)
  logits, _ = model.apply(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
  return np.asarray(logits)


def test_torch_key_to_path():
  assert convert.torch_key_to_path("layer1.0.downsample.0.weight") == (
      "layer1_0", "downsample_0", "weight")
  assert convert.torch_key_to_path("blocks.11.attn.qkv.bias") == ("blocks_11", "attn", "qkv", "bias")
  assert convert.torch_key_to_path("patch_embed.proj.0.1.weight") == (
      "patch_embed", "proj_0_1", "weight")
  assert convert.torch_key_to_path("cls_token") == ("cls_token",)


@pytest.mark.parametrize("old,new,extra", [((14, 14), (24, 24), 1), ((24, 24), (14, 14), 2),
                                           ((7, 7), (12, 9), 0)])
def test_resample_matches_torch_bicubic(old, new, extra):
  """Same numbers as the DeiT fine-tuning code: F.interpolate(bicubic, align_corners=False)."""
  rng = np.random.RandomState(0)
  pe = rng.randn(1, extra + old[0] * old[1], 8).astype(np.float32)
  got = convert.resample_pos_embed(pe, new, extra, old)
  grid = torch.from_numpy(pe[:, extra:]).reshape(1, old[0], old[1], 8).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=new, mode="bicubic", align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 8).numpy()
  assert got.shape == (1, extra + new[0] * new[1], 8)
  np.testing.assert_array_equal(got[:, :extra], pe[:, :extra])
  np.testing.assert_allclose(got[:, extra:], ref, atol=1e-5, rtol=1e-5)
  # Same size: unchanged.
  np.testing.assert_allclose(convert.resample_pos_embed(pe, old, extra), pe, atol=1e-6)


def test_file_formats_and_wrappers(tmp_path):
  """.pth with {'model': ...} and module. prefixes, .safetensors and .npz give the same variables,
  equal to timm's logits."""
  from safetensors.torch import save_file
  tm = _tiny_timm()
  sd = tm.state_dict()
  torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "a.pth")
  save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "b.safetensors"))
  np.savez(tmp_path / "c.npz", **{k: v.numpy() for k, v in sd.items()})
  x = np.random.RandomState(0).randn(2, 3, 16, 16).astype(np.float32)
  with torch.no_grad():
    expected = tm(torch.from_numpy(x)).numpy()
  assert np.abs(expected).max() > 0.1
  ref = None
  for src in (sd, tmp_path / "a.pth", tmp_path / "b.safetensors", tmp_path / "c.npz",
              {"state_dict": sd}):
    variables = convert.load_torch_checkpoint("vit_test_patch4_16", src)
    assert set(variables) == {"params"}
    if ref is None:
      ref = variables
    else:
      jax.tree.map(np.testing.assert_array_equal, variables, ref)
  np.testing.assert_allclose(_logits("vit_test_patch4_16", ref, x), expected, atol=1e-4, rtol=0)


def test_prefix_selects_a_submodel():
  sd = {"module.encoder_q." + k: v for k, v in _tiny_timm().state_dict().items()}
  sd.update({"module.encoder_k." + k: v * 0 for k, v in _tiny_timm().state_dict().items()})
  v = convert.load_torch_checkpoint("vit_test_patch4_16", sd, prefix="encoder_q.")
  assert np.abs(v["params"]["cls_token"]).max() > 0
  with pytest.raises(convert.CheckpointMismatchError, match="does not match"):
    convert.load_torch_checkpoint("vit_test_patch4_16", sd)  # both encoders: unexpected keys


def test_mismatches_are_errors_listing_names():
  sd = dict(_tiny_timm().state_dict())
  missing = dict(sd)
  del missing["blocks.1.mlp.fc2.weight"]
  with pytest.raises(convert.CheckpointMismatchError, match=r"blocks_1/mlp/fc2/kernel"):
    convert.load_torch_checkpoint("vit_test_patch4_16", missing)
  extra = dict(sd, **{"blocks.2.norm1.weight": torch.ones(32)})
  with pytest.raises(convert.CheckpointMismatchError, match=r"blocks\.2\.norm1\.weight"):
    convert.load_torch_checkpoint("vit_test_patch4_16", extra)
  # A 10-class head into a 1000-class model: a shape error naming the head, not a partial load.
  with pytest.raises(convert.CheckpointMismatchError, match=r"head\.weight \(10, 32\)"):
    convert.load_torch_checkpoint("vit_test_patch4_16", sd, num_classes=1000)
  # ... and it loads with the right option.
  convert.load_torch_checkpoint("vit_test_patch4_16", sd, num_classes=10)


def test_bad_files_give_one_line_errors(tmp_path):
  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"not a checkpoint")
  with pytest.raises(convert.CheckpointMismatchError, match="torch.load failed"):
    convert.read_state_dict(str(bad))
  with pytest.raises(FileNotFoundError, match="not found"):
    convert.read_state_dict(str(tmp_path / "missing.pth"))
  torch.save({"epoch": 1, "args": {"lr": 0.1}}, tmp_path / "noweights.pth")
  with pytest.raises(convert.CheckpointMismatchError, match="no tensors found"):
    convert.read_state_dict(str(tmp_path / "noweights.pth"))


def test_new_resolution_resamples_like_deit_finetuning():
  """A 16px checkpoint loaded at 24px: our logits equal timm's at 24px when timm gets the
  position embedding resampled by DeiT's F.interpolate(bicubic, align_corners=False)."""
  tm16 = _tiny_timm(seed=3)
  sd = tm16.state_dict()
  variables = convert.load_torch_checkpoint("vit_test_patch4_16", sd, img_size=24)
  assert variables["params"]["pos_embed"].shape == (1, 36, 32)

  tm24 = _tiny_timm(seed=3, img_size=24)
  grid = sd["pos_embed"].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
  pe = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
  tm24.load_state_dict(dict(sd, pos_embed=pe.permute(0, 2, 3, 1).reshape(1, 36, 32)))
  x = np.random.RandomState(1).randn(2, 3, 24, 24).astype(np.float32)
  with torch.no_grad():
    expected = tm24(torch.from_numpy(x)).numpy()
  got = _logits("vit_test_patch4_16", variables, x, img_size=24)
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
  with pytest.raises(convert.CheckpointMismatchError, match="pos_embed"):
    convert.load_torch_checkpoint("vit_test_patch4_16", sd, img_size=24, resample=False)


def test_cli_then_main_eval_only(tmp_path):
  """python -m visrep_jax.convert writes an orbax checkpoint that main evaluates (eval_only)
  and that restores to exactly the converted parameters."""
  tm = _tiny_timm(seed=5)
  torch.save({"model": tm.state_dict()}, tmp_path / "w.pth")
  out = tmp_path / "converted"
  env = subprocess_env()
  cmd = [sys.executable, "-m", "visrep_jax.convert", "--model=vit_test_patch4_16",
         f"--checkpoint={tmp_path / 'w.pth'}", f"--out={out}"]
  r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  meta = json.loads((out / "model.json").read_text())
  assert meta["model"] == "vit_test_patch4_16" and meta["collections"] == ["params"]

  # Restores exactly.
  model = models.create("vit_test_patch4_16")
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))
  params, state = ckpt_lib.load_variables(str(out), abstract["params"])
  expected = convert.load_torch_checkpoint("vit_test_patch4_16", tm.state_dict())
  jax.tree.map(np.testing.assert_array_equal, {"params": params}, expected)
  assert state == {}

  # Refuses to overwrite; unknown model names get a one-line error.
  r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr
  bad = cmd[:3] + ["--model=vit_tset_patch4_16"] + cmd[4:5] + [f"--out={tmp_path / 'o2'}"]
  r = subprocess.run(bad, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and "vit_test_patch4_16" in r.stderr and "Traceback" not in r.stderr

  # main: evaluate the converted weights.
  work = tmp_path / "work"
  r = subprocess.run([sys.executable, "-m", "visrep_jax.main",
                      f"--config=configs/deit3.py:runlocal,eval_only,init={out}",
                      f"--workdir={work}"], env=env, cwd=REPO, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  assert any("eval/top1" in l for l in lines)


def test_batchnorm_statistics_round_trip_through_the_cli_format(tmp_path):
  """A torchvision ResNet: BN running statistics land in batch_stats, the orbax output restores
  them as the trainer's model_state, and a model_state-less checkpoint is refused for it."""
  import torchvision
  from visrep_jax.convert.__main__ import convert as convert_cli
  tm = torchvision.models.resnet18(num_classes=10).eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, b in tm.named_buffers():
      if name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=g))
      elif name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn(b.shape, generator=g))
  torch.save(tm.state_dict(), tmp_path / "r18.pth")
  out = convert_cli("resnet18", str(tmp_path / "r18.pth"), str(tmp_path / "out"),
                    overrides={"num_classes": 10})
  model = models.create("resnet18", num_classes=10)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  params, state = ckpt_lib.load_variables(out, abstract["params"],
                                          {"batch_stats": abstract["batch_stats"]})
  np.testing.assert_allclose(state["batch_stats"]["bn1"]["var"], tm.bn1.running_var.numpy())
  np.testing.assert_allclose(state["batch_stats"]["layer4_1"]["bn2"]["mean"],
                             tm.layer4[1].bn2.running_mean.numpy())
  x = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
  with torch.no_grad():
    expected = tm(torch.from_numpy(x)).numpy()
  got = model.apply({"params": params, **state}, jnp.asarray(x.transpose(0, 2, 3, 1)))[0]
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)

  # A checkpoint without BatchNorm statistics cannot initialise a BatchNorm model.
  import orbax.checkpoint as ocp
  ocp.PyTreeCheckpointer().save(str(tmp_path / "params_only" / "variables"),
                                {"params": jax.tree.map(np.asarray, params)})
  with pytest.raises(ValueError, match="BatchNorm"):
    ckpt_lib.load_variables(str(tmp_path / "params_only"), abstract["params"],
                            {"batch_stats": abstract["batch_stats"]})


def test_wrappers_with_stray_tensors_and_ddp_prefixes(tmp_path):
  """The ImageNet-example / MoCo format: {'state_dict': {'module.encoder_q.*'}, 'best_acc1':
  tensor}; the prefix may be given with or without 'module.'; bfloat16 safetensors load."""
  from safetensors.torch import save_file
  sd = _tiny_timm(seed=7).state_dict()
  wrapped = {"epoch": 3, "arch": "vit", "best_acc1": torch.tensor(76.1),
             "state_dict": {"module.encoder_q." + k: v for k, v in sd.items()}}
  torch.save(wrapped, tmp_path / "moco.pth.tar")
  expected = convert.load_torch_checkpoint("vit_test_patch4_16", sd)
  for prefix in ("encoder_q.", "module.encoder_q."):
    got = convert.load_torch_checkpoint("vit_test_patch4_16", str(tmp_path / "moco.pth.tar"),
                                        prefix=prefix)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
  save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()},
            str(tmp_path / "bf16.safetensors"))
  got = convert.load_torch_checkpoint("vit_test_patch4_16", str(tmp_path / "bf16.safetensors"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2), got, expected)


def test_checkpoint_with_pickled_objects_says_how_to_extract_the_weights(tmp_path):
  import argparse
  torch.save({"model": _tiny_timm().state_dict(), "args": argparse.Namespace(lr=0.1)},
             tmp_path / "train_ckpt.pth")
  with pytest.raises(convert.CheckpointMismatchError, match="save its weights alone"):
    convert.read_state_dict(str(tmp_path / "train_ckpt.pth"))
