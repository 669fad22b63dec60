"""Optimizers (Adam, Nadam), learning-rate schedules, reduce-on-plateau and early stopping.

The optimizers are small tf.Modules with Keras 3's arithmetic. They differ from Keras optimizers
in what they leave to the caller: `apply` takes gradients that are ALREADY reduced across replicas
(dunet/step.py all-reduces them once, before the loss-scale finiteness check) and never reduces
again, and it can skip a step entirely (`should_apply`), leaving weights, slots and the step counter
untouched, which dynamic loss scaling needs.

All state (slots, step counter, learning rate) is created in the constructor, under whatever
distribution strategy is current, so a tf.train.Checkpoint or a strategy sees it before the first
step. Distribution follows Keras 2's pattern: from replica context, `merge_call` to cross-replica
context, then `strategy.extended.update(variable, fn, ...)` per variable, which runs `fn` once per
device on that device's copy (with that device's gradient). Where a strategy needs no merge call
(XLA-compiled steps on GPUs), the update runs directly in replica context.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Type, Union

import tensorflow as tf

from dunet import registry

FloatLike = Union[float, tf.Tensor]


# ==================================================================================================
# Optimizers
# ==================================================================================================
class _Optimizer(tf.Module):
  """Shared machinery: state creation, distribution, gating. Subclasses write `_update_variable`."""

  # Names of the per-variable slots a subclass keeps (each a zero-initialised copy of the variable).
  SLOT_NAMES: Sequence[str] = ()

  def __init__(
    self, learning_rate: FloatLike, variables: Sequence[tf.Variable], name: Optional[str] = None
  ):
    """Creates the state for `variables` under the current distribution strategy.

    Args:
      learning_rate: initial learning rate (held in the `learning_rate` variable; schedules
        assign to it).
      variables: the variables this optimizer will update (in the order `apply` receives them).
      name: module name.
    """
    super().__init__(name=name)
    variables = list(variables)
    if not variables:
      raise ValueError("the optimizer needs at least one variable to update")
    self._index_of_variable: Dict[object, int] = {}
    for index, variable in enumerate(variables):
      if variable.ref() in self._index_of_variable:
        raise ValueError(f"variable {variable.name} is listed twice")
      self._index_of_variable[variable.ref()] = index
    strategy = tf.distribute.get_strategy()
    with strategy.scope():
      # ONLY_FIRST_REPLICA: assignments from replica context (e.g. a schedule inside a step) take
      # the first replica's value instead of failing.
      self.iterations = tf.Variable(
        0,
        dtype=tf.int64,
        trainable=False,
        name="iterations",
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
      )
      self.learning_rate = tf.Variable(
        learning_rate,
        dtype=tf.float32,
        trainable=False,
        name="learning_rate",
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
      )
      self._create_extra_state()
      slots: Dict[str, List[tf.Variable]] = {slot_name: [] for slot_name in self.SLOT_NAMES}
      for variable in variables:
        with strategy.extended.colocate_vars_with(variable):
          for slot_name in self.SLOT_NAMES:
            slots[slot_name].append(
              tf.Variable(
                tf.zeros(variable.shape, variable.dtype),
                trainable=False,
                name=f"{variable.name.split(':')[0]}/{slot_name}",
              )
            )
    # One attribute per slot kind (tracked lists: checkpoints see them).
    for slot_name, values in slots.items():
      setattr(self, slot_name, values)

  def _create_extra_state(self) -> None:
    """Creates optimizer-wide state besides iterations and learning_rate (under the scope)."""

  def slots_of(self, variable: tf.Variable) -> Dict[str, tf.Variable]:
    """The slot variables of `variable`, by slot name."""
    index = self._index(variable)
    return {slot_name: getattr(self, slot_name)[index] for slot_name in self.SLOT_NAMES}

  def _index(self, variable: tf.Variable) -> int:
    try:
      return self._index_of_variable[variable.ref()]
    except KeyError:
      raise ValueError(
        f"variable {variable.name} was not given to the optimizer's constructor, so it has no slots"
      ) from None

  def apply(
    self,
    grads: Sequence[Optional[tf.Tensor]],
    variables: Sequence[tf.Variable],
    should_apply: Optional[Union[bool, tf.Tensor]] = None,
  ) -> None:
    """Applies one update with gradients already reduced across replicas.

    Works eagerly or in a tf.function, with no strategy, in replica context (inside
    `strategy.run`: pass the all-reduced gradients; every replica must pass the same values) or
    in cross-replica context.

    Args:
      grads: one gradient per variable (None: that variable is left alone this step).
      variables: variables given to the constructor (any subset, any order).
      should_apply: scalar bool; when False nothing changes (variables, slots, iterations).
        None: always apply.
    """
    grads, variables = list(grads), list(variables)
    if len(grads) != len(variables):
      raise ValueError(f"{len(grads)} gradients for {len(variables)} variables")
    for variable in variables:
      self._index(variable)  # fail early, before tracing any update, on an unknown variable
    if should_apply is not None:
      should_apply = tf.convert_to_tensor(should_apply, tf.bool)
    grads = [None if g is None else tf.convert_to_tensor(g) for g in grads]
    if tf.distribute.in_cross_replica_context():
      self._apply_cross_replica(tf.distribute.get_strategy(), grads, variables, should_apply)
    else:
      tf.__internal__.distribute.interim.maybe_merge_call(
        self._apply_cross_replica, tf.distribute.get_strategy(), grads, variables, should_apply
      )

  def _apply_cross_replica(
    self, strategy: tf.distribute.Strategy, grads, variables, should_apply
  ) -> None:
    """Updates every device's copy of the state with that device's gradient and gate."""

    def gated(update: Callable[..., None]) -> Callable[..., None]:
      """Wraps update(var, *args) so it runs only where the device's gate is True."""
      if should_apply is None:
        return lambda variable, gate, *args: update(variable, *args)

      def run(variable, gate, *args):
        def apply_update():
          update(variable, *args)
          return tf.constant(True)

        # tf.cond, not zeroed gradients: a zero gradient would still decay Adam's moments.
        tf.cond(gate, apply_update, lambda: tf.constant(False))

      return run

    gate = should_apply if should_apply is not None else tf.constant(True)
    # The step-wide state first (read by the variable updates), the counter last.
    self._update_extra_state(strategy, gated, gate)
    for grad, variable in zip(grads, variables):
      if grad is None:
        continue
      slots = self.slots_of(variable)
      strategy.extended.update(
        variable,
        gated(lambda var, g, slots=slots: self._update_variable(var, g, slots)),
        args=(gate, grad),
        group=False,
      )
    strategy.extended.update(
      self.iterations, gated(lambda counter: counter.assign_add(1)), args=(gate,), group=False
    )

  def _update_extra_state(self, strategy, gated, gate) -> None:
    """Updates optimizer-wide state once per step, before the variables (Nadam's product)."""

  def _update_variable(
    self, variable: tf.Variable, grad: tf.Tensor, slots: Dict[str, tf.Variable]
  ) -> None:
    """Updates one variable (this device's copy) and its slots."""
    raise NotImplementedError

  def _step_and_learning_rate(self, dtype: tf.DType):
    """(t, lr): the 1-based number of the step being applied and the learning rate, in dtype."""
    step = tf.cast(self.iterations + 1, dtype)
    return step, tf.cast(self.learning_rate, dtype)


