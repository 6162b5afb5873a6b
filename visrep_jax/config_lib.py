"""Config helpers: the common keys every trainer honours, ``file.py:k=v,flag`` argument parsing
and start-up validation with errors that list what is valid."""

from __future__ import annotations

import ast
import math
import os
import re
from typing import Any, Dict, Iterable, Optional

import ml_collections

TRAINERS = ("supervised", "episodic")
DTYPES = ("float32", "bfloat16", "float16")
SHARDING_RULES = ("replicate", "fsdp")


class ConfigError(ValueError):
  """A bad config key or value; the message says which and what is valid."""


def parse_arg(arg: Optional[str], **defaults) -> ml_collections.ConfigDict:
  """Parses the ``:k=v,flag`` part of ``--config=file.py:k=v,flag``.

  ``defaults`` gives every accepted key and its default value (its type is the parse type);
  a bare word ``flag`` sets a bool key to True. Unknown keys raise ``ConfigError``.
  """
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, eq, val = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"Unknown config argument {key!r} in {arg!r}. Valid: "
                        f"{', '.join(f'{k}={v!r}' for k, v in defaults.items())}.")
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise ConfigError(f"Config argument {key!r} needs a value ({key}=...).")
      out[key] = True
      continue
    val = val.strip()
    if isinstance(default, bool):
      if val.lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise ConfigError(f"Config argument {key}={val!r} must be true or false.")
      out[key] = val.lower() in ("1", "true", "yes")
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
      try:
        out[key] = type(default)(ast.literal_eval(val))
      except (ValueError, SyntaxError):
        raise ConfigError(f"Config argument {key}={val!r} must be a number.") from None
    else:
      out[key] = val
  return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  """The keys shared by all trainers, with neutral defaults."""
  c = ml_collections.ConfigDict()
  c.trainer = "supervised"
  c.seed = 0
  c.batch_size = 256               # global, across all devices and processes
  c.eval_batch_size = 0            # 0: same as batch_size
  c.total_steps = 0                # set exactly one of total_steps / total_epochs
  c.total_epochs = 0.0
  c.log_every_steps = 50
  c.eval_every_steps = 1000        # 0: only at the end
  c.checkpoint_every_steps = 1000  # 0: only at the end (and on SIGTERM)
  c.keep_checkpoints = 2
  c.eval_only = False
  c.init_checkpoint = ""           # orbax dir or step dir to initialise params from
  c.dtype = "float32"              # compute dtype: bfloat16 on accelerators
  c.remat = False
  c.progress_bar = True
  c.plot_curves = True

  c.model = ml_collections.ConfigDict()
  c.model.name = "deit3_small_patch16_224"
  c.model.drop_path_rate = 0.0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "imagenet2012"
  c.dataset.data_dir = ml_collections.config_dict.placeholder(str)
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.num_classes = 0        # 0: from the dataset
  c.dataset.shuffle_buffer = 50_000
  c.dataset.repeated_aug = 1       # DeiT's RASampler repeats (3 in DeiT/DeiT III 1k)
  c.dataset.skip_corrupt = False
  c.dataset.train_pp = "decode|random_resized_crop(224)|flip_lr|normalize('imagenet')"
  c.dataset.eval_pp = "decode|center_crop(224, crop_ratio=0.875)|normalize('imagenet')"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-3
  c.optimizer.weight_decay = 0.05
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.momentum = 0.9       # sgd only
  c.optimizer.clip_grad_norm = 0.0  # 0: off
  c.optimizer.no_decay = ["(^|/)pos_embed$", "(^|/)cls_token$", "(^|/)dist_token$"]
  c.optimizer.layer_decay = 1.0    # < 1: layer-wise LR decay (BEiT-style fine-tuning); 1: off
  c.optimizer.lr_multipliers = []  # [(regex on 'a/b/kernel' param paths, multiplier), ...]

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "cosine"
  c.schedule.warmup_steps = 0
  c.schedule.warmup_epochs = 0.0
  c.schedule.warmup_init_lr = 1e-6
  c.schedule.min_lr = 1e-5
  c.schedule.per_epoch = False     # True: LR constant within an epoch (the deit repo's stepping)
  c.schedule.decay_rate = 0.915    # exponential only: lr * decay_rate ** (step / decay_steps)
  c.schedule.decay_steps = 500     # exponential only (CrossTransformers: 500/1000/2000 episodes)
  c.schedule.staircase = True      # exponential only: decay in steps every decay_steps

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "softmax_xent"
  c.loss.label_smoothing = 0.0

  c.mixup = ml_collections.ConfigDict()
  c.mixup.mixup_alpha = 0.0
  c.mixup.cutmix_alpha = 0.0
  c.mixup.prob = 1.0
  c.mixup.switch_prob = 0.5

  # Knowledge distillation (DeiT): teacher = any zoo model restored from a checkpoint, run inside
  # the jitted train step on the same (mixed) images.
  c.distill = ml_collections.ConfigDict()
  c.distill.type = "none"          # none | soft | hard
  c.distill.alpha = 0.5            # loss = (1 - alpha) * base + alpha * distillation
  c.distill.tau = 1.0              # soft distillation temperature
  c.distill.kl_divisor = "numel"   # soft: 'numel' (the deit repo: sum / (B*K)) or 'batch' (sum / B)
  c.distill.teacher = ""           # zoo model name, e.g. 'regnety_160' / 'resnet50' / 'deit_base_patch16_224'
  c.distill.teacher_checkpoint = ""  # workdir or `python -m visrep_jax.convert --out` directory
  c.distill.teacher_overrides = {}   # extra models.create kwargs for the teacher

  # Exponential moving average of the weights (timm ModelEmaV2); evaluated beside the weights.
  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.0                # 0: off; DeiT uses 0.99996

  # Episodic few-shot training (trainer='episodic'): Meta-Dataset sources converted to its
  # record format, one sub-directory per source under data_dir. Defaults: the official
  # variable-way variable-shot episodes (visrep_jax.data.episodes.EpisodeDescriptionConfig).
  c.episodes = ml_collections.ConfigDict()
  c.episodes.data_dir = ""
  c.episodes.train_sources = ["ilsvrc_2012"]
  c.episodes.valid_sources = ["ilsvrc_2012"]
  c.episodes.test_sources = ["ilsvrc_2012", "omniglot", "aircraft", "cu_birds", "dtd",
                             "quickdraw", "fungi", "vgg_flower", "traffic_sign", "mscoco"]
  c.episodes.image_size = 224
  c.episodes.channels = 3
  c.episodes.num_ways = 0          # 0: variable (5-50); else fixed ways
  c.episodes.num_support = 0       # 0: variable; else shots per class
  c.episodes.num_query = 0         # 0: variable (<= max_num_query per class); else per class
  c.episodes.min_ways = 5
  c.episodes.max_ways_upper_bound = 50
  c.episodes.max_num_query = 10
  c.episodes.max_support_set_size = 500
  c.episodes.max_support_size_contrib_per_class = 100
  c.episodes.min_log_weight = -0.69314718055994529  # log(0.5)
  c.episodes.max_log_weight = 0.69314718055994529   # log(2)
  c.episodes.min_examples_in_class = 0
  c.episodes.ignore_hierarchy_probability = 0.0  # CrossTransformers: 0.5 (half uniform classes)
  # Sample ILSVRC's classes uniformly instead of from a node of its DAG / Omniglot's without
  # picking an alphabet first (the official EpisodeDescriptionConfig fields). Fixed ways
  # (num_ways > 0) switch both off by themselves, and min_examples_in_class > 0 the bi-level
  # one: the official sampler refuses those combinations.
  c.episodes.ignore_dag_ontology = False
  c.episodes.ignore_bilevel_ontology = False
  c.episodes.augment = "none"      # visrep_jax.data.episode_augment.parse spec
  c.episodes.num_valid_episodes = 100
  c.episodes.num_test_episodes = 600
  c.episodes.eval_seed = 1234
  c.episodes.test_best = True      # test the best validation checkpoint (else the last)
  c.episodes.cache_gb = 4.0        # decoded images kept in memory per source (a test source's
                                   # are freed once its episodes are done)
  # Record indexes of remote (gs://, ...) class files, kept across runs so that a run does not
  # read whole class files again to index them; may itself be on gs:// (shared by all hosts).
  # 'auto': ${XDG_CACHE_HOME:-~/.cache}/visrep_jax/md_index; '' disables
  # (meta_dataset.cached_class_index).
  c.episodes.index_cache_dir = "auto"
  c.episodes.prepare_mini = False  # build the mini benchmark (data.md_mini) in data_dir if missing
                                   # (the supervised trainer: in dataset.data_dir)
  c.episodes.mini_max_images_per_class = 0  # its cap (0: all images)

  c.fewshot = ml_collections.ConfigDict()
  c.fewshot.head = "protonet"      # protonet | ctx
  c.fewshot.key_dim = 128
  c.fewshot.value_dim = 128
  c.fewshot.remat = True           # ctx: recompute the attention in the backward pass
  c.fewshot.remat_impl = "fused"   # ctx: fused (hand-written backward) | checkpoint (jax.checkpoint)
  # ctx: queries per attention chunk (0: all at once). remat needs chunks: without them the
  # backward forms the whole attention and its gradient at once (on an H200, 16.9 GiB against
  # plain's 12.4 for a 50-query, 500-support episode; 5-query chunks: 2.1 GiB at 1.10x the time).
  c.fewshot.query_chunk_size = 5
  # ctx: Eq. (2)'s class sum: '' (by the backend: segment sum on CPU, one-hot matmul elsewhere,
  # deterministic), 'segment' or 'matmul' (visrep_jax/models/fewshot.py::_class_sum).
  c.fewshot.class_sum_impl = ""
  c.fewshot.bn_test_mode = "ema"   # ema (running statistics) | support (support-set statistics)
  # CrossTransformers "+LR" (trainers/episodic.py): at evaluation, a logistic regression on the
  # support set's pooled l2-normalised features; prediction = argmax(head + lr_lambda * LR).
  c.fewshot.lr_head = False
  c.fewshot.lr_lambda = 5.0        # weight of the LR log-probabilities (paper: 5)
  c.fewshot.lr_C = 10.0            # scikit-learn's C, inverse L2 strength (paper: 10)
  c.fewshot.lr_max_iter = 1000     # its lbfgs iterations (not stated; Tian et al.'s code)
  c.fewshot.aux_loss_weight = 0.0  # training: train-class CE on pooled support features (+LR: 1)

  # Linear probe at every evaluation of the supervised trainer (evaluators/linear_probe.py):
  # logistic regression on the frozen pooled features (out['pre_logits']) of dataset split
  # fit_split, top-1 on score_split; the best weights are kept in WORKDIR/best, and training stops
  # after `patience` evaluations in a row below the best (CrossTransformers' phase-1 early
  # stopping: "stopping when this fine-tuning performance begins to decline").
  c.linear_probe = ml_collections.ConfigDict()
  c.linear_probe.fit_split = ""    # '' : off; e.g. 'valid[:50]' of a meta_dataset:<source>
  c.linear_probe.score_split = ""  # e.g. 'valid[50:100]' (other images of the same classes)
  c.linear_probe.C = 10.0          # scikit-learn's C, inverse L2 strength
  c.linear_probe.l2_normalize = True
  c.linear_probe.max_iter = 1000   # lbfgs iterations
  c.linear_probe.patience = 0      # 0: never stop (the best is kept anyway); p: after p declines

  c.mesh = (("data", -1), ("fsdp", 1))  # (axis, size); -1 fills the remaining devices
  c.sharding = "replicate"         # parameter/optimizer-state rule: replicate | fsdp
  # CPU-only runs of `python -m visrep_jax.main`: XLA host devices the process splits into, the
  # batch data parallel over them (same math). 2 trains DeiT-S at 224px ~2% faster on a 2-core
  # CPU but the small 28px models 2-17% slower (visrep_jax.utils.xla.set_cpu_flags). Ignored on
  # GPU/TPU hosts and when XLA_FLAGS already sets xla_force_host_platform_device_count.
  c.cpu_devices = 1
  return c


