"""A stand-in for DoubleU-Net with its outputs at a tiny cost, for tests of the training machinery
(trainer, controller, the workdir) that do not need the real network."""

import tensorflow as tf

from dunet.models.doubleunet import DoubleUNetOutputs
from dunet.nn.batch_norm import BatchNorm
from dunet.nn.conv import Conv2D


class TinyNet(tf.Module):
  """conv -> BatchNorm -> ReLU -> two 1x1 heads: DoubleU-Net's outputs at a tiny cost."""

  def __init__(self, compute_dtype=tf.float32, batch_norm_momentum=0.99, **unused):
    super().__init__()
    del unused
    self.conv = Conv2D(3, 4, 3, compute_dtype=compute_dtype)
    self.bn = BatchNorm(4, momentum=batch_norm_momentum)
    self.head1 = Conv2D(4, 1, 1, compute_dtype=compute_dtype)
    self.head2 = Conv2D(4, 1, 1, compute_dtype=compute_dtype)

  def __call__(self, images, is_training):
    features = tf.nn.relu(self.bn(self.conv(images), is_training))
    return DoubleUNetOutputs(
      tf.cast(self.head1(features), tf.float32), tf.cast(self.head2(features), tf.float32)
    )
