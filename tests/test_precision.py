"""Dtype policies and dynamic loss scaling: overflow, growth, floor, replicas, checkpoints."""

import numpy as np
import pytest
import tensorflow as tf

from dunet import distribute
from dunet import optim
from dunet import precision
from tests import testing_utils

distribute.configure_logical_cpus(2)


def _state(loss_scale):
  return float(loss_scale.scale.numpy()), int(loss_scale.good_steps.numpy())


@pytest.mark.parametrize(
  "name, compute_dtype, scaled",
  [
    ("float32", tf.float32, False),
    ("mixed_float16", tf.float16, True),
    ("mixed_bfloat16", tf.bfloat16, False),
  ],
)
def test_policies(name, compute_dtype, scaled):
  policy = precision.Policy(name)
  assert policy.compute_dtype == compute_dtype
  assert policy.variable_dtype == tf.float32
  assert policy.needs_loss_scaling == scaled
  loss_scale = precision.make_loss_scale(policy)
  assert isinstance(loss_scale, precision.DynamicLossScale if scaled else precision.NoOpLossScale)
  assert name in precision.POLICY_NAMES


def test_unknown_policy():
  with pytest.raises(ValueError, match="'float64'.*float32, mixed_float16, mixed_bfloat16"):
    precision.Policy("float64")


def test_defaults_and_state_dtypes():
  loss_scale = precision.DynamicLossScale()
  assert _state(loss_scale) == (2.0**15, 0)
  assert loss_scale.growth_interval == 2000
  assert loss_scale.scale.dtype == tf.float32 and loss_scale.good_steps.dtype == tf.int64
  assert loss_scale.scale.aggregation == tf.VariableAggregation.ONLY_FIRST_REPLICA
  assert loss_scale.good_steps.aggregation == tf.VariableAggregation.ONLY_FIRST_REPLICA


def test_scale_and_unscale():
  loss_scale = precision.DynamicLossScale(initial_scale=8.0)
  assert float(loss_scale.scale_loss(tf.constant(1.5))) == 12.0
  grads = loss_scale.unscale([tf.constant([8.0, 16.0], tf.float16), None])
  assert grads[1] is None and grads[0].dtype == tf.float32
  np.testing.assert_array_equal(grads[0].numpy(), [1.0, 2.0])


def test_float16_gradients_that_underflow_unscaled_survive_scaling():
  """Why scaling exists: 1e-8 is zero in float16, but 1e-8 x 2**15 is representable."""
  x = tf.Variable(1.0)
  loss_scale = precision.DynamicLossScale()
  with tf.GradientTape(persistent=True) as tape:
    half = tf.cast(x, tf.float16)
    # d loss / d half = 1e-5 * 1e-3, computed in float16 on the way back: 0 unscaled.
    loss = tf.cast(half * tf.constant(1e-3, tf.float16), tf.float32) * 1e-5
    scaled = loss_scale.scale_loss(loss)
  assert float(tape.gradient(loss, x)) == 0.0
  (grad,) = loss_scale.unscale([tape.gradient(scaled, x)])
  assert float(grad) == pytest.approx(1e-8, rel=1e-2)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_all_finite(bad):
  loss_scale = precision.DynamicLossScale()
  assert bool(loss_scale.all_finite([tf.ones(3), None, tf.zeros((2, 2))]))
  assert not bool(loss_scale.all_finite([tf.ones(3), tf.constant([[0.0, bad]])]))
  assert not bool(precision.NoOpLossScale().all_finite([tf.constant([bad], tf.float16)]))
  assert bool(loss_scale.all_finite([]))


def test_overflow_halves_the_scale_and_restarts_the_count():
  loss_scale = precision.DynamicLossScale(initial_scale=1024.0, growth_interval=5)
  for _ in range(3):
    loss_scale.update(loss_scale.all_finite([tf.ones(2)]))
  assert _state(loss_scale) == (1024.0, 3)
  loss_scale.update(loss_scale.all_finite([tf.constant([1.0, np.inf])]))
  assert _state(loss_scale) == (512.0, 0)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["tf_function", "xla"])
def test_growth_after_the_interval(jit_compile):
  loss_scale = precision.DynamicLossScale(initial_scale=4.0, growth_interval=3)
  update = tf.function(loss_scale.update, jit_compile=jit_compile)
  states = []
  for _ in range(7):
    update(tf.constant(True))
    states.append(_state(loss_scale))
  assert states == [(4.0, 1), (4.0, 2), (8.0, 0), (8.0, 1), (8.0, 2), (16.0, 0), (16.0, 1)]


def test_floor_and_no_growth_past_float32():
  loss_scale = precision.DynamicLossScale(initial_scale=4.0, min_scale=2.0)
  for _ in range(3):
    loss_scale.update(tf.constant(False))
  assert _state(loss_scale) == (2.0, 0)

  huge = precision.DynamicLossScale(initial_scale=2.0**127, growth_interval=1)
  huge.update(tf.constant(True))
  assert _state(huge) == (2.0**127, 0)  # 2**128 is not a float32


