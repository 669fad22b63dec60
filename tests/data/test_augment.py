"""Paired augmentation: masks stay exactly binary and aligned with their images."""

import dataclasses

import cv2
import numpy as np
import pytest
import tensorflow as tf

from dunet.data.augment import AugmentConfig, augment, random_crop
from dunet.errors import ConfigError

NONE = AugmentConfig.none()
GEOMETRIC = {
  "flip_horizontal": dict(p_flip_horizontal=1.0),
  "flip_vertical": dict(p_flip_vertical=1.0),
  "rotate90": dict(p_rotate90=1.0),
  "affine": dict(p_affine=1.0, max_rotation_degrees=30.0, min_scale=0.8, max_scale=1.3),
  "crop": dict(p_crop=1.0, min_crop_fraction=0.5),
  "elastic": dict(p_elastic=1.0, elastic_magnitude=0.04),
  "all": dict(
    p_flip_horizontal=0.5,
    p_flip_vertical=0.5,
    p_rotate90=0.5,
    p_affine=1.0,
    p_crop=1.0,
    p_elastic=1.0,
  ),
}


def only(**probabilities) -> AugmentConfig:
  return dataclasses.replace(NONE, **probabilities)


def shapes_mask(size=(64, 64)) -> np.ndarray:
  mask = np.zeros(size, np.uint8)
  cv2.circle(mask, (20, 24), 11, 1, -1)
  cv2.rectangle(mask, (38, 8), (56, 30), 1, -1)
  cv2.ellipse(mask, (44, 48), (14, 8), 30, 0, 360, 1, -1)
  return mask


def derived_image(mask: np.ndarray) -> np.ndarray:
  """An image whose content is the mask: bright inside, dark outside, a gradient per channel."""
  gradient = np.linspace(0, 30, mask.shape[1], dtype=np.float32)[None, :]
  channels = [mask * 180 + 40 + gradient * k for k in range(3)]
  return np.clip(np.stack(channels, axis=2), 0, 255).astype(np.uint8)


def run(config, seed, image, mask):
  out_image, out_mask = augment(image, mask[..., None], config, tf.constant(seed))
  return out_image.numpy(), out_mask.numpy()[..., 0]


def test_none_is_the_identity():
  mask = shapes_mask()
  image = derived_image(mask)
  out_image, out_mask = run(NONE, [1, 2], image, mask)
  np.testing.assert_array_equal(out_image, image.astype(np.float32))
  np.testing.assert_array_equal(out_mask, mask)
  assert not NONE.enabled and AugmentConfig().enabled


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_geometric_keeps_mask_binary_and_aligned(name):
  mask = shapes_mask()
  image = derived_image(mask)
  for seed in range(6):
    out_image, out_mask = run(only(**GEOMETRIC[name]), [seed, 7], image, mask)
    assert set(np.unique(out_mask)) <= {0.0, 1.0}
    assert out_image.shape == image.shape and out_mask.shape == mask.shape
    # The mask read back from the (bilinearly resampled) image agrees with the (nearest)
    # mask, except on a few pixels at the outline.
    from_image = out_image[..., 0] > 130  # channel 0: 40 outside, 220 inside
    disagree = from_image != out_mask.astype(bool)
    band = cv2.dilate(out_mask, np.ones((3, 3))) != cv2.erode(out_mask, np.ones((3, 3)))
    assert not np.any(disagree & ~band), (name, seed)
    assert disagree.mean() < 0.01, (name, seed)


def test_flips_are_exact():
  mask = shapes_mask()
  image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  out_image, out_mask = run(only(p_flip_horizontal=1.0), [0, 0], image, mask)
  np.testing.assert_array_equal(out_image, image[:, ::-1])
  np.testing.assert_array_equal(out_mask, mask[:, ::-1])
  out_image, out_mask = run(only(p_flip_vertical=1.0), [0, 0], image, mask)
  np.testing.assert_array_equal(out_image, image[::-1])
  np.testing.assert_array_equal(out_mask, mask[::-1])


def test_rotate90_is_exact_and_draws_every_quarter_turn():
  mask = shapes_mask()
  image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  turns = set()
  for seed in range(12):
    out_image, out_mask = run(only(p_rotate90=1.0), [seed, 1], image, mask)
    matches = [k for k in range(4) if np.array_equal(out_image, np.rot90(image, k))]
    assert len(matches) == 1
    np.testing.assert_array_equal(out_mask, np.rot90(mask, matches[0]))
    turns.add(matches[0])
  assert turns == {1, 2, 3}


def test_rotate90_of_a_non_square_image_is_a_half_turn():
  mask = shapes_mask((48, 64))
  image = derived_image(mask)
  out_image, out_mask = run(only(p_rotate90=1.0), [3, 3], image, mask)
  np.testing.assert_array_equal(out_image, image[::-1, ::-1])
  np.testing.assert_array_equal(out_mask, mask[::-1, ::-1])


