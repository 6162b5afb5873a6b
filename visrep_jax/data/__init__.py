"""Input pipeline: data sources, preprocessing ops, and global sharded batches.

TensorFlow is imported here (lazily, by the sources and pipeline modules) and only ever runs on
the host: ``tf_host()`` hides every accelerator from it before first use.
"""

from __future__ import annotations

_TF = None


def tf_host():
  """Imports TensorFlow for host-side input processing, with all GPUs/TPUs hidden from it."""
  global _TF
  if _TF is None:
    import os
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    try:
      tf.config.set_visible_devices([], "GPU")
      tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised / no such device type
      pass
    _TF = tf
  return _TF


class DataError(RuntimeError):
  """Missing, corrupt or inconsistent data; the message says what to do."""
