"""Every building block, described once so that generic conformance tests can exercise it.

A descriptor builds a module with float32 variables and a sample input; `apply` calls it the way
the network does. Add a new block here and it is run through XLA, checkpointing, SavedModel and
MirroredStrategy by tests/conformance/test_conformance.py.
"""

from typing import Callable, NamedTuple

import tensorflow as tf

from dunet.models.doubleunet import Decoder, DoubleUNet, Encoder2
from dunet.models.vgg19 import VGG19Encoder
from dunet.nn.aspp import ASPP
from dunet.nn.batch_norm import BatchNorm
from dunet.nn.conv import Conv2D
from dunet.nn.conv_block import ConvBlock
from dunet.nn.dense import Dense
from dunet.nn.squeeze_excite import SqueezeExcite


class Descriptor(NamedTuple):
  name: str
  create: Callable[[], tf.Module]
  input_shape: tuple
  # apply(module, inputs, is_training) -> a tensor or a nest of tensors.
  apply: Callable
  # Absolute tolerance of compiled (XLA) against eager outputs in training mode (batch
  # statistics); in inference mode every block is held to 1e-4.
  xla_training_atol: float = 1e-4


def _plain(module, inputs, is_training):
  del is_training
  return module(inputs)


def _with_mode(module, inputs, is_training):
  return module(inputs, is_training)


def _decoder(module, inputs, is_training):
  # Skips made from the input so that the block sees real, shape-consistent tensors.
  skips = [
    [tf.image.resize(inputs[..., :4], [inputs.shape[1] * 2 ** (i + 1)] * 2)] for i in range(2)
  ]
  return module(inputs, skips, is_training)


DESCRIPTORS = (
  Descriptor("conv", lambda: Conv2D(3, 4, 3, dilation_rate=2), (4, 8, 8, 3), _plain),
  Descriptor("dense", lambda: Dense(6, 5), (4, 6), _plain),
  Descriptor("batch_norm", lambda: BatchNorm(3), (4, 8, 8, 3), _with_mode),
  Descriptor("squeeze_excite", lambda: SqueezeExcite(16), (4, 8, 8, 16), _plain),
  Descriptor("aspp", lambda: ASPP(8, 8), (4, 8, 8, 8), _with_mode),
  Descriptor("conv_block", lambda: ConvBlock(3, 8), (4, 8, 8, 3), _with_mode),
  Descriptor("vgg19", VGG19Encoder, (2, 16, 16, 3), _with_mode),
  Descriptor("encoder2", Encoder2, (2, 16, 16, 3), _with_mode),
  Descriptor("decoder", lambda: Decoder(8, [4, 4], [8, 8]), (2, 4, 4, 8), _decoder),
  # The whole network in training mode normalises its 2x2 bottleneck by batch statistics of 8
  # values per channel, which magnifies float32 reassociation differences between XLA's fused
  # kernels and TF's; 1.4e-4 was seen on one of 2,048 outputs of order 0.3.
  Descriptor("double_u_net", DoubleUNet, (2, 32, 32, 3), _with_mode, xla_training_atol=1e-3),
)
