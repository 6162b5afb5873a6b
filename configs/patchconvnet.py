r"""PatchConvNet (Touvron's thesis ch. 5, "Augmenting convolutional networks with attention-based
aggregation"): a columnar convnet (conv stem /16, N residual conv blocks with LayerNorm, SE and
LayerScale) with a single-head learned attention pooling, trained with LAMB.

  python -m visrep_jax.main --config=configs/patchconvnet.py:variant=S60 --workdir=/tmp/pcn_s60 \
      --config.dataset.data_dir=$TFDS_DATA_DIR --config.dtype=bfloat16

  # ImageNet-21k pre-training (image folder, see below), then 21k -> 1k fine-tuning:
  python -m visrep_jax.main --config=configs/patchconvnet.py:variant=B60,pretrain=in21k \
      --workdir=/tmp/pcn_b60_21k --config.dataset.data_dir=/data/imagenet21k
  python -m visrep_jax.main --config=configs/patchconvnet.py:variant=B60,pretrain=in21k,finetune,init=/tmp/pcn_b60_21k \
      --workdir=/tmp/pcn_b60_21k_ft --config.dataset.data_dir=$TFDS_DATA_DIR

Hardware in the paper: V100-32GB GPUs (throughput measured on one V100 at batch 256, mixed
precision); BatchNorm variants need synchronised statistics, which "almost doubled the training
time" of B120 on AWS (L2148). Expected ImageNet-1k val top-1 (400 epochs at 224, IN-1k only):
  S20 78.7 [patchconvnet_in1k/s20] | S36 80.7 [patchconvnet_in1k/s36] | S60 82.1 [patchconvnet_in1k/s60]
  S120 83.2 [patchconvnet_in1k/s120] | B36 82.8 [patchconvnet_in1k/b36] | B60 83.5 [patchconvnet_in1k/b60]
  B120 84.1 [patchconvnet_in1k/b120]
  pretrain=in21k,finetune (224): S60 82.9 [patchconvnet_in21k/s60_224] | B60 85.0 [patchconvnet_in21k/b60_224]
    B120 86.0 [patchconvnet_in21k/b120_224] | L60 85.6 [patchconvnet_in21k/l60_224] | L120 86.1 [patchconvnet_in21k/l120_224]
  res=384: S60 84.6 [patchconvnet_in21k/s60_384] | B60 86.1 [patchconvnet_in21k/b60_384]
    B120 86.9 [patchconvnet_in21k/b120_384] | L120 87.1 [patchconvnet_in21k/l120_384]

Arguments (``--config=configs/patchconvnet.py:variant=S60,runlocal``):
  variant=S20|S36|S60|S120|B36|B60|B120|L60|L120   d = 384 / 768 / 1024, N blocks.
  pretrain=in1k|in21k     the dataset of the (pre-)training.
  finetune                from init=DIR: in1k -> the FixRes fine-tuning at res (e.g. 384);
                          in21k -> the 21k -> 1k fine-tuning (new classifier) at res (224).
  res=N                   resolution (224; fine-tuning: the target resolution).
  epochs=N                override the number of epochs.
  init=DIR, eval_only     as in every config.
  fashion_mnist           a small PatchConvNet on Fashion-MNIST (see below).
  runlocal                a few steps on synthetic data.

Recipe (§5.2.3, L1941-L1951): LAMB, lr 3e-3 for every model at batch 2048 (taken as the effective
LR, as DeiT III's identical LAMB recipe: the 21k pre-training's "4e-3 at batch 4096" is a
square-root, not a linear, rescaling), weight decay 0.01 (S) / 0.05 (B, L), half-cosine, 400
epochs, label smoothing (value not given: 0.1, the DeiT default), RandAugment rand-m9-mstd0.5-inc1
(magnitude not given: DeiT's), Mixup 0.8, CutMix 1.0, repeated augmentation x3 (on ImageNet-1k
only), LayerScale, uniform stochastic depth cross-validated per model (Table 5.8: S20 0, S36 0.05,
S60 0.15, S120 0.2, B36 0.2, B60 0.3, B120 0.4; L60/L120 on 1k are not in the thesis: 0.4/0.5
here), seed 0; no random erasing, no EMA. Not given, DeiT's defaults used: 5 warmup epochs from
1e-6, min LR 1e-5, LR stepped per epoch, test crop ratio 0.875. The thesis says "no gradient
clipping"; the LAMB implementations it ran (timm / apex) clip the global norm at 1.0 internally,
so ``clip_grad_norm=1.0``.
  FixRes fine-tuning (L1947): 10 epochs, batch 1024, constant lr 1e-5, wd 0.01, drop path - 0.1.
  ImageNet-21k (L1949): 90 epochs, batch 2048, lr 3e-3, wd 0.01, no repeated augmentation.
  21k -> 1k (L1951): 100 epochs (ch. 6, L2314, says 50), batch 1024, lr 5e-4 half-cosine, wd
  (not given) 0.01, classifier re-learned (the init's head is dropped), drop path - 0.1.
ImageNet-21k is not in TFDS: ``dataset.name=imagenet21k`` is an image folder,
``<data_dir>/train/<wnid>/*.JPEG`` and a held-out ``<data_dir>/val/<wnid>/*.JPEG`` (the same class
directories; e.g. 50 images per class moved out of train).

fashion_mnist: 28x28 grey images resized to 64x64 (the stem has stride 16: a 4x4 map), width 128,
12 blocks, LayerScale 1e-4, LAMB lr 3e-3 at batch 128, wd 0.01, 12 epochs, label smoothing 0.1,
random crop + flip. About 15-30 minutes on 2 CPU cores (estimate).
"""

