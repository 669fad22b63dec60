"""Optimizers against Keras 3 as oracle; gating, distribution, checkpoints; schedules; monitors."""

import math

import numpy as np
import pytest
import tensorflow as tf

from dunet import distribute
from dunet import optim
from tests import testing_utils

distribute.configure_logical_cpus(2)

import keras  # noqa: E402  (after the device split: keras initialises TensorFlow's devices)

LEARNING_RATE = 1e-2
KERAS_OPTIMIZERS = {"adam": keras.optimizers.Adam, "nadam": keras.optimizers.Nadam}


def _initial_values(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(2,)).astype(np.float32)]


def _gradients(steps, seed=1):
  rng = np.random.default_rng(seed)
  return [
    [rng.normal(size=v.shape).astype(np.float32) for v in _initial_values()] for _ in range(steps)
  ]


def _keras_trajectory(name, gradients, learning_rates):
  """Keras 3's variable values after each step (the oracle)."""
  variables = [keras.Variable(v) for v in _initial_values()]
  optimizer = KERAS_OPTIMIZERS[name](learning_rate=learning_rates[0])
  trajectory = []
  for grads, learning_rate in zip(gradients, learning_rates):
    optimizer.learning_rate.assign(learning_rate)
    optimizer.apply([tf.constant(g) for g in grads], variables)
    trajectory.append([np.array(v) for v in variables])
  return trajectory


def _assert_values(variables, expected, atol=1e-6):
  for variable, value in zip(variables, expected):
    np.testing.assert_allclose(np.asarray(variable), value, rtol=0, atol=atol)


@pytest.mark.parametrize("name", ["adam", "nadam"])
@pytest.mark.parametrize("mode", ["eager", "tf_function", "xla"])
def test_matches_keras_over_several_steps(name, mode):
  gradients = _gradients(6)
  # The learning rate changes half-way, as a schedule would change it.
  learning_rates = [LEARNING_RATE] * 3 + [LEARNING_RATE / 3] * 3
  expected = _keras_trajectory(name, gradients, learning_rates)
  variables = [tf.Variable(v) for v in _initial_values()]
  optimizer = optim.make_optimizer(name, LEARNING_RATE, variables)
  apply = {
    "eager": optimizer.apply,
    "tf_function": tf.function(optimizer.apply),
    "xla": tf.function(optimizer.apply, jit_compile=True),
  }[mode]
  for grads, learning_rate, values in zip(gradients, learning_rates, expected):
    optimizer.learning_rate.assign(learning_rate)
    apply([tf.constant(g) for g in grads], variables)
    _assert_values(variables, values)
  assert int(optimizer.iterations.numpy()) == len(gradients)


def test_default_hyperparameters_are_keras_defaults():
  adam = optim.Adam(1e-3, [tf.Variable(1.0)])
  nadam = optim.Nadam(1e-3, [tf.Variable(1.0)])
  for ours, theirs in ((adam, keras.optimizers.Adam()), (nadam, keras.optimizers.Nadam())):
    assert (ours.beta_1, ours.beta_2, ours.epsilon) == (
      theirs.beta_1,
      theirs.beta_2,
      theirs.epsilon,
    )
  assert adam.epsilon == 1e-7


def test_state_exists_before_the_first_step():
  variables = [tf.Variable(v) for v in _initial_values()]
  optimizer = optim.Nadam(LEARNING_RATE, variables)
  # 2 slots per variable + iterations + learning rate + Nadam's momentum product.
  assert len(optimizer.variables) == 2 * len(variables) + 3
  assert optimizer.iterations.dtype == tf.int64
  assert optimizer.learning_rate.dtype == tf.float32
  slots = optimizer.slots_of(variables[0])
  assert set(slots) == {"momentums", "velocities"} and slots["momentums"].shape == (3, 2)


