"""BatchNorm against the Keras formulas computed in numpy."""

import numpy as np
import pytest
import tensorflow as tf

from dunet.nn.batch_norm import BatchNorm


def _numpy_inputs(seed=0, shape=(4, 5, 6, 3)):
  return np.random.default_rng(seed).normal(2.0, 3.0, size=shape).astype(np.float32)


def test_training_normalises_with_batch_moments_and_moves_statistics():
  bn = BatchNorm(3, momentum=0.9, epsilon=1e-3)
  bn.gamma.assign([1.0, 2.0, 0.5])
  bn.beta.assign([0.0, -1.0, 3.0])
  x = _numpy_inputs()
  y = bn(x, is_training=True).numpy()
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))  # biased, as Keras
  expected = (x - mean) / np.sqrt(var + 1e-3) * [1.0, 2.0, 0.5] + [0.0, -1.0, 3.0]
  np.testing.assert_allclose(y, expected, atol=1e-4)
  np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 + 0.1 * var, rtol=1e-5)


def test_inference_uses_moving_statistics_and_changes_nothing():
  bn = BatchNorm(3)
  bn.moving_mean.assign([1.0, 2.0, 3.0])
  bn.moving_variance.assign([4.0, 9.0, 16.0])
  x = _numpy_inputs(1)
  y = bn(x, is_training=False).numpy()
  expected = (x - [1, 2, 3]) / np.sqrt(np.array([4.0, 9.0, 16.0]) + 1e-3)
  np.testing.assert_allclose(y, expected, atol=1e-5)
  np.testing.assert_array_equal(bn.moving_mean.numpy(), [1.0, 2.0, 3.0])
  np.testing.assert_array_equal(bn.moving_variance.numpy(), [4.0, 9.0, 16.0])


def test_statistics_are_not_trainable_and_on_read():
  bn = BatchNorm(8)
  assert {v.name.split("/")[-1] for v in bn.trainable_variables} == {"gamma:0", "beta:0"}
  assert bn.moving_mean.synchronization == tf.VariableSynchronization.ON_READ
  assert bn.moving_mean.aggregation == tf.VariableAggregation.MEAN


def test_no_gradient_into_statistics_but_into_gamma_beta():
  bn = BatchNorm(3)
  x = tf.constant(_numpy_inputs(2))
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(bn(x, is_training=True) * tf.range(3, dtype=tf.float32))
  grads = tape.gradient(loss, bn.trainable_variables)
  assert all(g is not None for g in grads)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_inputs_keep_float32_statistics(dtype):
  bn = BatchNorm(3, momentum=0.0, compute_dtype=dtype)
  x = _numpy_inputs(3)
  y = bn(x, is_training=True)
  assert y.dtype == dtype
  assert bn.moving_mean.dtype == tf.float32
  np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(axis=(0, 1, 2)), rtol=2e-2, atol=2e-2)
