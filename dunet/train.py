"""Trains DoubleU-Net: `python -m dunet.train --flagfile=configs/cvc.flags` (or `dunet-train`).

The command line: its flags, the one function that turns them into a `dunet.config.TrainConfig`,
and `main`. The library entry point is `train(config, workdir)`: it checks the inputs, then
hands the run to a Trainer (dunet/trainer.py: model, optimizer, data, steps, validation) and a
Controller (dunet/controller.py: the loop, checkpoints, summaries, schedules). The step itself
(what one optimisation step computes) is in dunet/step.py.
"""

from __future__ import annotations

if __name__ == "__main__":
  # Before TensorFlow is imported: its C++ start-up lines are printed at import.
  from dunet import cli

  cli.silence_startup()

# pylint: disable=wrong-import-position
import os
import signal
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet import cli
from dunet import config as config_lib
from dunet import controller as controller_lib
from dunet import cross_validation
from dunet import distribute
from dunet import fileio
from dunet import losses
from dunet import precise_bn
from dunet import precision
from dunet import trainer as trainer_lib
from dunet.data import flags as data_flags
from dunet.data import folds as folds_lib
from dunet.errors import ConfigError
from dunet.progress import format_duration

PROGRAM = "dunet-train"
TRAIN_CONFIG_FILENAME = "train_config.json"
FLAGS_FILENAME = "flags.txt"

# ================================================================================================
# Flags (defaults: dunet.config's; a test keeps them equal)
# ================================================================================================
FLAGS = flags.FLAGS

