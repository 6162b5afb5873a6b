"""Linear probe of a backbone's pooled features, and early stopping on it.

CrossTransformers' phase-1 stopping criterion (C.1 L624-625): "training a linear classifier on
validation categories and stopping when this fine-tuning performance begins to decline". At every
evaluation of the supervised trainer (``config.eval_every_steps`` and the end), the frozen model
(eval mode: BatchNorm running statistics) embeds the images of ``config.linear_probe.fit_split``
and ``score_split`` (two splits of ``config.dataset``, e.g. ``valid[:50]`` and ``valid[50:100]`` of
a ``meta_dataset:`` source: the validation classes, disjoint images), a multinomial logistic
regression (scikit-learn, lbfgs) is fitted on the first and its top-1 on the second is logged as
``eval/linear_probe_top1``. Features are ``out['pre_logits']`` (a ResNet's global average pool),
l2-normalised by default, with ``C = 10``: the logistic regression the paper fits on pooled
features at test time (spec §1.4, C.3 L683-697).

The best evaluation's weights are kept in ``WORKDIR/best`` (``init=WORKDIR/best`` restores them);
``WORKDIR/linear_probe.json`` records every evaluation, the best and how many evaluations since.
With ``patience = p > 0`` training stops after p evaluations in a row below the best (p = 1: at
the first decline, the paper's wording); ``patience = 0`` only marks the best. A tie with the
best is no decline: the later evaluation becomes the best (a saturated probe, e.g. the mini
benchmark's two validation classes, never stops training).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from visrep_jax import checkpoint as ckpt_lib
from visrep_jax import sharding as sharding_lib
from visrep_jax.data import DataError, pipeline

RECORD = "linear_probe.json"
BEST_DIR = "best"


def fit_and_score(fit_x: np.ndarray, fit_y: np.ndarray, score_x: np.ndarray, score_y: np.ndarray,
                  C: float = 10.0, max_iter: int = 1000, l2_normalize: bool = True
                  ) -> Dict[str, float]:
  """Fits a multinomial logistic regression on ``(fit_x, fit_y)``; returns its top-1 on the
  score set (``top1``; a label the fit set lacks counts as an error) and on the fit set
  (``fit_top1``)."""
  from sklearn.linear_model import LogisticRegression
  fit_x, score_x = (np.asarray(x, np.float64) for x in (fit_x, score_x))
  fit_y, score_y = np.asarray(fit_y), np.asarray(score_y)
  if len(np.unique(fit_y)) < 2:
    raise DataError(f"The linear probe's fit split has {len(np.unique(fit_y))} class(es); it "
                    "needs at least 2: widen config.linear_probe.fit_split.")
  if not len(score_y):
    raise DataError("The linear probe's score split has no images: widen "
                    "config.linear_probe.score_split.")
  if l2_normalize:
    from sklearn.preprocessing import normalize
    fit_x, score_x = normalize(fit_x), normalize(score_x)
  clf = LogisticRegression(C=C, max_iter=max_iter)
  clf.fit(fit_x, fit_y)
  return {"top1": float(clf.score(score_x, score_y)), "fit_top1": float(clf.score(fit_x, fit_y))}


def make_feature_step(model):
  """``step(state, batch) -> {features, label, mask}``: pooled eval-mode features."""
  def step(state, batch):
    variables = {"params": state.params, **state.model_state}
    _, out = model.apply(variables, batch["image"].astype(jnp.float32), train=False)
    if not isinstance(out, dict) or "pre_logits" not in out:
      raise ValueError(f"the linear probe reads out['pre_logits'], which {type(model).__name__} "
                       "does not return")
    return {"features": out["pre_logits"].astype(jnp.float32), "label": batch["label"],
            "mask": batch["mask"]}
  return step


def _host(x) -> np.ndarray:
  """A replicated global array as NumPy (every process holds all of it)."""
  return np.asarray(x.addressable_data(0))


def extract_features(feature_step, state, eval_input: "pipeline.EvalInput", batch_sharding
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """``(features [N, D], labels [N])`` of every real (``mask == 1``) example of ``eval_input``."""
  feats, labels = [], []
  for batch in eval_input.batches:
    out = feature_step(state, pipeline.to_global(batch, batch_sharding))
    keep = _host(out["mask"]) > 0
    feats.append(_host(out["features"])[keep])
    labels.append(_host(out["label"])[keep])
  return np.concatenate(feats), np.concatenate(labels)


class EarlyStopping:
  """The history of a higher-is-better metric, its best (the last of equal values), and the
  evaluations since, all below the best (persisted).

  A resumed run passes ``resume_step``: evaluations recorded after it (the run died between an
  evaluation and the next checkpoint) are forgotten, so they are not counted twice. Evaluating a
  step again replaces its entry."""

  def __init__(self, path: Optional[str], patience: int = 0, resume_step: Optional[int] = None):
    self.path, self.patience = path, int(patience)
    self.history: List[Tuple[int, float]] = []
    self.unreadable = False  # the record existed but could not be read: it restarts empty
    if path and os.path.exists(path):
      try:
        with open(path) as f:
          self.history = [(int(s), float(v)) for s, v in json.load(f)["history"]]
      except (ValueError, KeyError, TypeError):
        self.history, self.unreadable = [], True
    if resume_step is not None:
      self.history = [(s, v) for s, v in self.history if s <= resume_step]

  def _best_index(self) -> int:
    best = -1
    for i, (_, v) in enumerate(self.history):
      if best < 0 or v >= self.history[best][1]:
        best = i
    return best

  @property
  def best(self) -> Optional[Tuple[int, float]]:
    i = self._best_index()
    return self.history[i] if i >= 0 else None

  @property
  def evals_since_best(self) -> int:
    i = self._best_index()
    return len(self.history) - 1 - i if i >= 0 else 0

  @property
  def should_stop(self) -> bool:
    return self.patience > 0 and self.evals_since_best >= self.patience

  def update(self, step: int, value: float) -> bool:
    """Records ``value`` at ``step``; True if it is the (new) best: no lower than any other."""
    self.history = sorted([(s, v) for s, v in self.history if s != int(step)]
                          + [(int(step), float(value))])
    best = self.best
    return best is not None and best[0] == int(step)

  def save(self):
    if not self.path or jax.process_index() != 0:
      return
    best = self.best
    record = {"best": {"step": best[0], "linear_probe_top1": best[1]} if best else None,
              "evals_since_best": self.evals_since_best, "patience": self.patience,
              "stopped": self.should_stop, "history": [[s, v] for s, v in self.history]}
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(record, f, indent=1)
    os.replace(tmp, self.path)


class LinearProbe:
  """The linear probe of a supervised run (see the module docstring)."""

  def __init__(self, config, model, source, state_shardings, batch_sharding, mesh,
               workdir: str, resume_step: Optional[int] = None, track: bool = True):
    lp = config.linear_probe
    self.config = lp
    local = (config.eval_batch_size or config.batch_size) // jax.process_count()
    make = lambda split: pipeline.make_eval(source, split, config.dataset.eval_pp, local,
                                            skip_corrupt=config.dataset.skip_corrupt)
    self.fit_input, self.score_input = make(lp.fit_split), make(lp.score_split)
    classes = getattr(source, "classes", None)  # known up front for meta_dataset: sources
    if classes is not None and len(classes(lp.fit_split)) < 2:
      # At start-up, not at the first evaluation thousands of steps later.
      raise DataError(f"The linear probe's fit split {lp.fit_split!r} has "
                      f"{len(classes(lp.fit_split))} class(es); it needs at least 2: widen "
                      "config.linear_probe.fit_split.")
    self.batch_sharding = batch_sharding
    self.step = jax.jit(make_feature_step(model), in_shardings=(state_shardings, batch_sharding),
                        out_shardings=sharding_lib.replicated(mesh))
    self.track = track
    self.stopping = EarlyStopping(os.path.join(workdir, RECORD) if track else None, lp.patience,
                                  resume_step)
    best_dir = os.path.join(workdir, BEST_DIR)
    if track and self.stopping.unreadable:
      # The restarted record would let the next evaluation replace the kept best weights.
      ckpt_lib.set_aside(best_dir, f"{RECORD} is unreadable, the linear-probe record restarts")
    elif (track and not os.path.exists(os.path.join(workdir, RECORD))
          and ckpt_lib.has_checkpoint(best_dir)):
      # Weights without their record (deleted, or a crash between the two writes): same risk.
      ckpt_lib.set_aside(best_dir, f"{RECORD} is missing, the linear-probe record restarts")
    self.best_ckpt = (ckpt_lib.Checkpointer(os.path.join(workdir, BEST_DIR), keep=1,
                                            async_save=False) if track else None)

  @property
  def should_stop(self) -> bool:
    return self.stopping.should_stop

  def evaluate(self, state, step: int, meta: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """Probe top-1 of ``state`` (``linear_probe_top1``, ``linear_probe_fit_top1``,
    ``linear_probe_best_top1``, ``linear_probe_best_step``); the best state is checkpointed."""
    fit_x, fit_y = extract_features(self.step, state, self.fit_input, self.batch_sharding)
    score_x, score_y = extract_features(self.step, state, self.score_input, self.batch_sharding)
    res = fit_and_score(fit_x, fit_y, score_x, score_y, C=self.config.C,
                        max_iter=self.config.max_iter, l2_normalize=self.config.l2_normalize)
    if jax.process_count() > 1:  # every process takes the same stop / save decisions
      from jax.experimental import multihost_utils
      res = dict(zip(("top1", "fit_top1"), np.asarray(multihost_utils.broadcast_one_to_all(
          np.asarray([res["top1"], res["fit_top1"]], np.float64))).tolist()))
    out = {"linear_probe_top1": res["top1"], "linear_probe_fit_top1": res["fit_top1"]}
    if self.track:
      if self.stopping.update(step, res["top1"]):
        self.best_ckpt.save(step, state, dict(meta or {}, step=int(step),
                                              linear_probe_top1=res["top1"]), force=True)
      self.stopping.save()
      best_step, best = self.stopping.best
      out.update(linear_probe_best_top1=best, linear_probe_best_step=float(best_step))
    return out

  def close(self):
    if self.best_ckpt is not None:
      self.best_ckpt.close()


def from_config(config, built: Dict[str, Any], workdir: str, resume_step: Optional[int] = None
                ) -> Optional[LinearProbe]:
  """The probe of ``config.linear_probe`` for a run built by ``trainers.supervised.build``, or
  None when it is off (empty ``fit_split``). ``eval_only`` runs report it without tracking."""
  if not config.linear_probe.fit_split:
    return None
  return LinearProbe(config, built["model"], built["source"], built["state_shardings"],
                     built["batch_sharding"], built["mesh"], workdir, resume_step,
                     track=not config.eval_only)