class Adam(_Optimizer):
  """Adam (Kingma & Ba) with Keras 3's arithmetic.

  m ← m + (1 − β1)(g − m); v ← v + (1 − β2)(g² − v);
  θ ← θ − lr·√(1 − β2^t)/(1 − β1^t) · m / (√v + ε).
  """

  SLOT_NAMES = ("momentums", "velocities")

  def __init__(
    self,
    learning_rate: FloatLike,
    variables: Sequence[tf.Variable],
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    name: Optional[str] = None,
  ):
    """Args:
    learning_rate: initial learning rate.
    variables: variables to optimise (slots are created now).
    beta_1, beta_2: decay rates of the first and second moment estimates.
    epsilon: added to √v (Keras' default 1e-7, not the paper's 1e-8).
    name: module name.
    """
    self.beta_1 = beta_1
    self.beta_2 = beta_2
    self.epsilon = epsilon
    super().__init__(learning_rate, variables, name=name or "adam")

  def _update_variable(self, variable, grad, slots):
    dtype = variable.dtype
    grad = tf.cast(grad, dtype)
    step, learning_rate = self._step_and_learning_rate(dtype)
    alpha = (
      learning_rate
      * tf.sqrt(1.0 - tf.pow(tf.cast(self.beta_2, dtype), step))
      / (1.0 - tf.pow(tf.cast(self.beta_1, dtype), step))
    )
    momentum, velocity = slots["momentums"], slots["velocities"]
    momentum.assign_add((grad - momentum) * (1.0 - self.beta_1))
    velocity.assign_add((tf.square(grad) - velocity) * (1.0 - self.beta_2))
    variable.assign_sub(alpha * momentum / (tf.sqrt(velocity) + self.epsilon))