@pytest.mark.parametrize(
  "name, probabilities",
  [
    ("brightness", dict(p_brightness=1.0, brightness_delta=0.3)),
    ("contrast", dict(p_contrast=1.0, min_contrast=0.5, max_contrast=1.5)),
    ("saturation", dict(p_saturation=1.0, min_saturation=0.3, max_saturation=1.7)),
    ("hue", dict(p_hue=1.0, hue_delta=0.2)),
    ("grayscale", dict(p_grayscale=1.0)),
    ("cutout", dict(p_cutout=1.0, cutout_fraction=0.3, cutout_count=2)),
  ],
)
def test_photometric_changes_the_image_only(name, probabilities):
  mask = shapes_mask()
  image = np.random.default_rng(2).integers(30, 220, (64, 64, 3), dtype=np.uint8)
  out_image, out_mask = run(only(**probabilities), [5, 5], image, mask)
  np.testing.assert_array_equal(out_mask, mask)
  assert not np.allclose(out_image, image)
  assert out_image.min() >= 0 and out_image.max() <= 255
  if name == "grayscale":
    np.testing.assert_allclose(out_image[..., 0], out_image[..., 2], atol=1e-3)
  if name == "cutout":
    changed = np.any(np.abs(out_image - image) > 1e-3, axis=2)
    filled = out_image[changed]
    np.testing.assert_allclose(
      filled, np.broadcast_to(image.reshape(-1, 3).mean(0), filled.shape), atol=1e-3
    )
    assert 0.05 < changed.mean() < 0.25


def _hsv(image):
  """Hue (fraction of the circle), saturation and value of an RGB float image in [0, 1]."""
  hsv = cv2.cvtColor(image.astype(np.float32), cv2.COLOR_RGB2HSV)
  return hsv[..., 0] / 360.0, hsv[..., 1], hsv[..., 2]


def _measured_jitter(name, before, after):
  """The one brightness delta, contrast factor, saturation factor or hue shift (fraction of the
  hue circle) that turned `before` into `after` (both [0, 1]); asserts it is one number."""
  if name == "brightness":
    deltas = after - before
  elif name == "contrast":
    # tf.image.adjust_contrast: (x - channel mean) * factor + channel mean.
    centred = before - before.mean(axis=(0, 1))
    deltas = (after - after.mean(axis=(0, 1)))[np.abs(centred) > 0.05] / centred[
      np.abs(centred) > 0.05
    ]
  else:
    hue_before, saturation_before, value_before = _hsv(before)
    hue_after, saturation_after, value_after = _hsv(after)
    np.testing.assert_allclose(value_after, value_before, atol=1e-5)
    if name == "saturation":
      np.testing.assert_allclose(hue_after, hue_before, atol=1e-4)
      deltas = saturation_after / saturation_before
    else:
      np.testing.assert_allclose(saturation_after, saturation_before, atol=1e-4)
      deltas = (hue_after - hue_before + 0.5) % 1.0 - 0.5
  assert np.ptp(deltas) < 2e-3, f"{name} is not one delta/factor: spread {np.ptp(deltas)}"
  return float(np.median(deltas))


# Settings wider than the defaults; the image stays in [90, 165] (saturation <= 0.45), so none of
# these settings clips a value and each jitter can be read back exactly from input and output.
@pytest.mark.parametrize(
  "name, probabilities, low, high",
  [
    ("brightness", dict(p_brightness=1.0, brightness_delta=0.3), -0.3, 0.3),
    ("contrast", dict(p_contrast=1.0, min_contrast=0.5, max_contrast=1.5), 0.5, 1.5),
    ("saturation", dict(p_saturation=1.0, min_saturation=0.3, max_saturation=2.0), 0.3, 2.0),
    ("hue", dict(p_hue=1.0, hue_delta=0.2), -0.2, 0.2),
  ],
)
def test_colour_jitter_stays_within_its_bounds_and_reaches_them(name, probabilities, low, high):
  image = np.random.default_rng(3).integers(90, 166, (16, 16, 3), dtype=np.uint8)
  config = only(**probabilities)
  mask = np.zeros((16, 16), np.uint8)
  measured = [
    _measured_jitter(name, image / 255.0, run(config, [seed, 7], image, mask)[0] / 255.0)
    for seed in range(60)
  ]
  assert low - 1e-3 <= min(measured) and max(measured) <= high + 1e-3, (
    min(measured),
    max(measured),
  )
  # Uniform draws: 60 of them come within a tenth of the range of each end (each misses with
  # probability 0.9**60 = 0.2%; the seeds are fixed, so this is checked once and for all).
  margin = 0.1 * (high - low)
  assert min(measured) < low + margin and max(measured) > high - margin, (
    min(measured),
    max(measured),
  )


def test_same_seed_same_result_other_seed_other_result():
  mask = shapes_mask()
  image = derived_image(mask)
  config = AugmentConfig(p_elastic=0.5, p_cutout=0.5)
  first = run(config, [4, 2], image, mask)
  second = run(config, [4, 2], image, mask)
  other = run(config, [4, 3], image, mask)
  np.testing.assert_array_equal(first[0], second[0])
  np.testing.assert_array_equal(first[1], second[1])
  assert not np.array_equal(first[0], other[0])


