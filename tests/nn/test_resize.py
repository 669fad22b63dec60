import numpy as np
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
  np.testing.assert_allclose(upsample_bilinear(x, 2).numpy(), numpy_bilinear_half_pixel(x, 2),
                             atol=1e-5)


def test_upsample_keeps_dtype():
  assert upsample_bilinear(tf.ones([1, 2, 2, 1], tf.float16)).dtype == tf.float16


def test_max_pool():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  np.testing.assert_array_equal(max_pool_2x2(x).numpy()[0, :, :, 0], [[5, 7], [13, 15]])
