import numpy as np
import tensorflow as tf

from dunet.nn import initializers
from dunet.nn.dense import Dense


def test_matches_numpy():
  dense = Dense(6, 3)
  dense.bias.assign([1.0, 2.0, 3.0])
  x = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
  np.testing.assert_allclose(dense(x).numpy(), x @ dense.kernel.numpy() + [1, 2, 3], atol=1e-5)


def test_without_bias_has_one_variable():
  dense = Dense(6, 3, with_bias=False, kernel_init=initializers.he_normal)
  assert len(dense.trainable_variables) == 1


def test_float16_output():
  dense = Dense(2, 2, compute_dtype=tf.float16)
  assert dense(tf.ones([1, 2])).dtype == tf.float16
