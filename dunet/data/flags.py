"""absl flags of the input pipeline, for the dunet-train command line only (dunet/train.py
imports it; library code takes a dunet.config.DataConfig): data folder, preprocessing, shuffling
and each augmentation."""

from __future__ import annotations

import dataclasses

from absl import flags

from dunet.data import pipeline, preprocess
from dunet.data.augment import AugmentConfig

AUGMENT_FLAG_PREFIX = "aug_"

_AUGMENT_HELP = {
  "p_flip_horizontal": "Probability of a horizontal flip.",
  "p_flip_vertical": "Probability of a vertical flip.",
  "p_rotate90": "Probability of a rotation by 90, 180 or 270 degrees (180 only for non-square "
  "images).",
  "p_affine": "Probability of a small rotation with scaling (cropped back to size, mirrored at "
  "the borders).",
  "max_rotation_degrees": "Largest small rotation, degrees (uniform in [-max, max]).",
  "min_scale": "Smallest scale of the rotation+scale augmentation (< 1 zooms out).",
  "max_scale": "Largest scale of the rotation+scale augmentation (> 1 zooms in).",
  "p_crop": "Probability of a random crop resized back to full size.",
  "min_crop_fraction": "Smallest crop side as a fraction of the image side.",
  "p_elastic": "Probability of an elastic deformation.",
  "elastic_magnitude": "Elastic displacement standard deviation, as a fraction of the shorter "
  "image side.",
  "elastic_grid": "Elastic smoothness: random displacements on a grid of this many cells, "
  "bicubically interpolated (fewer = smoother).",
  "p_brightness": "Probability of a brightness change.",
  "brightness_delta": "Largest brightness change, on the [0, 1] scale.",
  "p_contrast": "Probability of a contrast change.",
  "min_contrast": "Smallest contrast factor.",
  "max_contrast": "Largest contrast factor.",
  "p_saturation": "Probability of a saturation change.",
  "min_saturation": "Smallest saturation factor.",
  "max_saturation": "Largest saturation factor.",
  "p_hue": "Probability of a hue shift.",
  "hue_delta": "Largest hue shift, as a fraction of the colour circle (at most 0.5).",
  "p_grayscale": "Probability of turning the image gray.",
  "p_cutout": "Probability of cutout (rectangles filled with the mean colour; the mask is kept).",
  "cutout_fraction": "Cutout rectangle side as a fraction of the image side.",
  "cutout_count": "Cutout rectangles per image.",
}


def define_data_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the data flags; later calls in the same process do nothing.

  Flags: --data_dir, --fold, --crop_height, --crop_width, --preprocessing, --shuffle_buffer,
  --augment (master switch) and one --aug_<field> per `AugmentConfig` field (probabilities p_*
  and magnitudes).
  """
  if "data_dir" in flag_values:
    return
  flags.DEFINE_string(
    "data_dir",
    None,
    "A folder prepared by dunet-prepare (TFRecords, "
    "split.json, summary.json). With --demo: where the demo data is generated "
    "(default data/demo).",
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    "fold",
    -1,
    "Cross-validation: with --data_dir prepared by dunet-prepare --folds=K, train on the "
    "other K-1 folds and validate on fold k (0..K-1). With --demo: the demo data prepared in "
    "--demo_folds folds. -1: no folds.",
    lower_bound=-1,
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    "crop_height",
    0,
    "Train on random crops of this height (divisible by 16, at most the prepared height), cut "
    "before augmenting; the run's model input size (config.json) becomes the crop. Validation "
    "still scores whole images. 0: the prepared height.",
    lower_bound=0,
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    "crop_width",
    0,
    "Random crop width, as --crop_height (0: the prepared width).",
    lower_bound=0,
    flag_values=flag_values,
  )
  flags.DEFINE_enum(
    "preprocessing",
    "standardize",
    list(preprocess.PREPROCESSING),
    "Network input: standardize = each image moved to mean 0, deviation 1 "
    "(dunet's recipe); reference = the authors' code (BGR, per-image median "
    "moved to 127, / 255); unit = RGB / 255; caffe = BGR minus the ImageNet "
    "means (use with ImageNet VGG19 weights).",
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    "shuffle_buffer",
    pipeline.DEFAULT_SHUFFLE_BUFFER,
    "Training examples in the shuffle buffer (shard files are shuffled too).",
    lower_bound=1,
    flag_values=flag_values,
  )
  flags.DEFINE_bool(
    "augment",
    True,
    "Augment training images on the fly (the --aug_* flags "
    "say how); --noaugment turns every augmentation off.",
    flag_values=flag_values,
  )
  defaults = AugmentConfig()
  for field in dataclasses.fields(AugmentConfig):
    name, default = AUGMENT_FLAG_PREFIX + field.name, getattr(defaults, field.name)
    help_text = _AUGMENT_HELP[field.name]
    if isinstance(default, int) and not isinstance(default, bool):
      flags.DEFINE_integer(name, default, help_text, lower_bound=1, flag_values=flag_values)
    elif field.name.startswith("p_"):
      flags.DEFINE_float(
        name, default, help_text, lower_bound=0.0, upper_bound=1.0, flag_values=flag_values
      )
    else:
      flags.DEFINE_float(name, default, help_text, flag_values=flag_values)


def augment_config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> AugmentConfig:
  """The `AugmentConfig` the flags describe (all off with --noaugment)."""
  if not flag_values["augment"].value:
    return AugmentConfig.none()
  return AugmentConfig(
    **{
      field.name: flag_values[AUGMENT_FLAG_PREFIX + field.name].value
      for field in dataclasses.fields(AugmentConfig)
    }
  )
