"""Preprocessing modes against numpy re-implementations of their definitions."""

import numpy as np
import pytest
import tensorflow as tf

from dunet.data import preprocess


def reference_numpy(image_rgb):
  """The authors' read_image on the BGR image that cv2.imread returns."""
  bgr = image_rgb[..., ::-1]
  return np.clip(bgr - np.median(bgr) + 127, 0, 255) / 255.0


@pytest.mark.parametrize("shape", [(5, 7, 3), (6, 4, 3), (64, 64, 3)])
def test_reference_median_shift_matches_numpy(shape):
  image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
  np.testing.assert_allclose(
    preprocess.preprocess(image, "reference").numpy(), reference_numpy(image), atol=1e-6
  )


def test_reference_median_of_dark_and_bright_images():
  dark = np.full((4, 4, 3), 10, np.uint8)
  dark[0, 0] = 250
  np.testing.assert_allclose(
    preprocess.preprocess(dark, "reference").numpy(), reference_numpy(dark), atol=1e-6
  )
  assert preprocess.preprocess(dark, "reference").numpy()[1, 1, 0] == pytest.approx(127 / 255)


def test_reference_batched_uses_each_images_own_median():
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 6, 3), dtype=np.uint8)
  images[1] //= 4  # a darker image: a different median
  result = preprocess.preprocess(images, "reference").numpy()
  for index in range(3):
    np.testing.assert_allclose(result[index], reference_numpy(images[index]), atol=1e-6)


def test_reference_rounds_float_inputs_to_8_bit_first():
  image = np.random.default_rng(1).uniform(0, 255, (6, 6, 3)).astype(np.float32)
  np.testing.assert_allclose(
    preprocess.preprocess(image, "reference").numpy(), reference_numpy(np.round(image)), atol=1e-6
  )


def test_unit_and_caffe():
  image = np.random.default_rng(2).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
  np.testing.assert_allclose(preprocess.preprocess(image, "unit").numpy(), image / 255.0, atol=1e-7)
  caffe = image[..., ::-1].astype(np.float64) - [103.939, 116.779, 123.68]
  np.testing.assert_allclose(preprocess.preprocess(image, "caffe").numpy(), caffe, atol=1e-4)


@pytest.mark.parametrize("mode", ["unit", "caffe"])
def test_display_inverts(mode):
  image = np.random.default_rng(3).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
  shown = preprocess.to_display_uint8(preprocess.preprocess(image, mode), mode)
  assert shown.dtype == tf.uint8
  np.testing.assert_array_equal(shown.numpy(), image)


def test_display_of_reference_shows_the_shifted_image_in_rgb():
  image = np.random.default_rng(4).integers(0, 256, (5, 5, 3), dtype=np.uint8)
  shown = preprocess.to_display_uint8(preprocess.preprocess(image, "reference"), "reference")
  expected = np.round(reference_numpy(image)[..., ::-1] * 255)
  np.testing.assert_array_equal(shown.numpy(), expected)


def test_unknown_mode():
  with pytest.raises(ValueError, match="unknown preprocessing 'imagenet'"):
    preprocess.preprocess(np.zeros((2, 2, 3), np.uint8), "imagenet")


def _median_cases():
  rng = np.random.RandomState(7)
  cases = {
    "random": rng.randint(0, 256, (3, 16, 12, 3)),
    "odd count": rng.randint(0, 256, (2, 5, 7, 3)),
    "constant": np.full((2, 8, 8, 3), 200),
    "extremes": rng.choice([0, 255], (4, 6, 6, 3)),
    "two levels, even split": np.concatenate(
      [np.full((1, 4, 4, 3), 10), np.full((1, 4, 4, 3), 11)], axis=1
    ),
    "skewed": np.minimum(rng.exponential(20, (2, 32, 32, 3)), 255),
  }
  return {name: value.astype(np.uint8) for name, value in cases.items()}


@pytest.mark.parametrize("name", sorted(_median_cases()))
def test_median_by_counting_is_numpys_median(name):
  images = _median_cases()[name]
  got = preprocess.median_uint8_by_counting(tf.constant(images)).numpy()
  assert got.shape == (len(images), 1, 1, 1)
  np.testing.assert_array_equal(got.ravel(), np.median(images.reshape(len(images), -1), axis=1))
  single = preprocess.median_uint8_by_counting(tf.constant(images[0])).numpy()
  assert single.shape == (1, 1, 1) and single.item() == np.median(images[0])


@pytest.mark.parametrize("mode", preprocess.PREPROCESSING)
def test_export_friendly_preprocessing_is_the_same_bit_for_bit(mode):
  images = np.random.RandomState(8).randint(0, 256, (3, 32, 48, 3)).astype(np.uint8)
  images[1] = np.minimum(images[1], 90)  # a darker picture: a different median
  for batch in (images, images[1]):  # batched and one image
    np.testing.assert_array_equal(
      preprocess.preprocess(tf.constant(batch), mode, export_friendly=True).numpy(),
      preprocess.preprocess(tf.constant(batch), mode).numpy(),
    )


def test_median_by_counting_uses_no_histogram_ops():
  """The point of the counting median: a graph ONNX converters map to TensorRT-friendly ops."""
  function = tf.function(preprocess.median_uint8_by_counting).get_concrete_function(
    tf.TensorSpec([None, 16, 16, 3], tf.uint8)
  )
  op_types = {op.type for op in function.graph.get_operations()}
  assert not op_types & {
    "Bincount",
    "DenseBincount",
    "Cumsum",
    "Sort",
    "TopKV2",
    "While",
    "If",
    "StatelessIf",
    "StatelessWhile",
  }, op_types


def test_standardize_gives_each_image_mean_zero_and_unit_deviation():
  images = np.random.default_rng(5).integers(0, 256, (2, 6, 7, 3), dtype=np.uint8)
  images[1] //= 8  # a dark picture is scaled up to the same spread
  got = preprocess.preprocess(images, "standardize").numpy()
  for image, out in zip(images.astype(np.float64), got):
    expected = (image - image.mean()) / max(image.std(), 1 / np.sqrt(image.size))
    np.testing.assert_allclose(out, expected, atol=1e-5)  # RGB order kept
  flat = np.full((4, 4, 3), 77, np.uint8)  # a constant picture: zeros, not a division by zero
  np.testing.assert_array_equal(preprocess.preprocess(flat, "standardize").numpy(), 0.0)
  shown = preprocess.to_display_uint8(got, "standardize").numpy()
  assert shown.dtype == np.uint8 and abs(shown.mean() - 128) < 10
