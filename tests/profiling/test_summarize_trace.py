"""profiling/summarize_trace.py: finding traces, reading them with xprof, and the summary."""

import os
import subprocess
import sys

import pytest
import tensorflow as tf

from dunet import profiler

from profiling import summarize_trace

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_summary_shares_exclude_idle_and_rank_by_self_time():
  rows = [
    {"type": "IDLE", "operation": "IDLE", "total_self_time": 1000.0},
    {"type": "Conv2DBackpropFilter", "operation": "a", "total_self_time": 50.0},
    {"type": "Conv2D", "operation": "b", "total_self_time": 30.0},
    {"type": "Relu", "operation": "c", "total_self_time": 20.0},
  ]
  summary = summarize_trace.summarize(rows, top=2)
  assert summary["total_self_time_us"] == 100.0
  assert summary["convolution_share"] == pytest.approx(0.8)
  assert [row["name"] for row in summary["top"]] == ["a", "b"]
  assert summary["top"][0]["share"] == pytest.approx(0.5)
  text = summarize_trace.format_summary(summary)
  assert "convolutions 80.0%, everything else 20.0%" in text


def test_by_type_sums_each_op_type():
  rows = [
    {"type": "IDLE", "operation": "IDLE", "total_self_time": 1000.0},
    {"type": "Conv2DBackpropFilter", "operation": "a", "total_self_time": 20.0},
    {"type": "Relu", "operation": "b", "total_self_time": 35.0},
    {"type": "Conv2DBackpropFilter", "operation": "c", "total_self_time": 30.0},
    {"type": "Relu", "operation": "d", "total_self_time": 15.0},
  ]
  summary = summarize_trace.summarize(rows, top=5, by_type=True)
  assert summary["total_self_time_us"] == 100.0
  assert summary["convolution_share"] == pytest.approx(0.5)
  assert [(row["type"], row["name"], row["self_time_us"]) for row in summary["top"]] == [
    ("Conv2DBackpropFilter", "(2 ops)", 50.0),
    ("Relu", "(2 ops)", 50.0),
  ]


def test_hlo_tables_use_their_own_column_names():
  rows = [
    {"category": "convolution", "hlo_op_name": "conv.1", "total_self_time_us": 3.0},
    {"category": "fusion", "hlo_op_name": "fusion.2", "total_self_time_us": 1.0},
  ]
  summary = summarize_trace.summarize(rows, top=5)
  assert summary["convolution_share"] == pytest.approx(0.75)
  assert summary["top"][0]["name"] == "conv.1"


def test_missing_trace_says_how_to_capture_one(tmp_path):
  with pytest.raises(FileNotFoundError, match="--profile_steps"):
    summarize_trace.find_trace_files(str(tmp_path))


@pytest.fixture(scope="module")
def conv_heavy_trace(tmp_path_factory):
  """A real trace of two steps that are mostly one large convolution."""
  logdir = str(tmp_path_factory.mktemp("trace"))
  conv = tf.function(lambda x, k: tf.nn.relu(tf.nn.conv2d(x, k, 1, "SAME")))
  images, kernel = tf.random.normal([4, 64, 64, 64]), tf.random.normal([3, 3, 64, 64])
  conv(images, kernel).numpy()
  step_profiler = profiler.StepProfiler(logdir, (1, 2))
  for step in (1, 2):
    with step_profiler.step(step):
      conv(images, kernel).numpy()
  return logdir


def test_reads_a_real_trace_with_xprof(conv_heavy_trace):
  rows = summarize_trace.op_table(summarize_trace.find_trace_files(conv_heavy_trace))
  summary = summarize_trace.summarize(rows, top=3)
  assert "Conv2D" in summary["top"][0]["type"]  # _MklNativeConv2D with oneDNN
  assert summary["convolution_share"] > 0.5


def test_command_line_prints_the_table(conv_heavy_trace):
  result = subprocess.run(
    [sys.executable, "-m", "profiling.summarize_trace", f"--logdir={conv_heavy_trace}", "--top=3"],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO,
  )
  assert result.returncode == 0, result.stderr
  assert "convolutions" in result.stdout and "Conv2D" in result.stdout
