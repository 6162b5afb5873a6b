"""XLA flag helpers for CPU hosts. Call ``set_cpu_flags()`` before the JAX backend starts.

XLA reads ``XLA_FLAGS`` once, when the first backend (the CPU client) is created, i.e. at the
first JAX computation or ``jax.devices()`` call -- not at ``import jax``. ``set_cpu_flags``
therefore works as long as nothing has touched a device yet; it warns otherwise.

Nothing here imports jax (only inspects it when already imported).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings
from typing import Dict, Optional

# Measured on jaxlib 0.10.2, 2-core AMD EPYC (AVX-512), DeiT-S/16 at 224px, batch 32,
# train step = fwd + bwd + AdamW (see scripts/benchmark.py):
#
# * xla_cpu_experimental_ynn_fusion_type=reduce -- by default jaxlib routes dots, and the
#   elementwise ops around them, to YNNPACK ("ynn_fusion"). On this machine YNNPACK's GEMMs for
#   the ViT shapes (M=B*197, K,N in {384, 1152, 1536}) are 5-15% slower than XLA's Eigen GEMM,
#   and when it fuses a LayerNorm into the following matmul (inference) that matmul gets ~50%
#   slower. Keeping YNNPACK only for reductions (bias/LayerNorm-parameter gradients, where the
#   non-YNN path uses a slow reduce-window rewrite) was fastest for training (~8% vs default)
#   and also faster for inference. Removing YNNPACK entirely was best for inference but ~5%
#   slower for training.
# * Flags that made no measurable difference here and are therefore *not* set:
#   xla_cpu_use_onednn, xla_cpu_enable_concurrency_optimized_scheduler,
#   xla_cpu_multi_thread_eigen (already true), xla_cpu_use_thunk_runtime (the only runtime
#   in this jaxlib). Matmul precision is left at its default (full float32 on CPU).
#
# Unknown flags make XLA abort at start-up, so flags are only applied for jaxlib versions on
# which they were verified to exist.
_VERIFIED_CPU_FLAGS = {
    # (min jaxlib (major, minor), flags)
    (0, 10): {"xla_cpu_experimental_ynn_fusion_type": "reduce"},
}


def _jaxlib_version() -> Optional[tuple]:
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return None
  parts = []
  for p in version.split(".")[:2]:
    digits = "".join(ch for ch in p if ch.isdigit())
    parts.append(int(digits or 0))
  return tuple(parts)


def recommended_cpu_flags() -> Dict[str, str]:
  """The flags ``set_cpu_flags`` would add for the installed jaxlib (may be empty)."""
  version = _jaxlib_version()
  if version is None:
    return {}
  flags: Dict[str, str] = {}
  for (major, minor), extra in sorted(_VERIFIED_CPU_FLAGS.items()):
    # Verified only within one minor series: experimental flags come and go.
    if version[:2] == (major, minor):
      flags.update(extra)
  return flags


def _backend_initialized() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # private; the only way to ask without initialising
    return bool(getattr(xla_bridge, "_backends", {}))
  except Exception:  # pragma: no cover - layout of the private module changed
    return False


def merge_xla_flags(flags: Dict[str, str], override: bool = False) -> str:
  """Adds ``--name=value`` entries to ``$XLA_FLAGS`` and returns the new value.

  Flags already present in ``$XLA_FLAGS`` win unless ``override`` (so a user can always
  overrule the recommendation from the environment)."""
  current = os.environ.get("XLA_FLAGS", "").split()
  name_of = lambda f: f.split("=", 1)[0].lstrip("-")
  present = {name_of(f) for f in current}
  out = [f for f in current if not (override and name_of(f) in flags)]
  for name, value in flags.items():
    if override or name not in present:
      out.append(f"--{name}={value}")
  os.environ["XLA_FLAGS"] = " ".join(out)
  return os.environ["XLA_FLAGS"]


def set_cpu_flags(extra: Optional[Dict[str, str]] = None, override: bool = False) -> str:
  """Adds the recommended XLA CPU flags (plus ``extra``) to ``$XLA_FLAGS``; returns it.

  Harmless on GPU/TPU hosts: the flags only affect the XLA CPU compiler.
  """
  if _backend_initialized():
    warnings.warn("set_cpu_flags() called after the JAX backend was initialised; "
                  "the XLA_FLAGS change has no effect in this process.")
  flags = recommended_cpu_flags()
  flags.update(extra or {})
  return merge_xla_flags(flags, override=override)
