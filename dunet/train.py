"""Trains DoubleU-Net: `python -m dunet.train --flagfile=configs/cvc.flags`.

Reads top to bottom: flags, setup, input, model and optimizer, step, checkpoint, eval, loop.
The step itself (what one optimisation step computes) is in dunet/step.py; this file only runs it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Dict, List, Optional

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet import distribute
from dunet import fileio
from dunet import losses
from dunet import metrics
from dunet import optim
from dunet import precise_bn
from dunet import precision
from dunet import profiler
from dunet import runner
from dunet import step as step_lib
from dunet import summaries
from dunet.data import demo as demo_data
from dunet.data import flags as data_flags
from dunet.data import pipeline
from dunet.data import prepare
from dunet.data import preprocess
from dunet.data import records
from dunet.errors import DataError
from dunet.models import DoubleUNet
from dunet.models import vgg19
from dunet.models.doubleunet import SIZE_DIVISOR
from dunet.progress import ProgressLine

# ================================================================================================
# Flags
# ================================================================================================
FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Folder for checkpoints, TensorBoard events, the resolved "
                    "flags, the split and the final metrics. Restarting with the same workdir "
                    "resumes the run.")
flags.DEFINE_bool("demo", False, "Train on the synthetic demo data set: generated (deterministic) "
                  "and prepared into --data_dir on first use.")
flags.DEFINE_integer("demo_count", 200, "Images in the generated demo data set.")
flags.DEFINE_integer("height", 0, "Input height for --demo preparation (0: use the prepared data's "
                     "size). Must be divisible by 16.")
flags.DEFINE_integer("width", 0, "Input width, as --height.")
flags.DEFINE_float("batch_norm_momentum", 0.99, "Decay of the BatchNorm moving statistics "
                   "(Keras' 0.99 in the reference). With --batch_norm_statistics=moving, short "
                   "runs need less: validation then uses the moving statistics.")
flags.DEFINE_enum("batch_norm_statistics", precise_bn.PRECISE, list(precise_bn.STATISTICS_CHOICES),
                  "What inference-mode BatchNorm uses at validation and in the saved "
                  "checkpoints: precise = before each validation, the population statistics "
                  "recomputed for the current weights over --precise_bn_batches training "
                  "batches (unaugmented), stored in the checkpoint; moving = the exponential "
                  "moving averages of training (the reference; they lag the weights in short "
                  "runs: BUILD.md, \"Training quality\").")
flags.DEFINE_integer("precise_bn_batches", 4, "Training batches (of --batch_size) pooled by "
                     "--batch_norm_statistics=precise (at most one epoch's worth).",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 16, "Global batch size (summed over replicas; the paper: 16).")
flags.DEFINE_integer("epochs", 300, "Training epochs (the paper: 300).")
flags.DEFINE_integer("max_steps", 0, "Stop after this many optimisation steps in total "
                     "(0: epochs x steps per epoch).")
flags.DEFINE_enum("loss", "bce_dice", sorted(losses.LOSSES), "Loss applied to both heads: bce "
                  "(the paper's for CVC, MICCAI 2015), dice (ISIC 2018, DSB 2018) or bce_dice "
                  "(dunet's recipe).")
flags.DEFINE_enum("loss_reduction", losses.PER_IMAGE, list(losses.REDUCTIONS),
                  "How the loss combines heads and images: per_image = each image's loss, "
                  "averaged over the global batch, heads summed with --head_weights; "
                  "reference = exactly the authors' train.py: one loss over both heads "
                  "concatenated and the whole batch (Dice smooth 1e-15, Keras' BCE on "
                  "probabilities; across replicas the Dice sums are all-reduced).")
flags.DEFINE_list("head_weights", ["1", "1"], "Deep-supervision weights of head 1 and head 2 "
                  "(the reference weighs both equally).")
flags.DEFINE_enum("optimizer", "adam", ["adam", "nadam"], "Optimizer (the paper: Nadam for "
                  "CVC-ClinicDB, MICCAI 2015, DSB 2018; Adam for ISIC 2018).")
flags.DEFINE_float("learning_rate", 1e-3, "Initial (peak) learning rate (the paper: 1e-5 for "
                   "CVC-ClinicDB and MICCAI 2015, 1e-4 for ISIC and DSB 2018).")
flags.DEFINE_enum("lr_schedule", "cosine", ["constant", "cosine", "plateau"],
                  "constant; cosine decay over all steps (with --warmup_steps); or reduce on "
                  "plateau of the --monitor'ed validation value.")
flags.DEFINE_integer("warmup_steps", 20, "Linear warm-up steps for the cosine schedule; at most "
                     "a fifth of the run's steps are used (a short smoke run is not all warm-up).")
flags.DEFINE_enum("monitor", "dsc", ["dsc", "loss"], "What the plateau schedule and early "
                  "stopping watch: head 2's validation DSC (higher is better) or the validation "
                  "loss (lower is better; what the reference code's Keras callbacks watched). "
                  "The best checkpoint is always the best validation DSC.")
flags.DEFINE_float("plateau_factor", 0.1, "Learning-rate factor when the monitored value "
                   "plateaus.")
flags.DEFINE_integer("plateau_patience", 5, "Validations without improvement before reducing.")
flags.DEFINE_float("min_learning_rate", 1e-5, "Floor of the plateau and cosine schedules.")
flags.DEFINE_integer("early_stopping_patience", 0, "Stop after this many validations without a "
                     "better DSC (0: never).")
flags.DEFINE_enum("precision", precision.AUTO, [precision.AUTO, *precision.POLICY_NAMES],
                  "float32; mixed_float16 (float16 compute, dynamic loss scaling); "
                  "mixed_bfloat16; auto: what profiling/results/bench.md measured fastest here "
                  "(mixed_bfloat16 on CPUs with bfloat16 instructions, else float32; float32 on "
                  "GPUs until mixed_float16 is measured there).")
flags.DEFINE_float("initial_loss_scale", 2.0**15, "Dynamic loss scale start (mixed_float16).")
flags.DEFINE_integer("loss_scale_growth_interval", 2000, "Finite steps before the loss scale "
                     "doubles (mixed_float16).")
flags.DEFINE_bool("jit_compile", False, "Compile each replica's whole training step with XLA. "
                  "Pays off on GPUs; slower on the 2-core CPU measured in profiling/. Not "
                  "supported with several CPU replicas.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                  "default: one device; mirrored: all local GPUs (or --cpu_devices logical CPUs); "
                  "multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG.")
flags.DEFINE_integer("cpu_devices", 0, "Split the CPU into this many logical devices (for "
                     "trying --strategy=mirrored without GPUs; 0: leave as is).")
flags.DEFINE_integer("seed", 42, "Seed for initialisation, data order and augmentation.")
flags.DEFINE_bool("deterministic", False, "Enable TF op determinism: two runs with the same seed "
                  "give the same losses and weights (slower).")
flags.DEFINE_string("vgg19_weights", None, "Keras' ImageNet VGG19 notop h5 file for network 1's "
                    "encoder (vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5). Never "
                    "downloaded. Without it the encoder starts from --vgg19_init.")
flags.DEFINE_enum("vgg19_init", "he_normal", ["glorot_uniform", "he_normal"],
                  "Initialiser of network 1's VGG19 kernels when no --vgg19_weights are given: "
                  "glorot_uniform as Keras' VGG19 (the reference); he_normal keeps the "
                  "activations' scale through its 16 ReLU layers (Glorot halves it at each).")
flags.DEFINE_string("init_checkpoint", None, "Start a new run from these model weights: a "
                    "training workdir (its best checkpoint), a checkpoint prefix, or a workdir "
                    "converted from the authors' Keras model.h5 (tools/convert_keras_h5.py). "
                    "Only the model is read (not the optimizer); ignored when resuming.")
flags.DEFINE_integer("keep_checkpoints", 3, "Latest checkpoints kept (the best is kept apart).")
flags.DEFINE_integer("checkpoint_every_steps", 0, "Also checkpoint every N steps (0: at the end "
                     "of every epoch only).")
flags.DEFINE_integer("eval_every_epochs", 1, "Validate every N epochs.")
flags.DEFINE_float("threshold", 0.5, "Probability threshold for validation metrics.")
flags.DEFINE_integer("log_every_steps", 10, "Scalar summaries and progress every N steps.")
flags.DEFINE_string("profile_steps", "", "Capture a TensorBoard profiler trace of these steps, "
                    "'START,STOP' inclusive (e.g. 20,25), into the workdir's Profile tab.")
flags.DEFINE_integer("summary_images", 4, "Validation images shown in TensorBoard overlays.")
flags.DEFINE_bool("allow_changed_raw_data", False, "Train even though the raw data set changed "
                  "since --data_dir was prepared from it (files added, removed or modified: by "
                  "default an error naming them). The prepared records are used as they are.")
data_flags.define_data_flags()
# Show the input pipeline's flags in --help too, not only in --helpfull.
flags.adopt_module_key_flags(data_flags)

flags.register_validator("batch_size", lambda v: v > 0, "--batch_size must be positive")
flags.register_validator("profile_steps", lambda v: _valid_profile_steps(v),
                         "--profile_steps must be 'START,STOP' with 1 <= START <= STOP")


def _valid_profile_steps(text: str) -> bool:
  try:
    profiler.parse_step_range(text)
  except ValueError:
    return False
  return True
flags.register_validator("epochs", lambda v: v > 0, "--epochs must be positive")
flags.register_validator("learning_rate", lambda v: v > 0, "--learning_rate must be positive")
flags.register_validator("height", lambda v: v >= 0 and v % SIZE_DIVISOR == 0,
                         f"--height must be divisible by {SIZE_DIVISOR}")
flags.register_validator("width", lambda v: v >= 0 and v % SIZE_DIVISOR == 0,
                         f"--width must be divisible by {SIZE_DIVISOR}")


def _head_weights() -> List[float]:
  try:
    weights = [float(w) for w in FLAGS.head_weights]
  except ValueError as error:
    raise app.UsageError(f"--head_weights must be two numbers, got {FLAGS.head_weights}") from error
  if len(weights) != 2 or min(weights) < 0 or sum(weights) <= 0:
    raise app.UsageError(f"--head_weights must be two non-negative numbers, not both zero; got "
                         f"{FLAGS.head_weights}")
  return weights


class Aborted(KeyboardInterrupt):
  """A second SIGINT/SIGTERM: stop at once, without a final checkpoint."""

  def __init__(self, signal_name: str, signum: int):
    super().__init__(f"{signal_name} received twice: aborted without saving a checkpoint")
    self.signum = signum


class Stop:
  """SIGINT/SIGTERM set a flag; the loop checkpoints and exits after the current step.

  A second signal raises `Aborted` at once. Checkpoint writes are crash-safe
  (dunet/checkpoint.py), so aborting in the middle of one leaves the previous checkpoint listed.
  """

  _SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.requested: Optional[str] = None
    self._previous: Dict[int, object] = {}

  def install(self) -> None:
    for signum in self._SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)

  def uninstall(self) -> None:
    """Puts the previous handlers back (training in a process that goes on, e.g. tests)."""
    for signum, handler in self._previous.items():
      if handler is not None:  # None: a handler not installed from Python, cannot be restored
        signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.requested:
      raise Aborted(name, signum)
    self.requested = name
    logging.warning("%s received: saving a checkpoint after this step, then stopping (send it "
                    "again to abort at once).", self.requested)


def _check_finite(measured: Dict[str, float], step: int, policy: precision.Policy,
                  last_good: Optional[str]) -> None:
  """Stops training (before anything is saved) on a step that went non-finite.

  With float16 the dynamic loss scale skips overflowing steps by design; otherwise a non-finite
  loss or gradient means training diverged. Parameters that overflow are never acceptable.

  Raises:
    FloatingPointError: naming the step and the last good checkpoint.
  """
  problem = None
  if not policy.needs_loss_scaling and not math.isfinite(measured["loss/total"]):
    problem = f"the training loss is {measured['loss/total']}"
  elif not policy.needs_loss_scaling and not measured["update_applied"]:
    problem = f"the gradients are not finite (the loss is {measured['loss/total']:.4g})"
  elif not math.isfinite(measured["norm/parameters"]):
    problem = "the parameters overflowed after the update (their norm is not finite)"
  if problem:
    raise FloatingPointError(
        f"training diverged at step {step}: {problem} (precision {policy.name}). Stopped without "
        f"saving this step; the last good checkpoint is {last_good or 'none (none was saved yet)'}"
        ". Try a lower --learning_rate.")


def train(workdir: str) -> Dict[str, float]:
  """Runs (or resumes) training in `workdir`; returns the final validation metrics.

  SIGINT/SIGTERM stop it cleanly after a checkpoint (see `Stop`).

  Raises:
    FloatingPointError: training diverged (nothing of the bad step is saved).
    dunet.checkpoint.CheckpointWriteError: the workdir or a checkpoint cannot be written.
    dunet.checkpoint.CheckpointReadError: checkpoints exist but none can be read.
    DataError: missing, damaged or changed data, naming the file.
    Aborted: a second signal.
  """
  stop = Stop()
  stop.install()
  try:
    return _train(workdir, stop)
  finally:
    stop.uninstall()


def _train(workdir: str, stop: Stop) -> Dict[str, float]:
  # ==============================================================================================
  # Setup
  # ==============================================================================================
  if FLAGS.cpu_devices:
    distribute.configure_logical_cpus(FLAGS.cpu_devices)
  if FLAGS.deterministic:
    tf.config.experimental.enable_op_determinism()
  tf.random.set_seed(FLAGS.seed)
  strategy = distribute.make_strategy(FLAGS.strategy)
  replicas = strategy.num_replicas_in_sync
  chief = distribute.is_chief(strategy)
  if chief:  # fail before any work, naming the folder
    checkpoint_lib.check_writable(workdir)
  if FLAGS.jit_compile and replicas > 1 and not tf.config.list_physical_devices("GPU"):
    raise app.UsageError("--jit_compile with several replicas needs GPUs: XLA cannot place one "
                         "step's resources across logical CPU devices (use one replica on CPU).")
  if FLAGS.batch_size % replicas:
    raise app.UsageError(f"--batch_size={FLAGS.batch_size} is not divisible by the "
                         f"{replicas} replicas")
  policy = precision.Policy(precision.resolve_policy_name(FLAGS.precision))
  head_weights = _head_weights()
  loss_fn = losses.make_heads_loss(FLAGS.loss, FLAGS.loss_reduction)
  logging.info("%d replica(s), precision %s, jit_compile=%s", replicas, policy.name,
               FLAGS.jit_compile)

  # ==============================================================================================
  # Input
  # ==============================================================================================
  data_dir = FLAGS.data_dir
  if FLAGS.demo:
    data_dir = demo_data.ensure_demo_data(
        data_dir, count=FLAGS.demo_count, height=FLAGS.height or 128, width=FLAGS.width or 128,
        seed=FLAGS.seed)
  if not tf.io.gfile.exists(os.path.join(data_dir, "summary.json")):
    raise app.UsageError(
        f"no prepared data in --data_dir={data_dir!r}. dunet never downloads data sets: download "
        "the raw data set (see the header of its configs/*.flags file), then prepare it once with "
        f"`python tools/prepare_data.py --raw_dir=RAW_FOLDER --out_dir={data_dir} --height=H "
        "--width=W`; or pass --demo to train on generated demo data.")
  data_info = pipeline.read_data_info(data_dir)
  # Shards still as prepared (their sizes: cheap); damaged records are named when read.
  prepare.verify_shards(data_dir, ("train", "valid"))
  changed = prepare.raw_data_changes(data_dir)
  if changed and not FLAGS.allow_changed_raw_data:
    raise DataError(changed.path, f"{changed.problem}; or pass --allow_changed_raw_data to train "
                    "on the prepared records as they are")
  if changed:
    logging.warning("%s (training anyway: --allow_changed_raw_data)", changed)
  height, width = data_info["height"], data_info["width"]
  if height % SIZE_DIVISOR or width % SIZE_DIVISOR:
    raise app.UsageError(f"{data_dir} was prepared at {height}x{width}; DoubleU-Net needs sizes "
                         f"divisible by {SIZE_DIVISOR}: prepare it again with tools/prepare_data.py")
  if FLAGS.height and (FLAGS.height, FLAGS.width) != (height, width):
    raise app.UsageError(f"--height/--width {FLAGS.height}x{FLAGS.width} differ from the "
                         f"prepared data ({height}x{width} in {data_dir})")
  train_examples = pipeline.count_examples(data_dir, "train")
  steps_per_epoch = train_examples // FLAGS.batch_size
  if steps_per_epoch == 0:
    raise app.UsageError(f"{train_examples} training images are fewer than --batch_size="
                         f"{FLAGS.batch_size}")
  total_steps = FLAGS.epochs * steps_per_epoch
  if FLAGS.max_steps:
    total_steps = min(total_steps, FLAGS.max_steps)
  augment_config = data_flags.augment_config_from_flags(FLAGS)

  def train_dataset(epoch: int) -> tf.distribute.DistributedDataset:
    return strategy.distribute_datasets_from_function(
        lambda context: pipeline.make_train_dataset(
            data_dir, global_batch_size=FLAGS.batch_size, preprocessing=FLAGS.preprocessing,
            augment_config=augment_config, seed=FLAGS.seed, epoch=epoch,
            deterministic=True, input_context=context, shuffle_buffer=FLAGS.shuffle_buffer))

  def valid_dataset() -> tf.data.Dataset:
    return pipeline.make_eval_dataset(data_dir, "valid", batch_size=FLAGS.batch_size,
                                      preprocessing=FLAGS.preprocessing)

  def statistics_dataset() -> tf.distribute.DistributedDataset:
    # Shared between replicas as training shares its batches.
    return strategy.distribute_datasets_from_function(
        lambda context: pipeline.make_statistics_dataset(
            data_dir, global_batch_size=FLAGS.batch_size, batches=FLAGS.precise_bn_batches,
            preprocessing=FLAGS.preprocessing, seed=FLAGS.seed, input_context=context,
            shuffle_buffer=FLAGS.shuffle_buffer))

  # A read error in a shard becomes an error naming it (records.name_read_errors).
  train_shards = pipeline.shard_files(data_dir, "train")
  valid_shards = pipeline.shard_files(data_dir, "valid")

  # ==============================================================================================
  # Model and optimizer
  # ==============================================================================================
  with strategy.scope():
    model = DoubleUNet(compute_dtype=policy.compute_dtype,
                       batch_norm_momentum=FLAGS.batch_norm_momentum,
                       vgg19_kernel_init=FLAGS.vgg19_init)
    optimizer = optim.make_optimizer(FLAGS.optimizer, FLAGS.learning_rate,
                                     model.trainable_variables)
    loss_scale = precision.make_loss_scale(policy, initial_scale=FLAGS.initial_loss_scale,
                                           growth_interval=FLAGS.loss_scale_growth_interval)
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                              aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    best_dsc = tf.Variable(-1.0, dtype=tf.float32, trainable=False, name="best_dsc",
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
  monitor_mode = "max" if FLAGS.monitor == "dsc" else "min"
  plateau = optim.ReduceOnPlateau(factor=FLAGS.plateau_factor, patience=FLAGS.plateau_patience,
                                  min_lr=FLAGS.min_learning_rate, mode=monitor_mode)
  early_stopping = optim.EarlyStopping(patience=FLAGS.early_stopping_patience or 1,
                                       mode=monitor_mode)
  warmup_steps = min(FLAGS.warmup_steps, total_steps // 5)
  if FLAGS.lr_schedule == "cosine" and warmup_steps < FLAGS.warmup_steps:
    logging.info("Warming up over %d of the run's %d steps (--warmup_steps=%d is capped at a "
                 "fifth of the run).", warmup_steps, total_steps, FLAGS.warmup_steps)
  cosine = optim.CosineSchedule(FLAGS.learning_rate, total_steps, warmup_steps=warmup_steps,
                                final_lr=FLAGS.min_learning_rate)

  # ==============================================================================================
  # Step
  # ==============================================================================================
  replica_step = functools.partial(step_lib.train_step, model, optimizer, loss_scale,
                                   loss_fn=loss_fn, head_weights=head_weights,
                                   global_batch_size=FLAGS.batch_size)
  train_function = runner.make_train_function(strategy, replica_step, FLAGS.jit_compile,
                                              global_step)

  eval_function = tf.function(functools.partial(
      step_lib.eval_step, model, loss_fn=loss_fn, head_weights=head_weights,
      threshold=FLAGS.threshold))

  # ==============================================================================================
  # Checkpoint
  # ==============================================================================================
  state = tf.train.Checkpoint(model=model, optimizer=optimizer, loss_scale=loss_scale,
                              global_step=global_step, best_dsc=best_dsc, plateau=plateau,
                              early_stopping=early_stopping)
  # Every worker resumes from the workdir's newest readable checkpoint (only the chief repairs
  # it). Every multi-worker worker also writes (collective ops need all of them); only the chief's
  # copy lands in the workdir. Writes are crash-safe: see dunet/checkpoint.py.
  restored = checkpoint_lib.restore_newest(
      state, os.path.join(workdir, checkpoint_lib.CHECKPOINT_SUBDIR), repair=chief)
  write_dir = workdir if chief else tempfile.mkdtemp(prefix="dunet-worker-")
  latest = checkpoint_lib.Checkpointer(
      state, os.path.join(write_dir, checkpoint_lib.CHECKPOINT_SUBDIR),
      max_to_keep=FLAGS.keep_checkpoints)
  best = checkpoint_lib.Checkpointer(state, os.path.join(write_dir, checkpoint_lib.BEST_SUBDIR),
                                     max_to_keep=1)
  if restored:
    logging.info("Resumed from %s at step %d", restored, int(global_step.numpy()))
    # Killed between writing an improved checkpoint and copying it to best/: copy it now.
    if chief and float(best_dsc.numpy()) > checkpoint_lib.read_scalar(
        checkpoint_lib.best_checkpoint(workdir), "best_dsc", default=-1.0):
      best.adopt(restored)
  else:
    if FLAGS.init_checkpoint:  # (exclusive with --vgg19_weights: main() checks)
      logging.info("Starting from the weights of %s",
                   checkpoint_lib.restore_model(model, FLAGS.init_checkpoint))
    else:
      vgg19.maybe_load_imagenet_weights(model, FLAGS.vgg19_weights)
  if chief:
    _write_run_files(workdir, data_dir, height, width, policy.name)
  train_writer = tf.summary.create_file_writer(os.path.join(workdir, "train")) if chief else None
  valid_writer = tf.summary.create_file_writer(os.path.join(workdir, "valid")) if chief else None
  # Each step is saved at most once (again would only rewrite it), and step 0 never.
  last_saved = [int(global_step.numpy())]

  def save(step: int) -> None:
    if last_saved[0] != step:
      latest.save(step)
      last_saved[0] = step

  # ==============================================================================================
  # Eval
  # ==============================================================================================
  moments_function = (precise_bn.make_moments_function(model, strategy)
                      if FLAGS.batch_norm_statistics == precise_bn.PRECISE else None)

  def recompute_batch_norm_statistics(step: int) -> None:
    summary = precise_bn.recompute_statistics(
        model, records.name_read_errors(statistics_dataset(), train_shards), strategy=strategy,
        moments_function=moments_function)
    logging.info("step %d: BatchNorm statistics recomputed over %d training images (%d "
                 "batches) in %.1f s", step, summary.images, summary.batches, summary.seconds)

  def evaluate(step: int) -> Dict[str, float]:
    accumulators = {head: metrics.MetricAccumulator() for head in ("head1", "head2")}
    loss_sums: Dict[str, float] = {}
    count = 0
    shown = False
    for batch in records.name_read_errors(valid_dataset(), valid_shards):
      model_batch = {"image": batch["image"], "mask": batch["mask"]}
      result = eval_function(model_batch)
      batch_size = int(batch["image"].shape[0])
      count += batch_size
      for name, value in result.items():
        if name.startswith("loss/"):
          loss_sums[name] = loss_sums.get(name, 0.0) + float(value) * batch_size
      for head, accumulator in accumulators.items():
        accumulator.update(result[f"counts/{head}"].numpy())
      if valid_writer is not None and not shown and FLAGS.summary_images:
        shown = True
        _write_overlays(valid_writer, step, batch, result, FLAGS.summary_images)
    values = {name: total / max(count, 1) for name, total in loss_sums.items()}
    for head, accumulator in accumulators.items():
      for name, value in accumulator.result().items():
        values[f"{head}/{name}"] = value
    return values

  # ==============================================================================================
  # Loop
  # ==============================================================================================
  step_profiler = profiler.StepProfiler(
      workdir if chief else write_dir, profiler.parse_step_range(FLAGS.profile_steps))
  step = int(global_step.numpy())
  progress = ProgressLine(total_steps, FLAGS.batch_size, every=FLAGS.log_every_steps,
                          start_step=step)
  valid_metrics: Dict[str, float] = {}
  start_epoch = step // steps_per_epoch
  stopped_early = False
  for epoch in range(start_epoch, FLAGS.epochs):
    if step >= total_steps or stopped_early or stop.requested:
      break
    epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
    # The data order of an epoch depends only on (seed, epoch); skipping the batches already
    # done makes a resumed run see exactly what an uninterrupted one would.
    batches = records.name_read_errors(train_dataset(epoch), train_shards)
    for _ in range(step - epoch * steps_per_epoch):
      next(batches)
    while step < epoch_end and not stop.requested:
      if FLAGS.lr_schedule == "cosine":
        optimizer.learning_rate.assign(cosine(step))
      with step_profiler.step(step + 1):
        measured = {k: float(v) for k, v in train_function(next(batches)).items()}
      step += 1
      _check_finite(measured, step, policy, latest.latest)
      progress.update(step, {"loss": measured["loss/total"]})
      if train_writer is not None and (step % FLAGS.log_every_steps == 0 or step == total_steps):
        measured["images_per_second"] = progress.items_per_second
        summaries.write_scalars(train_writer, step, measured)
      # The epoch's last step is saved after its validation, once (see below).
      if FLAGS.checkpoint_every_steps and step % FLAGS.checkpoint_every_steps == 0 and (
          step < epoch_end):
        save(step)
    if step < epoch_end:  # a signal, in the middle of the epoch
      save(step)
      break
    # End of the epoch (also when a signal came during its last step): validate, then save
    # once, so that a resumed run never finds an epoch's step saved without its validation.
    improved = False
    if (epoch + 1) % FLAGS.eval_every_epochs == 0 or step == total_steps:
      if moments_function is not None:
        recompute_batch_norm_statistics(step)
      valid_metrics = evaluate(step)
      dsc = valid_metrics["head2/per_image/dsc"]
      if valid_writer is not None:
        summaries.write_scalars(valid_writer, step, valid_metrics)
      logging.info("epoch %d step %d validation: %s", epoch + 1, step,
                   summaries.flatten_for_log(
                       {k: v for k, v in valid_metrics.items() if k.startswith("head2/per_image")}))
      monitored = dsc if FLAGS.monitor == "dsc" else valid_metrics["loss/total"]
      if FLAGS.lr_schedule == "plateau":
        optimizer.learning_rate.assign(plateau.update(monitored,
                                                      float(optimizer.learning_rate.numpy())))
      improved = dsc > float(best_dsc.numpy())
      if improved:
        best_dsc.assign(dsc)
      if FLAGS.early_stopping_patience and early_stopping.update(monitored):
        logging.info("Early stopping: no better validation %s for %d validations.", FLAGS.monitor,
                     FLAGS.early_stopping_patience)
        stopped_early = True
    save(step)
    if improved:
      best.adopt(latest.latest)
  progress.close()
  step_profiler.stop()
  if not chief:
    shutil.rmtree(write_dir, ignore_errors=True)
  final = {"step": step, "best_valid_dsc": float(best_dsc.numpy()),
           "stopped_by": stop.requested or ("early_stopping" if stopped_early else None),
           "valid": valid_metrics}
  if chief:
    fileio.write_json_atomic(os.path.join(workdir, "metrics.json"), final)
  return final


def _write_overlays(writer, step, batch, result, count):
  # Pictures come from the eval step's own outputs: calling the model again here (on the chief
  # only) would read the BatchNorm statistics, a collective that the other workers would not join.
  display = preprocess.to_display_uint8(batch["image"][:count], FLAGS.preprocessing).numpy()
  panel = summaries.prediction_panel(display, batch["mask"][:count].numpy(),
                                     result["probability/head1"][:count].numpy(),
                                     result["probability/head2"][:count].numpy())
  summaries.write_images(writer, step, "valid/input|truth|head1|head2", panel, count)


def _write_run_files(workdir: str, data_dir: str, height: int, width: int,
                     precision_name: str) -> None:
  tf.io.gfile.makedirs(workdir)
  with tf.io.gfile.GFile(os.path.join(workdir, "flags.txt"), "w") as handle:
    handle.write(FLAGS.flags_into_string())
  checkpoint_lib.write_config(workdir, {
      "preprocessing": FLAGS.preprocessing, "height": height, "width": width,
      "data_dir": os.path.abspath(data_dir), "loss": FLAGS.loss,
      "loss_reduction": FLAGS.loss_reduction, "precision": precision_name,
      "batch_norm_statistics": FLAGS.batch_norm_statistics, "threshold": FLAGS.threshold,
      "batch_size": FLAGS.batch_size, "seed": FLAGS.seed})
  split = os.path.join(data_dir, "split.json")
  if tf.io.gfile.exists(split):
    tf.io.gfile.copy(split, os.path.join(workdir, "split.json"), overwrite=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (checkpoints, summaries and metrics go there)")
  if not FLAGS.demo and not FLAGS.data_dir:
    raise app.UsageError("--data_dir is required (or --demo for the synthetic data set)")
  if FLAGS.init_checkpoint and FLAGS.vgg19_weights:
    raise app.UsageError("--init_checkpoint already holds network 1's encoder: leave out "
                         "--vgg19_weights")
  started = time.time()
  try:
    result = train(FLAGS.workdir)
  except Aborted as error:
    print(f"error: {error}", file=sys.stderr)
    return 128 + error.signum
  except (FloatingPointError, checkpoint_lib.CheckpointWriteError,
          checkpoint_lib.CheckpointReadError, DataError) as error:
    # Expected failures: the message names the step, file or folder; no traceback needed.
    print(f"error: {error}", file=sys.stderr)
    return 1
  logging.info("Done in %.0f s: %s", time.time() - started, json.dumps(result))
  print(json.dumps(result))
  return 0


def run() -> None:
  """The program (console-script entry point `dunet-train`)."""
  app.run(main)


if __name__ == "__main__":
  run()