flags.DEFINE_string(
  "workdir",
  None,
  "Folder for checkpoints, TensorBoard events, the resolved "
  "flags, the split and the final metrics. Restarting with the same workdir "
  "resumes the run.",
)
flags.DEFINE_bool(
  "demo",
  False,
  "Train on the synthetic demo data set: generated (deterministic) "
  "and prepared into --data_dir on first use (with --fold=k: in --demo_folds folds).",
)
flags.DEFINE_integer("demo_count", 200, "Images in the generated demo data set.")
flags.DEFINE_bool(
  "cross_validate",
  False,
  "K-fold cross-validation of data prepared in folds (dunet-prepare --folds=K, or --demo): "
  "train every fold in turn in WORKDIR/fold_k (finished folds are not trained again), score "
  "each on its held-out fold, and write WORKDIR/cross_validation.{json,md} (mean and std "
  "over folds), oof_per_image.csv and postprocessing.json (chosen on the out-of-fold "
  "predictions, for the folds' ensemble --checkpoint='WORKDIR/fold_*').",
)
flags.DEFINE_integer(
  "demo_folds",
  5,
  "With --demo --fold=k: the demo data is prepared in this many cross-validation folds "
  "(into its own folder beside the plain one).",
  lower_bound=2,
)
flags.DEFINE_integer(
  "height",
  0,
  "Input height for --demo preparation (0: use the prepared data's size). Must be divisible by 16.",
)
flags.DEFINE_integer("width", 0, "Input width, as --height.")
flags.DEFINE_float(
  "batch_norm_momentum",
  0.99,
  "Decay of the BatchNorm moving statistics "
  "(Keras' 0.99 in the reference). With --batch_norm_statistics=moving, short "
  "runs need less: validation then uses the moving statistics.",
)
flags.DEFINE_enum(
  "batch_norm_statistics",
  precise_bn.PRECISE,
  list(precise_bn.STATISTICS_CHOICES),
  "What inference-mode BatchNorm uses at validation and in the saved "
  "checkpoints: precise = before each validation, the population statistics "
  "recomputed for the current weights over --precise_bn_batches training "
  "batches (unaugmented), stored in the checkpoint; moving = the exponential "
  "moving averages of training (the reference; they lag the weights in short "
  'runs: BUILD.md, "Training quality").',
)
flags.DEFINE_integer(
  "precise_bn_batches",
  4,
  "Training batches (of --batch_size) pooled by "
  "--batch_norm_statistics=precise (at most one epoch's worth).",
  lower_bound=1,
)
flags.DEFINE_integer("batch_size", 16, "Global batch size (summed over replicas; the paper: 16).")
flags.DEFINE_integer("epochs", 300, "Training epochs (the paper: 300).")
flags.DEFINE_integer(
  "max_steps", 0, "Stop after this many optimisation steps in total (0: epochs x steps per epoch)."
)
flags.DEFINE_enum(
  "loss",
  "bce_dice",
  sorted(losses.LOSSES),
  "Loss applied to both heads: bce "
  "(the paper's for CVC, MICCAI 2015), dice (ISIC 2018, DSB 2018) or bce_dice "
  "(dunet's recipe).",
)
flags.DEFINE_enum(
  "loss_reduction",
  losses.PER_IMAGE,
  list(losses.REDUCTIONS),
  "How the loss combines heads and images: per_image = each image's loss, "
  "averaged over the global batch, heads summed with --head_weights; "
  "reference = exactly the authors' train.py: one loss over both heads "
  "concatenated and the whole batch (Dice smooth 1e-15, Keras' BCE on "
  "probabilities; across replicas the Dice sums are all-reduced).",
)
flags.DEFINE_list(
  "head_weights",
  ["1", "1"],
  "Deep-supervision weights of head 1 and head 2 (the reference weighs both equally).",
)
flags.DEFINE_enum(
  "optimizer",
  "adam",
  ["adam", "nadam"],
  "Optimizer (the paper: Nadam for CVC-ClinicDB, MICCAI 2015, DSB 2018; Adam for ISIC 2018).",
)
flags.DEFINE_float(
  "learning_rate",
  1e-3,
  "Initial (peak) learning rate (the paper: 1e-5 for "
  "CVC-ClinicDB and MICCAI 2015, 1e-4 for ISIC and DSB 2018).",
)
flags.DEFINE_enum(
  "lr_schedule",
  "cosine",
  ["constant", "cosine", "plateau"],
  "constant; cosine decay over all steps (with --warmup_steps); or reduce on "
  "plateau of the --monitor'ed validation value.",
)
flags.DEFINE_integer(
  "warmup_steps",
  20,
  "Linear warm-up steps for the cosine schedule; at most "
  "a fifth of the run's steps are used (a short smoke run is not all warm-up).",
)
flags.DEFINE_enum(
  "monitor",
  "dsc",
  ["dsc", "loss"],
  "What the plateau schedule and early "
  "stopping watch: head 2's validation DSC (higher is better) or the validation "
  "loss (lower is better; what the reference code's Keras callbacks watched). "
  "The best checkpoint is always the best validation DSC.",
)
flags.DEFINE_float("plateau_factor", 0.1, "Learning-rate factor when the monitored value plateaus.")
flags.DEFINE_integer("plateau_patience", 5, "Validations without improvement before reducing.")
flags.DEFINE_float("min_learning_rate", 1e-5, "Floor of the plateau and cosine schedules.")
flags.DEFINE_integer(
  "early_stopping_patience", 0, "Stop after this many validations without a better DSC (0: never)."
)
flags.DEFINE_enum(
  "precision",
  precision.AUTO,
  [precision.AUTO, *precision.POLICY_NAMES],
  "float32; mixed_float16 (float16 compute, dynamic loss scaling); "
  "mixed_bfloat16; auto: what profiling/results/bench.md measured fastest here "
  "(mixed_bfloat16 on CPUs with bfloat16 instructions, else float32; float32 on "
  "GPUs until mixed_float16 is measured there).",
)
flags.DEFINE_float("initial_loss_scale", 2.0**15, "Dynamic loss scale start (mixed_float16).")
flags.DEFINE_integer(
  "loss_scale_growth_interval", 2000, "Finite steps before the loss scale doubles (mixed_float16)."
)
flags.DEFINE_bool(
  "jit_compile",
  False,
  "Compile each replica's whole training step with XLA. "
  "Pays off on GPUs; slower on the 2-core CPU measured in profiling/. Not "
  "supported with several CPU replicas.",
)
flags.DEFINE_integer(
  "steps_per_loop",
  1,
  "Training steps per compiled call (a loop inside one tf.function, as Orbit runs them): the "
  "host reads measurements back once per call instead of every step. The same numbers as one "
  "step per call; progress, signals and stops are seen between calls. Calls end at log, "
  "checkpoint and epoch boundaries.",
)
flags.DEFINE_enum(
  "strategy",
  "default",
  ["default", "mirrored", "multi_worker"],
  "default: one device; mirrored: all local GPUs (or --cpu_devices logical CPUs); "
  "multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG.",
)
flags.DEFINE_integer(
  "cpu_devices",
  0,
  "Split the CPU into this many logical devices (for "
  "trying --strategy=mirrored without GPUs; 0: leave as is).",
)
flags.DEFINE_integer("seed", 42, "Seed for initialisation, data order and augmentation.")
flags.DEFINE_bool(
  "deterministic",
  False,
  "Enable TF op determinism: two runs with the same seed "
  "give the same losses and weights (slower).",
)
flags.DEFINE_string(
  "vgg19_weights",
  None,
  "Keras' ImageNet VGG19 notop h5 file for network 1's "
  "encoder (vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5). Never "
  "downloaded. Without it the encoder starts from --vgg19_init.",
)
flags.DEFINE_enum(
  "vgg19_init",
  "he_normal",
  ["glorot_uniform", "he_normal"],
  "Initialiser of network 1's VGG19 kernels when no --vgg19_weights are given: "
  "glorot_uniform as Keras' VGG19 (the reference); he_normal keeps the "
  "activations' scale through its 16 ReLU layers (Glorot halves it at each).",
)
flags.DEFINE_string(
  "init_checkpoint",
  None,
  "Start a new run from these model weights: a "
  "training workdir (its best checkpoint), a checkpoint prefix, or a workdir "
  "converted from the authors' Keras model.h5 (dunet-convert-keras). "
  "Only the model is read (not the optimizer); ignored when resuming.",
)
flags.DEFINE_integer("keep_checkpoints", 3, "Latest checkpoints kept (the best is kept apart).")
flags.DEFINE_integer(
  "checkpoint_every_steps", 0, "Also checkpoint every N steps (0: at the end of every epoch only)."
)
flags.DEFINE_integer("eval_every_epochs", 1, "Validate every N epochs.")
flags.DEFINE_float("threshold", 0.5, "Probability threshold for validation metrics.")
flags.DEFINE_integer("log_every_steps", 10, "Scalar summaries and progress every N steps.")
flags.DEFINE_string(
  "profile_steps",
  "",
  "Capture a TensorBoard profiler trace of these steps, "
  "'START,STOP' inclusive (e.g. 20,25), into the workdir's Profile tab.",
)
flags.DEFINE_integer("summary_images", 4, "Validation images shown in TensorBoard overlays.")
flags.DEFINE_bool(
  "allow_changed_raw_data",
  False,
  "Train even though the raw data set changed "
  "since --data_dir was prepared from it (files added, removed or modified: by "
  "default an error naming them). The prepared records are used as they are.",
)
data_flags.define_data_flags()
# Show the input pipeline's flags in --help too, not only in --helpfull.
flags.adopt_module_key_flags(data_flags)

