r"""DeiT (Touvron's thesis ch. 3A, Table 3.9; facebookresearch/deit main.py): ViT trained on
ImageNet-1k only with AdamW, strong augmentation, repeated augmentation and (optionally)
distillation from a teacher through a distillation token.

Default: DeiT-S, 300 epochs, batch 1024, no distillation:

  python -m visrep_jax.main --config=configs/deit.py:variant=S --workdir=/tmp/deit_s \
      --config.dataset.data_dir=$TFDS_DATA_DIR --config.dtype=bfloat16

DeiT-B⚗ (distillation token, hard distillation) from a converted or trained teacher:

  python -m visrep_jax.main --config=configs/deit.py:variant=B,distillation=token,teacher=/ckpts/teacher \
      --workdir=/tmp/deit_b_dist --config.dataset.data_dir=$TFDS_DATA_DIR

Fine-tune at 384 (DeiT-B↑384; the pos_embed is resampled bicubically from the 224 checkpoint):

  python -m visrep_jax.main --config=configs/deit.py:variant=B,finetune,init=/tmp/deit_b \
      --workdir=/tmp/deit_b_384 --config.dataset.data_dir=$TFDS_DATA_DIR

Hardware in the paper: DeiT-B, 300 epochs = 37 h on 16 V100 (2 nodes) or 53 h on 8; DeiT-S and
DeiT-Ti < 3 days on 4 GPUs (L1167). The batch is global: 8 GPUs or a TPU v4-32 run it unchanged.
Expected ImageNet-1k val top-1 (crop ratio 0.875), 300 epochs, RegNetY-16GF teacher:
  Ti 72.2 [deit_in1k/deit_tiny] | S 79.8 [deit_in1k/deit_small] | B 81.8 [deit_in1k/deit_base]
  B↑384 83.1 [deit_in1k/deit_base_384]
  distillation=soft:  Ti 72.2 [deit_distillation/tiny_224_soft] | S 79.8 [deit_distillation/small_224_soft]
                      B 81.8 [deit_distillation/base_224_soft]
  distillation=hard:  Ti 74.3 [deit_distillation/tiny_224_hard] | S 80.9 [deit_distillation/small_224_hard]
                      B 83.0 [deit_distillation/base_224_hard]
  distillation=token: Ti 74.5 [deit_distillation/tiny_224_token] | S 81.2 [deit_distillation/small_224_token]
                      B 83.4 [deit_distillation/base_224_token] | B↑384 84.5 [deit_distillation/base_384_token]
  epochs=1000, token: Ti 76.6 [deit_in1k/deit_tiny_dist_1000ep] | S 82.6 [deit_in1k/deit_small_dist_1000ep]
                      B 84.2 [deit_in1k/deit_base_dist_1000ep] | B↑384 85.2 [deit_in1k/deit_base_dist_384_1000ep]
The thesis's teacher, RegNetY-16GF (82.9 [deit_in1k/regnety_16gf]), is not in the model zoo: the
default ``teacher_model`` is DeiT-B (81.8), the transformer teacher of Table 3.2, with which
DeiT-B⚗ reaches 81.9 [deit_teachers/deit_base_224] (↑384: 83.1 [deit_teachers/deit_base_384]).

Arguments (``--config=configs/deit.py:variant=B,distillation=hard,teacher=DIR``):
  variant=Ti|S|B          model size (DeiT-Ti/S/B: 192/384/768 wide, 3/6/12 heads, depth 12).
  distillation=none|soft|hard|token
                          soft: (1-0.1) CE + 0.1 tau^2 KL(tau=3), KL / (batch x classes) as the
                          reference; hard: 1/2 CE(y) + 1/2 CE(argmax teacher) on the class head;
                          token: the distilled model (dist_token + head_dist), hard distillation
                          on the distillation head, eval = mean of the two heads' logits.
  teacher=DIR             the teacher's checkpoint (workdir or `python -m visrep_jax.convert --out`).
  teacher_model=NAME      the teacher's zoo model (default deit_base_patch16_224).
  epochs=N                training epochs (300; 1000 for the long distilled runs; fine-tuning 30;
                          fashion_mnist 12). N overrides whichever default applies.
  finetune                fine-tune at res (default 384) from init=DIR: the deit README recipe.
  res=N                   resolution of the fine-tuning (default 384).
  init=DIR                initial weights (required by finetune).
  eval_only               evaluate the init checkpoint (or the workdir's latest) and exit.
  fashion_mnist           the recipe scaled to Fashion-MNIST (see below).
  runlocal                a few steps on synthetic data (smoke test of every ingredient).

The recipe (Table 3.9 + main.py defaults): AdamW, lr 5e-4 x batch/512 (1e-3 at 1024), wd 0.05,
eps 1e-8, 5 warmup epochs from 1e-6, cosine to 1e-5, the LR stepped once per epoch
(``schedule.per_epoch``), label smoothing 0.1, stochastic depth 0.1 growing linearly with depth,
RandomResizedCrop (bicubic) + flip + RandAugment rand-m9-mstd0.5-inc1 (timm applies no colour
jitter when RandAugment is on, so there is none) + random erasing 0.25 (pixel mode, after
normalisation), Mixup 0.8 / CutMix 1.0 (switch 0.5), repeated augmentation x3, no gradient
clipping, no dropout, weight EMA 0.99996 (main.py's default; evaluated beside the weights, the
thesis reports the weights: EMA is +0.1 before fine-tuning, L1132). Eval: Resize 256 + CenterCrop
224 (crop ratio 0.875). Fine-tuning at 384 (README_deit.md): batch 512, lr 5e-6 x batch/512,
min lr 5e-6, wd 1e-8, 30 epochs (the thesis says 25, L1134), the training augmentation kept; a
distilled model keeps distilling with the teacher run at the new resolution, so ``teacher=DIR``
must then hold weights for that resolution (the paper's teacher is FixRes-adapted; a ViT
teacher: its checkpoint at 384, with ``teacher_model`` its 384 model).

fashion_mnist: DeiT-Ti's architecture (class token and position-embedding slot, no LayerScale,
linear stochastic depth) at 28x28 grey: 7x7 patches (16 tokens), 6 blocks of width 128, 4 heads;
AdamW (lr 1e-3 at batch 128: the DeiT rule would give 2.5e-4, too slow for a short run), wd 0.05,
per-epoch cosine, label smoothing 0.1, random crop (pad 2) + flip + random erasing 0.25; no
RandAugment (colour ops on grey images) and no Mixup/CutMix (they cost more than they give in 12
epochs). About 30-45 minutes on 2 CPU cores (estimate). With ``distillation=token,teacher=DIR``
the teacher is ``configs/resnet.py:fashion_mnist``'s ResNet-18.
"""

