"""Weight initialisers matching the Keras defaults the reference network was trained with.

Written as plain functions over `tf.random` ops so that `dunet/` carries no Keras dependency. The
global seed (`tf.random.set_seed`) makes them reproducible, as it does for Keras.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Sequence

import tensorflow as tf

from dunet import registry


def _fans(shape: Sequence[int]) -> tuple[int, int]:
  """Returns (fan_in, fan_out) for a dense [in, out] or conv [kh, kw, in, out] kernel shape."""
  if len(shape) == 2:
    return shape[0], shape[1]
  receptive_field = math.prod(shape[:-2])
  return shape[-2] * receptive_field, shape[-1] * receptive_field


def glorot_uniform(shape: Sequence[int], dtype: tf.DType = tf.float32) -> tf.Tensor:
  """Uniform in [-limit, limit] with limit = sqrt(6 / (fan_in + fan_out)) (Keras default)."""
  fan_in, fan_out = _fans(shape)
  limit = math.sqrt(6.0 / (fan_in + fan_out))
  return tf.random.uniform(shape, -limit, limit, dtype=dtype)


def he_normal(shape: Sequence[int], dtype: tf.DType = tf.float32) -> tf.Tensor:
  """Truncated normal with variance 2 / fan_in, as Keras' he_normal draws it.

  Keras divides the stddev by 0.8796..., the stddev of a standard normal truncated at two
  standard deviations, so that the truncated draw still has variance 2 / fan_in.
  """
  fan_in, _ = _fans(shape)
  stddev = math.sqrt(2.0 / fan_in) / 0.87962566103423978
  return tf.random.truncated_normal(shape, stddev=stddev, dtype=dtype)


def zeros(shape: Sequence[int], dtype: tf.DType = tf.float32) -> tf.Tensor:
  return tf.zeros(shape, dtype=dtype)


def ones(shape: Sequence[int], dtype: tf.DType = tf.float32) -> tf.Tensor:
  return tf.ones(shape, dtype=dtype)


Initializer = Callable[..., tf.Tensor]
# The kernel initialisers a model can be asked for by name (e.g. --vgg19_init).
KERNEL_INITIALIZERS: Dict[str, Initializer] = {
  "glorot_uniform": glorot_uniform,
  "he_normal": he_normal,
}


def get_kernel_initializer(name: str) -> Initializer:
  """The kernel initialiser called `name`; a ValueError lists the valid names."""
  return registry.lookup(KERNEL_INITIALIZERS, name, "initialiser")
