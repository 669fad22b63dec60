"""Runs every registered block through XLA, checkpoints, SavedModel and MirroredStrategy.

Like Sonnet's conformance tests: one generic test per property, parametrised over
tests/conformance/descriptors.py, so a new block gets all of them by being registered.
"""

import numpy as np
import pytest
import tensorflow as tf

from dunet import distribute
from tests.conformance.descriptors import DESCRIPTORS

_IDS = [d.name for d in DESCRIPTORS]


def _inputs(descriptor, seed=0):
  return tf.random.stateless_uniform(descriptor.input_shape, seed=[seed, 1], minval=-1, maxval=1)


def _assert_nests_close(expected, actual, atol=1e-5):
  for e, a in zip(tf.nest.flatten(expected), tf.nest.flatten(actual)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=atol, rtol=1e-4)


def _copy_variables(source, target):
  assert len(source.variables) == len(target.variables)
  for s, t in zip(source.variables, target.variables):
    t.assign(s.read_value())


@pytest.mark.parametrize("descriptor", DESCRIPTORS, ids=_IDS)
@pytest.mark.parametrize("is_training", [False, True])
def test_xla_compiles_and_matches_eager(descriptor, is_training):
  module = descriptor.create()
  inputs = _inputs(descriptor)
  snapshot = [v.numpy() for v in module.variables]
  eager = descriptor.apply(module, inputs, is_training)
  for variable, value in zip(module.variables, snapshot):
    variable.assign(value)
  compiled = tf.function(lambda x: descriptor.apply(module, x, is_training), jit_compile=True)
  _assert_nests_close(
    eager, compiled(inputs), atol=descriptor.xla_training_atol if is_training else 1e-4
  )


@pytest.mark.parametrize("descriptor", DESCRIPTORS, ids=_IDS)
def test_checkpoint_round_trip(descriptor, tmp_path):
  module = descriptor.create()
  for i, variable in enumerate(module.variables):  # values no fresh module has
    variable.assign(tf.fill(variable.shape, 0.01 * (i + 1)) + variable * 0.5)
  path = tf.train.Checkpoint(module=module).write(str(tmp_path / "ckpt"))
  restored = descriptor.create()
  tf.train.Checkpoint(module=restored).read(path).assert_consumed()
  for original, loaded in zip(module.variables, restored.variables):
    np.testing.assert_array_equal(original.numpy(), loaded.numpy())
  inputs = _inputs(descriptor)
  _assert_nests_close(
    descriptor.apply(module, inputs, False), descriptor.apply(restored, inputs, False)
  )


@pytest.mark.parametrize("descriptor", DESCRIPTORS, ids=_IDS)
def test_saved_model_round_trip(descriptor, tmp_path):
  module = descriptor.create()
  inputs = _inputs(descriptor)
  module.serve = tf.function(
    lambda x: descriptor.apply(module, x, False),
    input_signature=[tf.TensorSpec([None, *descriptor.input_shape[1:]], tf.float32)],
  )
  tf.saved_model.save(module, str(tmp_path / "saved"))
  loaded = tf.saved_model.load(str(tmp_path / "saved"))
  _assert_nests_close(descriptor.apply(module, inputs, False), loaded.serve(inputs))


@pytest.mark.parametrize("descriptor", DESCRIPTORS, ids=_IDS)
def test_mirrored_replicas_match_single_device(descriptor):
  devices = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
  assert len(devices) == 2, "tests/conftest.py should configure two logical CPUs"
  reference = descriptor.create()
  strategy = distribute.make_strategy("mirrored", devices=devices)
  with strategy.scope():
    module = descriptor.create()
  _copy_variables(reference, module)
  inputs = _inputs(descriptor)
  half = descriptor.input_shape[0] // 2
  shards = (inputs[:half], inputs[half:])
  per_replica = strategy.experimental_distribute_values_from_function(
    lambda context: shards[context.replica_id_in_sync_group]
  )

  @tf.function
  def run(is_training):
    return strategy.run(lambda x: descriptor.apply(module, x, is_training), args=(per_replica,))

  inference = run(False)
  for replica, shard in enumerate(shards):
    local = tf.nest.map_structure(
      lambda t, replica=replica: strategy.experimental_local_results(t)[replica], inference
    )
    _assert_nests_close(descriptor.apply(reference, shard, False), local, atol=1e-4)

  # Training mode updates the BatchNorm statistics per replica; reads average them.
  run(True)
  for shard in shards:
    replica_copy = descriptor.create()
    _copy_variables(reference, replica_copy)
    descriptor.apply(replica_copy, shard, True)
    if shard is shards[0]:
      first = replica_copy
    else:
      second = replica_copy
  for index, variable in enumerate(module.variables):
    if variable.trainable:
      continue
    expected = (first.variables[index].numpy() + second.variables[index].numpy()) / 2
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-4, atol=1e-5)
