"""tf.data pipelines (host only) and their conversion to global sharded ``jax.Array`` batches.

Training: this process's shard -> shuffle (seeded) -> repeat -> [repeated augmentation] ->
enumerate -> skip(already consumed) -> preprocess with a per-example stateless seed -> batch
[-> copies dealt over devices].
Because the order and every random draw are functions of (seed, process, example index), a
resumed run sees exactly the batches an uninterrupted run would have seen.

Evaluation: every process walks its shard once, pads with ``mask=0`` examples up to the same
number of full batches on every process, so that ``sum(mask)`` counts each example exactly once
whatever the number of devices or processes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Dict, Iterator, Optional

import numpy as np
import jax

from visrep_jax.data import DataError, preprocess, sources, tf_host


def _seed_pair(*ints) -> Any:
  tf = tf_host()
  s = tf.constant([ints[0] & 0x7FFFFFFF, 0], tf.int64)
  for i in ints[1:]:
    s = tf.random.experimental.stateless_fold_in(s, i)
  return s


def _options():
  tf = tf_host()
  opts = tf.data.Options()
  opts.deterministic = True
  opts.experimental_optimization.map_parallelization = True
  opts.threading.private_threadpool_size = 0
  return opts


@dataclasses.dataclass
class TrainInput:
  """An infinite iterator of process-local numpy batches, plus what the loop needs to know."""
  iterator: Iterator[Dict[str, np.ndarray]]
  num_examples: int
  num_classes: int
  dataset: Any


def make_train(source: sources.Source, split: str, pp_spec: str, global_batch: int, seed: int,
               start_step: int = 0, shuffle_buffer: int = 50_000, repeated_aug: int = 1,
               skip_corrupt: bool = False, process_index: Optional[int] = None,
               process_count: Optional[int] = None, prefetch: int = 2,
               num_shards: int = 1) -> TrainInput:
  """Infinite training batches of ``global_batch // process_count`` examples for this process.

  Sources with random access (in-memory arrays, image folders) use a *global* order: stream
  position q is example ``shuffle_epoch(q // r)`` (a stateless permutation per epoch of the
  dataset, r the repeated-augmentation count) with augmentation seed ``(seed, q)``, and global
  batch b holds positions ``[b * global_batch, (b + 1) * global_batch)``, process p taking its
  slice. The batches, and so the training run, are then identical for any number of processes,
  and resuming at step s starts at position s * global_batch.
  Other sources (TFDS record files) stream this process's shard through a seeded shuffle buffer;
  resuming skips the examples already consumed.

  Repeated augmentation (``repeated_aug=r > 1``, DeiT's ``RASampler``): every image appears r
  times in a row of the stream, each copy with its own augmentation seed; an epoch still has as
  many examples as the dataset (so 1/r of them are distinct images; one permutation lasts r
  epochs, whereas DeiT draws a new one each epoch and uses its first 1/r). As in DeiT, where
  rank k takes stream positions k, k + world, ..., the copies are dealt round-robin over the
  ``num_shards`` equal contiguous pieces of the global batch: position
  ``b * global_batch + t * num_shards + k`` goes to slot t of shard k. Pass ``num_shards`` = the
  number of devices the batch axis is split over (the data-parallel mesh size, e.g.
  ``jax.device_count()``); the r copies then land on r different devices, and on different
  processes when processes own contiguous blocks of devices. The shards' contents depend on
  ``num_shards`` (as DeiT's batches depend on its world size); with r = 1 it is ignored.
  For streaming sources the copies are dealt over this process's ``num_shards //
  process_count`` devices.
  """
  tf = tf_host()
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if global_batch % pc:
    raise ValueError(f"global batch {global_batch} is not divisible by {pc} processes")
  r = max(int(repeated_aug), 1)
  num_shards = int(num_shards)
  if num_shards < 1 or global_batch % num_shards:
    raise ValueError(f"num_shards={num_shards} must be >= 1 and divide the global batch "
                     f"{global_batch} (it is the number of devices the batch is split over)")
  if num_shards > 1 and num_shards % pc:
    raise ValueError(f"num_shards={num_shards} must be a multiple of the {pc} processes (each "
                     "process feeds whole shards: its local devices)")
  if r > 1 and num_shards == 1 and jax.device_count() > 1:
    logging.warning("repeated_aug=%d with num_shards=1: the copies of an image land on the same "
                    "device; pass num_shards=<number of devices the batch is split over>.", r)
  if r == 1:
    num_shards = 1  # no copies to spread: keep the plain order (same batches on any mesh)
  local_batch = global_batch // pc
  shard_batch = global_batch // num_shards
  pp = preprocess.parse(pp_spec)
  n = source.num_examples(split)
  if n == 0:
    raise DataError(f"Split {split!r} has no examples.")
  base = _seed_pair(seed, 0x5EED)

  def augment(position, ex):
    ex = pp(ex, tf.cast(tf.random.experimental.stateless_fold_in(base, position), tf.int32))
    return {"image": ex["image"], "label": ex["label"]}

  if source.random_access:
    lookup = source.lookup(split)
    shuffle = shuffle_buffer > 0

    def fetch(i):
      # i-th example handled by this process -> its slot in the global batch -> (shard, row)
      # -> stream position (DeiT's round-robin over shards) -> dataset index.
      step, slot = i // local_batch, pi * local_batch + i % local_batch
      position = step * global_batch + (slot % shard_batch) * num_shards + slot // shard_batch
      sample = position // r
      epoch, k = sample // n, sample % n
      if shuffle:
        key = tf.stack([tf.cast(seed, tf.int64), epoch, tf.constant(0x5F3759DF, tf.int64)])
        k = tf.raw_ops.RandomIndexShuffle(index=k, seed=key, max_index=tf.constant(n - 1, tf.int64))
      return augment(position, lookup(k))

    ds = tf.data.Dataset.range(int(start_step) * local_batch, tf.int64.max)
    ds = ds.map(fetch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    shard_size = source.shard_sizes(split, pc)[pi]
    if shard_size == 0:
      raise DataError(f"Split {split!r} has no examples for process {pi} of {pc}.")
    ds = source.make(split, pi, pc)
    buf = min(shuffle_buffer, shard_size) if shuffle_buffer > 0 else 1
    ds = ds.shuffle(buf, seed=int((seed * 1000003 + pi) & 0x7FFFFFFF), reshuffle_each_iteration=True)
    ds = ds.repeat()
    if r > 1:
      # Each image r times in a row (with different augmentation seeds, from the position).
      ds = ds.flat_map(lambda ex: tf.data.Dataset.from_tensors(ex).repeat(r))
    ds = ds.enumerate()
    if start_step:
      ds = ds.skip(int(start_step) * local_batch)
    ds = ds.map(lambda i, ex: augment(i * pc + pi, ex), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
  if skip_corrupt:
    ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  local_shards = max(num_shards // pc, 1)
  if not source.random_access and local_shards > 1:
    # Deal the batch's consecutive items round-robin over the local shards (devices).
    def deal(x):
      x = tf.reshape(x, tf.concat([[shard_batch, local_shards], tf.shape(x)[1:]], 0))
      x = tf.transpose(x, tf.concat([[1, 0], tf.range(2, tf.rank(x))], 0))
      return tf.reshape(x, tf.concat([[local_batch], tf.shape(x)[2:]], 0))
    ds = ds.map(lambda b: {k: deal(v) for k, v in b.items()})
  ds = ds.prefetch(prefetch).with_options(_options())
  # With a global order this process may read any example: search the whole split on error.
  it = _report_corrupt(ds, source, split, *((0, 1) if source.random_access else (pi, pc)),
                       skip_corrupt)
  return TrainInput(it, n, source.num_classes, ds)


def _report_corrupt(ds, source, split, pi, pc, skip_corrupt) -> Iterator[Dict[str, np.ndarray]]:
  tf = tf_host()
  it = iter(ds)
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:
      bad = source.find_corrupt(split, pi, pc)
      where = f": {bad}" if bad else ""
      raise DataError(
          f"Cannot decode an image in split {split!r}{where}. Remove or replace it, or set "
          f"dataset.skip_corrupt=True to skip undecodable images. ({str(e).splitlines()[0]})"
      ) from None
    except tf.errors.DataLossError as e:  # a truncated or corrupted record file
      raise DataError(
          f"A data file of split {split!r} is corrupt ({str(e).splitlines()[0]}). Re-create it "
          "(rerun the conversion or TFDS's download_and_prepare); skip_corrupt cannot skip a "
          "damaged record file.") from None
    yield {k: v.numpy() if hasattr(v, "numpy") else v for k, v in batch.items()}


@dataclasses.dataclass
class EvalInput:
  batches: Any  # re-iterable: yields process-local numpy batches with 'mask'
  num_examples: int
  num_batches: int


def make_eval(source: sources.Source, split: str, pp_spec: str, local_batch: int,
              skip_corrupt: bool = False, process_index: Optional[int] = None,
              process_count: Optional[int] = None) -> EvalInput:
  tf = tf_host()
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  pp = preprocess.parse(pp_spec)
  sizes = source.shard_sizes(split, pc)
  num_batches = max(1, math.ceil(max(sizes) / local_batch))
  seed = _seed_pair(0, pi)

  def process(ex):
    ex = pp(ex, tf.cast(seed, tf.int32))
    return {"image": ex["image"], "label": ex["label"], "mask": tf.constant(1, tf.int32)}

  ds = source.make(split, pi, pc).map(process, num_parallel_calls=tf.data.AUTOTUNE,
                                      deterministic=True)
  if skip_corrupt:
    ds = ds.ignore_errors(log_warning=True)
  pad = tf.data.Dataset.from_tensors(
      tf.nest.map_structure(lambda s: tf.zeros([d or 1 for d in s.shape], s.dtype),
                            ds.element_spec)).repeat()
  ds = ds.concatenate(pad).take(num_batches * local_batch).batch(local_batch)
  ds = ds.prefetch(2).with_options(_options())

  class _Batches:
    def __iter__(self_inner):
      return _report_corrupt(ds, source, split, pi, pc, skip_corrupt)

  return EvalInput(_Batches(), sum(sizes), num_batches)


def to_global(batch: Dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> Dict[str, jax.Array]:
  """Process-local numpy batch -> global ``jax.Array``s sharded along the batch axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def prefetch_to_device(iterator, sharding, size: int = 2):
  """Keeps ``size`` global batches in flight so that host->device copies overlap compute."""
  import collections
  import itertools
  queue = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(iterator, n):
      queue.append(to_global(batch, sharding))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