def _check(cond: bool, msg: str):
  if not cond:
    raise ConfigError(msg)


def _choice(value, valid: Iterable[str], key: str):
  valid = list(valid)
  _check(value in valid, f"config.{key}={value!r} is not valid; choose one of: {', '.join(valid)}.")


def validate(config: ml_collections.ConfigDict, num_devices: Optional[int] = None):
  """Checks names and values before anything expensive starts; raises ``ConfigError``."""
  from visrep_jax import losses, models, optim
  from visrep_jax.data import sources
  from visrep_jax.registry import UnknownNameError

  base = base_config()
  missing = [k for k in ("seed", "batch_size", "total_steps", "total_epochs", "log_every_steps",
                         "eval_every_steps", "checkpoint_every_steps") if k not in config]
  _check(not missing, f"config is missing keys {missing}; start from config_lib.base_config().")
  unknown = sorted(set(config.keys()) - set(base.keys()))
  _check(not unknown, f"Unknown top-level config keys {unknown}. Valid: {', '.join(sorted(base.keys()))}.")
  for sect in ("dataset", "optimizer", "schedule", "loss", "mixup", "distill", "ema", "episodes",
               "fewshot", "linear_probe"):
    bad = sorted(set(config[sect].keys()) - set(base[sect].keys()))
    _check(not bad, f"Unknown keys {bad} in config.{sect}. Valid: {', '.join(sorted(base[sect].keys()))}.")
  _choice(config.trainer, TRAINERS, "trainer")
  _check(isinstance(config.batch_size, int) and config.batch_size > 0,
         f"config.batch_size must be a positive integer, got {config.batch_size!r}.")
  _check(config.eval_batch_size >= 0, "config.eval_batch_size must be >= 0 (0: batch_size).")
  _check(isinstance(config.cpu_devices, int) and config.cpu_devices >= 1,
         f"config.cpu_devices must be an integer >= 1, got {config.cpu_devices!r}.")
  if num_devices and config.trainer != "episodic":  # episodic: one episode per step
    for key in ("batch_size", "eval_batch_size"):
      b = config[key]
      _check(b == 0 or b % num_devices == 0,
             f"config.{key}={b} is not divisible by the {num_devices} devices; use a multiple of "
             f"{num_devices}.")
  steps, epochs = config.total_steps, config.total_epochs
  _check((steps > 0) != (epochs > 0) or config.eval_only,
         f"Set exactly one of config.total_steps (>0) or config.total_epochs (>0); got "
         f"total_steps={steps}, total_epochs={epochs}.")
  for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    _check(config[key] >= 0, f"config.{key} must be >= 0, got {config[key]}.")
  _check(config.log_every_steps > 0, "config.log_every_steps must be > 0.")
  _check(config.keep_checkpoints >= 1, "config.keep_checkpoints must be >= 1.")
  _choice(config.dtype, DTYPES, "dtype")
  _choice(config.sharding, SHARDING_RULES, "sharding")
  _check(all(len(a) == 2 and isinstance(a[0], str) for a in config.mesh),
         f"config.mesh must be a list of (axis_name, size) pairs, got {config.mesh!r}.")
  _check(sum(1 for _, n in config.mesh if n == -1) <= 1, "config.mesh: at most one axis may be -1.")
  if num_devices:
    fixed = math.prod(n for _, n in config.mesh if n != -1)
    has_fill = any(n == -1 for _, n in config.mesh)
    _check(fixed > 0 and (num_devices % fixed == 0 if has_fill else num_devices == fixed),
           f"config.mesh={tuple(map(tuple, config.mesh))} does not fit the {num_devices} devices; "
           f"the sizes must multiply to {num_devices} (use -1 for one axis to fill the rest).")

  try:
    models.MODELS.get(config.model.name)
  except UnknownNameError as e:
    raise ConfigError(f"config.model.name: {e}") from None
  overrides = model_overrides(config)
  try:
    models.create(config.model.name, **overrides)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from None
  _check(0.0 <= config.model.get("drop_path_rate", 0.0) < 1.0,
         "config.model.drop_path_rate must be in [0, 1).")

  if not sources.valid_dataset_name(config.dataset.name):
    try:
      sources.create(config.dataset.name)
    except UnknownNameError as e:
      raise ConfigError(f"config.dataset.name: {e}") from None
  from visrep_jax.data import preprocess
  for key in ("train_pp", "eval_pp"):
    try:
      preprocess.parse(config.dataset[key])
    except (ValueError, UnknownNameError) as e:
      raise ConfigError(f"config.dataset.{key}: {e}") from None
  _check(config.dataset.repeated_aug >= 1, "config.dataset.repeated_aug must be >= 1.")
  _check(config.dataset.shuffle_buffer >= 0, "config.dataset.shuffle_buffer must be >= 0.")

  for reg, key in ((optim.OPTIMIZERS, "optimizer.name"), (optim.SCHEDULES, "schedule.name"),
                   (losses.LOSSES, "loss.name")):
    sect, name = key.split(".")
    _choice(config[sect][name], reg.names(), key)
  _check(config.optimizer.lr > 0 and math.isfinite(config.optimizer.lr),
         f"config.optimizer.lr must be a positive number, got {config.optimizer.lr}.")
  _check(config.optimizer.weight_decay >= 0, "config.optimizer.weight_decay must be >= 0.")
  _check(0.0 <= config.loss.label_smoothing < 1.0, "config.loss.label_smoothing must be in [0, 1).")
  for k in ("mixup_alpha", "cutmix_alpha"):
    _check(config.mixup[k] >= 0, f"config.mixup.{k} must be >= 0.")
  for k in ("prob", "switch_prob"):
    _check(0.0 <= config.mixup[k] <= 1.0, f"config.mixup.{k} must be in [0, 1].")
  _validate_lr_options(config)
  _validate_distill(config)
  _validate_linear_probe(config)
  if config.trainer == "episodic":
    _validate_episodic(config)
  decay = config.ema.decay
  _check(isinstance(decay, (int, float)) and 0.0 <= decay < 1.0,
         f"config.ema.decay must be in [0, 1) (0: off; DeiT: 0.99996), got {decay!r}.")


