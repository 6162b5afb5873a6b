"""Prepare a dataset once, before training.

  python -m visrep_jax.data.prepare --dataset=fashion_mnist
  python -m visrep_jax.data.prepare --dataset=imagenet2012 --data_dir=$TFDS_DATA_DIR \
      --manual_dir=/path/with/ILSVRC2012_img_train.tar+ILSVRC2012_img_val.tar
  python -m visrep_jax.data.prepare --dataset=image_folder --data_dir=/path/to/folder  # checks it

Fashion-MNIST is read directly from the IDX files of Debian's ``dataset-fashion-mnist``; this
command checks them (or, where a network exists and they are missing, lets TFDS download it).
"""

from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", None, "Dataset name (as in config.dataset.name).")
flags.DEFINE_string("data_dir", None, "TFDS data_dir / image folder / IDX directory.")
flags.DEFINE_string("manual_dir", None, "Directory holding manually downloaded archives "
                    "(ImageNet: ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar).")
flags.DEFINE_bool("download", False, "Let TFDS download (needs a network).")


def prepare(name: str, data_dir=None, manual_dir=None, download=False) -> str:
  from visrep_jax.data import sources
  kwargs = {"data_dir": data_dir} if data_dir else {}
  if name.startswith("tfds:") or name in sources.KNOWN_TFDS:
    tfds_name = name[len("tfds:"):] if name.startswith("tfds:") else name
    kwargs.update(manual_dir=manual_dir, download=True)
    src = sources.TfdsSource(tfds_name, **kwargs)
  elif name == "fashion_mnist" and download:
    src = sources.TfdsSource("fashion_mnist", download=True, **kwargs)
  else:
    src = sources.create(name, **kwargs)
  splits = getattr(src, "splits", None) or list(getattr(src, "_splits", {}))
  counts = ", ".join(f"{s}: {src.num_examples(s)}" for s in splits)
  return f"{name}: ready ({src.num_classes} classes; {counts})"


def main(argv):
  del argv
  if not FLAGS.dataset:
    raise app.UsageError("--dataset is required")
  from visrep_jax.data import DataError
  try:
    print(prepare(FLAGS.dataset, FLAGS.data_dir, FLAGS.manual_dir, FLAGS.download))
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
