r"""CrossTransformers phase 1: supervised pre-training of the backbone on the 712 ILSVRC train
classes of Meta-Dataset, early-stopped by a linear probe on the 158 validation classes.

  # DATA holds the converted Meta-Dataset sources (DATA/ilsvrc_2012/dataset_spec.json + one
  # {class_id}.tfrecords per class; python -m visrep_jax.data.md_convert or the official converter).
  # Phase 1 (this file), then phase 2 (configs/ctx.py) from the best linear-probe checkpoint:
  python -m visrep_jax.main --config=configs/ctx_pretrain.py:data=DATA --workdir=/tmp/ctx_pretrain
  python -m visrep_jax.main \
      --config=configs/ctx.py:variant=ctx_simclr_aug,data=DATA,init=/tmp/ctx_pretrain/best \
      --workdir=/tmp/ctx_simclr_aug
  # The same two phases on the offline mini benchmark (built on first use under workdirs/md_mini):
  python -m visrep_jax.main --config=configs/ctx_pretrain.py:mini --workdir=/tmp/ctx_pretrain_mini
  python -m visrep_jax.main \
      --config=configs/ctx.py:variant=ctx,mini,init=/tmp/ctx_pretrain_mini/best \
      --workdir=/tmp/ctx_mini
  # CPU smoke test of both (a few steps, tiny ResNet; the same tiny model as ctx.py's runlocal):
  python -m visrep_jax.main --config=configs/ctx_pretrain.py:runlocal --workdir=/tmp/pre_rl
  python -m visrep_jax.main \
      --config=configs/ctx.py:variant=protonet,runlocal,init=/tmp/pre_rl/best \
      --workdir=/tmp/ctx_rl

The run writes, besides the usual checkpoints/metrics.jsonl/tensorboard: ``eval/top1`` (held-out
images of the train classes) and ``eval/linear_probe_top1`` at every evaluation,
``WORKDIR/linear_probe.json`` (every probe, the best, evaluations since) and ``WORKDIR/best``, the
weights of the best probe. ``init=WORKDIR`` (or ``init=WORKDIR/best``) loads those;
``init=WORKDIR/checkpoints`` would load the last checkpoint instead. Phase 2 drops the 712-way ``fc`` (logged) and keeps the backbone and its
BatchNorm statistics; the CTX variants set the last stage to stride 1 with dilation 2, which
changes no parameter shape, so the same weights load into the dilated 14x14 network (spec §1.5:
"presumably the same weights are used").

Arguments:
  data=DIR            converted Meta-Dataset sources (default: $META_DATASET_DIR).
  sampling=uniform|records
                      uniform (default): each example's class uniform over the 712 classes,
                      "batches of images sampled uniformly from the training categories" (L622);
                      records: every image once per epoch, classes in proportion to their size
                      (Meta-Dataset's own batch reader).
  steps=N             training steps (default 75000; mini 2000).
  patience=P          stop after P probe evaluations in a row below the best (default 3, mini
                      4; 0: never stop, only keep the best).
  mini                the offline mini benchmark (6 Fashion-MNIST train classes, 2 valid classes).
  runlocal            6 steps of the mini benchmark (40 images per class) with ctx.py's runlocal
                      ResNet: a CPU smoke test whose best checkpoint ctx.py:runlocal can init from.

Recipe. The paper states only the task and the stopping rule (spec §1.5, C.1 L621-632): 712-way
classification from uniformly sampled training classes, "training a linear classifier on
validation categories and stopping when this fine-tuning performance begins to decline", fixed
for all experiments, at 224x224 for the 224 models (L630-632); "[78]'s public code" supplies the
rest. Here: ResNet-34, ordinary stride-32 network (phase 2 re-architects it), inputs as
Meta-Dataset's decoder makes them (square 224x224 bilinear resize, aspect ratio not kept, [-1, 1],
no augmentation: its batch data augmentation is off), i.e. the pixels of the episodic phase.
Optimisation from Meta-Dataset's tuned batch-training ("baseline") pre-training config
``learn/gin/best/pretrain_imagenet_resnet.gin`` with ``setups/trainer_config.gin``: Adam, learning
rate 3.7564e-3 decayed x0.99675 every 1000 steps (staircase), weight decay 2.628e-5, batch 256,
75,000 updates; ``optimizer.name='adam'`` is that Adam with the coupled L2 term (Meta-Dataset
adds ``weight_decay * l2_loss`` to the loss). Departure: Meta-Dataset's reader draws classes in
proportion to their sizes, the paper says uniformly, hence ``sampling=``.
Held-out evaluation: the first 5% of every train class's images (``train[:5%]``, ~46k images);
training reads the other 95% (``train[5%:]``).
Probe: 50 images per valid class to fit (``valid[:50]``), the next 50 to score
(``valid[50:100]``); logistic regression with C=10 on l2-normalised pooled 512-d features (the
paper's test-time LR, spec §1.4); every 2500 steps; patience 3 (the paper stops at the first
decline, ``patience=1``; 3 tolerates the probe's noise, ~0.5% standard error on 7,900 images).
Hardware: any single accelerator (the paper's 8 V100s were for phase 2); no expected numbers are
published for phase 1.

mini: ctx.py's mini backbone (ResNet-18 of width 16, 3x3/2 stem without pooling) without the
dilation, on the 28x28 grey images (``decode(1)``, [-1, 1]); batch 128, 2000 steps, evaluation and
probe every 250 steps, patience 4. The probe sees only the 2 valid classes (Coat, Sneaker), so it
is nearly saturated: on this benchmark it exercises the mechanics more than it selects a model.
Measured once on 2026-11-26 (log not kept; with AdamW's decoupled decay at the same value, before
``optimizer.name='adam'`` existed; one CPU device, 2 cores shared with other jobs, ~880
images/s, 5 minutes): held-out
top-1 (``train[:5%]``, 2,100 images of the 6 train classes) 0.963-0.974 from step 250 on, 0.9743
at step 2000; probe 1.000 at every evaluation but 0.999 at steps 1250 and 1500, so the best is
step 2000 (ties move the best forward) and the run does not stop. Phase 2 from it, ``ctx.py:
variant=protonet,mini,episodes=300`` with 300 test episodes per source (3 minutes each), against
the same run from scratch (mean % +- 95% CI): Fashion-MNIST test classes 99.80 +-0.11 vs
98.58 +-0.30, digits (unseen domain) 72.04 +-1.43 vs 64.91 +-1.49. Those runs predate the
non-transductive training BatchNorm and the official layer1 shortcut; configs/ctx.py's docstring
has the 2026-11-27 runs (1000 episodes, 600 test episodes; this phase took 2.9 min).
"""

