r"""Where a CrossTransformer looks: attention maps of query positions over support images.

The paper's Fig. 3 and App. D (L721-730, Figs. 5-14; spec crosstransformers.md §6): for a query
image and a few (3) positions of its feature map, the attention of that position over the
support images of the query's true class (Eq. 1's softmax runs jointly over all positions of all
the class's support images, so per query position the maps of the class sum to 1), upsampled
to the image and overlaid. One figure row per query position: the query with the position
marked, then up to ``max_support`` support images of the class, each titled with its share of
the attention.

    python -m visrep_jax.evaluators.fewshot_viz --workdir=/tmp/ctx --source=aircraft \
        --split=test --seed=0 --out=/tmp/ctx_aircraft.png

The CLI rebuilds the model from ``WORKDIR/config.json`` (``trainers.episodic.build``), restores
the latest checkpoint (``--best``: the best-validation one, which the test numbers use), samples
episode ``--seed`` of ``--source`` (default: the first test source) and writes the PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from visrep_jax.trainers import episodic


class FewshotVizError(ValueError):
  """A bad argument, workdir or episode; printed as one line by the CLI."""


def default_positions(h: int, w: int) -> List[Tuple[int, int]]:
  """Three spread-out cells of an h x w map (centre, upper left, lower right), duplicates dropped
  (a tiny map has fewer distinct cells)."""
  out: List[Tuple[int, int]] = []
  for p in ((h // 2, w // 2), (h // 4, w // 4), ((3 * h) // 4, (3 * w) // 4)):
    if p not in out:
      out.append(p)
  return out


def feature_shape(backbone, params, model_state, image_shape) -> Tuple[int, int]:
  """(h, w) of the backbone's feature map for images of ``image_shape`` (H, W, C); no compute."""
  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  out = jax.eval_shape(lambda p, s, x: _features(backbone, p, s, x, None), params, model_state, x)
  return int(out.shape[1]), int(out.shape[2])


def _features(backbone, params, model_state, images, bn_mask):
  variables = {"params": params["backbone"], **model_state}
  if bn_mask is None:  # EMA (running) statistics
    _, out = backbone.apply(variables, images, train=False)
    return out["feature_map"]
  (_, out), _ = backbone.apply(variables, images, train=True, bn_mask=bn_mask,
                               mutable=["batch_stats"])
  return out["feature_map"]


def episode_attention(backbone, head, params, model_state, episode: Dict[str, Any],
                      query_index: int = 0, bn_mode: str = "ema"):
  """(logits [C], attention [h*w, S, h'*w'] float32, (h, w), (h', w')) of one query of a
  padded episode, with the trainer's preprocessing and BatchNorm test mode (``ema`` or
  ``support``: statistics of the real support images, as ``episodic.episode_logits``)."""
  if head is None:
    raise FewshotVizError("attention maps need the CrossTransformer head (fewshot.head='ctx'); "
                          "Prototypical Nets have no attention.")
  labels = np.asarray(episode["support_labels"]).astype(np.int32)
  n_support = labels.shape[0]
  mask = np.asarray(episode.get("support_mask", np.ones(n_support, bool))).astype(bool)
  valid = mask & (labels >= 0)
  if not valid.any():
    raise FewshotVizError("the episode has no real support image.")
  num_ways = max(int(episode.get("num_ways", 0) or 0), int(labels[valid].max()) + 1)
  images = np.asarray(episode["images"])
  if not 0 <= query_index < images.shape[0] - n_support:
    raise FewshotVizError(f"query_index {query_index} is outside the episode's "
                          f"{images.shape[0] - n_support} query slots.")
  batch = np.concatenate([images[:n_support], images[n_support + query_index][None]])
  if bn_mode not in episodic.BN_TEST_MODES:
    raise FewshotVizError(f"bn_mode must be one of {episodic.BN_TEST_MODES}, got {bn_mode!r}.")

  def feature_maps(params, model_state, batch, mask):
    bn_mask = None
    if bn_mode == "support":
      bn_mask = jnp.concatenate([mask, jnp.zeros((1,), bool)])
    return _features(backbone, params, model_state, episodic.normalize_images(batch), bn_mask)

  def run(params, model_state, batch, labels, mask):
    fmap = feature_maps(params, model_state, batch, mask)
    sup, qry = fmap[:n_support], fmap[n_support:]
    logits, attention = head.apply({"params": params["head"]}, qry, sup, labels, mask,
                                   num_classes=num_ways, return_attention=True)
    return logits[0], attention[0]

  args = (params, model_state, jnp.asarray(batch), jnp.asarray(labels), jnp.asarray(mask))
  fshape = jax.eval_shape(feature_maps, *args[:3], args[4]).shape
  logits, attention = jax.jit(run)(*args)
  hw = (int(fshape[1]), int(fshape[2]))  # query and support maps have the same size here
  return np.asarray(logits, np.float32), np.asarray(attention, np.float32), hw, hw


