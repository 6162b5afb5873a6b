r"""DeiT III (Touvron's thesis ch. 6, Table 6.1): ViT + LayerScale, LAMB, BCE, 3-Augment.

Default: the ImageNet-1k recipe for ViT-S/16 at 224, 400 epochs, batch 2048 (thesis default;
the published 81.4% uses 800 epochs: add `--config.total_epochs=800 --config.model.drop_path_rate=0.05`).

  python -m visrep_jax.main --config=configs/deit3.py:variant=S --workdir=/tmp/deit3_s \
      --config.dataset.data_dir=$TFDS_DATA_DIR

  # The released ViT-B: 800 epochs at 192, then 20 epochs of fine-tuning at 224:
  python -m visrep_jax.main --config=configs/deit3.py:variant=B,epochs=800,res=192 --workdir=/tmp/deit3_b192 \
      --config.dataset.data_dir=$TFDS_DATA_DIR
  python -m visrep_jax.main --config=configs/deit3.py:variant=B,finetune,res=224,init=/tmp/deit3_b192 \
      --workdir=/tmp/deit3_b224 --config.dataset.data_dir=$TFDS_DATA_DIR

  # ImageNet-21k pre-training (image folder, see below), then 50 epochs on ImageNet-1k:
  python -m visrep_jax.main --config=configs/deit3.py:variant=B,pretrain=in21k,epochs=240 \
      --workdir=/tmp/deit3_b_21k --config.dataset.data_dir=/data/imagenet21k
  python -m visrep_jax.main --config=configs/deit3.py:variant=B,pretrain=in21k,finetune,init=/tmp/deit3_b_21k \
      --workdir=/tmp/deit3_b_21k_ft --config.dataset.data_dir=$TFDS_DATA_DIR

Hardware in the paper: 8 GPUs (V100/A100) for S at batch 2048 (256 x 8) on ImageNet-1k;
on a TPU v4-32 (or 8x A100) the same command runs unchanged (the batch is global). ViT-L/H
used 4 nodes of 8 GPUs (README_revenge.md); the 21k pre-training 16-32 GPUs.
Expected ImageNet-1k val top-1 (crop ratio 1.0; thesis Tables 6.15 / 6.7 / 6.8):
  400 ep @224 (the default): S 80.4 [deit3_in1k/s_400ep] | B 83.1 [deit3_in1k/b_400ep]
                             L 84.2 [deit3_in1k/l_400ep] | H 84.8 [deit3_in1k/h_400ep]
  epochs=800: S 81.4 [deit3_in1k/s_800ep] | B 83.7 [deit3_in1k/b_800ep] | L 84.5 [deit3_in1k/l_800ep]
  epochs=800 at res=192 (H: 160) + finetune at 224 (the released models):
              B 83.8 [deit3_in1k/b_best_224] | L 84.9 [deit3_in1k/l_best_224] | H 85.2 [deit3_in1k/h_best_224]
  finetune,res=384: S 83.4 [deit3_in1k/s_best_384] | B 85.0 [deit3_in1k/b_best_384]
                    L 85.8 [deit3_in1k/l_best_384]
  pretrain=in21k (90 ep) + finetune: S 82.6 [deit3_in21k/s_90ep_224] | B 85.2 [deit3_in21k/b_90ep_224]
                                     L 86.8 [deit3_in21k/l_90ep_224]
  pretrain=in21k,epochs=240 + finetune: S 83.1 [deit3_in21k/s_240ep_224] | B 85.7 [deit3_in21k/b_240ep_224]
              L 87.0 [deit3_in21k/l_240ep_224]; res=384: B 86.7 [deit3_in21k/b_240ep_384]
The thesis has no DeiT III Ti (or M) number.

Arguments (``--config=configs/deit3.py:variant=B,runlocal``):
  variant=Ti|S|M|B|L|H   model size (H uses patch 14).
  pretrain=in1k|in21k    the (pre-)training dataset: in21k is the thesis's 21k recipe.
  finetune               fine-tune from init=DIR: after in1k, the 1k-only fine-tuning at res
                         (224 after low-resolution training, or 384); after in21k, the 21k -> 1k
                         fine-tuning (new classifier) at res (224 or 384).
  res=N                  training resolution (224; e.g. 192 / 160 for the low-resolution runs
                         of Table 6.6; the fine-tuning's target resolution).
  demo                   small ViT on Fashion-MNIST (offline), ~7 minutes on 2 CPU cores, ~0.88 top-1.
  fashion_mnist          issue 4's Fashion-MNIST target run: the demo's transformer (and recipe:
                         AdamW 1.5e-3, batch 64, label smoothing) on a convolutional stem
                         (``deit3_demo_convstem_28``: three 3x3/2 conv + BN + ReLU, 28x28 -> 4x4
                         grid of 128-d tokens; ViT_C of Xiao et al. 2021), random crop (zero-pad 2)
                         + flip, 40 epochs: test top-1 0.9282 in 55.0 CPU-minutes (31.6 min wall,
                         `scripts/reproduce_fashion_mnist.py --families=deit3`; 0.8729 / 0.8995 /
                         0.9058 / 0.9226 at epochs 8 / 16 / 24 / 32).
                         A 24-epoch run reached 0.9217 (17.4 min wall, 30.9 CPU-minutes; 0.8966 /
                         0.9098 / 0.9153 at epochs 12 / 16 / 20). The plain ViT does not reach the
                         issue's 0.92 within 60 CPU-minutes: the 7x7-patch demo model for 40 epochs
                         with random crop + flip, drop path 0.05 and EMA reached 0.9047 (65.9
                         CPU-minutes); 4x4 patches (49 tokens, 3x the step time) 0.8953 after 10
                         epochs and 0.8434 after 2 (7x7 patches: 0.8566, conv stem: 0.8787).
  runlocal               a few steps on synthetic data (smoke test).
  epochs=N               override the number of epochs of whichever stage or mode is chosen (IN-1k
                         400, IN-21k 90, fine-tuning 50 / 20, demo 7, fashion_mnist 40); it also
                         adapts drop path (IN-1k and IN-21k) and weight decay (IN-1k) as in the
                         thesis.
  init=DIR               start from a checkpoint: a workdir or `python -m visrep_jax.convert --out`.
  eval_only              evaluate (the init checkpoint, or the workdir's latest) and exit.

Augmentations named by the recipe: RRC + flip + 3-Augment + ColorJitter(0.3), Mixup 0.8 /
CutMix 1.0 (on device), repeated augmentation x3, BCE with binarised mixed targets.
ImageNet-21k pre-training (Table 6.1): batch 2048, LAMB lr 3e-3 (the README's commands use 1e-3:
``--config.optimizer.lr=1e-3``), wd 0.02, gradient clipping 1.0, 5 warmup epochs, label smoothing
0.1, Simple Random Crop (resize + reflect-pad 4 + random crop) + flip + 3-Augment + ColorJitter
0.3, CutMix 1.0 only, softmax cross-entropy, no repeated augmentation, 90 epochs (240 for the best
models: drop path +0.05); drop path (Table 6.14) Ti/S 0, B 0.1, L 0.3, H 0.5. ImageNet-21k is not
in TFDS: ``dataset.name=imagenet21k`` is an image folder, ``<data_dir>/train/<wnid>/*.JPEG`` plus a
held-out ``<data_dir>/val/<wnid>/*.JPEG`` (the same class directories).
21k -> 1k fine-tuning (Table 6.1, README): the same recipe on ImageNet-1k with LAMB lr 3e-4, 50
epochs, drop path (README) S 0.05, B 0.15, L 0.4, H 0.45; the 21k head is dropped.
1k-only fine-tuning (L2614, README): AdamW lr 1e-5 (not rescaled), batch 512, 20 epochs, wd 0.1,
5 warmup epochs from 1e-6, label smoothing 0.1, Mixup 0.8 / CutMix 1.0 with softmax
cross-entropy, RRC + flip + RandAugment rand-m9-mstd0.5-inc1 (which switches colour jitter off),
no repeated augmentation; drop path (README) B 0.2, L 0.45, H 0.55, S (at 384) 0.
"""

