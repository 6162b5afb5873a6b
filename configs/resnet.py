r"""Plain supervised ResNet (torchvision's classic ImageNet recipe): the baseline convnet, a
distillation teacher for configs/deit.py, and the Fashion-MNIST baseline.

  python -m visrep_jax.main --config=configs/resnet.py:variant=50 --workdir=/tmp/resnet50 \
      --config.dataset.data_dir=$TFDS_DATA_DIR

Recipe (torchvision references/classification, the recipe of the torchvision weights that the
thesis lists in Table 3.5): SGD momentum 0.9, lr 0.1 x batch/256, weight decay 1e-4, batch 256,
90 epochs, RandomResizedCrop 224 + flip, eval Resize 256 + CenterCrop 224 (crop ratio 0.875),
plain cross-entropy, BatchNorm statistics updated in training. Differences: torchvision divides
the LR by 10 every 30 epochs; here a per-epoch cosine decay (visrep_jax.optim has no step
schedule; torchvision's later recipes use cosine, which is usually as good or better), and, as
every optimizer here, no weight decay on biases and BatchNorm parameters (torchvision decays all).

Hardware: torchvision trained on 8 GPUs (32 images each); a single modern GPU takes about a day
for ResNet-50. Expected ImageNet-1k val top-1 (thesis Table 3.5, torchvision weights):
  18: 69.8 [deit_in1k/resnet18] | 50: 76.2 [deit_in1k/resnet50] | 101: 77.4 [deit_in1k/resnet101]

Arguments (``--config=configs/resnet.py:variant=18,fashion_mnist``):
  variant=18|34|50|101    depth (basic blocks for 18/34, bottlenecks for 50/101).
  epochs=N                training epochs (default 90; 22 with fashion_mnist).
  init=DIR                initial weights (e.g. torchvision's converted with visrep_jax.convert).
  eval_only               evaluate the init checkpoint (or the workdir's latest) and exit.
  fashion_mnist           ResNet-18 on Fashion-MNIST (the teacher for deit.py:fashion_mnist).
  runlocal                a few steps on synthetic data; its workdir is the teacher checkpoint of
                          the configs' runlocal distillation smoke tests.

fashion_mnist: torchvision's ResNet-18 unchanged (7x7/2 stem + max pool: 28x28 -> 7x7 at layer1, as
the "ResNet18 0.949" entry of the dataset's benchmark), SGD momentum 0.9, lr 0.1 at batch 128, wd
5e-4, half an epoch of warmup then cosine to 0 (per step), label smoothing 0.1, random crop
(zero-pad 2) + flip, FASHION_MNIST_EPOCHS = 22 epochs. Measured with
``scripts/reproduce_fashion_mnist.py --families=resnet`` (2-core CPU, 2026-11-27): test top-1
0.9310 in 54.0 CPU-minutes (28.3 min wall; 0.8761 / 0.8949 / 0.8887 / 0.9056 / 0.9072 / 0.9222 /
0.9314 every 3 epochs). Before: 0.9255 after 15 epochs in 54.7 CPU-minutes, measured while other
jobs shared the cores. The small-map convolutions of visrep_jax.models.resnet (layer3 and layer4
run at 2x2 and 1x1, where most 3x3 taps only read padding) let 22 epochs fit the budget:
``scripts/benchmark.py --model=resnet18 --resolution=28 --batch_size=128 --vs-timm
--timm_model=resnet18`` prints a train JAX/timm ratio of 1.22x with them and printed 0.82x without
them (commit e139cc3), same machine, idle. The issue's 0.94 within 60 CPU-minutes is not reached by
this recipe: even 36 epochs (88.5 CPU-minutes) gave 0.9350 (0.9208 / 0.9283 / 0.9339 at epochs 24 /
30 / 33). Keeping layer1 at 14x14 instead (model option ``stem_pool=False``, batch 256, lr 0.2, 10
epochs) reached 0.9281 for 113 CPU-minutes (before the small-map convolutions; it costs 4.6x the
7x7 model's FLOPs per image, ``models.flops``).
"""

