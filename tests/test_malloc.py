"""visrep_jax.utils.malloc: when the entry points re-execute themselves with tcmalloc."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from visrep_jax.utils import malloc

LIB = "/opt/lib/libtcmalloc_minimal.so.4"


def _env(**kw):
  return malloc.reexec_environment(kw, platform="linux", find=lambda: LIB)


def test_auto_preloads_the_installed_tcmalloc_once_and_keeps_other_preloads():
  env = _env(PATH="/bin", LD_PRELOAD="/x/libfoo.so")
  assert env["LD_PRELOAD"] == f"{LIB}:/x/libfoo.so" and env["PATH"] == "/bin"
  assert env[malloc.ENV_DONE] == "1"
  assert env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == str(1 << 40)
  assert env["TCMALLOC_RELEASE_RATE"] == "0"
  assert _env(PATH="/bin")["LD_PRELOAD"] == LIB
  # The re-executed process (or any with tcmalloc/jemalloc preloaded) goes on as is.
  assert _env(**env) is None
  assert _env(LD_PRELOAD="/usr/lib/libjemalloc.so.2") is None
  # A user's own large-allocation report threshold wins.
  assert _env(TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD="5")["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"


def test_nothing_happens_without_tcmalloc_off_linux_or_when_switched_off():
  assert malloc.reexec_environment({}, platform="linux", find=lambda: None) is None
  assert malloc.reexec_environment({}, platform="darwin", find=lambda: LIB) is None
  assert _env(VISREP_MALLOC="system") is None


def test_an_explicit_library_path(tmp_path):
  lib = tmp_path / "libmine.so"
  lib.write_bytes(b"")
  env = _env(VISREP_MALLOC=str(lib))
  assert env["LD_PRELOAD"] == str(lib)
  assert _env(VISREP_MALLOC=str(lib), LD_PRELOAD=str(lib)) is None
  with pytest.raises(malloc.MallocError, match="VISREP_MALLOC='/no/such.so' is neither"):
    _env(VISREP_MALLOC="/no/such.so")


def _allocator_of_child(**env_overrides):
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", malloc.ENV_DONE, malloc.ENV_CHOICE)}
  env.update(env_overrides)
  env["PYTHONPATH"] = REPO
  code = ("import sys; from visrep_jax.utils import malloc; malloc.ensure_tcmalloc(); "
          "print(malloc.active_allocator(), sys.argv[1:])")
  out = subprocess.run([sys.executable, "-c", code, "a", "--b=1"], env=env, capture_output=True,
                       text=True, timeout=60, check=True)
  return out.stdout.strip()


@pytest.mark.skipif(malloc.find_tcmalloc() is None,
                    reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4; "
                           ".ci/run installs it)")
def test_the_command_reruns_with_tcmalloc_and_its_arguments():
  assert _allocator_of_child() == "tcmalloc ['a', '--b=1']"
  assert _allocator_of_child(VISREP_MALLOC="system") == "system ['a', '--b=1']"
