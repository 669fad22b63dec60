"""Batch normalisation with moving statistics, as Keras' BatchNormalization computes it."""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import tensorflow as tf

from dunet.nn import initializers


class MomentsRecorder:
  """What training-mode BatchNorms computed while `recording_moments()` was active.

  `records` holds (batch_norm, batch_mean, batch_variance) in call order: float32 [C] tensors,
  the biased variance (dunet/precise_bn.py pools them into population statistics).
  """

  def __init__(self):
    self.records: List[Tuple["BatchNorm", tf.Tensor, tf.Tensor]] = []


_active_recorders: List[MomentsRecorder] = []


@contextlib.contextmanager
def recording_moments() -> Iterator[MomentsRecorder]:
  """Within this block, training-mode BatchNorms record their batch moments and leave their
  moving statistics alone (they normalise with the batch moments, as in training).

  It acts when the BatchNorms are called, i.e. while a `tf.function` is being traced (or
  eagerly): wrap the model call inside the traced function, not the call of the function.
  """
  recorder = MomentsRecorder()
  _active_recorders.append(recorder)
  try:
    yield recorder
  finally:
    _active_recorders.remove(recorder)


class BatchNorm(tf.Module):
  """Normalises the channel axis of NHWC tensors.

  Training uses the batch's moments and moves the running statistics towards them:
  `moving = momentum * moving + (1 - momentum) * batch` with the biased (1/n) batch variance, as
  Keras 3 does. Inference uses the running statistics. The moments are computed in float32
  whatever the compute dtype (the fused kernel takes float16/bfloat16 inputs with float32 scale,
  offset and statistics).

  The moving statistics are `trainable=False` with `synchronization=ON_READ, aggregation=MEAN`:
  under a distribution strategy each replica updates its own copy from its own batch, and reading
  them (checkpoints, inference) averages the copies. This is Keras' default, unsynchronised
  batch norm.
  """

  def __init__(
    self,
    num_channels: int,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    compute_dtype: tf.DType = tf.float32,
    name: Optional[str] = None,
  ):
    """Creates gamma, beta (trainable) and moving mean/variance (not trainable), all [C] float32.

    Args:
      num_channels: size of the channel (last) axis.
      momentum: decay of the moving statistics (Keras default 0.99).
      epsilon: added to the variance (Keras default 1e-3).
      compute_dtype: dtype of the input cast and of the output.
      name: module name.
    """
    super().__init__(name=name)
    self.num_channels = num_channels
    self.momentum = momentum
    self.epsilon = epsilon
    self.compute_dtype = tf.as_dtype(compute_dtype)
    moving_kwargs = dict(
      trainable=False,
      synchronization=tf.VariableSynchronization.ON_READ,
      aggregation=tf.VariableAggregation.MEAN,
    )
    with self.name_scope:
      self.gamma = tf.Variable(initializers.ones([num_channels]), name="gamma")
      self.beta = tf.Variable(initializers.zeros([num_channels]), name="beta")
      self.moving_mean = tf.Variable(
        initializers.zeros([num_channels]), name="moving_mean", **moving_kwargs
      )
      self.moving_variance = tf.Variable(
        initializers.ones([num_channels]), name="moving_variance", **moving_kwargs
      )

  def __call__(self, inputs: tf.Tensor, is_training: bool) -> tf.Tensor:
    """Normalises `inputs`; in training also updates the moving statistics.

    Args:
      inputs: [B, H, W, C] tensor.
      is_training: a Python bool: batch statistics and a moving-statistics update if True,
        moving statistics otherwise.

    Returns:
      [B, H, W, C] tensor in `compute_dtype`.
    """
    inputs = tf.cast(inputs, self.compute_dtype)
    if not is_training:
      outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
        inputs,
        self.gamma,
        self.beta,
        mean=self.moving_mean,
        variance=self.moving_variance,
        epsilon=self.epsilon,
        is_training=False,
      )
      return outputs
    outputs, batch_mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
      inputs, self.gamma, self.beta, epsilon=self.epsilon, is_training=True
    )
    # The fused kernel returns the Bessel-corrected variance; Keras moves its statistics with the
    # biased one, so undo the n / (n - 1) factor.
    shape = tf.shape(inputs)
    count = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
    batch_variance = unbiased_variance * tf.maximum(count - 1.0, 1.0) / count
    decay = 1.0 - self.momentum
    # No gradient flows through the statistics update.
    batch_mean = tf.stop_gradient(batch_mean)
    batch_variance = tf.stop_gradient(batch_variance)
    if _active_recorders:
      _active_recorders[-1].records.append((self, batch_mean, batch_variance))
      return outputs
    self.moving_mean.assign_sub((self.moving_mean - batch_mean) * decay)
    self.moving_variance.assign_sub((self.moving_variance - batch_variance) * decay)
    return outputs
