"""Entry point: ``python -m visrep_jax.main --config=configs/deit3.py[:k=v,...] --workdir=DIR
[--config.key=value ...]``.

Multi-process runs (TPU pods, SLURM, or ``--coordinator_address``/``--num_processes``/
``--process_id``) call ``jax.distributed.initialize()`` before anything touches a device.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  # tcmalloc instead of glibc's allocator (re-executes this command once when it is installed):
  # ~13% faster CPU training steps, see visrep_jax/utils/malloc.py. VISREP_MALLOC=system: off.
  from visrep_jax.utils import malloc as _malloc
  _malloc.ensure_tcmalloc(module="visrep_jax.main")

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/deit3.py:variant=S",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.DEFINE_bool("distributed", None, "Force (True) or forbid (False) jax.distributed; "
                  "default: auto-detect TPU pods / SLURM / the flags above.")


def _should_init_distributed() -> bool:
  if FLAGS.distributed is not None:
    return FLAGS.distributed
  if FLAGS.coordinator_address or (FLAGS.num_processes or 0) > 1:
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    return True
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  # Multi-host TPU slices: the TPU runtime exposes the worker list.
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_NUM_SLICES")
  return bool(hosts and "," in hosts)


def init_distributed():
  import jax
  if not _should_init_distributed():
    return
  kwargs = {}
  if FLAGS.coordinator_address:
    kwargs = dict(coordinator_address=FLAGS.coordinator_address,
                  num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  # Cross-process reductions between CPU devices need a collectives backend; it only affects
  # the CPU platform, so it is harmless on GPU/TPU hosts.
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception:  # pylint: disable=broad-except  (older/newer jax without the option)
    pass
  jax.distributed.initialize(**kwargs)


def set_cpu_flags(config):
  """On a CPU-only host: the recommended XLA CPU flags and ``config.cpu_devices`` host devices,
  set before the JAX backend starts (visrep_jax.utils.xla)."""
  from visrep_jax.utils import malloc as malloc_utils, xla as xla_utils  # no jax import
  devices = config.get("cpu_devices", 1)
  devices = devices if isinstance(devices, int) else 1  # validate() reports a bad value
  if malloc_utils.accelerator_host(os.environ):
    if devices > 1:
      logging.warning("config.cpu_devices=%d is ignored: this host runs JAX on an accelerator.",
                      devices)
    return
  if devices > 1 and xla_utils.HOST_DEVICE_FLAG in os.environ.get("XLA_FLAGS", ""):
    logging.warning("config.cpu_devices=%d is ignored: XLA_FLAGS already sets %s.", devices,
                    xla_utils.HOST_DEVICE_FLAG)
  xla_utils.set_cpu_flags(devices=devices)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/deit3.py:demo")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (checkpoints, metrics and logs go there).")
  if not FLAGS["verbosity"].present:
    # orbax and friends log every file operation at INFO; our own progress goes to stdout.
    logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  set_cpu_flags(config)
  init_distributed()
  import jax
  from visrep_jax import config_lib, trainers
  from visrep_jax.checkpoint import CheckpointMismatchError
  from visrep_jax.data import DataError
  from visrep_jax.registry import UnknownNameError
  try:
    config_lib.validate(config, num_devices=jax.device_count())
    trainer = trainers.get(config.trainer)
    logging.info("Config:\n%s", config)
    trainer.train_and_evaluate(config, FLAGS.workdir)
  except (config_lib.ConfigError, UnknownNameError, DataError, FileNotFoundError,
          CheckpointMismatchError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


def _parse_flags(argv):
  """absl flag parsing, with a one-line error for ``--config.key=value`` naming a missing key."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:
    bad = [a for a in argv if a.startswith("--config.")]
    print(f"error: unknown config key in {' '.join(bad) or argv}: {e}. "
          "Run with --helpfull, or read the config file's docstring, for the valid keys.",
          file=sys.stderr)
    sys.exit(2)
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    if any(l.startswith("Traceback") for l in lines):  # an exception inside the config file
      lines = [lines[0].rstrip(":"), lines[-1]]
    print("error: " + " ".join(lines), file=sys.stderr)
    sys.exit(2)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
