r"""Transfer: fine-tune an ImageNet-1k model on CIFAR-10/100, Flowers-102, Stanford Cars,
iNaturalist 2018/2019 with the thesis's protocol (CaiT, L1452; used for DeiT, ResMLP,
PatchConvNet and, with crop ratio 1.0, DeiT III).

  python -m visrep_jax.main --config=configs/transfer.py:dataset=cifar100,model=deit_base_patch16_224,init=/ckpts/deit_b \
      --workdir=/tmp/deit_b_cifar100 --config.dataset.data_dir=$TFDS_DATA_DIR

The init checkpoint's ImageNet classifier is dropped and a new one initialised (logged by
``visrep_jax.checkpoint.load_variables``); nothing is distilled.

Protocol (L1452): the pre-training hyper-parameters (the DeiT recipe: AdamW, lr 5e-4 x batch/512,
wd 0.05, 5 warmup epochs from 1e-6, cosine stepped per epoch, label smoothing 0.1, RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25, Mixup 0.8 / CutMix 1.0, repeated augmentation x3) with
the LR divided by 10 (Cars, Flowers, iNat) or 100 (CIFAR-10/100), 1000 epochs (CIFAR-10/100,
Flowers, Cars) or 360 (iNat-18/19). Batch 768 and drop path 0.05 (12 blocks) / 0.1 (deeper) are
the authors' CIFAR values (deit issue #117). Images are resized to 224 (CIFAR's 32x32 included:
RandomResizedCrop upsamples, as the deit repo). Eval: Resize + CenterCrop with crop ratio 0.875
(DeiT, CaiT Table 3.19, ResMLP, PatchConvNet) or 1.0 (DeiT III, L2573). DeiT III on Flowers
fine-tunes only the attention layers (+0.2%, L2573): ``attn_only`` (default on for that pair).
ResNets use Grafit's transfer protocol instead: SGD momentum 0.9, lr 0.01, cosine, 240 epochs,
batch 512, wd 1e-4 (the thesis's ch. 2; Nesterov is not an option here).

Datasets (``dataset=``; TFDS prepared under data_dir, see visrep_jax.data.prepare):
  cifar10, cifar100      TFDS cifar10 / cifar100, train / test.
  flowers                TFDS oxford_flowers102: train+validation (2,040) / test (6,149).
  cars                   TFDS cars196: train (8,144) / test (8,041).
  inat18                 TFDS i_naturalist2018: train / validation (24,426).
  inat19                 not in TFDS: the image folder source ``i_naturalist2019``, laid out as
                         ``<data_dir>/{train,val}/<category_id>/<image>.jpg`` from the challenge's
                         train2019.json / val2019.json (e.g. symlink each image into its category's
                         directory; 1,010 categories, 265,240 / 3,003 images).

Hardware in the paper: 8-16 V100 GPUs. Expected top-1 (fine-tuned at 224):
  DeiT-B (model=deit_base_patch16_224): CIFAR-10 99.1 [deit_transfer/deit_base:cifar10]
    CIFAR-100 90.8 [deit_transfer/deit_base:cifar100] | Flowers 98.4 [deit_transfer/deit_base:flowers]
    Cars 92.1 [deit_transfer/deit_base:cars] | iNat-18 73.2 [deit_transfer/deit_base:inat18]
    iNat-19 77.7 [deit_transfer/deit_base:inat19]
  CaiT-S36 (cait_s36_224): CIFAR-10 99.2 [cait_transfer/cait_s36:cifar10]
    CIFAR-100 92.2 [cait_transfer/cait_s36:cifar100] | Flowers 98.8 [cait_transfer/cait_s36:flowers]
    Cars 93.5 [cait_transfer/cait_s36:cars] | iNat-18 77.1 [cait_transfer/cait_s36:inat18]
    iNat-19 80.6 [cait_transfer/cait_s36:inat19]
  ResMLP-S24 (resmlp_24_224): CIFAR-10 98.7 [resmlp_transfer/resmlp_s24:cifar10]
    CIFAR-100 89.5 [resmlp_transfer/resmlp_s24:cifar100] | Flowers 97.9 [resmlp_transfer/resmlp_s24:flowers]
    Cars 89.5 [resmlp_transfer/resmlp_s24:cars] | iNat-18 64.3 [resmlp_transfer/resmlp_s24:inat18]
    iNat-19 72.5 [resmlp_transfer/resmlp_s24:inat19]
  PatchConvNet-S60 (patchconvnet_s60): CIFAR-10 99.2 [patchconvnet_transfer/s60:cifar10]
    CIFAR-100 91.4 [patchconvnet_transfer/s60:cifar100] | Flowers 98.8 [patchconvnet_transfer/s60:flowers]
    Cars 94.0 [patchconvnet_transfer/s60:cars] | iNat-18 72.9 [patchconvnet_transfer/s60:inat18]
    iNat-19 78.1 [patchconvnet_transfer/s60:inat19]
  DeiT III ViT-B (deit3_base_patch16_224): CIFAR-10 99.3 [deit3_transfer/deit3_base:cifar10]
    CIFAR-100 92.5 [deit3_transfer/deit3_base:cifar100] | Flowers 98.6 [deit3_transfer/deit3_base:flowers]
    Cars 93.4 [deit3_transfer/deit3_base:cars] | iNat-18 73.6 [deit3_transfer/deit3_base:inat18]
    iNat-19 78.0 [deit3_transfer/deit3_base:inat19]
  (every row of the *_transfer tables: ``python scripts/reproduce.py --table deit3_transfer``).

Arguments (``--config=configs/transfer.py:dataset=flowers,model=deit3_base_patch16_224,init=DIR``):
  dataset=cifar10|cifar100|flowers|cars|inat18|inat19
  model=NAME        any zoo model (built with the dataset's class count).
  init=DIR          the ImageNet checkpoint (required).
  recipe=auto|deit|cait|resmlp|patchconvnet|deit3|resnet   (auto: from the model name).
  res=N             fine-tuning resolution (224).
  attn_only=auto|true|false   fine-tune only the attention layers and the new head.
  epochs=N, eval_only, runlocal (synthetic data, a few steps), fashion_mnist (see below).

fashion_mnist: no second offline dataset exists, so this fine-tunes a ``configs/deit3.py:demo``
checkpoint on Fashion-MNIST itself with the protocol scaled down (lr 1e-4 at batch 64, 2 epochs,
attention layers and head only unless attn_only=false): 5-10 minutes on 2 CPU cores; a check of
the protocol's machinery on real data, not a transfer result.
"""