@pytest.mark.parametrize("name", ["adam", "nadam"])
@pytest.mark.parametrize("jit_compile", [False, True], ids=["tf_function", "xla"])
def test_should_apply_false_changes_nothing(name, jit_compile):
  """A skipped step leaves everything as it was: later steps follow Keras without that step."""
  gradients = _gradients(3)
  expected = _keras_trajectory(name, gradients, [LEARNING_RATE] * 3)
  variables = [tf.Variable(v) for v in _initial_values()]
  optimizer = optim.make_optimizer(name, LEARNING_RATE, variables)
  apply = tf.function(optimizer.apply, jit_compile=jit_compile)
  apply(gradients[0], variables, should_apply=tf.constant(True))
  state_before = [v.numpy() for v in list(optimizer.variables) + variables]
  apply([g * 1e3 for g in gradients[1]], variables, should_apply=tf.constant(False))
  for before, variable in zip(state_before, list(optimizer.variables) + variables):
    np.testing.assert_array_equal(variable.numpy(), before)
  assert int(optimizer.iterations.numpy()) == 1
  for grads, values in zip(gradients[1:], expected[1:]):
    apply(grads, variables, should_apply=tf.constant(True))
    _assert_values(variables, values)


def test_none_gradient_leaves_its_variable_alone():
  variables = [tf.Variable(v) for v in _initial_values()]
  optimizer = optim.Adam(LEARNING_RATE, variables)
  first_before = variables[0].numpy()
  optimizer.apply([None, tf.ones(2)], variables)
  np.testing.assert_array_equal(variables[0].numpy(), first_before)
  assert not np.allclose(variables[1].numpy(), _initial_values()[1])
  assert int(optimizer.iterations.numpy()) == 1


def test_errors_are_clear():
  variables = [tf.Variable(v) for v in _initial_values()]
  optimizer = optim.Adam(LEARNING_RATE, variables)
  with pytest.raises(ValueError, match="not given to the optimizer"):
    optimizer.apply([tf.ones(())], [tf.Variable(1.0)])
  with pytest.raises(ValueError, match="2 gradients for 1 variables"):
    optimizer.apply([tf.ones((3, 2)), tf.ones(2)], variables[:1])
  with pytest.raises(ValueError, match="valid names: adam, nadam"):
    optim.make_optimizer("sgd", LEARNING_RATE, variables)


def _mirrored():
  # Over the two logical CPUs (see distribute.make_strategy for why not a bare MirroredStrategy).
  return distribute.make_strategy("mirrored")


@pytest.mark.parametrize("name", ["adam", "nadam"])
def test_mirrored_replica_context_matches_one_device(name):
  """Inside strategy.run with all-reduced gradients: the one-device update, applied once."""
  strategy = _mirrored()
  with strategy.scope():
    variables = [tf.Variable(v) for v in _initial_values()]
    optimizer = optim.make_optimizer(name, LEARNING_RATE, variables)

  @tf.function
  def step(grads, should_apply):
    def replica_fn():
      context = tf.distribute.get_replica_context()
      # Replica r contributes (r + 1)/3 of the gradient: the all-reduced sum is the gradient.
      share = tf.cast(context.replica_id_in_sync_group + 1, tf.float32) / 3.0
      reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, [g * share for g in grads])
      optimizer.apply(reduced, variables, should_apply=should_apply)

    strategy.run(replica_fn)

  gradients = _gradients(4)
  for grads in gradients:
    step(grads, tf.constant(True))
  step(gradients[0], tf.constant(False))  # skipped on every replica
  expected = _keras_trajectory(name, gradients, [LEARNING_RATE] * 4)[-1]
  for variable, value in zip(variables, expected):
    for copy in strategy.experimental_local_results(variable):
      np.testing.assert_allclose(copy.numpy(), value, atol=1e-6)
  for state in optimizer.variables:
    copies = [c.numpy() for c in strategy.experimental_local_results(state)]
    assert len(copies) == 2
    np.testing.assert_array_equal(copies[0], copies[1])
  assert [int(c) for c in strategy.experimental_local_results(optimizer.iterations)] == [4, 4]


