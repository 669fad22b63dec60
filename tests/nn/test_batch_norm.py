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
  # Non-default statistics: a training-mode output that wrongly used them would differ from the
  # batch-moment output and have non-zero gradients with respect to them.
  bn.moving_mean.assign([0.5, -1.0, 2.0])
  bn.moving_variance.assign([2.0, 3.0, 0.5])
  x = _numpy_inputs(2)
  weights = np.random.default_rng(7).normal(size=x.shape).astype(np.float32)
  with tf.GradientTape() as tape:
    # Non-trainable variables are not watched by default: watch them, so the check means "the loss
    # does not depend on them", not "the tape ignored them".
    tape.watch([bn.moving_mean, bn.moving_variance])
    loss = tf.reduce_sum(bn(tf.constant(x), is_training=True) * weights)
  grad_mean, grad_variance, grad_gamma, grad_beta = tape.gradient(
    loss, [bn.moving_mean, bn.moving_variance, bn.gamma, bn.beta]
  )
  for grad in (grad_mean, grad_variance):
    assert grad is None or not np.any(grad.numpy())
  normalised = (x - x.mean(axis=(0, 1, 2))) / np.sqrt(x.var(axis=(0, 1, 2)) + 1e-3)
  np.testing.assert_allclose(grad_beta.numpy(), weights.sum(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(
    grad_gamma.numpy(), (normalised * weights).sum(axis=(0, 1, 2)), rtol=1e-3, atol=1e-3
  )
  trainable = {id(v) for v in bn.trainable_variables}
  assert id(bn.moving_mean) not in trainable and id(bn.moving_variance) not in trainable


def test_statistics_change_only_by_the_momentum_update():
  """Gradient steps on every trainable variable leave the statistics on the momentum recursion."""
  bn = BatchNorm(3, momentum=0.8)
  expected_mean, expected_variance = np.zeros(3), np.ones(3)
  for step in range(3):
    x = _numpy_inputs(10 + step)
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(tf.square(bn(tf.constant(x), is_training=True) - 1.0))
    for variable, grad in zip(bn.trainable_variables, tape.gradient(loss, bn.trainable_variables)):
      variable.assign_sub(0.01 * grad)
    expected_mean = 0.8 * expected_mean + 0.2 * x.mean(axis=(0, 1, 2))
    expected_variance = 0.8 * expected_variance + 0.2 * x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), expected_variance, rtol=1e-5)
  # The gradient steps did move gamma and beta (so the check above was not vacuous).
  assert not np.allclose(bn.gamma.numpy(), 1.0) and not np.allclose(bn.beta.numpy(), 0.0)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_inputs_keep_float32_statistics(dtype):
  bn = BatchNorm(3, momentum=0.0, compute_dtype=dtype)
  x = _numpy_inputs(3)
  y = bn(x, is_training=True)
  assert y.dtype == dtype
  assert bn.moving_mean.dtype == tf.float32
  np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(axis=(0, 1, 2)), rtol=2e-2, atol=2e-2)
