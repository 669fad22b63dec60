"""TrainConfig: every setting of a training run as one typed, validated value.

Built from flags in one place (`dunet.train.config_from_flags`) and passed down; library code
never reads flags. Each setting has the name of its `dunet-train` flag (the augmentation's are
`--aug_<field>`), so messages name the flag. A config round-trips through a plain dict (JSON):
`TrainConfig.from_dict(config.to_dict()) == config`; training stores it in the workdir.

    config = TrainConfig().updated(data_dir="data/cvc", batch_size=8, epochs=10)
    config.validate()                    # errors.ConfigError naming the setting
    dunet.train.train(config, "runs/cvc")
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, Mapping, Optional, Tuple

from dunet import losses
from dunet import optim
from dunet import precise_bn
from dunet import precision
from dunet import profiler
from dunet.data import pipeline
from dunet.data import preprocess
from dunet.data.augment import AugmentConfig
from dunet.errors import ConfigError
from dunet.models.doubleunet import SIZE_DIVISOR

LR_SCHEDULES = ("constant", "cosine", "plateau")
MONITORS = ("dsc", "loss")
STRATEGIES = ("default", "mirrored", "multi_worker")
VGG19_INITS = ("glorot_uniform", "he_normal")
PRECISIONS = (precision.AUTO, *precision.POLICY_NAMES)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The prepared data, its preprocessing and the training augmentation."""

  data_dir: Optional[str] = None  # None with demo: data/demo
  demo: bool = False
  demo_count: int = 200
  height: int = 0  # 0: the prepared data's size
  width: int = 0
  fold: int = -1  # cross-validation fold k of data prepared in K folds; -1: no fold
  demo_folds: int = 5  # K of the demo data with demo and fold >= 0
  crop_height: int = 0  # random training crops of this height; 0: the prepared height
  crop_width: int = 0  # and width; both 0: no crop
  preprocessing: str = "standardize"
  shuffle_buffer: int = pipeline.DEFAULT_SHUFFLE_BUFFER
  augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
  allow_changed_raw_data: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The network and where its first weights come from."""

  batch_norm_momentum: float = 0.99
  vgg19_init: str = "he_normal"
  vgg19_weights: Optional[str] = None
  init_checkpoint: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class OptimizationConfig:
  """Batch, run length, loss, optimizer and learning-rate schedule."""

  batch_size: int = 16
  epochs: int = 300
  max_steps: int = 0  # 0: epochs x steps per epoch
  loss: str = "bce_dice"
  loss_reduction: str = losses.PER_IMAGE
  head_weights: Tuple[float, ...] = (1.0, 1.0)
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  lr_schedule: str = "cosine"
  warmup_steps: int = 20
  monitor: str = "dsc"
  plateau_factor: float = 0.1
  plateau_patience: int = 5
  min_learning_rate: float = 1e-5
  early_stopping_patience: int = 0  # 0: never


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
  """When and how the validation set is scored."""

  eval_every_epochs: int = 1
  threshold: float = 0.5
  batch_norm_statistics: str = precise_bn.PRECISE
  precise_bn_batches: int = 4


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """Precision, loss scaling, compilation, distribution and determinism."""

  precision: str = precision.AUTO
  initial_loss_scale: float = 2.0**15
  loss_scale_growth_interval: int = 2000
  jit_compile: bool = False
  steps_per_loop: int = 1  # training steps per tf.function call (measurements read once a call)
  strategy: str = "default"
  cpu_devices: int = 0
  deterministic: bool = False


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """How many checkpoints are kept and how often they are written."""

  keep_checkpoints: int = 3
  checkpoint_every_steps: int = 0  # 0: at the end of every epoch only


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  """Progress, TensorBoard summaries and profiler traces."""

  log_every_steps: int = 10
  profile_steps: str = ""  # "START,STOP" inclusive, or empty
  summary_images: int = 4


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run needs besides its workdir."""

  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  optimization: OptimizationConfig = dataclasses.field(default_factory=OptimizationConfig)
  validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
  runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
  seed: int = 42

  def to_dict(self) -> Dict[str, Any]:
    """A plain, JSON-serialisable dict of nested dicts (tuples become lists)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
    """The config `to_dict` gave; missing settings take their defaults.

    Raises:
      ConfigError: an unknown setting, or values that no config can hold.
    """
    return _from_dict(cls, data, "")

  def updated(self, **settings: Any) -> "TrainConfig":
    """A copy with settings changed by name (`batch_size=4`, `augment=AugmentConfig.none()`).

    Setting names are unique across the sections, so no section needs naming.

    Raises:
      ConfigError: an unknown setting name.
    """
    sections = {
      section.name: {}
      for section in dataclasses.fields(self)
      if dataclasses.is_dataclass(getattr(self, section.name))
    }
    top = {}
    owners = setting_sections()
    for name, value in settings.items():
      if name not in owners:
        raise ConfigError(f"unknown training setting {name!r}")
      if owners[name]:
        sections[owners[name]][name] = value
      else:
        top[name] = value
    replaced = {
      name: dataclasses.replace(getattr(self, name), **changes)
      for name, changes in sections.items()
      if changes
    }
    return dataclasses.replace(self, **replaced, **top)

  def validate(self) -> None:
    """Checks every setting and the combinations that cannot work.

    Checks that need the machine or the data (replicas, the prepared size) happen when training
    starts.

    Raises:
      ConfigError: naming the flag (and the config field) at fault.
    """
    _validate_data(self.data)
    _validate_model(self.model)
    _validate_optimization(self.optimization)
    _validate_validation(self.validation)
    _validate_runtime(self.runtime)
    _check(
      self.checkpoint.keep_checkpoints >= 1,
      "checkpoint",
      "keep_checkpoints",
      "must be at least 1",
      self.checkpoint.keep_checkpoints,
    )
    _check(
      self.checkpoint.checkpoint_every_steps >= 0,
      "checkpoint",
      "checkpoint_every_steps",
      "must be >= 0",
      self.checkpoint.checkpoint_every_steps,
    )
    _validate_logging(self.logging)
    # Last: a command line with a bad value and no data folder yet hears of the value first.
    if not self.data.demo and not self.data.data_dir:
      raise ConfigError(
        "--data_dir is required (or --demo for the synthetic data set) (TrainConfig.data.data_dir)"
      )


def setting_sections() -> Dict[str, str]:
  """{setting name: the TrainConfig section holding it ("" for top-level settings)}."""
  owners = {}
  for section in dataclasses.fields(TrainConfig):
    section_type = typing.get_type_hints(TrainConfig)[section.name]
    if dataclasses.is_dataclass(section_type):
      owners.update({field.name: section.name for field in dataclasses.fields(section_type)})
    else:
      owners[section.name] = ""
  return owners


def _from_dict(cls, data: Mapping[str, Any], path: str):
  """An instance of dataclass `cls` from nested dicts (`path`: where, for messages)."""
  where = path or "the training config"
  if not isinstance(data, Mapping):
    raise ConfigError(f"{where} must be a mapping of settings, got {type(data).__name__}")
  hints = typing.get_type_hints(cls)
  known = {field.name for field in dataclasses.fields(cls)}
  unknown = sorted(set(data) - known)
  if unknown:
    raise ConfigError(f"unknown settings in {where}: {', '.join(unknown)}")
  values = {}
  for name, value in data.items():
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
      value = _from_dict(hint, value, f"{path}.{name}" if path else name)
    elif typing.get_origin(hint) is tuple:
      value = tuple(value)
    values[name] = value
  try:
    return cls(**values)
  except (TypeError, ValueError) as error:  # e.g. AugmentConfig's own checks
    raise ConfigError(f"{where}: {error}") from error


def _check(ok: bool, section: str, name: str, problem: str, value: Any) -> None:
  if not ok:
    raise ConfigError(f"--{name} {problem}, got {value!r} (TrainConfig.{section}.{name})")


def _check_choice(section: str, name: str, value: Any, choices) -> None:
  _check(value in choices, section, name, f"must be one of {', '.join(choices)}", value)


def _validate_data(data: DataConfig) -> None:
  for name in ("height", "width"):
    value = getattr(data, name)
    _check(
      value >= 0 and value % SIZE_DIVISOR == 0,
      "data",
      name,
      f"must be divisible by {SIZE_DIVISOR} (0: the prepared data's size)",
      value,
    )
  _check(data.demo_count > 0, "data", "demo_count", "must be positive", data.demo_count)
  _check(data.fold >= -1, "data", "fold", "must be a fold number >= 0 (-1: no fold)", data.fold)
  _check(data.demo_folds >= 2, "data", "demo_folds", "must be at least 2", data.demo_folds)
  if data.demo and data.fold >= data.demo_folds:
    raise ConfigError(
      f"--fold={data.fold} is out of range: the demo data is prepared in --demo_folds="
      f"{data.demo_folds} folds (pass --fold=0..{data.demo_folds - 1}) (TrainConfig.data.fold)"
    )
  for name in ("crop_height", "crop_width"):
    value = getattr(data, name)
    _check(
      value >= 0 and value % SIZE_DIVISOR == 0,
      "data",
      name,
      f"must be divisible by {SIZE_DIVISOR} (0: the prepared data's size)",
      value,
    )
  _check_choice("data", "preprocessing", data.preprocessing, preprocess.PREPROCESSING)
  _check(
    data.shuffle_buffer >= 1, "data", "shuffle_buffer", "must be at least 1", data.shuffle_buffer
  )
  _check(
    isinstance(data.augment, AugmentConfig),
    "data",
    "augment",
    "must be an AugmentConfig",
    data.augment,
  )


def _validate_model(model: ModelConfig) -> None:
  _check(
    0.0 <= model.batch_norm_momentum < 1.0,
    "model",
    "batch_norm_momentum",
    "must be in [0, 1)",
    model.batch_norm_momentum,
  )
  _check_choice("model", "vgg19_init", model.vgg19_init, VGG19_INITS)
  if model.init_checkpoint and model.vgg19_weights:
    raise ConfigError(
      "--init_checkpoint already holds network 1's encoder: leave out "
      "--vgg19_weights (TrainConfig.model)"
    )


def _validate_optimization(config: OptimizationConfig) -> None:
  section = "optimization"
  for name in ("batch_size", "epochs", "learning_rate"):
    _check(getattr(config, name) > 0, section, name, "must be positive", getattr(config, name))
  for name in ("max_steps", "warmup_steps", "min_learning_rate", "early_stopping_patience"):
    _check(getattr(config, name) >= 0, section, name, "must be >= 0", getattr(config, name))
  _check_choice(section, "loss", config.loss, sorted(losses.LOSSES))
  _check_choice(section, "loss_reduction", config.loss_reduction, losses.REDUCTIONS)
  _check_choice(section, "optimizer", config.optimizer, sorted(optim.OPTIMIZERS))
  _check_choice(section, "lr_schedule", config.lr_schedule, LR_SCHEDULES)
  _check_choice(section, "monitor", config.monitor, MONITORS)
  weights = config.head_weights
  _check(
    len(weights) == 2 and min(weights) >= 0 and sum(weights) > 0,
    section,
    "head_weights",
    "must be two non-negative numbers, not both zero",
    list(weights),
  )
  _check(
    0.0 < config.plateau_factor < 1.0,
    section,
    "plateau_factor",
    "must be in (0, 1)",
    config.plateau_factor,
  )
  _check(
    config.plateau_patience >= 1,
    section,
    "plateau_patience",
    "must be at least 1",
    config.plateau_patience,
  )


def _validate_validation(config: ValidationConfig) -> None:
  _check(
    config.eval_every_epochs >= 1,
    "validation",
    "eval_every_epochs",
    "must be at least 1",
    config.eval_every_epochs,
  )
  _check(
    0.0 <= config.threshold <= 1.0, "validation", "threshold", "must be in [0, 1]", config.threshold
  )
  _check_choice(
    "validation",
    "batch_norm_statistics",
    config.batch_norm_statistics,
    precise_bn.STATISTICS_CHOICES,
  )
  _check(
    config.precise_bn_batches >= 1,
    "validation",
    "precise_bn_batches",
    "must be at least 1",
    config.precise_bn_batches,
  )


def _validate_runtime(config: RuntimeConfig) -> None:
  _check_choice("runtime", "precision", config.precision, PRECISIONS)
  _check(
    config.initial_loss_scale > 0,
    "runtime",
    "initial_loss_scale",
    "must be positive",
    config.initial_loss_scale,
  )
  _check(
    config.loss_scale_growth_interval >= 1,
    "runtime",
    "loss_scale_growth_interval",
    "must be at least 1",
    config.loss_scale_growth_interval,
  )
  _check_choice("runtime", "strategy", config.strategy, STRATEGIES)
  _check(config.cpu_devices >= 0, "runtime", "cpu_devices", "must be >= 0", config.cpu_devices)
  _check(
    config.steps_per_loop >= 1,
    "runtime",
    "steps_per_loop",
    "must be at least 1",
    config.steps_per_loop,
  )


def _validate_logging(config: LoggingConfig) -> None:
  _check(
    config.log_every_steps >= 1,
    "logging",
    "log_every_steps",
    "must be at least 1",
    config.log_every_steps,
  )
  _check(
    config.summary_images >= 0, "logging", "summary_images", "must be >= 0", config.summary_images
  )
  try:
    profiler.parse_step_range(config.profile_steps)
  except ValueError as error:
    raise ConfigError(
      f"--profile_steps must be 'START,STOP' with 1 <= START <= STOP, got "
      f"{config.profile_steps!r}: {error} (TrainConfig.logging.profile_steps)"
    ) from error
