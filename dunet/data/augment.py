"""Paired image/mask augmentation in TF ops, random only through stateless seeds.

`augment(image, mask, config, seed)` applies, each with its own probability:

  geometric (image and mask together; the mask is only ever moved, never interpolated, so it
  stays exactly {0, 1}):
    horizontal flip, vertical flip, rotation by a multiple of 90 degrees (180 only when the image
    is not square), a small rotation with scaling, a random crop resized back to full size, and an
    elastic deformation (a smooth random displacement field). The last three are composed into
    one sampling grid and applied in one resampling pass: bilinear for the image, nearest for the
    mask, mirrored at the borders.
  photometric (image only):
    brightness, contrast, saturation and hue jitter, grayscale, cutout (rectangles filled with the
    image's mean colour; the mask is unchanged: the object is still there, only hidden).

`random_crop(image, mask, size, seed)` cuts both to one random window (training crops, applied by
the pipeline before `augment`).

The same seed gives the same result every time: in eager mode and tf.data alike (to float
rounding), and inside XLA-compiled functions (which draw different, but equally deterministic,
random numbers from the same seed: XLA implements the stateless generators differently).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Tuple

import tensorflow as tf

from dunet.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities (`p_*`, in [0, 1]) and magnitudes of each augmentation."""

  p_flip_horizontal: float = 0.5
  p_flip_vertical: float = 0.5
  p_rotate90: float = 0.5
  p_affine: float = 0.5
  max_rotation_degrees: float = 15.0  # small rotation: uniform in [-max, max]
  min_scale: float = 0.9  # zoom: uniform in [min_scale, max_scale]; > 1 zooms in
  max_scale: float = 1.2
  p_crop: float = 0.3
  min_crop_fraction: float = 0.7  # crop side as a fraction of the image side, uniform in [f, 1]
  p_elastic: float = 0.2
  elastic_magnitude: float = 0.02  # displacement std as a fraction of the shorter side
  elastic_grid: int = 4  # smoothness: random displacements on a grid of this size
  p_brightness: float = 0.5
  brightness_delta: float = 0.1  # added to [0, 1] values, uniform in [-delta, delta]
  p_contrast: float = 0.5
  min_contrast: float = 0.8
  max_contrast: float = 1.2
  p_saturation: float = 0.3
  min_saturation: float = 0.8
  max_saturation: float = 1.2
  p_hue: float = 0.3
  hue_delta: float = 0.03  # fraction of the hue circle, at most 0.5
  p_grayscale: float = 0.05
  p_cutout: float = 0.0
  cutout_fraction: float = 0.2  # hole side as a fraction of the image side
  cutout_count: int = 1

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name.startswith("p_") and not 0.0 <= value <= 1.0:
        raise ValueError(f"{field.name}={value} must be a probability in [0, 1]")
    checks = [
      (self.max_rotation_degrees >= 0, "max_rotation_degrees must be >= 0"),
      (0 < self.min_scale <= self.max_scale, "need 0 < min_scale <= max_scale"),
      (0 < self.min_crop_fraction <= 1, "min_crop_fraction must be in (0, 1]"),
      (self.elastic_magnitude >= 0, "elastic_magnitude must be >= 0"),
      (self.elastic_grid >= 1, "elastic_grid must be >= 1"),
      (self.brightness_delta >= 0, "brightness_delta must be >= 0"),
      (0 <= self.min_contrast <= self.max_contrast, "need 0 <= min_contrast <= max_contrast"),
      (
        0 <= self.min_saturation <= self.max_saturation,
        "need 0 <= min_saturation <= max_saturation",
      ),
      (0 <= self.hue_delta <= 0.5, "hue_delta must be in [0, 0.5]"),
      (0 < self.cutout_fraction <= 1, "cutout_fraction must be in (0, 1]"),
      (self.cutout_count >= 1, "cutout_count must be >= 1"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"AugmentConfig: {message}")

  @classmethod
  def none(cls) -> "AugmentConfig":
    """Every augmentation off."""
    return cls(
      **{field.name: 0.0 for field in dataclasses.fields(cls) if field.name.startswith("p_")}
    )

  @property
  def enabled(self) -> bool:
    return any(
      getattr(self, field.name) > 0
      for field in dataclasses.fields(self)
      if field.name.startswith("p_")
    )


_NUM_SEEDS = 16
# Folded into an example's seed for its crop window: `augment` splits the same seed into its own
# seeds, so cropping leaves every augmentation's draws as they are.
_CROP_STREAM = 0x63726F70  # "crop"


def random_crop(
  image: tf.Tensor, mask: tf.Tensor, size: Sequence[int], seed: tf.Tensor
) -> Tuple[tf.Tensor, tf.Tensor]:
  """The same random window of an image and its mask (a window inside the picture, never
  padded; every position equally likely).

  Args:
    image: [H, W, ...], any type.
    mask: [H, W, ...], any type (only sliced: values are kept exactly).
    size: (crop height, crop width), at most (H, W).
    seed: a stateless seed, int32/int64 [2] (the example's augmentation seed).

  Returns:
    (image [crop height, crop width, ...], mask [crop height, crop width, ...]), types kept.

  Raises:
    ConfigError: a window larger than a statically known image size.
  """
  crop_height, crop_width = (int(value) for value in size)
  image, mask = tf.convert_to_tensor(image), tf.convert_to_tensor(mask)
  known = image.shape[:2]
  if (known[0] is not None and crop_height > known[0]) or (
    known[1] is not None and crop_width > known[1]
  ):
    raise ConfigError(f"a {crop_height}x{crop_width} crop is larger than the {known} image")
  shape = tf.shape(image)
  crop_seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), _CROP_STREAM)
  seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(crop_seed, 2))
  top = tf.random.stateless_uniform(
    [], seed_y, minval=0, maxval=shape[0] - crop_height + 1, dtype=tf.int32
  )
  left = tf.random.stateless_uniform(
    [], seed_x, minval=0, maxval=shape[1] - crop_width + 1, dtype=tf.int32
  )

  def cut(tensor):
    # A slice of static size at a computed start: a dynamic slice that XLA compiles, with the
    # window's shape known (strided slicing with computed bounds is not).
    rest = [-1 if size is None else size for size in tensor.shape[2:]]
    begin = tf.stack([top, left] + [0] * len(rest))
    window = tf.slice(tensor, begin, [crop_height, crop_width, *rest])
    return tf.ensure_shape(window, [crop_height, crop_width, *tensor.shape[2:]])

  return cut(image), cut(mask)