from visrep_jax import config_lib

VARIANTS = {"Ti": "tiny", "S": "small", "B": "base"}
DISTILLATION = ("none", "soft", "hard", "token")
REGISTERED_384 = ("deit_base_patch16_384", "deit_base_distilled_patch16_384")

# The teachers of the small-scale runs, exactly as configs/resnet.py builds them.
RESNET_RUNLOCAL = config_lib.RESNET_RUNLOCAL
RESNET_FASHION_MNIST = config_lib.RESNET_FASHION_MNIST


def train_pp(size: int) -> str:
  return (f"decode|random_resized_crop({size}, scale=(0.08, 1.0))|flip_lr|"
          "randaugment('rand-m9-mstd0.5-inc1')|normalize('imagenet')|"
          "random_erasing(0.25, mode='pixel')")


def eval_pp(size: int) -> str:
  return f"decode|center_crop({size}, crop_ratio=0.875)|normalize('imagenet')"


def get_config(arg=None):
  args = config_lib.parse_arg(arg, variant="S", distillation="none", teacher="",
                              teacher_model="deit_base_patch16_224", epochs=0, finetune=False,
                              res=384, init="", eval_only=False, fashion_mnist=False,
                              runlocal=False)
  if args.variant not in VARIANTS:
    raise config_lib.ConfigError(
        f"variant={args.variant!r} is not valid; choose one of {', '.join(VARIANTS)}.")
  if args.distillation not in DISTILLATION:
    raise config_lib.ConfigError(f"distillation={args.distillation!r} is not valid; choose one "
                                 f"of {', '.join(DISTILLATION)}.")
  if args.finetune and not args.init:
    raise config_lib.ConfigError("finetune needs the weights to start from: add init=DIR (a "
                                 "workdir or a `python -m visrep_jax.convert --out` directory).")
  size = VARIANTS[args.variant]
  token = args.distillation == "token"
  c = config_lib.base_config()
  c.seed = 0
  c.batch_size = 1024
  c.total_epochs = float(args.epochs or 300)
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000

  c.model.name = f"deit_{size}{'_distilled' if token else ''}_patch16_224"
  c.model.drop_path_rate = 0.1  # linear over depth (the DeiT models' drop_path_uniform=False)

  c.dataset.name = "imagenet2012"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.repeated_aug = 3
  c.dataset.train_pp = train_pp(224)
  c.dataset.eval_pp = eval_pp(224)

  c.optimizer.name = "adamw"
  c.optimizer.lr = 5e-4 * c.batch_size / 512  # main.py: lr * batch / 512 (no --unscale-lr)
  c.optimizer.weight_decay = 0.05
  c.optimizer.eps = 1e-8
  c.optimizer.clip_grad_norm = 0.0
  # Per-epoch cosine after 5 warmup epochs, label smoothing 0.1, Mixup/CutMix, EMA 0.99996.
  config_lib.use_deit_schedule_and_regularisation(c)

  if args.distillation != "none":
    c.distill.type = "soft" if args.distillation == "soft" else "hard"
    c.distill.alpha = 0.1 if args.distillation == "soft" else 0.5
    c.distill.tau = 3.0 if args.distillation == "soft" else 1.0
    c.distill.kl_divisor = "numel"
    c.distill.teacher = args.teacher_model
    c.distill.teacher_checkpoint = args.teacher

  if args.finetune:
    res = args.res
    name = f"deit_{size}{'_distilled' if token else ''}_patch16_{res}"
    if name in REGISTERED_384:
      c.model.name = name
    else:
      c.model.img_size = res
    c.batch_size = 512
    c.total_epochs = float(args.epochs or 30)
    c.optimizer.lr = 5e-6 * c.batch_size / 512
    c.optimizer.weight_decay = 1e-8
    c.schedule.min_lr = 5e-6
    c.dataset.train_pp = train_pp(res)
    c.dataset.eval_pp = eval_pp(res)
    if args.distillation != "none":
      c.distill.teacher_overrides = {"img_size": res}

  if args.fashion_mnist:
    c.model.name = f"deit_tiny{'_distilled' if token else ''}_patch16_224"
    c.model.img_size = 28
    c.model.patch_size = 7
    c.model.embed_dim = 128
    c.model.depth = 6
    c.model.num_heads = 4
    c.model.drop_path_rate = 0.05
    config_lib.use_fashion_mnist(c, ("decode(1)|random_crop(28, pad=2)|flip_lr|normalize('fashion_mnist')|"
                          "random_erasing(0.25, mode='pixel')"))
    c.batch_size = 128
    c.total_epochs = float(args.epochs or 12)
    c.optimizer.lr = 1e-3
    c.schedule.warmup_epochs = 1.0
    c.schedule.min_lr = 1e-5
    c.mixup.mixup_alpha = 0.0
    c.mixup.cutmix_alpha = 0.0
    c.ema.decay = 0.999
    c.eval_every_steps = 2000
    if args.distillation != "none":
      c.distill.teacher, c.distill.teacher_overrides = RESNET_FASHION_MNIST

  c.eval_only = args.eval_only
  c.init_checkpoint = args.init

  if args.runlocal:
    c.model = config_lib.base_config().model
    c.model.name = "vit_test_patch4_16"
    # The test ViT made DeiT-like: position-embedding slot for the class (and distillation)
    # token, no LayerScale, linear stochastic depth.
    c.model.pos_embed_cls_slot = True
    c.model.layerscale_init = None
    c.model.drop_path_uniform = False
    c.model.distilled = token
    c.model.drop_path_rate = 0.1
    res = 24 if args.finetune else 16
    if args.finetune:
      c.model.img_size = res
    config_lib.use_synthetic_smoke_run(
        c, train_pp=train_pp(res),
        eval_pp=eval_pp(res), repeated_aug=3)
    c.batch_size = 16
    c.optimizer.lr = 5e-4 * c.batch_size / 512
    c.schedule.warmup_epochs = 0.0
    c.schedule.warmup_steps = 2
    c.ema.decay = 0.9
    if args.distillation != "none":
      c.distill.teacher, c.distill.teacher_overrides = RESNET_RUNLOCAL
      if args.finetune:
        c.distill.teacher_overrides = dict(RESNET_RUNLOCAL[1], img_size=res)
  return c
