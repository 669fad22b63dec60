"""The training and validation steps: learning, loss scaling, skipping, and replica equivalence."""

import numpy as np
import pytest
import tensorflow as tf

from dunet import builder
from dunet import distribute
from dunet import losses
from dunet import precision
from dunet.models import DoubleUNet
from dunet.models.doubleunet import DoubleUNetOutputs
from dunet.nn.conv import Conv2D
from tests.tiny_net import TinyNet

SIZE = 32


class _TwoHeads(tf.Module):
  """A two-head stand-in for DoubleUNet (the same outputs at a ten-thousandth of the cost).

  For tests of the step's own logic (loss scaling, skipping): it does not depend on the network,
  and float16 convolutions on a CPU run on TensorFlow's slow reference kernels (one DoubleU-Net
  float16 step at 32x32 takes about 25 s on 2 cores).
  """

  def __init__(self, compute_dtype=tf.float32):
    super().__init__()
    self.compute_dtype = compute_dtype
    self.features = Conv2D(3, 8, 3, compute_dtype=compute_dtype)
    self.head1 = Conv2D(8, 1, 1, compute_dtype=compute_dtype)
    self.head2 = Conv2D(8, 1, 1, compute_dtype=compute_dtype)

  def __call__(self, images, is_training):
    del is_training
    features = tf.nn.relu(self.features(tf.cast(images, self.compute_dtype)))
    return DoubleUNetOutputs(
      tf.cast(self.head1(features), tf.float32), tf.cast(self.head2(features), tf.float32)
    )


def _batch(seed=0, batch_size=4):
  """Images whose mask is a bright square: learnable in a few steps."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 0.3, size=(batch_size, SIZE, SIZE, 3)).astype(np.float32)
  masks = np.zeros((batch_size, SIZE, SIZE, 1), np.float32)
  for i in range(batch_size):
    top, left = rng.integers(0, SIZE // 2, size=2)
    masks[i, top : top + SIZE // 2, left : left + SIZE // 2] = 1.0
    images[i, top : top + SIZE // 2, left : left + SIZE // 2] += 0.6
  return {"image": tf.constant(images), "mask": tf.constant(masks)}


def _setup(
  policy_name="float32",
  learning_rate=1e-3,
  strategy=None,
  seed=0,
  epsilon=1e-7,
  initial_scale=2.0**15,
  make_model=DoubleUNet,
):
  """(model, optimizer, loss_scale) from dunet's one builder, as training makes them."""
  tf.random.set_seed(seed)
  parts = builder.build_training_parts(
    precision.Policy(policy_name),
    "adam",
    learning_rate,
    strategy=strategy,
    make_model=make_model,
    optimizer_options=dict(epsilon=epsilon),
    initial_loss_scale=initial_scale,
  )
  return parts.model, parts.optimizer, parts.loss_scale


def _train_function(model, optimizer, loss_scale, global_batch_size, loss_fn=None, strategy=None):
  """The train function training runs (builder -> runner -> step.train_step)."""
  parts = builder.TrainingParts(
    model=model, optimizer=optimizer, loss_scale=loss_scale, policy=precision.Policy("float32")
  )
  return builder.make_train_function(
    parts,
    loss_fn=loss_fn or losses.binary_cross_entropy,
    head_weights=(1.0, 1.0),
    global_batch_size=global_batch_size,
    strategy=strategy,
  )


def test_loss_goes_down_and_measurements_are_reported():
  model, optimizer, loss_scale = _setup()
  run = _train_function(model, optimizer, loss_scale, 4)
  batch = _batch()
  history = [run(batch) for _ in range(12)]
  first, last = float(history[0]["loss/total"]), float(history[-1]["loss/total"])
  assert last < 0.7 * first, (first, last)
  measured = history[-1]
  assert {
    "loss/total",
    "loss/head1",
    "loss/head2",
    "norm/gradients",
    "norm/parameters",
    "loss_scale",
    "update_applied",
    "learning_rate",
  } <= set(measured)
  np.testing.assert_allclose(
    float(measured["loss/total"]),
    float(measured["loss/head1"]) + float(measured["loss/head2"]),
    rtol=1e-5,
  )
  assert float(measured["update_applied"]) == 1.0
  assert int(optimizer.iterations.numpy()) == 12


