"""dunet/config.py: TrainConfig from flags, through JSON and flags.txt, and its validation."""

import dataclasses
import json

from absl import flags
from absl.testing import flagsaver
import pytest

from dunet import cli
from dunet import config as config_lib
from dunet import train
from dunet.config import TrainConfig
from dunet.data import flags as data_flags
from dunet.data.augment import AugmentConfig
from dunet.errors import ConfigError

FLAGS = flags.FLAGS


@pytest.fixture
def parse():
  """Parses dunet.train's flags from an argv; puts the flags back afterwards."""
  with flagsaver.flagsaver():

    def parse_argv(*argv):
      FLAGS.unparse_flags()
      FLAGS(["dunet.train", *argv])
      return FLAGS

    yield parse_argv
  FLAGS.unparse_flags()


def test_flag_defaults_are_the_config_defaults(parse):
  assert train.config_from_flags(parse()) == TrainConfig()


def test_every_setting_has_its_flag():
  for name in config_lib.setting_sections():
    assert name in FLAGS, name
  for field in dataclasses.fields(AugmentConfig):
    assert data_flags.AUGMENT_FLAG_PREFIX + field.name in FLAGS, field.name


def test_flags_to_config_to_json_and_back(parse):
  config = train.config_from_flags(
    parse(
      "--data_dir=/data/cvc",
      "--batch_size=8",
      "--head_weights=0.5,2",
      "--aug_p_crop=0.7",
      "--precision=mixed_float16",
      "--lr_schedule=plateau",
      "--profile_steps=3,4",
      "--keep_checkpoints=5",
      "--seed=3",
      "--noallow_changed_raw_data",
    )
  )
  assert config.data.data_dir == "/data/cvc" and config.optimization.batch_size == 8
  assert config.optimization.head_weights == (0.5, 2.0)
  assert config.data.augment == AugmentConfig(p_crop=0.7)
  assert (config.runtime.precision, config.logging.profile_steps, config.seed) == (
    "mixed_float16",
    "3,4",
    3,
  )
  config.validate()
  assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  assert train.config_from_flags(parse("--data_dir=/d", "--noaugment")).data.augment == (
    AugmentConfig.none()
  )


def test_flags_txt_replays_the_same_config(parse, tmp_path):
  config = train.config_from_flags(
    parse(
      "--data_dir=/data/cvc",
      "--workdir=runs/x",
      "--batch_size=4",
      "--head_weights=1,0.5",
      "--aug_p_hue=0.1",
      "--epochs=7",
    )
  )
  flagfile = tmp_path / "flags.txt"
  flagfile.write_text(cli.dunet_flags_string(FLAGS))
  assert "--batch_size=4" in flagfile.read_text().splitlines()
  assert train.config_from_flags(parse(f"--flagfile={flagfile}")) == config


def test_from_dict_fills_defaults_and_rejects_unknown_settings():
  assert TrainConfig.from_dict({"optimization": {"batch_size": 2}}) == TrainConfig().updated(
    batch_size=2
  )
  with pytest.raises(ConfigError, match="unknown settings in optimization: batchsize"):
    TrainConfig.from_dict({"optimization": {"batchsize": 2}})
  with pytest.raises(ConfigError, match="data.augment: .*p_crop=2"):
    TrainConfig.from_dict({"data": {"augment": {"p_crop": 2}}})


def test_updated_finds_each_setting_by_name():
  config = TrainConfig().updated(batch_size=3, precision="float32", seed=1, data_dir="d")
  assert (
    config.optimization.batch_size,
    config.runtime.precision,
    config.seed,
    config.data.data_dir,
  ) == (3, "float32", 1, "d")
  with pytest.raises(ConfigError, match="unknown training setting 'batchsize'"):
    TrainConfig().updated(batchsize=3)


@pytest.mark.parametrize(
  "settings,message",
  [
    (dict(data_dir=None), "--data_dir is required"),
    (
      dict(batch_size=0),
      "--batch_size must be positive, got 0 "
      r"\(TrainConfig.optimization.batch_size\)",
    ),
    (dict(epochs=-1), "--epochs must be positive"),
    (dict(learning_rate=0.0), "--learning_rate must be positive"),
    (dict(height=40), "--height must be divisible by 16"),
    (dict(width=24), "--width must be divisible by 16"),
    (dict(head_weights=(1.0,)), "--head_weights must be two non-negative numbers"),
    (dict(head_weights=(0.0, 0.0)), "not both zero"),
    (dict(loss="focal"), "--loss must be one of bce, bce_dice, dice"),
    (dict(profile_steps="5,2"), "--profile_steps must be 'START,STOP'"),
    (
      dict(init_checkpoint="/a", vgg19_weights="/b"),
      "--init_checkpoint already holds network 1's encoder",
    ),
    (dict(plateau_factor=1.5), "--plateau_factor must be in"),
    (dict(log_every_steps=0), "--log_every_steps must be at least 1"),
    (dict(strategy="tpu"), "--strategy must be one of"),
    (dict(fold=-2), r"--fold must be a fold number >= 0 \(-1: no fold\), got -2"),
    (dict(crop_height=40), r"--crop_height must be divisible by 16 .* \(TrainConfig.data"),
    (dict(crop_width=-16), "--crop_width must be divisible by 16"),
    (dict(demo_folds=1), "--demo_folds must be at least 2"),
    (dict(demo=True, fold=5), r"--fold=5 is out of range: .* --demo_folds=5 .*--fold=0..4"),
  ],
)
def test_validation_names_the_setting(settings, message):
  config = TrainConfig().updated(data_dir="/data/cvc").updated(**settings)
  with pytest.raises(ConfigError, match=message):
    config.validate()


def test_head_weights_that_are_not_numbers_are_a_config_error(parse):
  with pytest.raises(ConfigError, match="--head_weights must be two numbers"):
    train.config_from_flags(parse("--head_weights=a,b"))


def test_fold_and_crop_flags_reach_the_config_and_round_trip(parse):
  config = train.config_from_flags(
    parse("--data_dir=/d", "--fold=2", "--crop_height=32", "--crop_width=48", "--demo_folds=4")
  )
  assert (config.data.fold, config.data.crop_height, config.data.crop_width) == (2, 32, 48)
  assert config.data.demo_folds == 4
  config.validate()
  assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  default = TrainConfig().data  # no fold, no crop
  assert (default.fold, default.crop_height, default.crop_width) == (-1, 0, 0)
