"""Conv2D against a direct numpy convolution."""

import numpy as np
import pytest
import tensorflow as tf

from dunet.nn import conv as conv_lib
from dunet.nn.conv import Conv2D
from tests.nn.helpers import numpy_conv_same


@pytest.mark.parametrize(
  "kernel_size,dilation,with_bias", [(3, 1, True), (3, 6, False), (1, 1, True)]
)
def test_matches_numpy(kernel_size, dilation, with_bias):
  conv = Conv2D(3, 5, kernel_size, dilation_rate=dilation, with_bias=with_bias)
  if with_bias:
    conv.bias.assign(np.arange(5, dtype=np.float32))
  x = np.random.default_rng(0).normal(size=(2, 9, 11, 3)).astype(np.float32)
  expected = numpy_conv_same(
    x, conv.kernel.numpy(), conv.bias.numpy() if with_bias else None, dilation
  )
  np.testing.assert_allclose(conv(x).numpy(), expected, atol=1e-4)


def test_variables_and_shapes():
  conv = Conv2D(4, 8, 3, with_bias=False, name="c")
  assert [v.shape.as_list() for v in conv.trainable_variables] == [[3, 3, 4, 8]]
  assert conv.kernel.dtype == tf.float32
  assert conv.kernel.name.startswith("c/")


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_compute_keeps_float32_weights(dtype):
  conv = Conv2D(3, 4, 3, compute_dtype=dtype)
  x = tf.random.normal([1, 8, 8, 3])
  y = conv(x)
  assert y.dtype == dtype and conv.kernel.dtype == tf.float32
  reference = Conv2D(3, 4, 3)
  for source, target in zip(conv.variables, reference.variables):
    target.assign(source)
  np.testing.assert_allclose(tf.cast(y, tf.float32).numpy(), reference(x).numpy(), atol=5e-2)


@pytest.mark.parametrize("height,width", [(2, 2), (4, 30), (12, 5)])
def test_dilation_past_the_input_is_exact(height, width):
  conv = Conv2D(3, 4, 3, dilation_rate=12, with_bias=False)
  x = np.random.default_rng(3).normal(size=(1, height, width, 3)).astype(np.float32)
  expected = numpy_conv_same(x, conv.kernel.numpy(), None, 12)
  np.testing.assert_allclose(conv(x).numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("space_to_batch", [False, True], ids=["direct", "space_to_batch"])
def test_both_dilated_forms_match_numpy_values_and_gradients(monkeypatch, space_to_batch):
  direct_gradient_exists = not conv_lib.needs_space_to_batch(tf.float32)
  monkeypatch.setattr(conv_lib, "needs_space_to_batch", lambda dtype: space_to_batch)
  conv = Conv2D(3, 4, 3, dilation_rate=3, with_bias=False)
  x = tf.constant(np.random.default_rng(1).normal(size=(2, 10, 9, 3)).astype(np.float32))
  if not space_to_batch and not direct_gradient_exists:
    # Without oneDNN (TensorFlow enables it by default only on CPUs with AVX-512 features) the
    # CPU has no dilated-convolution gradient: the reason dunet switches to space-to-batch.
    with pytest.raises(tf.errors.InvalidArgumentError, match="dilation rates larger than 1"):
      with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(conv(x) ** 2)
      tape.gradient(loss, x)
    return
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = conv(x)
    loss = tf.reduce_sum(y * y)
  grad_x, grad_kernel = tape.gradient(loss, [x, conv.kernel])
  kernel = conv.kernel.numpy()
  np.testing.assert_allclose(y.numpy(), numpy_conv_same(x.numpy(), kernel, None, 3), atol=1e-4)
  # d(sum y^2)/dk[p,q,i,o] = sum 2 y[..., o] * x shifted by tap (p, q): check by finite linearity.
  expected_kernel_grad = np.zeros_like(kernel)
  for p, q, i, o in np.ndindex(*kernel.shape):
    unit = np.zeros_like(kernel)
    unit[p, q, i, o] = 1
    expected_kernel_grad[p, q, i, o] = np.sum(
      2 * y.numpy()[..., o] * numpy_conv_same(x.numpy(), unit, None, 3)[..., o]
    )
  np.testing.assert_allclose(grad_kernel.numpy(), expected_kernel_grad, rtol=1e-3, atol=1e-3)
  assert grad_x.shape == x.shape


def test_float16_dilated_gradient_runs_on_cpu():
  # TF's float16 CPU kernels have no dilated-convolution gradient; dunet routes around them.
  assert conv_lib.needs_space_to_batch(tf.float16) == (not tf.config.list_physical_devices("GPU"))
  conv = Conv2D(3, 4, 3, dilation_rate=6, compute_dtype=tf.float16)
  x = tf.random.normal([1, 16, 16, 3])
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(tf.cast(conv(x), tf.float32))
  gradient = tape.gradient(loss, conv.kernel)
  assert gradient.dtype == tf.float32 and np.all(np.isfinite(gradient.numpy()))


def test_float32_uses_the_direct_kernel_when_onednn_is_on():
  if tf.config.list_physical_devices("GPU") or not conv_lib._onednn_enabled():
    pytest.skip("the choice differs on GPUs / without oneDNN (covered by the test above)")
  assert not conv_lib.needs_space_to_batch(tf.float32)
  assert not conv_lib.needs_space_to_batch(tf.bfloat16)
