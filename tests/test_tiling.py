"""dunet/tiling.py: sliding windows against a slow explicit loop, blending invariants, padding."""

import math

import numpy as np
import pytest
import tensorflow as tf

from dunet import tiling
from dunet.errors import ConfigError

WINDOW = (32, 48)


def _images(shape, seed=0):
  return np.random.RandomState(seed).randint(0, 256, shape).astype(np.uint8)


def _constant_fn(value):
  def window_fn(windows):
    return {"probability": tf.fill(tf.concat([tf.shape(windows)[:3], [1]], 0), value)}

  return window_fn


def _first_channel_fn(windows):
  """Position-equivariant and pointwise: a tiling of it must give it back on the whole image."""
  return {"probability": tf.cast(windows[..., :1], tf.float32) / 255.0}


def _ramps(height, width):
  rows = np.linspace(0.2, 1.0, height, dtype=np.float32)[:, None, None]
  cols = np.linspace(1.0, 0.3, width, dtype=np.float32)[None, :, None]
  return rows, cols


def _positional_fn_tf(windows):
  """Depends on the position inside the window, so the blending weights show in the result."""
  rows, cols = _ramps(*WINDOW)
  pixels = tf.cast(windows, tf.float32) / 255.0
  return {
    "a": pixels[..., 0:1] * rows + pixels[..., 1:2] * cols,
    "b": tf.concat([pixels[..., 2:3] * rows * cols, 1.0 - pixels[..., 0:1] * cols], -1),
  }


def _positional_fn_np(window):
  rows, cols = _ramps(*WINDOW)
  pixels = window.astype(np.float64) / 255.0
  return {
    "a": pixels[..., 0:1] * rows + pixels[..., 1:2] * cols,
    "b": np.concatenate([pixels[..., 2:3] * rows * cols, 1.0 - pixels[..., 0:1] * cols], -1),
  }


def _steps(size, window, overlap):
  """nnU-Net's compute_steps_for_sliding_window along one axis, written out in Python."""
  count = math.ceil((size - window) / (window * (1 - overlap))) + 1
  if count == 1:
    return [0]
  actual = (size - window) / (count - 1)
  return [int(round(actual * i)) for i in range(count)]


def _gaussian_np(window, sigma_scale, min_weight):
  axes = []
  for n in window:
    distance = np.arange(n) - (n - 1) / 2
    values = np.exp(-(distance**2) / (2 * (sigma_scale * n) ** 2))
    axes.append(values / values.max())
  return np.maximum(np.outer(*axes), min_weight)


def _reference(fn, image, window, overlap, weights):
  """The slow way: np.pad, explicit loops over windows, accumulate, divide, crop."""
  height, width = image.shape[:2]
  pad_h, pad_w = max(0, window[0] - height), max(0, window[1] - width)
  pads = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
  padded = np.pad(image, pads, mode="reflect")
  sums, total = {}, np.zeros(padded.shape[:2] + (1,))
  for y in _steps(padded.shape[0], window[0], overlap):
    for x in _steps(padded.shape[1], window[1], overlap):
      cut = (slice(y, y + window[0]), slice(x, x + window[1]))
      for key, value in fn(padded[cut]).items():
        sums.setdefault(key, np.zeros(padded.shape[:2] + value.shape[-1:]))[cut] += (
          value * weights[..., None]
        )
      total[cut] += weights[..., None]
  crop = (slice(pads[0][0], pads[0][0] + height), slice(pads[1][0], pads[1][0] + width))
  return {key: (value / total)[crop] for key, value in sums.items()}


@pytest.mark.parametrize(
  "size,overlap,weighting",
  [
    ((67, 93), 0.5, "gaussian"),
    ((20, 10), 0.5, "gaussian"),
    ((32, 48), 0.5, "gaussian"),
    ((70, 50), 0.25, "gaussian"),
    ((45, 100), 0.0, "gaussian"),
    ((67, 93), 0.5, "constant"),
    ((3, 130), 0.7, "constant"),
  ],
)
def test_matches_an_explicit_loop(size, overlap, weighting):
  images = _images((2, *size, 3), seed=size[0])
  result = tiling.sliding_window(
    _positional_fn_tf, images, WINDOW, overlap=overlap, weighting=weighting, windows_per_call=3
  )
  if weighting == "gaussian":
    weights = _gaussian_np(WINDOW, 0.125, tiling.MIN_WEIGHT)
  else:
    weights = np.ones(WINDOW)
  for index, image in enumerate(images):
    expected = _reference(_positional_fn_np, image, WINDOW, overlap, weights)
    for key in ("a", "b"):
      assert result[key].dtype == tf.float32
      assert result[key].shape == (2, *size, expected[key].shape[-1])
      np.testing.assert_allclose(result[key][index].numpy(), expected[key], atol=2e-6)


