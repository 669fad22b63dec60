"""Where a run keeps its checkpoints, and how to find and restore them.

A workdir holds:
  checkpoints/ckpt-N.*   the last `keep` training checkpoints (model, optimizer, loss scale, step,
                         schedule state), written by `tf.train.CheckpointManager`
  best/ckpt-N.*          the checkpoint with the best validation DSC so far
  config.json            the resolved run configuration (preprocessing, input size, ...)
Every consumer (evaluate, predict, export, convert_keras_h5) restores only `model=` from these, so
they read training checkpoints and converted ones alike.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import tensorflow as tf

CHECKPOINT_SUBDIR = "checkpoints"
BEST_SUBDIR = "best"
CONFIG_FILENAME = "config.json"


class CheckpointNotFoundError(FileNotFoundError):
  """No checkpoint where one was expected; the message says where it looked."""


def latest_checkpoint(workdir: str) -> Optional[str]:
  """The newest training checkpoint prefix in `workdir`, or None."""
  return tf.train.latest_checkpoint(os.path.join(workdir, CHECKPOINT_SUBDIR))


def best_checkpoint(workdir: str) -> Optional[str]:
  """The best-by-validation checkpoint prefix in `workdir`, or None."""
  return tf.train.latest_checkpoint(os.path.join(workdir, BEST_SUBDIR))


def resolve_checkpoint(path: str, prefer: str = "best") -> str:
  """Turns a workdir, a checkpoint folder, or a checkpoint prefix into a checkpoint prefix.

  Args:
    path: a workdir (uses best/ or checkpoints/ as `prefer` says, falling back to the other), a
      folder with a `checkpoint` state file, or a prefix such as `workdir/best/ckpt-12`.
    prefer: "best" or "latest", for workdirs.

  Returns:
    A checkpoint prefix that exists.

  Raises:
    CheckpointNotFoundError: nothing usable at `path`.
  """
  if prefer not in ("best", "latest"):
    raise ValueError(f"prefer must be 'best' or 'latest', got {prefer!r}")
  if tf.io.gfile.exists(path + ".index"):
    return path
  if tf.io.gfile.isdir(path):
    finders = [best_checkpoint, latest_checkpoint]
    if prefer == "latest":
      finders.reverse()
    for finder in finders:
      found = finder(path)
      if found:
        return found
    found = tf.train.latest_checkpoint(path)
    if found:
      return found
  raise CheckpointNotFoundError(
      f"no checkpoint at {path!r}: expected a workdir with {BEST_SUBDIR}/ or "
      f"{CHECKPOINT_SUBDIR}/, a folder with a 'checkpoint' file, or a prefix like .../ckpt-12 "
      "(with its .index file)")


def restore_model(model: tf.Module, path: str, prefer: str = "best") -> str:
  """Restores `model`'s variables from a checkpoint and returns the prefix used.

  Only the model is read (optimizer state and the rest are ignored), and every model variable
  must be found in the checkpoint, so a checkpoint of another network fails loudly.
  """
  prefix = resolve_checkpoint(path, prefer)
  status = tf.train.Checkpoint(model=model).read(prefix)
  try:
    status.assert_existing_objects_matched()
  except AssertionError as error:
    raise ValueError(f"checkpoint {prefix} does not match this model: {error}") from error
  status.expect_partial()
  return prefix


def write_config(workdir: str, config: Dict[str, Any]) -> None:
  """Writes the run configuration atomically (a reader never sees a half-written file)."""
  tf.io.gfile.makedirs(workdir)
  path = os.path.join(workdir, CONFIG_FILENAME)
  temporary = path + ".tmp"
  with tf.io.gfile.GFile(temporary, "w") as handle:
    json.dump(config, handle, indent=2, sort_keys=True)
  tf.io.gfile.rename(temporary, path, overwrite=True)


def read_config(workdir: str) -> Dict[str, Any]:
  """Reads `config.json` from a workdir; {} if there is none."""
  path = os.path.join(workdir, CONFIG_FILENAME)
  if not tf.io.gfile.exists(path):
    return {}
  with tf.io.gfile.GFile(path) as handle:
    return json.load(handle)