def _validate_lr_options(config):
  from visrep_jax import optim
  o, s = config.optimizer, config.schedule
  ld = o.layer_decay
  _check(isinstance(ld, (int, float)) and 0.0 < ld <= 1.0,
         f"config.optimizer.layer_decay must be in (0, 1] (1: off; e.g. 0.65 for BEiT-style "
         f"fine-tuning), got {ld!r}.")
  form = ("config.optimizer.lr_multipliers must be a list of (regex, multiplier) pairs matched "
          "against 'a/b/kernel' parameter paths, e.g. [('^head/', 10.0)]")
  _check(isinstance(o.lr_multipliers, (list, tuple)), f"{form}; got {o.lr_multipliers!r}.")
  for item in o.lr_multipliers:
    ok = (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
          and isinstance(item[1], (int, float)) and not isinstance(item[1], bool))
    _check(ok, f"{form}; got the entry {item!r}.")
    _check(item[1] >= 0 and math.isfinite(item[1]),
           f"config.optimizer.lr_multipliers: the multiplier of {item[0]!r} must be a finite "
           f"number >= 0, got {item[1]!r}.")
    try:
      re.compile(item[0])
    except re.error as e:
      raise ConfigError(f"config.optimizer.lr_multipliers: {item[0]!r} is not a valid regular "
                        f"expression ({e}).") from None
  if s.name == "exponential":
    _check(isinstance(s.decay_steps, int) and s.decay_steps > 0,
           f"config.schedule.decay_steps must be a positive integer, got {s.decay_steps!r}.")
    _check(isinstance(s.decay_rate, (int, float)) and 0.0 < s.decay_rate <= 1.0,
           f"config.schedule.decay_rate must be in (0, 1], got {s.decay_rate!r}.")
  _check(isinstance(s.per_epoch, bool), f"config.schedule.per_epoch must be True or False, got "
         f"{s.per_epoch!r}.")
  if s.per_epoch:
    _check(s.name in optim.EPOCH_SCHEDULES.names(),
           f"config.schedule.per_epoch=True is not available for config.schedule.name="
           f"{s.name!r}; choose one of: {', '.join(optim.EPOCH_SCHEDULES.names())}.")


