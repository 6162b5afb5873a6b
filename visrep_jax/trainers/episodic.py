"""Episodic few-shot training and evaluation (Prototypical Nets, CrossTransformers).

``config.trainer = 'episodic'``. One step = one episode (support + query images through the
backbone in one batch, so BatchNorm's running statistics move once per episode: the paper's
"EMA decaying at .9 per episode" is BatchNorm momentum 0.9). The head is ``config.fewshot.head``:
``protonet`` (global-average-pooled features, squared Euclidean distance to class means) or
``ctx`` (:class:`visrep_jax.models.fewshot.CrossTransformer` on the feature map). The loss is the
cross-entropy of the real queries; padded queries, support images and ways change nothing.

Every ``eval_every_steps`` the model is evaluated on ``config.episodes.num_valid_episodes``
episodes of the validation split; the best validation accuracy's weights are kept in
``workdir/best`` (the paper selects its checkpoint on the 158 ILSVRC validation classes). At the
end (and with ``eval_only``), ``num_test_episodes`` (600) test episodes per test source give the
mean accuracy and Meta-Dataset's 95% confidence interval, written to ``workdir/fewshot_test.json``
and printed as a table.

BatchNorm in training: statistics of the episode's real support images, with which the
queries are normalised too (Meta-Dataset's ``MetricLearner`` with its default
``transductive_batch_norm=False``); the running statistics move with the support statistics.
BatchNorm at test time (``config.fewshot.bn_test_mode``): ``ema`` (running statistics, the
paper's default) or ``support`` (statistics of the episode's support set, the Table 1 ablation).

The "+LR" variant (spec crosstransformers.md §1.4, C.3 L680-697; Table 2 "CTX+SimCLR
Eps+Aug+LR"), two independent switches:
* ``config.fewshot.aux_loss_weight`` > 0 (the paper: 1): training adds that times the
  cross-entropy of a persistent linear classifier over the training classes (712 for ILSVRC;
  the classes of all training sources) on the globally average-pooled feature of every real
  support image (``episode["support_class_ids"]``). Kept in SimCLR episodes too: their labels
  are support indices, but each support image's class is still known and the paper excepts no
  episode ("for each support-set image"). The head (``params/aux_head``, zero-initialised, so
  it starts at log(classes) and sends no random gradient into the pre-trained backbone) sees
  the raw pooled feature; it is used for nothing else.
* ``config.fewshot.lr_head``: every evaluation episode (validation and test) fits scikit-learn's
  logistic regression on the support set's pooled, l2-normalised features on the host
  (:func:`visrep_jax.models.fewshot.logistic_regression_logits`: ``lr_C`` 10, lbfgs,
  ``lr_max_iter``) and predicts argmax(head logits + ``lr_lambda`` (5) * LR log-probabilities).
  That prediction is the reported ``accuracy`` (and selects the checkpoint); ``head_accuracy``
  and ``lr_accuracy`` (each alone) are reported beside it, all with 95% CIs. The LR of episode
  i runs while the device computes episode i + 1.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from visrep_jax import checkpoint as ckpt_lib
from visrep_jax import config_lib, models, optim
from visrep_jax import metrics as metrics_lib
from visrep_jax import sharding as sharding_lib
from visrep_jax.data import episode_pipeline as ep_lib
from visrep_jax.data import episodes as episodes_lib
from visrep_jax.models import fewshot
from visrep_jax.trainers import common
from visrep_jax.trainers.supervised import NonFiniteLossError, _log

HEADS = ("protonet", "ctx")
BN_TEST_MODES = ("ema", "support")


def descr_config(e) -> episodes_lib.EpisodeDescriptionConfig:
  """``EpisodeDescriptionConfig`` from ``config.episodes`` (0 = variable for ways/shots/query).

  Fixed ways ignore ILSVRC's DAG and Omniglot's alphabets, and ``min_examples_in_class`` > 0
  the alphabets (the official sampler refuses these combinations and would need
  ``ignore_dag_ontology`` / ``ignore_bilevel_ontology`` set by hand), so fixed 5-way episodes
  run on every source."""
  return episodes_lib.EpisodeDescriptionConfig(
      # .get: the config.json of a workdir trained before these keys existed lacks them.
      ignore_dag_ontology=bool(e.get("ignore_dag_ontology", False) or e.num_ways),
      ignore_bilevel_ontology=bool(e.get("ignore_bilevel_ontology", False) or e.num_ways
                                   or e.min_examples_in_class),
      num_ways=e.num_ways or None, num_support=e.num_support or None,
      num_query=e.num_query or None, min_ways=e.min_ways,
      max_ways_upper_bound=e.max_ways_upper_bound, max_num_query=e.max_num_query,
      max_support_set_size=e.max_support_set_size,
      max_support_size_contrib_per_class=e.max_support_size_contrib_per_class,
      min_log_weight=e.min_log_weight, max_log_weight=e.max_log_weight,
      min_examples_in_class=e.min_examples_in_class)


def normalize_images(images):
  """The official Meta-Dataset decoder's scaling: uint8 / [0, 255] floats -> [-1, 1]."""
  return images.astype(jnp.float32) * (2.0 / 255.0) - 1.0