def augment(
  image: tf.Tensor, mask: tf.Tensor, config: AugmentConfig, seed: tf.Tensor
) -> Tuple[tf.Tensor, tf.Tensor]:
  """Augments one image and its mask alike.

  Args:
    image: [H, W, 3] RGB, uint8, or float with values in [0, 255].
    mask: [H, W, 1] or [H, W], values {0, 1}, any numeric type.
    config: what to apply and how strongly.
    seed: a stateless seed, int32/int64 [2].

  Returns:
    (image float32 [H, W, 3] in [0, 255], mask float32 [H, W, 1] in {0, 1}).
  """
  image = tf.cast(image, tf.float32) / 255.0
  mask = tf.cast(mask, tf.float32)
  if mask.shape.rank == 2:
    mask = mask[:, :, None]
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), _NUM_SEEDS)
  image, mask = _geometric(image, mask, config, seeds[:8])
  image = _photometric(image, config, seeds[8:])
  return image * 255.0, mask


def _chance(probability: float, seed: tf.Tensor) -> tf.Tensor:
  return tf.random.stateless_uniform([], seed=seed) < probability


def _maybe(probability: float, seed: tf.Tensor, function, *tensors):
  """`function(*tensors)` with the given probability (skipped entirely at 0, forced at 1)."""
  if probability <= 0:
    return tensors if len(tensors) > 1 else tensors[0]
  if probability >= 1:
    return function(*tensors)
  return tf.cond(
    _chance(probability, seed),
    lambda: function(*tensors),
    lambda: tensors if len(tensors) > 1 else tensors[0],
  )


# ------------------------------------------------------------------------------------------------
# Geometric
# ------------------------------------------------------------------------------------------------


def _geometric(image, mask, config: AugmentConfig, seeds):
  image, mask = _maybe(
    config.p_flip_horizontal, seeds[0], lambda i, m: (i[:, ::-1], m[:, ::-1]), image, mask
  )
  image, mask = _maybe(
    config.p_flip_vertical, seeds[1], lambda i, m: (i[::-1], m[::-1]), image, mask
  )
  if config.p_rotate90 > 0:
    image, mask = _rotate90(image, mask, config.p_rotate90, seeds[2])
  if config.p_affine > 0 or config.p_crop > 0 or config.p_elastic > 0:
    image, mask = _warp(image, mask, config, seeds[3:8])
  return image, mask