from visrep_jax import config_lib

VARIANTS = {
    # name: (model size, drop path for 400 epochs on IN-1k: thesis Table 6.14)
    "Ti": ("tiny", 0.0), "S": ("small", 0.0), "M": ("medium", 0.0),
    "B": ("base", 0.1), "L": ("large", 0.4), "H": ("huge", 0.5),
}
FASHION_MNIST_EPOCHS = 40

PRETRAIN = ("in1k", "in21k")
# Drop path of the other stages: 21k pre-training (Table 6.14), 21k -> 1k and 1k-only
# fine-tuning (README_revenge.md; Ti/M are not in the thesis or the README: interpolated).
DROP_PATH_21K = {"Ti": 0.0, "S": 0.0, "M": 0.05, "B": 0.1, "L": 0.3, "H": 0.5}
DROP_PATH_21K_FT = {"Ti": 0.0, "S": 0.05, "M": 0.1, "B": 0.15, "L": 0.4, "H": 0.45}
DROP_PATH_1K_FT = {"Ti": 0.0, "S": 0.0, "M": 0.1, "B": 0.2, "L": 0.45, "H": 0.55}

IMAGENET_TRAIN = 1_281_167


def src_three_augment_pp(size: int) -> str:
  """The 21k recipe's Simple Random Crop + flip + 3-Augment + colour jitter."""
  return (f"decode|simple_random_crop({size})|flip_lr|three_augment|color_jitter(0.3, 0.3, 0.3)|"
          "normalize('imagenet')")


