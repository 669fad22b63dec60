"""The training and validation steps: learning, loss scaling, skipping, and replica equivalence."""

import functools

import numpy as np
import pytest
import tensorflow as tf

from dunet import distribute
from dunet import losses
from dunet import optim
from dunet import precision
from dunet import step as step_lib
from dunet.models import DoubleUNet
from dunet.models.doubleunet import DoubleUNetOutputs
from dunet.nn.conv import Conv2D

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
    return DoubleUNetOutputs(tf.cast(self.head1(features), tf.float32),
                             tf.cast(self.head2(features), tf.float32))


def _batch(seed=0, batch_size=4):
  """Images whose mask is a bright square: learnable in a few steps."""
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 0.3, size=(batch_size, SIZE, SIZE, 3)).astype(np.float32)
  masks = np.zeros((batch_size, SIZE, SIZE, 1), np.float32)
  for i in range(batch_size):
    top, left = rng.integers(0, SIZE // 2, size=2)
    masks[i, top:top + SIZE // 2, left:left + SIZE // 2] = 1.0
    images[i, top:top + SIZE // 2, left:left + SIZE // 2] += 0.6
  return {"image": tf.constant(images), "mask": tf.constant(masks)}


def _setup(policy_name="float32", learning_rate=1e-3, strategy=None, seed=0, epsilon=1e-7,
           initial_scale=2.0**15, make_model=DoubleUNet):
  strategy = strategy or tf.distribute.get_strategy()
  tf.random.set_seed(seed)
  policy = precision.Policy(policy_name)
  with strategy.scope():
    model = make_model(compute_dtype=policy.compute_dtype)
    optimizer = optim.make_optimizer("adam", learning_rate, model.trainable_variables,
                                     epsilon=epsilon)
    loss_scale = precision.make_loss_scale(policy, initial_scale=initial_scale)
  return model, optimizer, loss_scale


def _train_function(model, optimizer, loss_scale, global_batch_size, loss_fn=None,
                    strategy=None):
  strategy = strategy or tf.distribute.get_strategy()
  replica_step = functools.partial(step_lib.train_step, model, optimizer, loss_scale,
                                   loss_fn=loss_fn or losses.binary_cross_entropy,
                                   head_weights=(1.0, 1.0), global_batch_size=global_batch_size)

  @tf.function
  def run(batch):
    result = strategy.run(replica_step, args=(batch,))
    return {k: strategy.reduce("SUM" if k.startswith("loss/") else "MEAN", v, axis=None)
            for k, v in result.items()}
  return run


def test_loss_goes_down_and_measurements_are_reported():
  model, optimizer, loss_scale = _setup()
  run = _train_function(model, optimizer, loss_scale, 4)
  batch = _batch()
  history = [run(batch) for _ in range(12)]
  first, last = float(history[0]["loss/total"]), float(history[-1]["loss/total"])
  assert last < 0.7 * first, (first, last)
  measured = history[-1]
  assert {"loss/total", "loss/head1", "loss/head2", "norm/gradients", "norm/parameters",
          "loss_scale", "update_applied", "learning_rate"} <= set(measured)
  np.testing.assert_allclose(float(measured["loss/total"]),
                             float(measured["loss/head1"]) + float(measured["loss/head2"]),
                             rtol=1e-5)
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
  assert float(loss_scale.scale.numpy()) == 2.0**(30 - first_applied)
  assert int(optimizer.iterations.numpy()) == len(applied) - first_applied


def test_non_finite_gradient_in_float32_leaves_weights_unchanged():
  model, optimizer, loss_scale = _setup()

  def poisoned_loss(logits, masks):
    # sqrt'(0) is Inf: the gradient is NaN while the loss itself stays finite.
    return losses.binary_cross_entropy(logits, masks) + tf.sqrt(
        tf.abs(logits[:, 0, 0, 0] - tf.stop_gradient(logits[:, 0, 0, 0])))

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
  difference left comes from the gradient reduction.
  """
  half = _batch(seed=3, batch_size=2)
  global_batch = {k: tf.concat([v, v], axis=0) for k, v in half.items()}
  # A large epsilon makes Adam's first step proportional to the gradient (lr * g / (|g| + 1))
  # instead of lr * sign(g), which would turn rounding noise in near-zero gradients into
  # full-size steps and hide what is compared here: the reduced gradients.
  single_model, single_optimizer, single_scale = _setup(seed=5, learning_rate=1e-2, epsilon=1.0)
  initial = [v.numpy() for v in single_model.variables]
  _train_function(single_model, single_optimizer, single_scale, 4)(global_batch)

  devices = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
  strategy = distribute.make_strategy("mirrored", devices=devices)
  model, optimizer, loss_scale = _setup(strategy=strategy, seed=5, learning_rate=1e-2,
                                        epsilon=1.0)
  for variable, value in zip(model.variables, initial):
    np.testing.assert_array_equal(variable.numpy(), value)
  dataset = tf.data.Dataset.from_tensors(global_batch)
  batch = next(iter(strategy.experimental_distribute_dataset(dataset)))
  measured = _train_function(model, optimizer, loss_scale, 4, strategy=strategy)(batch)
  assert float(measured["update_applied"]) == 1.0
  # Compare the changes: float sums in another order differ by rounding, which this
  # ill-conditioned network (see test_low_precision_steps_train) amplifies to ~0.5% of an update;
  # a real error (a doubled all-reduce, the per-replica batch as divisor, BatchNorm statistics
  # averaged wrongly) changes them by 50% or more.
  for value, expected, got in zip(initial, single_model.variables, model.variables):
    expected_change = expected.numpy() - value
    got_change = got.numpy() - value
    # (A bias right before BatchNorm gets no gradient in training: its change is zero in both;
    # changes below the float32 spacing of the weights themselves are rounding.)
    scale = np.abs(expected_change).max()
    tolerance = 0.02 * scale + 2 * np.spacing(np.abs(value).max()) + 1e-9
    np.testing.assert_allclose(got_change, expected_change, atol=tolerance, rtol=0,
                               err_msg=expected.name)


def test_eval_step_counts_match_numpy():
  model, _, _ = _setup()
  batch = _batch(seed=7)
  result = tf.function(functools.partial(step_lib.eval_step, model,
                                         loss_fn=losses.binary_cross_entropy,
                                         head_weights=(1.0, 1.0)))(batch)
  outputs = model(batch["image"], is_training=False)
  for head, logits in zip(("head1", "head2"), outputs):
    predicted = tf.sigmoid(logits).numpy() >= 0.5
    truth = batch["mask"].numpy() >= 0.5
    expected = np.stack([(predicted & truth).sum(axis=(1, 2, 3)),
                         (predicted & ~truth).sum(axis=(1, 2, 3)),
                         (~predicted & truth).sum(axis=(1, 2, 3)),
                         (~predicted & ~truth).sum(axis=(1, 2, 3))], axis=1)
    np.testing.assert_array_equal(np.asarray(result[f"counts/{head}"]), expected)
  expected_loss = sum(float(tf.reduce_mean(losses.binary_cross_entropy(l, batch["mask"])))
                      for l in outputs)
  np.testing.assert_allclose(float(result["loss/total"]), expected_loss, rtol=1e-5)


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
