"""Builds what a training step needs: model, optimizer, loss scale, train and eval functions.

The one recipe shared by training (dunet/trainer.py), the benchmark (profiling/bench.py), the
parity measurements (tests/reference_training.py) and the step tests, so that each runs exactly
the step training runs. The step itself is dunet/step.py; dunet/runner.py runs it per replica.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import tensorflow as tf

from dunet import optim
from dunet import precision
from dunet import runner
from dunet import step as step_lib
from dunet.models import DoubleUNet


@dataclasses.dataclass
class TrainingParts:
  """The stateful pieces of training, created under one strategy's scope."""

  model: tf.Module
  optimizer: Any  # a dunet.optim optimizer
  loss_scale: Any  # a dunet.precision loss scale (a no-op one without float16)
  policy: precision.Policy


def build_training_parts(
  policy: precision.Policy,
  optimizer_name: str,
  learning_rate: float,
  *,
  strategy: Optional[tf.distribute.Strategy] = None,
  make_model: Callable[..., tf.Module] = DoubleUNet,
  model_options: Optional[Mapping[str, Any]] = None,
  optimizer_options: Optional[Mapping[str, Any]] = None,
  initial_loss_scale: float = 2.0**15,
  loss_scale_growth_interval: int = 2000,
) -> TrainingParts:
  """Creates model, optimizer and loss scale, in this order, under `strategy.scope()`.

  Args:
    policy: the precision policy (its compute dtype goes to the model).
    optimizer_name: "adam" or "nadam".
    learning_rate: the optimizer's initial learning rate.
    strategy: where the variables live (default: the current strategy).
    make_model: the model class or factory; called as make_model(compute_dtype=..., **options).
    model_options: more keyword arguments for make_model (DoubleUNet: batch_norm_momentum,
      vgg19_kernel_init).
    optimizer_options: more keyword arguments for the optimizer (e.g. epsilon).
    initial_loss_scale: dynamic loss scale start (float16 only).
    loss_scale_growth_interval: finite steps before the loss scale doubles (float16 only).

  Returns:
    The parts. Creation order is fixed: with a global seed, the same arguments give the same
    initial weights.
  """
  strategy = strategy or tf.distribute.get_strategy()
  with strategy.scope():
    model = make_model(compute_dtype=policy.compute_dtype, **dict(model_options or {}))
    optimizer = optim.make_optimizer(
      optimizer_name, learning_rate, model.trainable_variables, **dict(optimizer_options or {})
    )
    loss_scale = precision.make_loss_scale(
      policy, initial_scale=initial_loss_scale, growth_interval=loss_scale_growth_interval
    )
  return TrainingParts(model=model, optimizer=optimizer, loss_scale=loss_scale, policy=policy)


def make_train_function(
  parts: TrainingParts,
  *,
  loss_fn: Callable,
  head_weights: Sequence[float],
  global_batch_size: int,
  strategy: Optional[tf.distribute.Strategy] = None,
  jit_compile: bool = False,
  global_step: Optional[tf.Variable] = None,
) -> Callable[[Dict[str, tf.Tensor]], Dict[str, tf.Tensor]]:
  """tf.function(batch) -> measurements reduced across replicas: dunet.step.train_step per replica.

  Args:
    parts: what build_training_parts made.
    loss_fn: a dunet.losses heads loss or per-example loss (see dunet.step.train_step).
    head_weights: deep-supervision weight per head.
    global_batch_size: images per step over all replicas (the loss divisor).
    strategy: the strategy the parts were built under (default: the current one).
    jit_compile: compile each replica's step with XLA.
    global_step: incremented once per call, if given.
  """
  replica_step = _replica_step(parts, loss_fn, head_weights, global_batch_size)
  return runner.make_train_function(
    strategy or tf.distribute.get_strategy(), replica_step, jit_compile, global_step
  )


def make_train_loop_function(
  parts: TrainingParts,
  *,
  loss_fn: Callable,
  head_weights: Sequence[float],
  global_batch_size: int,
  strategy: Optional[tf.distribute.Strategy] = None,
  jit_compile: bool = False,
  global_step: Optional[tf.Variable] = None,
) -> Callable:
  """tf.function(iterator, learning_rates, num_steps) -> (last measurements, steps run): the
  steps of `make_train_function` in a loop inside one call (dunet.runner.make_train_loop_function;
  same arguments as make_train_function)."""
  replica_step = _replica_step(parts, loss_fn, head_weights, global_batch_size)
  return runner.make_train_loop_function(
    strategy or tf.distribute.get_strategy(),
    replica_step,
    parts.optimizer.learning_rate,
    jit_compile,
    global_step,
  )


def _replica_step(
  parts: TrainingParts, loss_fn: Callable, head_weights: Sequence[float], global_batch_size: int
) -> Callable:
  return functools.partial(
    step_lib.train_step,
    parts.model,
    parts.optimizer,
    parts.loss_scale,
    loss_fn=loss_fn,
    head_weights=head_weights,
    global_batch_size=global_batch_size,
  )


def make_eval_function(
  model: tf.Module, *, loss_fn: Callable, head_weights: Sequence[float], threshold: float = 0.5
) -> Callable[[Dict[str, tf.Tensor]], Dict[str, tf.Tensor]]:
  """tf.function(batch) -> dunet.step.eval_step's losses, confusion counts and probabilities."""
  return tf.function(
    functools.partial(
      step_lib.eval_step, model, loss_fn=loss_fn, head_weights=head_weights, threshold=threshold
    )
  )
