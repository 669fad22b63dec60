"""DoubleU-Net (Jha et al., CBMS 2020, arXiv 2006.04868) as tf.Modules over tf.nn ops.

Network 1: VGG19 encoder -> ASPP -> decoder over the VGG skips -> head 1.
Network 2: (image x sigmoid(head 1)) -> its own encoder -> ASPP -> decoder over both networks'
skips -> head 2. Head 2 is the final mask; head 1 is supervised too (deep supervision).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import tensorflow as tf

from dunet.models.vgg19 import VGG19Encoder
from dunet.nn.aspp import ASPP
from dunet.nn.conv import Conv2D
from dunet.nn.conv_block import ConvBlock
from dunet.nn.resize import max_pool_2x2, upsample_bilinear

# Channels of the four VGG19 skips, shallowest first (block1_conv2 ... block4_conv4).
VGG_SKIP_CHANNELS: Tuple[int, ...] = (64, 128, 256, 512)
VGG_BOTTLENECK_CHANNELS = 512
# The encoder/decoder widths of the reference model.
ENCODER2_FILTERS: Tuple[int, ...] = (32, 64, 128, 256)
DECODER_FILTERS: Tuple[int, ...] = (256, 128, 64, 32)
# Four 2x poolings: H and W must be divisible by this.
SIZE_DIVISOR = 16


class DoubleUNetOutputs(NamedTuple):
  """Both heads as float32 logits, [B, H, W, 1] each."""

  logits1: tf.Tensor
  logits2: tf.Tensor

  def probabilities(self) -> "DoubleUNetOutputs":
    """The same structure with sigmoid applied to both heads."""
    return DoubleUNetOutputs(tf.sigmoid(self.logits1), tf.sigmoid(self.logits2))


class Decoder(tf.Module):
  """Four stages of (bilinear x2 -> concat with skips -> ConvBlock), deepest skip first."""

  def __init__(
    self,
    input_channels: int,
    skip_channels_per_stage: Sequence[int],
    filters: Sequence[int] = DECODER_FILTERS,
    batch_norm_momentum: float = 0.99,
    compute_dtype: tf.DType = tf.float32,
    name: Optional[str] = None,
  ):
    """Args:
    input_channels: channels of the decoder input (the ASPP output).
    skip_channels_per_stage: total channels concatenated at each stage, deepest first.
    filters: ConvBlock widths per stage.
    compute_dtype: dtype of the arithmetic and of the output.
    name: module name.
    """
    super().__init__(name=name)
    if len(skip_channels_per_stage) != len(filters):
      raise ValueError("one skip width per decoder stage is needed")
    with self.name_scope:
      self.blocks = []
      channels = input_channels
      for stage, (skip_channels, width) in enumerate(zip(skip_channels_per_stage, filters)):
        self.blocks.append(
          ConvBlock(
            channels + skip_channels,
            width,
            batch_norm_momentum=batch_norm_momentum,
            compute_dtype=compute_dtype,
            name=f"block{stage}",
          )
        )
        channels = width

  def __call__(
    self, inputs: tf.Tensor, skips_per_stage: Sequence[Sequence[tf.Tensor]], is_training: bool
  ) -> tf.Tensor:
    """Args:
      inputs: [B, H/16, W/16, C] bottleneck features.
      skips_per_stage: for each stage (deepest first) the tensors concatenated after upsampling.
      is_training: BatchNorm mode.

    Returns:
      [B, H, W, filters[-1]] features.
    """
    x = inputs
    for block, skips in zip(self.blocks, skips_per_stage):
      x = upsample_bilinear(x, 2)
      x = tf.concat([x, *[tf.cast(skip, x.dtype) for skip in skips]], axis=-1)
      x = block(x, is_training)
    return x


class Encoder2(tf.Module):
  """Network 2's encoder: for each width, ConvBlock (kept as a skip) then 2x2 max pool."""

  def __init__(
    self,
    input_channels: int = 3,
    filters: Sequence[int] = ENCODER2_FILTERS,
    batch_norm_momentum: float = 0.99,
    compute_dtype: tf.DType = tf.float32,
    name: Optional[str] = None,
  ):
    super().__init__(name=name)
    with self.name_scope:
      self.blocks = []
      channels = input_channels
      for stage, width in enumerate(filters):
        self.blocks.append(
          ConvBlock(
            channels,
            width,
            batch_norm_momentum=batch_norm_momentum,
            compute_dtype=compute_dtype,
            name=f"block{stage}",
          )
        )
        channels = width

  def __call__(
    self, inputs: tf.Tensor, is_training: bool
  ) -> Tuple[tf.Tensor, Tuple[tf.Tensor, ...]]:
    """Args: inputs [B, H, W, 3]; is_training: BatchNorm mode.

    Returns: (pooled features [B, H/16, W/16, filters[-1]], skips shallowest first).
    """
    x = inputs
    skips = []
    for block in self.blocks:
      x = block(x, is_training)
      skips.append(x)
      x = max_pool_2x2(x)
    return x, tuple(skips)


