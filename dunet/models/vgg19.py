"""VGG19's convolutional trunk (Simonyan & Zisserman 2015) as network 1's encoder, and a loader
for the ImageNet weights as Keras distributes them."""

from __future__ import annotations

import os
from typing import Dict, List, NamedTuple, Optional, Tuple

from absl import logging
import numpy as np
import tensorflow as tf

from dunet import errors
from dunet.nn import initializers
from dunet.nn.conv import Conv2D
from dunet.nn.resize import max_pool_2x2

# (block, number of 3x3 convs, filters) for VGG19's five blocks.
VGG19_BLOCKS: Tuple[Tuple[int, int, int], ...] = (
  (1, 2, 64),
  (2, 2, 128),
  (3, 4, 256),
  (4, 4, 512),
  (5, 4, 512),
)
# Layer names as Keras' VGG19 (and its weight files) call them, in order.
VGG19_LAYER_NAMES: Tuple[str, ...] = tuple(
  f"block{block}_conv{index}" for block, count, _ in VGG19_BLOCKS for index in range(1, count + 1)
)
# Outputs DoubleU-Net takes as skip connections (shallowest first).
SKIP_LAYER_NAMES: Tuple[str, ...] = ("block1_conv2", "block2_conv2", "block3_conv4", "block4_conv4")
# The file Keras downloads for VGG19(include_top=False, weights="imagenet"). dunet never
# downloads it; users pass its path.
IMAGENET_NOTOP_FILENAME = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"


class EncoderOutputs(NamedTuple):
  """What network 1's encoder hands on.

  Attributes:
    skips: block1_conv2 (H), block2_conv2 (H/2), block3_conv4 (H/4), block4_conv4 (H/8).
    bottleneck: block5_conv4 output at H/16 with 512 channels.
  """

  skips: Tuple[tf.Tensor, ...]
  bottleneck: tf.Tensor


class VGG19Encoder(tf.Module):
  """The 16 convolutions of VGG19 (3x3, bias, ReLU) with 2x2 max pools between blocks.

  There is no pool after block 5, as DoubleU-Net takes block5_conv4 as its bottleneck. Each conv
  is an attribute named as in Keras (`self.block1_conv1` ...), so the ImageNet file maps onto it
  by name.
  """

  def __init__(
    self,
    compute_dtype: tf.DType = tf.float32,
    name: Optional[str] = "vgg19",
    kernel_init: str = "glorot_uniform",
  ):
    """Args:
    compute_dtype: dtype of the arithmetic and of the outputs.
    name: module name.
    kernel_init: initialiser of the 16 kernels when no ImageNet weights are loaded
      (dunet.nn.initializers.KERNEL_INITIALIZERS): "glorot_uniform" as Keras' VGG19 (the
      reference); "he_normal" keeps the activations' scale through the 16 ReLU layers, which
      Glorot halves at every layer (the bottleneck starts about 2^-8 smaller than the input).
    """
    super().__init__(name=name)
    self.compute_dtype = tf.as_dtype(compute_dtype)
    self.kernel_init = kernel_init
    kernel_initializer = initializers.get_kernel_initializer(kernel_init)
    self.layer_names = VGG19_LAYER_NAMES
    with self.name_scope:
      input_channels = 3
      for block, count, filters in VGG19_BLOCKS:
        for index in range(1, count + 1):
          layer_name = f"block{block}_conv{index}"
          setattr(
            self,
            layer_name,
            Conv2D(
              input_channels,
              filters,
              3,
              with_bias=True,
              kernel_init=kernel_initializer,
              compute_dtype=compute_dtype,
              name=layer_name,
            ),
          )
          input_channels = filters

  def layer(self, layer_name: str) -> Conv2D:
    """Returns the convolution called `layer_name` (e.g. 'block3_conv4')."""
    if layer_name not in self.layer_names:
      raise KeyError(f"VGG19 has no layer {layer_name!r}; layers: {', '.join(self.layer_names)}")
    return getattr(self, layer_name)

  def __call__(self, images: tf.Tensor, is_training: bool = False) -> EncoderOutputs:
    """Runs the trunk.

    Args:
      images: [B, H, W, 3] preprocessed images, H and W divisible by 16.
      is_training: unused (VGG has no batch norm or dropout); kept for a uniform block interface.

    Returns:
      EncoderOutputs with the four skip tensors and the bottleneck.
    """
    del is_training
    x = tf.cast(images, self.compute_dtype)
    skips: List[tf.Tensor] = []
    for block, count, _ in VGG19_BLOCKS:
      if block > 1:
        x = max_pool_2x2(x)
      for index in range(1, count + 1):
        layer_name = f"block{block}_conv{index}"
        x = tf.nn.relu(getattr(self, layer_name)(x))
        if layer_name in SKIP_LAYER_NAMES:
          skips.append(x)
    return EncoderOutputs(skips=tuple(skips), bottleneck=x)


_INIT_TITLES = {"glorot_uniform": "Glorot-uniform", "he_normal": "He-normal"}


class WeightFileError(errors.CheckpointError):
  """The weight file is missing, unreadable, or not the VGG19 notop layout (the message says
  which)."""


