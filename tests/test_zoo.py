"""Model zoo sizes: parameter counts and multiply-adds against the papers' tables."""

import os
import subprocess
import sys

import pytest

from visrep_jax import models
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import model_zoo  # noqa: E402


def test_flops_counts_exact_multiply_adds():
  """DeiT III-S/16 at 224, by hand: patch embedding + 12 blocks + head."""
  n, d, p = 197, 384, 16
  block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * 4 * d
  expected = 196 * (p * p * 3) * d + 12 * block + d * 1000
  assert models.flops("deit3_small_patch16_224") == expected
  # At 384 the sequence is 577 tokens.
  n = 577
  block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * 4 * d
  assert models.flops("deit3_small_patch16_384") == 576 * (p * p * 3) * d + 12 * block + d * 1000


def test_num_params_needs_no_memory():
  # 632M parameters would be 2.5 GB if allocated; eval_shape makes this instant.
  assert models.num_params("deit3_huge_patch14_224") == 632_126_440


# One or more models of each family, at the resolutions the papers list. (The full zoo:
# `python scripts/model_zoo.py --check`, a few minutes.)
REPRESENTATIVE = [
    "deit_small_patch16_224", "deit_base_patch16_384", "deit3_small_patch16_224",
    "deit3_base_patch16_384", "cait_xxs24_224", "cait_s24_384", "resmlp_12_224",
    "resmlp_big_24_224", "patchconvnet_s60", "patchconvnet_b60", "resnet50", "resnet34",
]


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_sizes_match_papers(name):
  meta = models.paper_metadata(name)
  assert meta.get("params_m") is not None, f"{name}: no paper parameter count recorded"
  (row,) = model_zoo.zoo_rows([name])
  assert row["ok"], f"{name}: {'; '.join(row['notes'])}"
  if meta.get("gflops") is not None:
    assert abs(row["gflops"] - meta["gflops"]) <= max(0.03 * meta["gflops"], 0.05)


def test_zoo_script_check_mode():
  r = subprocess.run([sys.executable, "scripts/model_zoo.py", "--filter", "resnet", "--check"],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  assert "resnet50" in r.stdout and "25.56" in r.stdout


def test_flops_counts_one_branch_of_a_cond_and_every_scan_step():
  import jax
  import jax.numpy as jnp
  from visrep_jax.models import zoo
  x, w = jnp.ones((2, 3)), jnp.ones((3, 3))
  j = jax.make_jaxpr(lambda p: jax.lax.cond(p, lambda: x @ w, lambda: x @ w @ w))(True)
  assert zoo._count_macs(j.jaxpr) == 2 * 2 * 3 * 3  # the costlier branch
  j = jax.make_jaxpr(lambda c: jax.lax.scan(lambda c, _: (c @ w, None), c, None, length=5))(x)
  assert zoo._count_macs(j.jaxpr) == 5 * 2 * 3 * 3