def make_head(config):
  f = config.fewshot
  if f.head == "protonet":
    return None
  return fewshot.CrossTransformer(key_dim=f.key_dim, value_dim=f.value_dim, remat=f.remat,
                                  remat_impl=f.remat_impl,
                                  query_chunk_size=f.query_chunk_size or None,
                                  # .get: config.json files of older workdirs lack the key.
                                  class_sum_impl=f.get("class_sum_impl", "") or None)


def make_aux_head(config, num_classes: int):
  """The "+LR" variant's persistent linear train-class classifier, or None (weight 0)."""
  if not config.fewshot.aux_loss_weight:
    return None
  return nn.Dense(num_classes, kernel_init=nn.initializers.zeros, name="aux_head")


def _features(backbone, variables, images, train, bn_mask):
  if train:
    (_, out), upd = backbone.apply(variables, images, train=True, bn_mask=bn_mask,
                                   mutable=["batch_stats"])
    return out["feature_map"], upd
  (_, out) = backbone.apply(variables, images, train=False)
  return out["feature_map"], {}


def episode_logits(backbone, head, params, model_state, batch, num_ways: int, n_support: int,
                   train: bool, bn_mode: str = "ema"):
  """Logits [Q, num_ways] of the episode's queries, and the new BatchNorm statistics."""
  logits, _, upd = episode_forward(backbone, head, params, model_state, batch, num_ways,
                                   n_support, train, bn_mode)
  return logits, upd


def episode_forward(backbone, head, params, model_state, batch, num_ways: int, n_support: int,
                    train: bool, bn_mode: str = "ema"):
  """(logits [Q, num_ways], globally average-pooled features [S + Q, D] float32 (support
  first), new BatchNorm statistics)."""
  images = normalize_images(batch["images"])
  support_mask = batch["support_mask"]
  if train or bn_mode == "support":
    # BatchNorm statistics of the real support images only, applied to every image: queries
    # are normalised with the support set's moments (Meta-Dataset's non-transductive default,
    # ``transductive_batch_norm=False``; gradients flow through the moments), so no query's
    # logits depend on another query. Training also moves the running statistics with them.
    bn_mask = jnp.concatenate([support_mask, jnp.zeros_like(batch["query_mask"])])
    fmap, upd = _features(backbone, {"params": params["backbone"], **model_state}, images, True,
                          bn_mask)
    if not train:
      upd = {}
  else:
    fmap, upd = _features(backbone, {"params": params["backbone"], **model_state}, images, False,
                          None)
  sup, qry = fmap[:n_support], fmap[n_support:]
  labels = batch["support_labels"]
  if head is None:
    logits = fewshot.prototypical_logits(qry, sup, labels, support_mask, num_ways)
  else:
    logits = head.apply({"params": params["head"]}, qry, sup, labels, support_mask,
                        num_classes=num_ways)
  pooled = jnp.mean(fmap.astype(jnp.float32), axis=(1, 2))
  return logits.astype(jnp.float32), pooled, upd


