r"""DeiT III (Touvron's thesis ch. 6, Table 6.1): ViT + LayerScale, LAMB, BCE, 3-Augment.

Default: the ImageNet-1k recipe for ViT-S/16 at 224, 400 epochs, batch 2048 (thesis default;
the published 81.4% uses 800 epochs: add `--config.total_epochs=800 --config.model.drop_path_rate=0.05`).

  python -m visrep_jax.main --config=configs/deit3.py:variant=S --workdir=/tmp/deit3_s \
      --config.dataset.data_dir=$TFDS_DATA_DIR

Hardware in the paper: 8 GPUs (V100/A100) for S at batch 2048 (256 x 8) on ImageNet-1k;
on a TPU v4-32 (or 8x A100) the same command runs unchanged (the batch is global).
Expected ImageNet-1k val top-1 (thesis Tables 6.7/6.15, 224x224):
  Ti 75.4 (400 ep) | S 80.4 (400 ep), 81.4 (800 ep) | B 83.5 (400 ep), 83.8 (800 ep)
  L 84.5 (400 ep), 84.9 (800 ep) | H 85.1 (400 ep), 85.2 (800 ep).

Arguments (``--config=configs/deit3.py:variant=B,runlocal``):
  variant=Ti|S|M|B|L|H   model size (H uses patch 14).
  demo                   small ViT on Fashion-MNIST (offline), ~7 minutes on 2 CPU cores, ~0.88 top-1.
  runlocal               a few steps on synthetic data (smoke test).
  epochs=N               override the number of epochs (also adapts drop path as in the thesis).
  init=DIR               start from a checkpoint: a workdir or `python -m visrep_jax.convert --out`.
  eval_only              evaluate (the init checkpoint, or the workdir's latest) and exit.

Augmentations named by the recipe: RRC + flip + 3-Augment + ColorJitter(0.3), Mixup 0.8 /
CutMix 1.0 (on device), repeated augmentation x3, BCE with binarised mixed targets.
"""

from visrep_jax import config_lib

VARIANTS = {
    # name: (model size, drop path for 400 epochs on IN-1k: thesis Table 6.14)
    "Ti": ("tiny", 0.0), "S": ("small", 0.0), "M": ("medium", 0.0),
    "B": ("base", 0.1), "L": ("large", 0.4), "H": ("huge", 0.5),
}

IMAGENET_TRAIN = 1_281_167


def get_config(arg=None):
  args = config_lib.parse_arg(arg, variant="S", demo=False, runlocal=False, epochs=400,
                              eval_only=False, init="")
  if args.variant not in VARIANTS:
    raise config_lib.ConfigError(
        f"variant={args.variant!r} is not valid; choose one of {', '.join(VARIANTS)}.")
  size, drop_path = VARIANTS[args.variant]
  patch = 14 if size == "huge" else 16
  c = config_lib.base_config()
  c.seed = 0
  c.batch_size = 2048
  c.total_epochs = float(args.epochs)
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000

  c.model.name = f"deit3_{size}_patch{patch}_224"
  # Longer schedules: +0.05 drop path every 200 epochs beyond 400 (thesis L2620).
  extra = max(0, (args.epochs - 400) // 200) * 0.05 if drop_path > 0 or args.epochs > 400 else 0.0
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
  c.optimizer.weight_decay = 0.02 if args.epochs <= 400 else 0.05
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

  if args.demo:
    # DeiT III's architecture (ViT + LayerScale, pre-norm, class token) scaled to Fashion-MNIST
    # 28x28: 7x7 patches (16 tokens), 4 blocks of width 128, trained for 7 epochs on 2 CPU
    # cores in about 7 minutes. At this scale and length AdamW converges faster than LAMB, batch
    # 64 (more updates) beats 128, and
    # the ImageNet augmentations (RRC, 3-Augment, Mixup/CutMix) cost more than they give, so
    # only horizontal flips are kept. Expected test top-1: ~0.88 (0.8812 and 0.8845 measured).
    c.model.name = "deit3_demo_patch7_28"
    c.model.drop_path_rate = 0.0
    c.dataset.name = "fashion_mnist"
    c.dataset.train_split = "train"
    c.dataset.eval_split = "test"
    c.dataset.repeated_aug = 1
    c.dataset.shuffle_buffer = 60_000
    c.dataset.train_pp = "decode(1)|flip_lr|normalize('fashion_mnist')"
    c.dataset.eval_pp = "decode(1)|normalize('fashion_mnist')"
    c.batch_size = 64
    c.total_epochs = 7.0
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

  c.eval_only = args.eval_only
  c.init_checkpoint = args.init

  if args.runlocal:
    c.model.name = "vit_test_patch4_16"
    c.model.drop_path_rate = 0.1
    c.dataset.name = "synthetic"
    c.dataset.train_split = "train"
    c.dataset.eval_split = "test"
    c.dataset.repeated_aug = 1
    c.dataset.shuffle_buffer = 1000
    c.dataset.train_pp = ("decode|random_resized_crop(16)|flip_lr|three_augment|"
                          "color_jitter(0.3, 0.3, 0.3)|normalize('imagenet')")
    c.dataset.eval_pp = "decode|center_crop(16)|normalize('imagenet')"
    c.batch_size = 16
    c.total_epochs = 0.0
    c.total_steps = 6
    c.log_every_steps = 2
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 3
    c.schedule.warmup_epochs = 0.0
    c.schedule.warmup_steps = 2
    c.progress_bar = False
  return c
