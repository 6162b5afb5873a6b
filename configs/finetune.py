r"""Fine-tuning a zoo model at a higher resolution (FixRes effect): DeiT-B 224 -> 384, CaiT at
384/448, DeiT III at 384 (or 224 after low-resolution training), PatchConvNet at 384.

The init checkpoint is a model trained at a lower resolution (a workdir, or an official
checkpoint converted with ``python -m visrep_jax.convert``): its position embedding is resampled
bicubically to the new patch grid (class / distillation token slots kept, as the deit repo's
``--finetune``), which ``visrep_jax.checkpoint.load_variables`` does and logs.

  python -m visrep_jax.main --config=configs/finetune.py:model=deit_base_patch16_384,init=/ckpts/deit_b_224 \
      --workdir=/tmp/deit_b_384 --config.dataset.data_dir=$TFDS_DATA_DIR
  python -m visrep_jax.main --config=configs/finetune.py:model=cait_m36_448,init=/tmp/cait_m36 \
      --workdir=/tmp/cait_m36_448 --config.dataset.data_dir=$TFDS_DATA_DIR

Hardware in the paper: DeiT-B↑384 took 20 h on 8 GPUs (L1167, 25 epochs).
Expected ImageNet-1k val top-1 after fine-tuning:
  DeiT-B↑384 83.1 [deit_in1k/deit_base_384] (at 320: 82.7 [deit_resolution/base_320])
  DeiT-B⚗↑384 84.5 [deit_in1k/deit_base_dist_384] (with teacher=DIR)
  CaiT-S36↑384 85.0 [cait_in1k/s36_384] | CaiT-S36↑384Υ 85.4 [cait_in1k/s36_384_dist]
  CaiT-M36↑448Υ 86.3 [cait_in1k/m36_448_dist] | CaiT-M48↑448Υ 86.5 [cait_in1k/m48_448_dist]
  DeiT III ViT-S↑384 83.4 [deit3_in1k/s_best_384] | ViT-B↑384 85.0 [deit3_in1k/b_best_384]
  PatchConvNet (21k pre-trained) S60 at 384 84.6 [patchconvnet_in21k/s60_384]

Arguments (``--config=configs/finetune.py:model=NAME,init=DIR[,res=N,recipe=...]``):
  model=NAME        the zoo model at its target resolution (e.g. deit_base_patch16_384); res=N
                    builds it at another resolution (img_size=N).
  init=DIR          the lower-resolution checkpoint (required).
  recipe=auto|deit|cait|deit3|patchconvnet
                    auto: from the model name. ResMLP cannot change resolution (its cross-patch
                    layers are N x N for a fixed N) and ResNets have no fine-tuning recipe here.
  teacher=DIR       keep distilling (DeiT⚗↑384, CaiT↑384Υ) with this teacher checkpoint, run at
                    the new resolution; teacher_model=NAME its zoo model.
  epochs=N, eval_only, runlocal, fashion_mnist.

Recipes:
  deit / cait (README_deit.md's DeiT-B↑384 command; CaiT "as DeiT", its values are not in the
    thesis): AdamW, batch 512, lr 5e-6 x batch/512, min lr 5e-6 (so constant after the 5 warmup
    epochs from 1e-6, stepped per epoch), wd 1e-8, 30 epochs (the thesis says 25, L1134), the
    training augmentation kept (RandAugment, random erasing 0.25, Mixup 0.8 / CutMix 1.0, label
    smoothing 0.1, repeated augmentation x3), EMA 0.99996; eval crop ratio 0.875 (DeiT), 1.0 (CaiT).
  deit3 (L2614, README_revenge.md): AdamW lr 1e-5 (not rescaled), batch 512, 20 epochs, wd 0.1,
    5 warmup epochs from 1e-6, label smoothing 0.1, Mixup 0.8 / CutMix 1.0, RRC + flip +
    RandAugment rand-m9-mstd0.5-inc1, no repeated augmentation, drop path by size; crop 1.0.
    main.py's default min lr is 1e-5 too, so the LR is constant after the warmup.
  patchconvnet (FixRes, L1947): LAMB, constant lr 1e-5, batch 1024, 10 epochs, wd 0.01, drop path
    of Table 5.8 minus 0.1; crop 0.875.

fashion_mnist: fine-tunes a ``configs/deit3.py:demo`` checkpoint (DeiT III ViT, 28x28, 4x4
patches of 7) at 42x42 (6x6 patches: the position embedding is resampled), deit3 recipe scaled
down: AdamW lr 1e-4 at batch 64, 2 epochs, flips only. About 5-10 minutes on 2 CPU cores.
"""