import os

from visrep_jax import config_lib

LR = 0.00375640851370052            # pretrain_imagenet_resnet.gin: Trainer.learning_rate
DECAY_RATE = 0.9967524905880909     # Trainer.decay_rate
DECAY_STEPS = 1000                  # Trainer.decay_every
WEIGHT_DECAY = 0.00002628042826116842  # Learner.weight_decay
SAMPLINGS = ("uniform", "records")
MINI_DIR = os.path.join("workdirs", "md_mini")              # as configs/ctx.py
RUNLOCAL_DIR = os.path.join("workdirs", "md_mini_runlocal")  # as configs/ctx.py:runlocal


def pp(size: int, channels: int = 3) -> str:
  """Meta-Dataset's ImageDecoder: square bilinear resize (align_corners), [-1, 1]."""
  norm = "normalize('inception')" if channels == 3 else "normalize(0.5, 0.5)"
  return f"decode({channels})|md_resize({size})|{norm}"


def get_config(arg=None):
  args = config_lib.parse_arg(arg, data="", sampling="uniform", steps=0, patience=-1, mini=False,
                              runlocal=False)
  if args.sampling not in SAMPLINGS:
    raise config_lib.ConfigError(
        f"sampling={args.sampling!r} is not valid; choose one of {', '.join(SAMPLINGS)}.")
  c = config_lib.base_config()
  c.trainer = "supervised"
  c.seed = 0
  c.batch_size = 256
  c.total_steps = args.steps or 75_000
  c.log_every_steps = 100
  c.eval_every_steps = 2500
  c.checkpoint_every_steps = 2500
  c.keep_checkpoints = 2

  c.model.name = "resnet34"
  c.model.drop_path_rate = 0.0
  c.model.replace_stride_with_dilation = (False, False, False)
  # The official ResNet-34 (meta-dataset functional_backbones, resnet34_stride16.gin) projects
  # the shortcut of the first block of every stage, layer1's included (torchvision does not).
  c.model.downsample_first_stage = True

  d = c.dataset
  d.name = "meta_dataset:ilsvrc_2012"
  d.data_dir = args.data or os.environ.get("META_DATASET_DIR", "")
  d.train_split = f"train[5%:]:{args.sampling}"
  d.eval_split = "train[:5%]"
  d.num_classes = 0  # the train split's classes: 712
  d.shuffle_buffer = 1000  # DataConfig.shuffle_buffer_size
  d.repeated_aug = 1
  d.train_pp = pp(224)
  d.eval_pp = pp(224)

  c.optimizer.name = "adam"
  c.optimizer.lr = LR
  c.optimizer.weight_decay = WEIGHT_DECAY
  c.optimizer.no_decay = []  # kernels only (1-D parameters are never decayed)
  c.schedule.name = "exponential"
  c.schedule.decay_rate = DECAY_RATE
  c.schedule.decay_steps = DECAY_STEPS
  c.schedule.staircase = True
  c.schedule.warmup_steps = 0
  c.schedule.min_lr = 0.0
  c.loss.name = "softmax_xent"
  c.loss.label_smoothing = 0.0

  lp = c.linear_probe
  lp.fit_split = "valid[:50]"
  lp.score_split = "valid[50:100]"
  lp.C = 10.0
  lp.l2_normalize = True
  lp.patience = 3 if args.patience < 0 else args.patience

  if args.mini or args.runlocal:
    d.name = "meta_dataset:fashion_mnist"
    d.data_dir = args.data or MINI_DIR
    c.episodes.prepare_mini = True  # build the mini benchmark in dataset.data_dir if missing
    c.episodes.mini_max_images_per_class = 0
    d.train_pp = d.eval_pp = pp(28, channels=1)
    # configs/ctx.py's mini backbone, without its dilated last stage (phase 2 adds it).
    config_lib.use_fewshot_mini_backbone(c)
    c.batch_size = 128
    c.total_steps = args.steps or 2000
    c.eval_every_steps = 250
    c.checkpoint_every_steps = 250
    c.log_every_steps = 50
    lp.fit_split = "valid[:500]"
    lp.score_split = "valid[500:1000]"
    lp.patience = 4 if args.patience < 0 else args.patience
  if args.runlocal:
    d.data_dir = args.data or RUNLOCAL_DIR
    c.episodes.mini_max_images_per_class = 40  # as configs/ctx.py:runlocal (same build)
    d.train_split = f"train[4:]:{args.sampling}"
    d.eval_split = "train[:4]"
    config_lib.use_fewshot_mini_backbone(c, runlocal=True)
    lp.fit_split = "valid[:20]"
    lp.score_split = "valid[20:40]"
    c.batch_size = 16
    c.plot_curves = False
    config_lib.use_smoke_schedule(c, args.steps or 6)
  return c
