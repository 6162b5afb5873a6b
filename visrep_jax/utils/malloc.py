"""tcmalloc for the host process: XLA on CPU without a page fault storm every step.

XLA's CPU runtime allocates each execution's temporary buffer with ``malloc`` and frees it when
the execution ends (3.1 GiB for a DeiT-S/16 train step at batch 32). glibc serves blocks that
large with ``mmap`` and gives them back with ``munmap`` (from a worker thread's arena even
``M_MMAP_MAX=0`` does not stop it), so every step page-faults the whole buffer in again.
``python scripts/benchmark_malloc.py --allocators=system,tcmalloc,jemalloc,hugetlb`` (2-core
CPU, jaxlib 0.10.2, glibc 2.36, that step, 4 steps each, 2026-11-26, before the models' Dense
VJP and with the script's own step at the time), median s/step and ratio:

  glibc              6.52 s/step (1.00x)  814-869k minor faults, 1.5-1.8 s system time per step
  glibc hugetlb=1    5.42 s/step (0.83x)  2-63k faults, 0.34-0.43 s system time
  jemalloc 5.3       6.18 s/step (0.95x)  887-904k faults (it purges freed extents)
  tcmalloc 2.10      5.36 s/step (0.82x)  0-2k faults, 0.00-0.01 s system time (one of the four
                                          steps faulted 871k pages in again: 6.12 s)

tcmalloc keeps freed spans and hands them out again (here with ``TCMALLOC_RELEASE_RATE=0``: it
never returns memory to the OS, so the process keeps its peak footprint, as a training run does
anyway). The allocator can only be replaced when
the process starts (``LD_PRELOAD``), so :func:`ensure_tcmalloc` re-executes the current command
line (``sys.orig_argv``) once with tcmalloc preloaded. Entry points call it first thing
(``python -m visrep_jax.main``, ``scripts/benchmark.py``, ``scripts/benchmark_dense_vjp.py``),
and it acts only when the process's
own command line is that entry point: an import, runpy, IPython's %run or a debugger never
re-executes anything. The process keeps its PID (signals, SLURM, timeouts are unaffected).

``VISREP_MALLOC``: ``auto`` (default: tcmalloc when installed, e.g. Debian/Ubuntu
``apt-get install libtcmalloc-minimal4``, on a CPU-only host, outside conda and with an empty
``LD_PRELOAD``; otherwise the system allocator, unchanged), ``system`` (never re-execute), or the
path of an allocator library to preload (appended to ``LD_PRELOAD``). Nothing here imports jax.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, Mapping, Optional, Sequence

ENV_CHOICE = "VISREP_MALLOC"
# Set in the re-executed process: never re-execute twice (even if the preload did not take).
ENV_DONE = "VISREP_MALLOC_REEXEC"
LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so",
             "libtcmalloc.so")
SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
               "/usr/lib", "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")
# Set unless the user set them:
# * tcmalloc reports every allocation above 1 GiB on stderr by default; XLA makes one per step.
# * Release rate 0: freed memory is never returned to the OS. With the default (1), memory that
#   another framework in the process frees (the benchmark's torch) is returned and XLA's next
#   temporary buffer faults in again: DeiT-S train windows of 4.7-5.4 img/s instead of 6.0.
TCMALLOC_DEFAULTS = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40),
                     "TCMALLOC_RELEASE_RATE": "0"}


class MallocError(ValueError):
  pass


def find_library(names: Sequence[str], dirs: Sequence[str] = SEARCH_DIRS) -> Optional[str]:
  """Path of the first of ``names`` installed in ``dirs``, or None."""
  for d in dirs:
    for name in names:
      path = os.path.join(d, name)
      if os.path.isfile(path):
        return path
  return None


def find_tcmalloc(dirs: Sequence[str] = SEARCH_DIRS) -> Optional[str]:
  """Path of an installed tcmalloc library, or None."""
  return find_library(LIBRARIES, dirs)


def preloaded(environ: Mapping[str, str]) -> bool:
  """Whether ``LD_PRELOAD`` is set at all: then it is the user's choice (another allocator, a
  sanitizer that must come first, ...) and ``auto`` leaves it alone."""
  return bool(environ.get("LD_PRELOAD", "").strip())


def accelerator_host(environ: Mapping[str, str]) -> bool:
  """Whether JAX will run on a GPU/TPU here: ``JAX_PLATFORMS`` names another platform first,
  or (unset) an NVIDIA, TPU or ROCm device node exists."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() != "cpu"
  return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/accel0", "/dev/kfd"))


