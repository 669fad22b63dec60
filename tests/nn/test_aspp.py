import numpy as np
import tensorflow as tf

from dunet.nn.aspp import ASPP


def _count(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


def test_shape_and_parameter_count():
  aspp = ASPP(32, 8)
  y = aspp(tf.random.normal([2, 6, 6, 32]), is_training=True)
  assert y.shape == (2, 6, 6, 8)
  convs = (32 * 8 + 8) + 32 * 8 + 3 * (9 * 32 * 8) + 5 * 8 * 8
  assert _count(aspp.trainable_variables) == convs + 6 * 2 * 8  # gamma and beta of 6 BNs
  assert _count(aspp.variables) - _count(aspp.trainable_variables) == 6 * 2 * 8


def test_image_pooling_branch_is_spatially_constant():
  aspp = ASPP(4, 2)
  x = tf.random.normal([1, 8, 8, 4])
  pooled = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
  branch = tf.nn.relu(aspp.pool_bn(aspp.pool_conv(pooled), False))
  # Zero every other branch's projection weights: the output then depends on the pooled branch only.
  kernel = np.zeros(aspp.project.kernel.shape, np.float32)
  kernel[0, 0, :2] = np.eye(2)
  aspp.project.kernel.assign(kernel)
  y = aspp(x, is_training=False).numpy()
  assert np.allclose(y, y[:, :1, :1, :])
  expected = tf.nn.relu(aspp.project_bn(tf.broadcast_to(branch, [1, 8, 8, 2]), False))
  np.testing.assert_allclose(y, expected.numpy(), atol=1e-6)
