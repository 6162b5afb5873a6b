"""Test setup: 8 simulated CPU devices (set before JAX is imported), quiet TensorFlow."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Caches the code keeps across runs (e.g. Meta-Dataset record indexes) go to a throwaway place,
# never the user's own cache.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="visrep_test_cache_")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

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


def load_config(name, arg=None):
  """``configs/<name>.py``'s ``get_config(arg)``, loaded from the file as ``--config`` does."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"cfg_{name}",
                                                os.path.join(REPO, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory):
  """The few-shot mini benchmark (Fashion-MNIST + digits in Meta-Dataset's format), 40 images
  per class as ``configs/ctx.py:runlocal`` builds it."""
  if not os.path.exists(FASHION_MNIST):
    pytest.skip("Debian's dataset-fashion-mnist is not installed")
  from visrep_jax.data import md_mini
  d = str(tmp_path_factory.mktemp("md_mini"))
  md_mini.build_mini_benchmark(d, max_images_per_class=40)
  return d
