"""Atrous spatial pyramid pooling (Chen et al., DeepLabv3) as DoubleU-Net configures it."""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from dunet.nn.batch_norm import BatchNorm
from dunet.nn.conv import Conv2D


class ASPP(tf.Module):
  """Five parallel branches, each followed by BatchNorm and ReLU, fused by a 1x1 convolution.

  Branches: image pooling (global average -> 1x1 conv with bias -> BN -> ReLU -> broadcast back to
  H x W, which is what bilinear upsampling of a 1x1 map gives), a 1x1 conv, and 3x3 convs with
  dilation 6, 12 and 18 (no bias). The concatenation goes through a 1x1 conv (no bias), BN, ReLU.
  """

  def __init__(
    self,
    input_channels: int,
    filters: int = 64,
    rates: Sequence[int] = (6, 12, 18),
    batch_norm_momentum: float = 0.99,
    compute_dtype: tf.DType = tf.float32,
    name: Optional[str] = None,
  ):
    """Args:
    input_channels: channels of the input feature map.
    filters: channels of every branch and of the output.
    rates: dilation rates of the 3x3 branches.
    batch_norm_momentum: decay of the BatchNorm moving statistics.
    compute_dtype: dtype of the arithmetic and of the output.
    name: module name.
    """
    super().__init__(name=name)
    self.input_channels = input_channels
    self.filters = filters
    self.rates = tuple(rates)
    with self.name_scope:
      self.pool_conv = Conv2D(
        input_channels, filters, 1, with_bias=True, compute_dtype=compute_dtype, name="pool_conv"
      )
      self.pool_bn = BatchNorm(
        filters, batch_norm_momentum, compute_dtype=compute_dtype, name="pool_bn"
      )
      self.conv_1x1 = Conv2D(
        input_channels, filters, 1, with_bias=False, compute_dtype=compute_dtype, name="conv_1x1"
      )
      self.bn_1x1 = BatchNorm(
        filters, batch_norm_momentum, compute_dtype=compute_dtype, name="bn_1x1"
      )
      self.atrous_convs = [
        Conv2D(
          input_channels,
          filters,
          3,
          dilation_rate=rate,
          with_bias=False,
          compute_dtype=compute_dtype,
          name=f"atrous_conv_r{rate}",
        )
        for rate in self.rates
      ]
      self.atrous_bns = [
        BatchNorm(
          filters, batch_norm_momentum, compute_dtype=compute_dtype, name=f"atrous_bn_r{rate}"
        )
        for rate in self.rates
      ]
      self.project = Conv2D(
        filters * (2 + len(self.rates)),
        filters,
        1,
        with_bias=False,
        compute_dtype=compute_dtype,
        name="project",
      )
      self.project_bn = BatchNorm(
        filters, batch_norm_momentum, compute_dtype=compute_dtype, name="project_bn"
      )

  def conv_batch_norm_pairs(self):
    """Each convolution and the BatchNorm applied to its output (for dunet.folding)."""
    atrous = tuple((f"atrous_convs.{i}", f"atrous_bns.{i}") for i in range(len(self.rates)))
    return (("pool_conv", "pool_bn"), ("conv_1x1", "bn_1x1"), *atrous, ("project", "project_bn"))

  def __call__(self, inputs: tf.Tensor, is_training: bool) -> tf.Tensor:
    """Args: inputs [B, H, W, input_channels]; is_training: BatchNorm mode.

    Returns: [B, H, W, filters] in the compute dtype.
    """
    pooled = tf.reduce_mean(tf.cast(inputs, tf.float32), axis=[1, 2], keepdims=True)
    pooled = tf.nn.relu(self.pool_bn(self.pool_conv(pooled), is_training))
    branches = [tf.broadcast_to(pooled, tf.concat([tf.shape(inputs)[:3], [self.filters]], 0))]
    branches.append(tf.nn.relu(self.bn_1x1(self.conv_1x1(inputs), is_training)))
    for conv, bn in zip(self.atrous_convs, self.atrous_bns):
      branches.append(tf.nn.relu(bn(conv(inputs), is_training)))
    fused = self.project(tf.concat(branches, axis=-1))
    return tf.nn.relu(self.project_bn(fused, is_training))