def _rotate90(image, mask, probability: float, seed):
  decision_seed, k_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  square = image.shape[0] is not None and image.shape[0] == image.shape[1]
  if square:  # a quarter turn keeps the shape only for square images
    k = tf.random.stateless_uniform([], k_seed, minval=1, maxval=4, dtype=tf.int32)
  else:
    k = tf.constant(2)
  k = tf.where(_chance(probability, decision_seed), k, 0)
  # rot90 with a tensor k forgets the static shape; it is unchanged (square, or half turns).
  return (
    tf.ensure_shape(tf.image.rot90(image, k), image.shape),
    tf.ensure_shape(tf.image.rot90(mask, k), mask.shape),
  )


def _warp(image, mask, config: AugmentConfig, seeds):
  """Rotation+scale, crop and elastic deformation as one inverse map, one resampling pass."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)

  # Inverse map (output pixel -> input pixel) in coordinates centred on the image:
  #   input = linear @ (output + displacement(output)) + offset.
  use_affine = _chance(config.p_affine, seeds[0]) if config.p_affine > 0 else tf.constant(False)
  angle = tf.random.stateless_uniform(
    [], tf.random.experimental.stateless_fold_in(seeds[0], 1), -1.0, 1.0
  ) * (config.max_rotation_degrees * math.pi / 180)
  scale = tf.random.stateless_uniform(
    [], tf.random.experimental.stateless_fold_in(seeds[0], 2), config.min_scale, config.max_scale
  )
  angle = tf.where(use_affine, angle, 0.0)
  scale = tf.where(use_affine, scale, 1.0)

  use_crop = _chance(config.p_crop, seeds[1]) if config.p_crop > 0 else tf.constant(False)
  fraction = tf.random.stateless_uniform(
    [], tf.random.experimental.stateless_fold_in(seeds[1], 1), config.min_crop_fraction, 1.0
  )
  fraction = tf.where(use_crop, fraction, 1.0)
  # Crop centre: anywhere that keeps the window inside the (rotated, scaled) image.
  centre = tf.random.stateless_uniform(
    [2], tf.random.experimental.stateless_fold_in(seeds[1], 2), -1.0, 1.0
  )
  centre = centre * (1.0 - fraction) * tf.stack([h, w]) / 2.0

  use_elastic = _chance(config.p_elastic, seeds[2]) if config.p_elastic > 0 else tf.constant(False)

  def resample():
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    ys = tf.range(h) - (h - 1.0) / 2.0
    xs = tf.range(w) - (w - 1.0) / 2.0
    grid_y, grid_x = tf.meshgrid(ys, xs, indexing="ij")
    if config.p_elastic > 0:
      displacement = _elastic_displacement(height, width, config, seeds[3])
      displacement = tf.where(use_elastic, displacement, 0.0)
      grid_y, grid_x = grid_y + displacement[..., 0], grid_x + displacement[..., 1]
    # Crop (scale by `fraction` about its centre), then undo the rotation and scale.
    crop_y, crop_x = grid_y * fraction + centre[0], grid_x * fraction + centre[1]
    source_y = cos * crop_y - sin * crop_x + (h - 1.0) / 2.0
    source_x = sin * crop_y + cos * crop_x + (w - 1.0) / 2.0
    return _sample(image, mask, source_y, source_x)

  return tf.cond(use_affine | use_crop | use_elastic, resample, lambda: (image, mask))


def _elastic_displacement(height, width, config: AugmentConfig, seed):
  """A smooth random field [H, W, 2] in pixels, with standard deviation `elastic_magnitude`.

  Gaussian coefficients on a (grid+1)^2 lattice, interpolated with Gaussian bumps one lattice
  spacing wide (separable, two matrix products: fast, and compilable by XLA, unlike bicubic
  resizing). Each row of the interpolation matrices has unit norm, so every pixel's displacement
  has unit variance before scaling.
  """
  grid = config.elastic_grid + 1
  coarse = tf.random.stateless_normal([grid, grid, 2], seed)
  magnitude = config.elastic_magnitude * tf.cast(tf.minimum(height, width), tf.float32)
  rows = _bump_matrix(height, grid)
  columns = _bump_matrix(width, grid)
  return tf.einsum("ij,jkc,lk->ilc", rows, coarse, columns) * magnitude


def _bump_matrix(size, grid: int):
  """[size, grid]: Gaussian bumps centred on `grid` evenly spaced points, rows of unit norm."""
  positions = tf.cast(tf.range(size), tf.float32)
  spacing = tf.maximum(tf.cast(size - 1, tf.float32), 1.0) / (grid - 1)
  centres = tf.range(grid, dtype=tf.float32) * spacing
  bumps = tf.exp(-0.5 * tf.square((positions[:, None] - centres[None, :]) / spacing))
  return bumps / tf.norm(bumps, axis=1, keepdims=True)


def _reflect(index, size):
  """Mirror integer indices into [0, size): ... 1 0 | 0 1 ... size-1 | size-1 ..."""
  period = 2 * size
  index = tf.math.floormod(index, period)
  return tf.where(index >= size, period - 1 - index, index)


def _sample(image, mask, source_y, source_x):
  """Bilinear image and nearest mask at (source_y, source_x), mirrored outside the image."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  flat_image = tf.reshape(image, [-1, 3])
  flat_mask = tf.reshape(mask, [-1])

  def gather(values, y, x):
    return tf.gather(values, _reflect(y, height) * width + _reflect(x, width))

  y0, x0 = tf.floor(source_y), tf.floor(source_x)
  wy, wx = (source_y - y0)[..., None], (source_x - x0)[..., None]
  y0, x0 = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
  top = gather(flat_image, y0, x0) * (1 - wx) + gather(flat_image, y0, x0 + 1) * wx
  bottom = gather(flat_image, y0 + 1, x0) * (1 - wx) + gather(flat_image, y0 + 1, x0 + 1) * wx
  warped_image = top * (1 - wy) + bottom * wy
  nearest_y = tf.cast(tf.round(source_y), tf.int32)
  nearest_x = tf.cast(tf.round(source_x), tf.int32)
  warped_mask = gather(flat_mask, nearest_y, nearest_x)[..., None]
  return (tf.ensure_shape(warped_image, image.shape), tf.ensure_shape(warped_mask, mask.shape))


