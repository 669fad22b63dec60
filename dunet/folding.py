"""BatchNorm folded into the convolution before it, for inference.

In inference mode a BatchNorm is an affine map per channel, y = (x - mean) * s + beta with
s = gamma / sqrt(variance + epsilon), and the convolution before it is linear, so the pair is one
convolution with kernel k * s (scaled along its output channels) and bias (b - mean) * s + beta.
`fold_batch_norms` returns an inference-only copy of a model in which every such pair is one
convolution with a bias: the CPU then runs fused convolution + bias + ReLU kernels, and exported
graphs (SavedModel, ONNX, TensorRT) hold one weight tensor pair per convolution instead of a
convolution, a bias add and a BatchNorm with four statistics.

The unfolded model stays the one that trains and that checkpoints hold; folding is applied where
a trained model is served (dunet.serving.Segmenter folds its members).

Modules say which (convolution, BatchNorm) attribute pairs they hold, each BatchNorm applied
directly to its convolution's output, with a `conv_batch_norm_pairs()` method returning
attribute paths ("conv1", or "atrous_convs.0" for an element of a list attribute).
"""

from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from dunet.errors import ConfigError
from dunet.nn.batch_norm import BatchNorm
from dunet.nn.conv import Conv2D


class FoldedBatchNorm(tf.Module):
  """Stands where a BatchNorm was folded into its convolution: passes its inputs through.

  Inference only: the statistics and the affine map now live in the convolution's kernel and bias.
  """

  def __init__(self, compute_dtype: tf.DType = tf.float32, name: Optional[str] = None):
    super().__init__(name=name)
    self.compute_dtype = tf.as_dtype(compute_dtype)

  def __call__(self, inputs: tf.Tensor, is_training: bool) -> tf.Tensor:
    """Args: inputs [B, H, W, C]; is_training: must be False.

    Returns: `inputs` in the compute dtype (what the folded convolution already normalised).

    Raises:
      ConfigError: when called in training mode (a folded model cannot train).
    """
    if is_training:
      raise ConfigError(
        "this model's BatchNorms are folded into its convolutions (dunet.folding): it is for "
        "inference only; train the unfolded model"
      )
    return tf.cast(inputs, self.compute_dtype)


def folded_parameters(
  kernel: np.ndarray,
  bias: Optional[np.ndarray],
  gamma: np.ndarray,
  beta: np.ndarray,
  mean: np.ndarray,
  variance: np.ndarray,
  epsilon: float,
) -> Tuple[np.ndarray, np.ndarray]:
  """The kernel and bias of conv -> inference-mode BatchNorm as one convolution.

  Computed in float64 and rounded once to float32, so the folded weights are as close to the
  exact composition as float32 can hold.

  Args:
    kernel: [..., C_in, C_out] convolution kernel.
    bias: [C_out] convolution bias, or None for a convolution without one.
    gamma, beta, mean, variance: the BatchNorm's [C_out] scale, offset and moving statistics.
    epsilon: the BatchNorm's epsilon.

  Returns:
    (kernel [..., C_in, C_out], bias [C_out]), float32.
  """
  scale = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(variance, np.float64) + epsilon)
  conv_bias = np.zeros_like(scale) if bias is None else np.asarray(bias, np.float64)
  folded_kernel = np.asarray(kernel, np.float64) * scale
  folded_bias = (conv_bias - np.asarray(mean, np.float64)) * scale + np.asarray(beta, np.float64)
  return folded_kernel.astype(np.float32), folded_bias.astype(np.float32)


def fold_into(conv: Conv2D, batch_norm: BatchNorm) -> None:
  """Replaces `conv`'s kernel and bias by those of conv -> `batch_norm` (inference mode).

  `conv` gets new float32 variables (a bias one where it had none) and becomes inference-only
  (a dilated one then uses TF's direct dilated kernel even where that kernel has no gradient);
  `batch_norm` is unchanged.
  """
  kernel, bias = folded_parameters(
    conv.kernel.numpy(),
    None if conv.bias is None else conv.bias.numpy(),
    batch_norm.gamma.numpy(),
    batch_norm.beta.numpy(),
    batch_norm.moving_mean.numpy(),
    batch_norm.moving_variance.numpy(),
    batch_norm.epsilon,
  )
  with conv.name_scope:
    conv.kernel = tf.Variable(kernel, name="kernel")
    conv.bias = tf.Variable(bias, name="bias")
  conv.with_bias = True
  conv.inference_only = True


def fold_batch_norms(model: tf.Module) -> tf.Module:
  """An inference-only copy of `model` with every declared conv -> BatchNorm pair folded.

  The copy computes what `model(images, is_training=False)` computes, to float32 rounding, with
  each BatchNorm replaced by a FoldedBatchNorm (so it raises in training mode). `model` is left
  as it is. A model already folded is returned as it is.

  Args:
    model: a tf.Module whose submodules declare `conv_batch_norm_pairs()` (DoubleUNet's
      ConvBlocks and ASPPs do); eager variables (not under a distribution strategy).

  Returns:
    The folded copy; its `folded_batch_norms` attribute counts the BatchNorms folded.
  """
  if getattr(model, "folded_batch_norms", None) is not None:
    return model
  folded = copy.deepcopy(model)
  count = 0
  for module in (folded, *folded.submodules):
    pairs: Sequence[Tuple[str, str]] = (
      module.conv_batch_norm_pairs() if hasattr(module, "conv_batch_norm_pairs") else ()
    )
    for conv_path, batch_norm_path in pairs:
      conv, batch_norm = _get(module, conv_path), _get(module, batch_norm_path)
      if isinstance(batch_norm, FoldedBatchNorm):
        continue
      fold_into(conv, batch_norm)
      _set(module, batch_norm_path, FoldedBatchNorm(batch_norm.compute_dtype, name="folded_bn"))
      count += 1
  folded.folded_batch_norms = count
  return folded


def remaining_batch_norms(model: tf.Module) -> List[BatchNorm]:
  """The BatchNorms of `model` that are not folded (a folded DoubleUNet has none)."""
  return [module for module in (model, *model.submodules) if isinstance(module, BatchNorm)]


def _get(module: tf.Module, path: str):
  value = module
  for part in path.split("."):
    value = value[int(part)] if part.isdigit() else getattr(value, part)
  return value


def _set(module: tf.Module, path: str, new_value) -> None:
  *parents, last = path.split(".")
  if last.isdigit():
    # A new list: TensorFlow's tracked lists cannot be saved once an element was replaced.
    elements = list(_get(module, ".".join(parents)))
    elements[int(last)] = new_value
    _set(module, ".".join(parents), elements)
    return
  owner = _get(module, ".".join(parents)) if parents else module
  setattr(owner, last, new_value)
