"""Tests for visrep_jax.data.episodes (Meta-Dataset episode sampler) on tiny fake dataset specs.

The fake specs implement the official ``dataset_spec.py`` API (flat, bi-level, hierarchical).
Statistical checks use fixed seeds and thresholds computed from the test's own significance
level (ALPHA), not tuned to the observed values; each has a negative control showing that the
same check rejects a wrong distribution.
"""

import math

import numpy as np
import pytest
from scipy import stats

from visrep_jax.data import episodes
from visrep_jax.data.episodes import (EpisodeDescriptionConfig, EpisodeDescriptionSampler,
                                      EpisodeIndices, pad_episode, sample_episode_indices)

ALPHA = 1e-3  # significance level of every statistical test below
SPLITS = ("train", "valid", "test")


# ---------------------------------------------------------------------------------------------
# Fake dataset specs (official dataset_spec.py API, duck-typed).


class FlatSpec:
  """DatasetSpecification: contiguous class ids train | valid | test."""

  def __init__(self, images_per_split):
    self.name = "flat"
    self.classes_per_split = {s: len(images_per_split.get(s, ())) for s in SPLITS}
    self.images_per_class = {}
    for split in SPLITS:
      for n in images_per_split.get(split, ()):
        self.images_per_class[len(self.images_per_class)] = int(n)

  def get_classes(self, split):
    offset = sum(self.classes_per_split[s] for s in SPLITS[:SPLITS.index(split)])
    return range(offset, offset + self.classes_per_split[split])

  def get_total_images_per_class(self, class_id=None, pool=None):
    return self.images_per_class[class_id]


class BiLevelSpec:
  """BiLevelDatasetSpecification: superclasses (alphabets) own contiguous runs of classes."""

  def __init__(self, superclass_sizes_per_split, images_fn):
    self.name = "bilevel"
    self.superclasses_per_split = {s: len(superclass_sizes_per_split.get(s, ())) for s in SPLITS}
    sizes = [k for s in SPLITS for k in superclass_sizes_per_split.get(s, ())]
    self.classes_per_superclass = dict(enumerate(sizes))
    self.images_per_class = {c: images_fn(c) for c in range(sum(sizes))}

  def get_superclasses(self, split):
    offset = sum(self.superclasses_per_split[s] for s in SPLITS[:SPLITS.index(split)])
    return range(offset, offset + self.superclasses_per_split[split])

  def _offset(self, split):
    first = self.get_superclasses(split)[0] if self.superclasses_per_split[split] else 0
    return sum(self.classes_per_superclass[i] for i in range(first))

  def get_classes(self, split):
    n = sum(self.classes_per_superclass[i] for i in self.get_superclasses(split))
    return range(self._offset(split), self._offset(split) + n)

  def get_total_images_per_class(self, class_id=None, pool=None):
    return self.images_per_class[class_id]

  def get_class_ids_from_superclass_subclass_inds(self, split, superclass_id, class_inds):
    start = sum(self.classes_per_superclass[i] for i in range(superclass_id))
    abs_ids = [start + int(i) for i in class_inds]
    return [c - self._offset(split) for c in abs_ids], abs_ids

  def superclass_of_rel(self, split, rel_id):
    abs_id = self._offset(split) + rel_id
    start = 0
    for sc, k in self.classes_per_superclass.items():
      if start <= abs_id < start + k:
        return sc
      start += k
    raise KeyError(rel_id)


class Node:
  """imagenet_specification.Synset stand-in (identity hash, like the official)."""

  def __init__(self, wn_id):
    self.wn_id = wn_id
    self.children = set()
    self.parents = set()

  def __repr__(self):
    return self.wn_id


def _link(parent, child):
  parent.children.add(child)
  child.parents.add(parent)


