import numpy as np
import pytest
import tensorflow as tf

from dunet.nn.resize import max_pool_2x2, upsample_bilinear


def numpy_bilinear_half_pixel(x, factor):
  """Bilinear sampling at source coordinate (i + 0.5) / factor - 0.5, clamped at the borders."""
  _, height, width, _ = x.shape

  def weights(size):
    coords = np.clip((np.arange(size * factor) + 0.5) / factor - 0.5, 0, size - 1)
    low = np.floor(coords).astype(int)
    high = np.minimum(low + 1, size - 1)
    return low, high, coords - low

  y0, y1, wy = weights(height)
  x0, x1, wx = weights(width)
  rows = x[:, y0] * (1 - wy)[None, :, None, None] + x[:, y1] * wy[None, :, None, None]
  return rows[:, :, x0] * (1 - wx)[None, None, :, None] + rows[:, :, x1] * wx[None, None, :, None]


def test_upsample_matches_half_pixel_bilinear():
  x = np.random.default_rng(0).normal(size=(2, 3, 5, 4)).astype(np.float32)
  np.testing.assert_allclose(
    upsample_bilinear(x, 2).numpy(), numpy_bilinear_half_pixel(x, 2), atol=1e-5
  )


def test_upsample_keeps_dtype():
  assert upsample_bilinear(tf.ones([1, 2, 2, 1], tf.float16)).dtype == tf.float16


def test_max_pool():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  np.testing.assert_array_equal(max_pool_2x2(x).numpy()[0, :, :, 0], [[5, 7], [13, 15]])


@pytest.fixture
def op_determinism():
  """Enables TF op determinism for one test (conftest restores the default after each test)."""
  tf.config.experimental.enable_op_determinism()


def _pool_and_gradient(x, jit_compile):
  @tf.function(jit_compile=jit_compile)
  def run(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      pooled = max_pool_2x2(tf.nn.relu(x))
      loss = tf.reduce_sum(pooled * tf.range(pooled.shape[-1], dtype=x.dtype))
    return pooled, tape.gradient(loss, x)

  return run(tf.constant(x))


def test_max_pool_under_op_determinism_compiles_with_xla_and_matches(op_determinism):
  # Distinct values (no ties among positives); ReLU zeros tie, and their gradient is zero anyway.
  x = np.random.default_rng(0).permutation(2 * 8 * 6 * 3).reshape(2, 8, 6, 3).astype(np.float32)
  x -= x.mean()
  pooled, gradient = _pool_and_gradient(x, jit_compile=True)

  relu = np.maximum(x, 0)
  windows = relu.reshape(2, 4, 2, 3, 2, 3).transpose(0, 1, 3, 5, 2, 4).reshape(2, 4, 3, 3, 4)
  np.testing.assert_array_equal(pooled.numpy(), windows.max(-1))
  expected = np.zeros_like(x)
  for b, i, j, c in np.ndindex(2, 4, 3, 3):
    if windows[b, i, j, c].max() > 0:
      k = windows[b, i, j, c].argmax()
      expected[b, 2 * i + k // 2, 2 * j + k % 2, c] = c
  np.testing.assert_array_equal(gradient.numpy(), expected)


def test_max_pool_under_op_determinism_rejects_odd_sizes(op_determinism):
  with pytest.raises(ValueError, match="even height and width, got 5x4"):
    max_pool_2x2(tf.zeros([1, 5, 4, 1]))
