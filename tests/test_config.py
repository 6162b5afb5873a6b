"""Config parsing and start-up validation: every bad input fails early with a helpful message."""

import pytest

from visrep_jax import config_lib
import conftest


def load_config(arg=None, name="deit3"):
  return conftest.load_config(name, arg)


def test_deit3_default_is_the_thesis_imagenet1k_recipe():
  c = load_config()
  assert c.model.name == "deit3_small_patch16_224"
  assert (c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay) == ("lamb", 3e-3, 0.02)
  assert c.batch_size == 2048 and c.total_epochs == 400
  assert c.loss.name == "sigmoid_xent" and c.loss.label_smoothing == 0.0
  assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha) == (0.8, 1.0)
  assert c.optimizer.clip_grad_norm == 1.0 and c.dataset.repeated_aug == 3
  assert "three_augment" in c.dataset.train_pp and "color_jitter(0.3" in c.dataset.train_pp
  assert "crop_ratio=1.0" in c.dataset.eval_pp
  config_lib.validate(c, num_devices=8)


@pytest.mark.parametrize("variant,model,dp", [("Ti", "deit3_tiny_patch16_224", 0.0),
                                              ("B", "deit3_base_patch16_224", 0.1),
                                              ("H", "deit3_huge_patch14_224", 0.5)])
def test_variants(variant, model, dp):
  c = load_config(f"variant={variant}")
  assert c.model.name == model and c.model.drop_path_rate == dp
  config_lib.validate(c, num_devices=8)


def test_longer_schedule_adapts_drop_path_and_wd():
  c = load_config("variant=B,epochs=800")
  assert c.model.drop_path_rate == pytest.approx(0.2)  # 0.1 + 2 x 0.05 (thesis L2620)
  assert c.optimizer.weight_decay == 0.05


def test_demo_and_runlocal_validate():
  for arg in ("demo", "runlocal", "variant=S,demo"):
    config_lib.validate(load_config(arg), num_devices=1)


@pytest.mark.parametrize("arg,msg", [
    ("bogus=1", "Unknown config argument 'bogus'"),
    ("variant=XL", "variant='XL' is not valid; choose one of Ti, S, M, B, L, H"),
    ("epochs=ten", "must be a number"),
    ("demo=maybe", "must be true or false"),
])
def test_bad_config_arguments(arg, msg):
  with pytest.raises(config_lib.ConfigError, match=msg.replace("(", r"\(")):
    load_config(arg)


def _bad(mutate, match, num_devices=1):
  c = load_config("demo")
  with c.unlocked():
    mutate(c)
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c, num_devices=num_devices)


def test_unknown_model_name_lists_valid_names():
  _bad(lambda c: setattr(c.model, "name", "deit3_smal_patch16_224"),
       r"Unknown model 'deit3_smal_patch16_224'. Did you mean 'deit3_small_patch16_224'.*Valid: .*deit3_base_patch16_224")


def test_unknown_model_option_lists_valid_options():
  _bad(lambda c: setattr(c.model, "drop_pth_rate", 0.1), r"Unknown option\(s\) \['drop_pth_rate'\].*Valid: .*drop_path_rate")


def test_unknown_dataset_name():
  _bad(lambda c: setattr(c.dataset, "name", "fashion_mnst"), r"Unknown dataset 'fashion_mnst'.*fashion_mnist")


def test_unknown_top_level_and_section_keys():
  _bad(lambda c: setattr(c, "learning_rate", 0.1), r"Unknown top-level config keys \['learning_rate'\]")
  _bad(lambda c: setattr(c.optimizer, "beta1", 0.1), r"Unknown keys \['beta1'\] in config.optimizer")


@pytest.mark.parametrize("key,value,match", [
    ("batch_size", 0, "batch_size must be a positive integer"),
    ("total_steps", 10, "Set exactly one of config.total_steps"),
    ("dtype", "float8", "dtype='float8' is not valid; choose one of: float32, bfloat16"),
    ("sharding", "zero9", "choose one of: replicate, fsdp"),
    ("log_every_steps", 0, "log_every_steps must be > 0"),
])
def test_bad_values(key, value, match):
  _bad(lambda c: setattr(c, key, value), match)


def test_bad_names_in_sections():
  _bad(lambda c: setattr(c.optimizer, "name", "adam_w"), "optimizer.name='adam_w' is not valid; choose one of: adam, adamw, lamb, normalized_adam, sgd")
  _bad(lambda c: setattr(c.loss, "name", "focal"), "loss.name='focal' is not valid")
  _bad(lambda c: setattr(c.optimizer, "lr", -1.0), "lr must be a positive number")
  _bad(lambda c: setattr(c.mixup, "prob", 2.0), r"mixup.prob must be in \[0, 1\]")


def test_batch_must_divide_devices():
  _bad(lambda c: setattr(c, "batch_size", 100), "not divisible by the 8 devices; use a multiple of 8",
       num_devices=8)


def test_bad_preprocessing_spec():
  _bad(lambda c: setattr(c.dataset, "train_pp", "decode|flp_lr|normalize('imagenet')"),
       r"config.dataset.train_pp: Unknown preprocessing op 'flp_lr'. Did you mean 'flip_lr'")
  _bad(lambda c: setattr(c.dataset, "eval_pp", "decode|center_crop(28, crop_ratio=2.0)"),
       r"config.dataset.eval_pp: .*crop_ratio must be in \(0, 1\]")


def test_mesh_must_fit_devices():
  _bad(lambda c: setattr(c, "mesh", (("data", 3), ("fsdp", -1))), "does not fit the 8 devices", num_devices=8)
  _bad(lambda c: setattr(c, "mesh", (("data", 2), ("fsdp", 2))), "must multiply to 8", num_devices=8)
  _bad(lambda c: setattr(c, "mesh", (("data", -1), ("fsdp", -1))), "at most one axis may be -1")
