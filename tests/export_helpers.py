"""Models and runs for the export tests (tests/test_export.py, tests/deploy/): a DoubleU-Net whose
BatchNorm is far from identity, a training-workdir look-alike, and the staging leftovers check."""

import os

import numpy as np
import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet.models import DoubleUNet

SIZE = 64


def randomize_batch_norm(model: DoubleUNet, seed: int = 0) -> None:
  """Moves every BatchNorm away from its initial identity, so that an export that dropped or
  mangled inference-mode BatchNorm would show."""
  rng = np.random.RandomState(seed)
  for variable in model.variables:
    name = variable.name
    if "moving_mean" in name:
      variable.assign(rng.normal(0, 0.2, variable.shape))
    elif "moving_variance" in name:
      variable.assign(rng.uniform(0.5, 2.0, variable.shape))
    elif "gamma" in name:
      variable.assign(rng.uniform(0.6, 1.4, variable.shape))
    elif "beta" in name:
      variable.assign(rng.normal(0, 0.2, variable.shape))


def write_run(
  workdir, model: DoubleUNet, preprocessing: str = "reference", size: int = SIZE
) -> str:
  """A training-workdir look-alike (best/ckpt-1 + config.json) without training; returns the
  checkpoint prefix."""
  manager = tf.train.CheckpointManager(
    tf.train.Checkpoint(model=model),
    os.path.join(str(workdir), checkpoint_lib.BEST_SUBDIR),
    max_to_keep=1,
  )
  prefix = manager.save(checkpoint_number=1)
  checkpoint_lib.write_config(
    str(workdir), {"height": size, "width": size, "preprocessing": preprocessing}
  )
  return prefix


def make_model(seed: int = 11) -> DoubleUNet:
  tf.random.set_seed(seed)
  model = DoubleUNet()
  randomize_batch_norm(model, seed)
  return model


def leftovers(parent) -> list:
  """Hidden temporary folders an export may have left next to its output."""
  return sorted(name for name in os.listdir(parent) if name.startswith("."))