class HierSpec:
  """HierarchicalDatasetSpecification with one train-split DAG (a few leaves per other split).

  Train DAG: root -> X (L00-L09), Y -> {Y1 (L09-L15; L09 shared with X), Y2 (L16-L21)},
  Z -> {T (L22-L24), L25-L28}, W (L29-L88). Eligible (5..392 leaves): X 10, Y 13, Y1 7, Y2 6,
  Z 7, W 60, root 89; T (3 leaves) is not.
  """
  HIER_WAYS = (6, 7, 10, 13, 50)  # possible ways when the hierarchy is used

  def __init__(self):
    self.name = "hier"
    nodes = {}

    def node(name):
      return nodes.setdefault(name, Node(name))

    leaf = lambda i: node(f"n{i:03d}")
    for name, kids in (("root", ["x", "y", "z", "w"]), ("y", ["y1", "y2"]), ("z", ["t"])):
      for k in kids:
        _link(node(name), node(k))
    for parent, leaves in (("x", range(0, 10)), ("y1", range(9, 16)), ("y2", range(16, 22)),
                           ("t", range(22, 25)), ("z", range(25, 29)), ("w", range(29, 89))):
      for i in leaves:
        _link(node(parent), leaf(i))
    train = set(nodes.values())
    self.spans_by_name = {"x": 10, "y": 13, "y1": 7, "y2": 6, "z": 7, "w": 60, "root": 89, "t": 3}
    # Tiny valid/test graphs (one internal node each).
    valid_root, test_root = Node("vroot"), Node("troot")
    for i in range(89, 95):
      _link(valid_root, Node(f"n{i:03d}"))
    for i in range(95, 101):
      _link(test_root, Node(f"n{i:03d}"))
    self.split_subgraphs = {"train": train, "valid": {valid_root, *valid_root.children},
                            "test": {test_root, *test_root.children}}
    leaf_names = sorted(n.wn_id for g in self.split_subgraphs.values() for n in g
                        if not n.children)
    self.class_names = dict(enumerate(leaf_names))
    self.class_names_to_ids = {v: k for k, v in self.class_names.items()}
    self.images_per_class = {c: 20 + (37 * c) % 250 for c in self.class_names}
    self.nodes = nodes

  def get_split_subgraph(self, split):
    return self.split_subgraphs[split]

  def get_classes(self, split):
    counts = [sum(1 for n in self.split_subgraphs[s] if not n.children) for s in SPLITS]
    offset = sum(counts[:SPLITS.index(split)])
    return range(offset, offset + counts[SPLITS.index(split)])

  def get_total_images_per_class(self, class_id=None, pool=None):
    return self.images_per_class[class_id]


def _flat_sizes(num_classes, seed=0, low=2, high=1300):
  return np.random.RandomState(seed).randint(low, high, size=num_classes).tolist()


# 105 classes of 2..1299 images plus 15 small ones (2..16), so the query cap min(10, n // 2) and
# the remaining-images cap on shots are both exercised.
FLAT = FlatSpec({"train": _flat_sizes(105) + list(range(2, 17)),
                 "valid": _flat_sizes(20, seed=1, low=30), "test": [30] * 8})


