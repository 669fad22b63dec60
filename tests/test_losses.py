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
  np.testing.assert_allclose(losses.binary_cross_entropy(logits, masks).numpy(), [50.0], rtol=1e-6)


def test_dice_loss_matches_numpy_per_image():
  logits, masks = _example(seed=1)
  got = losses.dice_loss(logits, masks)
  assert got.shape == (3,) and got.dtype == tf.float32
  np.testing.assert_allclose(got.numpy(), _numpy_dice(logits, masks), rtol=1e-5)
  np.testing.assert_allclose(
    losses.dice_loss(logits, masks, smooth=0.0).numpy(),
    _numpy_dice(logits, masks, smooth=0.0),
    rtol=1e-5,
  )
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
  np.testing.assert_allclose(
    losses.dice_loss(-confident, mask).numpy(), [16 / 17, 16 / 17], rtol=1e-6
  )


def test_bce_dice_is_the_sum():
  logits, masks = _example(seed=2)
  np.testing.assert_allclose(
    losses.bce_dice(logits, masks).numpy(),
    _numpy_bce(logits, masks) + _numpy_dice(logits, masks),
    rtol=1e-5,
  )


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
    [tf.constant(head1, tf.float16), head2],
    masks,
    losses.binary_cross_entropy,
    head_weights=[0.25, 2.0],
    global_batch_size=8,
  )
  # This replica holds 2 of 8 examples: its share is the sum over its examples / 8.
  expected = [
    _numpy_bce(np.float32(np.float16(head1)), masks).sum() / 8,
    _numpy_bce(head2, masks).sum() / 8,
  ]
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


# --- the reference reduction: one loss over both heads and the whole batch --------------------


def _numpy_keras_bce(probabilities, masks):
  """Keras' binary_crossentropy on probabilities: clipped to [1e-7, 1 - 1e-7], no logits."""
  p = np.clip(probabilities, 1e-7, 1 - 1e-7)
  return -(masks * np.log(p) + (1 - masks) * np.log(1 - p))


def _numpy_reference(name, logits_per_head, masks):
  """The reference train.py's loss on concat([out1, out2]) against concat([y, y]), in float64."""
  p = np.concatenate([_sigmoid(logits) for logits in logits_per_head], axis=-1)
  y = np.concatenate([masks] * len(logits_per_head), axis=-1).astype(np.float64)
  bce = _numpy_keras_bce(p, y).mean()
  dice = 1 - (2 * (p * y).sum() + 1e-15) / (p.sum() + y.sum() + 1e-15)
  return {"bce": bce, "dice": dice, "bce_dice": bce + dice}[name]


@pytest.mark.parametrize("name", ["bce", "dice", "bce_dice"])
def test_reference_reduction_is_one_loss_over_both_heads_and_the_batch(name):
  head1, masks = _example(seed=7, batch=3)
  head2, _ = _example(seed=8, batch=3)
  loss = losses.make_heads_loss(name, losses.REFERENCE)
  total, per_head = loss([head1, head2], masks, (1.0, 1.0), 3)
  np.testing.assert_allclose(
    total.numpy(), _numpy_reference(name, [head1, head2], masks), rtol=1e-5
  )
  for logits, value in zip((head1, head2), per_head):  # each head's own batch-level loss
    np.testing.assert_allclose(value.numpy(), _numpy_reference(name, [logits], masks), rtol=1e-5)
  if name == "dice":  # one ratio over everything: not the mean of the heads' (or images') Dice
    assert not np.isclose(total.numpy(), np.mean([v.numpy() for v in per_head]), rtol=1e-4)
    per_image = losses.make_heads_loss("dice")([head1, head2], masks, (1.0, 1.0), 3)[0]
    assert not np.isclose(total.numpy(), per_image.numpy() / 2, rtol=1e-3)


