"""Squeeze-and-excitation channel attention (Hu et al. 2018), as DoubleU-Net's blocks use it."""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from dunet.nn import initializers
from dunet.nn.dense import Dense


class SqueezeExcite(tf.Module):
  """Rescales channels by gates computed from their global average.

  global average -> dense C/ratio (ReLU, no bias) -> dense C (sigmoid, no bias) -> x * gates.
  Both dense kernels start from he_normal, as in the reference code.
  """

  def __init__(
    self,
    num_channels: int,
    ratio: int = 8,
    compute_dtype: tf.DType = tf.float32,
    name: Optional[str] = None,
  ):
    """Args:
    num_channels: channels of the input and output.
    ratio: bottleneck reduction; the hidden size is num_channels // ratio.
    compute_dtype: dtype of the arithmetic and of the output.
    name: module name.
    """
    super().__init__(name=name)
    if num_channels // ratio < 1:
      raise ValueError(f"SqueezeExcite needs num_channels >= ratio, got {num_channels} < {ratio}")
    self.num_channels = num_channels
    self.ratio = ratio
    self.compute_dtype = tf.as_dtype(compute_dtype)
    with self.name_scope:
      self.squeeze = Dense(
        num_channels,
        num_channels // ratio,
        with_bias=False,
        kernel_init=initializers.he_normal,
        compute_dtype=compute_dtype,
        name="squeeze",
      )
      self.excite = Dense(
        num_channels // ratio,
        num_channels,
        with_bias=False,
        kernel_init=initializers.he_normal,
        compute_dtype=compute_dtype,
        name="excite",
      )

  def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
    """Args: inputs [B, H, W, C]. Returns: [B, H, W, C] in `compute_dtype`."""
    inputs = tf.cast(inputs, self.compute_dtype)
    # Average in float32: a float16 sum over a large image can lose precision.
    pooled = tf.cast(tf.reduce_mean(tf.cast(inputs, tf.float32), axis=[1, 2]), self.compute_dtype)
    gates = tf.nn.sigmoid(self.excite(tf.nn.relu(self.squeeze(pooled))))
    return inputs * gates[:, tf.newaxis, tf.newaxis, :]
