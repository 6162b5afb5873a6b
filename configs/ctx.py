r"""CrossTransformers (Doersch, Gupta, Zisserman, NeurIPS 2020) on Meta-Dataset, Train-on-ILSVRC.

  # Convert the sources once (one sub-directory per source under DATA; see visrep_jax.data.md_convert),
  # pre-train the backbone on the 712 ILSVRC train classes, then train episodically:
  python -m visrep_jax.main --config=configs/ctx.py:variant=ctx_simclr_aug,data=DATA,init=PRETRAIN_WORKDIR \
      --workdir=/tmp/ctx_simclr_aug
  # Evaluate a trained workdir again (600 test episodes per source, mean +- 95% CI):
  python -m visrep_jax.main --config=configs/ctx.py:variant=ctx,data=DATA,eval_only --workdir=/tmp/ctx
  # The whole pipeline on the offline mini benchmark (Fashion-MNIST classes + sklearn digits):
  python -m visrep_jax.main --config=configs/ctx.py:variant=ctx,mini --workdir=/tmp/ctx_mini

Arguments:
  variant=protonet|ctx|ctx_simclr|ctx_simclr_aug|ctx_simclr_aug_lr   (default ctx_simclr_aug)
  data=DIR        converted Meta-Dataset sources (default: $META_DATASET_DIR).
  init=DIR        supervised pre-trained backbone: a configs/ctx_pretrain.py workdir (its best/
                  linear-probe checkpoint) or a converted checkpoint. The backbone is the
                  official ResNet-34, with a projection shortcut in layer1's first block: a
                  torchvision-layout checkpoint (or a workdir of these configs from before
                  2026-11-27) needs --config.model.downsample_first_stage=False.
  eval_only       only the test episodes of the workdir's checkpoint (or init).
  bn=ema|support  BatchNorm statistics at test time (paper default ema).
  mini            the offline mini benchmark (built on first use under workdirs/md_mini).
  runlocal        a few episodes of the mini benchmark with a tiny model (CPU smoke test).

Recipe (spec crosstransformers.md §4, L340-366, L634-669): ResNet-34 at 224x224, the last stage
stride 1 and dilated (14x14x512 feature map; protonet keeps the stride-32 network, L368), BN
running statistics with decay 0.9 per episode used at test time; Adam on the unit-norm gradient of
loss + L2 (normalised SGD, L361-363, L657), lr 1.21e-3, weight decay 8.86e-5, x0.915 every 500
episodes (ProtoNets, CTX), 1000 (+SimCLR episodes), 2000 (+SimCLR episodes + BOHB augmentation)
(L651-654); Meta-Dataset's variable-way variable-shot episodes from ILSVRC's 712 train classes, half
of them with classes from the ImageNet DAG and half uniform (L349-353); model selection on the 158
validation classes; 600 test episodes per source. Training length is not stated ("until
convergence"); the default is 100k episodes with validation every 2.5k. Hardware in the paper:
8 V100s, ~3 days for the full model (L667-669).

ctx_simclr_aug_lr (spec §1.4, C.3 L680-697): ctx_simclr_aug plus, in training, the cross-entropy
of a learned linear classifier over the 712 train classes on every support image's pooled
feature, weight 1 (fewshot.aux_loss_weight), and at evaluation a logistic regression (C=10) on
the support set's pooled l2-normalised 512-d features, prediction = argmax(CTX logits + 5 * LR)
(fewshot.lr_head, lr_lambda, lr_C). fewshot_test.json also reports CTX alone and LR alone.

Expected accuracy (Table 4, %, 600 episodes; visrep_jax/results/tables/ctx_table4.json):
  variant      ILSVRC  Omniglot  Aircraft  Birds  Textures  QuickDraw  Fungi  Flowers  Signs  COCO
  protonet     51.66   57.22     51.63     71.73  69.72     47.31      42.07  87.29    47.45  44.38
  ctx          61.53   73.34     72.32     80.83  72.25     55.61      49.54  93.16    66.02  51.22
  ctx_simclr   61.54   81.88     81.53     80.30  75.64     59.91      49.76  94.19    77.00  53.48
  ctx_simclr_aug 61.42 82.75     81.84     77.98  74.77     64.80      49.95  95.28    84.80  57.87
  ctx_simclr_aug_lr (Table 2 "CTX+SimCLR Eps+Aug+LR"; +- the Table 4 CIs)
               60.82   80.80     74.85     75.63  79.04     65.02      49.31  93.72    76.38  58.48
               +-1.03  +-1.05    +-0.92    +-0.96 +-0.65    +-0.96     +-1.13 +-0.44   +-0.95 +-1.04

Measured on the offline mini benchmark (``mini``: 1000 episodes, 600 test episodes per source,
mean % +- 95% CI; 2026-11-27, 2 CPU cores, commits 3aeb505 / 8d497ca). Fashion-MNIST's test
split has 2 classes, so its episodes are 2-way; digits (all 10 classes) is the unseen domain.
Validation (2-way Coat vs Sneaker) saturates at 99.9% by episode 250, so it barely selects.
  variant=protonet,mini (from scratch)       fashion_mnist 99.30 +-0.16   digits 67.70 +-1.05
  variant=ctx,mini (from scratch)            fashion_mnist 99.24 +-0.18   digits 64.67 +-1.12
  from configs/ctx_pretrain.py:mini (phase 1, 2000 steps, 2.9 min), init=its workdir:
  variant=protonet,mini,init=...             fashion_mnist 99.39 +-0.15   digits 65.16 +-1.11
  variant=ctx,mini,init=...                  fashion_mnist 99.39 +-0.17   digits 69.97 +-1.12
With the paper's protocol (phase 1, then episodes) CTX leads ProtoNets on the unseen domain by
4.8 points, the CIs apart; from scratch ProtoNets lead by 3.0. Wall time: ProtoNets 4.3-4.8
min, CTX 6.5-8.0 min (training, validation and both test sources).
"""

