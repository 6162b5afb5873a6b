r"""CaiT (Touvron's thesis ch. 3B): deep ViTs with LayerScale and class-attention, trained with the
DeiT recipe for 400 epochs; only stochastic depth d_r and the LayerScale init change per model
(Table 3.16). Υ = hard distillation from a RegNetY-16GF teacher, no distillation token.

  python -m visrep_jax.main --config=configs/cait.py:variant=S36 --workdir=/tmp/cait_s36 \
      --config.dataset.data_dir=$TFDS_DATA_DIR --config.dtype=bfloat16

  # CaiT-S36Υ, then ↑384 (the position embedding is resampled bicubically from 224):
  python -m visrep_jax.main --config=configs/cait.py:variant=S36,distillation=hard,teacher=/ckpts/teacher \
      --workdir=/tmp/cait_s36_dist --config.dataset.data_dir=$TFDS_DATA_DIR
  python -m visrep_jax.main --config=configs/cait.py:variant=S36,distillation=hard,teacher=/ckpts/teacher,finetune,init=/tmp/cait_s36_dist \
      --workdir=/tmp/cait_s36_dist_384 --config.dataset.data_dir=$TFDS_DATA_DIR

Hardware in the paper: V100 nodes with fp16 and Fairscale sharded training (L1230); use
``--config.dtype=bfloat16`` (and ``--config.sharding=fsdp`` for M-36/M-48) on A100/H100/TPU.
Expected ImageNet-1k val top-1 (thesis Table 3.15, trained at 224 for 400 epochs, crop 1.0):
  XXS24 77.6 [cait_in1k/xxs24_224] | XXS36 79.1 [cait_in1k/xxs36_224] | XS24 81.8 [cait_in1k/xs24_224]
  XS36 82.6 [cait_in1k/xs36_224] | S24 82.7 [cait_in1k/s24_224] | S36 83.3 [cait_in1k/s36_224]
  S48 83.5 [cait_in1k/s48_224] | M24 83.4 [cait_in1k/m24_224] | M36 83.8 [cait_in1k/m36_224]
  distillation=hard (Υ): S24 83.5 [cait_in1k/s24_224_dist] | S36 84.0 [cait_in1k/s36_224_dist]
                         M36 85.1 [cait_in1k/m36_224_dist]
  finetune ↑384: S36 85.0 [cait_in1k/s36_384] | S36Υ 85.4 [cait_in1k/s36_384_dist]
                 M36Υ 86.1 [cait_in1k/m36_384_dist] | ↑448: M48Υ 86.5 [cait_in1k/m48_448_dist]
The thesis's teacher RegNetY-16GF is not in the zoo; ``teacher_model`` picks another (default
deit_base_patch16_224).

Arguments (``--config=configs/cait.py:variant=XXS24,runlocal``):
  variant=XXS24|XXS36|XS24|XS36|S24|S36|S48|M24|M36|M48
  distillation=none|hard  Υ: 1/2 CE(y) + 1/2 CE(argmax teacher) on the single class head.
  teacher=DIR             the teacher's checkpoint; teacher_model=NAME its zoo model.
  epochs=N                training epochs (400: 500 gives nothing more, L1588; fine-tuning 30;
                          fashion_mnist 12). N overrides whichever default applies.
  finetune                fine-tune from init=DIR at res (384; 448 for M48).
  res=N                   fine-tuning resolution.
  init=DIR, eval_only     as in every config.
  fashion_mnist           CaiT-XXS scaled to Fashion-MNIST (see below).
  runlocal                a few steps on synthetic data.

Recipe (L1428 + the DeiT defaults, Table 3.9): AdamW, lr 5e-4 x batch/512 = 1e-3 at batch 1024, wd
0.05, 5 warmup epochs from 1e-6, cosine to 1e-5 stepped per epoch, 400 epochs, label smoothing
0.1, RandAugment rand-m9-mstd0.5-inc1 (no colour jitter), random erasing 0.25, Mixup 0.8 /
CutMix 1.0, repeated augmentation x3, no clipping, uniform stochastic depth d_r (Table 3.16) in
the self-attention blocks only, EMA 0.99996 (the deit repo's default, evaluated beside the
weights). Test: Resize to the test size + full centre crop (ratio 1.0). Fine-tuning (↑384/448,
"as DeiT"; the thesis gives no values): README_deit.md's DeiT recipe, batch 512, lr 5e-6 x
batch/512, min lr 5e-6, wd 1e-8, 30 epochs, the training augmentation kept, distillation kept
with the teacher run at the new resolution.

fashion_mnist: CaiT-XXS-like at 28x28 grey: 7x7 patches, 8 talking-heads self-attention blocks +
2 class-attention blocks, width 96 (2 heads of 48 as CaiT), LayerScale init 0.1 (depth <= 18),
d_r 0.05, AdamW lr 1e-3 at batch 128, 12 epochs, label smoothing 0.1, random crop + flip +
random erasing. About 30-45 minutes on 2 CPU cores (estimate).
"""

from visrep_jax import config_lib, models

VARIANTS = {v.upper(): v for v in ("xxs24", "xxs36", "xs24", "xs36", "s24", "s36", "s48",
                                   "m24", "m36", "m48")}
