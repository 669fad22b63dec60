"""Data flags: one per augmentation field, safe to define twice, turned into an AugmentConfig."""

import dataclasses

from absl import flags

from dunet.data import flags as data_flags
from dunet.data.augment import AugmentConfig


def parsed(*argv):
  values = flags.FlagValues()
  data_flags.define_data_flags(values)
  data_flags.define_data_flags(values)  # a second call does nothing
  values(["prog", *argv])
  return values


def test_every_augmentation_field_has_a_documented_flag():
  values = parsed()
  for field in dataclasses.fields(AugmentConfig):
    flag = values[data_flags.AUGMENT_FLAG_PREFIX + field.name]
    assert flag.help and flag.default == field.default
  for name in ("data_dir", "preprocessing", "shuffle_buffer", "augment"):
    assert values[name].help


def test_defaults_give_the_default_config():
  assert data_flags.augment_config_from_flags(parsed()) == AugmentConfig()


def test_flags_set_fields_and_noaugment_turns_all_off():
  values = parsed(
    "--aug_p_crop=0.7",
    "--aug_max_rotation_degrees=5",
    "--preprocessing=unit",
    "--aug_cutout_count=3",
  )
  config = data_flags.augment_config_from_flags(values)
  assert (config.p_crop, config.max_rotation_degrees, config.cutout_count) == (0.7, 5.0, 3)
  assert values.preprocessing == "unit"
  assert data_flags.augment_config_from_flags(parsed("--noaugment")) == AugmentConfig.none()
