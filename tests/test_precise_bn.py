"""Precise BatchNorm statistics: pooled population moments, set for inference, kept by
checkpoints."""

import numpy as np
import pytest
import tensorflow as tf

from dunet import distribute
from dunet import precise_bn
from dunet.models import DoubleUNet
from dunet.nn.batch_norm import BatchNorm, recording_moments
from dunet.nn.conv import Conv2D

EPSILON = 1e-3


class _TwoLayers(tf.Module):
  """x -> BN a -> ReLU -> 1x1 conv -> BN b: b's input depends on a's (training-mode) output."""

  def __init__(self):
    super().__init__()
    tf.random.set_seed(3)
    self.bn_a = BatchNorm(3, name="bn_a")
    self.conv = Conv2D(3, 4, 1, name="conv")
    self.bn_b = BatchNorm(4, name="bn_b")

  def __call__(self, images, is_training):
    return self.bn_b(self.conv(tf.nn.relu(self.bn_a(images, is_training))), is_training)


def _batches(count, batch=3, size=6, seed=0):
  rng = np.random.default_rng(seed)
  # Different means per batch: the pooled variance must include the spread between batches.
  return [
    tf.constant(rng.normal(i, 1.0 + i, (batch, size, size, 3)).astype(np.float32))
    for i in range(count)
  ]


def _moments(values):
  values = np.asarray(values, np.float64).reshape(-1, values.shape[-1])
  return values.mean(axis=0), values.var(axis=0)