from visrep_jax import config_lib, models

RECIPES = ("auto", "deit", "cait", "deit3", "patchconvnet")
DEIT3_SIZE_DROP_PATH = {"tiny": 0.0, "small": 0.0, "medium": 0.1, "base": 0.2, "large": 0.45,
                        "huge": 0.55}
PCN_DROP_PATH = {"s60": 0.15, "s120": 0.2, "b60": 0.3, "b120": 0.4, "l60": 0.4, "l120": 0.5}
RESNET_RUNLOCAL = config_lib.RESNET_RUNLOCAL


def _recipe_of(name: str) -> str:
  name = models.alias_of(name)
  for prefix, recipe in (("deit3_", "deit3"), ("deit_", "deit"), ("cait_", "cait"),
                         ("patchconvnet_", "patchconvnet")):
    if name.startswith(prefix):
      return recipe
  if name.startswith("resmlp"):
    raise config_lib.ConfigError(
        f"model={name!r}: ResMLP cannot be fine-tuned at another resolution (its cross-patch "
        "layers are N x N for a fixed number of patches N).")
  raise config_lib.ConfigError(
      f"model={name!r}: no fine-tuning recipe for this family; pass recipe= one of "
      f"{', '.join(RECIPES[1:])}.")


def _randaugment_pp(size: int, erasing: bool) -> str:
  return (f"decode|random_resized_crop({size}, scale=(0.08, 1.0))|flip_lr|"
          "randaugment('rand-m9-mstd0.5-inc1')|normalize('imagenet')"
          + ("|random_erasing(0.25, mode='pixel')" if erasing else ""))


def _eval_pp(size: int, crop_ratio: float) -> str:
  return f"decode|center_crop({size}, crop_ratio={crop_ratio})|normalize('imagenet')"


