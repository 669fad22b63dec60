"""Test-session set-up shared by every test module.

Several tests simulate a multi-device machine: TensorFlow must split the one physical CPU into
logical devices before anything initialises the runtime, so this happens here, at collection time.
"""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

# Two logical CPUs: enough for MirroredStrategy tests; single-device code is unaffected (it places
# ops on CPU:0).
NUM_LOGICAL_CPUS = 2

_cpu = tf.config.list_physical_devices("CPU")[0]
if tf.config.get_logical_device_configuration(_cpu) is None:
  tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
  )


# The longest files (measured with --durations: each holds 5 to 13 minutes of work on a 2-core
# CPU without AVX-512), longest first.
LONGEST_FILES = ("test_learning.py", "test_train.py", "test_faults.py", "test_reference_parity.py")


def pytest_configure(config):
  """Keeps the order below for pytest-xdist's --dist loadfile.

  pytest-xdist 3.x hands out the files with the most tests first (its --loadscope-reorder
  default), which started test_learning.py (2 tests, 13 minutes) last, alone, after every
  other file (measured: 22 minutes into a CI run).
  """
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  """The longest files first, then the other files holding slow tests, then the rest (a stable
  sort: the order is otherwise kept).

  The suite runs on two pytest-xdist workers with --dist=loadfile (README): started first, the
  long end-to-end files spread over both workers and they finish together, instead of one worker
  running a long file alone at the end (as test_learning.py did, 13 minutes, once it was queued
  behind the other slow files).
  """
  del config
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}

  def rank(item) -> tuple:
    name = item.path.name
    longest = LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)
    return (longest, item.path not in slow_files)

  items.sort(key=rank)


@pytest.fixture(autouse=True)
def _restore_op_determinism():
  """dunet.train --deterministic switches TF op determinism on for the whole process; a test that
  does so must not change what later tests run (e.g. which max-pool form is traced)."""
  from tensorflow.python.framework import config  # pylint: disable=g-import-not-at-top

  was_enabled = config.is_op_determinism_enabled()
  yield
  if not was_enabled:
    config.disable_op_determinism()