# ------------------------------------------------------------------------------------------------
# Photometric (image only, values in [0, 1])
# ------------------------------------------------------------------------------------------------


def _photometric(image, config: AugmentConfig, seeds):
  def clip(x):
    return tf.clip_by_value(x, 0.0, 1.0)

  image = _maybe(
    config.p_brightness,
    seeds[0],
    lambda x: clip(
      tf.image.stateless_random_brightness(x, config.brightness_delta, _sub(seeds[0]))
    ),
    image,
  )
  image = _maybe(
    config.p_contrast,
    seeds[1],
    lambda x: clip(
      tf.image.stateless_random_contrast(
        x, config.min_contrast, config.max_contrast, _sub(seeds[1])
      )
    ),
    image,
  )
  image = _maybe(
    config.p_saturation,
    seeds[2],
    lambda x: clip(
      tf.image.stateless_random_saturation(
        x, config.min_saturation, config.max_saturation, _sub(seeds[2])
      )
    ),
    image,
  )
  image = _maybe(
    config.p_hue,
    seeds[3],
    lambda x: clip(tf.image.stateless_random_hue(x, config.hue_delta, _sub(seeds[3]))),
    image,
  )
  image = _maybe(
    config.p_grayscale, seeds[4], lambda x: tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3]), image
  )
  image = _maybe(config.p_cutout, seeds[5], lambda x: _cutout(x, config, _sub(seeds[5])), image)
  return image


def _sub(seed):
  """A second seed from a decision seed, so the decision and the magnitude are independent."""
  return tf.random.experimental.stateless_fold_in(seed, 1)


def _cutout(image, config: AugmentConfig, seed):
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  centres = tf.random.stateless_uniform([config.cutout_count, 2], seed) * tf.stack([h, w])
  half = tf.stack([h, w]) * (config.cutout_fraction / 2.0)
  ys = tf.range(h)[None, :, None]
  xs = tf.range(w)[None, None, :]
  inside = (tf.abs(ys - centres[:, 0, None, None]) < half[0]) & (
    tf.abs(xs - centres[:, 1, None, None]) < half[1]
  )
  hole = tf.reduce_any(inside, axis=0)[..., None]
  mean_colour = tf.reduce_mean(image, axis=[0, 1], keepdims=True)
  return tf.where(hole, mean_colour, image)