def _validate_episodic(config):
  e, f = config.episodes, config.fewshot
  _choice(f.head, ("protonet", "ctx"), "fewshot.head")
  _choice(f.remat_impl, ("fused", "checkpoint"), "fewshot.remat_impl")
  _check(f.get("class_sum_impl", "") in ("", "segment", "matmul"),
         f"config.fewshot.class_sum_impl={f.get('class_sum_impl')!r} is not valid; choose '' "
         "(by the backend), 'segment' or 'matmul'.")
  _choice(f.bn_test_mode, ("ema", "support"), "fewshot.bn_test_mode")
  _check(bool(e.data_dir), "config.episodes.data_dir is empty: point it at the converted "
         "Meta-Dataset sources (python -m visrep_jax.data.md_convert; the mini benchmark: "
         "python -m visrep_jax.data.md_mini --out=DIR).")
  _check(config.total_steps > 0, "The episodic trainer counts episodes: set config.total_steps "
         "(episodes), not total_epochs.")
  for key in ("train_sources", "test_sources"):
    _check(len(e[key]) > 0 and all(isinstance(n, str) and n for n in e[key]),
           f"config.episodes.{key} must list at least one source directory name.")
  for key in ("image_size", "num_test_episodes", "min_ways", "max_ways_upper_bound",
              "max_num_query", "max_support_set_size"):
    _check(isinstance(e[key], int) and e[key] > 0,
           f"config.episodes.{key} must be a positive integer, got {e[key]!r}.")
  for key in ("num_ways", "num_support", "num_query", "num_valid_episodes"):
    _check(isinstance(e[key], int) and e[key] >= 0,
           f"config.episodes.{key} must be an integer >= 0 (0: variable / off), got {e[key]!r}.")
  _check(e.channels in (1, 3), f"config.episodes.channels must be 1 or 3, got {e.channels!r}.")
  _check(isinstance(e.min_examples_in_class, int) and e.min_examples_in_class >= 0,
         f"config.episodes.min_examples_in_class must be an integer >= 0, got "
         f"{e.min_examples_in_class!r}.")
  if not e.num_ways:
    _check(e.min_ways <= e.max_ways_upper_bound,
           f"config.episodes.min_ways ({e.min_ways}) must not exceed max_ways_upper_bound "
           f"({e.max_ways_upper_bound}).")
  if not e.num_support:
    _check(e.max_support_set_size >= (e.num_ways or e.max_ways_upper_bound),
           f"config.episodes.max_support_set_size ({e.max_support_set_size}) is below the "
           f"number of ways ({e.num_ways or e.max_ways_upper_bound}, the most an episode may "
           "have): an episode needs one support image per class; raise it or lower "
           "max_ways_upper_bound.")
    _check(isinstance(e.max_support_size_contrib_per_class, int)
           and e.max_support_size_contrib_per_class > 0,
           "config.episodes.max_support_size_contrib_per_class must be a positive integer, got "
           f"{e.max_support_size_contrib_per_class!r}.")
    _check(_finite_number(e.min_log_weight) and _finite_number(e.max_log_weight)
           and e.min_log_weight <= e.max_log_weight,
           f"config.episodes.min_log_weight ({e.min_log_weight!r}) must be a finite number "
           f"<= max_log_weight ({e.max_log_weight!r}) (official: log(0.5), log(2)).")
  _check(0.0 <= e.ignore_hierarchy_probability <= 1.0,
         "config.episodes.ignore_hierarchy_probability must be in [0, 1].")
  from visrep_jax.data import episode_augment
  try:
    episode_augment.parse(e.augment)
  except (ValueError, KeyError) as err:
    raise ConfigError(f"config.episodes.augment: {err}") from None
  _check(f.query_chunk_size >= 0, "config.fewshot.query_chunk_size must be >= 0 (0: off).")
  _check(isinstance(f.lr_head, bool), f"config.fewshot.lr_head must be True or False, got "
         f"{f.lr_head!r}.")
  for key, paper in (("lr_lambda", 5), ("aux_loss_weight", 1)):
    _check(_finite_number(f[key]) and f[key] >= 0,
           f"config.fewshot.{key} must be a finite number >= 0 (the paper: {paper}), got "
           f"{f[key]!r}.")
  _check(_finite_number(f.lr_C) and f.lr_C > 0,
         f"config.fewshot.lr_C must be a finite number > 0 (the paper: 10), got {f.lr_C!r}.")
  _check(isinstance(f.lr_max_iter, int) and not isinstance(f.lr_max_iter, bool)
         and f.lr_max_iter > 0,
         f"config.fewshot.lr_max_iter must be a positive integer, got {f.lr_max_iter!r}.")


