import numpy as np
import tensorflow as tf

from dunet.nn.conv_block import ConvBlock


def test_shape_and_parameters():
  block = ConvBlock(5, 16)
  y = block(tf.random.normal([2, 8, 8, 5]), is_training=True)
  assert y.shape == (2, 8, 8, 16)
  expected = (9 * 5 * 16 + 16) + (9 * 16 * 16 + 16) + 2 * (2 * 16) + 2 * (16 * 2)
  assert sum(int(np.prod(v.shape)) for v in block.trainable_variables) == expected


def test_output_is_relu_scaled_by_gates():
  block = ConvBlock(3, 8)
  y = block(tf.random.normal([1, 4, 4, 3]), is_training=True).numpy()
  assert (y >= 0).all()  # ReLU output times sigmoid gates in (0, 1)
