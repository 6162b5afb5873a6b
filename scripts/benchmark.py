#!/usr/bin/env python
"""Throughput benchmark of a visrep_jax model on synthetic data, optionally against timm.

  python scripts/benchmark.py --model=deit3_small_patch16_224 --batch_size=32 --resolution=224 \
      --vs-timm

Reports, for JAX (and with ``--vs-timm`` for the equivalent timm model in PyTorch, timed in the
same process and interleaved with JAX so that background load affects both alike):
  * training images/s: one jitted step = forward + backward + AdamW update, softmax CE,
    parameters and optimizer state donated;
  * inference images/s: jitted forward in eval mode;
  * model FLOPs from XLA's cost analysis of the compiled forward (and train step);
  * MFU against a matmul peak measured on this machine in the benchmark's dtype.
Each figure is the median over ``--repeats`` timed windows of ``--steps`` steps, after
``--settle_rounds`` untimed rounds of windows (frameworks interleaved as in the timed ones).

On a GPU, timm runs on CUDA too (``--torch_device``), with ``torch.autocast`` for
``--dtype=bfloat16`` and TF32 float32 matmuls (JAX's default there); ``--attention`` picks the
JAX attention implementation. TensorFlow is never imported (it is blocked below, so a transitive
import fails loudly); torch is imported only with ``--vs-timm``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# Make the repository importable when run as `python scripts/benchmark.py` without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Must run on hosts with JAX but without TensorFlow: make any (transitive) TF import fail here.
sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]

from visrep_jax.utils import xla as xla_utils  # noqa: E402  (no jax import)
from visrep_jax.utils import malloc as malloc_utils  # noqa: E402  (no jax import)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="deit3_small_patch16_224")
  p.add_argument("--batch_size", "--batch-size", type=int, default=32)
  p.add_argument("--resolution", type=int, default=None, help="default: the model's img_size")
  p.add_argument("--steps", type=int, default=2, help="steps per timed window")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  p.add_argument("--settle_rounds", "--settle-rounds", type=int, default=1,
                 help="untimed rounds of windows (each framework in turn) before the timed ones")
  p.add_argument("--repeats", type=int, default=5,
                 help="timed windows per framework and mode; medians are reported")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--vs-timm", "--vs_timm", dest="vs_timm", action="store_true",
                 help="also time the timm model in PyTorch and print JAX/timm ratios")
  p.add_argument("--timm_model", default=None, help="timm name if it differs from --model")
  p.add_argument("--torch_ref", default=None,
                 help="with --vs-timm: time this PyTorch model instead of a timm one, given as "
                      "'module:callable' (e.g. tests.torch_refs.patchconvnet_ref:S60, run from "
                      "the repository root) or 'path/to/file.py:callable'; called with "
                      "img_size=RES, it must return an nn.Module with a num_classes attribute")
  p.add_argument("--no-train", dest="train", action="store_false")
  p.add_argument("--no-infer", dest="infer", action="store_false")
  p.add_argument("--no-cpu-flags", dest="cpu_flags", action="store_false",
                 help="do not apply visrep_jax.utils.xla.set_cpu_flags() (for comparison)")
  p.add_argument("--host_devices", "--host-devices", default="1",
                 help="CPU only: XLA host devices the batch is split over, data parallel in this "
                      "process (config.cpu_devices of python -m visrep_jax.main; see "
                      "visrep_jax.utils.xla.set_cpu_flags). A list (e.g. 1,2) runs the benchmark "
                      "once per value, each in its own process, and compares them")
  p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
  p.add_argument("--torch_device", default=None,
                 help="torch device for --vs-timm (default: 'cuda' when JAX runs on a GPU and "
                      "torch sees one, else 'cpu')")
  p.add_argument("--attention", default=None, choices=["bhnd", "xla", "cudnn"],
                 help="attention implementation of transformer models (default: by backend and "
                      "dtype, see visrep_jax.models.layers.self_attention)")
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--weight_decay", type=float, default=0.05)
  args = p.parse_args(argv)
  try:
    args.host_devices_list = [int(v) for v in args.host_devices.split(",")]
    if any(v < 1 for v in args.host_devices_list):
      raise ValueError
  except ValueError:
    p.error(f"--host_devices={args.host_devices!r}: give integers >= 1, e.g. 2 or 1,2")
  args.host_devices_str, args.host_devices = args.host_devices, args.host_devices_list[0]
  return args


SUMMARY = "SUMMARY "


def compare_host_devices(args, argv):
  """One child process per --host_devices value (XLA flags are process-wide); prints each
  child's output, then its JAX figures against the first value's and against timm's."""
  import json
  import subprocess
  if xla_utils.HOST_DEVICE_FLAG in os.environ.get("XLA_FLAGS", ""):
    raise SystemExit(f"--host_devices={args.host_devices_str}: XLA_FLAGS already sets "
                     f"{xla_utils.HOST_DEVICE_FLAG}, which would override every count; unset it.")
  rest, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a in ("--host_devices", "--host-devices"):
      skip = True  # its value is the next argument
    elif not a.startswith(("--host_devices=", "--host-devices=")):
      rest.append(a)
  results = {}
  for n in args.host_devices_list:
    print(f"===== --host_devices={n}", flush=True)
    r = subprocess.run([sys.executable, os.path.abspath(__file__), *rest, f"--host_devices={n}"],
                       capture_output=True, text=True)
    out = [l for l in r.stdout.splitlines() if not l.startswith(SUMMARY)]
    print("\n".join(out), flush=True)
    done = [l for l in r.stdout.splitlines() if l.startswith(SUMMARY)]
    if r.returncode or not done:
      raise SystemExit(f"--host_devices={n} failed:\n{r.stderr[-2000:]}")
    results[n] = json.loads(done[-1][len(SUMMARY):])
  first = args.host_devices_list[0]
  print(f"\n{'host devices':>12} {'mode':<6} {'jax img/s':>9} {f'vs {first}':>7} {'jax/timm':>8}")
  for n, res in results.items():
    for mode, row in res.items():
      base = results[first][mode]["jax"]
      ratio = f"{row['ratio']:8.2f}" if row.get("ratio") is not None else f"{'-':>8}"
      print(f"{n:>12} {mode:<6} {row['jax']:9.2f} {row['jax'] / base:6.2f}x {ratio}")