def _finite_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _validate_linear_probe(config):
  lp = config.linear_probe
  _check(bool(lp.fit_split) == bool(lp.score_split),
         "config.linear_probe needs both fit_split and score_split (two splits of config.dataset "
         "with the same classes and other images, e.g. 'valid[:50]' and 'valid[50:100]'), or "
         f"neither; got fit_split={lp.fit_split!r}, score_split={lp.score_split!r}.")
  if not lp.fit_split:
    return
  _check(config.trainer == "supervised", "config.linear_probe is run by the supervised trainer "
         f"only; clear linear_probe.fit_split for trainer={config.trainer!r}.")
  _check(_finite_number(lp.C) and lp.C > 0, f"config.linear_probe.C must be a finite number > 0, got {lp.C!r}.")
  for key in ("max_iter", "patience"):
    v = lp[key]
    _check(isinstance(v, int) and not isinstance(v, bool) and v >= (1 if key == "max_iter" else 0),
           f"config.linear_probe.{key} must be an integer >= {1 if key == 'max_iter' else 0}, "
           f"got {v!r}.")
  _check(lp.patience == 0 or config.eval_every_steps > 0,
         f"config.linear_probe.patience={lp.patience} stops on periodic evaluations: set "
         "config.eval_every_steps > 0 (or patience=0).")