def _show(ax, img):
  img = np.clip(np.asarray(img, np.float32), 0, 255).astype(np.uint8)
  if img.ndim == 3 and img.shape[-1] == 1:
    ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255)
  else:
    ax.imshow(img)
  ax.set_xticks([])
  ax.set_yticks([])


def attention_figure(backbone, head, params, model_state, episode: Dict[str, Any],
                     query_index: int = 0,
                     query_positions: Optional[Sequence[Tuple[int, int]]] = None,
                     max_support: int = 3, out_png: str = "ctx_attention.png",
                     bn_mode: str = "ema", return_data: bool = False):
  """Writes the figure to ``out_png`` and returns its path (with ``return_data``: (path, data),
  data = the numbers plotted: ``positions``, ``label`` (the query's class), ``class_support``
  (indices of all its support images), ``plotted_support`` (the first ``max_support``),
  ``attention`` [positions, class images, h', w'] (all the class's images), ``mass`` (its sum
  per image: each row sums to 1), ``logits``).

  ``query_positions``: (row, col) cells of the query's feature map (default
  :func:`default_positions`). ``episode``: as ``EpisodeSource.sample`` (support images first)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.patches import Rectangle

  if max_support < 1:
    raise FewshotVizError(f"max_support must be >= 1, got {max_support}.")
  labels = np.asarray(episode["support_labels"]).astype(np.int32)
  n_support = labels.shape[0]
  query_labels = np.asarray(episode["query_labels"]).astype(np.int32)
  query_mask = np.asarray(episode.get("query_mask", np.ones_like(query_labels, bool))).astype(bool)
  if not 0 <= query_index < query_labels.shape[0]:
    raise FewshotVizError(f"query_index {query_index} is outside the episode's "
                          f"{query_labels.shape[0]} query slots.")
  label = int(query_labels[query_index])
  if not query_mask[query_index] or label < 0:
    raise FewshotVizError(f"query {query_index} is padding; pick a real query "
                          f"(0..{int(query_mask.sum()) - 1}).")
  support_mask = np.asarray(episode.get("support_mask", np.ones(n_support, bool))).astype(bool)
  class_support = np.flatnonzero(support_mask & (labels == label))
  if class_support.size == 0:
    raise FewshotVizError(f"class {label} of query {query_index} has no support image.")

  images = np.asarray(episode["images"])
  h, w = feature_shape(backbone, params, model_state, images.shape[1:])
  positions = [tuple(int(v) for v in p) for p in (query_positions or default_positions(h, w))]
  for r, c in positions:
    if not (0 <= r < h and 0 <= c < w):
      raise FewshotVizError(f"query position {(r, c)} is outside the {h}x{w} feature map.")
  logits, attention, _, (hs, ws) = episode_attention(
      backbone, head, params, model_state, episode, query_index, bn_mode)
  idx = [r * w + c for r, c in positions]  # the head flattens [h, w] row-major
  att = attention[idx][:, class_support].reshape(len(idx), class_support.size, hs, ws)
  mass = att.sum(axis=(2, 3))
  plotted = class_support[:max_support]

  query_img = images[n_support + query_index]
  H, W = query_img.shape[:2]
  n_rows, n_cols = len(positions), 1 + plotted.size
  fig = Figure(figsize=(2.4 * n_cols, 2.5 * n_rows))
  FigureCanvasAgg(fig)
  axes = fig.subplots(n_rows, n_cols, squeeze=False)
  for i, (r, c) in enumerate(positions):
    ax = axes[i, 0]
    _show(ax, query_img)
    ch, cw = H / h, W / w
    ax.add_patch(Rectangle((c * cw - 0.5, r * ch - 0.5), cw, ch, fill=False, edgecolor="red",
                           linewidth=2))
    ax.plot([(c + 0.5) * cw - 0.5], [(r + 0.5) * ch - 0.5], "r+", markersize=8)
    ax.set_title(f"query {query_index} (class {label})\nposition ({r}, {c})", fontsize=8)
    vmax = float(att[i, :plotted.size].max()) or 1.0
    for j, s in enumerate(plotted):
      ax = axes[i, 1 + j]
      simg = images[int(s)]
      _show(ax, simg)
      sh, sw = simg.shape[:2]
      ax.imshow(att[i, j], cmap="jet", alpha=0.5, vmin=0.0, vmax=vmax, interpolation="bilinear",
                extent=(-0.5, sw - 0.5, sh - 0.5, -0.5))
      ax.set_title(f"support {int(s)}: {mass[i, j]:.2f} of the class", fontsize=8)
  fig.suptitle(f"CrossTransformer attention of query {query_index}\nover the {class_support.size} "
               f"support images of class {label} ({plotted.size} shown)", fontsize=9)
  fig.tight_layout()
  out_dir = os.path.dirname(os.path.abspath(out_png))
  os.makedirs(out_dir, exist_ok=True)
  fig.savefig(out_png, dpi=100)
  if not return_data:
    return out_png
  return out_png, {"positions": positions, "label": label, "class_support": class_support,
                   "plotted_support": plotted, "attention": att, "mass": mass,
                   "logits": logits, "feature_shape": (h, w), "support_shape": (hs, ws)}


# ------------------------------------------------------------------------------------- the CLI


def _tuples(x):
  """config.json lists -> tuples (config.json is JSON; Flax module fields want tuples)."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def load_config(workdir: str):
  import ml_collections
  if not os.path.isdir(workdir):
    raise FewshotVizError(f"workdir {workdir!r} does not exist.")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FewshotVizError(f"{path} not found: train this workdir with the episodic trainer "
                          "(configs/ctx.py) first.")
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise FewshotVizError(f"{path} is not readable JSON ({str(e).splitlines()[0]}).") from None
  head = (data.get("fewshot") or {}).get("head", "protonet")
  if data.get("trainer") != "episodic" or head != "ctx":
    raise FewshotVizError(f"{path}: attention maps need the CrossTransformer head, but this "
                          f"workdir has trainer={data.get('trainer')!r}, fewshot.head={head!r}.")
  for sect in ("model",):
    if isinstance(data.get(sect), dict):
      data[sect] = _tuples(data[sect])
  if "mesh" in data:
    data["mesh"] = _tuples(data["mesh"])
  return ml_collections.ConfigDict(data)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--source", help="default: the config's first test source")
  ap.add_argument("--split", default="test")
  ap.add_argument("--seed", type=int, default=0, help="the episode")
  ap.add_argument("--query_index", type=int, default=0)
  ap.add_argument("--max_support", type=int, default=3)
  ap.add_argument("--best", action="store_true",
                  help="the best-validation checkpoint (WORKDIR/best) instead of the latest")
  ap.add_argument("--bn", choices=episodic.BN_TEST_MODES,
                  help="BatchNorm test mode (default: the config's fewshot.bn_test_mode)")
  ap.add_argument("--out", help="default: WORKDIR/ctx_attention_<source>_<split>_<seed>.png")
  args = ap.parse_args(argv)

  from visrep_jax import checkpoint as ckpt_lib
  from visrep_jax.config_lib import ConfigError
  from visrep_jax.data.episode_pipeline import EpisodeError
  from visrep_jax.data import DataError
  from visrep_jax.registry import UnknownNameError
  try:
    config = load_config(args.workdir)
    source = args.source or list(config.episodes.test_sources)[0]
    out = args.out or os.path.join(args.workdir,
                                   f"ctx_attention_{source}_{args.split}_{args.seed}.png")
    b = episodic.build(config)
    ckpt = ckpt_lib.Checkpointer(os.path.join(args.workdir, "best") if args.best
                                 else args.workdir, async_save=False)
    step = ckpt.latest_step()
    if step is None:
      raise FewshotVizError(f"no checkpoint in {ckpt.directory}; train the workdir first.")
    abstract = ckpt_lib.abstract_with_shardings(b["state"], b["state_shardings"])
    state, _ = ckpt.restore(abstract, step)
    ckpt.close()
    src = episodic._open_eval_sources(config, args.split, [source], b["shapes"])[0]  # pylint: disable=protected-access
    episode = src.sample(args.seed)
    path = attention_figure(b["backbone"], b["head"], state.params, state.model_state, episode,
                            query_index=args.query_index, max_support=args.max_support,
                            out_png=out, bn_mode=args.bn or config.fewshot.bn_test_mode)
  except (FewshotVizError, ConfigError, EpisodeError, DataError, UnknownNameError,
          ckpt_lib.CheckpointMismatchError) as e:
    print(f"error: {(str(e).splitlines() or [repr(e)])[0]}", file=sys.stderr)
    return 2
  print(f"wrote {path} (checkpoint step {step}, {source}:{args.split} episode {args.seed}, "
        f"query {args.query_index})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