def _sample(sampler, n):
  return [sampler.sample_episode_description() for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Literal re-statement of the official sample_episode_description (for parity).


def _reference_spans(spec, split, min_ways, filtered_abs):
  """Official DAG branch: internal nodes sorted by wn_id, leaves found by walking parents."""
  graph = spec.get_split_subgraph(split)
  class_set = spec.get_classes(split)
  leaves = [n for n in graph if not n.children]

  def is_descendent(d, a):
    frontier, seen = [d], set()
    while frontier:
      n = frontier.pop()
      if n is a:
        return True
      for p in n.parents:
        if p not in seen:
          seen.add(p)
          frontier.append(p)
    return False

  spans = []
  for node in sorted((n for n in graph if n.children), key=lambda n: n.wn_id):
    node_leaves = sorted((l for l in leaves if is_descendent(l, node)), key=lambda n: n.wn_id)
    ids_rel = [spec.class_names_to_ids[l.wn_id] - class_set[0] for l in node_leaves
               if spec.class_names_to_ids[l.wn_id] in filtered_abs]
    if min_ways <= len(ids_rel) <= 392:
      spans.append(ids_rel)
  return spans


def _reference_descriptions(spec, split, n, seed, num_ways=None, num_support=None,
                            num_query=None, min_ways=5, max_ways=50, max_num_query=10,
                            max_support=500, contrib=100, min_lw=math.log(0.5),
                            max_lw=math.log(2), dag=False, bilevel=False, p_ignore=0.0,
                            min_examples=0):
  rng = np.random.RandomState(seed)
  class_set = spec.get_classes(split)
  filtered = [c for c in class_set if spec.get_total_images_per_class(c) >= min_examples]
  if dag:
    spans = _reference_spans(spec, split, min_ways, set(filtered))
    span_array = np.empty(len(spans), dtype=object)
    for i, s in enumerate(spans):
      span_array[i] = s
  out = []
  for _ in range(n):
    prob = [1.0 - p_ignore, p_ignore] if p_ignore else [1.0, 0.0]
    if dag and rng.choice([True, False], p=prob):
      ep = rng.choice(span_array)  # the official draws from the ragged list itself
      if len(ep) > max_ways:
        ep = rng.choice(ep, size=[max_ways], replace=False)
    elif bilevel and rng.choice([True, False], p=prob):
      superclass = rng.choice(list(spec.get_superclasses(split)), 1)[0]
      k = spec.classes_per_superclass[superclass]
      ways = rng.randint(low=min_ways, high=min(max_ways, k) + 1)
      inds = rng.choice(k, ways, replace=False)
      ep, _ = spec.get_class_ids_from_superclass_subclass_inds(split, superclass, inds)
    else:
      ways = num_ways if num_ways is not None else rng.randint(
          low=min_ways, high=min(max_ways, len(filtered)) + 1)
      ep = rng.choice([c - class_set[0] for c in filtered], ways, replace=False)
    n_img = np.array([spec.get_total_images_per_class(class_set[c]) for c in ep])
    if num_query is not None:
      q = num_query
    elif num_support is None:
      q = np.minimum(max_num_query, (n_img // 2).min())
    else:
      q = np.minimum(max_num_query,
                     n_img.min() - (num_support if isinstance(num_support, int)
                                    else num_support[1]))
    if num_support is not None:
      shots = [num_support if isinstance(num_support, int) else
               rng.randint(low=num_support[0], high=num_support[1] + 1)] * len(ep)
    else:
      remaining = n_img - q
      beta = rng.uniform()
      size = np.minimum(np.floor(beta * np.minimum(contrib, remaining) + 1).sum(), max_support)
      weights = n_img * np.exp(rng.uniform(min_lw, max_lw, size=n_img.shape))
      shots = np.minimum(np.floor(weights / weights.sum() * (size - len(remaining)))
                         .astype("int32") + 1, remaining)
    out.append(tuple((int(c), int(s), int(q)) for c, s in zip(ep, shots)))
  return out


BILEVEL = BiLevelSpec({"train": [5, 8, 20, 60, 12], "valid": [6, 7], "test": [9, 5, 30]},
                      images_fn=lambda c: 20 + (c * 7) % 13)

PARITY_CASES = [
    ("flat_variable", FLAT, "train", {}, {}),
    ("flat_valid", FLAT, "valid", {}, {}),
    ("flat_fixed_5w1s", FLAT, "test", dict(num_ways=5, num_support=1, num_query=15), {}),
    ("flat_fixed_query", FLAT, "train", dict(num_query=1), {}),
    ("flat_support_range", FlatSpec({"train": [40] * 12}), "train",
     dict(num_support=(2, 6)), {}),
    ("flat_min_examples", FLAT, "train", dict(min_examples_in_class=400), {}),
    ("dag", HierSpec(), "train", {}, dict(use_dag_hierarchy=True,
                                          ignore_hierarchy_probability=0.5)),
    ("dag_strict", HierSpec(), "train", {}, dict(use_dag_hierarchy=True)),
    ("bilevel", BILEVEL, "train", {}, dict(use_bilevel_hierarchy=True,
                                           ignore_hierarchy_probability=0.3)),
    ("bilevel_test", BILEVEL, "test", {}, dict(use_bilevel_hierarchy=True)),
]


@pytest.mark.parametrize("name,spec,split,cfg,kwargs", PARITY_CASES,
                         ids=[c[0] for c in PARITY_CASES])
def test_matches_literal_official_algorithm(name, spec, split, cfg, kwargs):
  ref_kwargs = dict(num_ways=cfg.get("num_ways"), num_support=cfg.get("num_support"),
                    num_query=cfg.get("num_query"),
                    min_examples=cfg.get("min_examples_in_class", 0),
                    dag=kwargs.get("use_dag_hierarchy", False),
                    bilevel=kwargs.get("use_bilevel_hierarchy", False),
                    p_ignore=kwargs.get("ignore_hierarchy_probability", 0.0))
  for seed in (0, 1, 12345):
    sampler = EpisodeDescriptionSampler(spec, split, EpisodeDescriptionConfig(**cfg),
                                        episode_sampling_seed=seed, **kwargs)
    ours = _sample(sampler, 150)
    assert ours == _reference_descriptions(spec, split, 150, seed, **ref_kwargs), (name, seed)


# ---------------------------------------------------------------------------------------------
# Variable way / shot: every bound over thousands of episodes.


def test_variable_episode_bounds():
  sampler = EpisodeDescriptionSampler(FLAT, "train", episode_sampling_seed=3)
  images = sampler.images_per_class
  ways_seen, query_seen, support_sizes = set(), set(), []
  for description in _sample(sampler, 3000):
    ids = np.array([c for c, _, _ in description])
    shots = np.array([s for _, s, _ in description])
    queries = np.array([q for _, _, q in description])
    n = images[ids]
    ways = len(description)
    assert 5 <= ways <= min(50, len(images))
    assert len(set(ids.tolist())) == ways and ids.min() >= 0 and ids.max() < len(images)
    # Class-balanced query set, <= 10, half of the smallest class (official formula).
    assert (queries == queries[0]).all()
    assert 1 <= queries[0] <= 10
    assert queries[0] == min(10, n.min() // 2)
    # Support: >= 1 shot, never more than what the query set leaves, total <= 500 and <= the
    # sum of per-class contributions min(100, remaining).
    remaining = n - queries[0]
    assert (shots >= 1).all() and (shots <= remaining).all()
    assert ways <= shots.sum() <= 500
    assert shots.sum() <= np.minimum(100, remaining).sum()
    ways_seen.add(ways)
    query_seen.add(int(queries[0]))
    support_sizes.append(shots.sum())
  # The bounds are actually reached, not just respected.
  assert {5, 50} <= ways_seen
  assert 10 in query_seen and min(query_seen) < 10
  assert max(support_sizes) > 450 and min(support_sizes) < 50


def _uniform_pvalue(values, low, high):
  counts = np.bincount(np.asarray(values) - low, minlength=high - low + 1)
  if len(counts) != high - low + 1:  # values outside [low, high]
    return 0.0
  return stats.chisquare(counts).pvalue


@pytest.mark.parametrize("num_classes,high", [(120, 50), (20, 20)])
def test_ways_uniform(num_classes, high):
  spec = FlatSpec({"train": [40] * num_classes})
  sampler = EpisodeDescriptionSampler(spec, "train", episode_sampling_seed=7)
  ways = [len(d) for d in _sample(sampler, 100 * (high - 4))]
  assert min(ways) >= 5 and max(ways) <= high
  assert _uniform_pvalue(ways, 5, high) > ALPHA
  # Negative controls: the same check rejects an off-by-one range and a tilted distribution.
  rng = np.random.RandomState(0)
  assert _uniform_pvalue(rng.randint(5, high, size=len(ways)), 5, high) < ALPHA
  tilted = np.minimum(rng.randint(5, high + 1, size=len(ways)),
                      rng.randint(5, high + 1, size=len(ways)))
  assert _uniform_pvalue(tilted, 5, high) < ALPHA


def test_classes_sampled_uniformly():
  spec = FlatSpec({"train": [40] * 30})
  sampler = EpisodeDescriptionSampler(spec, "train", episode_sampling_seed=11)
  counts = np.zeros(30)
  for d in _sample(sampler, 3000):
    for c, _, _ in d:
      counts[c] += 1
  assert stats.chisquare(counts).pvalue > ALPHA


def _log_ratio_samples(images, n, seed):
  """log(shots_1 / shots_0) - log(n_1 / n_0) for two classes, with a huge support set so that
  floor() is negligible: it equals u_1 - u_0 with u_c ~ U[log .5, log 2) (up to 1e-5)."""
  rng = np.random.RandomState(seed)
  big = 10**7
  images = np.asarray(images)
  out = []
  for _ in range(n):
    shots = episodes.sample_num_support_per_class(
        images, np.array([big, big]), big + 2, math.log(0.5), math.log(2.0), rng)
    out.append(math.log(shots[1] / shots[0]) - math.log(images[1] / images[0]))
  return np.array(out)


@pytest.mark.parametrize("images", [(1000, 1000), (300, 1200)])
def test_class_weights_log_uniform(images):
  # u_1 - u_0 of two iid U(-L, L), L = log 2, is triangular on [-2L, 2L] with mode 0.
  span = 2 * math.log(2.0)
  diffs = _log_ratio_samples(images, 2000, seed=5)
  assert np.abs(diffs).max() <= span + 1e-4
  triangular = stats.triang(c=0.5, loc=-span, scale=2 * span)
  assert stats.kstest(diffs, triangular.cdf).pvalue > ALPHA
  # Negative control: log-weights uniform on a wider range (log 1/3, log 3) are rejected.
  wide = 2 * math.log(3.0)
  wrong = stats.triang(c=0.5, loc=-wide, scale=2 * wide)
  assert stats.kstest(diffs, wrong.cdf).pvalue < ALPHA


def test_support_set_size_formula():
  # beta*contrib + 1 floored: each class contributes between 1 and min(100, remaining).
  rng = np.random.RandomState(0)
  remaining = np.array([1, 5, 99, 100, 250, 1000])
  sizes = [episodes.sample_support_set_size(remaining, 100, 500, rng) for _ in range(2000)]
  cap = np.minimum(100, remaining).sum()
  assert min(sizes) >= len(remaining) and max(sizes) <= cap
  assert min(sizes) <= len(remaining) + 3 and max(sizes) >= cap - 3
  assert max(episodes.sample_support_set_size(np.full(50, 1000), 100, 500, rng)
             for _ in range(100)) == 500
  with pytest.raises(ValueError):
    episodes.sample_support_set_size(np.full(6, 10), 100, 5, rng)


def test_compute_num_query():
  assert episodes.compute_num_query(np.array([30, 45, 35, 50]), 10) == 10
  assert episodes.compute_num_query(np.array([10, 9, 20, 21]), 10) == 4
  assert episodes.compute_num_query(np.array([30, 40]), 10, num_support=25) == 5
  assert episodes.compute_num_query(np.array([30, 40]), 10, num_support=(1, 22)) == 8
  with pytest.raises(ValueError):
    episodes.compute_num_query(np.array([1, 3, 8]), 10)


# ---------------------------------------------------------------------------------------------
# Fixed way / shot, options and errors.


@pytest.mark.parametrize("shots", [1, 5])
def test_fixed_way_shot(shots):
  config = EpisodeDescriptionConfig.fixed(num_ways=5, num_support=shots, num_query=15)
  sampler = EpisodeDescriptionSampler(FLAT, "valid", config, episode_sampling_seed=0)
  for d in _sample(sampler, 300):
    assert len(d) == 5 and len({c for c, _, _ in d}) == 5
    assert all(s == shots and q == 15 for _, s, q in d)
  assert sampler.max_episode_sizes() == (5, 5 * shots, 75)
  assert sampler.compute_chunk_sizes() == (5 * shots + 75, 5 * shots, 75)


def test_fixed_mode_errors():
  # 8 test classes of 30 images: 20 + 15 > 30.
  sampler = EpisodeDescriptionSampler(
      FLAT, "test", EpisodeDescriptionConfig.fixed(5, 20, 15), episode_sampling_seed=0)
  with pytest.raises(ValueError, match="fewer than"):
    sampler.sample_episode_description()
  with pytest.raises(ValueError, match="num_ways=12"):
    EpisodeDescriptionSampler(FLAT, "test", EpisodeDescriptionConfig.fixed(12, 1, 1))
  with pytest.raises(ValueError, match="can not be None"):
    EpisodeDescriptionConfig(min_ways=None)
  with pytest.raises(ValueError, match="num_ways"):
    EpisodeDescriptionSampler(HierSpec(), "train", EpisodeDescriptionConfig.fixed(),
                              use_dag_hierarchy=True)


def test_support_range():
  spec = FlatSpec({"train": [40] * 12})
  config = EpisodeDescriptionConfig(num_support=(2, 6))
  sampler = EpisodeDescriptionSampler(spec, "train", config, episode_sampling_seed=0)
  seen = set()
  for d in _sample(sampler, 500):
    shots = {s for _, s, _ in d}
    assert len(shots) == 1 and 2 <= min(shots) <= 6
    assert {q for _, _, q in d} == {10}
    seen |= shots
  assert seen == {2, 3, 4, 5, 6}
  assert sampler.max_episode_sizes() == (50, 300, 500)


def test_min_examples_in_class():
  config = EpisodeDescriptionConfig(min_examples_in_class=400)
  sampler = EpisodeDescriptionSampler(FLAT, "train", config, episode_sampling_seed=0)
  allowed = set(np.flatnonzero(sampler.images_per_class >= 400).tolist())
  assert 5 <= len(allowed) < 120
  used = set()
  for d in _sample(sampler, 500):
    ids = {c for c, _, _ in d}
    assert ids <= allowed and len(d) <= min(50, len(allowed))
    used |= ids
  assert used == allowed
  with pytest.raises(ValueError, match="min_ways"):
    EpisodeDescriptionSampler(FLAT, "test", EpisodeDescriptionConfig(min_examples_in_class=31))


def test_to_absolute_class_ids():
  sampler = EpisodeDescriptionSampler(FLAT, "valid", episode_sampling_seed=0)
  for d in _sample(sampler, 50):
    absolute = sampler.to_absolute(d)
    assert [c for c, _, _ in absolute] == [c + 120 for c, _, _ in d]  # valid follows 120 train
    assert [(s, q) for _, s, q in absolute] == [(s, q) for _, s, q in d]
    assert all(FLAT.get_total_images_per_class(a) == sampler.images_per_class[r]
               for (a, _, _), (r, _, _) in zip(absolute, d))


def test_use_all_classes():
  sampler = EpisodeDescriptionSampler(FLAT, "valid", use_all_classes=True,
                                      episode_sampling_seed=0)
  for d in _sample(sampler, 20):
    assert [c for c, _, _ in d] == list(range(20))


def test_deterministic_for_seed(monkeypatch):
  make = lambda seed: EpisodeDescriptionSampler(FLAT, "train", episode_sampling_seed=seed)
  assert _sample(make(42), 50) == _sample(make(42), 50)
  assert _sample(make(42), 50) != _sample(make(43), 50)
  # Without a seed, the module-level RNG seeds the sampler (official behaviour).
  monkeypatch.setattr(episodes, "RNG", np.random.RandomState(2018))
  first = _sample(make(None), 20)
  monkeypatch.setattr(episodes, "RNG", np.random.RandomState(2018))
  assert _sample(make(None), 20) == first


# ---------------------------------------------------------------------------------------------
# Hierarchies.


def test_spanning_leaves():
  spec = HierSpec()
  spans = episodes.get_spanning_leaves(spec.get_split_subgraph("train"))
  for name, count in spec.spans_by_name.items():
    assert len(spans[spec.nodes[name]]) == count, name
  assert {l.wn_id for l in spans[spec.nodes["y1"]]} == {f"n{i:03d}" for i in range(9, 16)}
  leaf = spec.nodes["n009"]
  assert spans[leaf] == {leaf}
  assert len(episodes.get_leaves(spec.get_split_subgraph("train"))) == 89


def _span_sets(spec):
  graph = spec.get_split_subgraph("train")
  spans = episodes.get_spanning_leaves(graph)
  return [frozenset(spec.class_names_to_ids[l.wn_id] for l in spans[n])
          for n in graph if n.children and len(spans[n]) >= 5]


def test_dag_hierarchy_classes_are_spanning_leaves():
  spec = HierSpec()
  spans = _span_sets(spec)
  sampler = EpisodeDescriptionSampler(spec, "train", use_dag_hierarchy=True,
                                      episode_sampling_seed=0)
  assert len(sampler.span_leaves_rel) == 7  # T (3 leaves) is not eligible
  nodes_hit = set()
  for d in _sample(sampler, 1000):
    ids = frozenset(c for c, _, _ in d)
    assert len(ids) == len(d) and len(d) in HierSpec.HIER_WAYS
    if len(d) == 50:  # W (60) and root (89) are subsampled to max_ways_upper_bound
      assert any(ids < s and len(s) > 50 for s in spans)
    else:
      assert ids in spans
      nodes_hit.add(ids)
    queries = {q for _, _, q in d}
    assert len(queries) == 1
  assert len(nodes_hit) == 5  # every eligible node with <= 50 leaves: X, Y, Y1, Y2, Z


@pytest.mark.parametrize("p_ignore", [0.5, 1.0])
def test_dag_ignore_hierarchy_probability(p_ignore):
  spec = HierSpec()
  spans = _span_sets(spec)
  sampler = EpisodeDescriptionSampler(spec, "train", use_dag_hierarchy=True,
                                      ignore_hierarchy_probability=p_ignore,
                                      episode_sampling_seed=1)
  n = 4000
  descriptions = _sample(sampler, n)
  # A uniform episode has ways ~ U{5..50}; hierarchical ones only take HIER_WAYS values. So
  # P(ways not in HIER_WAYS) = p_ignore * (1 - 5/46): check it within a computed binomial band.
  off_hierarchy = sum(len(d) not in HierSpec.HIER_WAYS for d in descriptions)
  expected = p_ignore * (1 - len(HierSpec.HIER_WAYS) / 46)
  z = stats.norm.isf(ALPHA / 2)
  assert abs(off_hierarchy / n - expected) <= z * math.sqrt(expected * (1 - expected) / n)
  # Uniform episodes mix leaves of unrelated nodes.
  assert any(frozenset(c for c, _, _ in d) not in spans and len(d) != 50
             for d in descriptions)
  if p_ignore == 1.0:
    assert _uniform_pvalue([len(d) for d in descriptions], 5, 50) > ALPHA


def test_bilevel_hierarchy_one_superclass():
  spec = BILEVEL
  sampler = EpisodeDescriptionSampler(spec, "train", use_bilevel_hierarchy=True,
                                      episode_sampling_seed=0)
  superclasses = set()
  for d in _sample(sampler, 2000):
    owners = {spec.superclass_of_rel("train", c) for c, _, _ in d}
    assert len(owners) == 1
    (owner,) = owners
    assert 5 <= len(d) <= min(50, spec.classes_per_superclass[owner])
    superclasses.add(owner)
  assert superclasses == set(spec.get_superclasses("train"))
  # Ignoring the hierarchy mixes alphabets.
  sampler = EpisodeDescriptionSampler(spec, "train", use_bilevel_hierarchy=True,
                                      ignore_hierarchy_probability=1.0, episode_sampling_seed=0)
  assert any(len({spec.superclass_of_rel("train", c) for c, _, _ in d}) > 1
             for d in _sample(sampler, 50))


def test_bilevel_errors():
  small = BiLevelSpec({"train": [4, 9]}, images_fn=lambda c: 20)
  with pytest.raises(ValueError, match="Superclass 0"):
    EpisodeDescriptionSampler(small, "train", use_bilevel_hierarchy=True)
  with pytest.raises(ValueError, match="bi-level"):
    EpisodeDescriptionSampler(FLAT, "train", use_bilevel_hierarchy=True)
  with pytest.raises(ValueError, match="hierarchical"):
    EpisodeDescriptionSampler(FLAT, "train", use_dag_hierarchy=True)


# ---------------------------------------------------------------------------------------------
# Images of an episode and padding.


@pytest.mark.parametrize("make_rng", [np.random.RandomState, np.random.default_rng])
def test_episode_indices_distinct_and_disjoint(make_rng):
  sampler = EpisodeDescriptionSampler(FLAT, "train", episode_sampling_seed=0)
  rng = make_rng(0)
  for d in _sample(sampler, 500):
    idx = sample_episode_indices(d, sampler.images_per_class, rng)
    support = list(zip(idx.support_classes.tolist(), idx.support_images.tolist()))
    query = list(zip(idx.query_classes.tolist(), idx.query_images.tolist()))
    assert len(set(support + query)) == len(support) + len(query)  # no repeat, disjoint
    for c, s, q in d:
      assert (idx.support_classes == c).sum() == s and (idx.query_classes == c).sum() == q
    images = sampler.images_per_class
    for classes, imgs in ((idx.support_classes, idx.support_images),
                          (idx.query_classes, idx.query_images)):
      assert (imgs >= 0).all() and (imgs < images[classes]).all()
    # Class by class, in description order.
    order = [c for c, _, _ in d]
    assert idx.support_classes.tolist() == [c for c, s, _ in d for _ in range(s)]
    assert list(dict.fromkeys(idx.query_classes.tolist())) == order


def test_episode_indices_cover_class_uniformly():
  # A class of 10 images, 3 support + 2 query per episode: every image is equally likely.
  counts = np.zeros(10)
  rng = np.random.RandomState(0)
  for _ in range(2000):
    idx = sample_episode_indices(((0, 3, 2),), [10], rng)
    counts[idx.support_images] += 1
    counts[idx.query_images] += 1
  assert stats.chisquare(counts).pvalue > ALPHA
  with pytest.raises(ValueError, match="without repeats"):
    sample_episode_indices(((0, 8, 3),), [10], rng)


def test_pad_episode_shapes_and_masks():
  sampler = EpisodeDescriptionSampler(FLAT, "train", episode_sampling_seed=0)
  max_ways, max_support, max_query = sampler.max_episode_sizes()
  assert (max_ways, max_support, max_query) == (50, 500, 500)
  rng = np.random.RandomState(1)
  for d in _sample(sampler, 300):
    idx = sample_episode_indices(d, sampler.images_per_class, rng)
    out = pad_episode(idx, max_support, max_query, max_ways)
    ways, n_s, n_q = len(d), len(idx.support_classes), len(idx.query_classes)
    for key, size in (("support", max_support), ("query", max_query)):
      for field in ("classes", "images", "labels"):
        assert out[f"{key}_{field}"].shape == (size,) and out[f"{key}_{field}"].dtype == np.int32
      assert out[f"{key}_mask"].shape == (size,) and out[f"{key}_mask"].dtype == bool
    assert out["class_ids"].shape == (max_ways,) and out["class_mask"].shape == (max_ways,)
    assert int(out["num_classes"]) == ways == out["class_mask"].sum()
    assert out["support_mask"].sum() == n_s and out["support_mask"][:n_s].all()
    assert out["query_mask"].sum() == n_q and out["query_mask"][:n_q].all()
    # Labels 0..ways-1 in description order; class_ids inverts them.
    assert out["class_ids"][:ways].tolist() == [c for c, _, _ in d]
    assert (out["class_ids"][ways:] == -1).all()
    for key in ("support", "query"):
      m = out[f"{key}_mask"]
      labels = out[f"{key}_labels"]
      assert (out["class_ids"][labels[m]] == out[f"{key}_classes"][m]).all()
      assert labels[m].min() >= 0 and labels[m].max() < ways
      assert (labels[~m] == 0).all() and (out[f"{key}_classes"][~m] == -1).all()
      assert (out[f"{key}_images"][~m] == -1).all()
    assert np.array_equal(out["support_images"][:n_s], idx.support_images)
    # Every class has >= 1 support and the same number of queries.
    assert np.bincount(out["support_labels"][:n_s], minlength=ways).min() >= 1
    assert len(set(np.bincount(out["query_labels"][:n_q], minlength=ways).tolist())) == 1


def test_pad_episode_errors():
  idx = sample_episode_indices(((3, 2, 1), (7, 1, 1)), [10] * 10, np.random.RandomState(0))
  with pytest.raises(ValueError, match="ways"):
    pad_episode(idx, 10, 10, 1)
  with pytest.raises(ValueError, match="support"):
    pad_episode(idx, 2, 10, 5)
  with pytest.raises(ValueError, match="query"):
    pad_episode(idx, 10, 1, 5)
  bad = EpisodeIndices(idx.support_classes, idx.support_images, np.array([3, 9]), np.array([0, 1]))
  with pytest.raises(ValueError, match="no support"):
    pad_episode(bad, 10, 10, 5)


def test_reseed_replays_the_same_descriptions():
  sampler = EpisodeDescriptionSampler(FLAT, "train", episode_sampling_seed=5)
  first = [sampler.sample_episode_description() for _ in range(3)]
  sampler.reseed(5)
  assert [sampler.sample_episode_description() for _ in range(3)] == first
  sampler.reseed(6)
  assert [sampler.sample_episode_description() for _ in range(3)] != first
