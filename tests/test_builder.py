"""dunet/builder.py: the one recipe for model, optimizer, loss scale and the step functions."""

import numpy as np
import tensorflow as tf

from dunet import builder
from dunet import losses
from dunet import precision
from dunet.models.doubleunet import DoubleUNetOutputs
from dunet.nn.conv import Conv2D


class _TinyTwoHeads(tf.Module):
  """DoubleU-Net's outputs from two 1x1 convolutions: the builder never looks inside."""

  def __init__(self, compute_dtype=tf.float32, scale=1.0):
    super().__init__()
    self.scale = scale
    self.head1 = Conv2D(3, 1, 1, compute_dtype=compute_dtype)
    self.head2 = Conv2D(3, 1, 1, compute_dtype=compute_dtype)

  def __call__(self, images, is_training):
    del is_training
    return DoubleUNetOutputs(
      tf.cast(self.head1(images), tf.float32) * self.scale, tf.cast(self.head2(images), tf.float32)
    )


def _batch():
  rng = np.random.default_rng(0)
  return {
    "image": tf.constant(rng.uniform(size=(2, 8, 8, 3)), tf.float32),
    "mask": tf.constant(rng.uniform(size=(2, 8, 8, 1)) > 0.5, tf.float32),
  }


def test_parts_follow_the_policy_and_options():
  parts = builder.build_training_parts(
    precision.Policy("mixed_float16"),
    "nadam",
    0.01,
    make_model=_TinyTwoHeads,
    model_options=dict(scale=2.0),
    optimizer_options=dict(epsilon=0.5),
    initial_loss_scale=8.0,
    loss_scale_growth_interval=3,
  )
  assert parts.model.scale == 2.0 and parts.model.head1.compute_dtype == tf.float16
  assert type(parts.optimizer).__name__ == "Nadam" and parts.optimizer.epsilon == 0.5
  assert float(parts.loss_scale.scale.numpy()) == 8.0
  float32 = builder.build_training_parts(
    precision.Policy("float32"), "adam", 0.01, make_model=_TinyTwoHeads
  )
  assert isinstance(float32.loss_scale, precision.NoOpLossScale)


def test_same_seed_same_initial_weights():
  def initial():
    tf.random.set_seed(3)
    parts = builder.build_training_parts(
      precision.Policy("float32"), "adam", 0.01, make_model=_TinyTwoHeads
    )
    return [v.numpy() for v in parts.model.trainable_variables]

  for first, second in zip(initial(), initial()):
    np.testing.assert_array_equal(first, second)


def test_train_function_steps_and_counts_and_eval_function_scores():
  parts = builder.build_training_parts(
    precision.Policy("float32"), "adam", 0.01, make_model=_TinyTwoHeads
  )
  global_step = tf.Variable(0, dtype=tf.int64)
  train_function = builder.make_train_function(
    parts,
    loss_fn=losses.binary_cross_entropy,
    head_weights=(1.0, 1.0),
    global_batch_size=2,
    global_step=global_step,
  )
  before = [v.numpy() for v in parts.model.trainable_variables]
  measured = train_function(_batch())
  assert float(measured["update_applied"]) == 1.0 and int(global_step.numpy()) == 1
  assert any(
    not np.array_equal(v.numpy(), b) for v, b in zip(parts.model.trainable_variables, before)
  )
  result = builder.make_eval_function(
    parts.model, loss_fn=losses.binary_cross_entropy, head_weights=(1.0, 1.0), threshold=0.5
  )(_batch())
  assert result["counts/head2"].shape == (2, 4)
  assert int(np.sum(result["counts/head1"])) == 2 * 8 * 8