class Nadam(_Optimizer):
  """Nadam (Dozat, Adam with Nesterov momentum) with Keras 3's arithmetic.

  Momentum schedule μ_t = β1·(1 − 0.5·0.96^t) and the running product Π_t = μ_1···μ_t, exactly as
  keras.optimizers.Nadam (Keras 3) computes them. Keras 2 used 0.96^(0.004·t) instead; Keras 3's
  μ_t reaches β1 within ~100 steps, Keras 2's after tens of thousands.

  m ← m + (1 − β1)(g − m); v ← v + (1 − β2)(g² − v);
  m̂ = μ_{t+1}·m/(1 − Π_t·μ_{t+1}) + (1 − μ_t)·g/(1 − Π_t); v̂ = v/(1 − β2^t);
  θ ← θ − lr·m̂/(√v̂ + ε).
  """

  SLOT_NAMES = ("momentums", "velocities")
  MOMENTUM_DECAY = 0.96

  def __init__(
    self,
    learning_rate: FloatLike,
    variables: Sequence[tf.Variable],
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = 1e-7,
    name: Optional[str] = None,
  ):
    """Args: as Adam's."""
    self.beta_1 = beta_1
    self.beta_2 = beta_2
    self.epsilon = epsilon
    super().__init__(learning_rate, variables, name=name or "nadam")

  def _create_extra_state(self) -> None:
    self.momentum_product = tf.Variable(
      1.0,
      dtype=tf.float32,
      trainable=False,
      name="momentum_product",
      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )

  def _momentum(self, step: tf.Tensor) -> tf.Tensor:
    """μ_t for a float step t."""
    return self.beta_1 * (1.0 - 0.5 * tf.pow(tf.cast(self.MOMENTUM_DECAY, step.dtype), step))

  def _update_extra_state(self, strategy, gated, gate) -> None:
    def multiply(product):
      step = tf.cast(self.iterations + 1, product.dtype)
      product.assign(product * self._momentum(step))

    strategy.extended.update(self.momentum_product, gated(multiply), args=(gate,), group=False)

  def _update_variable(self, variable, grad, slots):
    dtype = variable.dtype
    grad = tf.cast(grad, dtype)
    step, learning_rate = self._step_and_learning_rate(dtype)
    momentum_t = self._momentum(step)
    momentum_next = self._momentum(step + 1.0)
    product_t = tf.cast(self.momentum_product, dtype)  # already includes μ_t
    product_next = product_t * momentum_next
    momentum, velocity = slots["momentums"], slots["velocities"]
    momentum.assign_add((grad - momentum) * (1.0 - self.beta_1))
    velocity.assign_add((tf.square(grad) - velocity) * (1.0 - self.beta_2))
    momentum_hat = momentum_next * momentum / (1.0 - product_next) + (1.0 - momentum_t) * grad / (
      1.0 - product_t
    )
    velocity_hat = velocity / (1.0 - tf.pow(tf.cast(self.beta_2, dtype), step))
    variable.assign_sub(momentum_hat * learning_rate / (tf.sqrt(velocity_hat) + self.epsilon))


OPTIMIZERS: Dict[str, Type[_Optimizer]] = {"adam": Adam, "nadam": Nadam}