def test_bad_arguments():
  with pytest.raises(ValueError, match="growth_interval"):
    precision.DynamicLossScale(growth_interval=0)
  with pytest.raises(ValueError, match="factor"):
    precision.DynamicLossScale(factor=1.0)
  with pytest.raises(ValueError, match="min_scale"):
    precision.DynamicLossScale(initial_scale=1.0, min_scale=2.0)


def test_no_op_loss_scale():
  loss_scale = precision.make_loss_scale("float32")
  assert float(loss_scale.scale) == 1.0
  assert float(loss_scale.scale_loss(tf.constant(3.0))) == 3.0
  (grad,) = loss_scale.unscale([tf.constant([1.5], tf.bfloat16)])
  assert grad.dtype == tf.float32 and float(grad[0]) == 1.5
  loss_scale.update(tf.constant(False))  # nothing to change
  assert float(loss_scale.scale) == 1.0


def test_checkpoint_round_trip(tmp_path):
  loss_scale = precision.DynamicLossScale(initial_scale=64.0, growth_interval=10)
  loss_scale.update(tf.constant(False))
  loss_scale.update(tf.constant(True))
  path = tf.train.Checkpoint(loss_scale=loss_scale).save(str(tmp_path / "c"))
  restored = precision.DynamicLossScale(growth_interval=10)
  tf.train.Checkpoint(loss_scale=restored).restore(path).assert_consumed()
  assert _state(restored) == (32.0, 1)


@pytest.mark.parametrize("merge_call", [True, False], ids=["merge_call", "no_merge_call"])
def test_mirrored_step_skips_together_and_updates_every_copy(monkeypatch, merge_call):
  """The step's sequence inside strategy.run: reduce, unscale, check, gated apply, update.

  One replica's gradient overflows; after the all-reduce both replicas see it, skip the
  optimizer, and halve the scale; a finite step then applies everywhere. Without merge_call is
  how MirroredStrategy runs an XLA-compiled step on GPUs (simulated here on logical CPUs).
  """
  if merge_call:
    strategy = distribute.make_strategy("mirrored")  # over the two logical CPUs
  else:
    strategy = testing_utils.mirrored_strategy_without_merge_call(monkeypatch)
  with strategy.scope():
    weight = tf.Variable([1.0, 2.0])
    optimizer = optim.Adam(0.1, [weight])
    loss_scale = precision.DynamicLossScale(initial_scale=16.0, growth_interval=2)

  @tf.function
  def step(poison_replica_1):
    def replica_fn():
      context = tf.distribute.get_replica_context()
      with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.cast(weight, tf.float16) ** 2)
        scaled = loss_scale.scale_loss(tf.cast(loss, tf.float32))
      (grad,) = tape.gradient(scaled, [weight])
      poison = poison_replica_1 & tf.equal(context.replica_id_in_sync_group, 1)
      grad = tf.where(poison, tf.constant(np.inf, tf.float32), grad)
      (grad,) = loss_scale.unscale(context.all_reduce(tf.distribute.ReduceOp.SUM, [grad]))
      finite = loss_scale.all_finite([grad])
      optimizer.apply([grad], [weight], should_apply=finite)
      loss_scale.update(finite)
      return finite

    return strategy.experimental_local_results(strategy.run(replica_fn))

  def copies(variable):
    return [c.numpy().tolist() for c in strategy.experimental_local_results(variable)]

  assert [bool(f) for f in step(tf.constant(True))] == [False, False]
  assert copies(weight) == [[1.0, 2.0]] * 2
  assert copies(loss_scale.scale) == [8.0, 8.0] and copies(loss_scale.good_steps) == [0, 0]
  assert copies(optimizer.iterations) == [0, 0]

  for _ in range(2):
    assert [bool(f) for f in step(tf.constant(False))] == [True, True]
  assert copies(loss_scale.scale) == [16.0, 16.0] and copies(loss_scale.good_steps) == [0, 0]
  assert copies(optimizer.iterations) == [2, 2]
  first, second = copies(weight)
  assert first == second and first != [1.0, 2.0]


@pytest.mark.parametrize(
  "gpus, cpu_flags, expected",
  [
    ([], ["sse4_2", "avx512f", "avx512_bf16"], "mixed_bfloat16"),
    ([], ["sse4_2", "amx_bf16"], "mixed_bfloat16"),
    ([], ["sse4_2", "avx512f"], "float32"),
    (["GPU:0"], ["avx512_bf16"], "float32"),
  ],
)
def test_auto_precision_follows_the_hardware(gpus, cpu_flags, expected):
  assert precision.default_policy_name(gpus=gpus, cpu_flags=cpu_flags) == expected


def test_resolve_policy_name():
  assert precision.resolve_policy_name("mixed_float16") == "mixed_float16"
  assert precision.resolve_policy_name("auto") == precision.default_policy_name()
  assert precision.resolve_policy_name("auto") in precision.POLICY_NAMES
