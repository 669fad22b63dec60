"""The reference DoubleU-Net built with Keras 3: an independent oracle for tests only.

This follows the authors' `model.py` (DebeshJha/2020-CBMS-DoubleU-Net) layer for layer, in the
same creation order, so that Keras names the layers as the authors' checkpoints name them
(`block1_conv1` ... for VGG19, then `conv2d`, `batch_normalization`, `dense` with suffixes in
creation order). It is deliberately written from the paper's description and the reference
layout, not from dunet's code, so that agreement between the two is evidence, not tautology.

Nothing here belongs in `dunet/` or `tools/`: the library never imports Keras.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import keras
import numpy as np
from keras import layers


def _squeeze_excite(inputs, ratio: int = 8):
  """Global average -> dense C/ratio ReLU -> dense C sigmoid (both without bias) -> rescale."""
  filters = inputs.shape[-1]
  gates = layers.GlobalAveragePooling2D()(inputs)
  gates = layers.Reshape((1, 1, filters))(gates)
  gates = layers.Dense(
    filters // ratio, activation="relu", kernel_initializer="he_normal", use_bias=False
  )(gates)
  gates = layers.Dense(
    filters, activation="sigmoid", kernel_initializer="he_normal", use_bias=False
  )(gates)
  return layers.Multiply()([inputs, gates])


def _conv_block(inputs, filters: int):
  """2 x (3x3 conv with bias -> BatchNorm -> ReLU) -> squeeze-excite."""
  x = inputs
  for _ in range(2):
    x = layers.Conv2D(filters, (3, 3), padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
  return _squeeze_excite(x)


def _encoder1(inputs) -> Tuple[object, List[object]]:
  """VGG19's trunk (random weights: nothing is downloaded); returns (block5_conv4, skips)."""
  vgg = keras.applications.VGG19(include_top=False, weights=None, input_tensor=inputs)
  skips = [
    vgg.get_layer(name).output
    for name in ("block1_conv2", "block2_conv2", "block3_conv4", "block4_conv4")
  ]
  return vgg.get_layer("block5_conv4").output, skips


def _aspp(x, filters: int):
  """Image pooling + 1x1 + three dilated 3x3 branches, each with BN and ReLU, fused by 1x1."""
  height, width = x.shape[1], x.shape[2]
  pooled = layers.AveragePooling2D(pool_size=(height, width))(x)
  pooled = layers.Conv2D(filters, 1, padding="same")(pooled)
  pooled = layers.BatchNormalization()(pooled)
  pooled = layers.Activation("relu")(pooled)
  pooled = layers.UpSampling2D((height, width), interpolation="bilinear")(pooled)
  branches = [pooled]
  for kernel_size, rate in ((1, 1), (3, 6), (3, 12), (3, 18)):
    branch = layers.Conv2D(
      filters, kernel_size, dilation_rate=rate, padding="same", use_bias=False
    )(x)
    branch = layers.BatchNormalization()(branch)
    branches.append(layers.Activation("relu")(branch))
  y = layers.Concatenate()(branches)
  y = layers.Conv2D(filters, 1, padding="same", use_bias=False)(y)
  y = layers.BatchNormalization()(y)
  return layers.Activation("relu")(y)


def _decoder(x, skips_per_stage: Sequence[Sequence[object]]):
  """Four stages of bilinear x2 -> concat with the stage's skips -> conv_block."""
  for filters, skips in zip((256, 128, 64, 32), skips_per_stage):
    x = layers.UpSampling2D((2, 2), interpolation="bilinear")(x)
    x = layers.Concatenate()([x, *skips])
    x = _conv_block(x, filters)
  return x


def _encoder2(x) -> Tuple[object, List[object]]:
  skips = []
  for filters in (32, 64, 128, 256):
    x = _conv_block(x, filters)
    skips.append(x)
    x = layers.MaxPool2D((2, 2))(x)
  return x, skips


def _output_block(x):
  x = layers.Conv2D(1, (1, 1), padding="same")(x)
  return layers.Activation("sigmoid")(x)


def build_reference_model(height: int = 64, width: int = 64) -> keras.Model:
  """Builds the reference DoubleU-Net; its output is [B, H, W, 2]: head 1 and head 2 sigmoids.

  Args:
    height: input height (divisible by 16).
    width: input width (divisible by 16).

  Returns:
    An uncompiled keras.Model with random (initialiser) weights.
  """
  inputs = layers.Input((height, width, 3))
  x, vgg_skips = _encoder1(inputs)
  vgg_skips_deepest_first = vgg_skips[::-1]
  x = _aspp(x, 64)
  x = _decoder(x, [[skip] for skip in vgg_skips_deepest_first])
  outputs1 = _output_block(x)

  x = layers.Multiply()([inputs, outputs1])
  x, own_skips = _encoder2(x)
  x = _aspp(x, 64)
  x = _decoder(x, list(zip(vgg_skips_deepest_first, own_skips[::-1])))
  outputs2 = _output_block(x)
  return keras.Model(inputs, layers.Concatenate()([outputs1, outputs2]))