def make_optimizer(
  name: str, learning_rate: FloatLike, variables: Sequence[tf.Variable], **kwargs
) -> _Optimizer:
  """Builds the optimizer called `name` ("adam" or "nadam") for `variables`.

  Call it under the strategy scope the variables were created in.

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  optimizer_class = registry.lookup(OPTIMIZERS, name, "optimizer")
  return optimizer_class(learning_rate, variables, **kwargs)


# ==================================================================================================
# Learning-rate schedules (python: the training loop assigns optimizer.learning_rate each step)
# ==================================================================================================
class ConstantSchedule:
  """The same learning rate at every step."""

  def __init__(self, learning_rate: float):
    self.learning_rate = float(learning_rate)

  def __call__(self, step: int) -> float:
    """Returns the learning rate for 0-based `step`."""
    del step
    return self.learning_rate


class CosineSchedule:
  """Linear warm-up, then cosine decay from base_lr to final_lr over the remaining steps.

  For 0-based step s: during warm-up (s < W) lr = base_lr·(s + 1)/W, so the first step already
  moves and step W − 1 uses base_lr; afterwards
  lr = final_lr + (base_lr − final_lr)·½(1 + cos(π·min(1, (s − W)/(T − W)))), which is base_lr at
  s = W and final_lr from s = T on.
  """

  def __init__(
    self, base_lr: float, total_steps: int, warmup_steps: int = 0, final_lr: float = 0.0
  ):
    """Args:
    base_lr: peak learning rate (> 0).
    total_steps: steps of the whole run, warm-up included (> 0).
    warmup_steps: linear warm-up steps (0 <= warmup_steps <= total_steps).
    final_lr: learning rate at the end of the decay (>= 0).
    """
    if base_lr <= 0:
      raise ValueError(f"base_lr must be positive, got {base_lr}")
    if total_steps <= 0:
      raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
      raise ValueError(
        f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
      )
    if final_lr < 0:
      raise ValueError(f"final_lr must be non-negative, got {final_lr}")
    self.base_lr = float(base_lr)
    self.total_steps = int(total_steps)
    self.warmup_steps = int(warmup_steps)
    self.final_lr = float(final_lr)

  def __call__(self, step: int) -> float:
    """Returns the learning rate for 0-based `step`."""
    step = int(step)
    if step < self.warmup_steps:
      return self.base_lr * (step + 1) / self.warmup_steps
    decay_steps = max(1, self.total_steps - self.warmup_steps)
    progress = min(1.0, (step - self.warmup_steps) / decay_steps)
    return self.final_lr + (self.base_lr - self.final_lr) * 0.5 * (
      1.0 + math.cos(math.pi * progress)
    )


# ==================================================================================================
# Plateau and early stopping (state in tf.Variables so a tf.train.Checkpoint resumes them)
# ==================================================================================================
class _Monitor(tf.Module):
  """Tracks the best value of a metric and how many updates passed without improving on it."""

  def __init__(self, patience: int, mode: str, min_delta: float, name: str):
    super().__init__(name=name)
    if mode not in ("max", "min"):
      raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if patience < 1:
      raise ValueError(f"patience must be at least 1, got {patience}")
    if min_delta < 0:
      raise ValueError(f"min_delta must be non-negative, got {min_delta}")
    self.patience = int(patience)
    self.mode = mode
    self.min_delta = float(min_delta)
    worst = -math.inf if mode == "max" else math.inf
    # float64: metric values are compared exactly as python computed them.
    self.best = tf.Variable(worst, dtype=tf.float64, trainable=False, name="best")
    self.wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="wait")

  def _improves(self, value: float) -> bool:
    """Whether value beats the best by more than min_delta (NaN never does)."""
    best = float(self.best.numpy())
    if self.mode == "max":
      return value > best + self.min_delta
    return value < best - self.min_delta

  def _observe(self, value: float) -> bool:
    """Records value; returns whether it improved (and then resets the wait)."""
    value = float(value)
    if self._improves(value):
      self.best.assign(value)
      self.wait.assign(0)
      return True
    self.wait.assign_add(1)
    return False


class ReduceOnPlateau(_Monitor):
  """Multiplies the learning rate by `factor` after `patience` updates without improvement."""

  def __init__(
    self,
    factor: float = 0.1,
    patience: int = 10,
    min_lr: float = 0.0,
    mode: str = "max",
    min_delta: float = 0.0,
    name: str = "reduce_on_plateau",
  ):
    """Args:
    factor: learning-rate multiplier, in (0, 1).
    patience: updates without improvement before reducing (>= 1).
    min_lr: the learning rate is never reduced below this.
    mode: "max" (higher metric is better, e.g. DSC) or "min" (e.g. a loss).
    min_delta: an improvement must exceed this.
    name: module name.
    """
    if not 0.0 < factor < 1.0:
      raise ValueError(f"factor must be in (0, 1), got {factor}")
    super().__init__(patience, mode, min_delta, name=name)
    self.factor = float(factor)
    self.min_lr = float(min_lr)

  def update(self, metric_value: float, learning_rate: float) -> float:
    """Records a validation result; returns the learning rate to use from now on.

    Args:
      metric_value: the monitored metric.
      learning_rate: the current learning rate.

    Returns:
      learning_rate, or max(learning_rate·factor, min_lr) when the metric has not improved for
      `patience` updates (the count then restarts). Never raises a rate already below min_lr.
    """
    if self._observe(metric_value) or int(self.wait.numpy()) < self.patience:
      return float(learning_rate)
    self.wait.assign(0)
    if learning_rate <= self.min_lr:
      return float(learning_rate)
    return max(float(learning_rate) * self.factor, self.min_lr)


class EarlyStopping(_Monitor):
  """Says to stop after `patience` updates without improvement."""

  def __init__(
    self,
    patience: int = 10,
    mode: str = "max",
    min_delta: float = 0.0,
    name: str = "early_stopping",
  ):
    """Args:
    patience: updates without improvement before stopping (>= 1).
    mode: "max" or "min".
    min_delta: an improvement must exceed this.
    name: module name.
    """
    super().__init__(patience, mode, min_delta, name=name)

  def update(self, metric_value: float) -> bool:
    """Records a validation result; returns True when training should stop."""
    self._observe(metric_value)
    return int(self.wait.numpy()) >= self.patience
