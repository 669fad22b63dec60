"""Wraps the per-replica step for a strategy: compile, run on every replica, reduce.

Shared by dunet/train.py and profiling/bench.py so that the benchmark times exactly the function
training runs.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import tensorflow as tf


def make_train_function(
  strategy: tf.distribute.Strategy,
  replica_step: Callable,
  jit_compile: bool = False,
  global_step: Optional[tf.Variable] = None,
) -> Callable:
  """Returns a tf.function(batch) -> reduced measurements that runs `replica_step` on each replica.

  Args:
    strategy: where to run.
    replica_step: batch -> dict of scalars (dunet.step.train_step with its arguments bound).
    jit_compile: compile each replica's whole step with XLA (forward, backward, all-reduce,
      update); the reductions across replicas for reporting stay outside.
    global_step: incremented once per call, if given.
  """
  run_step = _reduced_step(strategy, replica_step, jit_compile, global_step)

  @tf.function
  def train_function(batch) -> Dict[str, tf.Tensor]:
    return run_step(batch)

  return train_function


def make_train_loop_function(
  strategy: tf.distribute.Strategy,
  replica_step: Callable,
  learning_rate: tf.Variable,
  jit_compile: bool = False,
  global_step: Optional[tf.Variable] = None,
) -> Callable:
  """Returns a tf.function(iterator, learning_rates, num_steps) -> the last step's measurements.

  It runs up to `num_steps` steps inside one call, each exactly what `make_train_function`'s
  call runs, on the next batch of `iterator` (a distributed iterator), after setting
  `learning_rate` to `learning_rates[i]` for step i. The host synchronises once per call instead
  of once per step (Orbit's steps_per_loop). The loop ends early, after the step, when a step's
  update was skipped or its loss or parameter norm is not finite, so that the caller sees that
  step's measurements, as it would one step at a time.

  Args:
    strategy: where to run.
    replica_step: batch -> dict of scalars (dunet.step.train_step with its arguments bound).
    learning_rate: the optimizer's learning-rate variable.
    jit_compile: compile each replica's step with XLA.
    global_step: incremented once per step, if given.

  Returns:
    train_loop(iterator, learning_rates float32 [>= num_steps], num_steps int32 scalar) ->
    (measurements of the last step run, steps run).
  """
  run_step = _reduced_step(strategy, replica_step, jit_compile, global_step)

  @tf.function
  def train_loop(iterator, learning_rates, num_steps) -> Tuple[Dict[str, tf.Tensor], tf.Tensor]:
    learning_rate.assign(learning_rates[0])
    measured = run_step(next(iterator))
    steps = tf.constant(1, tf.int32)
    for index in tf.range(1, num_steps):
      if not finite_update(measured):
        break
      learning_rate.assign(learning_rates[index])
      measured = run_step(next(iterator))
      steps = index + 1
    return measured, steps

  return train_loop


def finite_update(measured: Dict[str, tf.Tensor]) -> tf.Tensor:
  """Whether a step applied its update and its loss and parameter norm are finite (a bool
  tensor; the trainer's test of a step's measurements, in graph form)."""
  return tf.logical_and(
    measured["update_applied"] > 0,
    tf.reduce_all(
      tf.math.is_finite(tf.stack([measured["loss/total"], measured["norm/parameters"]]))
    ),
  )


def _reduced_step(
  strategy: tf.distribute.Strategy,
  replica_step: Callable,
  jit_compile: bool,
  global_step: Optional[tf.Variable],
) -> Callable:
  """batch -> measurements reduced across replicas (to be called inside a tf.function)."""
  if jit_compile:
    replica_step = tf.function(replica_step, jit_compile=True)

  def run_step(batch) -> Dict[str, tf.Tensor]:
    per_replica = strategy.run(replica_step, args=(batch,))
    reduced = {}
    for name, value in per_replica.items():
      # Losses are per-replica shares of the global mean: sum them. The rest is equal everywhere.
      op = tf.distribute.ReduceOp.SUM if name.startswith("loss/") else tf.distribute.ReduceOp.MEAN
      reduced[name] = strategy.reduce(op, value, axis=None)
    if global_step is not None:
      global_step.assign_add(1)
    return reduced

  return run_step
