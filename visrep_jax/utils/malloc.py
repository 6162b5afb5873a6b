"""tcmalloc for the host process: XLA on CPU without a page fault storm every step.

XLA's CPU runtime allocates each execution's temporary buffer with ``malloc`` and frees it when
the execution ends (3.1 GiB for a DeiT-S/16 train step at batch 32). glibc serves blocks that
large with ``mmap`` and gives them back with ``munmap`` (from a worker thread's arena even
``M_MMAP_MAX=0`` does not stop it), so every step page-faults the whole buffer in again. Measured
on the 2-core CPU (jaxlib 0.10.2, glibc 2.36, that step, 4 steps each):

  glibc              6.13-6.26 s/step   ~820k minor faults and 1.4-1.6 s system time per step
  glibc hugetlb=1    5.51-6.05 s/step   (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)
  jemalloc 5.3       6.75-6.92 s/step   (still faults: it purges freed extents)
  tcmalloc 2.10      5.39-5.40 s/step   ~0-3k faults, 0.02 s system time

tcmalloc keeps freed spans and hands them out again (here with ``TCMALLOC_RELEASE_RATE=0``: it
never returns memory to the OS, so the process keeps its peak footprint, as a training run does
anyway). The allocator can only be replaced when
the process starts (``LD_PRELOAD``), so :func:`ensure_tcmalloc` re-executes the current command
line (``sys.orig_argv``) once with tcmalloc preloaded. Entry points call it first thing
(``python -m visrep_jax.main``, ``scripts/benchmark.py``); a library import never does.

``VISREP_MALLOC``: ``auto`` (default: tcmalloc when installed, e.g. Debian/Ubuntu
``apt-get install libtcmalloc-minimal4``; otherwise the system allocator, unchanged), ``system``
(never re-execute), or the path of an allocator library to preload. Nothing here imports jax.
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


def find_tcmalloc(dirs: Sequence[str] = SEARCH_DIRS) -> Optional[str]:
  """Path of an installed tcmalloc library, or None."""
  for d in dirs:
    for name in LIBRARIES:
      path = os.path.join(d, name)
      if os.path.isfile(path):
        return path
  return None


def preloaded(environ: Mapping[str, str]) -> bool:
  """Whether ``LD_PRELOAD`` already names tcmalloc (or jemalloc: the user chose)."""
  value = environ.get("LD_PRELOAD", "")
  return any(k in value for k in ("tcmalloc", "jemalloc"))


def reexec_environment(environ: Mapping[str, str], platform: str = sys.platform,
                       find: Callable[[], Optional[str]] = find_tcmalloc
                       ) -> Optional[Dict[str, str]]:
  """The environment to re-execute with, or None to go on as is (pure: no side effects)."""
  choice = environ.get(ENV_CHOICE, "auto").strip() or "auto"
  if choice == "system" or environ.get(ENV_DONE) or not platform.startswith("linux"):
    return None
  if choice == "auto":
    if preloaded(environ):
      return None
    library = find()
    if library is None:
      return None
  else:
    library = choice
    if not os.path.isfile(library):
      raise MallocError(f"{ENV_CHOICE}={choice!r} is neither 'auto', 'system' nor an existing "
                        "allocator library file: unset it, or give the path of e.g. "
                        "libtcmalloc_minimal.so.4.")
    if library in environ.get("LD_PRELOAD", "").split(":"):
      return None
  env = dict(environ)
  env["LD_PRELOAD"] = ":".join(p for p in (library, environ.get("LD_PRELOAD", "")) if p)
  env[ENV_DONE] = "1"
  for key, value in TCMALLOC_DEFAULTS.items():
    env.setdefault(key, value)
  return env


def ensure_tcmalloc() -> None:
  """Re-executes this process's command line with tcmalloc preloaded when that applies (see the
  module docstring); returns when it does not. Call it before anything heavy is imported."""
  env = reexec_environment(os.environ)
  if env is None:
    return
  argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, argv, env)
  except OSError as e:  # go on with the system allocator rather than fail the run
    print(f"visrep_jax: could not re-execute with {env['LD_PRELOAD']} ({e}); using the system "
          f"allocator (set {ENV_CHOICE}=system to skip this).", file=sys.stderr)


def active_allocator() -> str:
  """'tcmalloc', 'jemalloc' or 'system': what this process has mapped (Linux; else 'system')."""
  try:
    with open("/proc/self/maps") as f:
      maps = f.read()
  except OSError:
    return "system"
  for name in ("tcmalloc", "jemalloc"):
    if name in maps:
      return name
  return "system"