import os

from visrep_jax import config_lib

VARIANTS = {
    # head, dilated last stage, episode augmentation, LR decay interval (episodes), +LR
    "protonet": ("protonet", False, "none", 500, False),
    "ctx": ("ctx", True, "none", 500, False),
    "ctx_simclr": ("ctx", True, "simclr_episodes(prob=0.5)", 1000, False),
    "ctx_simclr_aug": ("ctx", True, "simclr_episodes(prob=0.5, md_augment='bohb')", 2000, False),
    "ctx_simclr_aug_lr": ("ctx", True, "simclr_episodes(prob=0.5, md_augment='bohb')", 2000,
                          True),
}
MINI_DIR = os.path.join("workdirs", "md_mini")


def use_mini_benchmark(c, data_dir: str, max_images_per_class=None):
  """Points the episodes at the mini benchmark (visrep_jax.data.md_mini): train on 6 Fashion-MNIST
  classes, validate on 2, test on the other 2 and on sklearn's digits (unseen domain). With 2-10
  classes per split the episodes have 2-10 ways."""
  e = c.episodes
  e.data_dir = data_dir
  e.prepare_mini = True
  e.mini_max_images_per_class = max_images_per_class or 0
  e.train_sources = ["fashion_mnist"]
  e.valid_sources = ["fashion_mnist"]
  e.test_sources = ["fashion_mnist", "digits"]
  e.image_size = 28
  e.channels = 1
  e.min_ways = 2
  e.max_ways_upper_bound = 10
  e.max_num_query = 10
  e.max_support_set_size = 100
  e.max_support_size_contrib_per_class = 20
  e.ignore_hierarchy_probability = 0.0
  # A ResNet-18 of width 16 for 28x28 inputs: 3x3/2 stem without pooling (14x14), stride 2 in
  # layers 2 and 3, the last stage dilated, so the heads see a 4x4 map (CTX) / its average
  # (ProtoNets). Measured here (2026-11-27, 2 idle CPU cores): 1000 episodes + 1200 test
  # episodes take 8.0 min wall for CTX, 4.8 min for ProtoNets (see the module docstring).
  config_lib.use_fewshot_mini_backbone(c)
  c.model.replace_stride_with_dilation = (False, False, True)
  return c