from visrep_jax import config_lib, models

DATASETS = {  # name: (source, train split, eval split, lr divisor, epochs)
    "cifar10": ("cifar10", "train", "test", 100, 1000),
    "cifar100": ("cifar100", "train", "test", 100, 1000),
    "flowers": ("oxford_flowers102", "train+validation", "test", 10, 1000),
    "cars": ("cars196", "train", "test", 10, 1000),
    "inat18": ("i_naturalist2018", "train", "validation", 10, 360),
    "inat19": ("i_naturalist2019", "train", "val", 10, 360),
}
RECIPES = ("auto", "deit", "cait", "resmlp", "patchconvnet", "deit3", "resnet")
# Everything but the attention layers and the classifier is frozen (lr multiplier 0).
ATTN_ONLY = [(r"^(?!blocks_\d+/attn/|blocks_token_only_\d+/attn/|head/|head_dist/)", 0.0)]
PCN_DROP_PATH = {"s60": 0.15, "s120": 0.2, "b60": 0.3, "b120": 0.4, "l60": 0.4, "l120": 0.5}


def _recipe_of(name: str) -> str:
  name = models.alias_of(name)
  for prefix, recipe in (("deit3_", "deit3"), ("deit_", "deit"), ("cait_", "cait"),
                         ("resmlp_", "resmlp"), ("patchconvnet_", "patchconvnet"),
                         ("resnet", "resnet")):
    if name.startswith(prefix):
      return recipe
  raise config_lib.ConfigError(f"model={name!r}: cannot tell its family; pass recipe= one of "
                               f"{', '.join(RECIPES[1:])}.")


def _drop_path(recipe: str, name: str) -> float:
  name = models.alias_of(name)
  if recipe == "cait":
    return models.paper_metadata(name).get("drop_path_rate", 0.1)
  if recipe == "resmlp":
    return 0.05 if models.default_kwargs(name).get("depth", 12) <= 12 else 0.1
  if recipe == "patchconvnet":
    return PCN_DROP_PATH.get(name.split("_")[1], 0.1)
  if recipe == "deit3":
    size = name.split("_")[1]
    return {"tiny": 0.0, "small": 0.0, "medium": 0.05, "base": 0.1, "large": 0.4}.get(size, 0.1)
  if recipe == "resnet":
    return 0.0
  return 0.1


def train_pp(size: int) -> str:
  return (f"decode|random_resized_crop({size}, scale=(0.08, 1.0))|flip_lr|"
          "randaugment('rand-m9-mstd0.5-inc1')|normalize('imagenet')|"
          "random_erasing(0.25, mode='pixel')")


def eval_pp(size: int, crop_ratio: float) -> str:
  return f"decode|center_crop({size}, crop_ratio={crop_ratio})|normalize('imagenet')"