from visrep_jax import config_lib

VARIANTS = {  # name: (registered model, overrides, drop path on IN-1k (Table 5.8))
    "S20": ("patchconvnet_s60", {"depth": 20}, 0.0),
    "S36": ("patchconvnet_s60", {"depth": 36}, 0.05),
    "S60": ("patchconvnet_s60", {}, 0.15),
    "S120": ("patchconvnet_s120", {}, 0.2),
    "B36": ("patchconvnet_b60", {"depth": 36}, 0.2),
    "B60": ("patchconvnet_b60", {}, 0.3),
    "B120": ("patchconvnet_b120", {}, 0.4),
    "L60": ("patchconvnet_l60", {}, 0.4),
    "L120": ("patchconvnet_l120", {}, 0.5),
}
PRETRAIN = ("in1k", "in21k")


def train_pp(size: int) -> str:
  return (f"decode|random_resized_crop({size}, scale=(0.08, 1.0))|flip_lr|"
          "randaugment('rand-m9-mstd0.5-inc1')|normalize('imagenet')")


def eval_pp(size: int) -> str:
  return f"decode|center_crop({size}, crop_ratio=0.875)|normalize('imagenet')"


def get_config(arg=None):
  args = config_lib.parse_arg(arg, variant="S60", pretrain="in1k", finetune=False, res=224,
                              epochs=0, init="", eval_only=False, fashion_mnist=False,
                              runlocal=False)
  if args.variant not in VARIANTS:
    raise config_lib.ConfigError(
        f"variant={args.variant!r} is not valid; choose one of {', '.join(VARIANTS)}.")
  if args.pretrain not in PRETRAIN:
    raise config_lib.ConfigError(
        f"pretrain={args.pretrain!r} is not valid; choose one of {', '.join(PRETRAIN)}.")
  if args.finetune and not args.init:
    raise config_lib.ConfigError("finetune needs the weights to start from: add init=DIR.")
  name, overrides, drop_path = VARIANTS[args.variant]
  small = args.variant.startswith("S")
  c = config_lib.base_config()
  c.seed = 0
  c.batch_size = 2048
  c.total_epochs = 400.0
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000

  c.model.name = name
  for k, v in overrides.items():
    c.model[k] = v
  if args.res != 224:
    c.model.img_size = args.res
  c.model.drop_path_rate = drop_path

  c.dataset.name = "imagenet2012"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.repeated_aug = 3
  c.dataset.train_pp = train_pp(args.res)
  c.dataset.eval_pp = eval_pp(args.res)

  c.optimizer.name = "lamb"
  c.optimizer.lr = 3e-3
  c.optimizer.weight_decay = 0.01 if small else 0.05
  c.optimizer.eps = 1e-8
  c.optimizer.clip_grad_norm = 1.0
  config_lib.use_deit_schedule_and_regularisation(c)
  c.ema.decay = 0.0  # the PatchConvNet runs do not keep a weight EMA

  if args.pretrain == "in21k" and not args.finetune:
    c.dataset.name = "imagenet21k"
    c.dataset.eval_split = "val"
    c.dataset.repeated_aug = 1
    c.total_epochs = 90.0
    c.optimizer.weight_decay = 0.01
  elif args.pretrain == "in21k" and args.finetune:
    c.batch_size = 1024
    c.total_epochs = 100.0
    c.dataset.repeated_aug = 1
    c.optimizer.lr = 5e-4
    c.optimizer.weight_decay = 0.01
    c.model.drop_path_rate = round(max(drop_path - 0.1, 0.0), 3)
  elif args.finetune:  # FixRes fine-tuning of an IN-1k model at a higher resolution
    c.batch_size = 1024
    c.total_epochs = 10.0
    c.optimizer.lr = 1e-5
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "constant"
    c.schedule.warmup_epochs = 0.0
    c.model.drop_path_rate = round(max(drop_path - 0.1, 0.0), 3)
  if args.epochs:
    c.total_epochs = float(args.epochs)

  if args.fashion_mnist:
    c.model = config_lib.base_config().model
    c.model.name = "patchconvnet_s60"
    c.model.img_size = 64
    c.model.embed_dim = 128
    c.model.depth = 12
    c.model.layerscale_init = 1e-4
    c.model.drop_path_rate = 0.05
    config_lib.use_fashion_mnist(c, ("decode(1)|random_crop(28, pad=2)|flip_lr|resize(64)|"
                          "normalize('fashion_mnist')"),
                                 eval_pp="decode(1)|resize(64)|normalize('fashion_mnist')")
    c.batch_size = 128
    c.total_epochs = float(args.epochs or 12)
    c.optimizer.lr = 3e-3
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 1.0
    c.mixup.mixup_alpha = 0.0
    c.mixup.cutmix_alpha = 0.0
    c.eval_every_steps = 2000

  c.eval_only = args.eval_only
  c.init_checkpoint = args.init

  if args.runlocal:
    c.model = config_lib.base_config().model
    c.model.name = "patchconvnet_test"
    c.model.drop_path_rate = 0.1
    rl_res = 48 if args.finetune else 32
    if args.finetune:
      c.model.img_size = rl_res
    if args.pretrain == "in21k" and not args.finetune:
      c.dataset.repeated_aug = 1
    else:
      c.dataset.repeated_aug = 1 if args.finetune else 3
    config_lib.use_synthetic_smoke_run(
        c, train_pp=train_pp(rl_res),
        eval_pp=eval_pp(rl_res), repeated_aug=c.dataset.repeated_aug)
    c.batch_size = 16
    if c.schedule.name == "cosine":
      c.schedule.warmup_epochs = 0.0
      c.schedule.warmup_steps = 2
  return c
