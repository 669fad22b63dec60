"""Strategy choice, logical CPUs, TF_CONFIG checks, and a two-process multi-worker run."""

import json
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import tensorflow as tf

from dunet import distribute
from dunet import errors
from dunet import optim
from tests import testing_utils

distribute.configure_logical_cpus(2)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_MARKER = "RESULT "


def _run_python(scripts, env_per_process=None, timeout=60):
  """Runs scripts concurrently; returns each (returncode, stdout, stderr); kills on timeout."""
  env_per_process = env_per_process or [{} for _ in scripts]
  processes = []
  try:
    for script, extra_env in zip(scripts, env_per_process):
      env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2", **extra_env)
      processes.append(
        subprocess.Popen(
          [sys.executable, "-c", textwrap.dedent(script)],
          env=env,
          cwd=REPO_ROOT,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
        )
      )
    results = []
    for process in processes:
      stdout, stderr = process.communicate(timeout=timeout)
      results.append((process.returncode, stdout, stderr))
    return results
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.communicate()


def _result(stdout):
  lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARKER)]
  assert lines, stdout
  return json.loads(lines[-1][len(RESULT_MARKER) :])


# ==================================================================================================
# Logical CPUs
# ==================================================================================================
def test_configure_logical_cpus_in_this_process():
  distribute.configure_logical_cpus(2)  # already in place: nothing to do
  assert len(tf.config.list_logical_devices("CPU")) == 2
  with pytest.raises(RuntimeError, match="already split into 2 logical devices"):
    distribute.configure_logical_cpus(3)
  with pytest.raises(ValueError, match="at least 1"):
    distribute.configure_logical_cpus(0)


def test_configure_logical_cpus_in_fresh_processes():
  configure_first = f"""
      import json
      import tensorflow as tf
      from dunet import distribute
      distribute.configure_logical_cpus(3)
      distribute.configure_logical_cpus(3)
      devices = len(tf.config.list_logical_devices("CPU"))
      try:
        distribute.configure_logical_cpus(2)
        error = None
      except RuntimeError as e:
        error = str(e)
      print("{RESULT_MARKER}" + json.dumps({{"devices": devices, "error": error}}))
  """
  too_late = f"""
      import json
      import tensorflow as tf
      from dunet import distribute
      tf.constant(1.0) + 1.0  # initialises the devices: one CPU
      distribute.configure_logical_cpus(1)
      try:
        distribute.configure_logical_cpus(2)
        error = None
      except RuntimeError as e:
        error = str(e)
      print("{RESULT_MARKER}" + json.dumps({{"error": error}}))
  """
  (code1, out1, err1), (code2, out2, err2) = _run_python([configure_first, too_late])
  assert code1 == 0, err1
  assert code2 == 0, err2
  first, late = _result(out1), _result(out2)
  assert first["devices"] == 3
  assert "already split into 3" in first["error"]
  assert "already initialised 1 CPU device" in late["error"]
  assert "before running any TensorFlow op" in late["error"]


# ==================================================================================================
# Strategies
# ==================================================================================================
def test_default_strategy():
  strategy = distribute.make_strategy("default")
  assert distribute.num_replicas(strategy) == 1
  assert distribute.is_chief(strategy)


def test_mirrored_over_two_logical_cpus():
  strategy = distribute.make_strategy("mirrored")
  assert isinstance(strategy, tf.distribute.MirroredStrategy)
  assert distribute.num_replicas(strategy) == 2
  assert distribute.is_chief(strategy)
  result = strategy.run(lambda: tf.distribute.get_replica_context().replica_id_in_sync_group)
  assert sorted(int(v) for v in strategy.experimental_local_results(result)) == [0, 1]

  one = distribute.make_strategy("mirrored", devices=["/cpu:0"])
  assert distribute.num_replicas(one) == 1


def test_mirrored_strategies_in_one_process_do_not_collide():
  """Each strategy's all-reduce of a different shape works (CPU collective keys would clash)."""
  for size in (8, 2, 5):
    strategy = distribute.make_strategy("mirrored")

    @tf.function
    def all_reduce():  # called in this iteration: the loop variables are the current ones
      return strategy.run(  # noqa: B023
        lambda: tf.distribute.get_replica_context().all_reduce(
          tf.distribute.ReduceOp.SUM,
          tf.ones(size),  # noqa: B023
        )
      )

    for total in strategy.experimental_local_results(all_reduce()):
      np.testing.assert_array_equal(total.numpy(), np.full(size, 2.0))