def test_mirrored_without_merge_call(monkeypatch):
  """The path MirroredStrategy takes in an XLA-compiled step on GPUs: updates in replica context.

  There `strategy.extended._use_merge_call()` is False, so the optimizer updates each replica's
  copies directly instead of through merge_call; this simulates it on the logical CPUs.
  """
  strategy = testing_utils.mirrored_strategy_without_merge_call(monkeypatch)
  with strategy.scope():
    variables = [tf.Variable(v) for v in _initial_values()]
    optimizer = optim.Nadam(LEARNING_RATE, variables)

  @tf.function
  def step(grads, should_apply):
    def replica_fn():
      reduced = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, [g / 2.0 for g in grads]
      )
      optimizer.apply(reduced, variables, should_apply=should_apply)

    strategy.run(replica_fn)

  gradients = _gradients(2)
  step(gradients[0], tf.constant(True))
  step(gradients[1], tf.constant(False))
  step(gradients[1], tf.constant(True))
  expected = _keras_trajectory("nadam", gradients, [LEARNING_RATE] * 2)[-1]
  for variable, value in zip(variables, expected):
    for copy in strategy.experimental_local_results(variable):
      np.testing.assert_allclose(copy.numpy(), value, atol=1e-6)
  assert [int(c) for c in strategy.experimental_local_results(optimizer.iterations)] == [2, 2]


def test_mirrored_cross_replica_context():
  strategy = _mirrored()
  with strategy.scope():
    variables = [tf.Variable(v) for v in _initial_values()]
    optimizer = optim.Adam(LEARNING_RATE, variables)
    gradients = _gradients(2)
    for grads in gradients:
      optimizer.apply([tf.constant(g) for g in grads], variables)
  expected = _keras_trajectory("adam", gradients, [LEARNING_RATE] * 2)[-1]
  for variable, value in zip(variables, expected):
    for copy in strategy.experimental_local_results(variable):
      np.testing.assert_allclose(copy.numpy(), value, atol=1e-6)
  assert int(optimizer.iterations.numpy()) == 2


@pytest.mark.parametrize("name", ["adam", "nadam"])
def test_checkpoint_round_trip_resumes_exactly(name, tmp_path):
  gradients = _gradients(3)
  variables = [tf.Variable(v) for v in _initial_values()]
  optimizer = optim.make_optimizer(name, LEARNING_RATE, variables)
  for grads in gradients[:2]:
    optimizer.apply(grads, variables)
  optimizer.learning_rate.assign(LEARNING_RATE / 2)
  path = tf.train.Checkpoint(variables=variables, optimizer=optimizer).save(str(tmp_path / "c"))
  optimizer.apply(gradients[2], variables)

  restored_variables = [tf.Variable(np.zeros_like(v)) for v in _initial_values()]
  restored = optim.make_optimizer(name, 1.0, restored_variables)
  tf.train.Checkpoint(variables=restored_variables, optimizer=restored).restore(
    path
  ).assert_consumed()
  assert int(restored.iterations.numpy()) == 2
  assert float(restored.learning_rate.numpy()) == np.float32(LEARNING_RATE / 2)
  restored.apply(gradients[2], restored_variables)
  for got, expected in zip(
    list(restored.variables) + restored_variables, list(optimizer.variables) + variables
  ):
    np.testing.assert_array_equal(got.numpy(), expected.numpy())


# ==================================================================================================
# Schedules
# ==================================================================================================
def test_constant_schedule():
  schedule = optim.ConstantSchedule(3e-4)
  assert schedule(0) == schedule(10_000) == 3e-4


