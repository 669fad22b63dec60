"""dunet/runner.py: steps on every replica, reduced; several steps in one call."""

import numpy as np
import tensorflow as tf

from dunet import runner


def _counting_step(calls: tf.Variable, skip_at: int):
  """A replica step that counts its calls and reports a skipped update at call `skip_at`."""

  def replica_step(batch):
    calls.assign_add(1)
    loss = tf.reduce_mean(batch) + tf.cast(calls, tf.float32)
    return {
      "loss/total": loss,
      "norm/parameters": tf.constant(1.0),
      "update_applied": tf.cast(tf.not_equal(calls, skip_at), tf.float32),
    }

  return replica_step


def _iterator(strategy, count=10):
  data = tf.data.Dataset.range(count).map(lambda i: tf.fill([2], tf.cast(i, tf.float32)))
  return iter(strategy.experimental_distribute_dataset(data.batch(2)))


def test_the_loop_runs_the_steps_sets_each_learning_rate_and_counts_them():
  strategy = tf.distribute.get_strategy()
  calls, global_step = tf.Variable(0), tf.Variable(0, dtype=tf.int64)
  learning_rate = tf.Variable(0.0)
  seen_rates = []

  def replica_step(batch):
    seen_rates.append(None)  # traced once: the loop body is one graph
    return dict(_counting_step(calls, skip_at=-1)(batch), lr=tf.identity(learning_rate))

  loop = runner.make_train_loop_function(
    strategy, replica_step, learning_rate, global_step=global_step
  )
  rates = tf.constant([0.1, 0.2, 0.3, 0.4])
  measured, steps = loop(_iterator(strategy), rates, tf.constant(3))
  assert int(steps) == 3 and int(calls.numpy()) == 3 and int(global_step.numpy()) == 3
  # The third batch (values 4 and 5) with the third rate.
  np.testing.assert_allclose(float(measured["loss/total"]), 4.5 + 3)
  np.testing.assert_allclose(float(measured["lr"]), 0.3)
  assert float(learning_rate.numpy()) == np.float32(0.3)


def test_the_loop_ends_at_a_skipped_update_and_returns_that_step():
  strategy = tf.distribute.get_strategy()
  calls = tf.Variable(0)
  loop = runner.make_train_loop_function(
    strategy, _counting_step(calls, skip_at=2), tf.Variable(0.0)
  )
  measured, steps = loop(_iterator(strategy), tf.zeros([5]), tf.constant(5))
  assert int(steps) == 2 and int(calls.numpy()) == 2
  assert float(measured["update_applied"]) == 0.0


def test_finite_update_needs_an_applied_update_and_finite_values():
  good = {"update_applied": 1.0, "loss/total": 0.5, "norm/parameters": 3.0}
  assert bool(runner.finite_update({k: tf.constant(v) for k, v in good.items()}))
  for name, value in (("update_applied", 0.0), ("loss/total", np.nan), ("norm/parameters", np.inf)):
    bad = dict(good, **{name: value})
    assert not bool(runner.finite_update({k: tf.constant(v) for k, v in bad.items()})), name
