"""Meta-Dataset episode sampling: which classes, how many shots and queries, which images.

Mirrors ``meta_dataset/data/sampling.py`` (google-research/meta-dataset) so that our episodes
follow the same distribution as the official pipeline and, for the same seeded
``np.random.RandomState``, are *identical* descriptions: every function below makes the same RNG
calls, in the same order, as the official function it names.

Three stages, all pure NumPy:

1. ``EpisodeDescriptionSampler.sample_episode_description()`` -> a description, a tuple of
   ``(class_id, num_support, num_query)`` with ``class_id`` relative to the split (0-based), as in
   the official sampler. ``sampler.class_set[class_id]`` is the dataset's absolute class id.
2. ``sample_episode_indices(description, images_per_class, rng)`` -> which images (indices within
   each class) form the support and query sets: distinct, support and query disjoint.
3. ``pad_episode(indices, max_support, max_query, max_ways)`` -> fixed-shape arrays plus masks, so
   one compiled step serves every episode (``sampler.max_episode_sizes()`` gives the bounds).

Dataset specs are used by duck typing, with the official ``dataset_spec.py`` API:

- every spec: ``get_classes(split)`` (contiguous absolute ids) and
  ``get_total_images_per_class(class_id[, pool=...])`` (or an ``images_per_class`` dict);
- bi-level (Omniglot): ``get_superclasses(split)``, ``classes_per_superclass`` and
  ``get_class_ids_from_superclass_subclass_inds(split, superclass_id, class_inds)`` returning
  ``(relative_ids, absolute_ids)``;
- hierarchical (ILSVRC): ``get_split_subgraph(split)`` -> a set of nodes with ``.children``,
  ``.wn_id`` (and ``.parents``), plus ``class_names_to_ids`` (or ``class_names``) mapping a
  leaf's ``wn_id`` to its absolute class id.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

# Official ``sampling.MAX_SPANNING_LEAVES_ELIGIBLE``: the smallest bound under which every ILSVRC
# leaf is reachable from some eligible internal node.
MAX_SPANNING_LEAVES_ELIGIBLE = 392

# Official module-level ``sampling.RNG``: seeds samplers built without ``episode_sampling_seed``.
RNG = np.random.RandomState(seed=None)

EpisodeDescription = Tuple[Tuple[int, int, int], ...]


@dataclasses.dataclass(frozen=True)
class EpisodeDescriptionConfig:
  """Official ``config.EpisodeDescriptionConfig`` with the gin defaults of
  ``learn/gin/setups/data_config_common.gin`` + ``variable_way_and_shot.gin``.

  ``num_ways``/``num_support``/``num_query`` = None means variable (sampled); ``num_support`` may
  also be an inclusive ``(low, high)`` range sampled uniformly once per episode.
  ``EpisodeDescriptionConfig.fixed(5, 5, 15)`` is ``fixed_way_and_shot.gin``.
  """
  num_ways: Optional[int] = None
  num_support: Optional[Union[int, Tuple[int, int]]] = None
  num_query: Optional[int] = None
  min_ways: Optional[int] = 5
  max_ways_upper_bound: Optional[int] = 50
  max_num_query: Optional[int] = 10
  max_support_set_size: Optional[int] = 500
  max_support_size_contrib_per_class: Optional[int] = 100
  min_log_weight: Optional[float] = math.log(0.5)
  max_log_weight: Optional[float] = math.log(2.0)
  ignore_dag_ontology: bool = False
  ignore_bilevel_ontology: bool = False
  min_examples_in_class: int = 0

  def __post_init__(self):
    # Same check as the official config: a variable quantity needs its bounds.
    groups = {
        "num_ways": (self.num_ways, ("min_ways", "max_ways_upper_bound")),
        "num_query": (self.num_query, ("max_num_query",)),
        "num_support": (self.num_support, ("max_support_set_size",
                                           "max_support_size_contrib_per_class",
                                           "min_log_weight", "max_log_weight")),
    }
    for name, (value, required) in groups.items():
      missing = [r for r in required if getattr(self, r) is None]
      if value is None and missing:
        raise ValueError(f"EpisodeDescriptionConfig: {missing} can not be None since {name} is "
                         f"None (variable); set them or fix {name}.")
    if isinstance(self.num_support, (tuple, list)):
      low, high = self.num_support
      if not 1 <= low <= high:
        raise ValueError(f"num_support range must satisfy 1 <= low <= high, got {self.num_support}")
    elif self.num_support is not None and self.num_support < 1:
      raise ValueError(f"num_support must be >= 1, got {self.num_support}")
    if self.num_ways is not None and self.num_ways < 1:
      raise ValueError(f"num_ways must be >= 1, got {self.num_ways}")
    if self.num_query is not None and self.num_query < 0:
      raise ValueError(f"num_query must be >= 0, got {self.num_query}")

  @classmethod
  def fixed(cls, num_ways: int = 5, num_support: int = 5, num_query: int = 15, **kwargs):
    """Fixed way/shot episodes (``fixed_way_and_shot.gin``: 5-way, 5-shot, 15 queries)."""
    return cls(num_ways=num_ways, num_support=num_support, num_query=num_query, **kwargs)


# ---------------------------------------------------------------------------------------------
# Building blocks (one per official function, same RNG calls in the same order).


def sample_num_ways_uniformly(num_classes: int, min_ways: int, max_ways: int,
                              rng: np.random.RandomState) -> int:
  """Official ``sample_num_ways_uniformly``: ``U{min_ways, ..., min(max_ways, num_classes)}``."""
  max_ways = min(max_ways, num_classes)
  return int(rng.randint(low=min_ways, high=max_ways + 1))


def sample_class_ids_uniformly(num_ways: int, rel_classes, rng: np.random.RandomState):
  """Official ``sample_class_ids_uniformly``: ``num_ways`` classes without replacement.

  ``rel_classes`` is a sequence of ids, or an int n meaning ``range(n)``.
  """
  return rng.choice(rel_classes, num_ways, replace=False)


def compute_num_query(images_per_class: np.ndarray, max_num_query: int,
                      num_support: Optional[Union[int, Tuple[int, int]]] = None) -> int:
  """Official ``compute_num_query``: the class-balanced number of queries per class.

  Variable support: ``min(max_num_query, min_c floor(n_c / 2))``. Fixed support s (or range
  ``(lo, s)``): ``min(max_num_query, min_c n_c - s)``.
  """
  images_per_class = np.asarray(images_per_class)
  if num_support is None:
    if images_per_class.min() < 2:
      raise ValueError("Expected at least 2 images per class.")
    return int(np.minimum(max_num_query, (images_per_class // 2).min()))
  max_support = num_support if isinstance(num_support, (int, np.integer)) else num_support[1]
  if (images_per_class - max_support).min() < 1:
    raise ValueError(f"Expected at least {max_support + 1} images per class.")
  return int(np.minimum(max_num_query, images_per_class.min() - max_support))


def sample_support_set_size(num_remaining_per_class: np.ndarray,
                            max_support_size_contrib_per_class: int,
                            max_support_set_size: int,
                            rng: np.random.RandomState) -> int:
  """Official ``sample_support_set_size``.

  ``beta ~ U[0, 1)``; ``S = min(sum_c floor(beta * min(contrib_cap, remaining_c) + 1), max)``.
  floor(. + 1) is a ceiling over beta in (0, 1], so every class contributes at least 1 and
  ``S >= ways``; it also never exceeds ``min(contrib_cap, remaining_c)`` per class.
  """
  num_remaining_per_class = np.asarray(num_remaining_per_class)
  if max_support_set_size < len(num_remaining_per_class):
    raise ValueError("max_support_set_size is too small to have at least one support example "
                     "per class.")
  beta = rng.uniform()
  contributions = np.minimum(max_support_size_contrib_per_class, num_remaining_per_class)
  return int(np.minimum(np.floor(beta * contributions + 1).sum(), max_support_set_size))


def sample_num_support_per_class(images_per_class: np.ndarray,
                                 num_remaining_per_class: np.ndarray,
                                 support_set_size: int,
                                 min_log_weight: float,
                                 max_log_weight: float,
                                 rng: np.random.RandomState) -> np.ndarray:
  """Official ``sample_num_support_per_class``: shots that loosely follow class frequencies.

  ``w_c = n_c * exp(u_c)``, ``u_c ~ U[min_log_weight, max_log_weight)`` (log-uniform weight per
  class); ``shots_c = min(floor(w_c / sum(w) * (S - ways)) + 1, remaining_c)``.
  """
  images_per_class = np.asarray(images_per_class)
  num_remaining_per_class = np.asarray(num_remaining_per_class)
  if support_set_size < len(num_remaining_per_class):
    raise ValueError("Requesting smaller support set than the number of ways.")
  if np.min(num_remaining_per_class) < 1:
    raise ValueError("Some classes have no remaining examples.")
  remaining_support_set_size = support_set_size - len(num_remaining_per_class)
  unnormalized = images_per_class * np.exp(
      rng.uniform(min_log_weight, max_log_weight, size=images_per_class.shape))
  proportions = unnormalized / unnormalized.sum()
  desired = np.floor(proportions * remaining_support_set_size).astype("int32") + 1
  return np.minimum(desired, num_remaining_per_class)


def get_leaves(nodes) -> list:
  """Official ``imagenet_specification.get_leaves``: the nodes without children."""
  return [n for n in nodes if not n.children]


def get_spanning_leaves(nodes) -> dict:
  """Official ``imagenet_specification.get_spanning_leaves``: node -> set of leaves it reaches.

  A leaf spans itself. Only leaves of ``nodes`` count (the split subgraph). Computed by one
  memoised post-order walk down ``.children`` (the official walks ``.parents`` from each leaf;
  the two agree on a consistent DAG).
  """
  nodes = list(nodes)
  leaf_set = set(get_leaves(nodes))
  spans: dict = {}
  for start in nodes:
    if start in spans:
      continue
    stack = [(start, False)]
    while stack:
      node, expanded = stack.pop()
      if node in spans:
        continue
      if expanded:
        span = {node} if node in leaf_set else set()
        for child in node.children:
          span |= spans.get(child, set())
        spans[node] = span
      else:
        stack.append((node, True))
        stack.extend((c, False) for c in node.children if c not in spans)
  return {n: spans[n] for n in nodes}


def _num_images(spec, class_id: int, pool: Optional[str]) -> int:
  """Images of an absolute class id, via ``get_total_images_per_class`` or ``images_per_class``."""
  if hasattr(spec, "get_total_images_per_class"):
    if pool is None:
      return int(spec.get_total_images_per_class(class_id))
    return int(spec.get_total_images_per_class(class_id, pool=pool))
  count = spec.images_per_class[class_id]
  if isinstance(count, Mapping):
    if pool is None:
      raise ValueError(f"Class {class_id} has example-level pools {sorted(count)}; pass pool=.")
    count = count[pool]
  return int(count)


def _class_names_to_ids(spec) -> Mapping:
  if getattr(spec, "class_names_to_ids", None) is not None:
    return spec.class_names_to_ids
  return {name: class_id for class_id, name in spec.class_names.items()}


# ---------------------------------------------------------------------------------------------
# The sampler.


class EpisodeDescriptionSampler:
  """Official ``sampling.EpisodeDescriptionSampler``: the composition of each episode.

  Args mirror the official constructor. ``episode_sampling_seed`` seeds the sampler's own
  ``RandomState``; None draws a seed from the module-level ``RNG`` (official behaviour).
  ``use_dag_hierarchy`` needs a hierarchical spec (ILSVRC), ``use_bilevel_hierarchy`` a bi-level
  one (Omniglot); ``ignore_hierarchy_probability`` is the fraction of episodes whose classes are
  sampled uniformly instead (0.5 for CrossTransformers training).
  """

  def __init__(self, dataset_spec, split, episode_descr_config: Optional[
      EpisodeDescriptionConfig] = None, pool: Optional[str] = None,
               use_dag_hierarchy: bool = False, use_bilevel_hierarchy: bool = False,
               use_all_classes: bool = False, ignore_hierarchy_probability: float = 0.0,
               episode_sampling_seed: Optional[int] = None):
    config = episode_descr_config or EpisodeDescriptionConfig()
    if episode_sampling_seed is None:
      episode_sampling_seed = RNG.randint(0, 2**32, size=None, dtype="uint32")
    self._rng = np.random.RandomState(seed=episode_sampling_seed)
    if not 0.0 <= ignore_hierarchy_probability <= 1.0:
      raise ValueError(f"ignore_hierarchy_probability must be in [0, 1], got "
                       f"{ignore_hierarchy_probability}")

    self.dataset_spec = dataset_spec
    self.split = split
    self.pool = pool
    self.config = config
    self.use_dag_hierarchy = use_dag_hierarchy and not config.ignore_dag_ontology
    self.use_bilevel_hierarchy = use_bilevel_hierarchy and not config.ignore_bilevel_ontology
    self.use_all_classes = use_all_classes
    self.ignore_hierarchy_probability = ignore_hierarchy_probability
    self.num_ways = config.num_ways
    self.num_support = config.num_support
    self.num_query = config.num_query
    self.min_ways = config.min_ways
    self.max_ways_upper_bound = config.max_ways_upper_bound
    self.max_num_query = config.max_num_query
    self.max_support_set_size = config.max_support_set_size
    self.max_support_size_contrib_per_class = config.max_support_size_contrib_per_class
    self.min_log_weight = config.min_log_weight
    self.max_log_weight = config.max_log_weight
    self.min_examples_in_class = config.min_examples_in_class

    self.class_set = dataset_spec.get_classes(split)
    self.num_classes = len(self.class_set)
    # Images per class, indexed by the split-relative class id (the official sampler asks the
    # spec on every episode; the counts are static, so ask once).
    self.images_per_class = np.array(
        [_num_images(dataset_spec, c, pool) for c in self.class_set], dtype=np.int64)
    keep = self.images_per_class >= self.min_examples_in_class
    skipped = [(self.class_set[i], int(n)) for i, n in enumerate(self.images_per_class)
               if not keep[i]]
    if skipped:
      logging.info("Skipping classes with fewer than %d examples: %s",
                   self.min_examples_in_class, skipped)
    # Filtered classes, relative to the split (official ``class_id - class_set[0]``).
    self._filtered_rel = [i for i in range(self.num_classes) if keep[i]]
    self.num_filtered_classes = len(self._filtered_rel)

    if self.min_ways and self.num_filtered_classes < self.min_ways:
      raise ValueError(
          f"min_ways is {self.min_ways} but split {split} of dataset "
          f"{getattr(dataset_spec, 'name', '?')} has only {self.num_filtered_classes} classes "
          f"with at least {self.min_examples_in_class} examples ({self.num_classes} in total); "
          "lower min_ways or min_examples_in_class.")
    if self.use_all_classes:
      if self.num_classes != self.num_filtered_classes:
        raise ValueError("use_all_classes is incompatible with a min_examples_in_class "
                         f"({self.min_examples_in_class}) that excludes some classes.")
      self.num_ways = self.num_classes
    if (self.num_ways is not None and not self.use_all_classes
        and self.num_ways > self.num_filtered_classes):
      raise ValueError(f"num_ways={self.num_ways} but split {split} has only "
                       f"{self.num_filtered_classes} usable classes.")

    if self.use_bilevel_hierarchy:
      self._init_bilevel()
    elif self.use_dag_hierarchy:
      self._init_dag()

  def _init_bilevel(self):
    """Official constructor, Omniglot branch: the eligible superclasses of the split."""
    spec = self.dataset_spec
    if self.num_ways is not None:
      raise ValueError("use_bilevel_hierarchy is incompatible with num_ways.")
    if self.min_examples_in_class > 0:
      raise ValueError("use_bilevel_hierarchy is incompatible with min_examples_in_class.")
    if self.use_dag_hierarchy:
      raise ValueError("use_bilevel_hierarchy is incompatible with use_dag_hierarchy.")
    if not hasattr(spec, "get_superclasses"):
      raise ValueError("use_bilevel_hierarchy needs a bi-level dataset spec (get_superclasses, "
                       "classes_per_superclass), e.g. Omniglot's.")
    self.superclass_set = []
    for i in spec.get_superclasses(self.split):
      if spec.classes_per_superclass[i] < self.min_ways:
        raise ValueError(f"Superclass {i} has {spec.classes_per_superclass[i]} classes < "
                         f"min_ways={self.min_ways}.")
      self.superclass_set.append(i)

  def _init_dag(self):
    """Official constructor, ImageNet branch: spanning leaves of each eligible internal node.

    Nodes and their leaves are sorted by ``wn_id`` for a deterministic order; a node is eligible
    if it spans between ``min_ways`` and ``MAX_SPANNING_LEAVES_ELIGIBLE`` usable leaves.
    """
    spec = self.dataset_spec
    if self.num_ways is not None:
      raise ValueError("use_dag_hierarchy is incompatible with num_ways.")
    if not hasattr(spec, "get_split_subgraph"):
      raise ValueError("use_dag_hierarchy needs a hierarchical dataset spec "
                       "(get_split_subgraph), e.g. ILSVRC's.")
    graph = spec.get_split_subgraph(self.split)
    abs_to_rel = {abs_id: i for i, abs_id in enumerate(self.class_set)}
    names_to_ids = _class_names_to_ids(spec)
    filtered = {self.class_set[i] for i in self._filtered_rel}
    leaves = set(get_leaves(graph))
    internal_nodes = [n for n in graph if n not in leaves]
    spanning = get_spanning_leaves(graph)
    self.span_leaves_rel = []
    for node in sorted(internal_nodes, key=lambda n: n.wn_id):
      ids_rel = []
      for leaf in sorted(spanning[node], key=lambda n: n.wn_id):
        abs_id = names_to_ids[leaf.wn_id]
        if abs_id in filtered:
          ids_rel.append(abs_to_rel[abs_id])
      if self.min_ways <= len(ids_rel) <= MAX_SPANNING_LEAVES_ELIGIBLE:
        self.span_leaves_rel.append(ids_rel)
    if not self.span_leaves_rel:
      raise ValueError("No internal node of the hierarchy spans between min_ways="
                       f"{self.min_ways} and {MAX_SPANNING_LEAVES_ELIGIBLE} usable classes; "
                       "lower min_ways.")

  def _use_hierarchy(self) -> bool:
    """The official coin ``rng.choice([True, False], p=[1 - p_ignore, p_ignore])``."""
    prob = [1.0, 0.0]
    if self.ignore_hierarchy_probability:
      prob = [1.0 - self.ignore_hierarchy_probability, self.ignore_hierarchy_probability]
    return bool(self._rng.choice([True, False], p=prob))

  def sample_class_ids(self) -> np.ndarray:
    """Official ``sample_class_ids``: the split-relative class ids of one episode."""
    rng = self._rng
    if self.use_dag_hierarchy and self._use_hierarchy():
      # A uniformly chosen eligible node (the official ``rng.choice(span_leaves_rel)`` draws
      # exactly this ``randint``), its leaves subsampled to max_ways_upper_bound if needed.
      classes = np.asarray(self.span_leaves_rel[rng.randint(0, len(self.span_leaves_rel))])
      if len(classes) > self.max_ways_upper_bound:
        classes = rng.choice(classes, size=[self.max_ways_upper_bound], replace=False)
      assert self.min_ways <= len(classes) <= self.max_ways_upper_bound
      return classes
    if self.use_bilevel_hierarchy and self._use_hierarchy():
      # An alphabet uniformly, then U{min_ways, min(max_ways, #characters)} of its characters.
      superclass = rng.choice(self.superclass_set, 1)[0]
      num_superclass_classes = self.dataset_spec.classes_per_superclass[superclass]
      num_ways = sample_num_ways_uniformly(num_superclass_classes, self.min_ways,
                                           self.max_ways_upper_bound, rng)
      subclass_inds = sample_class_ids_uniformly(num_ways, num_superclass_classes, rng)
      rel_ids, _ = self.dataset_spec.get_class_ids_from_superclass_subclass_inds(
          self.split, superclass, subclass_inds)
      return np.asarray(rel_ids)
    if self.use_all_classes:
      return np.arange(self.num_classes)
    if self.num_ways is not None:
      num_ways = self.num_ways
    else:
      num_ways = sample_num_ways_uniformly(self.num_filtered_classes, self.min_ways,
                                           self.max_ways_upper_bound, rng)
    return sample_class_ids_uniformly(num_ways, self._filtered_rel, rng)

  def reseed(self, seed: int) -> None:
    """Restarts the sampler's RandomState from ``seed``: the next description is then a
    function of ``seed`` alone (how the pipeline makes episode t depend on (seed, t) only)."""
    self._rng = np.random.RandomState(seed=seed)

  def sample_episode_description(self) -> EpisodeDescription:
    """Official ``sample_episode_description``: ``((class_id, num_support, num_query), ...)``.

    ``class_id`` is relative to the split, in sampling order (the order the official pipeline
    gives labels 0..ways-1).
    """
    class_ids = self.sample_class_ids()
    images_per_class = self.images_per_class[np.asarray(class_ids, dtype=np.int64)]
    if self.num_query is not None:
      num_query = self.num_query
    else:
      num_query = compute_num_query(images_per_class, self.max_num_query, self.num_support)

    if self.num_support is not None:
      if isinstance(self.num_support, (int, np.integer)):
        if np.any(self.num_support + num_query > images_per_class):
          raise ValueError(f"Some classes have fewer than num_support + num_query = "
                           f"{self.num_support + num_query} examples.")
        num_support = self.num_support
      else:
        start, end = self.num_support
        if np.any(end + num_query > images_per_class):
          raise ValueError(f"num_support range {self.num_support} is not valid: some classes "
                           f"have fewer than {end + num_query} examples.")
        num_support = self._rng.randint(low=start, high=end + 1)
      num_support_per_class = [num_support] * len(class_ids)
    else:
      num_remaining = images_per_class - num_query
      support_set_size = sample_support_set_size(
          num_remaining, self.max_support_size_contrib_per_class, self.max_support_set_size,
          self._rng)
      num_support_per_class = sample_num_support_per_class(
          images_per_class, num_remaining, support_set_size, self.min_log_weight,
          self.max_log_weight, self._rng)
    return tuple((int(c), int(s), int(num_query))
                 for c, s in zip(class_ids, num_support_per_class))

  def to_absolute(self, description: EpisodeDescription) -> EpisodeDescription:
    """The description with dataset (absolute) class ids, ``class_set[relative_id]``: the ids
    that ``spec.get_total_images_per_class`` and the per-class record files use."""
    return tuple((int(self.class_set[c]), s, q) for c, s, q in description)

  def compute_chunk_sizes(self) -> Tuple[int, int, int]:
    """Official ``compute_chunk_sizes``: worst-case (flush, support, query) sizes."""
    max_ways, support, query = self.max_episode_sizes()
    return support + query, support, query

  def max_episode_sizes(self) -> Tuple[int, int, int]:
    """``(max_ways, max_support, max_query)``: the static shapes for ``pad_episode``.

    Variable: ``(max_ways_upper_bound, max_support_set_size, max_ways * max_num_query)``, i.e.
    (50, 500, 500) with the defaults; fixed: ``(N, N * shots, N * queries)``.
    """
    max_ways = self.max_ways_upper_bound if self.num_ways is None else self.num_ways
    if self.num_support is None:
      support = self.max_support_set_size
    elif isinstance(self.num_support, (int, np.integer)):
      support = max_ways * self.num_support
    else:
      support = max_ways * self.num_support[1]
    query = max_ways * (self.max_num_query if self.num_query is None else self.num_query)
    return int(max_ways), int(support), int(query)


# ---------------------------------------------------------------------------------------------
# Images of an episode, and static shapes.


class EpisodeIndices(NamedTuple):
  """The images of one episode. Each entry is a 1-D int64 array; sets are ordered class by class,
  in description order. ``*_images`` index within the class (0 <= i < images of that class)."""
  support_classes: np.ndarray
  support_images: np.ndarray
  query_classes: np.ndarray
  query_images: np.ndarray


def sample_episode_indices(description: Sequence[Tuple[int, int, int]], images_per_class,
                           rng) -> EpisodeIndices:
  """Picks, per class, ``num_support + num_query`` distinct images: first ``num_support`` go to
  the support set, the rest to the query set (disjoint, no image twice in an episode).

  Plays the role of the official reader's per-class shuffled streams plus "flush" (which also
  guarantee no repeat within an episode), as independent draws without replacement.

  Args:
    description: ``((class_id, num_support, num_query), ...)``.
    images_per_class: class_id -> number of images (sequence, array, mapping or callable), e.g.
      ``sampler.images_per_class``.
    rng: ``np.random.RandomState`` or ``np.random.Generator``.
  """
  parts = ([], [], [], [])
  for class_id, num_support, num_query in description:
    if callable(images_per_class):
      n = int(images_per_class(class_id))
    else:
      n = int(images_per_class[class_id])
    if num_support < 0 or num_query < 0 or num_support + num_query > n:
      raise ValueError(f"Class {class_id} has {n} images; cannot take {num_support} support + "
                       f"{num_query} query images without repeats.")
    picked = np.asarray(rng.permutation(n)[:num_support + num_query], dtype=np.int64)
    parts[0].append(np.full(num_support, class_id, np.int64))
    parts[1].append(picked[:num_support])
    parts[2].append(np.full(num_query, class_id, np.int64))
    parts[3].append(picked[num_support:])
  cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0,), np.int64)
  return EpisodeIndices(*(cat(p) for p in parts))


def pad_episode(indices: EpisodeIndices, max_support: int, max_query: int,
                max_ways: int) -> dict[str, Any]:
  """Pads an episode to static shapes so one compiled step serves every episode.

  Labels are 0..ways-1 in order of first appearance in the support set, i.e. description order
  (the official pipeline's ``tf.unique`` over the class-by-class support chunk).

  Returns a dict of NumPy arrays (S = max_support, Q = max_query, N = max_ways):
    support_classes, support_images: int32 [S], the dataset class id / index within class, -1
      in padding;
    support_labels: int32 [S], episode label in [0, ways), 0 in padding (safe to gather);
    support_mask: bool [S], True for real examples (they come first);
    query_classes, query_images, query_labels, query_mask: the same, [Q];
    class_ids: int32 [N], the class id of each label, -1 in padding;
    class_mask: bool [N], True for the first ``ways`` entries;
    num_classes: int32 [], the number of ways.
  """
  classes, first = np.unique(indices.support_classes, return_index=True)
  order = classes[np.argsort(first)]
  label_of = {int(c): i for i, c in enumerate(order)}
  missing = set(np.unique(indices.query_classes).tolist()) - set(label_of)
  if missing:
    raise ValueError(f"Query classes {sorted(missing)} have no support example.")
  ways, n_support, n_query = len(order), len(indices.support_classes), len(
      indices.query_classes)
  for what, size, bound in (("ways", ways, max_ways), ("support images", n_support, max_support),
                            ("query images", n_query, max_query)):
    if size > bound:
      raise ValueError(f"Episode has {size} {what}, more than the padded size {bound}; use "
                       "sampler.max_episode_sizes() for the bounds.")

  def pad(values, size, fill):
    out = np.full((size,), fill, np.int32)
    out[:len(values)] = values
    return out

  def labels(cls):
    return np.array([label_of[int(c)] for c in cls], np.int32)

  return {
      "support_classes": pad(indices.support_classes, max_support, -1),
      "support_images": pad(indices.support_images, max_support, -1),
      "support_labels": pad(labels(indices.support_classes), max_support, 0),
      "support_mask": np.arange(max_support) < n_support,
      "query_classes": pad(indices.query_classes, max_query, -1),
      "query_images": pad(indices.query_images, max_query, -1),
      "query_labels": pad(labels(indices.query_classes), max_query, 0),
      "query_mask": np.arange(max_query) < n_query,
      "class_ids": pad(order, max_ways, -1),
      "class_mask": np.arange(max_ways) < ways,
      "num_classes": np.int32(ways),
  }