def test_tf_data_graph_gives_the_eager_result():
  mask = shapes_mask()
  image = derived_image(mask)
  config = AugmentConfig(p_elastic=0.5)
  dataset = tf.data.Dataset.range(3).map(
    lambda i: augment(image, mask[..., None], config, tf.stack([i, i + 1]))
  )
  for index, (out_image, out_mask) in enumerate(dataset):
    eager = run(config, [index, index + 1], image, mask)
    np.testing.assert_allclose(out_image.numpy(), eager[0], atol=1e-2)  # graph rewrites
    np.testing.assert_array_equal(out_mask.numpy()[..., 0], eager[1])


def test_compiles_with_xla_and_is_deterministic_there():
  mask = shapes_mask()
  image = derived_image(mask)
  config = dataclasses.replace(
    AugmentConfig(),
    **{
      field.name: 1.0 for field in dataclasses.fields(AugmentConfig) if field.name.startswith("p_")
    },
  )
  compiled = tf.function(lambda i, m, s: augment(i, m, config, s), jit_compile=True)
  first = compiled(image, mask[..., None], tf.constant([1, 2]))
  second = compiled(image, mask[..., None], tf.constant([1, 2]))
  np.testing.assert_array_equal(first[0].numpy(), second[0].numpy())
  np.testing.assert_array_equal(first[1].numpy(), second[1].numpy())
  assert set(np.unique(first[1].numpy())) <= {0.0, 1.0}


@pytest.mark.parametrize(
  "fields, message",
  [
    (dict(p_crop=1.5), "p_crop=1.5 must be a probability"),
    (dict(min_scale=1.2, max_scale=1.1), "min_scale <= max_scale"),
    (dict(hue_delta=0.7), "hue_delta"),
    (dict(cutout_count=0), "cutout_count"),
  ],
)
def test_config_is_validated(fields, message):
  with pytest.raises(ValueError, match=message):
    AugmentConfig(**fields)


def coordinates(height, width):
  """An image whose pixel (y, x) holds (y, x, 7) and a mask holding y * width + x: any window
  shows where it was cut from."""
  ys, xs = np.mgrid[0:height, 0:width]
  image = np.stack([ys, xs, np.full_like(ys, 7)], axis=2).astype(np.uint8)
  return image, (ys * width + xs).astype(np.int32)[..., None]


def crop_offset(out_image):
  return int(out_image[0, 0, 0]), int(out_image[0, 0, 1])


def test_random_crop_cuts_one_window_of_image_and_mask_inside_the_picture():
  image, mask = coordinates(48, 64)
  offsets = set()
  for index in range(60):
    out_image, out_mask = random_crop(image, mask, (16, 32), tf.constant([3, index]))
    assert out_image.shape == (16, 32, 3) and out_mask.shape == (16, 32, 1)
    assert out_image.dtype == tf.uint8 and out_mask.dtype == tf.int32  # only sliced
    top, left = crop_offset(out_image.numpy())
    assert 0 <= top <= 48 - 16 and 0 <= left <= 64 - 32
    np.testing.assert_array_equal(out_image.numpy(), image[top : top + 16, left : left + 32])
    # The mask's window is the image's: the same pixels.
    np.testing.assert_array_equal(out_mask.numpy(), mask[top : top + 16, left : left + 32])
    offsets.add((top, left))
  # Other examples (seeds), other windows: both offsets vary, reaching both ends.
  tops, lefts = {top for top, _ in offsets}, {left for _, left in offsets}
  assert len(offsets) > 40 and len(tops) > 15 and len(lefts) > 20
  # The same seed, the same window (eagerly, in tf.data and in an XLA-compiled function).
  first = random_crop(image, mask, (16, 32), tf.constant([3, 5]))[0].numpy()
  again = random_crop(image, mask, (16, 32), tf.constant([3, 5]))[0].numpy()
  np.testing.assert_array_equal(first, again)
  graph = next(
    iter(
      tf.data.Dataset.from_tensors(tf.constant([3, 5], tf.int64)).map(
        lambda seed: random_crop(image, mask, (16, 32), seed)
      )
    )
  )
  np.testing.assert_array_equal(graph[0].numpy(), first)
  compiled = tf.function(lambda i, m, s: random_crop(i, m, (16, 32), s), jit_compile=True)
  window = compiled(image, mask, tf.constant([3, 5]))
  top, left = crop_offset(window[0].numpy())
  np.testing.assert_array_equal(window[1].numpy(), mask[top : top + 16, left : left + 32])


def test_random_crop_of_the_whole_size_is_the_picture_and_larger_is_an_error():
  image, mask = coordinates(32, 48)
  out_image, out_mask = random_crop(image, mask, (32, 48), tf.constant([1, 2]))
  np.testing.assert_array_equal(out_image.numpy(), image)
  np.testing.assert_array_equal(out_mask.numpy(), mask)
  with pytest.raises(ConfigError, match="a 48x48 crop is larger"):
    random_crop(image, mask, (48, 48), tf.constant([1, 2]))