ARGS = parse_args()
if len(ARGS.host_devices_list) > 1:
  compare_host_devices(ARGS, sys.argv[1:])
  sys.exit(0)
# Both frameworks run in this process, so both get the same allocator: tcmalloc when installed
# (visrep_jax/utils/malloc.py; VISREP_MALLOC=system for glibc's). Printed in the header.
malloc_utils.ensure_tcmalloc(script=__file__)
if ARGS.cpu_flags:
  xla_utils.set_cpu_flags(devices=ARGS.host_devices)
elif ARGS.host_devices > 1:
  xla_utils.merge_xla_flags({xla_utils.HOST_DEVICE_FLAG: str(ARGS.host_devices)})

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from visrep_jax import models  # noqa: E402
from visrep_jax.utils.benchmarking import (  # noqa: E402
    cost_flops, make_jax_train_step, measure_matmul_peak)


# ---------------------------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------------------------

def make_jax_infer(model):
  return jax.jit(lambda variables, images: model.apply(variables, images, train=False)[0])


class JaxBench:

  def __init__(self, args, res):
    self.args = args
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    overrides = {"dtype": dtype}
    probe = models.create(args.model)
    if hasattr(probe, "img_size"):
      overrides["img_size"] = res
    if args.attention:
      if not hasattr(probe, "attention"):
        raise SystemExit(f"--attention: {args.model} has no attention implementation choice")
      overrides["attention"] = args.attention
    self.model = models.create(args.model, **overrides)
    b = args.batch_size
    rng = np.random.RandomState(0)
    # Several devices (CPU host devices, see --host_devices): the batch is split over them and
    # the state replicated, as the framework's trainer does with its default data-parallel mesh.
    # Off CPU: one accelerator, as timm gets (and as the measured matmul peak is).
    n_dev = args.host_devices if jax.default_backend() == "cpu" else 1
    if len(jax.devices()) < n_dev:
      raise SystemExit(f"--host_devices={n_dev}, but JAX sees {len(jax.devices())} devices")
    self.devices = jax.devices()[:n_dev]
    mesh = jax.sharding.Mesh(np.array(self.devices), ("data",))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if b % n_dev:
      raise SystemExit(f"--batch_size={b} is not divisible by the {n_dev} devices")
    self.images = jax.device_put(rng.randn(b, res, res, 3).astype(np.float32), batch_sharding)
    n_cls = max(getattr(self.model, "num_classes", 1000), 1)
    self.labels = jax.device_put(rng.randint(0, n_cls, size=(b,)).astype(np.int32),
                                 batch_sharding)
    self.rng = jax.device_put(jax.random.PRNGKey(0), replicated)
    variables = jax.jit(lambda k: self.model.init(k, jnp.zeros((1, res, res, 3))),
                        out_shardings=replicated)(self.rng)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    self.n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    self.tx = optax.adamw(args.lr, weight_decay=args.weight_decay)
    # Inference gets its own copy: training donates (and so invalidates) its state.
    self.infer_vars = jax.tree_util.tree_map(jnp.copy, {"params": params, **model_state})
    self.state = {"params": params, "model_state": model_state,
                  "opt_state": jax.jit(self.tx.init, out_shardings=replicated)(params)}

    t = time.perf_counter()
    self.fwd_flops = self.train_flops = float("nan")
    if args.infer or args.train:  # the forward's FLOPs are reported in either mode
      self.infer_fn = make_jax_infer(self.model)
      # Forward-only executables get their own CPU options (see visrep_jax.utils.xla).
      opts = xla_utils.cpu_compiler_options("infer") if args.cpu_flags else {}
      infer_c = self.infer_fn.lower(self.infer_vars, self.images).compile(
          compiler_options=opts or None)
      self.fwd_flops = cost_flops(infer_c, n_dev) / b
      self.infer_fn = infer_c
    if args.train:  # compiling the train step is most of the start-up of a large model
      self.train_fn = make_jax_train_step(self.model, self.tx, replicated, batch_sharding)
      train_c = self.train_fn.lower(self.state, self.images, self.labels, self.rng).compile()
      self.train_flops = cost_flops(train_c, n_dev) / b
      self.train_fn = train_c
    self.compile_s = time.perf_counter() - t

  def train(self, steps):
    loss = None
    for _ in range(steps):
      self.state, loss = self.train_fn(self.state, self.images, self.labels, self.rng)
    jax.block_until_ready((self.state, loss))
    return loss

  def infer(self, steps):
    out = None
    for _ in range(steps):
      out = self.infer_fn(self.infer_vars, self.images)
    jax.block_until_ready(out)


