"""Trainers, selected by ``config.trainer``. Each exposes ``train_and_evaluate(config, workdir)``."""

from __future__ import annotations

import importlib

from visrep_jax.registry import Registry

TRAINERS = Registry("trainer")
TRAINERS.add("supervised", lambda: importlib.import_module("visrep_jax.trainers.supervised"))
TRAINERS.add("episodic", lambda: importlib.import_module("visrep_jax.trainers.episodic"))


def get(name: str):
  return TRAINERS.get(name)()