def _validate_distill(config):
  from visrep_jax import losses, models
  from visrep_jax.registry import UnknownNameError
  d = config.distill
  _choice(d.type, ("none",) + tuple(losses.DISTILLATION.names()), "distill.type")
  _choice(d.kl_divisor, losses.KL_DIVISORS, "distill.kl_divisor")
  _check(isinstance(d.alpha, (int, float)) and 0.0 <= d.alpha <= 1.0,
         f"config.distill.alpha must be in [0, 1], got {d.alpha!r}.")
  _check(isinstance(d.tau, (int, float)) and d.tau > 0,
         f"config.distill.tau must be > 0, got {d.tau!r}.")
  if d.type == "none":
    return
  _check(bool(d.teacher), f"config.distill.type={d.type!r} needs a teacher: set "
         "config.distill.teacher to a zoo model name (e.g. 'regnety_160', 'resnet50', "
         "'deit_base_patch16_224') and config.distill.teacher_checkpoint to its weights.")
  try:
    models.MODELS.get(d.teacher)
  except UnknownNameError as e:
    raise ConfigError(f"config.distill.teacher: {e}") from None
  overrides = d.teacher_overrides
  _check(hasattr(overrides, "keys"), "config.distill.teacher_overrides must be a dict of "
         f"models.create options, got {overrides!r}.")
  overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides)
  _check("num_classes" not in overrides, "config.distill.teacher_overrides must not set "
         "num_classes: the teacher predicts the student's classes (config.dataset.num_classes).")
  try:
    models.create(d.teacher, **overrides)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.distill.teacher_overrides: {e}") from None
  path = d.teacher_checkpoint
  _check(bool(path), f"config.distill.type={d.type!r} needs config.distill.teacher_checkpoint: "
         "a training workdir or the --out directory of python -m visrep_jax.convert holding "
         f"the weights of {d.teacher!r}.")
  _check("://" in path or os.path.exists(path),
         f"config.distill.teacher_checkpoint={path!r} does not exist: give a training workdir "
         "or the --out directory of python -m visrep_jax.convert.")