HELP_GROUPS: Sequence[Tuple[str, Sequence[str]]] = (
  ("Run", ("config", "workdir", "data_dir", "demo", "height", "width", "fold", "cross_validate")),
  (
    "Training",
    (
      "batch_size",
      "epochs",
      "max_steps",
      "learning_rate",
      "optimizer",
      "lr_schedule",
      "loss",
      "loss_reduction",
      "head_weights",
      "seed",
      "augment",
      "crop_height",
      "crop_width",
      "preprocessing",
    ),
  ),
  (
    "Model and validation",
    (
      "vgg19_weights",
      "vgg19_init",
      "init_checkpoint",
      "batch_norm_statistics",
      "eval_every_epochs",
      "early_stopping_patience",
    ),
  ),
  (
    "Precision and distribution",
    ("precision", "jit_compile", "steps_per_loop", "strategy", "cpu_devices", "deterministic"),
  ),
  (
    "Checkpoints and logging",
    ("keep_checkpoints", "checkpoint_every_steps", "log_every_steps", "profile_steps", "verbose"),
  ),
)


def _head_weights(values: Sequence[str]) -> Tuple[float, ...]:
  try:
    return tuple(float(value) for value in values)
  except ValueError as error:
    raise ConfigError(f"--head_weights must be two numbers, got {list(values)}") from error


def config_from_flags(flag_values: flags.FlagValues = FLAGS) -> config_lib.TrainConfig:
  """The TrainConfig the parsed flags describe: the one place flags become a config.

  Every setting has the flag of its name (`--aug_*` for the augmentation).

  Raises:
    ConfigError: a flag value no config can hold (head weights that are not numbers, an
      inconsistent augmentation). Other checks: TrainConfig.validate.
  """
  names = config_lib.setting_sections()
  settings = {
    name: flag_values[name].value for name in names if name not in ("augment", "head_weights")
  }
  settings["head_weights"] = _head_weights(flag_values["head_weights"].value)
  try:
    settings["augment"] = data_flags.augment_config_from_flags(flag_values)
  except ValueError as error:  # AugmentConfig's own checks
    raise ConfigError(f"--aug_* flags: {error}") from error
  return config_lib.TrainConfig().updated(**settings)