# Table 3.16: uniform stochastic depth d_r (the LayerScale init is in the registered models).
DROP_PATH = {"xxs24": 0.05, "xxs36": 0.1, "xs24": 0.05, "xs36": 0.1, "s24": 0.1, "s36": 0.2,
             "s48": 0.3, "m24": 0.2, "m36": 0.3, "m48": 0.4}
RESNET_RUNLOCAL = config_lib.RESNET_RUNLOCAL
RESNET_FASHION_MNIST = config_lib.RESNET_FASHION_MNIST


def train_pp(size: int) -> str:
  return (f"decode|random_resized_crop({size}, scale=(0.08, 1.0))|flip_lr|"
          "randaugment('rand-m9-mstd0.5-inc1')|normalize('imagenet')|"
          "random_erasing(0.25, mode='pixel')")


def eval_pp(size: int) -> str:
  return f"decode|center_crop({size}, crop_ratio=1.0)|normalize('imagenet')"


def _model_name(size: str, res: int):
  """(registered name, img_size override or None) of CaiT-``size`` at ``res``."""
  name = f"cait_{size}_{res}"
  if name in models.MODELS:
    return name, None
  for r in (224, 384, 448):
    if f"cait_{size}_{r}" in models.MODELS:
      return f"cait_{size}_{r}", (res if r != res else None)
  raise config_lib.ConfigError(f"no registered CaiT-{size.upper()} model")


def get_config(arg=None):
  args = config_lib.parse_arg(arg, variant="S36", distillation="none", teacher="",
                              teacher_model="deit_base_patch16_224", epochs=0, finetune=False,
                              res=0, init="", eval_only=False, fashion_mnist=False,
                              runlocal=False)
  if args.variant not in VARIANTS:
    raise config_lib.ConfigError(
        f"variant={args.variant!r} is not valid; choose one of {', '.join(VARIANTS)}.")
  if args.distillation not in ("none", "hard"):
    raise config_lib.ConfigError(
        f"distillation={args.distillation!r} is not valid; choose one of none, hard.")
  if args.finetune and not args.init:
    raise config_lib.ConfigError("finetune needs the weights to start from: add init=DIR.")
  size = VARIANTS[args.variant]
  c = config_lib.base_config()
  c.seed = 0
  c.batch_size = 1024
  c.total_epochs = float(args.epochs or 400)
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000

  res = args.res or (448 if args.finetune and size == "m48" else (384 if args.finetune else 224))
  name, img_size = _model_name(size, res)
  c.model.name = name
  if img_size:
    c.model.img_size = img_size
  c.model.drop_path_rate = DROP_PATH[size]

  c.dataset.name = "imagenet2012"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.repeated_aug = 3
  c.dataset.train_pp = train_pp(res)
  c.dataset.eval_pp = eval_pp(res)

  c.optimizer.name = "adamw"
  c.optimizer.lr = 5e-4 * c.batch_size / 512
  c.optimizer.weight_decay = 0.05
  c.optimizer.eps = 1e-8
  c.optimizer.clip_grad_norm = 0.0
  config_lib.use_deit_schedule_and_regularisation(c)

  if args.distillation == "hard":
    config_lib.use_distillation(c, "hard", args.teacher_model, args.teacher)

  if args.finetune:
    c.batch_size = 512
    c.total_epochs = float(args.epochs or 30)
    c.optimizer.lr = 5e-6 * c.batch_size / 512
    c.optimizer.weight_decay = 1e-8
    c.schedule.min_lr = 5e-6
    if args.distillation == "hard":
      c.distill.teacher_overrides = {"img_size": res}

  if args.fashion_mnist:
    c.model.name = "cait_xxs24_224"
    c.model.img_size = 28
    c.model.patch_size = 7
    c.model.embed_dim = 96
    c.model.num_heads = 2
    c.model.depth = 8
    c.model.layerscale_init = 0.1
    c.model.drop_path_rate = 0.05
    config_lib.use_fashion_mnist(c, ("decode(1)|random_crop(28, pad=2)|flip_lr|normalize('fashion_mnist')|"
                          "random_erasing(0.25, mode='pixel')"))
    c.batch_size = 128
    c.total_epochs = float(args.epochs or 12)
    c.optimizer.lr = 1e-3
    c.schedule.warmup_epochs = 1.0
    c.mixup.mixup_alpha = 0.0
    c.mixup.cutmix_alpha = 0.0
    c.ema.decay = 0.999
    c.eval_every_steps = 2000
    if args.distillation == "hard":
      c.distill.teacher, c.distill.teacher_overrides = RESNET_FASHION_MNIST

  c.eval_only = args.eval_only
  c.init_checkpoint = args.init

  if args.runlocal:
    c.model = config_lib.base_config().model
    c.model.name = "cait_test_patch4_16"
    c.model.drop_path_rate = 0.1
    rl_res = 24 if args.finetune else 16
    if args.finetune:
      c.model.img_size = rl_res
    config_lib.use_synthetic_smoke_run(
        c, train_pp=train_pp(rl_res),
        eval_pp=eval_pp(rl_res), repeated_aug=3)
    c.batch_size = 16
    c.optimizer.lr = 5e-4 * c.batch_size / 512
    c.schedule.warmup_epochs = 0.0
    c.schedule.warmup_steps = 2
    c.ema.decay = 0.9
    if args.distillation == "hard":
      c.distill.teacher, overrides = RESNET_RUNLOCAL
      c.distill.teacher_overrides = dict(overrides, img_size=rl_res)
  return c
