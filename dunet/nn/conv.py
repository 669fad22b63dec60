"""2-D convolution over NHWC tensors with float32 weights and a chosen compute dtype."""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import tensorflow as tf

from dunet.nn import initializers

Initializer = Callable[..., tf.Tensor]


class Conv2D(tf.Module):
  """A 'same'-padded 2-D convolution, optionally dilated, with an optional bias.

  Variables are float32 and created in the constructor; inputs and weights are cast to
  `compute_dtype` for the convolution (float16/bfloat16 mixed precision keeps master weights in
  float32).
  """

  def __init__(
    self,
    input_channels: int,
    output_channels: int,
    kernel_size: int = 3,
    dilation_rate: int = 1,
    with_bias: bool = True,
    kernel_init: Initializer = initializers.glorot_uniform,
    compute_dtype: tf.DType = tf.float32,
    name: Optional[str] = None,
  ):
    """Creates the kernel [k, k, input_channels, output_channels] and bias [output_channels].

    Args:
      input_channels: channels of the input (weights are built eagerly, so this is needed up front).
      output_channels: number of filters.
      kernel_size: spatial size of the square kernel.
      dilation_rate: atrous rate; 1 is an ordinary convolution.
      with_bias: whether to add a bias (convolutions followed by BatchNorm have none).
      kernel_init: initialiser for the kernel (Keras default: Glorot uniform).
      compute_dtype: dtype of the arithmetic and of the output.
      name: module name.
    """
    super().__init__(name=name)
    self.input_channels = input_channels
    self.output_channels = output_channels
    self.kernel_size = kernel_size
    self.dilation_rate = dilation_rate
    self.with_bias = with_bias
    self.compute_dtype = tf.as_dtype(compute_dtype)
    # Set by dunet.folding on inference-only copies: no gradient is ever taken, so the direct
    # dilated kernel can be used where only its gradient is missing.
    self.inference_only = False
    shape = [kernel_size, kernel_size, input_channels, output_channels]
    with self.name_scope:
      self.kernel = tf.Variable(kernel_init(shape), name="kernel")
      self.bias = (
        tf.Variable(initializers.zeros([output_channels]), name="bias") if with_bias else None
      )

  def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
    """Applies the convolution.

    Args:
      inputs: [B, H, W, input_channels] tensor of any float dtype.

    Returns:
      [B, H, W, output_channels] tensor in `compute_dtype`.
    """
    inputs = tf.cast(inputs, self.compute_dtype)
    kernel = tf.cast(self.kernel, self.compute_dtype)
    dilations = [self.dilation_rate, self.dilation_rate]
    if self.dilation_rate > 1:
      kernel, dilations = _drop_taps_outside(kernel, dilations, inputs.shape[1:3])
    if max(dilations) > 1 and not self.inference_only and needs_space_to_batch(self.compute_dtype):
      # Some CPU kernels have no dilated-convolution gradient: float16 ones, and all of them when
      # oneDNN is off (TF_ENABLE_ONEDNN_OPTS=0). The space-to-batch form (DeepLab's original
      # atrous trick) is exact and uses only undilated convolutions, but costs 2-4x the direct
      # oneDNN kernel (profiling/results/dilated_conv.md), so it is used only there.
      outputs = tf.nn.with_space_to_batch(
        inputs,
        dilations,
        "SAME",
        lambda x, num_spatial_dims, padding: tf.nn.conv2d(x, kernel, 1, padding),
        filter_shape=kernel.shape[:2],
      )
    else:
      outputs = tf.nn.conv2d(inputs, kernel, strides=1, padding="SAME", dilations=dilations)
    if self.bias is not None:
      outputs = tf.nn.bias_add(outputs, tf.cast(self.bias, self.compute_dtype))
    return outputs


def needs_space_to_batch(compute_dtype: tf.DType) -> bool:
  """Whether dilated convolutions in `compute_dtype` must avoid TF's dilated CPU kernels."""
  if _has_gpu():
    return False
  return tf.as_dtype(compute_dtype) == tf.float16 or not _onednn_enabled()


@functools.lru_cache(maxsize=1)
def _has_gpu() -> bool:
  return bool(tf.config.list_physical_devices("GPU"))


@functools.lru_cache(maxsize=1)
def _onednn_enabled() -> bool:
  try:
    from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top

    return bool(_pywrap_util_port.IsMklEnabled())
  except (ImportError, AttributeError):  # not exported by this TF build: read the switch itself
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0"


def _drop_taps_outside(kernel: tf.Tensor, dilations, spatial_shape):
  """Keeps only the centre taps along axes where the dilation reaches past the whole input.

  With 'same' padding, a tap at offset k*rate (k != 0) reads only zero padding once rate >= the
  axis size, so the centre row/column alone gives the exact result. ASPP's rates 6, 12, 18 meet
  this on small bottlenecks (a 2x2 map at 32x32 input): the result is identical, cheaper, and
  avoids the CPU's float16 dilated-convolution gradient kernel, which TF does not implement.
  """
  centre = kernel.shape[0] // 2
  for axis, size in enumerate(spatial_shape):
    if size is not None and dilations[axis] >= size:
      # A slice (not a gather) keeps the kernel's gradient dense.
      kernel = kernel[centre : centre + 1] if axis == 0 else kernel[:, centre : centre + 1]
      dilations[axis] = 1
  return kernel, dilations