def test_cosine_schedule_values():
  schedule = optim.CosineSchedule(1.0, total_steps=110, warmup_steps=10, final_lr=0.1)
  np.testing.assert_allclose([schedule(s) for s in (0, 4, 9)], [0.1, 0.5, 1.0])
  assert schedule(10) == pytest.approx(1.0)
  # Half-way through the decay: the midpoint of base and final.
  assert schedule(60) == pytest.approx(0.55)
  # A quarter of the way: final + (base - final) * (1 + cos(pi / 4)) / 2.
  assert schedule(35) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
  assert schedule(110) == pytest.approx(0.1) and schedule(500) == pytest.approx(0.1)
  values = [schedule(s) for s in range(10, 111)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_schedule_without_warmup_starts_at_base():
  schedule = optim.CosineSchedule(2e-4, total_steps=100)
  assert schedule(0) == pytest.approx(2e-4)
  assert schedule(100) == pytest.approx(0.0)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(base_lr=0.0, total_steps=10), "base_lr"),
    (dict(base_lr=1.0, total_steps=0), "total_steps"),
    (dict(base_lr=1.0, total_steps=10, warmup_steps=11), "warmup_steps"),
    (dict(base_lr=1.0, total_steps=10, final_lr=-1.0), "final_lr"),
  ],
)
def test_cosine_schedule_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    optim.CosineSchedule(**kwargs)


# ==================================================================================================
# Reduce on plateau, early stopping
# ==================================================================================================
def test_reduce_on_plateau_max_mode():
  plateau = optim.ReduceOnPlateau(factor=0.5, patience=2, min_lr=0.2, mode="max", min_delta=0.01)
  learning_rate = 1.0
  history = []
  # 0.605 does not beat 0.6 by more than min_delta: it counts as no improvement.
  for value in [0.5, 0.6, 0.605, 0.59, 0.7, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]:
    learning_rate = plateau.update(value, learning_rate)
    history.append(learning_rate)
  assert history == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.2, 0.2, 0.2]
  assert float(plateau.best.numpy()) == pytest.approx(0.7)


def test_reduce_on_plateau_min_mode():
  plateau = optim.ReduceOnPlateau(factor=0.1, patience=1, mode="min")
  assert plateau.update(1.0, 1e-3) == 1e-3
  assert plateau.update(0.5, 1e-3) == 1e-3
  assert plateau.update(0.7, 1e-3) == pytest.approx(1e-4)


def test_early_stopping():
  stopping = optim.EarlyStopping(patience=2, mode="max")
  decisions = [stopping.update(v) for v in [0.5, 0.4, 0.6, 0.6, float("nan")]]
  assert decisions == [False, False, False, False, True]


def test_monitors_resume_from_a_checkpoint(tmp_path):
  plateau = optim.ReduceOnPlateau(factor=0.5, patience=2)
  stopping = optim.EarlyStopping(patience=2)
  plateau.update(0.8, 1.0)
  plateau.update(0.7, 1.0)
  stopping.update(0.8)
  stopping.update(0.7)
  path = tf.train.Checkpoint(plateau=plateau, stopping=stopping).save(str(tmp_path / "c"))

  plateau, stopping = optim.ReduceOnPlateau(factor=0.5, patience=2), optim.EarlyStopping(2)
  tf.train.Checkpoint(plateau=plateau, stopping=stopping).restore(path).assert_consumed()
  # One more non-improving value completes the patience restored from the checkpoint.
  assert plateau.update(0.7, 1.0) == 0.5
  assert stopping.update(0.7)


@pytest.mark.parametrize(
  "make, message",
  [
    (lambda: optim.ReduceOnPlateau(factor=1.5), "factor"),
    (lambda: optim.ReduceOnPlateau(patience=0), "patience"),
    (lambda: optim.EarlyStopping(mode="best"), "mode"),
    (lambda: optim.EarlyStopping(min_delta=-1.0), "min_delta"),
  ],
)
def test_monitors_reject_bad_arguments(make, message):
  with pytest.raises(ValueError, match=message):
    make()