from visrep_jax import config_lib

VARIANTS = {"18": "resnet18", "34": "resnet34", "50": "resnet50", "101": "resnet101"}

# The other recipes' distillation teachers are these runs (config_lib.RESNET_*).
RUNLOCAL_OVERRIDES = config_lib.RESNET_RUNLOCAL[1]
FASHION_MNIST_OVERRIDES = config_lib.RESNET_FASHION_MNIST[1]
# Fits 60 CPU-minutes on 2 cores (issue 4's budget) with the small-map convolutions.
FASHION_MNIST_EPOCHS = 22


def train_pp(size: int) -> str:
  """torchvision's RandomResizedCrop (bilinear) + flip."""
  return f"decode|random_resized_crop({size}, method='bilinear')|flip_lr|normalize('imagenet')"


def eval_pp(size: int) -> str:
  """torchvision's Resize(size / 0.875) + CenterCrop(size)."""
  return (f"decode|center_crop({size}, crop_ratio=0.875, method='bilinear')|"
          "normalize('imagenet')")


def get_config(arg=None):
  args = config_lib.parse_arg(arg, variant="50", epochs=0, init="", eval_only=False,
                              fashion_mnist=False, runlocal=False)
  if args.variant not in VARIANTS:
    raise config_lib.ConfigError(
        f"variant={args.variant!r} is not valid; choose one of {', '.join(VARIANTS)}.")
  c = config_lib.base_config()
  c.seed = 0
  c.batch_size = 256
  c.total_epochs = float(args.epochs or 90)
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 5000

  c.model.name = VARIANTS[args.variant]
  c.model.drop_path_rate = 0.0

  c.dataset.name = "imagenet2012"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"
  c.dataset.repeated_aug = 1
  c.dataset.train_pp = train_pp(224)
  c.dataset.eval_pp = eval_pp(224)

  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.1 * c.batch_size / 256
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.optimizer.clip_grad_norm = 0.0
  c.optimizer.no_decay = []
  c.schedule.name = "cosine"
  c.schedule.warmup_epochs = 0.0
  c.schedule.warmup_init_lr = 0.0
  c.schedule.min_lr = 0.0
  c.schedule.per_epoch = True

  c.loss.name = "softmax_xent"
  c.loss.label_smoothing = 0.0
  c.mixup.mixup_alpha = 0.0
  c.mixup.cutmix_alpha = 0.0

  if args.fashion_mnist:
    c.model.name = "resnet18"
    for k, v in FASHION_MNIST_OVERRIDES.items():
      c.model[k] = v
    config_lib.use_fashion_mnist(
        c, "decode(1)|random_crop(28, pad=2, pad_mode='constant')|flip_lr|"
        "normalize('fashion_mnist')")
    c.batch_size = 128
    c.optimizer.lr = 0.1
    c.optimizer.weight_decay = 5e-4
    c.schedule.per_epoch = False
    c.schedule.warmup_epochs = 0.5
    c.schedule.warmup_init_lr = 0.0
    c.schedule.min_lr = 0.0
    c.loss.label_smoothing = 0.1
    c.total_epochs = float(args.epochs or FASHION_MNIST_EPOCHS)
    c.log_every_steps = 100
    c.eval_every_steps = 1404
    c.checkpoint_every_steps = 1000
    c.progress_bar = False

  c.eval_only = args.eval_only
  c.init_checkpoint = args.init

  if args.runlocal:
    c.model = config_lib.base_config().model
    c.model.name = "resnet18"
    c.model.drop_path_rate = 0.0
    for k, v in RUNLOCAL_OVERRIDES.items():
      c.model[k] = v
    config_lib.use_synthetic_smoke_run(
        c, train_pp=train_pp(16),
        eval_pp=eval_pp(16), repeated_aug=c.dataset.repeated_aug)
    c.batch_size = 16
    c.optimizer.lr = 0.1 * c.batch_size / 256
  return c