def get_config(arg=None):
  args = config_lib.parse_arg(arg, dataset="cifar10", model="deit_base_patch16_224", init="",
                              recipe="auto", res=224, attn_only="auto", epochs=0,
                              eval_only=False, runlocal=False, fashion_mnist=False)
  if args.dataset not in DATASETS:
    raise config_lib.ConfigError(
        f"dataset={args.dataset!r} is not valid; choose one of {', '.join(DATASETS)}.")
  if args.recipe not in RECIPES:
    raise config_lib.ConfigError(
        f"recipe={args.recipe!r} is not valid; choose one of {', '.join(RECIPES)}.")
  if args.attn_only not in ("auto", "true", "false"):
    raise config_lib.ConfigError(
        f"attn_only={args.attn_only!r} is not valid; choose one of auto, true, false.")
  if not args.init:
    raise config_lib.ConfigError("init=DIR is required: the ImageNet checkpoint to fine-tune (a "
                                 "workdir or a `python -m visrep_jax.convert --out` directory).")
  try:
    models.MODELS.get(args.model)
  except models.UnknownNameError as e:
    raise config_lib.ConfigError(f"model=: {e}") from None
  recipe = args.recipe
  if recipe == "auto":
    recipe = "deit3" if args.runlocal or args.fashion_mnist else _recipe_of(args.model)
  source, train_split, eval_split, divisor, epochs = DATASETS[args.dataset]
  attn_only = (args.attn_only == "true" or
               (args.attn_only == "auto" and recipe == "deit3" and args.dataset == "flowers"))

  c = config_lib.base_config()
  c.seed = 0
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 5000
  c.model.name = args.model
  if args.res != 224:
    c.model.img_size = args.res
  c.model.drop_path_rate = _drop_path(recipe, args.model)
  c.dataset.name = source
  c.dataset.train_split = train_split
  c.dataset.eval_split = eval_split
  c.total_epochs = float(args.epochs or epochs)

  if recipe == "resnet":
    c.batch_size = 512
    c.total_epochs = float(args.epochs or 240)
    c.dataset.repeated_aug = 1
    c.dataset.train_pp = (f"decode|random_resized_crop({args.res})|flip_lr|"
                          "normalize('imagenet')")
    c.dataset.eval_pp = eval_pp(args.res, 0.875)
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.01
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-4
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 0.0
    c.schedule.min_lr = 0.0
    c.loss.name = "softmax_xent"
    c.loss.label_smoothing = 0.0
    c.mixup.mixup_alpha = 0.0
    c.mixup.cutmix_alpha = 0.0
  else:
    c.batch_size = 768
    c.dataset.repeated_aug = 3
    c.dataset.train_pp = train_pp(args.res)
    c.dataset.eval_pp = eval_pp(args.res, 1.0 if recipe == "deit3" else 0.875)
    c.optimizer.name = "adamw"
    c.optimizer.lr = 5e-4 / divisor * c.batch_size / 512
    c.optimizer.weight_decay = 0.05
    c.optimizer.eps = 1e-8
    c.optimizer.clip_grad_norm = 0.0
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 5.0
    c.schedule.warmup_init_lr = 1e-6
    c.schedule.min_lr = 1e-5 / divisor
    c.schedule.per_epoch = True
    c.loss.name = "softmax_xent"
    c.loss.label_smoothing = 0.1
    c.mixup.mixup_alpha = 0.8
    c.mixup.cutmix_alpha = 1.0
    c.mixup.prob = 1.0
    c.mixup.switch_prob = 0.5
  if attn_only:
    c.optimizer.lr_multipliers = ATTN_ONLY

  if args.fashion_mnist:
    c.model = config_lib.base_config().model
    c.model.name = "deit3_demo_patch7_28"
    c.model.drop_path_rate = 0.0
    config_lib.use_fashion_mnist(c, "decode(1)|flip_lr|normalize('fashion_mnist')")
    c.batch_size = 64
    c.total_epochs = float(args.epochs or 2)
    c.optimizer.lr = 1e-4
    c.schedule.warmup_epochs = 0.1
    c.mixup.mixup_alpha = 0.0
    c.mixup.cutmix_alpha = 0.0
    c.optimizer.lr_multipliers = ATTN_ONLY if args.attn_only != "false" else []

  c.eval_only = args.eval_only
  c.init_checkpoint = args.init

  if args.runlocal:
    # Fine-tunes a configs/deit3.py:runlocal checkpoint (10 classes) on synthetic data with 12
    # classes: the head is re-initialised; attention-only fine-tuning unless attn_only=false.
    c.model = config_lib.base_config().model
    c.model.name = "vit_test_patch4_16"
    c.model.drop_path_rate = 0.1
    c.dataset.name = "synthetic"
    c.dataset.train_split = "train"
    c.dataset.eval_split = "test"
    c.dataset.num_classes = 12
    c.dataset.shuffle_buffer = 1000
    c.dataset.train_pp = train_pp(16)
    c.dataset.eval_pp = eval_pp(16, 1.0)
    c.batch_size = 16
    c.total_epochs = 0.0
    c.total_steps = 6
    c.log_every_steps = 2
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 3
    c.schedule.warmup_epochs = 0.0
    c.schedule.warmup_steps = 2
    c.optimizer.lr_multipliers = ATTN_ONLY if args.attn_only != "false" else []
    c.progress_bar = False
  return c