# Config keys under `model` that are not constructor arguments of the module.
_MODEL_META_KEYS = ("name",)


def model_overrides(config) -> Dict[str, Any]:
  """``config.model`` minus its name, plus the global dtype/remat, as ``models.create`` kwargs."""
  import jax.numpy as jnp
  kw = {k: v for k, v in config.model.items() if k not in _MODEL_META_KEYS}
  kw.setdefault("dtype", getattr(jnp, config.get("dtype", "float32")))
  if config.get("remat", False):
    kw.setdefault("remat", True)
  return kw


# ------------------------------------------------------------------ shared pieces of recipe configs

FASHION_MNIST_EVAL_PP = "decode(1)|normalize('fashion_mnist')"

# (model name, overrides) of the ResNet that configs/resnet.py trains with `runlocal` and with
# `fashion_mnist`: the teachers of the other recipes' distilled smoke runs / Fashion-MNIST runs.
RESNET_RUNLOCAL = ("resnet18", {"width": 8})
RESNET_FASHION_MNIST = ("resnet18", {})


def use_fashion_mnist(c: ml_collections.ConfigDict, train_pp: str,
                      eval_pp: str = FASHION_MNIST_EVAL_PP) -> ml_collections.ConfigDict:
  """Points a recipe at Fashion-MNIST (offline, 60k train / 10k test grey 28x28 images): the
  ``fashion_mnist`` argument of every recipe config. No repeated augmentation at this scale."""
  c.dataset.name = "fashion_mnist"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "test"
  c.dataset.repeated_aug = 1
  c.dataset.shuffle_buffer = 60_000
  c.dataset.train_pp = train_pp
  c.dataset.eval_pp = eval_pp
  return c


