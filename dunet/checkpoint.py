"""Where a run keeps its checkpoints, how they are written so that none is ever half-written, and
how to find and restore them.

A workdir holds:
  checkpoints/ckpt-N.*   the last `keep` training checkpoints (model, optimizer, loss scale, step,
                         schedule state); N is the global step
  checkpoints/checkpoint the state file listing them, oldest first (TensorFlow's format:
                         `tf.train.latest_checkpoint` reads it)
  best/ckpt-N.*          the checkpoint with the best validation DSC so far (hard links to the
                         training checkpoint of step N where the file system allows)
  config.json            the resolved run configuration (preprocessing, input size, ...)
Every consumer (evaluate, predict, export, convert_keras_h5) restores only `model=` from these, so
they read training checkpoints and converted ones alike.

Crash safety (`Checkpointer`). A checkpoint is written whole into a staging folder
(`.ckpt-N-<pid>-<time>.partial/`), then its data file(s) and last its index are renamed into
place, and only then does the state file (replaced atomically) list it; older checkpoints are
deleted after that.
A process killed at any point, or a write that fails (disk full), therefore leaves the state file
listing complete checkpoints only; leftovers are unlisted and removed by the next save. Replacing a
listed checkpoint (the same step saved again) first points the state file at the staged copy.
`restore_newest` tries the listed checkpoints newest first: one that cannot be read (damaged
after it was written) is moved into `broken/` with a warning, and the next older one is used; it
never silently starts over while a listed checkpoint exists.

Test hook: with DUNET_TEST_CHECKPOINT_PAUSE=PHASE:SECONDS in the environment, `Checkpointer`
logs "checkpoint test pause: PHASE ..." and sleeps at PHASE, one of `PHASES` (staged: written
into the staging folder; data_moved: data in place, index not; moved: both in place, not yet
listed; recorded: listed, older ones not yet deleted), so that tests can kill a process at a
known point inside a write (tests/test_faults.py, tests/test_checkpoint.py).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Dict, List, Optional, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

# The state file's own writer (atomic, relative paths): what tf.train.CheckpointManager uses.
# pylint: disable-next=g-direct-tensorflow-import
from tensorflow.python.checkpoint import checkpoint_management

from dunet import fileio
from dunet.errors import CheckpointNotFoundError  # noqa: F401  (re-exported: callers catch it)
from dunet.errors import CheckpointReadError
from dunet.errors import CheckpointWriteError

CHECKPOINT_SUBDIR = "checkpoints"
BEST_SUBDIR = "best"
BROKEN_SUBDIR = "broken"
CONFIG_FILENAME = "config.json"
STATE_FILENAME = "checkpoint"
PAUSE_ENV = "DUNET_TEST_CHECKPOINT_PAUSE"
PHASES = ("staged", "data_moved", "moved", "recorded")

_STAGING_SUFFIX = ".partial"
_PREFIX_PATTERN = re.compile(r"^ckpt-(\d+)$")
# Files of a checkpoint prefix: the index and the data shards.
_FILE_PATTERN = re.compile(r"^(ckpt-\d+)\.(index|data-\d+-of-\d+)$")
# What reading a damaged or missing checkpoint raises (IndexError: a truncated data file).
_READ_ERRORS = (tf.errors.OpError, IndexError)


# ==================================================================================================
# Finding checkpoints
# ==================================================================================================
def step_of(prefix: str) -> int:
  """The number N of a `.../ckpt-N` prefix."""
  match = _PREFIX_PATTERN.match(os.path.basename(prefix))
  if not match:
    raise ValueError(f"not a checkpoint prefix of the form .../ckpt-N: {prefix!r}")
  return int(match.group(1))


def listed_checkpoints(directory: str) -> List[str]:
  """The checkpoint prefixes the state file of `directory` lists, oldest first ([] if none)."""
  state = tf.train.get_checkpoint_state(directory)
  if state is None:
    return []
  paths = [path for path in state.all_model_checkpoint_paths if path != state.model_checkpoint_path]
  return paths + [state.model_checkpoint_path]


def _exists(prefix: str) -> bool:
  return tf.io.gfile.exists(prefix + ".index")


def _newest_existing(directory: str) -> Optional[str]:
  """The newest listed checkpoint whose index exists (consumers: no read, no repair)."""
  listed = listed_checkpoints(directory)
  for prefix in reversed(listed):
    if _exists(prefix):
      return prefix
    logging.warning(
      "%s is listed in %s but its files are missing; trying an older one",
      prefix,
      os.path.join(directory, STATE_FILENAME),
    )
  return None


def latest_checkpoint(workdir: str) -> Optional[str]:
  """The newest training checkpoint prefix in `workdir`, or None."""
  return _newest_existing(os.path.join(workdir, CHECKPOINT_SUBDIR))


def best_checkpoint(workdir: str) -> Optional[str]:
  """The best-by-validation checkpoint prefix in `workdir`, or None."""
  return _newest_existing(os.path.join(workdir, BEST_SUBDIR))


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
    found = _newest_existing(path)
    if found:
      return found
  raise CheckpointNotFoundError(
    f"no checkpoint at {path!r}: expected a workdir with {BEST_SUBDIR}/ or "
    f"{CHECKPOINT_SUBDIR}/, a folder with a 'checkpoint' file, or a prefix like .../ckpt-12 "
    "(with its .index file)"
  )


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


def read_scalar(prefix: Optional[str], name: str, default: Any = None) -> Any:
  """A saved value of a checkpoint by object path (e.g. "best_dsc"), without restoring it.

  Returns:
    The value; `default` when `prefix` is None or the value cannot be read (with a warning).
  """
  if prefix is None:
    return default
  try:
    return tf.train.load_checkpoint(prefix).get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")
  except _READ_ERRORS + (KeyError, ValueError) as error:
    logging.warning("cannot read %s from %s: %s", name, prefix, _short_message(error))
    return default


# ==================================================================================================
# Restoring a run
# ==================================================================================================
def restore_newest(
  checkpoint: tf.train.Checkpoint, directory: str, repair: bool = False
) -> Optional[str]:
  """Restores the newest readable checkpoint of `directory` into `checkpoint`.

  The checkpoints the state file lists are tried newest first (without a state file: the
  `ckpt-N` files found). One that cannot be read is skipped with a warning naming it.

  Args:
    checkpoint: the run's state; every object it holds must be in the checkpoint.
    directory: a folder written by `Checkpointer`.
    repair: move unreadable checkpoints into `directory/broken/` and list only the good ones in
      the state file (the one process that writes `directory` should do this).

  Returns:
    The prefix restored, or None when `directory` holds no checkpoint (a fresh run).

  Raises:
    CheckpointReadError: checkpoints exist but none can be read (nothing is moved then).
    ValueError: a readable checkpoint does not match `checkpoint` (e.g. another optimizer).
  """
  listed = listed_checkpoints(directory)
  candidates = list(reversed(listed))
  if not candidates:
    candidates = sorted(_prefixes_on_disk(directory), key=step_of, reverse=True)
    if candidates:
      logging.warning(
        "%s has checkpoint files but no readable state file; trying %s",
        directory,
        ", ".join(os.path.basename(prefix) for prefix in candidates),
      )
  failures = []
  for prefix in candidates:
    try:
      status = checkpoint.read(prefix)
    except _READ_ERRORS as error:
      failures.append((prefix, _short_message(error)))
      logging.warning(
        "cannot read checkpoint %s (%s); trying an older one", prefix, failures[-1][1]
      )
      continue
    try:
      status.assert_existing_objects_matched()
    except AssertionError as error:
      raise ValueError(
        f"checkpoint {prefix} does not match this run (were flags such as "
        f"--optimizer or --precision changed?): {error}"
      ) from error
    status.expect_partial()  # extra values are fine (e.g. save_counter of older checkpoints)
    if failures and repair:
      _set_aside(directory, [failed for failed, _ in failures], listed, prefix)
    return prefix
  if failures:
    details = "; ".join(f"{prefix}: {problem}" for prefix, problem in failures)
    raise CheckpointReadError(
      f"no checkpoint in {directory} can be read ({details}). Move the folder away (or delete "
      "it) to start the run over."
    )
  return None


def _set_aside(directory: str, broken: Sequence[str], listed: Sequence[str], good: str) -> None:
  """Moves unreadable checkpoints into broken/ and lists the rest, up to `good`, as kept."""
  target = os.path.join(directory, BROKEN_SUBDIR)
  tf.io.gfile.makedirs(target)
  for prefix in broken:
    for path in tf.io.gfile.glob(prefix + ".*"):
      tf.io.gfile.rename(path, os.path.join(target, os.path.basename(path)), overwrite=True)
    logging.warning("moved the unreadable checkpoint %s into %s", prefix, target)
  kept = [prefix for prefix in listed if prefix not in broken]
  kept = kept[: kept.index(good) + 1] if good in kept else [good]
  _write_state(directory, kept)


def _prefixes_on_disk(directory: str) -> List[str]:
  if not tf.io.gfile.isdir(directory):
    return []
  return [
    os.path.join(directory, name[: -len(".index")])
    for name in tf.io.gfile.listdir(directory)
    if name.endswith(".index") and _PREFIX_PATTERN.match(name[: -len(".index")])
  ]


def _short_message(error: BaseException) -> str:
  """An error's message without TF's op decorations."""
  message = getattr(error, "message", None) or str(error)
  message = re.sub(r"\{\{[^}]*\}\}\s*", "", message)
  return message.split(" [Op:")[0].strip()


# ==================================================================================================
# Writing
# ==================================================================================================
def check_writable(workdir: str) -> None:
  """Fails early, naming the folder, when checkpoints cannot be written into `workdir`.

  Raises:
    CheckpointWriteError: the folder cannot be created or written.
  """
  probe = os.path.join(workdir, f".write-test-{os.getpid()}")
  try:
    tf.io.gfile.makedirs(workdir)
    with tf.io.gfile.GFile(probe, "w") as handle:
      handle.write("ok")
    tf.io.gfile.remove(probe)
  except (OSError, tf.errors.OpError) as error:
    raise CheckpointWriteError(
      f"cannot write into --workdir={workdir}: {_short_message(error)}. Choose a writable folder."
    ) from error


class Checkpointer:
  """Writes checkpoints of one tf.train.Checkpoint into one folder, crash-safe (module doc)."""

  def __init__(self, checkpoint: tf.train.Checkpoint, directory: str, max_to_keep: int):
    """Args:
    checkpoint: what to save.
    directory: the folder (created on the first save).
    max_to_keep: how many checkpoints stay listed; older ones are deleted.
    """
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be at least 1, got {max_to_keep}")
    self._checkpoint = checkpoint
    self.directory = directory
    self.max_to_keep = max_to_keep
    self._listed: Optional[List[str]] = None  # what the state file lists (read once)

  @property
  def checkpoints(self) -> List[str]:
    """The listed checkpoint prefixes, oldest first."""
    if self._listed is None:
      self._listed = listed_checkpoints(self.directory)
    return list(self._listed)

  @property
  def latest(self) -> Optional[str]:
    """The newest listed checkpoint prefix, or None."""
    listed = self.checkpoints
    return listed[-1] if listed else None

  def save(self, step: int) -> str:
    """Writes the checkpoint's current state as `ckpt-{step}` and lists it.

    Returns:
      The new prefix.

    Raises:
      CheckpointWriteError: the write failed (e.g. disk full); nothing half-written is left
        listed and the previous checkpoint is intact.
    """
    return self._add(step, lambda staged: self._checkpoint.write(staged))

  def adopt(self, source: str) -> str:
    """Lists a copy of another folder's checkpoint `source` here, under the same name.

    Hard links where the file system allows (no second write of the same bytes), else copies.
    Used for best/: the best checkpoint is the training checkpoint of that step.

    Returns:
      The new prefix.

    Raises:
      CheckpointWriteError: as `save`.
    """

    def link(staged: str) -> str:
      tf.io.gfile.makedirs(os.path.dirname(staged))
      for path in tf.io.gfile.glob(source + ".*"):
        match = _FILE_PATTERN.match(os.path.basename(path))
        if match:
          _link_or_copy(path, staged + "." + match.group(2))
      if not _exists(staged):
        raise tf.errors.NotFoundError(None, None, f"{source}.index does not exist")
      return staged

    return self._add(step_of(source), link)

  def _add(self, step: int, write) -> str:
    prefix = os.path.join(self.directory, f"ckpt-{step}")
    # A fresh name: never writes into what an interrupted earlier save may have left listed.
    staging = os.path.join(
      self.directory, f".ckpt-{step}-{os.getpid()}-{time.time_ns()}{_STAGING_SUFFIX}"
    )
    previous = self.latest
    try:
      tf.io.gfile.makedirs(self.directory)
      staged = write(os.path.join(staging, f"ckpt-{step}"))
      self._pause("staged", prefix)
      self._commit(staged, prefix)
    except (OSError, tf.errors.OpError) as error:
      self._listed = None  # the state file may have changed before the failure
      self._discard(staging, prefix)
      before = (
        f"the previous checkpoint {previous} is intact and a restart resumes from it"
        if previous
        else "there is no earlier checkpoint in that folder"
      )
      raise CheckpointWriteError(
        f"could not write checkpoint {prefix} into {self.directory}: "
        f"{_short_message(error)}. Nothing half-written is left listed; {before}."
      ) from error
    return prefix

  def _commit(self, staged: str, prefix: str) -> None:
    kept = self.checkpoints
    place = _rename
    if prefix in kept:
      # Replacing a listed checkpoint: while its files are swapped, the complete staged copy is
      # the one listed (so it is linked into place, not moved), and a crash in between leaves
      # nothing half-written listed.
      self._record([staged if path == prefix else path for path in kept])
      place = _link_or_copy
    # Data first, index last: an index in place means its data are complete.
    for path in tf.io.gfile.glob(staged + ".data-*"):
      place(path, os.path.join(self.directory, os.path.basename(path)))
    self._pause("data_moved", prefix)
    place(staged + ".index", prefix + ".index")
    self._pause("moved", prefix)
    kept = ([path for path in kept if path != prefix] + [prefix])[-self.max_to_keep :]
    self._record(kept)
    self._pause("recorded", prefix)
    self._sweep(kept)

  def _record(self, prefixes: List[str]) -> None:
    _write_state(self.directory, prefixes)
    self._listed = list(prefixes)

  def _lists_inside(self, folder: str) -> bool:
    return any(path.startswith(folder + os.sep) for path in self.checkpoints)

  def _sweep(self, kept: Sequence[str]) -> None:
    """Deletes unlisted checkpoint files and staging folders (best effort: a failure to delete
    costs disk space, not correctness)."""
    names = {os.path.basename(prefix) for prefix in kept}
    for name in tf.io.gfile.listdir(self.directory):
      path = os.path.join(self.directory, name.rstrip("/"))
      match = _FILE_PATTERN.match(name)
      try:
        if match and match.group(1) not in names:
          tf.io.gfile.remove(path)
        elif name.rstrip("/").endswith(_STAGING_SUFFIX) and not self._lists_inside(path):
          tf.io.gfile.rmtree(path)
        elif name.startswith(STATE_FILENAME + ".tmp"):  # an interrupted atomic state write
          tf.io.gfile.remove(path)
      except (OSError, tf.errors.OpError) as error:
        logging.warning("could not delete %s: %s", path, _short_message(error))

  def _discard(self, staging: str, prefix: str) -> None:
    """After a failed write: removes what it left, unless the state file lists it."""
    try:
      listed = self.checkpoints
      if not self._lists_inside(staging) and tf.io.gfile.exists(staging):
        tf.io.gfile.rmtree(staging)
      if prefix not in listed:
        for path in tf.io.gfile.glob(prefix + ".*"):
          tf.io.gfile.remove(path)
    except (OSError, tf.errors.OpError) as error:
      logging.warning(
        "could not clean up after the failed write of %s: %s", prefix, _short_message(error)
      )

  @staticmethod
  def _pause(phase: str, prefix: str) -> None:
    """The test hook (module doc): DUNET_TEST_CHECKPOINT_PAUSE=PHASE:SECONDS."""
    setting = os.environ.get(PAUSE_ENV)
    if not setting:
      return
    wanted, _, seconds = setting.partition(":")
    if wanted == phase:
      logging.warning("checkpoint test pause: %s %s (%s s)", phase, prefix, seconds)
      logging.flush()
      time.sleep(float(seconds or 0))


def _write_state(directory: str, prefixes: Sequence[str]) -> None:
  """Replaces the state file atomically (written aside, then renamed)."""
  checkpoint_management.update_checkpoint_state_internal(
    directory, prefixes[-1], all_model_checkpoint_paths=list(prefixes), save_relative_paths=True
  )


def _rename(source: str, target: str) -> None:
  tf.io.gfile.rename(source, target, overwrite=True)


def _link_or_copy(source: str, target: str) -> None:
  if "://" not in source and "://" not in target:
    try:
      if os.path.exists(target):
        os.remove(target)
      os.link(source, target)
      return
    except OSError:
      pass  # e.g. another file system: copy instead
  tf.io.gfile.copy(source, target, overwrite=True)


def all_finite(prefix: str) -> bool:
  """Whether every floating-point tensor saved in a checkpoint is finite."""
  reader = tf.train.load_checkpoint(prefix)
  for name in reader.get_variable_to_shape_map():
    value = reader.get_tensor(name)
    if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
      return False
  return True


# ==================================================================================================
# Run configuration
# ==================================================================================================
def write_config(workdir: str, config: Dict[str, Any]) -> None:
  """Writes the run configuration atomically (a reader never sees a half-written file)."""
  tf.io.gfile.makedirs(workdir)
  fileio.write_json_atomic(os.path.join(workdir, CONFIG_FILENAME), config)


def read_config(workdir: str) -> Dict[str, Any]:
  """Reads `config.json` from a workdir; {} if there is none."""
  path = os.path.join(workdir, CONFIG_FILENAME)
  if not tf.io.gfile.exists(path):
    return {}
  with tf.io.gfile.GFile(path) as handle:
    return json.load(handle)