# ---------------------------------------------------------------------------------------------
# timm / PyTorch (imported only with --vs-timm)
# ---------------------------------------------------------------------------------------------

class TimmBench:

  def __init__(self, args, res):
    import torch
    import timm
    self.torch = torch
    torch.set_num_threads(args.threads or os.cpu_count())
    self.device = args.torch_device or (
        "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu")
    if self.device.startswith("cuda"):
      # JAX's default float32 matmul precision on GPU uses TF32 tensor cores; match it.
      torch.set_float32_matmul_precision("high")
    if args.torch_ref:
      self.model = _load_torch_ref(args.torch_ref)(img_size=res)
    else:
      name = args.timm_model or args.model
      try:
        self.model = timm.create_model(name, pretrained=False, img_size=res)
      except TypeError:  # convnets take any resolution and have no img_size argument
        self.model = timm.create_model(name, pretrained=False)
    self.model = self.model.to(self.device)
    self.n_params = sum(p.numel() for p in self.model.parameters())
    b = args.batch_size
    rng = np.random.RandomState(0)
    self.images = torch.from_numpy(rng.randn(b, 3, res, res).astype(np.float32)).to(self.device)
    n_cls = max(self.model.num_classes, 1)
    self.labels = torch.from_numpy(
        rng.randint(0, n_cls, size=(b,)).astype(np.int64)).to(self.device)
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr,
                                 weight_decay=args.weight_decay)
    self.loss = torch.nn.CrossEntropyLoss()
    self.bf16 = args.dtype == "bfloat16"

  def _autocast(self):
    return self.torch.autocast(self.device.split(":")[0], dtype=self.torch.bfloat16,
                               enabled=self.bf16)

  def _sync(self):
    if self.device.startswith("cuda"):
      self.torch.cuda.synchronize()

  def train(self, steps):
    self.model.train()
    loss = self.torch.zeros(())
    for _ in range(steps):
      self.opt.zero_grad(set_to_none=True)
      with self._autocast():
        loss = self.loss(self.model(self.images), self.labels)
      loss.backward()
      self.opt.step()
    self._sync()
    return float(loss.detach())

  def infer(self, steps):
    self.model.eval()
    with self.torch.no_grad(), self._autocast():
      for _ in range(steps):
        self.model(self.images)
    self._sync()


