"""The CrossTransformers "+LR" variant (spec crosstransformers.md §1.4): the host-side logistic
regression on pooled support features and its combination with the head's logits (masks,
padding, which LR output counts as logits), the auxiliary train-class loss, the support images'
class ids in the episodes (SimCLR episodes and several sources included), the config, and the
``ctx_simclr_aug_lr`` runlocal run through ``python -m visrep_jax.main``."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from conftest import REPO, load_config, requires_fashion_mnist, subprocess_env
from visrep_jax import config_lib
from visrep_jax.config_lib import ConfigError
from visrep_jax.data import episode_pipeline as ep_lib
from visrep_jax.models import fewshot
from visrep_jax.trainers import episodic

LR = dict(lr_lambda=5.0, C=10.0, max_iter=1000)


def separable_episode(ways=4, shots=5, queries=3, dim=16, seed=0, pad_s=0, pad_q=0, pad_w=0):
  """Pooled features [S + Q, D] whose class is the direction of a one-hot axis (plus noise),
  labels and masks; padded entries hold misleading features (class-1 direction, label 0) and,
  in the query padding, NaN."""
  r = np.random.RandomState(seed)
  centres = 3.0 * np.eye(dim)[:ways]
  s_lab = np.repeat(np.arange(ways), shots).astype(np.int32)
  q_lab = np.repeat(np.arange(ways), queries).astype(np.int32)
  feat = lambda lab: centres[lab] + 0.3 * r.randn(len(lab), dim)
  sup, qry = feat(s_lab), feat(q_lab)
  sup_pad = np.tile(centres[1] * 5, (pad_s, 1))
  qry_pad = np.full((pad_q, dim), np.nan)
  pooled = np.concatenate([sup, sup_pad, qry, qry_pad]).astype(np.float32)
  ep = {"support_labels": np.concatenate([s_lab, np.zeros(pad_s, np.int32)]),
        "support_mask": np.arange(len(s_lab) + pad_s) < len(s_lab),
        "query_labels": np.concatenate([q_lab, -np.ones(pad_q, np.int32)]),
        "query_mask": np.arange(len(q_lab) + pad_q) < len(q_lab)}
  num_classes = ways + pad_w
  head = np.zeros((len(q_lab) + pad_q, num_classes), np.float32)
  head[:, ways:] = fewshot.NO_SUPPORT_LOGIT  # padded ways, as the heads give them
  return ep, pooled, head


def test_lr_fixes_uninformative_and_misleading_head_logits():
  ep, pooled, head = separable_episode()
  # Uninformative head (all ties: argmax says class 0): LR alone and head + 5 LR are right.
  r = episodic.lr_episode_accuracies(ep, head, pooled, **LR)
  assert r["head_accuracy"] == pytest.approx(0.25)
  assert r["lr_accuracy"] == 1.0 and r["accuracy"] == 1.0
  # A head that mildly prefers the wrong class: lambda 5 lets the LR win, lambda 0 does not.
  wrong = head.copy()
  q = ep["query_labels"]
  wrong[np.arange(len(q)), (q + 1) % 4] = 0.5
  assert episodic.lr_episode_accuracies(ep, wrong, pooled, **LR)["accuracy"] == 1.0
  off = episodic.lr_episode_accuracies(ep, wrong, pooled, **dict(LR, lr_lambda=0.0))
  assert off["accuracy"] == off["head_accuracy"] == 0.0


def test_padded_support_query_and_ways_change_nothing():
  ep, pooled, head = separable_episode()
  ep2, pooled2, head2 = separable_episode(pad_s=7, pad_q=5, pad_w=3)
  n_s, n_q = len(ep["support_labels"]), len(ep["query_labels"])
  s2 = len(ep2["support_labels"])
  lr = fewshot.logistic_regression_logits(pooled[:n_s], ep["support_labels"], ep["support_mask"],
                                          pooled[n_s:], ep["query_mask"], 4)
  lr2 = fewshot.logistic_regression_logits(pooled2[:s2], ep2["support_labels"],
                                           ep2["support_mask"], pooled2[s2:], ep2["query_mask"],
                                           7)
  np.testing.assert_allclose(lr2[:n_q, :4], lr, rtol=1e-10, atol=1e-12)
  assert np.all(lr2[:, 4:] == fewshot.NO_SUPPORT_LOGIT) and np.all(lr2[n_q:, :4] == 0)
  assert np.isfinite(lr2).all()
  assert (episodic.lr_episode_accuracies(ep2, head2, pooled2, **LR)
          == episodic.lr_episode_accuracies(ep, head, pooled, **LR))
  # The padded support entries are misleading: counted as real they would change the fit.
  leaky = fewshot.logistic_regression_logits(pooled2[:s2], ep2["support_labels"],
                                             np.ones(s2, bool), pooled2[s2:], ep2["query_mask"], 7)
  assert not np.allclose(leaky[:n_q, :4], lr, atol=1e-3)


def test_lr_logits_are_sklearn_log_probabilities_on_l2_normalised_pooled_features():
  r = np.random.RandomState(1)
  s_lab = np.array([0, 0, 1, 1, 2, 2, 2], np.int32)
  sup = r.randn(7, 2, 3, 5) + 2 * np.eye(5)[s_lab][:, None, None, :]  # feature maps
  qry = r.randn(4, 2, 3, 5)
  lr = fewshot.logistic_regression_logits(sup, s_lab, np.ones(7, bool), qry, np.ones(4, bool),
                                          num_classes=4, C=10.0, max_iter=1000)
  l2 = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  clf = LogisticRegression(C=10.0, solver="lbfgs", max_iter=1000).fit(l2(sup.mean((1, 2))), s_lab)
  q = l2(qry.mean((1, 2)))
  np.testing.assert_allclose(lr[:, :3], clf.predict_log_proba(q), rtol=1e-10, atol=1e-12)
  assert np.all(lr[:, 3] == fewshot.NO_SUPPORT_LOGIT)
  # l2-normalised: the scale of each image's features does not matter (unnormalised, it would).
  scaled = fewshot.logistic_regression_logits(sup * r.uniform(0.1, 10, (7, 1, 1, 1)), s_lab,
                                              np.ones(7, bool), qry * 50.0, np.ones(4, bool),
                                              num_classes=4, C=10.0, max_iter=1000)
  np.testing.assert_allclose(scaled, lr, rtol=1e-6, atol=1e-8)
  raw = LogisticRegression(C=10.0, max_iter=1000).fit(sup.mean((1, 2)) * 50.0, s_lab)
  assert not np.allclose(raw.predict_log_proba(qry.mean((1, 2)) * 50.0), lr[:, :3], atol=1e-3)
  # log-probabilities = decision_function - a per-query constant: the same combined argmax.
  diff = lr[:, :3] - clf.decision_function(q)
  np.testing.assert_allclose(diff, diff[:, :1].repeat(3, 1), atol=1e-9)
  head = r.randn(4, 3)
  np.testing.assert_array_equal(np.argmax(head + 5 * lr[:, :3], -1),
                                np.argmax(head + 5 * clf.decision_function(q), -1))
  # 2-way episodes (scikit-learn's binary loss) still give one column per class.
  two = fewshot.logistic_regression_logits(sup[:4], s_lab[:4], np.ones(4, bool), qry,
                                           np.ones(4, bool), num_classes=2)
  np.testing.assert_allclose(np.exp(two).sum(-1), 1.0, rtol=1e-9)
  # One support class: nothing to fit, log-probability 0 for it.
  one = fewshot.logistic_regression_logits(sup[:2], s_lab[:2], np.ones(2, bool), qry,
                                           np.ones(4, bool), num_classes=3)
  assert np.all(one[:, 0] == 0) and np.all(one[:, 1:] == fewshot.NO_SUPPORT_LOGIT)
  with pytest.raises(ValueError, match="feature maps"):
    fewshot.logistic_regression_logits(sup[0], s_lab, np.ones(7, bool), qry, np.ones(4, bool), 3)


def test_aux_loss_equals_hand_computation_and_ignores_padding():
  head = nn.Dense(3, name="aux_head")
  w = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], np.float32)
  b = np.array([0.1, 0.0, -0.2], np.float32)
  params = {"aux_head": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}
  feats = np.array([[1.0, 2.0], [-1.0, 0.5], [0.3, -0.7], [np.nan, np.inf], [9.0, 9.0]],
                   np.float32)
  batch = {"support_class_ids": np.array([2, 0, 1, -1, 1], np.int32),
           "support_mask": np.array([True, True, True, False, False])}
  want = 0.0
  for k in range(3):  # the real entries
    z = feats[k].astype(np.float64) @ w + b
    want += np.log(np.exp(z).sum()) - z[batch["support_class_ids"][k]]
  want /= 3
  loss = episodic.aux_loss(head, params, jnp.asarray(feats), batch)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  g = jax.grad(lambda f: episodic.aux_loss(head, params, f, batch))(jnp.asarray(feats))
  assert np.isfinite(np.asarray(g)).all() and np.all(np.asarray(g)[3:] == 0)
  # Zero-initialised head (make_aux_head): log(classes) at the start.
  c = load_config("ctx", "variant=ctx_simclr_aug_lr,runlocal")
  zero = episodic.make_aux_head(c, 6)
  p0 = {"aux_head": zero.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)))["params"]}
  assert float(episodic.aux_loss(zero, p0, jnp.asarray(feats), batch)) == pytest.approx(np.log(6))
  c.fewshot.aux_loss_weight = 0.0
  assert episodic.make_aux_head(c, 6) is None


@requires_fashion_mnist
def test_train_step_adds_the_aux_loss_with_its_weight(mini_dir):
  c = load_config("ctx", f"variant=ctx_simclr_aug_lr,runlocal,data={mini_dir}")
  c.episodes.augment = "none"
  c.fewshot.aux_loss_weight = 0.5
  b = episodic.build(c, devices=jax.devices()[:1])
  assert b["num_train_classes"] == 6
  state = b["state"]
  params0 = jax.device_get(state.params)
  assert not np.any(params0["aux_head"]["kernel"])  # zero-initialised
  ep = b["train_sources"][0].sample(seed=1, shapes=b["shapes"])
  batch = episodic.device_batch(ep, b["batch_shardings"])
  logits, _ = episodic.episode_logits(b["backbone"], b["head"], state.params, state.model_state,
                                      batch, b["num_ways"], b["shapes"].support, train=True)
  ctx_loss, _ = episodic.episode_loss_and_accuracy(logits, batch)
  new, m = b["train_step"](state, batch)
  assert float(m["aux_loss"]) == pytest.approx(np.log(6), rel=1e-6)
  assert float(m["loss"]) == pytest.approx(float(ctx_loss) + 0.5 * np.log(6), rel=1e-5)
  assert np.any(jax.device_get(new.params["aux_head"]["kernel"]))  # it learns


def test_config_variant_and_errors():
  c = load_config("ctx", "variant=ctx_simclr_aug_lr,data=/x")
  f = c.fewshot
  assert f.head == "ctx" and f.lr_head is True and f.aux_loss_weight == 1.0
  assert f.lr_lambda == 5.0 and f.lr_C == 10.0
  assert c.schedule.decay_steps == 2000 and "bohb" in c.episodes.augment
  assert tuple(c.model.replace_stride_with_dilation) == (False, False, True)
  for v in ("protonet", "ctx", "ctx_simclr", "ctx_simclr_aug"):
    o = load_config("ctx", f"variant={v},data=/x").fewshot
    assert o.lr_head is False and o.aux_loss_weight == 0.0
  config_lib.validate(load_config("ctx", "variant=ctx_simclr_aug_lr,mini,runlocal"))
  for key, value, message in (("lr_lambda", -1.0, "lr_lambda must be a finite number >= 0"),
                              ("aux_loss_weight", float("inf"), "aux_loss_weight must be a finite"),
                              ("lr_C", 0.0, "lr_C must be a finite number > 0"),
                              ("lr_C", float("nan"), "lr_C must be a finite number > 0"),
                              ("lr_max_iter", 0, "lr_max_iter must be a positive integer")):
    c = load_config("ctx", "variant=ctx_simclr_aug_lr,runlocal")
    c.fewshot[key] = value
    with pytest.raises(ConfigError, match=message):
      config_lib.validate(c)


@requires_fashion_mnist
def test_support_class_ids_follow_the_images_through_simclr_and_across_sources(mini_dir):
  from visrep_jax.data import episode_augment
  from visrep_jax.data import meta_dataset as md
  c = load_config("ctx", f"variant=ctx_simclr_aug_lr,runlocal,data={mini_dir}")
  src = ep_lib.EpisodeSource(os.path.join(mini_dir, "fashion_mnist"), "train",
                             episodic.descr_config(c.episodes), 28, channels=1)
  assert src.num_classes == 6
  ep = src.sample(seed=7)
  ids, mask = ep["support_class_ids"], ep["support_mask"]
  assert ids.dtype == np.int32 and np.all(ids[~mask] == -1) and np.all(ids[mask] >= 0)
  classes = src.spec.get_classes(md.Split.TRAIN)
  own = {i: {im.tobytes() for im in md.load_class_images(src.spec, classes[i], 28, 1)}
         for i in set(ids[mask].tolist())}
  for k in np.flatnonzero(mask):
    assert ep["images"][k].tobytes() in own[int(ids[k])]
  # Same label <=> same class id in an MD episode.
  for lab in set(ep["support_labels"][mask].tolist()):
    assert len(set(ids[mask & (ep["support_labels"] == lab)].tolist())) == 1
  # A SimCLR episode relabels the support by index but keeps each image's class id.
  aug = ep_lib.augment_episode(ep, episode_augment.parse("simclr_episodes(prob=1.0)"), seed=3)
  assert bool(aug["is_simclr"])
  np.testing.assert_array_equal(aug["support_labels"][mask], np.flatnonzero(mask))
  np.testing.assert_array_equal(aug["support_class_ids"], ids)
  # Two sources: the second one's ids are offset by the first one's classes.
  stream = ep_lib.EpisodeStream([src, src], seed=0, prefetch=0)
  assert stream.num_classes == 12
  seen = set()
  for _ in range(8):
    e = next(stream)
    real = e["support_class_ids"][e["support_mask"]]
    assert np.all(real < 6) or np.all(real >= 6)
    seen.add(bool(real[0] >= 6))
  assert seen == {False, True}


@requires_fashion_mnist
def test_ctx_simclr_aug_lr_runlocal_through_main(mini_dir, tmp_path):
  wd = str(tmp_path / "wd")
  cmd = [sys.executable, "-m", "visrep_jax.main", f"--workdir={wd}",
         f"--config={os.path.join(REPO, 'configs', 'ctx.py')}:variant=ctx_simclr_aug_lr,mini,"
         f"runlocal,data={mini_dir}"]
  # Two devices: the images are split over them, the eval outputs must come back whole.
  p = subprocess.run(cmd, cwd=str(tmp_path), env=subprocess_env(2), capture_output=True,
                     text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  out = p.stdout
  assert "Auxiliary loss: 6-way train-class cross-entropy" in out
  assert "prediction = argmax(ctx + 5 * LR log-probabilities), LR C=10" in out
  rows = [l for l in out.splitlines() if l.startswith("| fashion_mnist |")
          or l.startswith("| digits |")]
  assert len(rows) == 2 and all(l.count("+-") == 3 for l in rows), out[-2000:]
  assert "| ctx + 5 LR test source | accuracy (%) | 95% CI | head alone (%) | LR alone (%)" in out
  saved = json.load(open(os.path.join(wd, "fewshot_test.json")))
  assert saved["lr_head"] == {"lr_lambda": 5.0, "C": 10.0, "max_iter": 1000, "solver": "lbfgs"}
  for r in saved["results"].values():
    assert r["episodes"] == 6
    # Every column of the table is the saved number (combined, head alone, LR alone).
    assert (f"| {100 * r['accuracy']:.2f} | +-{100 * r['ci95']:.2f} | "
            f"{100 * r['head_accuracy']:.2f} +-{100 * r['head_ci95']:.2f} | "
            f"{100 * r['lr_accuracy']:.2f} +-{100 * r['lr_ci95']:.2f} |") in out, out[-2000:]
  lines = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  aux = [l["train/aux_loss"] for l in lines if "train/aux_loss" in l]
  assert len(aux) == 3 and abs(aux[0] - np.log(6)) < 0.1 and all(np.isfinite(aux))
  assert any("valid/accuracy" in l for l in lines)