def test_float16_overflow_skips_the_update_and_halves_the_scale():
  model, optimizer, loss_scale = _setup("mixed_float16", make_model=_TwoHeads)
  run = _train_function(model, optimizer, loss_scale, 4)
  loss_scale.scale.assign(2.0**120)  # float16 gradients of a loss this large overflow to Inf
  before = [v.numpy() for v in model.trainable_variables]
  measured = run(_batch())
  assert float(measured["update_applied"]) == 0.0
  assert float(loss_scale.scale.numpy()) == 2.0**119
  assert int(optimizer.iterations.numpy()) == 0
  for variable, value in zip(model.trainable_variables, before):
    np.testing.assert_array_equal(variable.numpy(), value)
  # Halving continues until the gradients fit in float16; then updates resume. At 2**30 the
  # scaled gradients (order 1 x 2**30) overflow float16 (max 65504) for several steps.
  loss_scale.scale.assign(2.0**30)
  applied = [float(run(_batch())["update_applied"]) for _ in range(30)]
  assert 1.0 in applied
  first_applied = applied.index(1.0)
  assert first_applied >= 3, applied
  assert all(a == 0.0 for a in applied[:first_applied])
  assert float(loss_scale.scale.numpy()) == 2.0 ** (30 - first_applied)
  assert int(optimizer.iterations.numpy()) == len(applied) - first_applied


def test_non_finite_gradient_in_float32_leaves_weights_unchanged():
  model, optimizer, loss_scale = _setup()

  def poisoned_loss(logits, masks):
    # sqrt'(0) is Inf: the gradient is NaN while the loss itself stays finite.
    return losses.binary_cross_entropy(logits, masks) + tf.sqrt(
      tf.abs(logits[:, 0, 0, 0] - tf.stop_gradient(logits[:, 0, 0, 0]))
    )

  run = _train_function(model, optimizer, loss_scale, 4, loss_fn=poisoned_loss)
  before = [v.numpy() for v in model.trainable_variables]
  measured = run(_batch())
  assert np.isfinite(float(measured["loss/total"]))
  assert float(measured["update_applied"]) == 0.0
  for variable, value in zip(model.trainable_variables, before):
    np.testing.assert_array_equal(variable.numpy(), value)


@pytest.mark.slow
def test_two_replicas_match_one_replica():
  """A 2-replica step on a global batch gives the weights of a 1-replica step on it.

  BatchNorm normalises each replica's batch with that replica's statistics (unsynchronised, as in
  Keras); the global batch repeats one half twice so both set-ups see the same statistics and any
  difference left comes from the gradient reduction. TinyNet (a convolution, a BatchNorm, two
  heads) stands in for DoubleU-Net: the reduction is the same code for any model, and tracing
  the real network for two replicas was most of this test's 100 s.
  """
  half = _batch(seed=3, batch_size=2)
  global_batch = {k: tf.concat([v, v], axis=0) for k, v in half.items()}
  # A large epsilon makes Adam's first step proportional to the gradient (lr * g / (|g| + 1))
  # instead of lr * sign(g), which would turn rounding noise in near-zero gradients into
  # full-size steps and hide what is compared here: the reduced gradients.
  single_model, single_optimizer, single_scale = _setup(
    seed=5, learning_rate=1e-2, epsilon=1.0, make_model=TinyNet
  )
  initial = [v.numpy() for v in single_model.variables]
  _train_function(single_model, single_optimizer, single_scale, 4)(global_batch)

  devices = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
  strategy = distribute.make_strategy("mirrored", devices=devices)
  model, optimizer, loss_scale = _setup(
    strategy=strategy, seed=5, learning_rate=1e-2, epsilon=1.0, make_model=TinyNet
  )
  for variable, value in zip(model.variables, initial):
    np.testing.assert_array_equal(variable.numpy(), value)
  dataset = tf.data.Dataset.from_tensors(global_batch)
  batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
  measured = _train_function(model, optimizer, loss_scale, 4, strategy=strategy)(batch)
  assert float(measured["update_applied"]) == 1.0
  # Compare the changes: float sums in another order differ by rounding, which DoubleU-Net
  # (ill-conditioned, see test_low_precision_steps_train) amplified to ~0.5% of an update with
  # oneDNN's kernels and to 2.3% of the largest change with Eigen's (a CPU without AVX-512,
  # 2026-12-01); a real error (a doubled all-reduce, the per-replica batch as divisor, BatchNorm
  # statistics averaged wrongly) changes them by 50% or more. Measured with TinyNet (Eigen,
  # 2026-12-01): the largest difference is 0.14 of the tolerance below; a global batch of 2 or 8
  # as the divisor makes it 19 or 10 times the tolerance.
  for value, expected, got in zip(initial, single_model.variables, model.variables):
    expected_change = expected.numpy() - value
    got_change = got.numpy() - value
    # (A bias right before BatchNorm gets no gradient in training: its change is zero in both;
    # changes below the float32 spacing of the weights themselves are rounding.)
    scale = np.abs(expected_change).max()
    tolerance = 0.05 * scale + 2 * np.spacing(np.abs(value).max()) + 1e-9
    np.testing.assert_allclose(
      got_change, expected_change, atol=tolerance, rtol=0, err_msg=expected.name
    )


