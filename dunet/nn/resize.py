"""Spatial resizing used by the decoders and the ASPP image-pooling branch."""

from __future__ import annotations

import tensorflow as tf


def upsample_bilinear(inputs: tf.Tensor, factor: int = 2) -> tf.Tensor:
  """Bilinear upsampling by an integer factor with half-pixel centres (Keras' UpSampling2D).

  Args:
    inputs: [B, H, W, C] tensor.
    factor: integer scale for both spatial axes.

  Returns:
    [B, factor*H, factor*W, C] tensor in the dtype of `inputs` (tf.image.resize computes in
    float32; the result is cast back).
  """
  height, width = inputs.shape[1], inputs.shape[2]
  if height is None or width is None:
    dynamic = tf.shape(inputs)
    height, width = dynamic[1], dynamic[2]
  resized = tf.image.resize(inputs, [height * factor, width * factor], method="bilinear")
  return tf.cast(resized, inputs.dtype)


def max_pool_2x2(inputs: tf.Tensor) -> tf.Tensor:
  """2x2 max pooling with stride 2 ('valid', as Keras' MaxPool2D((2, 2)))."""
  return tf.nn.max_pool2d(inputs, ksize=2, strides=2, padding="VALID")