def randomize_weights(model: keras.Model, seed: int = 0, head_gain: float = 10.0) -> None:
  """Gives every weight a non-trivial random value, BatchNorm statistics included.

  Initialisers leave biases and BN beta/mean at 0 and gamma/variance at 1, which would hide a
  swapped or missing parameter; after this every array is distinct. Scales keep activations in
  a sane range through 40+ layers (so sigmoid outputs are not saturated).

  Args:
    model: the model to modify in place.
    seed: numpy seed.
    head_gain: factor on the two output convolutions' kernels.
  """
  rng = np.random.default_rng(seed)
  output_convs = [
    layer for layer in model.layers if isinstance(layer, layers.Conv2D) and layer.filters == 1
  ]
  for layer in model.layers:
    if isinstance(layer, layers.BatchNormalization):
      channels = layer.gamma.shape[0]
      layer.set_weights(
        [
          rng.uniform(0.5, 1.5, channels).astype(np.float32),  # gamma
          rng.normal(0.0, 0.1, channels).astype(np.float32),  # beta
          rng.normal(0.0, 0.2, channels).astype(np.float32),  # moving mean
          rng.uniform(0.5, 2.0, channels).astype(np.float32),  # moving variance
        ]
      )
    elif layer.weights:
      new_weights = []
      for weight in layer.get_weights():
        if weight.ndim == 1:  # Bias.
          new_weights.append(rng.normal(0.0, 0.05, weight.shape).astype(np.float32))
        else:  # Kernel: keep the initialiser's fan-based scale, just redraw.
          fan_in = int(np.prod(weight.shape[:-1]))
          new_weights.append(
            rng.normal(0.0, np.sqrt(2.0 / fan_in), weight.shape).astype(np.float32)
          )
      if layer in output_convs:
        # Each squeeze-excite gate (about 0.5 here) shrinks the signal that inference-mode
        # BatchNorm does not renormalise, so random heads hover at 0.5; a larger output kernel
        # spreads the logits over a few units and makes the comparison sensitive.
        new_weights[0] *= head_gain
      layer.set_weights(new_weights)


# ================================================================================================
# Training as the authors' train.py does: one loss over both heads, Keras optimizers, fit steps
# ================================================================================================
# metrics.py of the reference: the Dice smoothing its train.py trains with.
REFERENCE_DICE_SMOOTH = 1e-15


def reference_dice_coef(y_true, y_pred):
  """metrics.py's dice_coef: ONE ratio over every pixel of the batch and of both heads."""
  y_true = keras.ops.reshape(y_true, [-1])
  y_pred = keras.ops.reshape(y_pred, [-1])
  intersection = keras.ops.sum(y_true * y_pred)
  return (2.0 * intersection + REFERENCE_DICE_SMOOTH) / (
    keras.ops.sum(y_true) + keras.ops.sum(y_pred) + REFERENCE_DICE_SMOOTH
  )


def reference_dice_loss(y_true, y_pred):
  return 1.0 - reference_dice_coef(y_true, y_pred)


def reference_bce_dice_loss(y_true, y_pred):
  """metrics.py's bce_dice_loss: Keras BCE on probabilities (per pixel) plus the batch Dice."""
  return keras.losses.binary_crossentropy(y_true, y_pred) + reference_dice_loss(y_true, y_pred)


# The names dunet's --loss uses, mapped to the reference's loss functions. Keras' BCE applies to
# the sigmoid outputs (clipped to [1e-7, 1 - 1e-7]), as the reference's model.output is.
REFERENCE_LOSSES = {
  "bce": keras.losses.binary_crossentropy,
  "dice": reference_dice_loss,
  "bce_dice": reference_bce_dice_loss,
}
REFERENCE_OPTIMIZERS = {"adam": keras.optimizers.Adam, "nadam": keras.optimizers.Nadam}


def compile_for_training(
  model: keras.Model,
  optimizer: str = "nadam",
  learning_rate: float = 1e-4,
  loss: str = "bce",
  epsilon: float = 1e-7,
) -> None:
  """`model.compile(loss=..., optimizer=...)` as the reference train.py does it.

  Args:
    model: from `build_reference_model`.
    optimizer: "adam" or "nadam" (Keras', default betas).
    learning_rate: constant learning rate.
    loss: "bce", "dice" or "bce_dice" (the reference's functions, on both heads at once).
    epsilon: the optimizer's epsilon (Keras' default 1e-7).
  """
  model.compile(
    optimizer=REFERENCE_OPTIMIZERS[optimizer](learning_rate, epsilon=epsilon),
    loss=REFERENCE_LOSSES[loss],
  )


def both_heads(masks: np.ndarray) -> np.ndarray:
  """[B, H, W, 1] masks -> [B, H, W, 2]: the target the reference trains both heads against."""
  return np.concatenate([masks, masks], axis=-1)


def train_on_batches(
  model: keras.Model, batches: Sequence[Tuple[np.ndarray, np.ndarray]]
) -> List[float]:
  """One `fit` step per (images, masks) batch (`train_on_batch` runs fit's train function).

  Returns:
    The loss of each step, computed before that step's update (as Keras reports it).
  """
  return [float(model.train_on_batch(images, both_heads(masks))) for images, masks in batches]


def layer_weights_by_role(model: keras.Model, layer_name: str) -> dict:
  """{role: variable} of one Keras layer (kernel, bias, gamma, beta, moving_mean, ...)."""
  return {weight.name: weight for weight in model.get_layer(layer_name).weights}
