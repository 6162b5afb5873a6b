"""Test setup: 8 simulated CPU devices (set before JAX is imported), quiet TensorFlow."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# torch (the [torch] extra) must be imported before TensorFlow: importing torch/timm into a
# process that already loaded TensorFlow crashes it (clashing bundled native libraries).
try:
  import torch  # noqa: F401,E402
  import timm  # noqa: F401,E402  (imports torchvision too)
except ImportError:
  pass

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def subprocess_env(num_devices: int = 1, **extra):
  """Environment for running ``python -m visrep_jax.main`` in a child process."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env.update({k: str(v) for k, v in extra.items()})
  return env


requires_fashion_mnist = pytest.mark.skipif(
    not os.path.exists(FASHION_MNIST) and not os.environ.get("CI"),
    reason="Debian's dataset-fashion-mnist is not installed (CI installs it)")
