"""Fully connected layer over the last axis."""

from __future__ import annotations

from typing import Callable, Optional

import tensorflow as tf

from dunet.nn import initializers


class Dense(tf.Module):
  """y = x @ W (+ b): the squeeze-excite block's two projections."""

  def __init__(
    self,
    input_size: int,
    output_size: int,
    with_bias: bool = True,
    kernel_init: Callable[..., tf.Tensor] = initializers.glorot_uniform,
    compute_dtype: tf.DType = tf.float32,
    name: Optional[str] = None,
  ):
    """Creates the kernel [input_size, output_size] and, if asked, the bias [output_size].

    Args:
      input_size: size of the last input axis.
      output_size: size of the last output axis.
      with_bias: whether to add a bias.
      kernel_init: initialiser for the kernel.
      compute_dtype: dtype of the arithmetic and of the output.
      name: module name.
    """
    super().__init__(name=name)
    self.input_size = input_size
    self.output_size = output_size
    self.compute_dtype = tf.as_dtype(compute_dtype)
    with self.name_scope:
      self.kernel = tf.Variable(kernel_init([input_size, output_size]), name="kernel")
      self.bias = tf.Variable(initializers.zeros([output_size]), name="bias") if with_bias else None

  def __call__(self, inputs: tf.Tensor) -> tf.Tensor:
    """Args: inputs [..., input_size]. Returns: [..., output_size] in `compute_dtype`."""
    inputs = tf.cast(inputs, self.compute_dtype)
    outputs = tf.linalg.matmul(inputs, tf.cast(self.kernel, self.compute_dtype))
    if self.bias is not None:
      outputs = outputs + tf.cast(self.bias, self.compute_dtype)
    return outputs
