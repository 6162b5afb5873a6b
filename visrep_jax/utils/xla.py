"""XLA flag helpers. Import this module *before* the JAX backend is initialised.

XLA reads ``XLA_FLAGS`` once, when the first backend (CPU client) is created, i.e. at the first
JAX computation or ``jax.devices()`` call -- not at ``import jax``. ``set_cpu_flags`` therefore
works as long as nothing has touched a device yet; it warns otherwise.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Dict, Optional

# Placeholder, filled in after measurement (see set_cpu_flags docstring).
RECOMMENDED_CPU_FLAGS: Dict[str, str] = {}


def _backend_initialized() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # private, but the only way to ask without initialising
    return bool(getattr(xla_bridge, "_backends", {}))
  except Exception:  # pragma: no cover - layout of private module changed
    return False


def merge_xla_flags(flags: Dict[str, str], override: bool = False) -> str:
  """Adds ``--name=value`` entries to ``$XLA_FLAGS``; flags the user already set win
  unless ``override``. Returns the new value."""
  current = os.environ.get("XLA_FLAGS", "").split()
  present = {f.split("=", 1)[0].lstrip("-") for f in current}
  out = [f for f in current if override is False or f.split("=", 1)[0].lstrip("-") not in flags]
  for name, value in flags.items():
    if override or name not in present:
      out.append(f"--{name}={value}")
  os.environ["XLA_FLAGS"] = " ".join(out)
  return os.environ["XLA_FLAGS"]


def set_cpu_flags(extra: Optional[Dict[str, str]] = None, override: bool = False) -> str:
  """Sets the XLA CPU flags recommended for training/inference on CPU hosts."""
  if _backend_initialized():
    warnings.warn("set_cpu_flags() called after the JAX backend was initialised; "
                  "XLA_FLAGS changes will have no effect in this process.")
  flags = dict(RECOMMENDED_CPU_FLAGS)
  flags.update(extra or {})
  return merge_xla_flags(flags, override=override)
