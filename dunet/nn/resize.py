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
  """2x2 max pooling with stride 2 ('valid', as Keras' MaxPool2D((2, 2))).

  Args:
    inputs: [B, H, W, C] tensor with even H and W.

  Returns:
    [B, H/2, W/2, C] tensor of window maxima.

  Under tf.config.experimental.enable_op_determinism() TF refuses to XLA-compile MaxPoolGrad
  ("no deterministic XLA implementation"), so there the pool is written as reshape + reduce_max:
  the same forward values, and a gradient that splits ties evenly instead of giving them to the
  first maximum. In this network every pool follows a ReLU, so ties are zeros whose gradient the
  ReLU discards anyway. It is ~7x slower than MaxPool on CPU, hence only in that mode.
  """
  if not _op_determinism_enabled():
    return tf.nn.max_pool2d(inputs, ksize=2, strides=2, padding="VALID")
  height, width = inputs.shape[1], inputs.shape[2]
  if (height is not None and height % 2) or (width is not None and width % 2):
    raise ValueError(f"max_pool_2x2 needs an even height and width, got {height}x{width}")
  dynamic = tf.shape(inputs)
  windows = tf.reshape(
    inputs, [dynamic[0], dynamic[1] // 2, 2, dynamic[2] // 2, 2, inputs.shape[-1]]
  )
  return tf.reduce_max(windows, axis=[2, 4])


def _op_determinism_enabled() -> bool:
  # Not exported under tf.config in TF 2.21; read at trace time, like the ops it concerns.
  from tensorflow.python.framework import config  # pylint: disable=g-import-not-at-top

  return bool(getattr(config, "is_op_determinism_enabled", lambda: False)())
