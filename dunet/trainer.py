"""The trainer: model, optimizer, loss scale and data sets; runs steps and validations.

Orbit's split: the Trainer knows how to run N training steps (`train`) and one validation
(`evaluate`); the loop around them, and what happens between them (checkpoints, summaries,
schedules, early stopping), is dunet/controller.py's.

    data = trainer.check_inputs(config)          # before any output is written
    trainer = Trainer(config, data, strategy, policy)
    measurements = trainer.train(10)             # (step, dict of floats) per compiled call
    metrics = trainer.evaluate()                 # {"loss/total", "head2/per_image/dsc", ...}
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Tuple

from absl import logging
import tensorflow as tf

from dunet import builder
from dunet import checkpoint as checkpoint_lib
from dunet import losses
from dunet import metrics
from dunet import optim
from dunet import precise_bn
from dunet import precision
from dunet.config import TrainConfig
from dunet.data import demo as demo_data
from dunet.data import folds as folds_lib
from dunet.data import pipeline
from dunet.data import prepare
from dunet.data import records
from dunet.errors import ConfigError
from dunet.errors import DataError
from dunet.models import DoubleUNet
from dunet.models import vgg19
from dunet.models.doubleunet import SIZE_DIVISOR

Batch = Dict[str, tf.Tensor]
Measurements = Dict[str, float]


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """The checked data folder of a run, what it trains and validates on, and its length in steps.

  `height` x `width` is the prepared size (validation scores whole prepared images);
  `input_height` x `input_width` the model's training input (the crop, if any), which is what
  the run's config.json records as the model size.
  """

  data_dir: str
  height: int
  width: int
  train_examples: int
  steps_per_epoch: int
  total_steps: int
  train_splits: Tuple[str, ...] = ("train",)
  valid_split: str = "valid"
  fold: int = -1  # the cross-validation fold validated on; -1: none
  folds: int = 0  # K of a folder prepared in K folds; 0: no folds
  crop_height: int = 0  # the training crop; both 0: whole prepared images
  crop_width: int = 0

  @property
  def crop_size(self) -> Optional[Tuple[int, int]]:
    """(height, width) of the training crops, or None without crops."""
    return (self.crop_height, self.crop_width) if self.crop_height else None

  @property
  def input_height(self) -> int:
    return self.crop_height or self.height

  @property
  def input_width(self) -> int:
    return self.crop_width or self.width


def check_inputs(config: TrainConfig) -> PreparedData:
  """Finds (or, with demo, generates) the prepared data and checks it fits the config.

  With a fold (data prepared in K folds) the run trains on the other K-1 fold splits and
  validates on the fold's; data prepared in folds cannot be trained on without one.

  Raises:
    DataError: no prepared data, damaged shards, changed raw data, a size DoubleU-Net cannot take.
    ConfigError: the config's size, crop, fold or batch does not fit the data.
  """
  data = config.data
  data_dir = data.data_dir
  if data.demo:
    data_dir = demo_data.ensure_demo_data(
      data_dir,
      count=data.demo_count,
      height=data.height or 128,
      width=data.width or 128,
      seed=config.seed,
      folds=data.demo_folds if data.fold >= 0 else 0,
    )
  if not tf.io.gfile.exists(os.path.join(data_dir, "summary.json")):
    raise DataError(
      data_dir,
      "no prepared data (--data_dir). dunet never downloads data sets: "
      "download the raw data set (see the header of its configs/*.flags file), then "
      "prepare it once with `dunet-prepare --raw_dir=RAW_FOLDER "
      f"--out_dir={data_dir} --height=H --width=W`; or pass --demo to train on "
      "generated demo data.",
    )
  data_info = pipeline.read_data_info(data_dir)
  train_splits, valid_split, folds = _splits_of_run(data_dir, data.fold)
  # Shards still as prepared (their sizes: cheap); damaged records are named when read.
  prepare.verify_shards(data_dir, (*train_splits, valid_split))
  changed = prepare.raw_data_changes(data_dir)
  if changed and not data.allow_changed_raw_data:
    raise DataError(
      changed.path,
      f"{changed.problem}; or pass --allow_changed_raw_data to train "
      "on the prepared records as they are",
    )
  if changed:
    logging.warning("%s (training anyway: --allow_changed_raw_data)", changed)
  height, width = data_info["height"], data_info["width"]
  if height % SIZE_DIVISOR or width % SIZE_DIVISOR:
    raise DataError(
      data_dir,
      f"prepared at {height}x{width}; DoubleU-Net needs sizes divisible "
      f"by {SIZE_DIVISOR}: prepare it again with dunet-prepare",
    )
  if data.height and (data.height, data.width) != (height, width):
    raise ConfigError(
      f"--height/--width {data.height}x{data.width} differ from the prepared "
      f"data ({height}x{width} in {data_dir})"
    )
  crop_height, crop_width = _crop(data.crop_height, data.crop_width, height, width, data_dir)
  batch_size = config.optimization.batch_size
  train_examples = pipeline.count_examples(data_dir, list(train_splits))
  steps_per_epoch = train_examples // batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f"{train_examples} training images are fewer than --batch_size={batch_size}")
  total_steps = config.optimization.epochs * steps_per_epoch
  if config.optimization.max_steps:
    total_steps = min(total_steps, config.optimization.max_steps)
  return PreparedData(
    data_dir,
    height,
    width,
    train_examples,
    steps_per_epoch,
    total_steps,
    train_splits=tuple(train_splits),
    valid_split=valid_split,
    fold=data.fold,
    folds=folds,
    crop_height=crop_height,
    crop_width=crop_width,
  )


def _splits_of_run(data_dir: str, fold: int) -> Tuple[List[str], str, int]:
  """(training splits, validation split, K) of a run on `data_dir` with `fold` (-1: none).

  Raises:
    ConfigError: a fold on data without folds or out of range; data in folds without a fold.
  """
  k = folds_lib.num_folds(data_dir)
  if fold >= 0:
    train_splits, valid_split = folds_lib.fold_splits(data_dir, fold)
    return train_splits, valid_split, k
  if k:
    raise ConfigError(
      f"{data_dir} was prepared in {k} folds: pass --fold=0..{k - 1} (train on the other "
      "folds, validate on that one)"
    )
  return ["train"], "valid", 0


def _crop(
  crop_height: int, crop_width: int, height: int, width: int, data_dir: str
) -> Tuple[int, int]:
  """The training crop (height, width) for images prepared at height x width; (0, 0): none.

  A side given as 0 is the prepared one (only the other side is cropped).

  Raises:
    ConfigError: a crop side larger than the prepared one.
  """
  if not crop_height and not crop_width:
    return 0, 0
  for name, crop, prepared in (("height", crop_height, height), ("width", crop_width, width)):
    if crop > prepared:
      raise ConfigError(
        f"--crop_{name}={crop} is larger than the prepared {name} {prepared} of {data_dir} "
        f"(at most {prepared}; 0: the whole {name})"
      )
  return crop_height or height, crop_width or width


def _finite_update(measured: Measurements) -> bool:
  """Whether a step applied its update and its loss and parameters stayed finite."""
  return bool(measured["update_applied"]) and all(
    math.isfinite(measured[name]) for name in ("loss/total", "norm/parameters")
  )


def _no_context(step: int) -> ContextManager:
  del step
  return contextlib.nullcontext()


class Trainer:
  """Owns the model, optimizer, loss scale, step counter, data sets and compiled functions."""

  def __init__(
    self,
    config: TrainConfig,
    data: PreparedData,
    strategy: tf.distribute.Strategy,
    policy: precision.Policy,
    step_context: Callable[[int], ContextManager] = _no_context,
    make_model: Callable[..., tf.Module] = DoubleUNet,
  ):
    """Builds every variable (under `strategy.scope()`) and the step functions.

    Args:
      config: the run's (validated) config.
      data: what check_inputs found.
      strategy: where to train.
      policy: the resolved precision policy.
      step_context: step number (1-based) -> a context each step runs in (the profiler's).
      make_model: the model class (tests use small stand-ins with DoubleUNet's outputs).
    """
    self.config, self.data, self.strategy, self.policy = config, data, strategy, policy
    # What each step runs in (the controller's profiler); public so the controller can set it.
    self.step_context = step_context
    optimization = config.optimization
    self.parts = builder.build_training_parts(
      policy,
      optimization.optimizer,
      optimization.learning_rate,
      strategy=strategy,
      make_model=make_model,
      model_options=dict(
        batch_norm_momentum=config.model.batch_norm_momentum,
        vgg19_kernel_init=config.model.vgg19_init,
      ),
      initial_loss_scale=config.runtime.initial_loss_scale,
      loss_scale_growth_interval=config.runtime.loss_scale_growth_interval,
    )
    self.model, self.optimizer = self.parts.model, self.parts.optimizer
    with strategy.scope():
      self.global_step = tf.Variable(
        0,
        dtype=tf.int64,
        trainable=False,
        name="global_step",
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
      )
    loss_fn = losses.make_heads_loss(optimization.loss, optimization.loss_reduction)
    head_weights = list(optimization.head_weights)
    # The step, called once per step; and (--steps_per_loop > 1) the same step in a loop.
    step_arguments = dict(
      loss_fn=loss_fn,
      head_weights=head_weights,
      global_batch_size=optimization.batch_size,
      strategy=strategy,
      jit_compile=config.runtime.jit_compile,
      global_step=self.global_step,
    )
    self.train_function = builder.make_train_function(self.parts, **step_arguments)
    self.steps_per_loop = config.runtime.steps_per_loop
    self.train_loop_function = (
      builder.make_train_loop_function(self.parts, **step_arguments)
      if self.steps_per_loop > 1
      else None
    )
    self.eval_function = builder.make_eval_function(
      self.model, loss_fn=loss_fn, head_weights=head_weights, threshold=config.validation.threshold
    )
    self.moments_function = (
      precise_bn.make_moments_function(self.model, strategy)
      if config.validation.batch_norm_statistics == precise_bn.PRECISE
      else None
    )
    self.cosine = self._cosine_schedule()
    # A read error in a shard becomes an error naming it (records.name_read_errors).
    self.train_shards = pipeline.shard_files(data.data_dir, list(data.train_splits))
    self.valid_shards = pipeline.shard_files(data.data_dir, data.valid_split)
    self._batches: Optional[Iterator[Batch]] = None  # the epoch's distributed iterator
    self._batches_epoch: Optional[int] = None

  def _cosine_schedule(self) -> Optional[optim.CosineSchedule]:
    optimization, total_steps = self.config.optimization, self.data.total_steps
    if optimization.lr_schedule != "cosine":
      return None
    warmup_steps = min(optimization.warmup_steps, total_steps // 5)
    if warmup_steps < optimization.warmup_steps:
      logging.info(
        "Warming up over %d of the run's %d steps (--warmup_steps=%d is capped at a "
        "fifth of the run).",
        warmup_steps,
        total_steps,
        optimization.warmup_steps,
      )
    return optim.CosineSchedule(
      optimization.learning_rate,
      total_steps,
      warmup_steps=warmup_steps,
      final_lr=optimization.min_learning_rate,
    )

  @property
  def step(self) -> int:
    """Optimisation steps done (restored with the checkpoint)."""
    return int(self.global_step.numpy())

  def initialize_weights(self) -> None:
    """A fresh run's first weights: --init_checkpoint, else --vgg19_weights (or random)."""
    if self.config.model.init_checkpoint:  # (exclusive with vgg19_weights: validated)
      logging.info(
        "Starting from the weights of %s",
        checkpoint_lib.restore_model(self.model, self.config.model.init_checkpoint),
      )
    else:
      vgg19.maybe_load_imagenet_weights(self.model, self.config.model.vgg19_weights)

  # ==============================================================================================
  # Data sets
  # ==============================================================================================
  def _train_dataset(self, epoch: int) -> tf.distribute.DistributedDataset:
    config = self.config
    return self.strategy.distribute_datasets_from_function(
      lambda context: pipeline.make_train_dataset(
        self.data.data_dir,
        global_batch_size=config.optimization.batch_size,
        preprocessing=config.data.preprocessing,
        augment_config=config.data.augment,
        seed=config.seed,
        epoch=epoch,
        deterministic=True,
        input_context=context,
        shuffle_buffer=config.data.shuffle_buffer,
        split=list(self.data.train_splits),
        crop_size=self.data.crop_size,
      )
    )

  def _valid_dataset(self) -> tf.data.Dataset:
    # Whole prepared images, also for a run trained on crops: the network is fully convolutional
    # (any size divisible by 16). Its global poolings (ASPP's image pooling, squeeze-excite) then
    # average over the whole picture rather than a crop-sized window, so these scores can differ
    # a little from tiled inference at the crop size.
    return pipeline.make_eval_dataset(
      self.data.data_dir,
      self.data.valid_split,
      batch_size=self.config.optimization.batch_size,
      preprocessing=self.config.data.preprocessing,
    )

  def _statistics_dataset(self) -> tf.distribute.DistributedDataset:
    config = self.config
    # Shared between replicas as training shares its batches.
    return self.strategy.distribute_datasets_from_function(
      lambda context: pipeline.make_statistics_dataset(
        self.data.data_dir,
        global_batch_size=config.optimization.batch_size,
        batches=config.validation.precise_bn_batches,
        preprocessing=config.data.preprocessing,
        seed=config.seed,
        input_context=context,
        shuffle_buffer=config.data.shuffle_buffer,
        split=list(self.data.train_splits),
        crop_size=self.data.crop_size,
      )
    )

  def _batches_at(self, step: int) -> Iterator[Batch]:
    """The iterator whose next batch is that of 0-based `step`: epoch
    `step // steps_per_epoch`, in that epoch's order."""
    epoch = step // self.data.steps_per_epoch
    if epoch != self._batches_epoch:
      # The data order of an epoch depends only on (seed, epoch); skipping the batches already
      # done makes a resumed run see exactly what an uninterrupted one would.
      with records.naming_read_errors(self.train_shards):
        self._batches = iter(self._train_dataset(epoch))
        self._batches_epoch = epoch
        for _ in range(step - epoch * self.data.steps_per_epoch):
          next(self._batches)
    return self._batches

  # ==============================================================================================
  # Training and validation
  # ==============================================================================================
  def train(
    self, num_steps: int, should_stop: Callable[[], object] = lambda: False
  ) -> List[Tuple[int, Measurements]]:
    """Runs up to `num_steps` steps; returns (step reached, its measurements as floats) after
    each call of the compiled function.

    With steps_per_loop 1 (the default) that is every step. With more, each call runs up to
    steps_per_loop steps in a loop inside one tf.function, never across an epoch's end, and
    only the call's last step's measurements are read back (the numbers each step computes are
    the same). Stops early, after a whole call, when `should_stop()` is true or a step's update
    was skipped or went non-finite (a loop ends at that step). The cosine schedule sets each
    step's learning rate; the plateau schedule is the controller's.
    """
    results: List[Tuple[int, Measurements]] = []
    end = self.step + num_steps
    while self.step < end:
      step = self.step
      epoch_left = self.data.steps_per_epoch - step % self.data.steps_per_epoch
      count = min(self.steps_per_loop, end - step, epoch_left)
      batches = self._batches_at(step)
      with self.step_context(step + 1), records.naming_read_errors(self.train_shards):
        if self.train_loop_function is None or count == 1:
          self._set_learning_rate(step)
          measured = self.train_function(next(batches))
        else:
          measured, _ = self.train_loop_function(
            batches, self._learning_rates(step, count), tf.constant(count, tf.int32)
          )
      measured = {k: float(v) for k, v in measured.items()}
      results.append((self.step, measured))
      if should_stop() or not _finite_update(measured):
        # A skipped or non-finite step ends the call, so that the controller judges it (and
        # stops a diverged run) before any further step runs.
        break
    return results

  def _set_learning_rate(self, step: int) -> None:
    if self.cosine is not None:
      self.optimizer.learning_rate.assign(self.cosine(step))

  def _learning_rates(self, step: int, count: int) -> tf.Tensor:
    """The learning rates of steps `step` ... for one loop call, padded to steps_per_loop (one
    shape: the loop function is traced once)."""
    if self.cosine is None:
      current = float(self.optimizer.learning_rate.numpy())
      rates = [current] * self.steps_per_loop
    else:
      rates = [self.cosine(step + i) for i in range(count)]
      rates += [rates[-1]] * (self.steps_per_loop - count)
    return tf.constant(rates, tf.float32)

  def recompute_batch_norm_statistics(self) -> precise_bn.RecomputeSummary:
    """Replaces the BatchNorm statistics with the population ones of the current weights."""
    summary = precise_bn.recompute_statistics(
      self.model,
      records.name_read_errors(self._statistics_dataset(), self.train_shards),
      strategy=self.strategy,
      moments_function=self.moments_function,
    )
    logging.info(
      "step %d: BatchNorm statistics recomputed over %d training images (%d batches) in %.1f s",
      self.step,
      summary.images,
      summary.batches,
      summary.seconds,
    )
    return summary

  def evaluate(
    self, on_first_batch: Optional[Callable[[Batch, Dict[str, tf.Tensor]], None]] = None
  ) -> Measurements:
    """Scores the validation set in inference mode (after recomputing precise statistics).

    Args:
      on_first_batch: called with the first batch and its eval results (for pictures).

    Returns:
      Mean losses ("loss/total", "loss/head1", "loss/head2") and each head's metrics
      ("head2/per_image/dsc", "head1/pooled/iou", ...).
    """
    if self.moments_function is not None:
      self.recompute_batch_norm_statistics()
    accumulators = {head: metrics.MetricAccumulator() for head in ("head1", "head2")}
    loss_sums: Dict[str, float] = {}
    count = 0
    for index, batch in enumerate(
      records.name_read_errors(self._valid_dataset(), self.valid_shards)
    ):
      result = self.eval_function({"image": batch["image"], "mask": batch["mask"]})
      batch_size = int(batch["image"].shape[0])
      count += batch_size
      for name, value in result.items():
        if name.startswith("loss/"):
          loss_sums[name] = loss_sums.get(name, 0.0) + float(value) * batch_size
      for head, accumulator in accumulators.items():
        accumulator.update(result[f"counts/{head}"].numpy())
      if index == 0 and on_first_batch is not None:
        on_first_batch(batch, result)
    values = {name: total / max(count, 1) for name, total in loss_sums.items()}
    for head, accumulator in accumulators.items():
      for name, value in accumulator.result().items():
        values[f"{head}/{name}"] = value
    return values
