"""Top-1 / top-5 / loss over a padded, masked evaluation split (each example counted once)."""

from __future__ import annotations

from typing import Dict

import jax
import numpy as np

from visrep_jax.data import pipeline


def evaluate(eval_step, state, eval_input: "pipeline.EvalInput", batch_sharding,
             progress_bar: bool = False, desc: str = "eval") -> Dict[str, float]:
  sums = None
  batches = eval_input.batches
  it = iter(batches)
  bar = None
  if progress_bar and jax.process_index() == 0:
    from tqdm import tqdm
    bar = tqdm(total=eval_input.num_batches, desc=desc, leave=False, dynamic_ncols=True)
  for batch in it:
    out = eval_step(state, pipeline.to_global(batch, batch_sharding))
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  sums = jax.tree.map(lambda x: float(np.asarray(jax.device_get(x))), sums)
  n = max(sums["count"], 1.0)
  return {"top1": sums["top1"] / n, "top5": sums["top5"] / n, "loss": sums["loss"] / n,
          "num_examples": sums["count"]}