def aux_loss(aux_head, params, support_pooled, batch):
  """Mean cross-entropy of ``aux_head`` on the pooled features [S, D] of the real support
  images (mask True, class id >= 0) against ``support_class_ids``; 0 without any."""
  ids = batch["support_class_ids"]
  valid = batch["support_mask"] & (ids >= 0)
  feats = jnp.where(valid[:, None], support_pooled, 0.0)  # padding: no NaN, no gradient
  logits = aux_head.apply({"params": params["aux_head"]}, feats).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(ids, 0))
  w = valid.astype(jnp.float32)
  return jnp.sum(ce * w) / jnp.maximum(w.sum(), 1.0)


def episode_loss_and_accuracy(logits, batch):
  labels = batch["query_labels"]
  mask = batch["query_mask"] & (labels >= 0)
  w = mask.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  loss = jnp.sum(ce * w) / n
  acc = jnp.sum((jnp.argmax(logits, -1) == labels) * w) / n
  return loss, acc


def build(config: ml_collections.ConfigDict, devices=None, shapes: Optional[Any] = None):
  devices = jax.devices() if devices is None else list(devices)
  config_lib.validate(config, num_devices=len(devices))
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  e, f = config.episodes, config.fewshot
  if e.prepare_mini:
    from visrep_jax.data import md_mini
    md_mini.build_mini_benchmark(e.data_dir, e.mini_max_images_per_class or None)
  dc = descr_config(e)
  size = e.image_size
  common_kw = dict(channels=e.channels, cache_bytes=int(e.cache_gb * (1 << 30)),
                   index_cache_dir=e.index_cache_dir)
  train_sources = ep_lib.open_sources(
      e.data_dir, e.train_sources, "train", dc, size, use_hierarchy=True,
      ignore_hierarchy_probability=e.ignore_hierarchy_probability, **common_kw)
  augment = None
  if e.augment and e.augment != "none":
    from visrep_jax.data import episode_augment
    augment = episode_augment.parse(e.augment)
  shp = train_sources[0].shapes
  for s in train_sources[1:]:
    shp = shp.union(s.shapes)
  if shapes is not None:
    shp = shp.union(shapes)
  # A SimCLR episode has one way per support image.
  simclr = "simclr" in (e.augment or "")
  num_ways = max(shp.ways, shp.support) if simclr else shp.ways
  shp = ep_lib.EpisodeShapes(num_ways, shp.support, shp.query)

  backbone = models.create(config.model.name, num_classes=0, **config_lib.model_overrides(config))
  head = make_head(config)
  num_train_classes = sum(s.num_classes for s in train_sources)
  aux_head = make_aux_head(config, num_train_classes)
  n_img = shp.support + shp.query
  image_shape = (size, size, e.channels)
  total_steps = int(config.total_steps)
  lr_fn = optim.make_schedule(config, total_steps, max(total_steps, 1))

  def init(rng):
    r1, r2 = jax.random.split(rng)
    v = backbone.init({"params": r1, "dropout": r1}, jnp.zeros((2,) + image_shape), train=False)
    params = {"backbone": v.pop("params")}
    fm = backbone.apply(v | {"params": params["backbone"]}, jnp.zeros((2,) + image_shape),
                        train=False)[1]["feature_map"]
    if head is not None:
      params["head"] = head.init(r2, fm[:1], fm, jnp.zeros((2,), jnp.int32),
                                 jnp.ones((2,), bool), num_classes=2)["params"]
    if aux_head is not None:
      params["aux_head"] = aux_head.init(r2, jnp.zeros((1, fm.shape[-1])))["params"]
    return params, dict(v)

  rng = jax.random.PRNGKey(config.seed)
  r_init, r_train = jax.random.split(rng)
  abstract_params, _ = jax.eval_shape(init, r_init)
  tx = optim.make_optimizer(config, abstract_params, total_steps, max(total_steps, 1))[0]

  def init_state(rng):
    params, model_state = init(rng)
    return common.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), model_state=model_state)

  abstract = jax.eval_shape(init_state, r_init)
  state_shardings = sharding_lib.state_shardings(abstract, mesh, config.sharding)
  state = jax.jit(init_state, out_shardings=state_shardings)(r_init)
  # Images split over the devices when the padded count allows it; the rest replicated.
  data_axis = mesh.axis_names[0]
  img_spec = P(data_axis) if n_img % mesh.shape[data_axis] == 0 else P()
  batch_shardings = {"images": NamedSharding(mesh, img_spec)}
  for k in ("support_labels", "support_mask", "query_labels", "query_mask", "support_class_ids"):
    batch_shardings[k] = NamedSharding(mesh, P())

  def train_step(state, batch):
    def loss_fn(params):
      logits, pooled, upd = episode_forward(backbone, head, params, state.model_state, batch,
                                            num_ways, shp.support, train=True)
      loss, acc = episode_loss_and_accuracy(logits, batch)
      extra = {}
      if aux_head is not None:
        extra["aux_loss"] = aux_loss(aux_head, params, pooled[:shp.support], batch)
        loss = loss + f.aux_loss_weight * extra["aux_loss"]
      return loss, (acc, upd, extra)
    (loss, (acc, upd, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new = state.replace(step=state.step + 1,
                        params=keep(optax.apply_updates(state.params, updates), state.params),
                        opt_state=keep(opt_state, state.opt_state),
                        model_state=keep(dict(upd), state.model_state))
    return new, {"loss": loss, "accuracy": acc, "grad_norm": optax.global_norm(grads), **extra}

  def eval_step(state, batch):
    logits, pooled, _ = episode_forward(backbone, head, state.params, state.model_state, batch,
                                        num_ways, shp.support, train=False,
                                        bn_mode=f.bn_test_mode)
    loss, acc = episode_loss_and_accuracy(logits, batch)
    out = {"loss": loss, "accuracy": acc}
    if f.lr_head:  # the host fits the LR on these
      out.update(logits=logits, pooled=pooled)
    return out

  jit_train = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                      out_shardings=(state_shardings, NamedSharding(mesh, P())),
                      donate_argnums=(0,))
  # Replicated outputs: every process reads the whole episode's logits/features (LR on host).
  jit_eval = jax.jit(eval_step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=NamedSharding(mesh, P()))
  lr = (dict(lr_lambda=float(f.lr_lambda), C=float(f.lr_C), max_iter=int(f.lr_max_iter))
        if f.lr_head else None)
  return dict(mesh=mesh, backbone=backbone, head=head, aux_head=aux_head, lr=lr,
              num_train_classes=num_train_classes, state=state,
              state_shardings=state_shardings, batch_shardings=batch_shardings, tx=tx,
              lr_fn=lr_fn, train_sources=train_sources, augment=augment, shapes=shp,
              num_ways=num_ways, train_step=jit_train, eval_step=jit_eval, total_steps=total_steps,
              descr_config=dc, rng=r_train)


def device_batch(episode: Dict[str, np.ndarray], shardings) -> Dict[str, jax.Array]:
  """The host episode as global arrays (every process holds the whole episode)."""
  out = {}
  for k, sh in shardings.items():
    x = np.asarray(episode[k])
    out[k] = jax.make_array_from_callback(x.shape, sh, lambda idx, x=x: x[idx])
  return out


def lr_episode_accuracies(episode: Dict[str, np.ndarray], head_logits, pooled, lr_lambda: float,
                          C: float, max_iter: int) -> Dict[str, float]:
  """Host side of "+LR" for one episode: the accuracies over its real queries of
  argmax(head + lr_lambda * LR) (``accuracy``), of the head alone and of the LR alone.
  ``head_logits`` [Q, N] and ``pooled`` [S + Q, D] come from the eval step; the masks and labels
  from the host episode, so padded entries are never fitted nor counted."""
  s = episode["support_mask"].shape[0]
  head_logits = np.asarray(head_logits, np.float64)
  pooled = np.asarray(pooled)
  lr = fewshot.logistic_regression_logits(
      pooled[:s], episode["support_labels"], episode["support_mask"], pooled[s:],
      episode["query_mask"], num_classes=head_logits.shape[1], C=C, max_iter=max_iter)
  labels = np.asarray(episode["query_labels"])
  real = np.asarray(episode["query_mask"], bool) & (labels >= 0)
  n = max(int(real.sum()), 1)
  acc = lambda logits: float(np.sum(np.argmax(logits, -1)[real] == labels[real]) / n)
  return {"accuracy": acc(head_logits + lr_lambda * lr), "head_accuracy": acc(head_logits),
          "lr_accuracy": acc(lr)}


def evaluate_episodes(b, state, sources: List[ep_lib.EpisodeSource], num_episodes: int,
                      seed: int, progress: bool = False, release: bool = False
                      ) -> Dict[str, Dict[str, float]]:
  """``{source: {accuracy, ci95, loss, episodes}}`` over ``num_episodes`` fixed episodes each
  (episode i of a source is the same for every model and every call). With ``lr_head``,
  ``accuracy`` is that of head + lambda * LR, and ``head_accuracy``/``head_ci95``,
  ``lr_accuracy``/``lr_ci95`` are added; ``loss`` is always the head's. ``release``: free each
  source's decoded-image cache once its episodes are done (test sources, evaluated once)."""
  lr = b.get("lr")
  results = {}
  for src in sources:
    accs: Dict[str, list] = {"accuracy": [], "head_accuracy": [], "lr_accuracy": []}
    losses = []

    def finish(ep, out):
      losses.append(out["loss"])
      if lr is None:
        accs["accuracy"].append(out["accuracy"])  # stays on device: no sync per episode
        return
      host = jax.device_get({"logits": out["logits"], "pooled": out["pooled"]})
      for k, v in lr_episode_accuracies(ep, host["logits"], host["pooled"], **lr).items():
        accs[k].append(v)

    pending = None
    with ep_lib.EpisodeStream([src], seed=seed, shapes=b["shapes"], prefetch=2) as stream:
      for i in range(num_episodes):
        ep = next(stream)
        out = b["eval_step"](state, device_batch(ep, b["batch_shardings"]))
        if pending is not None:
          finish(*pending)  # the LR of episode i - 1 while the device runs episode i
        pending = (ep, out)
        if progress and (i + 1) % 100 == 0:
          _log("  %s: %d/%d episodes", src.name, i + 1, num_episodes)
    if pending is not None:
      finish(*pending)
    if release:
      src.release_cache()
    r = {}
    for k, v in accs.items():
      if v:
        a = np.asarray(jax.device_get(v), np.float64)
        r[k] = float(a.mean())
        r[k.replace("accuracy", "ci95")] = ep_lib.confidence_interval(a)
    r["loss"] = float(np.mean(jax.device_get(losses)))
    r["episodes"] = int(num_episodes)
    results[src.name] = r
  return results


def format_results(results: Dict[str, Dict[str, float]], title: str) -> str:
  cell = lambda r, k: f"{100 * r[k]:.2f} +-{100 * r[k.replace('accuracy', 'ci95')]:.2f}"
  lr = any("lr_accuracy" in r for r in results.values())
  if lr:
    lines = [f"| {title} | accuracy (%) | 95% CI | head alone (%) | LR alone (%) | episodes |",
             "|---|---|---|---|---|---|"]
  else:
    lines = [f"| {title} | accuracy (%) | 95% CI | episodes |", "|---|---|---|---|"]
  for name, r in results.items():
    extra = f"{cell(r, 'head_accuracy')} | {cell(r, 'lr_accuracy')} | " if lr else ""
    lines.append(f"| {name} | {100 * r['accuracy']:.2f} | +-{100 * r['ci95']:.2f} | {extra}"
                 f"{r['episodes']} |")
  return "\n".join(lines)


def _open_eval_sources(config, split: str, names, shapes) -> List[ep_lib.EpisodeSource]:
  e = config.episodes
  dc = descr_config(e)
  out = []
  for n in names:
    src = ep_lib.EpisodeSource(os.path.join(e.data_dir, n), split, dc, e.image_size,
                               channels=e.channels, use_hierarchy=True,
                               ignore_hierarchy_probability=0.0,
                               cache_bytes=int(e.cache_gb * (1 << 30)),
                               index_cache_dir=e.index_cache_dir)
    if (src.shapes.ways > shapes.ways or src.shapes.support > shapes.support
        or src.shapes.query > shapes.query):
      raise config_lib.ConfigError(
          f"Evaluation episodes of {n} ({src.shapes}) exceed the training shapes ({shapes}); "
          "use the same config.episodes limits for every source.")
    out.append(src)
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  os.makedirs(workdir, exist_ok=True)
  b = build(config)
  state = b["state"]
  e = config.episodes
  writer = metrics_lib.MetricWriter(workdir)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  best_path = os.path.join(workdir, "best_valid.json")
  best = {"accuracy": -1.0}
  if os.path.exists(best_path):
    try:
      with open(best_path) as fh:
        stored = json.load(fh)
      best = dict(stored, accuracy=float(stored["accuracy"]))
    except (ValueError, KeyError, TypeError):
      # A restarted record would let the next validation replace the kept best weights.
      ckpt_lib.set_aside(os.path.join(workdir, "best"),
                         f"{best_path} is unreadable, the best-validation record restarts")
  elif ckpt_lib.has_checkpoint(os.path.join(workdir, "best")):
    # Weights without their record (deleted, or a crash between the two writes): same risk.
    ckpt_lib.set_aside(os.path.join(workdir, "best"),
                       f"{best_path} is missing, the best-validation record restarts")
  best_ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "best"), keep=1, async_save=False)

  start = 0
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = ckpt_lib.abstract_with_shardings(state, b["state_shardings"])
    state, _ = ckpt.restore(abstract, latest)
    start = int(jax.device_get(state.step))
    _log("Resumed from %s at episode %d.", ckpt.directory, start)
  elif config.init_checkpoint:
    abstract = ckpt_lib.abstract_with_shardings(state.params["backbone"],
                                                b["state_shardings"].params["backbone"])
    abstract_ms = ckpt_lib.abstract_with_shardings(state.model_state,
                                                   b["state_shardings"].model_state)
    params, model_state = ckpt_lib.load_variables(config.init_checkpoint, abstract, abstract_ms,
                                                  adapt_head=True)
    state = state.replace(params=dict(state.params, backbone=params),
                          model_state=model_state or state.model_state)
    _log("Initialised the backbone from %s.", config.init_checkpoint)
  if jax.process_index() == 0:
    # Only now: a resume that does not fit (another model) keeps the record of the trained one,
    # which fewshot_viz and fewshot_table rebuild the model from.
    with open(os.path.join(workdir, "config.json"), "w") as fh:
      fh.write(config.to_json_best_effort(indent=2))

  valid_names = list(e.valid_sources)
  valid = _open_eval_sources(config, "valid", valid_names, b["shapes"]) if valid_names else []

  def run_valid(step):
    nonlocal best
    res = evaluate_episodes(b, state, valid, e.num_valid_episodes, seed=e.eval_seed + 1)
    acc = float(np.mean([r["accuracy"] for r in res.values()]))
    scalars = {f"valid/{k}_accuracy": r["accuracy"] for k, r in res.items()}
    scalars["valid/accuracy"] = acc
    writer.write_scalars(step, scalars)
    _log("episode %d  validation accuracy %.4f (%s)", step, acc,
         ", ".join(f"{k} {r['accuracy']:.4f}" for k, r in res.items()))
    if acc > best["accuracy"]:
      best = {"accuracy": acc, "step": int(step)}
      best_ckpt.save(step, state, {"step": int(step), "valid_accuracy": acc}, force=True)
      if jax.process_index() == 0:
        with open(best_path + ".tmp", "w") as fh:
          json.dump(best, fh)
        os.replace(best_path + ".tmp", best_path)  # atomic: never a half-written record

  total = b["total_steps"]
  if not config.eval_only and start < total:
    stream = ep_lib.EpisodeStream(b["train_sources"], seed=config.seed, start=start,
                                  augment=b["augment"], shapes=b["shapes"], prefetch=2)
    _log("Episodic training (%s head) of %s on %s: %d episodes, padded to %d ways, %d support, "
         "%d query images, workdir %s", config.fewshot.head, config.model.name,
         ",".join(e.train_sources), total, b["num_ways"], b["shapes"].support,
         b["shapes"].query, workdir)
    if b["aux_head"] is not None:
      _log("Auxiliary loss: %d-way train-class cross-entropy on pooled support features, "
           "weight %g.", b["num_train_classes"], config.fewshot.aux_loss_weight)
    try:
      pending, t0 = [], time.time()
      step = start
      while step < total:
        ep = next(stream)
        state, m = b["train_step"](state, device_batch(ep, b["batch_shardings"]))
        step += 1
        pending.append(m)
        if step % config.log_every_steps == 0 or step == total:
          stats = jax.device_get(pending)
          pending = []
          loss = float(np.mean([s["loss"] for s in stats]))
          if not np.isfinite(loss):
            raise NonFiniteLossError(f"Non-finite loss at episode {step}; the update was skipped "
                                     "and the last checkpoint is intact: lower the learning rate.")
          scalars = {"train/loss": loss,
                     "train/accuracy": float(np.mean([s["accuracy"] for s in stats])),
                     **({"train/aux_loss": float(np.mean([s["aux_loss"] for s in stats]))}
                        if "aux_loss" in stats[0] else {}),
                     "train/grad_norm": float(np.mean([s["grad_norm"] for s in stats])),
                     "train/lr": float(b["lr_fn"](step - 1)),
                     "train/episodes_per_sec": len(stats) / max(time.time() - t0, 1e-9)}
          t0 = time.time()
          writer.write_scalars(step, scalars)
          _log("episode %d/%d  loss %.4f  accuracy %.4f  lr %.3g  %.2f episodes/s", step, total,
               loss, scalars["train/accuracy"], scalars["train/lr"],
               scalars["train/episodes_per_sec"])
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
          ckpt.save(step, state, {"step": step})
        if valid and config.eval_every_steps and step % config.eval_every_steps == 0:
          run_valid(step)
    finally:
      stream.close()  # also on errors: no thread left inside TensorFlow at exit
    ckpt.save(total, state, {"step": total}, force=True)
    if valid and (not config.eval_every_steps or total % config.eval_every_steps):
      run_valid(total)
  ckpt.wait()

  test_state = state
  if valid and best_ckpt.latest_step() is not None and e.test_best:
    abstract = ckpt_lib.abstract_with_shardings(state, b["state_shardings"])
    test_state, _ = best_ckpt.restore(abstract, best_ckpt.latest_step())
    _log("Testing the best validation checkpoint (episode %d, accuracy %.4f).",
         best_ckpt.latest_step(), best["accuracy"])
  test = _open_eval_sources(config, "test", list(e.test_sources), b["shapes"])
  results = evaluate_episodes(b, test_state, test, e.num_test_episodes, seed=e.eval_seed,
                              progress=config.progress_bar, release=True)
  writer.write_scalars(total, {f"test/{k}_accuracy": r["accuracy"] for k, r in results.items()})
  lr = b["lr"]
  title = config.fewshot.head + (f" + {lr['lr_lambda']:g} LR" if lr else "")
  table = format_results(results, f"{title} test source")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "fewshot_test.json"), "w") as fh:
      json.dump({"results": results, "best_valid": best,
                 "bn_test_mode": config.fewshot.bn_test_mode,
                 "lr_head": dict(lr, solver="lbfgs") if lr else None}, fh, indent=2)
  _log("Test episodes (%d per source, BN %s%s):\n%s", e.num_test_episodes,
       config.fewshot.bn_test_mode,
       f"; prediction = argmax({config.fewshot.head} + {lr['lr_lambda']:g} * LR "
       f"log-probabilities), LR C={lr['C']:g}" if lr else "", table)
  ckpt.close()
  best_ckpt.close()
  writer.close()
  return results