# ================================================================================================
# Signals
# ================================================================================================
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
    logging.warning(
      "%s received: saving a checkpoint after this step, then stopping (send it "
      "again to abort at once).",
      self.requested,
    )


# ================================================================================================
# The library entry point
# ================================================================================================
def train(
  config: config_lib.TrainConfig, workdir: str, flags_text: Optional[str] = None
) -> Dict[str, object]:
  """Runs (or resumes) training in `workdir`; returns the final validation metrics.

  The inputs are checked before anything is written. SIGINT/SIGTERM stop it cleanly after a
  checkpoint (see `Stop`).

  Args:
    config: the run's settings.
    workdir: checkpoints, summaries, the config, the split and metrics.json go there.
    flags_text: the command line's flags as flagfile lines, stored as WORKDIR/flags.txt
      (`dunet-train --flagfile=WORKDIR/flags.txt` replays the run); None: no flags.txt.

  Returns:
    {"step", "best_valid_dsc", "stopped_by", "valid": the last validation's metrics}, as in
    WORKDIR/metrics.json.

  Raises:
    ConfigError: settings that cannot work (here, or with this data or these replicas).
    DataError: missing, damaged or changed data, naming the file.
    DivergedError: training diverged (nothing of the bad step is saved).
    CheckpointWriteError: the workdir or a checkpoint cannot be written.
    CheckpointReadError: checkpoints exist but none can be read.
    Aborted: a second signal.
  """
  config.validate()
  stop = Stop()
  stop.install()
  try:
    return _train(config, workdir, stop, flags_text)
  finally:
    stop.uninstall()


def _train(
  config: config_lib.TrainConfig, workdir: str, stop: Stop, flags_text: Optional[str]
) -> Dict[str, object]:
  strategy, policy = _set_up_runtime(config)
  chief = distribute.is_chief(strategy)
  data = trainer_lib.check_inputs(config)
  if chief:  # fail before any work, naming the folder; after the inputs, so none is left empty
    checkpoint_lib.check_writable(workdir)
  trainer = trainer_lib.Trainer(config, data, strategy, policy)
  controller = controller_lib.Controller(
    trainer, config, workdir, chief, stop_requested=lambda: stop.requested
  )
  if chief:
    _write_run_files(config, workdir, data, policy.name, flags_text)
  return controller.run()


def _set_up_runtime(
  config: config_lib.TrainConfig,
) -> Tuple[tf.distribute.Strategy, precision.Policy]:
  """Logical CPUs, determinism, the seed, the strategy and the precision policy.

  Raises:
    ConfigError: XLA over several CPU replicas, or a batch the replicas cannot share.
  """
  runtime = config.runtime
  if runtime.cpu_devices:
    distribute.configure_logical_cpus(runtime.cpu_devices)
  if runtime.deterministic:
    tf.config.experimental.enable_op_determinism()
  tf.random.set_seed(config.seed)
  strategy = distribute.make_strategy(runtime.strategy)
  replicas = strategy.num_replicas_in_sync
  if runtime.jit_compile and replicas > 1 and not tf.config.list_physical_devices("GPU"):
    raise ConfigError(
      "--jit_compile with several replicas needs GPUs: XLA cannot place one "
      "step's resources across logical CPU devices (use one replica on CPU)."
    )
  batch_size = config.optimization.batch_size
  if batch_size % replicas:
    raise ConfigError(f"--batch_size={batch_size} is not divisible by the {replicas} replicas")
  policy = precision.Policy(precision.resolve_policy_name(runtime.precision))
  logging.info(
    "%d replica(s), precision %s, jit_compile=%s", replicas, policy.name, runtime.jit_compile
  )
  return strategy, policy


