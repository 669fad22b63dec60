"""Losses against numpy formulas; deep supervision is additive across replicas."""

import numpy as np
import pytest
import tensorflow as tf

from dunet import distribute
from dunet import losses

distribute.configure_logical_cpus(2)


def _example(seed=0, batch=3, size=5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=3.0, size=(batch, size, size, 1)).astype(np.float32)
  masks = (rng.uniform(size=(batch, size, size, 1)) < 0.4).astype(np.float32)
  return logits, masks


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _numpy_bce(logits, masks):
  p = _sigmoid(logits)
  per_pixel = -(masks * np.log(p) + (1 - masks) * np.log(1 - p))
  return per_pixel.reshape(len(logits), -1).mean(axis=1)


def _numpy_dice(logits, masks, smooth=1.0):
  p = _sigmoid(logits).reshape(len(logits), -1)
  y = masks.reshape(len(masks), -1)
  return 1 - (2 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)


def test_binary_cross_entropy_matches_numpy():
  logits, masks = _example()
  got = losses.binary_cross_entropy(logits, masks)
  assert got.shape == (3,) and got.dtype == tf.float32
  np.testing.assert_allclose(got.numpy(), _numpy_bce(logits, masks), rtol=1e-5)


def test_binary_cross_entropy_is_stable_for_large_logits():
  logits = np.array([[100.0, -100.0, 100.0, -100.0]], np.float32)
  masks = np.array([[1.0, 0.0, 0.0, 1.0]], np.float32)
  # Two pixels right (loss ~0), two wrong by a logit of 100 (loss 100 each).
  np.testing.assert_allclose(losses.binary_cross_entropy(logits, masks).numpy(), [50.0],
                             rtol=1e-6)


def test_dice_loss_matches_numpy_per_image():
  logits, masks = _example(seed=1)
  got = losses.dice_loss(logits, masks)
  assert got.shape == (3,) and got.dtype == tf.float32
  np.testing.assert_allclose(got.numpy(), _numpy_dice(logits, masks), rtol=1e-5)
  np.testing.assert_allclose(losses.dice_loss(logits, masks, smooth=0.0).numpy(),
                             _numpy_dice(logits, masks, smooth=0.0), rtol=1e-5)
  # Per image, not over the batch: the batch-level value (the reference code's) differs.
  batch_level = _numpy_dice(logits.reshape(1, -1), masks.reshape(1, -1))[0]
  assert not np.isclose(got.numpy().mean(), batch_level, rtol=1e-3)


def test_dice_loss_limits():
  mask = np.zeros((2, 4, 4, 1), np.float32)
  mask[0, :2] = 1.0
  confident = np.where(mask > 0, 50.0, -50.0).astype(np.float32)
  # A perfect prediction, and an empty mask predicted empty, both lose (almost) nothing.
  np.testing.assert_allclose(losses.dice_loss(confident, mask).numpy(), [0.0, 0.0], atol=1e-6)
  # Everything wrong: 1 - s / (Σp + Σy + s), with Σp + Σy = 16 pixels in both images.
  np.testing.assert_allclose(losses.dice_loss(-confident, mask).numpy(), [16 / 17, 16 / 17],
                             rtol=1e-6)


def test_bce_dice_is_the_sum():
  logits, masks = _example(seed=2)
  np.testing.assert_allclose(
      losses.bce_dice(logits, masks).numpy(),
      _numpy_bce(logits, masks) + _numpy_dice(logits, masks), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_losses_compute_in_float32_from_low_precision_logits(name):
  logits, masks = _example(seed=3)
  loss_fn = losses.get_loss(name)
  got = loss_fn(tf.constant(logits, tf.float16), masks)
  assert got.dtype == tf.float32
  expected = loss_fn(tf.cast(tf.cast(logits, tf.float16), tf.float32), masks)
  np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6)


def test_get_loss():
  assert losses.get_loss("bce") is losses.binary_cross_entropy
  assert losses.get_loss("dice") is losses.dice_loss
  assert losses.get_loss("bce_dice") is losses.bce_dice
  with pytest.raises(ValueError, match="'focal'.*valid names: bce, bce_dice, dice"):
    losses.get_loss("focal")


def test_deep_supervision_weights_heads_and_divides_by_the_global_batch():
  head1, masks = _example(seed=4, batch=2)
  head2, _ = _example(seed=5, batch=2)
  total, per_head = losses.deep_supervision_loss(
      [tf.constant(head1, tf.float16), head2], masks, losses.binary_cross_entropy,
      head_weights=[0.25, 2.0], global_batch_size=8)
  # This replica holds 2 of 8 examples: its share is the sum over its examples / 8.
  expected = [_numpy_bce(np.float32(np.float16(head1)), masks).sum() / 8,
              _numpy_bce(head2, masks).sum() / 8]
  np.testing.assert_allclose([h.numpy() for h in per_head], expected, rtol=1e-5)
  np.testing.assert_allclose(total.numpy(), 0.25 * expected[0] + 2.0 * expected[1], rtol=1e-5)
  assert total.dtype == tf.float32


def test_deep_supervision_rejects_mismatched_weights():
  logits, masks = _example()
  with pytest.raises(ValueError, match="1 head weights for 2 heads"):
    losses.deep_supervision_loss([logits, logits], masks, losses.dice_loss, [1.0], 3)


@pytest.mark.parametrize("name", ["bce", "dice"])
def test_replica_shares_sum_to_the_single_device_mean(name):
  """Two replicas, each with half of the batch: the summed totals equal the one-device mean."""
  logits, masks = _example(seed=6, batch=4)
  loss_fn = losses.get_loss(name)
  single, _ = losses.deep_supervision_loss([logits, 2 * logits], masks, loss_fn, [1.0, 0.5], 4)

  strategy = distribute.make_strategy("mirrored")  # over the two logical CPUs
  dataset = tf.data.Dataset.from_tensors((logits, masks))
  batch = next(iter(strategy.experimental_distribute_dataset(dataset)))

  def replica_fn(logits, masks):
    total, _ = losses.deep_supervision_loss([logits, 2 * logits], masks, loss_fn, [1.0, 0.5], 4)
    return total

  per_replica = strategy.run(tf.function(replica_fn), args=batch)
  shares = [float(v) for v in strategy.experimental_local_results(per_replica)]
  assert len(shares) == 2 and shares[0] != shares[1]
  np.testing.assert_allclose(sum(shares), single.numpy(), rtol=1e-6)
