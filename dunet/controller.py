"""The controller: the loop over epochs and steps, and the actions between trainer calls.

Orbit's split (dunet/trainer.py runs steps and validations). Each action is small and testable
on its own, without a training run:

  check_finite       a step that went non-finite stops training before anything is saved
  chunk_end          how many steps the trainer runs in one call (up to the next log, checkpoint
                     or epoch end)
  ValidationJudge    after each validation: plateau schedule, best DSC, early stopping
  CheckpointActions  restore, save each step at most once, keep the best
  SummaryActions     TensorBoard scalars and pictures (the chief only)
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from typing import Callable, Dict, Optional, Sequence

from absl import logging
import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet import fileio
from dunet import optim
from dunet import precision
from dunet import profiler
from dunet import summaries
from dunet.config import TrainConfig
from dunet.data import preprocess
from dunet.errors import DivergedError
from dunet.progress import ProgressLine
from dunet.trainer import Trainer

METRICS_FILENAME = "metrics.json"
MONITORED_DSC = "head2/per_image/dsc"


def check_finite(
  measured: Dict[str, float], step: int, policy: precision.Policy, last_good: Optional[str]
) -> None:
  """Stops training (before anything is saved) on a step that went non-finite.

  With float16 the dynamic loss scale skips overflowing steps by design; otherwise a non-finite
  loss or gradient means training diverged. Parameters that overflow are never acceptable.

  Raises:
    DivergedError: naming the step and the last good checkpoint.
  """
  problem = None
  if not policy.needs_loss_scaling and not math.isfinite(measured["loss/total"]):
    problem = f"the training loss is {measured['loss/total']}"
  elif not policy.needs_loss_scaling and not measured["update_applied"]:
    problem = f"the gradients are not finite (the loss is {measured['loss/total']:.4g})"
  elif not math.isfinite(measured["norm/parameters"]):
    problem = "the parameters overflowed after the update (their norm is not finite)"
  if problem:
    raise DivergedError(
      f"training diverged at step {step}: {problem} (precision {policy.name}). Stopped without "
      f"saving this step; the last good checkpoint is {last_good or 'none (none was saved yet)'}"
      ". Try a lower --learning_rate."
    )


def chunk_end(step: int, epoch_end: int, every: Sequence[int]) -> int:
  """Where the trainer's next call stops: the next multiple (after `step`) of any positive
  interval in `every` (logging, checkpointing), at most `epoch_end`."""
  end = epoch_end
  for interval in every:
    if interval > 0:
      end = min(end, (step // interval + 1) * interval)
  return end


@dataclasses.dataclass(frozen=True)
class Verdict:
  """What a validation decided."""

  improved: bool  # the best validation DSC so far (the best checkpoint moves)
  learning_rate: float  # to use from now on
  stop: bool  # early stopping


class ValidationJudge:
  """The plateau schedule, the best DSC and early stopping, updated after each validation.

  Its state (plateau, early_stopping, best_dsc) is checkpointed, so a resumed run judges as an
  uninterrupted one would.
  """

  def __init__(
    self,
    monitor: str = "dsc",
    lr_schedule: str = "cosine",
    plateau_factor: float = 0.1,
    plateau_patience: int = 5,
    min_learning_rate: float = 0.0,
    early_stopping_patience: int = 0,
    best_dsc: Optional[tf.Variable] = None,
  ):
    """Args:
    monitor: "dsc" (head 2's validation DSC, higher is better) or "loss" (lower is better):
      what the plateau schedule and early stopping watch.
    lr_schedule: the plateau schedule acts only when this is "plateau".
    plateau_factor, plateau_patience, min_learning_rate: the plateau schedule's.
    early_stopping_patience: validations without improvement before stopping (0: never).
    best_dsc: the variable holding the best DSC (made under a strategy scope by the caller).
    """
    mode = "max" if monitor == "dsc" else "min"
    self.monitor, self.lr_schedule = monitor, lr_schedule
    self.early_stopping_patience = early_stopping_patience
    self.plateau = optim.ReduceOnPlateau(
      factor=plateau_factor, patience=plateau_patience, min_lr=min_learning_rate, mode=mode
    )
    self.early_stopping = optim.EarlyStopping(patience=early_stopping_patience or 1, mode=mode)
    self.best_dsc = (
      best_dsc
      if best_dsc is not None
      else tf.Variable(-1.0, dtype=tf.float32, trainable=False, name="best_dsc")
    )

  def judge(self, valid_metrics: Dict[str, float], learning_rate: float) -> Verdict:
    """Records one validation's metrics; returns what follows from them."""
    dsc = valid_metrics[MONITORED_DSC]
    monitored = dsc if self.monitor == "dsc" else valid_metrics["loss/total"]
    if self.lr_schedule == "plateau":
      learning_rate = self.plateau.update(monitored, learning_rate)
    improved = dsc > float(self.best_dsc.numpy())
    if improved:
      self.best_dsc.assign(dsc)
    stop = bool(self.early_stopping_patience) and self.early_stopping.update(monitored)
    if stop:
      logging.info(
        "Early stopping: no better validation %s for %d validations.",
        self.monitor,
        self.early_stopping_patience,
      )
    return Verdict(improved=improved, learning_rate=float(learning_rate), stop=stop)


class CheckpointActions:
  """The latest checkpoints and the best one of a run, each step saved at most once.

  Every worker resumes from the workdir's newest readable checkpoint (only the chief repairs it).
  Every multi-worker worker also writes (collective ops need all of them); only the chief's copy
  lands in the workdir. Writes are crash-safe: see dunet/checkpoint.py.
  """

  def __init__(
    self,
    state: tf.train.Checkpoint,
    workdir: str,
    write_dir: str,
    chief: bool,
    keep_checkpoints: int,
  ):
    self.state, self.workdir, self.chief = state, workdir, chief
    self.latest_checkpointer = checkpoint_lib.Checkpointer(
      state, os.path.join(write_dir, checkpoint_lib.CHECKPOINT_SUBDIR), max_to_keep=keep_checkpoints
    )
    self.best_checkpointer = checkpoint_lib.Checkpointer(
      state, os.path.join(write_dir, checkpoint_lib.BEST_SUBDIR), max_to_keep=1
    )
    self._last_saved: Optional[int] = None

  @property
  def latest(self) -> Optional[str]:
    """The newest checkpoint written (or found), if any."""
    return self.latest_checkpointer.latest

  def restore(self, step: Callable[[], int], best_dsc: Callable[[], float]) -> Optional[str]:
    """Restores the newest checkpoint, if any; returns its prefix.

    Args:
      step: the restored step count (read after restoring).
      best_dsc: the restored best DSC (read after restoring).
    """
    restored = checkpoint_lib.restore_newest(
      self.state, os.path.join(self.workdir, checkpoint_lib.CHECKPOINT_SUBDIR), repair=self.chief
    )
    self._last_saved = step()  # step 0 is never saved
    if restored:
      logging.info("Resumed from %s at step %d", restored, step())
      # Killed between writing an improved checkpoint and copying it to best/: copy it now.
      if self.chief and best_dsc() > checkpoint_lib.read_scalar(
        checkpoint_lib.best_checkpoint(self.workdir), "best_dsc", default=-1.0
      ):
        self.best_checkpointer.adopt(restored)
    return restored

  def save(self, step: int) -> None:
    """Saves `step` unless it was saved (or restored) already."""
    if self._last_saved != step:
      self.latest_checkpointer.save(step)
      self._last_saved = step

  def keep_best(self) -> None:
    """The latest checkpoint becomes the best one."""
    self.best_checkpointer.adopt(self.latest)


class SummaryActions:
  """TensorBoard scalars (train/, valid/) and validation pictures; no-ops off the chief."""

  def __init__(
    self,
    workdir: str,
    chief: bool,
    log_every_steps: int,
    total_steps: int,
    summary_images: int,
    preprocessing: str,
  ):
    self.log_every_steps, self.total_steps = log_every_steps, total_steps
    self.summary_images, self.preprocessing = summary_images, preprocessing
    self.train_writer = (
      tf.summary.create_file_writer(os.path.join(workdir, "train")) if chief else None
    )
    self.valid_writer = (
      tf.summary.create_file_writer(os.path.join(workdir, "valid")) if chief else None
    )

  def is_log_step(self, step: int) -> bool:
    """Whether training scalars are written after `step`."""
    return step % self.log_every_steps == 0 or step == self.total_steps

  def train_scalars(self, step: int, measured: Dict[str, float], images_per_second: float) -> None:
    if self.train_writer is not None and self.is_log_step(step):
      summaries.write_scalars(
        self.train_writer, step, dict(measured, images_per_second=images_per_second)
      )

  def valid_scalars(self, step: int, valid_metrics: Dict[str, float]) -> None:
    if self.valid_writer is not None:
      summaries.write_scalars(self.valid_writer, step, valid_metrics)

  def overlays(self, step: int) -> Optional[Callable]:
    """A callback for Trainer.evaluate's first batch that writes its pictures, or None."""
    if self.valid_writer is None or not self.summary_images:
      return None

    def write(batch, result) -> None:
      # Pictures come from the eval step's own outputs: calling the model again here (on the
      # chief only) would read the BatchNorm statistics, a collective the other workers would
      # not join.
      count = self.summary_images
      display = preprocess.to_display_uint8(batch["image"][:count], self.preprocessing).numpy()
      panel = summaries.prediction_panel(
        display,
        batch["mask"][:count].numpy(),
        result["probability/head1"][:count].numpy(),
        result["probability/head2"][:count].numpy(),
      )
      summaries.write_images(self.valid_writer, step, "valid/input|truth|head1|head2", panel, count)

    return write


class Controller:
  """Runs (or resumes) a whole training run of `trainer` in `workdir`."""

  def __init__(
    self,
    trainer: Trainer,
    config: TrainConfig,
    workdir: str,
    chief: bool,
    stop_requested: Callable[[], Optional[str]] = lambda: None,
  ):
    """Restores the newest checkpoint of `workdir` (or initialises the weights).

    Args:
      trainer: the trainer (its variables are part of the checkpoint).
      config: the run's config.
      workdir: where checkpoints, summaries and metrics go.
      chief: whether this worker writes the workdir (others write to a temporary folder).
      stop_requested: the name of a stop signal received, or None (checked after each step).
    """
    self.trainer, self.config, self.workdir, self.chief = trainer, config, workdir, chief
    self.stop_requested = stop_requested
    optimization = config.optimization
    with trainer.strategy.scope():
      best_dsc = tf.Variable(
        -1.0,
        dtype=tf.float32,
        trainable=False,
        name="best_dsc",
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
      )
    self.judge = ValidationJudge(
      optimization.monitor,
      optimization.lr_schedule,
      optimization.plateau_factor,
      optimization.plateau_patience,
      optimization.min_learning_rate,
      optimization.early_stopping_patience,
      best_dsc,
    )
    parts = trainer.parts
    # These names are the checkpoint's variable paths: resuming and the Keras converter use them.
    state = tf.train.Checkpoint(
      model=parts.model,
      optimizer=parts.optimizer,
      loss_scale=parts.loss_scale,
      global_step=trainer.global_step,
      best_dsc=best_dsc,
      plateau=self.judge.plateau,
      early_stopping=self.judge.early_stopping,
    )
    self.write_dir = workdir if chief else tempfile.mkdtemp(prefix="dunet-worker-")
    self.checkpoints = CheckpointActions(
      state, workdir, self.write_dir, chief, config.checkpoint.keep_checkpoints
    )
    if not self.checkpoints.restore(lambda: trainer.step, lambda: float(best_dsc.numpy())):
      trainer.initialize_weights()
    self.step_profiler = profiler.StepProfiler(
      self.write_dir, profiler.parse_step_range(config.logging.profile_steps)
    )
    trainer.step_context = self.step_profiler.step

  @property
  def best_dsc(self) -> float:
    return float(self.judge.best_dsc.numpy())

  def run(self) -> Dict[str, object]:
    """Trains to the end (or a stop); returns the final metrics, also in metrics.json."""
    data, config = self.trainer.data, self.config
    step = self.trainer.step
    self.summaries = SummaryActions(
      self.workdir,
      self.chief,
      config.logging.log_every_steps,
      data.total_steps,
      config.logging.summary_images,
      config.data.preprocessing,
    )
    progress = ProgressLine(
      data.total_steps,
      config.optimization.batch_size,
      every=config.logging.log_every_steps,
      start_step=step,
    )
    valid_metrics: Dict[str, float] = {}
    stopped_early = False
    for epoch in range(step // data.steps_per_epoch, config.optimization.epochs):
      if step >= data.total_steps or stopped_early or self.stop_requested():
        break
      epoch_end = min((epoch + 1) * data.steps_per_epoch, data.total_steps)
      step = self._train_epoch(step, epoch_end, progress)
      if step < epoch_end:  # a signal, in the middle of the epoch
        self.checkpoints.save(step)
        break
      # End of the epoch (also when a signal came during its last step): validate, then save
      # once, so that a resumed run never finds an epoch's step saved without its validation.
      verdict = None
      if (epoch + 1) % config.validation.eval_every_epochs == 0 or step == data.total_steps:
        valid_metrics, verdict = self._validate(epoch, step)
        stopped_early = verdict.stop
      self.checkpoints.save(step)
      if verdict is not None and verdict.improved:
        self.checkpoints.keep_best()
    progress.close()
    self.step_profiler.stop()
    return self._finish(step, stopped_early, valid_metrics)

  def _train_epoch(self, step: int, epoch_end: int, progress: ProgressLine) -> int:
    """Trains to `epoch_end` (or a stop); returns the step reached."""
    every_checkpoint = self.config.checkpoint.checkpoint_every_steps
    while step < epoch_end and not self.stop_requested():
      end = chunk_end(step, epoch_end, (self.config.logging.log_every_steps, every_checkpoint))
      # One result per compiled call: every step, or the last of each --steps_per_loop loop
      # (calls end at log and checkpoint steps, so those steps' measurements are all there).
      for reached, measured in self.trainer.train(end - step, should_stop=self.stop_requested):
        step = reached
        check_finite(measured, step, self.trainer.policy, self.checkpoints.latest)
        progress.update(step, {"loss": measured["loss/total"]})
        self.summaries.train_scalars(step, measured, progress.items_per_second)
      # The epoch's last step is saved after its validation, once (Controller.run).
      if every_checkpoint and step % every_checkpoint == 0 and step < epoch_end:
        self.checkpoints.save(step)
    return step

  def _validate(self, epoch: int, step: int):
    """Validates; returns (metrics, Verdict) after updating schedule, best and stopping."""
    valid_metrics = self.trainer.evaluate(on_first_batch=self.summaries.overlays(step))
    self.summaries.valid_scalars(step, valid_metrics)
    logging.info(
      "epoch %d step %d validation: %s",
      epoch + 1,
      step,
      summaries.flatten_for_log(
        {k: v for k, v in valid_metrics.items() if k.startswith("head2/per_image")}
      ),
    )
    learning_rate = self.trainer.optimizer.learning_rate
    verdict = self.judge.judge(valid_metrics, float(learning_rate.numpy()))
    if self.config.optimization.lr_schedule == "plateau":
      learning_rate.assign(verdict.learning_rate)
    return valid_metrics, verdict

  def _finish(
    self, step: int, stopped_early: bool, valid_metrics: Dict[str, float]
  ) -> Dict[str, object]:
    if not self.chief:
      shutil.rmtree(self.write_dir, ignore_errors=True)
    final = {
      "step": step,
      "best_valid_dsc": self.best_dsc,
      "stopped_by": self.stop_requested() or ("early_stopping" if stopped_early else None),
      "valid": valid_metrics,
    }
    if self.chief:
      fileio.write_json_atomic(os.path.join(self.workdir, METRICS_FILENAME), final)
    return final