def read_imagenet_weights(path: str) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """Reads Keras' VGG19 notop h5 file into {layer name: (HWIO kernel, bias)}.

  The file has one group per layer (`block1_conv1` ...), each listing its datasets in the
  `weight_names` attribute (kernel first, then bias). Shapes are checked against VGG19.

  Args:
    path: path of `vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5` (or a file in its layout).

  Returns:
    A dict with all 16 VGG19 layers.

  Raises:
    WeightFileError: missing or unreadable file, missing layer, or a wrong shape; the message
      names the file and the layer.
  """
  import h5py  # Only needed when weights are loaded.

  if not os.path.isfile(path):
    raise WeightFileError(
      f"VGG19 weight file not found: {path!r}. dunet never downloads weights: get "
      f"{IMAGENET_NOTOP_FILENAME} (Keras' VGG19 ImageNet weights without the top) and pass its "
      "path."
    )
  try:
    h5 = h5py.File(path, "r")
  except OSError as error:
    raise WeightFileError(f"cannot read VGG19 weight file {path!r} as HDF5: {error}") from error
  weights: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
  with h5:
    # Full-model saves nest the layers under 'model_weights'; weight-only saves keep them at the
    # root.
    root = h5["model_weights"] if "model_weights" in h5 else h5
    input_channels = 3
    for block, count, filters in VGG19_BLOCKS:
      for index in range(1, count + 1):
        layer_name = f"block{block}_conv{index}"
        expected = ((3, 3, input_channels, filters), (filters,))
        input_channels = filters
        if layer_name not in root:
          raise WeightFileError(
            f"{path}: layer {layer_name!r} is missing (is this the VGG19 "
            f"notop file?); layers present: {sorted(root.keys())[:20]}"
          )
        group = root[layer_name]
        arrays = _layer_arrays(group)
        if len(arrays) != 2:
          raise WeightFileError(
            f"{path}: layer {layer_name!r} holds {len(arrays)} arrays; expected a kernel and a bias"
          )
        kernel, bias = arrays
        for what, array, shape in (("kernel", kernel, expected[0]), ("bias", bias, expected[1])):
          if tuple(array.shape) != shape:
            raise WeightFileError(
              f"{path}: {layer_name} {what} has shape {tuple(array.shape)}; VGG19 needs {shape}"
            )
        weights[layer_name] = (kernel.astype(np.float32), bias.astype(np.float32))
  return weights


def _layer_arrays(group) -> List[np.ndarray]:
  """The arrays of one layer group, in the order its `weight_names` attribute gives."""
  names = group.attrs.get("weight_names")
  if names is not None:
    return [np.asarray(group[_decode(name)]) for name in names]
  # Files without the attribute: collect datasets, kernel (rank 4) before bias.
  arrays: List[np.ndarray] = []
  group.visititems(
    lambda _, item: arrays.append(np.asarray(item)) if hasattr(item, "shape") else None
  )
  return sorted(arrays, key=lambda array: -array.ndim)


def _decode(name) -> str:
  return name.decode("utf8") if isinstance(name, bytes) else str(name)


def load_imagenet_weights(encoder_or_model: tf.Module, path: str) -> int:
  """Assigns the ImageNet VGG19 weights from Keras' notop h5 file to the encoder.

  Args:
    encoder_or_model: a `VGG19Encoder`, or a model with a `vgg19` attribute (DoubleUNet).
    path: the h5 file. Its weights expect caffe preprocessing: BGR channel order with the ImageNet
      means [103.939, 116.779, 123.68] subtracted, values in [0, 255] (dunet's
      `--preprocessing=caffe`).

  Returns:
    The number of scalars loaded (20,024,384 for VGG19).

  Raises:
    WeightFileError: see `read_imagenet_weights`.
  """
  encoder = getattr(encoder_or_model, "vgg19", encoder_or_model)
  if not isinstance(encoder, VGG19Encoder):
    raise TypeError(
      f"expected a VGG19Encoder or a model with a .vgg19 encoder, got "
      f"{type(encoder_or_model).__name__}"
    )
  weights = read_imagenet_weights(path)
  loaded = 0
  for layer_name, (kernel, bias) in weights.items():
    conv = encoder.layer(layer_name)
    conv.kernel.assign(kernel)
    conv.bias.assign(bias)
    loaded += kernel.size + bias.size
  logging.info("Loaded ImageNet VGG19 weights (%d scalars) from %s", loaded, path)
  return loaded


def maybe_load_imagenet_weights(encoder_or_model: tf.Module, path: Optional[str]) -> int:
  """Loads the ImageNet weights if `path` is given; otherwise logs that the encoder starts random.

  Args:
    encoder_or_model: as for `load_imagenet_weights`.
    path: the h5 file, or None/"" to keep the initialisers.

  Returns:
    The number of scalars loaded (0 without a file).
  """
  if not path:
    encoder = getattr(encoder_or_model, "vgg19", encoder_or_model)
    init_name = getattr(encoder, "kernel_init", "glorot_uniform")
    logging.info(
      "No VGG19 weight file given: network 1's encoder starts from the %s "
      "initialisers, not ImageNet (pass --vgg19_weights=%s to start from ImageNet).",
      _INIT_TITLES.get(init_name, init_name),
      IMAGENET_NOTOP_FILENAME,
    )
    return 0
  return load_imagenet_weights(encoder_or_model, path)
