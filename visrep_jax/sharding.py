"""Device mesh from the config, and sharding rules for parameters / optimizer state / batches.

The mesh is ``[("data", -1), ("fsdp", 1)]`` by default: pure data parallelism. The batch is
split over *all* mesh axes. ``sharding="fsdp"`` shards each parameter (and its optimizer
moments, which have the same shapes) along its largest dimension divisible by the ``fsdp`` axis
size (ZeRO-3 style); XLA inserts the all-gathers / reduce-scatters.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(axes: Sequence[Tuple[str, int]], devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(a for a, _ in axes)
  sizes = [int(n) for _, n in axes]
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if len(devices) % fixed:
    raise ValueError(f"mesh {list(axes)} does not divide the {len(devices)} devices")
  sizes = [len(devices) // fixed if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} has {int(np.prod(sizes))} slots but there are "
                     f"{len(devices)} devices; use -1 for one axis to fill the rest")
  # Auto axes: XLA's sharding propagation decides intermediate layouts (newer JAX defaults
  # jax.make_mesh to Explicit axes, which would require annotating every op).
  auto = getattr(jax.sharding, "AxisType", None)
  if auto is not None:
    try:
      return jax.make_mesh(tuple(sizes), names, devices=devices,
                           axis_types=(auto.Auto,) * len(names))
    except TypeError:
      pass
  return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, axis_size: int, axis: str = "fsdp", min_size: int = 2 ** 10) -> P:
  """Shards the largest dimension divisible by ``axis_size``; small arrays stay replicated."""
  if axis_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] % axis_size == 0:
      spec = [None] * len(shape)
      spec[i] = axis
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, rule: str = "replicate") -> Any:
  """A NamedSharding per leaf of ``abstract_state`` (e.g. from ``jax.eval_shape``)."""
  if rule == "replicate":
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
  if rule == "fsdp":
    size = dict(zip(mesh.axis_names, mesh.devices.shape)).get("fsdp", 1)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, size)), abstract_state)
  raise ValueError(f"unknown sharding rule {rule!r}; valid: replicate, fsdp")