@pytest.mark.parametrize("size", [(67, 93), (20, 10), (32, 48), (33, 49), (1, 1), (100, 20)])
@pytest.mark.parametrize("weighting", tiling.WEIGHTINGS)
def test_a_constant_stays_constant(size, weighting):
  images = _images((2, *size, 3))
  for value in (0.5, 1.0, 0.25):
    # A power of two times each weight is exact, so the blend returns it bit for bit.
    result = tiling.sliding_window(_constant_fn(value), images, WINDOW, weighting=weighting)
    np.testing.assert_array_equal(result["probability"].numpy(), np.full((2, *size, 1), value))
  result = tiling.sliding_window(_constant_fn(0.3), images, WINDOW, weighting=weighting)
  np.testing.assert_allclose(result["probability"].numpy(), 0.3, rtol=1e-6)


def test_an_image_of_the_window_size_is_one_window_fn_call():
  images = _images((3, *WINDOW, 3), seed=5)
  result = tiling.sliding_window(_positional_fn_tf, images, WINDOW)
  expected = _positional_fn_tf(tf.constant(images))
  for key in expected:
    np.testing.assert_allclose(result[key].numpy(), expected[key].numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("size", [(67, 93), (20, 10), (5, 200), (64, 96)])
def test_a_pointwise_fn_is_reconstructed(size):
  # Windows, padding and blending all cancel out for a function of each pixel alone.
  images = _images((2, *size, 3), seed=7)
  result = tiling.sliding_window(_first_channel_fn, images, WINDOW, overlap=0.5)
  np.testing.assert_allclose(
    result["probability"].numpy(), images[..., :1] / np.float32(255), rtol=1e-6, atol=1e-7
  )


def test_a_bare_tensor_output_and_float_input():
  images = _images((1, 40, 70, 3), seed=2).astype(np.float32)
  result = tiling.sliding_window(lambda w: w[..., 1:] * 2.0, images, WINDOW, overlap=0.25)
  assert isinstance(result, tf.Tensor)
  np.testing.assert_allclose(result.numpy(), images[..., 1:] * 2.0, rtol=1e-6)


def test_window_starts_follow_nnunet():
  for window in (16, 32, 48):
    for overlap in (0.0, 0.25, 0.5, 0.75, 0.9):
      for size in range(window, 4 * window + 3, 7):
        starts = tiling.window_starts(size, window, overlap).numpy().tolist()
        assert starts == _steps(size, window, overlap), (size, window, overlap)
        assert starts[0] == 0 and starts[-1] == size - window
        # Evenly spaced at most window * (1 - overlap) apart, then rounded to whole pixels.
        assert max(np.diff(starts), default=0) <= math.ceil(window * (1 - overlap))
  assert tiling.count_windows((67, 93), WINDOW, 0.5) == len(_steps(67, 32, 0.5)) * len(
    _steps(93, 48, 0.5)
  )
  assert tiling.count_windows((20, 10), WINDOW, 0.5) == 1


def test_windows_are_batched_in_chunks():
  images = _images((3, 67, 93, 3))
  per_image = tiling.count_windows((67, 93), WINDOW, 0.5)
  calls = []

  def recording_fn(windows):
    calls.append(int(windows.shape[0]))
    return _positional_fn_tf(windows)

  results = {}
  for per_call in (1, 5, 1000):
    calls.clear()
    results[per_call] = tiling.sliding_window(
      recording_fn, images, WINDOW, windows_per_call=per_call
    )
    assert sum(calls) == 3 * per_image
    assert max(calls) == min(per_call, 3 * per_image)
  for key in ("a", "b"):
    np.testing.assert_allclose(results[1][key].numpy(), results[1000][key].numpy(), atol=1e-6)
    np.testing.assert_allclose(results[5][key].numpy(), results[1000][key].numpy(), atol=1e-6)


def test_reflect_padding_by_hand():
  row = np.array([[10, 20, 30]], np.uint8)[None, :, :, None]  # [1, 1, 3, 1]
  padded, offset = tiling.reflect_pad(tf.constant(row), 3, 9)
  # Pad 2 rows (1 + 1) and 6 columns (3 + 3); one-pixel-high rows reflect to themselves.
  assert offset.numpy().tolist() == [1, 3]
  expected_row = [20, 30, 20, 10, 20, 30, 20, 10, 20]
  assert padded.dtype == tf.uint8
  np.testing.assert_array_equal(padded.numpy()[0, :, :, 0], [expected_row] * 3)
  # Larger pads than one reflection allows, against numpy's reflect padding.
  image = _images((1, 4, 3, 2), seed=9)
  padded, offset = tiling.reflect_pad(tf.constant(image), 13, 10)
  assert offset.numpy().tolist() == [4, 3]
  expected = np.pad(image, ((0, 0), (4, 5), (3, 4), (0, 0)), mode="reflect")
  np.testing.assert_array_equal(padded.numpy(), expected)
  # Sides already large enough are left as they are.
  padded, offset = tiling.reflect_pad(tf.constant(image), 2, 2)
  np.testing.assert_array_equal(padded.numpy(), image)
  assert offset.numpy().tolist() == [0, 0]


@pytest.mark.parametrize("window", [(32, 48), (33, 17), (1, 5)])
def test_gaussian_importance_map(window):
  weights = tiling.importance_map(window).numpy()
  assert weights.shape == window and weights.dtype == np.float32
  assert weights.max() == 1.0
  rows = sorted({(window[0] - 1) // 2, window[0] // 2})
  cols = sorted({(window[1] - 1) // 2, window[1] // 2})
  np.testing.assert_array_equal(weights[np.ix_(rows, cols)], 1.0)  # the centre (2 x 2 if even)
  np.testing.assert_array_equal(weights, weights[::-1, :])
  np.testing.assert_array_equal(weights, weights[:, ::-1])
  assert weights.min() >= tiling.MIN_WEIGHT
  np.testing.assert_allclose(weights, _gaussian_np(window, 0.125, tiling.MIN_WEIGHT), rtol=1e-6)
  # A narrow Gaussian would underflow at the edges: the floor keeps every weight positive.
  narrow = tiling.importance_map(window, sigma_scale=0.01).numpy()
  assert narrow.min() == np.float32(tiling.MIN_WEIGHT)
  assert tiling.importance_map(window, "constant").numpy().tolist() == np.ones(window).tolist()


def test_gaussian_peak_is_the_centre():
  weights = tiling.importance_map((5, 6)).numpy()
  assert weights[2, 2] == weights[2, 3] == 1.0
  assert (np.delete(weights, [2], axis=0) < 1).all()
  assert (np.delete(weights, [2, 3], axis=1) < 1).all()


def test_inside_a_tf_function_with_unknown_sizes():
  serve_window = tf.function(
    _positional_fn_tf, input_signature=[tf.TensorSpec([None, *WINDOW, 3], tf.uint8)]
  )

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
  def tiled(images):
    return tiling.sliding_window(serve_window, images, WINDOW, windows_per_call=4)

  for size in [(67, 93), (20, 10), (32, 48)]:
    images = _images((2, *size, 3), seed=size[1])
    result = tiled(tf.constant(images))
    expected = tiling.sliding_window(_positional_fn_tf, images, WINDOW)
    for key in ("a", "b"):
      assert result[key].shape[:3] == (2, *size)
      np.testing.assert_allclose(result[key].numpy(), expected[key].numpy(), atol=1e-6)
  assert tiled.experimental_get_tracing_count() == 1


def test_in_a_saved_model(tmp_path):
  class Tiled(tf.Module):
    def __init__(self):
      super().__init__()
      self.scale = tf.Variable(0.5)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    def serve(self, images):
      def window_fn(windows):
        return {"probability": self.scale * _first_channel_fn(windows)["probability"]}

      return tiling.sliding_window(window_fn, images, WINDOW)

  tf.saved_model.save(Tiled(), str(tmp_path))
  loaded = tf.saved_model.load(str(tmp_path))
  images = _images((1, 50, 37, 3), seed=3)
  np.testing.assert_allclose(
    loaded.serve(tf.constant(images))["probability"].numpy(),
    0.5 * images[..., :1] / np.float32(255),
    rtol=1e-6,
    atol=1e-7,
  )


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"overlap": 1.0}, "overlap"),
    ({"overlap": -0.1}, "overlap"),
    ({"window": (0, 32)}, "window"),
    ({"window": (32, -1)}, "window"),
    ({"window": (32,)}, "window"),
    ({"window": (32.5, 32)}, "window"),
    ({"window": "big"}, "window"),
    ({"weighting": "hann"}, "weighting"),
    ({"sigma_scale": 0.0}, "sigma_scale"),
    ({"windows_per_call": 0}, "windows_per_call"),
    ({"min_weight": 0.0}, "min_weight"),
  ],
)
def test_bad_arguments(kwargs, match):
  arguments = {"window": WINDOW, **kwargs}
  with pytest.raises(ConfigError, match=match):
    tiling.sliding_window(_first_channel_fn, _images((1, 40, 40, 3)), **arguments)


def test_bad_shapes():
  with pytest.raises(ConfigError, match="images must be"):
    tiling.sliding_window(_first_channel_fn, _images((40, 40, 3)), WINDOW)
  with pytest.raises(ConfigError, match="window_fn output"):
    tiling.sliding_window(lambda w: {"p": w[:, :8, :8, :1]}, _images((1, 40, 40, 3)), WINDOW)
