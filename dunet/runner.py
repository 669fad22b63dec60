"""Wraps the per-replica step for a strategy: compile, run on every replica, reduce.

Shared by dunet/train.py and profiling/bench.py so that the benchmark times exactly the function
training runs.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

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
  if jit_compile:
    replica_step = tf.function(replica_step, jit_compile=True)

  @tf.function
  def train_function(batch) -> Dict[str, tf.Tensor]:
    per_replica = strategy.run(replica_step, args=(batch,))
    reduced = {}
    for name, value in per_replica.items():
      # Losses are per-replica shares of the global mean: sum them. The rest is equal everywhere.
      op = tf.distribute.ReduceOp.SUM if name.startswith("loss/") else tf.distribute.ReduceOp.MEAN
      reduced[name] = strategy.reduce(op, value, axis=None)
    if global_step is not None:
      global_step.assign_add(1)
    return reduced

  return train_function