def _write_run_files(
  config: config_lib.TrainConfig,
  workdir: str,
  data: trainer_lib.PreparedData,
  precision_name: str,
  flags_text: Optional[str],
) -> None:
  tf.io.gfile.makedirs(workdir)
  if flags_text is not None:
    fileio.write_text_atomic(os.path.join(workdir, FLAGS_FILENAME), flags_text)
  fileio.write_json_atomic(os.path.join(workdir, TRAIN_CONFIG_FILENAME), config.to_dict())
  # What evaluation and serving read back (dunet/checkpoint.py). "height" x "width" is the model's
  # input size, the window tiled inference uses: the training crop when there is one (then
  # smaller than the "prepared_height" x "prepared_width" of data_dir). "fold" of "folds": the
  # cross-validation fold validated on (-1 of 0: none); its images are split "fold_{fold}".
  checkpoint_lib.write_config(
    workdir,
    {
      "preprocessing": config.data.preprocessing,
      "height": data.input_height,
      "width": data.input_width,
      "prepared_height": data.height,
      "prepared_width": data.width,
      "crop_height": data.crop_height,
      "crop_width": data.crop_width,
      "fold": data.fold,
      "folds": data.folds,
      "valid_split": data.valid_split,
      "data_dir": os.path.abspath(data.data_dir),
      "loss": config.optimization.loss,
      "loss_reduction": config.optimization.loss_reduction,
      "precision": precision_name,
      "batch_norm_statistics": config.validation.batch_norm_statistics,
      "threshold": config.validation.threshold,
      "batch_size": config.optimization.batch_size,
      "seed": config.seed,
    },
  )
  for name in ("split.json", folds_lib.FOLDS_FILE):
    source = os.path.join(data.data_dir, name)
    if tf.io.gfile.exists(source):
      tf.io.gfile.copy(source, os.path.join(workdir, name), overwrite=True)


def format_summary(result: Dict[str, object], workdir: str, seconds: float) -> str:
  """A few lines for people: steps, time, validation DSC, where the results are."""
  stopped = f" (stopped by {result['stopped_by']})" if result.get("stopped_by") else ""
  lines = [f"Trained {result['step']} steps in {format_duration(seconds)}{stopped}."]
  valid = result.get("valid") or {}
  if valid:
    lines.append(
      f"Validation DSC: best {result['best_valid_dsc']:.4f} (head 2); at the end "
      f"head 2 {valid['head2/per_image/dsc']:.4f}, head 1 "
      f"{valid['head1/per_image/dsc']:.4f}."
    )
  best = checkpoint_lib.best_checkpoint(workdir)
  lines.append(f"Best checkpoint: {best or 'none'}")
  lines.append(f"Metrics: {os.path.join(workdir, controller_lib.METRICS_FILENAME)}")
  return "\n".join(lines)


# ================================================================================================
# The command line
# ================================================================================================
def fold_flags_text(flags_text: str, fold: int, workdir: str) -> str:
  """A cross-validation's flags as one fold's flags.txt: `dunet-train --flagfile=it` replays
  that fold alone."""
  dropped = ("--cross_validate", "--nocross_validate", "--workdir=", "--fold=")
  lines = [line for line in flags_text.splitlines() if not line.startswith(dropped)]
  return "\n".join([*lines, f"--fold={fold}", f"--workdir={workdir}"]) + "\n"


def main(argv: List[str]) -> int:
  """Trains as the flags say; returns the exit status (128 + signal number when aborted)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (checkpoints, summaries and metrics go there)")
  if FLAGS.cross_validate and FLAGS["fold"].present:
    raise app.UsageError("--cross_validate trains every fold in turn: leave out --fold")
  config = config_from_flags(FLAGS)
  config.validate()
  started = time.time()
  flags_text = cli.dunet_flags_string(FLAGS)
  try:
    if FLAGS.cross_validate:
      summary = cross_validation.cross_validate(
        config,
        FLAGS.workdir,
        lambda fold_config, workdir: train(
          fold_config, workdir, fold_flags_text(flags_text, fold_config.data.fold, workdir)
        ),
      )
      print(cross_validation.format_markdown(summary))
      print(f"Cross-validation: {os.path.join(FLAGS.workdir, cross_validation.SUMMARY_JSON)}")
      return 0
    result = train(config, FLAGS.workdir, flags_text=flags_text)
  except Aborted as error:  # a KeyboardInterrupt: cli.run would print its traceback
    print(f"{PROGRAM}: error: {error}", file=sys.stderr)
    return 128 + error.signum
  print(format_summary(result, FLAGS.workdir, time.time() - started))
  return 0


def run() -> None:
  """The program (console-script entry point `dunet-train`)."""
  cli.run(
    main,
    program=PROGRAM,
    help_groups=HELP_GROUPS,
    configs=True,
    summary=cli.docstring_summary(__doc__),
  )


if __name__ == "__main__":
  run()
