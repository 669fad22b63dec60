"""dunet.profiler: the --profile_steps range and the step-window trace capture."""

import glob
import os

import pytest
import tensorflow as tf

from dunet import profiler


@pytest.mark.parametrize("text, expected", [("", None), ("20,25", (20, 25)), (" 3 , 3 ", (3, 3))])
def test_parse_step_range(text, expected):
  assert profiler.parse_step_range(text) == expected


@pytest.mark.parametrize(
  "text, message",
  [
    ("20", "START,STOP"),
    ("a,b", "START,STOP"),
    ("1,2,3", "START,STOP"),
    ("0,5", "1 <= START <= STOP"),
    ("6,5", "1 <= START <= STOP"),
  ],
)
def test_parse_step_range_rejects(text, message):
  with pytest.raises(ValueError, match=message):
    profiler.parse_step_range(text)


def _run_steps(step_profiler, count):
  conv = tf.function(lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"))
  images, kernel = tf.random.normal([1, 16, 16, 4]), tf.random.normal([3, 3, 4, 4])
  started = []
  for step in range(1, count + 1):
    with step_profiler.step(step):
      started.append(step_profiler.active)
      conv(images, kernel).numpy()
  return started


def test_traces_exactly_the_window_and_writes_an_xplane_file(tmp_path):
  step_profiler = profiler.StepProfiler(str(tmp_path), (2, 3))
  assert _run_steps(step_profiler, 5) == [False, True, True, False, False]
  assert not step_profiler.active
  traces = glob.glob(os.path.join(tmp_path, "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_stop_writes_a_window_cut_short_by_the_end_of_training(tmp_path):
  step_profiler = profiler.StepProfiler(str(tmp_path), (2, 10))
  _run_steps(step_profiler, 3)
  assert step_profiler.active
  step_profiler.stop()
  assert not step_profiler.active
  assert glob.glob(os.path.join(tmp_path, "plugins", "profile", "*", "*.xplane.pb"))


def test_no_window_no_trace(tmp_path):
  step_profiler = profiler.StepProfiler(str(tmp_path), None)
  assert _run_steps(step_profiler, 2) == [False, False]
  step_profiler.stop()
  assert not os.path.exists(os.path.join(tmp_path, "plugins"))