def get_config(arg=None):
  args = config_lib.parse_arg(arg, model="deit_base_patch16_384", init="", res=0, recipe="auto",
                              teacher="", teacher_model="deit_base_patch16_224", epochs=0,
                              eval_only=False, runlocal=False, fashion_mnist=False)
  if args.recipe not in RECIPES:
    raise config_lib.ConfigError(
        f"recipe={args.recipe!r} is not valid; choose one of {', '.join(RECIPES)}.")
  if not args.init:
    raise config_lib.ConfigError("init=DIR is required: the checkpoint to fine-tune (a workdir "
                                 "or a `python -m visrep_jax.convert --out` directory).")
  try:
    defaults = models.default_kwargs(args.model)
    meta = models.paper_metadata(args.model)
  except models.UnknownNameError as e:
    raise config_lib.ConfigError(f"model=: {e}") from None
  recipe = args.recipe
  if recipe == "auto":
    recipe = "deit3" if args.runlocal or args.fashion_mnist else _recipe_of(args.model)
  res = args.res or defaults.get("img_size", 224)

  c = config_lib.base_config()
  c.seed = 0
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 2000
  c.model.name = args.model
  if args.res and args.res != defaults.get("img_size"):
    c.model.img_size = args.res
  c.dataset.name = "imagenet2012"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.schedule.name = "cosine"
  c.schedule.warmup_epochs = 5.0
  c.schedule.warmup_init_lr = 1e-6
  c.loss.name = "softmax_xent"
  c.loss.label_smoothing = 0.1
  c.mixup.mixup_alpha = 0.8
  c.mixup.cutmix_alpha = 1.0
  c.mixup.prob = 1.0
  c.mixup.switch_prob = 0.5
  c.optimizer.eps = 1e-8
  c.optimizer.clip_grad_norm = 0.0

  if recipe in ("deit", "cait"):
    c.batch_size = 512
    c.total_epochs = 30.0
    c.optimizer.name = "adamw"
    c.optimizer.lr = 5e-6 * c.batch_size / 512
    c.optimizer.weight_decay = 1e-8
    c.schedule.min_lr = 5e-6
    c.schedule.per_epoch = True
    c.dataset.repeated_aug = 3
    c.dataset.train_pp = _randaugment_pp(res, erasing=True)
    c.dataset.eval_pp = _eval_pp(res, 0.875 if recipe == "deit" else 1.0)
    c.ema.decay = 0.99996
    c.model.drop_path_rate = 0.1 if recipe == "deit" else meta.get("drop_path_rate", 0.1)
  elif recipe == "deit3":
    size = args.model.split("_")[1] if args.model.startswith("deit3_") else "small"
    c.batch_size = 512
    c.total_epochs = 20.0
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-5
    c.optimizer.weight_decay = 0.1
    c.schedule.min_lr = 1e-5  # = lr: constant after warmup, as main.py's default min-lr
    c.schedule.per_epoch = True
    c.dataset.repeated_aug = 1
    c.dataset.train_pp = _randaugment_pp(res, erasing=False)
    c.dataset.eval_pp = _eval_pp(res, 1.0)
    c.model.drop_path_rate = DEIT3_SIZE_DROP_PATH.get(size, 0.0)
  else:  # patchconvnet
    size = models.alias_of(args.model).split("_")[1]
    c.batch_size = 1024
    c.total_epochs = 10.0
    c.optimizer.name = "lamb"
    c.optimizer.lr = 1e-5
    c.optimizer.weight_decay = 0.01
    c.optimizer.clip_grad_norm = 1.0
    c.schedule.name = "constant"
    c.schedule.warmup_epochs = 0.0
    c.dataset.repeated_aug = 1
    c.dataset.train_pp = _randaugment_pp(res, erasing=False)
    c.dataset.eval_pp = _eval_pp(res, 0.875)
    c.model.drop_path_rate = round(max(PCN_DROP_PATH.get(size, 0.1) - 0.1, 0.0), 3)

  if args.teacher:
    c.distill.type = "hard"
    c.distill.alpha = 0.5
    c.distill.teacher = args.teacher_model
    c.distill.teacher_checkpoint = args.teacher
    c.distill.teacher_overrides = {"img_size": res}
  if args.epochs:
    c.total_epochs = float(args.epochs)

  if args.fashion_mnist:
    c.model = config_lib.base_config().model
    c.model.name = "deit3_demo_patch7_28"
    c.model.img_size = 42
    c.model.drop_path_rate = 0.0
    config_lib.use_fashion_mnist(c, "decode(1)|resize(42)|flip_lr|normalize('fashion_mnist')",
                                 eval_pp="decode(1)|resize(42)|normalize('fashion_mnist')")
    c.batch_size = 64
    c.total_epochs = float(args.epochs or 2)
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 0.05
    c.schedule.warmup_epochs = 0.1
    c.mixup.mixup_alpha = 0.0
    c.mixup.cutmix_alpha = 0.0
    c.ema.decay = 0.0

  c.eval_only = args.eval_only
  c.init_checkpoint = args.init

  if args.runlocal:
    # Fine-tunes a configs/deit3.py:runlocal checkpoint (vit_test_patch4_16 at 16x16, a 4x4
    # patch grid) at 24x24 (6x6): exercises the position-embedding resampling.
    c.model = config_lib.base_config().model
    c.model.name = "vit_test_patch4_16"
    c.model.img_size = 24
    c.model.drop_path_rate = 0.1
    c.dataset.name = "synthetic"
    c.dataset.train_split = "train"
    c.dataset.eval_split = "test"
    c.dataset.shuffle_buffer = 1000
    crop = 0.875 if recipe == "deit" else 1.0
    c.dataset.train_pp = _randaugment_pp(24, erasing=recipe in ("deit", "cait"))
    c.dataset.eval_pp = _eval_pp(24, crop)
    c.batch_size = 16
    c.total_epochs = 0.0
    c.total_steps = 6
    c.log_every_steps = 2
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 3
    if c.schedule.name == "cosine":
      c.schedule.warmup_epochs = 0.0
      c.schedule.warmup_steps = 2
    if c.ema.decay:
      c.ema.decay = 0.9
    c.progress_bar = False
    if args.teacher:
      c.distill.teacher, overrides = RESNET_RUNLOCAL
      c.distill.teacher_overrides = dict(overrides, img_size=24)
  return c