def test_strategy_errors():
  with pytest.raises(ValueError, match="'tpu'.*default, mirrored, multi_worker"):
    distribute.make_strategy("tpu")
  with pytest.raises(ValueError, match="only be chosen for the mirrored"):
    distribute.make_strategy("default", devices=["/cpu:0"])


WORKERS = {"worker": ["localhost:1", "localhost:2"]}


@pytest.mark.parametrize(
  "tf_config, message",
  [
    (None, "needs the TF_CONFIG environment variable"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"task": {"type": "worker", "index": 0}}), 'no "cluster"'),
    (
      json.dumps({"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}),
      "'host:port'",
    ),
    (json.dumps({"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}}), 'no "worker"'),
    (json.dumps({"cluster": WORKERS}), 'no "task"'),
    (
      json.dumps({"cluster": WORKERS, "task": {"type": "chief", "index": 0}}),
      "'chief' is not a job",
    ),
    (
      json.dumps({"cluster": WORKERS, "task": {"type": "worker", "index": 2}}),
      "index 2 is out of range for the 2 'worker'",
    ),
  ],
)
def test_multi_worker_needs_a_valid_tf_config(monkeypatch, tf_config, message):
  if tf_config is None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
  else:
    monkeypatch.setenv("TF_CONFIG", tf_config)
  with pytest.raises(errors.ConfigError, match=message):
    distribute.make_strategy("multi_worker")


def test_check_tf_config_accepts_a_valid_one():
  config = {"cluster": WORKERS, "task": {"type": "worker", "index": 1}}
  assert distribute.check_tf_config(json.dumps(config)) == config


@pytest.mark.parametrize(
  "cluster, task_type, task_id, chief",
  [
    ({"worker": ["a:1", "b:1"]}, "worker", 0, True),
    ({"worker": ["a:1", "b:1"]}, "worker", 1, False),
    ({"chief": ["c:1"], "worker": ["a:1"]}, "chief", 0, True),
    ({"chief": ["c:1"], "worker": ["a:1"]}, "worker", 0, False),
  ],
)
def test_is_chief(cluster, task_type, task_id, chief):
  resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
    tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id
  )
  strategy = types.SimpleNamespace(cluster_resolver=resolver)
  assert distribute.is_chief(strategy) == chief


@pytest.mark.slow
def test_two_worker_processes_all_reduce_and_step_together():
  worker = f"""
      import json
      import tensorflow as tf
      from dunet import distribute, optim
      strategy = distribute.make_strategy("multi_worker")
      with strategy.scope():
        weight = tf.Variable([1.0, 2.0])
        optimizer = optim.Adam(0.1, [weight])

      @tf.function
      def step():
        def replica_fn():
          context = tf.distribute.get_replica_context()
          contribution = tf.cast(context.replica_id_in_sync_group, tf.float32) + 1.0
          total = context.all_reduce("SUM", contribution)
          grad = context.all_reduce("SUM", tf.fill([2], contribution) * [1.0, -2.0])
          optimizer.apply([grad], [weight])
          return total
        return strategy.run(replica_fn)

      total = step()
      print("{RESULT_MARKER}" + json.dumps({{
          "replicas": distribute.num_replicas(strategy), "chief": distribute.is_chief(strategy),
          "sum": float(total), "weight": weight.numpy().tolist(),
          "iterations": int(optimizer.iterations.numpy())}}))
  """
  with testing_utils.reserved_ports(2) as ports:
    addresses = [f"localhost:{port}" for port in ports]
    envs = [
      {
        "TF_CONFIG": json.dumps(
          {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        )
      }
      for index in range(2)
    ]
    results = _run_python([worker, worker], envs, timeout=60)
  for code, _, stderr in results:
    assert code == 0, stderr[-3000:]
  outputs = [_result(stdout) for _, stdout, _ in results]
  assert [o["chief"] for o in outputs] == [True, False]

  # The one-device step with the all-reduced gradient (1 + 2) * [1, -2].
  expected = tf.Variable([1.0, 2.0])
  optim.Adam(0.1, [expected]).apply([tf.constant([3.0, -6.0])], [expected])
  for output in outputs:
    assert output["replicas"] == 2 and output["sum"] == 3.0 and output["iterations"] == 1
    np.testing.assert_allclose(output["weight"], expected.numpy(), rtol=1e-6)
