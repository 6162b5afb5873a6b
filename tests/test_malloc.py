"""visrep_jax.utils.malloc: when the entry points re-execute themselves with tcmalloc."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from visrep_jax.utils import malloc

LIB = "/opt/lib/libtcmalloc_minimal.so.4"


def _env(accelerator=False, **kw):
  return malloc.reexec_environment(kw, platform="linux", find=lambda: LIB,
                                   accelerator=accelerator)


def test_auto_preloads_the_installed_tcmalloc_with_its_settings():
  env = _env(PATH="/bin")
  assert env["LD_PRELOAD"] == LIB and env["PATH"] == "/bin"
  assert env[malloc.ENV_DONE] == "1"
  assert env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == str(1 << 40)
  assert env["TCMALLOC_RELEASE_RATE"] == "0"
  # A user's own setting wins.
  assert _env(TCMALLOC_RELEASE_RATE="5")["TCMALLOC_RELEASE_RATE"] == "5"


def test_auto_leaves_alone_what_is_not_a_plain_cpu_run():
  assert _env(**{malloc.ENV_DONE: "1"}) is None            # the re-executed process: no loop
  assert _env(LD_PRELOAD="/usr/lib/libasan.so.8") is None  # the user's preload (sanitizer, ...)
  assert _env(CONDA_PREFIX="/opt/conda") is None           # conda's libstdc++ comes first there
  assert _env(accelerator=True) is None                    # GPU / TPU host
  assert malloc.reexec_environment({}, platform="linux", find=lambda: None,
                                   accelerator=False) is None
  assert malloc.reexec_environment({}, platform="darwin", find=lambda: LIB,
                                   accelerator=False) is None
  assert _env(VISREP_MALLOC="system") is None
  # JAX_PLATFORMS decides whether this is an accelerator run when it is set.
  assert malloc.accelerator_host({"JAX_PLATFORMS": "cuda"})
  assert not malloc.accelerator_host({"JAX_PLATFORMS": "cpu"})


def test_an_explicit_library_path(tmp_path):
  lib = tmp_path / "libmine.so"
  lib.write_bytes(b"")
  env = _env(VISREP_MALLOC=str(lib), LD_PRELOAD="/asan.so", accelerator=True)
  assert env["LD_PRELOAD"] == f"/asan.so:{lib}"  # after the sanitizer
  assert _env(VISREP_MALLOC=str(lib), LD_PRELOAD=str(lib)) is None
  with pytest.raises(malloc.MallocError, match="VISREP_MALLOC='/no/such.so' is neither"):
    _env(VISREP_MALLOC="/no/such.so")


def test_only_the_entry_points_own_command_line_counts(tmp_path):
  script = str(tmp_path / "bench.py")
  py = sys.executable
  assert malloc.launched_as([py, "-m", "visrep_jax.main", "--config=x"], module="visrep_jax.main")
  assert malloc.launched_as([py, "-u", "-X", "dev", "-mvisrep_jax.main"], module="visrep_jax.main")
  assert malloc.launched_as([py, "-W", "error", script, "--a"], script=script)
  # A host program that runs the entry point (runpy, %run, pytest) is not the entry point.
  assert not malloc.launched_as([py, "-m", "pytest", "tests"], module="visrep_jax.main")
  assert not malloc.launched_as([py, "host.py"], module="visrep_jax.main", script=script)
  assert not malloc.launched_as([py, "-c", "import runpy"], module="visrep_jax.main")
  assert not malloc.launched_as([py], module="visrep_jax.main")


def _child(tmp_path, code, *args, **env_overrides):
  env = {k: v for k, v in os.environ.items()
         if k not in ("LD_PRELOAD", malloc.ENV_DONE, malloc.ENV_CHOICE, "CONDA_PREFIX")}
  env.update(env_overrides, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  path = tmp_path / "entry.py"
  path.write_text(code)
  return subprocess.run([sys.executable, str(path), *args], env=env, capture_output=True,
                        text=True, timeout=60)


ENTRY = ("import sys\nfrom visrep_jax.utils import malloc\nprint('start', flush=True)\n"
         "malloc.ensure_tcmalloc(script=__file__)\n"
         "print(malloc.active_allocator(), sys.argv[1:])\n")


def test_a_bad_setting_is_a_one_line_error(tmp_path):
  out = _child(tmp_path, ENTRY, VISREP_MALLOC="glibc")
  assert out.returncode == 2, out
  assert out.stderr.strip().startswith("error: VISREP_MALLOC='glibc' is neither")
  assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(malloc.find_tcmalloc() is None,
                    reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4; "
                           ".ci/run installs it)")
def test_the_entry_point_reruns_once_with_tcmalloc_and_a_host_program_never(tmp_path):
  out = _child(tmp_path, ENTRY, "a", "--b=1")
  assert out.returncode == 0, out.stderr
  # 'start' twice: the script ran, re-executed itself once, and ran again with tcmalloc.
  assert out.stdout.split("\n")[:3] == ["start", "start", "tcmalloc ['a', '--b=1']"], out.stdout
  out = _child(tmp_path, ENTRY, "a", VISREP_MALLOC="system")
  assert out.stdout.split("\n")[:2] == ["start", "system ['a']"]
  # The same entry point run by a host program (runpy) must not restart the host.
  host = ("import runpy, sys\nprint('host', flush=True)\nsys.argv = ['entry.py', 'x']\n"
          f"runpy.run_path({str(tmp_path / 'entry.py')!r}, run_name='__main__')\n")
  (tmp_path / "entry.py").write_text(ENTRY)
  hp = tmp_path / "host.py"
  hp.write_text(host)
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", malloc.ENV_DONE)}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, str(hp)], env=env, capture_output=True, text=True,
                       timeout=60)
  assert out.stdout.split("\n")[:3] == ["host", "start", "system ['x']"], out


def test_allocator_benchmark_children_never_reexecute_and_get_their_allocator():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "benchmark_malloc", os.path.join(REPO, "scripts", "benchmark_malloc.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  env, why = bench.allocator_env("system")
  assert why is None and env[malloc.ENV_CHOICE] == "system" and "LD_PRELOAD" not in env
  env, _ = bench.allocator_env("hugetlb")
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  env, why = bench.allocator_env("tcmalloc")
  if malloc.find_tcmalloc() is None:
    assert env is None and "libtcmalloc-minimal4" in why
  else:
    assert env["LD_PRELOAD"] == malloc.find_tcmalloc() and env["TCMALLOC_RELEASE_RATE"] == "0"
  with pytest.raises(SystemExit, match="unknown allocator 'mimalloc'"):
    bench.allocator_env("mimalloc")