def use_synthetic_smoke_run(c: ml_collections.ConfigDict, train_pp: str, eval_pp: str,
                            repeated_aug: int = 1, steps: int = 6) -> ml_collections.ConfigDict:
  """The ``runlocal`` argument of every recipe config: ``steps`` steps on the synthetic dataset,
  logging every 2, evaluating and checkpointing every 3, no progress bar."""
  c.dataset.name = "synthetic"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "test"
  c.dataset.repeated_aug = repeated_aug
  c.dataset.shuffle_buffer = 1000
  c.dataset.train_pp = train_pp
  c.dataset.eval_pp = eval_pp
  return use_smoke_schedule(c, steps)


def use_smoke_schedule(c: ml_collections.ConfigDict, steps: int = 6) -> ml_collections.ConfigDict:
  """The schedule of every ``runlocal``: ``steps`` steps, logging every 2, evaluating and
  checkpointing every 3, no progress bar."""
  c.total_epochs = 0.0
  c.total_steps = steps
  c.log_every_steps = 2
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 3
  c.progress_bar = False
  return c


def use_fewshot_mini_backbone(c: ml_collections.ConfigDict,
                              runlocal: bool = False) -> ml_collections.ConfigDict:
  """The backbone of the few-shot mini benchmark (configs/ctx.py and its phase 1,
  configs/ctx_pretrain.py): a ResNet-18 of width 16 for 28x28 inputs, 3x3/2 stem without
  pooling (14x14 after the stem); ``runlocal``: width 8, one block per stage. The last stage's
  dilation is the caller's (phase 2 dilates it, phase 1 does not)."""
  c.model.name = "resnet18"
  c.model.width = 8 if runlocal else 16
  c.model.stem_kernel = 3
  c.model.stem_stride = 2
  c.model.stem_pool = False
  if runlocal:
    c.model.stage_sizes = (1, 1, 1, 1)
  return c


def use_deit_schedule_and_regularisation(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The part of the deit repo's main.py recipe that DeiT, CaiT, ResMLP and PatchConvNet share:
  cosine LR stepped once per epoch after 5 warmup epochs from 1e-6 down to 1e-5, label
  smoothing 0.1 with softmax cross-entropy, Mixup 0.8 / CutMix 1.0 (prob 1, switch 0.5) and the
  weight EMA (decay 0.99996)."""
  c.schedule.name = "cosine"
  c.schedule.warmup_epochs = 5.0
  c.schedule.warmup_init_lr = 1e-6
  c.schedule.min_lr = 1e-5
  c.schedule.per_epoch = True
  c.loss.name = "softmax_xent"
  c.loss.label_smoothing = 0.1
  c.mixup.mixup_alpha = 0.8
  c.mixup.cutmix_alpha = 1.0
  c.mixup.prob = 1.0
  c.mixup.switch_prob = 0.5
  c.ema.decay = 0.99996
  return c


def use_distillation(c: ml_collections.ConfigDict, kind: str, teacher_model: str,
                     teacher_checkpoint: str, alpha: float = 0.5) -> ml_collections.ConfigDict:
  """Knowledge distillation from ``teacher_model`` restored from ``teacher_checkpoint``."""
  c.distill.type = kind
  c.distill.alpha = alpha
  c.distill.teacher = teacher_model
  c.distill.teacher_checkpoint = teacher_checkpoint
  return c