def _load_torch_ref(spec: str):
  """'module:callable' or 'file.py:callable' -> the callable (for non-timm PyTorch models)."""
  import importlib
  import importlib.util
  target, sep, attr = spec.rpartition(":")
  if not sep or not target or not attr:
    raise SystemExit(f"--torch_ref must be 'module:callable' or 'file.py:callable', got {spec!r}")
  if target.endswith(".py"):
    modspec = importlib.util.spec_from_file_location("_torch_ref", target)
    if modspec is None or not os.path.exists(target):
      raise SystemExit(f"--torch_ref: no such file {target}")
    module = importlib.util.module_from_spec(modspec)
    modspec.loader.exec_module(module)
  else:
    module = importlib.import_module(target)
  return getattr(module, attr)


# ---------------------------------------------------------------------------------------------

def timed(fn, steps):
  """Wall and process-CPU seconds of ``fn(steps)``."""
  t, c = time.perf_counter(), time.process_time()
  fn(steps)
  return time.perf_counter() - t, time.process_time() - c


def main(args):
  try:
    probe = models.create(args.model)
  except ValueError as e:  # unknown name (UnknownNameError) or bad option: one line, no traceback
    raise SystemExit(f"--model: {e}") from None
  res = args.resolution or getattr(probe, "img_size", 224)
  b = args.batch_size
  print(f"devices: {jax.devices()}  cores: {os.cpu_count()}  jax {jax.__version__}  "
        f"matmul precision: {jax.config.jax_default_matmul_precision or 'default'}")
  print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')!r}  inference compile options: "
        f"{xla_utils.cpu_compiler_options('infer') if args.cpu_flags else {}}  "
        f"allocator: {malloc_utils.active_allocator()}")
  on_cpu = jax.default_backend() == "cpu"
  peak = measure_matmul_peak(jnp.dtype(args.dtype), n=4096 if on_cpu else 8192)
  print(f"measured {args.dtype} matmul peak: {peak / 1e9:.1f} GFLOP/s")

  jb = JaxBench(args, res)
  print(f"{args.model} @ {res}px, batch {b}, {args.dtype}: {jb.n_params / 1e6:.2f}M params, "
        f"JAX compile {jb.compile_s:.1f}s")
  benches = {"jax": jb}
  if args.vs_timm:
    benches["timm"] = TimmBench(args, res)
    import torch
    ref = f"torch_ref {args.torch_ref}" if args.torch_ref else "timm"
    print(f"torch {torch.__version__} on {benches['timm'].device}, "
          f"{torch.get_num_threads()} threads, "
          f"{ref} params {benches['timm'].n_params / 1e6:.2f}M")

  modes = [m for m, on in (("train", args.train), ("infer", args.infer)) if on]
  for mode in modes:  # warm-up: JIT/dispatch caches, torch allocator, oneDNN primitives
    for bench in benches.values():
      getattr(bench, mode)(args.warmup)
  # Interleave frameworks window by window, so that load from other processes on the machine
  # hits both alike; the JAX/timm ratio is the median of the ratios of adjacent windows. One mode
  # at a time: alternating JAX's train and inference executables fragments the allocator's free
  # memory, and the next train step's temporary buffer is faulted in afresh (slower windows).
  wall = {(k, m): [] for k in benches for m in modes}
  cpu = {(k, m): [] for k in benches for m in modes}
  for mode in modes:
    # Untimed settling rounds, interleaved as the timed ones: the first window of each framework
    # after the other one's first steps ran slow (the two frameworks' memory settling in the
    # shared allocator; DeiT-S, 2-core CPU: the first JAX window took 1.5-1.8x the next ones).
    for _ in range(args.settle_rounds):
      for bench in benches.values():
        getattr(bench, mode)(args.steps)
    for _ in range(args.repeats):
      for key, bench in benches.items():
        w, c = timed(getattr(bench, mode), args.steps)
        wall[(key, mode)].append(w)
        cpu[(key, mode)].append(c)

  n_img = b * args.steps
  flops = {"train": jb.train_flops, "infer": jb.fwd_flops}
  print(f"\nforward GFLOPs/img (XLA cost analysis): {jb.fwd_flops / 1e9:.4g}   "
        f"train step GFLOPs/img: {jb.train_flops / 1e9:.4g}   "
        f"(median of {args.repeats} windows x {args.steps} steps)")
  header = (f"{'mode':<6} {'framework':<9} {'img/s':>7} {'min-max':>11} {'cpu-s/img':>9} "
            f"{'TFLOP/s':>7} {'MFU':>6}")
  if "timm" in benches:
    header += f" {'jax/timm':>8}"
  print(header)
  print("-" * len(header))
  summary = {}
  for mode in modes:
    for key in benches:
      ips = n_img / statistics.median(wall[(key, mode)])
      lo, hi = n_img / max(wall[(key, mode)]), n_img / min(wall[(key, mode)])
      cpu_per_img = statistics.median(cpu[(key, mode)]) / n_img
      achieved = ips * flops[mode]  # the same model FLOPs for both frameworks
      row = (f"{mode:<6} {key:<9} {ips:7.2f} {f'{lo:.1f}-{hi:.1f}':>11} {cpu_per_img:9.3f} "
             f"{achieved / 1e12:7.3f} {achieved / peak:6.1%}")
      if key == "timm":
        ratio = statistics.median(t / j for j, t in zip(wall[("jax", mode)], wall[("timm", mode)]))
        summary[mode] = ratio
        row += f" {ratio:8.2f}"
      print(row)
  print("seconds per window (per framework and mode, in time order): " + "; ".join(
      f"{k} {m}: " + " ".join(f"{w:.2f}" for w in wall[(k, m)]) for m in modes for k in benches))
  if summary:
    print("JAX/timm throughput: " + ", ".join(f"{m} {r:.2f}x" for m, r in summary.items()))
  import json
  print(SUMMARY + json.dumps({m: {"jax": n_img / statistics.median(wall[("jax", m)]),
                                  "ratio": summary.get(m)} for m in modes}))
  if sys.modules.get("tensorflow") is not None:
    raise RuntimeError("TensorFlow got imported")


if __name__ == "__main__":
  main(ARGS)
