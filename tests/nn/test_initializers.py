import math

import numpy as np
import tensorflow as tf

from dunet.nn import initializers


def test_glorot_uniform_range_and_variance():
  tf.random.set_seed(0)
  shape = [3, 3, 64, 128]
  values = initializers.glorot_uniform(shape).numpy()
  limit = math.sqrt(6 / (9 * 64 + 9 * 128))
  assert values.min() >= -limit and values.max() <= limit
  # Uniform[-l, l] has variance l^2 / 3.
  np.testing.assert_allclose(values.var(), limit**2 / 3, rtol=0.03)


def test_he_normal_variance_and_truncation():
  tf.random.set_seed(0)
  values = initializers.he_normal([256, 512]).numpy()
  stddev = math.sqrt(2 / 256)
  np.testing.assert_allclose(values.std(), stddev, rtol=0.03)
  assert np.abs(values).max() <= 2 * stddev / 0.87962566103423978 + 1e-6


def test_seeded_draws_repeat():
  tf.random.set_seed(3)
  first = initializers.glorot_uniform([4, 4]).numpy()
  tf.random.set_seed(3)
  np.testing.assert_array_equal(first, initializers.glorot_uniform([4, 4]).numpy())
