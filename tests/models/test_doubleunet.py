"""DoubleUNet: shapes, variable counts, gradients, BatchNorm modes, low precision, input checks."""

import numpy as np
import pytest
import tensorflow as tf

from dunet.models import DoubleUNet, DoubleUNetOutputs

# The reference Keras model: 29,290,274 trainable + 7,296 BatchNorm moving statistics.
TRAINABLE_SCALARS = 29_290_274
MOVING_STATISTICS = 7_296


def _count(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


@pytest.fixture(scope="module")
def model():
  tf.random.set_seed(0)
  return DoubleUNet()


def test_variables_exist_at_construction_with_reference_counts(model):
  assert _count(model.trainable_variables) == TRAINABLE_SCALARS
  assert _count(model.variables) - _count(model.trainable_variables) == MOVING_STATISTICS
  assert _count(model.variables) == 29_297_570
  assert all(v.dtype == tf.float32 for v in model.variables)
  names = [v.name for v in model.variables]
  assert len(names) == len(set(names)), "variable names must be unique (checkpoints, debugging)"


@pytest.mark.parametrize("height,width", [(64, 64), (32, 80)])
def test_both_heads_have_input_size_and_counts_do_not_change(model, height, width):
  outputs = model(tf.random.uniform([2, height, width, 3]), is_training=False)
  assert isinstance(outputs, DoubleUNetOutputs)
  assert outputs.logits1.shape == (2, height, width, 1)
  assert outputs.logits2.shape == (2, height, width, 1)
  assert outputs.logits1.dtype == outputs.logits2.dtype == tf.float32
  assert _count(model.trainable_variables) == TRAINABLE_SCALARS
  probabilities = outputs.probabilities()
  np.testing.assert_allclose(probabilities.logits2.numpy(), tf.sigmoid(outputs.logits2).numpy())


def test_positional_training_argument(model):
  images = tf.random.uniform([1, 32, 32, 3])
  np.testing.assert_allclose(
    model(images, False).logits2.numpy(), model(images, is_training=False).logits2.numpy()
  )
  np.testing.assert_allclose(
    model.predict_probabilities(images).logits2.numpy(),
    tf.sigmoid(model(images, False).logits2).numpy(),
  )


@pytest.mark.parametrize("is_training", [True, False])
def test_gradients_reach_every_trainable_variable(model, is_training):
  images = tf.random.uniform([2, 32, 32, 3])
  masks = tf.cast(tf.random.uniform([2, 32, 32, 1]) > 0.5, tf.float32)
  snapshot = [v.numpy() for v in model.variables]
  with tf.GradientTape() as tape:
    outputs = model(images, is_training=is_training)
    loss = sum(
      tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(masks, logits)) for logits in outputs
    )
  grads = tape.gradient(loss, model.trainable_variables)
  for variable, value in zip(model.variables, snapshot):
    variable.assign(value)
  disconnected = [v.name for v, g in zip(model.trainable_variables, grads) if g is None]
  assert not disconnected, f"no gradient path to {disconnected}"
  if not is_training:
    # In training, a bias right before BatchNorm is cancelled by the batch mean (its gradient is
    # zero up to rounding), so only inference mode can show that every gradient is non-zero.
    zero = [v.name for v, g in zip(model.trainable_variables, grads) if not np.any(g.numpy())]
    assert not zero, f"zero gradient for {zero}"


def test_training_moves_batchnorm_statistics_and_inference_does_not(model):
  statistics = [v for v in model.variables if not v.trainable]
  before = [v.numpy() for v in statistics]
  model(tf.random.uniform([2, 32, 32, 3]), is_training=False)
  for variable, value in zip(statistics, before):
    np.testing.assert_array_equal(variable.numpy(), value)
  model(tf.random.uniform([2, 32, 32, 3]), is_training=True)
  moved = [not np.array_equal(v.numpy(), b) for v, b in zip(statistics, before)]
  assert all(moved), "every BatchNorm must update its moving statistics in training"
  for variable, value in zip(statistics, before):
    variable.assign(value)


# Largest |low - float32| logit error as a fraction of the largest |float32| logit, measured here
# (CPU, oneDNN) over 12 seeds of weights and inputs, inference mode, 1x32x32 inputs: float16 at
# most 0.0021, bfloat16 at most 0.016 (8 significant bits). The bounds are about 2.5x those.
@pytest.mark.parametrize("dtype,tolerance", [(tf.float16, 0.005), (tf.bfloat16, 0.04)])
def test_low_precision_compute_is_close_to_float32(model, dtype, tolerance):
  low = DoubleUNet(compute_dtype=dtype)
  for source, target in zip(model.variables, low.variables):
    target.assign(source)
  images = tf.constant(np.random.default_rng(0).uniform(size=(1, 32, 32, 3)), tf.float32)
  reference = model(images, is_training=False)
  outputs = low(images, is_training=False)
  assert outputs.logits1.dtype == outputs.logits2.dtype == tf.float32
  assert all(v.dtype == tf.float32 for v in low.variables)
  for ref, got in zip(reference, outputs):
    # The untrained net's logits are small (|logit| < 0.1), so the error is relative to them.
    scale = float(np.abs(ref.numpy()).max())
    assert scale > 0
    assert float(np.abs(ref.numpy() - got.numpy()).max()) / scale < tolerance


@pytest.mark.parametrize(
  "shape,message",
  [
    ([1, 40, 32, 3], "height 40 is not divisible by 16"),
    ([1, 32, 20, 3], "width 20"),
    ([1, 32, 32, 1], "3 channels"),
    ([32, 32, 3], "batch, height, width"),
  ],
)
def test_bad_input_shapes_are_rejected_clearly(model, shape, message):
  with pytest.raises(ValueError, match=message):
    model(tf.zeros(shape), is_training=False)


def test_bad_compute_dtype():
  with pytest.raises(ValueError, match="compute_dtype"):
    DoubleUNet(compute_dtype=tf.int32)


def test_batch_norm_momentum_reaches_every_batch_norm():
  from dunet.nn.batch_norm import BatchNorm

  model = DoubleUNet(batch_norm_momentum=0.9)
  norms = [m for m in model.submodules if isinstance(m, BatchNorm)]
  assert len(norms) == 36  # as many as the reference model's BatchNormalization layers
  assert {m.momentum for m in norms} == {0.9}
