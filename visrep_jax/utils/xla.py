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
# train step = fwd + bwd + AdamW (scripts/benchmark.py; A/B runs interleaved, medians):
#
# * xla_cpu_experimental_ynn_fusion_type=reduce (process-wide, for training). By default this
#   jaxlib routes dots, and the elementwise ops and reductions around them, to YNNPACK
#   ("ynn_fusion"). For the ViT GEMMs (M=B*197; K, N in {384, 1152, 1536}) XLA's Eigen GEMM is
#   5-15% faster on this CPU, and YNNPACK fusing a LayerNorm into the following matmul makes
#   that matmul ~50% slower. Keeping YNNPACK only for reductions was fastest for training
#   (~8% vs the default): without it, column reductions (bias / LayerNorm / LayerScale
#   gradients over B*197 rows) go through XLA's reduce-window rewrite, ~10x slower.
# * For inference executables (no column reductions) YNNPACK off entirely was another ~10%
#   faster; ``cpu_compiler_options('infer')`` gives that as a per-executable option.
# * No measurable effect here, so not set: xla_cpu_use_onednn,
#   xla_cpu_enable_concurrency_optimized_scheduler, disabling tree_reduction_rewriter,
#   xla_cpu_multi_thread_eigen (already true), xla_cpu_use_thunk_runtime (the only runtime in
#   this jaxlib). YNNPACK for eltwise as well was much slower (0.7x). Matmul precision is left
#   at its default (full float32 on CPU).
#
# Unknown flags make XLA abort at start-up, so flags are only applied for the jaxlib minor
# version on which they were verified to exist.
_VERIFIED_CPU_FLAGS = {  # jaxlib (major, minor) -> process-wide flags
    (0, 10): {"xla_cpu_experimental_ynn_fusion_type": "reduce"},
}
_VERIFIED_INFER_OPTIONS = {  # jaxlib (major, minor) -> per-executable options for inference
    (0, 10): {"xla_cpu_experimental_ynn_fusion_type": ""},
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


def _for_installed_jaxlib(table) -> Dict[str, str]:
  version = _jaxlib_version()
  # Verified only within one minor series: experimental flags come and go.
  return dict(table.get(version[:2], {})) if version else {}


def recommended_cpu_flags() -> Dict[str, str]:
  """The flags ``set_cpu_flags`` would add for the installed jaxlib (may be empty)."""
  return _for_installed_jaxlib(_VERIFIED_CPU_FLAGS)


def cpu_compiler_options(kind: str = "train") -> Dict[str, str]:
  """Per-executable XLA options for ``jitted.lower(...).compile(compiler_options=...)``.

  ``kind='infer'`` (forward-only executables) disables YNNPACK for that executable; 'train'
  returns {} (the process-wide ``set_cpu_flags`` setting is the right one). Empty unless the
  default backend is CPU and the installed jaxlib is one the options were verified on.
  """
  if kind not in ("train", "infer"):
    raise ValueError(f"kind must be 'train' or 'infer', got {kind!r}")
  import jax  # deferred: importing this module must not import jax
  if kind == "train" or jax.default_backend() != "cpu":
    return {}
  return _for_installed_jaxlib(_VERIFIED_INFER_OPTIONS)


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


HOST_DEVICE_FLAG = "xla_force_host_platform_device_count"


def set_cpu_flags(extra: Optional[Dict[str, str]] = None, override: bool = False,
                  devices: int = 1) -> str:
  """Adds the recommended XLA CPU flags (plus ``extra``) to ``$XLA_FLAGS``; returns it.

  ``devices > 1`` also splits the CPU into that many XLA host devices (config key
  ``cpu_devices`` of ``python -m visrep_jax.main``), unless ``$XLA_FLAGS`` already sets a device
  count (JAX's own ``JAX_NUM_CPU_DEVICES`` / ``jax_num_cpu_devices``, when set, wins over both). A jitted step over a batch sharded on them computes the same global-batch loss,
  BatchNorm statistics and gradients; the executions of the devices share the intra-op thread
  pool and fill each other's serial stretches, at the cost of a gradient all-reduce and a sync
  per step. ``scripts/benchmark.py --host_devices=1,2`` (jaxlib 0.10.2, 2 cores, tcmalloc,
  training images/s of 2 devices vs 1 in the same run): DeiT-S/16 224px batch 32 1.02x; the
  small Fashion-MNIST-sized models are slower (``--model=deit3_demo_patch7_28 --resolution=28
  --batch_size=64 --steps=20``: 0.98x; ``--model=resnet18 --resolution=28 --batch_size=128
  --steps=20``: 0.83x), so 1 is the default.
  Harmless on GPU/TPU hosts: the flags only affect the XLA CPU compiler and CPU platform.
  """
  if _backend_initialized():
    warnings.warn("set_cpu_flags() called after the JAX backend was initialised; "
                  "the XLA_FLAGS change has no effect in this process.")
  flags = recommended_cpu_flags()
  if devices > 1:
    flags[HOST_DEVICE_FLAG] = str(int(devices))
  flags.update(extra or {})
  return merge_xla_flags(flags, override=override)