class DoubleUNet(tf.Module):
  """DoubleU-Net exactly as the authors' Keras model.py builds it.

  All variables are float32 and exist once the constructor returns (29,290,274 trainable scalars
  plus 7,296 BatchNorm moving statistics, for any input size). `compute_dtype` selects float32,
  float16 or bfloat16 arithmetic; BatchNorm statistics and both returned heads are float32.

  Example:
    model = DoubleUNet()
    outputs = model(images, is_training=False)   # DoubleUNetOutputs of logits
    mask = outputs.probabilities().logits2 > 0.5
  """

  def __init__(
    self,
    compute_dtype: tf.DType = tf.float32,
    aspp_filters: int = 64,
    batch_norm_momentum: float = 0.99,
    vgg19_kernel_init: str = "glorot_uniform",
    name: Optional[str] = "double_u_net",
  ):
    """Builds every variable.

    Args:
      compute_dtype: tf.float32, tf.float16 or tf.bfloat16.
      aspp_filters: width of both ASPP blocks (64 in the paper).
      batch_norm_momentum: decay of every BatchNorm's moving statistics (Keras' 0.99 in the
        reference; a short run, like the CPU demo, needs less, e.g. 0.9, or inference-mode
        statistics are still mostly their initial values when it ends).
      vgg19_kernel_init: initialiser of network 1's VGG19 kernels ("glorot_uniform" as the
        reference's Keras VGG19; "he_normal": see VGG19Encoder). ImageNet weights, when loaded,
        replace them.
      name: module name.
    """
    super().__init__(name=name)
    compute_dtype = tf.as_dtype(compute_dtype)
    if compute_dtype not in (tf.float32, tf.float16, tf.bfloat16):
      raise ValueError(
        f"compute_dtype must be float32, float16 or bfloat16, got {compute_dtype.name}"
      )
    self.compute_dtype = compute_dtype
    kw = dict(compute_dtype=compute_dtype)
    bn = dict(batch_norm_momentum=batch_norm_momentum)
    with self.name_scope:
      # Network 1.
      self.vgg19 = VGG19Encoder(name="vgg19", kernel_init=vgg19_kernel_init, **kw)
      self.aspp1 = ASPP(VGG_BOTTLENECK_CHANNELS, aspp_filters, name="aspp1", **bn, **kw)
      self.decoder1 = Decoder(aspp_filters, VGG_SKIP_CHANNELS[::-1], name="decoder1", **bn, **kw)
      self.head1 = Conv2D(DECODER_FILTERS[-1], 1, 1, with_bias=True, name="head1", **kw)
      # Network 2.
      self.encoder2 = Encoder2(3, ENCODER2_FILTERS, name="encoder2", **bn, **kw)
      self.aspp2 = ASPP(ENCODER2_FILTERS[-1], aspp_filters, name="aspp2", **bn, **kw)
      both_skips = [vgg + own for vgg, own in zip(VGG_SKIP_CHANNELS[::-1], ENCODER2_FILTERS[::-1])]
      self.decoder2 = Decoder(aspp_filters, both_skips, name="decoder2", **bn, **kw)
      self.head2 = Conv2D(DECODER_FILTERS[-1], 1, 1, with_bias=True, name="head2", **kw)

  def __call__(self, images: tf.Tensor, is_training: bool = False) -> DoubleUNetOutputs:
    """Segments a batch.

    Args:
      images: [B, H, W, 3] preprocessed images (any float dtype), H and W divisible by 16.
      is_training: True uses batch statistics in BatchNorm and updates the moving statistics.

    Returns:
      DoubleUNetOutputs(logits1, logits2), float32 [B, H, W, 1] each.

    Raises:
      ValueError: when the static shape is not [B, H, W, 3] with H, W divisible by 16.
    """
    check_input_shape(images.shape)
    images = tf.cast(images, self.compute_dtype)
    # Network 1.
    encoded = self.vgg19(images, is_training)
    x = self.aspp1(encoded.bottleneck, is_training)
    vgg_skips_deepest_first = encoded.skips[::-1]
    x = self.decoder1(x, [[skip] for skip in vgg_skips_deepest_first], is_training)
    logits1 = self.head1(x)
    # Network 2 sees the image gated by network 1's probability map.
    gated = images * tf.sigmoid(logits1)
    x, own_skips = self.encoder2(gated, is_training)
    x = self.aspp2(x, is_training)
    x = self.decoder2(x, list(zip(vgg_skips_deepest_first, own_skips[::-1])), is_training)
    logits2 = self.head2(x)
    return DoubleUNetOutputs(tf.cast(logits1, tf.float32), tf.cast(logits2, tf.float32))

  def predict_probabilities(self, images: tf.Tensor) -> DoubleUNetOutputs:
    """Inference-mode sigmoid probabilities of both heads (head 2 is the final mask)."""
    return self(images, is_training=False).probabilities()


def check_input_shape(shape: tf.TensorShape) -> None:
  """Raises ValueError unless `shape` is [B, H, W, 3] with H, W (where known) divisible by 16."""
  shape = tf.TensorShape(shape)
  if shape.rank is not None and shape.rank != 4:
    raise ValueError(f"DoubleUNet expects images of shape [batch, height, width, 3], got {shape}")
  if shape.rank is None:
    return
  if shape[-1] is not None and shape[-1] != 3:
    raise ValueError(f"DoubleUNet expects 3 channels, got {shape[-1]} (shape {shape})")
  for axis_name, size in (("height", shape[1]), ("width", shape[2])):
    if size is not None and size % SIZE_DIVISOR:
      lower = size // SIZE_DIVISOR * SIZE_DIVISOR
      raise ValueError(
        f"image {axis_name} {size} is not divisible by {SIZE_DIVISOR} (DoubleU-Net pools four "
        f"times); resize to {lower or SIZE_DIVISOR} or {lower + SIZE_DIVISOR}"
      )