def _numpy_bce(logits, masks):
  """Each image's mean binary cross-entropy from logits, in float64 numpy (the stable form)."""
  x, y = logits.astype(np.float64), masks.astype(np.float64)
  per_pixel = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
  return per_pixel.reshape(len(x), -1).mean(axis=1)


def test_eval_step_counts_and_losses_match_numpy():
  model, _, _ = _setup(make_model=_TwoHeads)
  batch = _batch(seed=7)
  # Sharpen both heads and centre them on their median logit: about half of the pixels on each
  # side of the threshold, so the counts and the loss see varied predictions.
  for head, name in ((model.head1, "logits1"), (model.head2, "logits2")):
    head.kernel.assign(head.kernel * 20.0)
    logits = getattr(model(batch["image"], is_training=False), name).numpy()
    head.bias.assign(head.bias - float(np.median(logits)))
  head_weights = (0.25, 1.0)
  result = builder.make_eval_function(
    model, loss_fn=losses.binary_cross_entropy, head_weights=head_weights
  )(batch)
  outputs = [logits.numpy() for logits in model(batch["image"], is_training=False)]
  masks = batch["mask"].numpy()
  truth = masks >= 0.5
  expected_total = 0.0
  for index, (head, logits) in enumerate(zip(("head1", "head2"), outputs)):
    predicted = 1.0 / (1.0 + np.exp(-logits.astype(np.float64))) >= 0.5
    assert 0.2 < predicted.mean() < 0.8, (head, predicted.mean())
    expected = np.stack(
      [
        (predicted & truth).sum(axis=(1, 2, 3)),
        (predicted & ~truth).sum(axis=(1, 2, 3)),
        (~predicted & truth).sum(axis=(1, 2, 3)),
        (~predicted & ~truth).sum(axis=(1, 2, 3)),
      ],
      axis=1,
    )
    np.testing.assert_array_equal(np.asarray(result[f"counts/{head}"]), expected)
    head_loss = _numpy_bce(logits, masks).mean()
    assert head_loss > 0.1  # not a trivially confident prediction
    np.testing.assert_allclose(float(result[f"loss/{head}"]), head_loss, rtol=1e-5)
    expected_total += head_weights[index] * head_loss
  np.testing.assert_allclose(float(result["loss/total"]), expected_total, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("policy_name", ["mixed_bfloat16", "mixed_float16"])
def test_low_precision_steps_train(policy_name):
  # At random initialisation the VGG biases get gradients in the thousands (ASPP's pooled
  # BatchNorm sees four nearly equal values), so float16 needs a small loss scale; starting at
  # 2**15 the dynamic scale would spend a dozen skipped steps getting there.
  model, optimizer, loss_scale = _setup(policy_name, initial_scale=4.0)
  run = _train_function(model, optimizer, loss_scale, 4)
  batch = _batch()
  first = float(run(batch)["loss/total"])
  for _ in range(3):  # few: a float16 DoubleU-Net step takes ~20 s on a CPU
    last = float(run(batch)["loss/total"])
  assert np.isfinite(last) and last < first
  assert all(v.dtype == tf.float32 for v in model.variables)
