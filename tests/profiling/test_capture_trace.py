"""profiling/capture_trace.py: a few real training steps traced and summarised."""

import glob
import os
import subprocess
import sys

import pytest

from dunet.data import demo

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_traces_training_steps_and_prints_the_convolution_share(tmp_path):
  data_dir = demo.ensure_demo_data(tmp_path / "demo", count=12, height=32, width=32, seed=3)
  logdir = tmp_path / "profile"
  # TinyNet (tests/tiny_train.py) has convolutions too: the trace and its summary are the point,
  # not DoubleU-Net's profile (tracing and profiling it took three minutes).
  command = [
    sys.executable,
    "-m",
    "tests.tiny_train",
    "profiling.capture_trace",
    f"--data_dir={data_dir}",
    f"--logdir={logdir}",
    "--batch_size=4",
    "--preprocessing=unit",
    "--skip_steps=1",
    "--trace_steps=2",
    "--top=5",
  ]
  result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "trace of steps 2-3" in result.stdout
  assert "convolutions" in result.stdout
  assert glob.glob(str(logdir / "plugins" / "profile" / "*" / "*.xplane.pb"))

  again = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
  assert again.returncode != 0
  assert "already holds a run" in again.stderr