def get_config(arg=None):
  args = config_lib.parse_arg(arg, variant="ctx_simclr_aug", data="", init="", eval_only=False,
                              bn="ema", mini=False, runlocal=False, episodes=0)
  if args.variant not in VARIANTS:
    raise config_lib.ConfigError(
        f"variant={args.variant!r} is not valid; choose one of {', '.join(VARIANTS)}.")
  head, dilated, augment, decay_every, with_lr = VARIANTS[args.variant]
  c = config_lib.base_config()
  c.trainer = "episodic"
  c.seed = 0
  c.batch_size = 1  # one episode per step; unused by the episodic trainer
  c.total_steps = args.episodes or 100_000
  c.log_every_steps = 100
  c.eval_every_steps = 2500
  c.checkpoint_every_steps = 2500
  c.model.name = "resnet34"
  c.model.drop_path_rate = 0.0
  c.model.replace_stride_with_dilation = (False, False, dilated)
  # The official ResNet-34 (meta-dataset functional_backbones, resnet34_stride16.gin) projects
  # the shortcut of the first block of every stage, layer1's included (torchvision does not).
  c.model.downsample_first_stage = True

  c.optimizer.name = "normalized_adam"
  c.optimizer.lr = 1.21e-3
  c.optimizer.weight_decay = 8.86e-5
  c.optimizer.no_decay = []
  c.schedule.name = "exponential"
  c.schedule.decay_rate = 0.915
  c.schedule.decay_steps = decay_every
  c.schedule.staircase = True
  c.schedule.warmup_steps = 0
  c.schedule.min_lr = 0.0

  e = c.episodes
  e.data_dir = args.data or os.environ.get("META_DATASET_DIR", "")
  e.ignore_hierarchy_probability = 0.5
  e.augment = augment
  f = c.fewshot
  f.head = head
  f.bn_test_mode = args.bn
  # Both, for the 500-support 14x14 episodes: remat alone still forms the whole attention tensor
  # once in the backward (on an H200 it then needs more memory than plain). With 5-query chunks
  # the step needs 5.9x less temporary memory for 1.10x the step time of plain on an H200 (50
  # queries; 46x less at 500 queries), 8x less on CPU (scripts/benchmark_ctx_memory.py,
  # README). remat uses the fused backward (fewshot.ctx_attend_fused,
  # config.fewshot.remat_impl), which recomputes q k^T, and p v where the aligned prototypes
  # are larger than one chunk's attention (500 padded queries: 2.1 GiB instead of 4.8-26 GiB).
  f.remat = True
  f.query_chunk_size = 5
  # +LR: test-time logistic regression (lambda 5, C 10) and the unweighted auxiliary loss.
  f.lr_head = with_lr
  f.aux_loss_weight = 1.0 if with_lr else 0.0
  c.init_checkpoint = args.init
  c.eval_only = args.eval_only

  if args.mini or args.runlocal:
    use_mini_benchmark(c, args.data or MINI_DIR)
    c.total_steps = args.episodes or 1000
    c.eval_every_steps = 250
    c.checkpoint_every_steps = 250
    c.log_every_steps = 50
    c.schedule.decay_steps = max(decay_every // 5, 1)
    c.fewshot.query_chunk_size = 0
  if args.runlocal:
    c.episodes.data_dir = args.data or os.path.join("workdirs", "md_mini_runlocal")
    c.episodes.mini_max_images_per_class = 40
    config_lib.use_fewshot_mini_backbone(c, runlocal=True)
    c.episodes.max_support_set_size = 40
    c.episodes.max_support_size_contrib_per_class = 8
    c.episodes.max_num_query = 4
    c.episodes.num_valid_episodes = 4
    c.episodes.num_test_episodes = 6
    c.total_steps = args.episodes or 6
    c.log_every_steps = 2
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 3
    c.progress_bar = False
    c.plot_curves = False
  return c