def test_reference_bce_is_keras_probability_space_cross_entropy():
  # Confidently wrong pixels: Keras clips the probability to [1e-7, 1 - 1e-7] (in float32), so
  # the loss saturates near -log(1e-7) = 16.1 instead of the logit (100) that the per-image BCE
  # from logits gives.
  logits = np.array([[[[100.0]], [[-100.0]]]], np.float32).reshape(1, 2, 1, 1)
  masks = np.array([0.0, 1.0], np.float32).reshape(1, 2, 1, 1)
  total, _ = losses.make_heads_loss("bce", losses.REFERENCE)([logits], masks, (1.0,), 1)
  low, high = np.float32(1e-7), np.float32(1) - np.float32(1e-7)
  expected = -(np.log(low) + np.log(np.float32(1) - high)) / 2  # both pixels clipped
  np.testing.assert_allclose(total.numpy(), expected, rtol=1e-5)
  per_image, _ = losses.make_heads_loss("bce")([logits], masks, (1.0,), 1)
  np.testing.assert_allclose(per_image.numpy(), 100.0, rtol=1e-5)


def test_reference_head_weights_weigh_the_heads_sums():
  head1, masks = _example(seed=9, batch=2)
  head2, _ = _example(seed=10, batch=2)
  p1, p2 = _sigmoid(head1), _sigmoid(head2)
  y = masks.astype(np.float64)
  weights = (0.5, 2.0)
  dice, _ = losses.make_heads_loss("dice", losses.REFERENCE)([head1, head2], masks, weights, 2)
  expected = 1 - (2 * (0.5 * (p1 * y).sum() + 2.0 * (p2 * y).sum()) + 1e-15) / (
    0.5 * (p1.sum() + y.sum()) + 2.0 * (p2.sum() + y.sum()) + 1e-15
  )
  np.testing.assert_allclose(dice.numpy(), expected, rtol=1e-5)
  bce, _ = losses.make_heads_loss("bce", losses.REFERENCE)([head1, head2], masks, weights, 2)
  expected = (0.5 * _numpy_keras_bce(p1, y).mean() + 2.0 * _numpy_keras_bce(p2, y).mean()) / 2.5
  np.testing.assert_allclose(bce.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["dice", "bce_dice"])
def test_reference_reduction_value_and_gradients_do_not_change_with_two_replicas(name):
  """Two logical CPUs, each with half the batch: the Dice numerator and denominator are
  all-reduced, so the summed shares are the one-device value, and the gradients (summed over
  replicas, as dunet's step all-reduces them) are the one-device gradients."""
  logits, masks = _example(seed=11, batch=4)
  loss = losses.make_heads_loss(name, losses.REFERENCE)
  weights = (1.0, 0.5)

  def value_and_gradient(logits_variable, masks):
    with tf.GradientTape() as tape:
      total, per_head = loss([logits_variable, 2.0 * logits_variable], masks, weights, 4)
    return total, per_head, tape.gradient(total, logits_variable)

  variable = tf.Variable(logits)
  single, single_heads, single_gradient = value_and_gradient(variable, masks)

  strategy = distribute.make_strategy("mirrored")
  dataset = tf.data.Dataset.from_tensors((logits, masks))
  batch = next(iter(strategy.experimental_distribute_dataset(dataset)))

  def replica_fn(half_logits, half_masks):
    with tf.GradientTape() as tape:
      tape.watch(half_logits)
      total, per_head = loss([half_logits, 2.0 * half_logits], half_masks, weights, 4)
    return total, per_head, tape.gradient(total, half_logits)

  per_replica = strategy.run(tf.function(replica_fn), args=batch)
  totals, heads, gradients = (strategy.experimental_local_results(part) for part in per_replica)
  np.testing.assert_allclose(sum(float(t) for t in totals), single.numpy(), rtol=1e-6)
  for head in range(2):
    np.testing.assert_allclose(
      sum(float(h[head]) for h in heads), single_heads[head].numpy(), rtol=1e-6
    )
  # Each replica's gradient is for its own half of the batch; all-reduced (summed) by the step,
  # the halves concatenated are the one-device gradient.
  np.testing.assert_allclose(
    np.concatenate([g.numpy() for g in gradients]), single_gradient.numpy(), rtol=1e-5, atol=1e-9
  )


def test_make_heads_loss_names_and_reductions():
  assert isinstance(losses.make_heads_loss("bce"), losses.PerImageLoss)
  assert isinstance(losses.make_heads_loss("dice", "reference"), losses.ReferenceLoss)
  assert losses.as_heads_loss(losses.dice_loss).reduction == losses.PER_IMAGE
  with pytest.raises(ValueError, match="'sum'.*valid: per_image, reference"):
    losses.make_heads_loss("bce", "sum")
  with pytest.raises(ValueError, match="'focal'"):
    losses.make_heads_loss("focal", "reference")