def reexec_environment(environ: Mapping[str, str], platform: str = sys.platform,
                       find: Callable[[], Optional[str]] = find_tcmalloc,
                       accelerator: Optional[bool] = None) -> Optional[Dict[str, str]]:
  """The environment to re-execute with, or None to go on as is (pure but for ``find`` and, when
  ``accelerator`` is None, a look at the accelerator device files).

  ``auto`` applies only on CPU hosts (on GPU/TPU hosts the step's buffers live on the device),
  outside conda environments (tcmalloc loads the system libstdc++ before the environment's) and
  when ``LD_PRELOAD`` is empty."""
  choice = environ.get(ENV_CHOICE, "auto").strip() or "auto"
  if choice == "system" or environ.get(ENV_DONE) or not platform.startswith("linux"):
    return None
  if choice == "auto":
    if preloaded(environ) or environ.get("CONDA_PREFIX"):
      return None
    if accelerator if accelerator is not None else accelerator_host(environ):
      return None
    library = find()
    if library is None:
      return None
  else:
    library = os.path.abspath(choice)
    if not os.path.isfile(library):
      raise MallocError(f"{ENV_CHOICE}={choice!r} is neither 'auto', 'system' nor an existing "
                        "allocator library file: unset it, or give the path of e.g. "
                        "libtcmalloc_minimal.so.4.")
    if library in environ.get("LD_PRELOAD", "").split(":"):
      return None
  env = dict(environ)
  # After what is there already (a sanitizer runtime must stay first).
  env["LD_PRELOAD"] = ":".join(p for p in (environ.get("LD_PRELOAD", ""), library) if p)
  env[ENV_DONE] = "1"
  for key, value in TCMALLOC_DEFAULTS.items():
    env.setdefault(key, value)
  return env


def launched_as(orig_argv: Sequence[str], module: Optional[str] = None,
                script: Optional[str] = None) -> bool:
  """Whether the command line ``orig_argv`` runs ``python -m module`` or ``python script``
  (interpreter options before either are skipped). False for ``python -c``, a host program
  that runs the entry point through runpy / IPython's %run, and anything else."""
  args = list(orig_argv[1:])
  i = 0
  while i < len(args):
    a = args[i]
    if a == "-m" or (a.startswith("-m") and len(a) > 2):
      name = args[i + 1] if a == "-m" and i + 1 < len(args) else a[2:]
      return module is not None and name == module
    if a in ("-c",) or a.startswith("-c"):
      return False
    if a in ("-W", "-X", "--check-hash-based-pycs"):  # options taking a value
      i += 2
      continue
    if a.startswith("-"):
      i += 1
      continue
    return (script is not None and
            os.path.realpath(a) == os.path.realpath(script))
  return False


def _debugging() -> bool:
  return sys.gettrace() is not None or any(m in sys.modules for m in ("pdb", "debugpy", "pydevd"))


def ensure_tcmalloc(module: Optional[str] = None, script: Optional[str] = None) -> None:
  """Entry points only: re-executes this process's command line with tcmalloc preloaded when
  that applies (see :func:`reexec_environment`) and the command line is really this entry point
  (``python -m module`` / ``python script``: never when run through runpy, IPython's %run or
  a debugger); returns otherwise. A bad ``VISREP_MALLOC`` is a one-line error (exit 2). Call it
  before anything heavy is imported."""
  if os.environ.get(ENV_DONE):
    if os.environ.get(ENV_CHOICE, "auto") != "system" and active_allocator() == "system":
      print(f"visrep_jax: warning: {os.environ.get('LD_PRELOAD')!r} did not load (see the "
            "loader's message above); using the system allocator.", file=sys.stderr)
    return
  try:
    env = reexec_environment(os.environ)
  except MallocError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  argv = list(getattr(sys, "orig_argv", None) or [])
  if env is None or not launched_as(argv, module, script) or _debugging():
    return
  argv[0] = sys.executable  # not a bare 'python' that PATH might resolve to another interpreter
  for stream in (sys.stdout, sys.stderr):
    if stream is not None:
      stream.flush()
  try:
    os.execve(sys.executable, argv, env)
  except OSError as e:  # go on with the system allocator rather than fail the run
    print(f"visrep_jax: could not re-execute with {env['LD_PRELOAD']} ({e}); using the system "
          f"allocator (set {ENV_CHOICE}=system to skip this).", file=sys.stderr)


def active_allocator() -> str:
  """'tcmalloc', 'jemalloc' or 'system': the allocator library this process has mapped (Linux;
  elsewhere 'system')."""
  try:
    with open("/proc/self/maps") as f:
      names = {os.path.basename(line.split()[-1]) for line in f if "/" in line}
  except OSError:
    return "system"
  for name in ("tcmalloc", "jemalloc"):
    if any(n.startswith(f"lib{name}") for n in names):
      return name
  return "system"
