"""DoubleU-Net's conv_block: two (conv 3x3 -> BN -> ReLU) followed by squeeze-excite."""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from dunet.nn.batch_norm import BatchNorm
from dunet.nn.conv import Conv2D
from dunet.nn.squeeze_excite import SqueezeExcite


class ConvBlock(tf.Module):
  """2 x (3x3 conv with bias -> BatchNorm -> ReLU) -> SqueezeExcite(ratio 8)."""

  def __init__(
    self,
    input_channels: int,
    filters: int,
    se_ratio: int = 8,
    batch_norm_momentum: float = 0.99,
    compute_dtype: tf.DType = tf.float32,
    name: Optional[str] = None,
  ):
    """Args:
    input_channels: channels of the input.
    filters: channels of both convolutions and of the output.
    se_ratio: squeeze-excite reduction ratio.
    batch_norm_momentum: decay of the BatchNorm moving statistics.
    compute_dtype: dtype of the arithmetic and of the output.
    name: module name.
    """
    super().__init__(name=name)
    self.input_channels = input_channels
    self.filters = filters
    with self.name_scope:
      self.conv1 = Conv2D(input_channels, filters, 3, compute_dtype=compute_dtype, name="conv1")
      self.bn1 = BatchNorm(filters, batch_norm_momentum, compute_dtype=compute_dtype, name="bn1")
      self.conv2 = Conv2D(filters, filters, 3, compute_dtype=compute_dtype, name="conv2")
      self.bn2 = BatchNorm(filters, batch_norm_momentum, compute_dtype=compute_dtype, name="bn2")
      self.se = SqueezeExcite(filters, se_ratio, compute_dtype=compute_dtype, name="se")

  def conv_batch_norm_pairs(self):
    """Each convolution and the BatchNorm applied to its output (for dunet.folding)."""
    return (("conv1", "bn1"), ("conv2", "bn2"))

  def __call__(self, inputs: tf.Tensor, is_training: bool) -> tf.Tensor:
    """Args: inputs [B, H, W, input_channels]; is_training: BatchNorm mode.

    Returns: [B, H, W, filters] in the compute dtype.
    """
    x = tf.nn.relu(self.bn1(self.conv1(inputs), is_training))
    x = tf.nn.relu(self.bn2(self.conv2(x), is_training))
    return self.se(x)