def randaugment_pp(size: int) -> str:
  """The 1k-only fine-tuning's timm transform: RRC + flip + RandAugment (no colour jitter)."""
  return (f"decode|random_resized_crop({size}, scale=(0.08, 1.0))|flip_lr|"
          "randaugment('rand-m9-mstd0.5-inc1')|normalize('imagenet')")


def eval_pp(size: int) -> str:
  return f"decode|center_crop({size}, crop_ratio=1.0)|normalize('imagenet')"


def _set_resolution(c, size: str, patch: int, res: int):
  name = f"deit3_{size}_patch{patch}_{res}"
  from visrep_jax import models
  if name in models.MODELS:
    c.model.name = name
  elif res != 224:
    c.model.img_size = res


def get_config(arg=None):
  args = config_lib.parse_arg(arg, variant="S", demo=False, runlocal=False, epochs=0,
                              eval_only=False, init="", pretrain="in1k", finetune=False, res=224,
                              fashion_mnist=False)
  if args.variant not in VARIANTS:
    raise config_lib.ConfigError(
        f"variant={args.variant!r} is not valid; choose one of {', '.join(VARIANTS)}.")
  if args.pretrain not in PRETRAIN:
    raise config_lib.ConfigError(
        f"pretrain={args.pretrain!r} is not valid; choose one of {', '.join(PRETRAIN)}.")
  if args.finetune and not args.init:
    raise config_lib.ConfigError("finetune needs the weights to start from: add init=DIR (a "
                                 "workdir or a `python -m visrep_jax.convert --out` directory).")
  size, drop_path = VARIANTS[args.variant]
  patch = 14 if size == "huge" else 16
  c = config_lib.base_config()
  c.seed = 0
  c.batch_size = 2048
  # epochs=0: each stage's default (IN-1k 400, IN-21k 90, fine-tuning 50 / 20, demo 7,
  # fashion_mnist FASHION_MNIST_EPOCHS); any other value overrides every stage's default.
  epochs = args.epochs or 400
  c.total_epochs = float(epochs)
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000

  c.model.name = f"deit3_{size}_patch{patch}_224"
  # Longer schedules: +0.05 drop path every 200 epochs beyond 400 (thesis L2620).
  extra = max(0, (epochs - 400) // 200) * 0.05 if drop_path > 0 or epochs > 400 else 0.0
  c.model.drop_path_rate = round(drop_path + extra, 3)

  c.dataset.name = "imagenet2012"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.repeated_aug = 3
  c.dataset.train_pp = ("decode|random_resized_crop(224, scale=(0.08, 1.0))|flip_lr|"
                        "three_augment|color_jitter(0.3, 0.3, 0.3)|normalize('imagenet')")
  c.dataset.eval_pp = "decode|center_crop(224, crop_ratio=1.0)|normalize('imagenet')"

  c.optimizer.name = "lamb"
  c.optimizer.lr = 3e-3
  c.optimizer.weight_decay = 0.02 if epochs <= 400 else 0.05
  c.optimizer.eps = 1e-8
  c.optimizer.clip_grad_norm = 1.0
  c.schedule.name = "cosine"
  c.schedule.warmup_epochs = 5.0
  c.schedule.warmup_init_lr = 1e-6
  c.schedule.min_lr = 1e-5

  c.loss.name = "sigmoid_xent"
  c.loss.label_smoothing = 0.0
  c.mixup.mixup_alpha = 0.8
  c.mixup.cutmix_alpha = 1.0
  c.mixup.prob = 1.0
  c.mixup.switch_prob = 0.5

  res = args.res
  if res != 224 and not args.finetune and args.pretrain == "in1k":
    # Lower-resolution training (Table 6.6), followed by a fine-tuning at 224.
    c.model.img_size = res
    c.dataset.train_pp = c.dataset.train_pp.replace("random_resized_crop(224,",
                                                    f"random_resized_crop({res},")
    c.dataset.eval_pp = eval_pp(res)

  if args.pretrain == "in21k":
    c.loss.name = "softmax_xent"
    c.loss.label_smoothing = 0.1
    c.mixup.mixup_alpha = 0.0
    c.mixup.cutmix_alpha = 1.0
    c.dataset.repeated_aug = 1
    c.dataset.train_pp = src_three_augment_pp(res)
    c.dataset.eval_pp = eval_pp(res)
    c.optimizer.weight_decay = 0.02
    if not args.finetune:
      c.dataset.name = "imagenet21k"
      c.dataset.eval_split = "val"
      c.total_epochs = float(args.epochs or 90)
      c.model.drop_path_rate = round(
          DROP_PATH_21K[args.variant] + (0.05 if c.total_epochs >= 240 else 0.0), 3)
      c.optimizer.lr = 3e-3
      if res != 224:
        c.model.img_size = res
    else:
      c.total_epochs = float(args.epochs or 50)
      c.model.drop_path_rate = DROP_PATH_21K_FT[args.variant]
      c.optimizer.lr = 3e-4
      _set_resolution(c, size, patch, res)
  elif args.finetune:
    c.batch_size = 512
    c.total_epochs = float(args.epochs or 20)
    c.dataset.repeated_aug = 1
    c.dataset.train_pp = randaugment_pp(res)
    c.dataset.eval_pp = eval_pp(res)
    c.model.drop_path_rate = DROP_PATH_1K_FT[args.variant]
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-5
    c.optimizer.weight_decay = 0.1
    c.optimizer.clip_grad_norm = 0.0
    c.loss.name = "softmax_xent"
    c.loss.label_smoothing = 0.1
    _set_resolution(c, size, patch, res)

  if args.demo or args.fashion_mnist:
    # DeiT III's architecture (ViT + LayerScale, pre-norm, class token) scaled to Fashion-MNIST
    # 28x28: 7x7 patches (16 tokens), 4 blocks of width 128, trained for 7 epochs on 2 CPU
    # cores in about 7 minutes. At this scale and length AdamW converges faster than LAMB, batch
    # 64 (more updates) beats 128, and
    # the ImageNet augmentations (RRC, 3-Augment, Mixup/CutMix) cost more than they give, so
    # only horizontal flips are kept. Expected test top-1: ~0.88 (0.8812 and 0.8845 measured).
    c.model = config_lib.base_config().model
    c.model.name = "deit3_demo_patch7_28"
    c.model.drop_path_rate = 0.0
    config_lib.use_fashion_mnist(c, "decode(1)|flip_lr|normalize('fashion_mnist')")
    c.batch_size = 64
    c.total_epochs = float(args.epochs or 7)
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1.5e-3
    c.optimizer.weight_decay = 0.05
    c.optimizer.clip_grad_norm = 1.0
    c.schedule.warmup_epochs = 0.2
    c.schedule.min_lr = 1e-5
    c.loss.name = "softmax_xent"
    c.loss.label_smoothing = 0.1
    c.mixup.mixup_alpha = 0.0
    c.mixup.cutmix_alpha = 0.0
    c.log_every_steps = 100
    c.eval_every_steps = 2000
    c.checkpoint_every_steps = 2000
  if args.fashion_mnist:
    # The issue-4 target run: the same transformer on a 3-layer convolutional stem (ViT_C,
    # 4x4 grid of 128-d tokens; train step 1,575 vs 2,000 img/s for the demo model with
    # `scripts/benchmark.py --batch_size=64 --steps=100 --repeats=3 --no-infer`, run back to
    # back on 2 CPU cores, 2026-11-27), random crop (zero-pad 2) + flip, FASHION_MNIST_EPOCHS
    # epochs.
    c.model.name = "deit3_demo_convstem_28"
    c.dataset.train_pp = ("decode(1)|random_crop(28, pad=2, pad_mode='constant')|flip_lr|"
                          "normalize('fashion_mnist')")
    c.total_epochs = float(args.epochs or FASHION_MNIST_EPOCHS)
    c.eval_every_steps = 3748
    c.checkpoint_every_steps = 3748

  c.eval_only = args.eval_only
  c.init_checkpoint = args.init

  if args.runlocal:
    c.model = config_lib.base_config().model
    c.model.name = "vit_test_patch4_16"
    c.model.drop_path_rate = 0.1
    config_lib.use_synthetic_smoke_run(
        c, train_pp=("decode|random_resized_crop(16)|flip_lr|three_augment|"
                          "color_jitter(0.3, 0.3, 0.3)|normalize('imagenet')"),
        eval_pp="decode|center_crop(16)|normalize('imagenet')")
    if args.pretrain == "in21k" or args.finetune:
      # The stage's own augmentations at the test model's size (24 for a fine-tuning: the
      # position embedding of a 16x16 init is resampled).
      rl_res = 24 if args.finetune else 16
      if args.finetune:
        c.model.img_size = rl_res
      pp = src_three_augment_pp if args.pretrain == "in21k" else randaugment_pp
      c.dataset.train_pp = pp(rl_res)
      c.dataset.eval_pp = eval_pp(rl_res)
    c.batch_size = 16
    c.schedule.warmup_epochs = 0.0
    c.schedule.warmup_steps = 2
  return c