def test_pooled_statistics_of_every_layer_over_all_batches():
  model = _TwoLayers()
  batches = _batches(3)
  summary = precise_bn.recompute_statistics(model, batches)
  assert (summary.batches, summary.images, summary.layers) == (3, 9, 2)
  # Layer a sees the images themselves: its statistics are those of all their pixels.
  mean, variance = _moments(tf.concat(batches, 0).numpy())
  np.testing.assert_allclose(model.bn_a.moving_mean.numpy(), mean, rtol=1e-5)
  np.testing.assert_allclose(model.bn_a.moving_variance.numpy(), variance, rtol=1e-5)
  # Layer b sees what training mode gives it: each batch normalised by its own moments.
  inputs_b = []
  for images in batches:
    batch_mean, batch_variance = tf.nn.moments(images, axes=[0, 1, 2])
    normalised = (images - batch_mean) / tf.sqrt(batch_variance + EPSILON)
    inputs_b.append(model.conv(tf.nn.relu(normalised)).numpy())
  mean, variance = _moments(np.concatenate(inputs_b))
  np.testing.assert_allclose(model.bn_b.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(model.bn_b.moving_variance.numpy(), variance, rtol=1e-4)


def test_inference_then_normalises_with_the_pooled_statistics():
  bn = BatchNorm(3)
  batches = _batches(2, seed=1)
  precise_bn.recompute_statistics(bn, batches)
  images = tf.concat(batches, 0)
  mean, variance = _moments(images.numpy())
  expected = (images.numpy() - mean) / np.sqrt(variance + EPSILON)
  np.testing.assert_allclose(bn(images, is_training=False).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_recording_leaves_weights_and_moving_statistics_alone_until_the_end():
  model = _TwoLayers()
  trainable = [v.numpy() for v in model.trainable_variables]
  with recording_moments() as recorder:
    model(_batches(1)[0], is_training=True)
  assert [record[0] for record in recorder.records] == [model.bn_a, model.bn_b]
  np.testing.assert_array_equal(model.bn_a.moving_mean.numpy(), np.zeros(3))
  np.testing.assert_array_equal(model.bn_b.moving_variance.numpy(), np.ones(4))
  precise_bn.recompute_statistics(model, _batches(2))
  for variable, value in zip(model.trainable_variables, trainable):
    np.testing.assert_array_equal(variable.numpy(), value)
  # Outside the block, training mode moves the statistics again.
  before = model.bn_a.moving_mean.numpy()
  model(_batches(1, seed=5)[0], is_training=True)
  assert not np.array_equal(model.bn_a.moving_mean.numpy(), before)


@pytest.fixture(scope="module")
def network_and_batch():
  tf.random.set_seed(11)
  model = DoubleUNet()
  images = tf.random.stateless_uniform([4, 32, 32, 3], seed=[1, 2])
  return model, images


def test_network_inference_equals_training_mode_with_the_batch_statistics(network_and_batch):
  """After recomputing from one batch, its pooled statistics ARE its batch statistics: every
  layer's inference-mode output on it equals the training-mode output."""
  model, images = network_and_batch
  norms = precise_bn.batch_norms(model)
  assert len(norms) == 36
  with recording_moments():  # training-mode outputs, statistics left alone
    expected = model(images, is_training=True)
  precise_bn.recompute_statistics(model, [images, images])  # the same batch twice: the same
  got = model(images, is_training=False)
  for head, (want, have) in enumerate(zip(expected, got), start=1):
    scale = np.abs(want.numpy()).max()
    # Training-mode batch moments vs. stored ones: float32 rounding through ~40 normalisations.
    np.testing.assert_allclose(
      have.numpy(), want.numpy(), atol=2e-4 * scale, err_msg=f"head {head}"
    )
  # Moving statistics (mostly still at 0 and 1) give other outputs: the recomputation mattered.
  for norm in norms:
    norm.moving_mean.assign(tf.zeros_like(norm.moving_mean))
    norm.moving_variance.assign(tf.ones_like(norm.moving_variance))
  stale = model(images, is_training=False)
  assert (
    np.abs(stale.logits2.numpy() - expected.logits2.numpy()).max()
    > 1e-2 * np.abs(expected.logits2.numpy()).max()
  )


def test_recomputed_statistics_round_trip_through_a_checkpoint(network_and_batch, tmp_path):
  model, images = network_and_batch
  precise_bn.recompute_statistics(model, [images[:2], images[2:]])
  prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
  restored = DoubleUNet()
  tf.train.Checkpoint(model=restored).read(prefix).assert_existing_objects_matched()
  for original, copy in zip(precise_bn.batch_norms(model), precise_bn.batch_norms(restored)):
    np.testing.assert_array_equal(copy.moving_mean.numpy(), original.moving_mean.numpy())
    np.testing.assert_array_equal(copy.moving_variance.numpy(), original.moving_variance.numpy())
  np.testing.assert_array_equal(
    restored(images, is_training=False).logits2.numpy(),
    model(images, is_training=False).logits2.numpy(),
  )


def test_two_replicas_pool_their_halves_as_one_device_pools_two_batches():
  """Each replica normalises its own half of the global batch (unsynchronised BatchNorm), so
  a 2-replica recomputation over one global batch equals a 1-device one over its two halves."""
  batches = _batches(2, batch=4, seed=2)
  single = _TwoLayers()
  precise_bn.recompute_statistics(
    single, [half for images in batches for half in (images[:2], images[2:])]
  )
  strategy = distribute.make_strategy("mirrored")
  with strategy.scope():
    mirrored = _TwoLayers()
  dataset = tf.data.Dataset.from_tensor_slices(tf.stack(batches))
  summary = precise_bn.recompute_statistics(
    mirrored, strategy.experimental_distribute_dataset(dataset), strategy=strategy
  )
  assert (summary.batches, summary.images) == (2, 8)
  for one, two in zip(precise_bn.batch_norms(single), precise_bn.batch_norms(mirrored)):
    for name in ("moving_mean", "moving_variance"):
      values = [v.numpy() for v in strategy.experimental_local_results(getattr(two, name))]
      for value in values:  # every replica's copy holds the pooled value
        np.testing.assert_allclose(
          value, getattr(one, name).numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{one.name}.{name}"
        )


def test_errors():
  with pytest.raises(ValueError, match="no batches"):
    precise_bn.recompute_statistics(_TwoLayers(), [])
  with pytest.raises(ValueError, match="has no BatchNorm layers"):
    precise_bn.make_moments_function(Conv2D(3, 3, 1))
  model = _TwoLayers()
  model.unused = BatchNorm(2, name="unused")
  with pytest.raises(ValueError, match="not called in training mode.*unused"):
    precise_bn.recompute_statistics(model, _batches(1))


def test_pool_moments_in_float64():
  # Means far larger than the spread: a float32 E[x^2] - E[x]^2 would lose the variance.
  means = [np.array([1e4 + 0.0]), np.array([1e4 + 2.0])]
  variances = [np.array([1.0]), np.array([3.0])]
  mean, variance = precise_bn.pool_moments(means, variances)
  np.testing.assert_allclose(mean, [1e4 + 1.0])
  np.testing.assert_allclose(variance, [2.0 + 1.0])  # within 2, between 1
