"""The CPU setup of `python -m visrep_jax.main` and scripts/benchmark.py: XLA flags and the
host-device split (visrep_jax.utils.xla.set_cpu_flags), decided before the JAX backend starts."""

import os

import pytest

from conftest import load_config
from visrep_jax import config_lib
from visrep_jax import main as main_lib
from visrep_jax.utils import malloc as malloc_utils
from visrep_jax.utils import xla as xla_utils


@pytest.fixture
def fresh_backend(monkeypatch):
  monkeypatch.setattr(xla_utils, "_backend_initialized", lambda: False)


def test_set_cpu_flags_adds_the_device_count_unless_the_user_set_one(monkeypatch, fresh_backend):
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  flags = xla_utils.set_cpu_flags(devices=2).split()
  assert "--xla_dump_to=/tmp/x" in flags and "--xla_force_host_platform_device_count=2" in flags
  for name, value in xla_utils.recommended_cpu_flags().items():
    assert f"--{name}={value}" in flags
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=5")
  flags = xla_utils.set_cpu_flags(devices=2).split()
  assert [f for f in flags if "device_count" in f] == ["--xla_force_host_platform_device_count=5"]
  monkeypatch.setenv("XLA_FLAGS", "")
  assert "device_count" not in xla_utils.set_cpu_flags(devices=1)


def test_main_applies_the_config_on_cpu_hosts_only(monkeypatch, fresh_backend):
  c = load_config("deit3", "demo")
  assert c.cpu_devices == 1
  c.cpu_devices = 2
  monkeypatch.setattr(malloc_utils, "accelerator_host", lambda environ: False)
  monkeypatch.setenv("XLA_FLAGS", "")
  main_lib.set_cpu_flags(c)
  assert "--xla_force_host_platform_device_count=2" in os.environ["XLA_FLAGS"].split()
  monkeypatch.setattr(malloc_utils, "accelerator_host", lambda environ: True)
  monkeypatch.setenv("XLA_FLAGS", "")
  main_lib.set_cpu_flags(c)
  assert os.environ["XLA_FLAGS"] == ""  # GPU/TPU host: nothing to tune on the CPU


@pytest.mark.parametrize("value", [0, -2])
def test_bad_cpu_devices_is_a_config_error(value):
  c = load_config("deit3", "runlocal")
  c.cpu_devices = value
  with pytest.raises(config_lib.ConfigError, match="cpu_devices must be an integer >= 1"):
    config_lib.validate(c)
