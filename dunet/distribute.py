"""Choosing a distribution strategy, and logical CPU devices for trying distribution without GPUs.

default       one device (TensorFlow's default strategy: no replicas to synchronise);
mirrored      MirroredStrategy over all local GPUs, or over all logical CPUs when there is no GPU
              (split the CPU first with `configure_logical_cpus`);
multi_worker  MultiWorkerMirroredStrategy; the cluster and this process's place in it come from
              the TF_CONFIG environment variable, e.g.
              {"cluster": {"worker": ["host0:port", "host1:port"]},
               "task": {"type": "worker", "index": 0}}.
              Every worker runs the same program.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence

import tensorflow as tf

from dunet import errors

STRATEGY_NAMES = ("default", "mirrored", "multi_worker")


def configure_logical_cpus(count: int) -> None:
  """Splits the first physical CPU into `count` logical devices (CPU:0 ... CPU:count-1).

  Must run before TensorFlow initialises its devices (before the first op or device listing of
  logical devices). Idempotent: calling it again with the count already in place does nothing, so
  every test module can call it, whichever runs first.

  Args:
    count: number of logical CPU devices (>= 1).

  Raises:
    ValueError: if count < 1.
    RuntimeError: if the devices are already initialised with a different count.
  """
  if count < 1:
    raise ValueError(f"the number of logical CPUs must be at least 1, got {count}")
  cpu = tf.config.list_physical_devices("CPU")[0]
  configured = tf.config.get_logical_device_configuration(cpu)
  if configured is not None:
    if len(configured) == count:
      return
    raise RuntimeError(
      f"the CPU is already split into {len(configured)} logical devices; "
      f"cannot change that to {count} in the same process"
    )
  try:
    tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration()] * count
    )
  except RuntimeError as error:
    # TensorFlow initialised its devices without a split: one logical CPU per physical CPU.
    existing = len(tf.config.list_logical_devices("CPU"))
    if existing == count:
      return
    raise RuntimeError(
      f"cannot split the CPU into {count} logical devices: TensorFlow already initialised "
      f"{existing} CPU device(s). Call configure_logical_cpus before running any TensorFlow "
      f"op."
    ) from error


def make_strategy(name: str, devices: Optional[Sequence[str]] = None) -> tf.distribute.Strategy:
  """Returns the strategy called `name` (see the module docstring).

  Args:
    name: "default", "mirrored" or "multi_worker".
    devices: for "mirrored" only: the devices to mirror over (default: all GPUs, else all logical
      CPUs).

  Raises:
    ValueError: for an unknown name, devices given to another strategy, or a missing or invalid
      TF_CONFIG for "multi_worker".
  """
  if name not in STRATEGY_NAMES:
    raise ValueError(f"unknown strategy {name!r}; valid names: {', '.join(STRATEGY_NAMES)}")
  if devices is not None and name != "mirrored":
    raise ValueError(f"devices can only be chosen for the mirrored strategy, not {name!r}")
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    if devices is None:
      gpus = tf.config.list_logical_devices("GPU")
      devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    devices = list(devices)
    cross_device_ops = None  # TensorFlow's choice: collective all-reduce (NCCL on GPUs)
    if all((tf.DeviceSpec.from_string(d).device_type or "").upper() == "CPU" for d in devices):
      # On CPUs TensorFlow would pick ring collectives, whose keys restart with every strategy:
      # a second strategy in the same process (tests, notebooks) reuses the first one's keys for
      # tensors of other shapes and fails with "Shape mismatch in the collective instance".
      cross_device_ops = tf.distribute.ReductionToOneDevice()
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)
  check_tf_config(os.environ.get("TF_CONFIG"))
  return tf.distribute.MultiWorkerMirroredStrategy(
    communication_options=tf.distribute.experimental.CommunicationOptions()
  )


def check_tf_config(tf_config: Optional[str]) -> Dict[str, Any]:
  """Parses and checks a TF_CONFIG value for MultiWorkerMirroredStrategy.

  Args:
    tf_config: the TF_CONFIG environment variable's value (None if unset).

  Returns:
    The parsed configuration.

  Raises:
    dunet.errors.ConfigError: naming what is missing or wrong.
  """
  example = (
    '{"cluster": {"worker": ["host0:port", "host1:port"]}, "task": {"type": "worker", "index": 0}}'
  )
  if not tf_config:
    raise errors.ConfigError(
      f"the multi_worker strategy needs the TF_CONFIG environment variable, e.g. "
      f"TF_CONFIG='{example}'"
    )
  try:
    config = json.loads(tf_config)
  except json.JSONDecodeError as error:
    raise errors.ConfigError(f"TF_CONFIG is not valid JSON ({error}): {tf_config!r}") from None
  if not isinstance(config, dict):
    raise errors.ConfigError(f"TF_CONFIG must be a JSON object like {example}, got {tf_config!r}")
  cluster = config.get("cluster")
  if not isinstance(cluster, dict) or not cluster:
    raise errors.ConfigError(
      f'TF_CONFIG has no "cluster" (job name -> list of host:port), e.g. {example}'
    )
  for job, addresses in cluster.items():
    if (
      not isinstance(addresses, list)
      or not addresses
      or not all(isinstance(a, str) and ":" in a for a in addresses)
    ):
      raise errors.ConfigError(
        f"TF_CONFIG cluster job {job!r} must be a non-empty list of 'host:port' "
        f"strings, got {addresses!r}"
      )
  if "worker" not in cluster and "chief" not in cluster:
    raise errors.ConfigError(f'TF_CONFIG cluster has no "worker" (or "chief") job: {cluster!r}')
  task = config.get("task")
  if not isinstance(task, dict) or "type" not in task or "index" not in task:
    raise errors.ConfigError(
      f'TF_CONFIG has no "task" with "type" and "index" (this process\'s '
      f"place in the cluster), e.g. {example}"
    )
  task_type, index = task["type"], task["index"]
  if task_type not in cluster:
    raise errors.ConfigError(
      f"TF_CONFIG task type {task_type!r} is not a job of the cluster ({', '.join(cluster)})"
    )
  if not isinstance(index, int) or not 0 <= index < len(cluster[task_type]):
    raise errors.ConfigError(
      f"TF_CONFIG task index {index!r} is out of range for the "
      f"{len(cluster[task_type])} {task_type!r} task(s)"
    )
  return config


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes the run's files: always, except on non-chief multi-workers.

  The chief is the "chief" task if the cluster has one, else worker 0.
  """
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.task_type:
    return True
  if resolver.task_type == "chief":
    return True
  has_chief_job = "chief" in resolver.cluster_spec().as_dict()
  return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief_job


def num_replicas(strategy: tf.distribute.Strategy) -> int:
  """Replicas taking part in each step (over all workers)."""
  return int(strategy.num_replicas_in_sync)
