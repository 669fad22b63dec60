"""ProgressLine: which steps it reports, and its throughput and ETA on a clock the test moves."""

import io

import pytest

from dunet import progress as progress_lib
from dunet.progress import ProgressLine, format_duration


def test_format_duration():
  assert format_duration(12.4) == "12s"
  assert format_duration(185) == "3m05s"
  assert format_duration(3720) == "1h02m"


def test_plain_stream_reports_every_n_steps_and_the_last():
  stream = io.StringIO()
  progress = ProgressLine(total_steps=25, items_per_step=4, stream=stream, every=10)
  for step in range(1, 26):
    progress.update(step, {"loss": 1.0 / step})
  lines = stream.getvalue().splitlines()
  assert [line.split()[1] for line in lines] == ["10/25", "20/25", "25/25"]
  assert "loss=0.1 " in lines[0] and "img/s" in lines[0] and "ETA" in lines[0]
  assert progress.items_per_second > 0


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_terminal_rewrites_one_line():
  stream = _Terminal()
  progress = ProgressLine(total_steps=3, items_per_step=1, stream=stream, every=10)
  for step in range(1, 4):
    progress.update(step, {"loss": 0.5})
  text = stream.getvalue()
  assert text.count("\r") == 3 and text.endswith("\n")


class _Clock:
  """A perf_counter that moves only when the test says so."""

  def __init__(self, now: float = 100.0):
    self.now = now

  def perf_counter(self) -> float:
    return self.now


def test_throughput_counts_from_the_start_step_and_creation_time(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(progress_lib, "time", clock)
  stream = io.StringIO()
  progress = ProgressLine(total_steps=30, items_per_step=4, stream=stream, every=10, start_step=5)
  clock.now += 0.5
  progress.update(10, {})
  # 5 steps of 4 images in the 0.5 s since creation; 20 steps left at 40 img/s.
  assert progress.items_per_second == 40.0
  assert stream.getvalue() == "step 10/30  40.00 img/s ETA 2s\n"


def test_throughput_is_measured_since_the_previous_report(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(progress_lib, "time", clock)
  stream = io.StringIO()
  progress = ProgressLine(total_steps=30, items_per_step=2, stream=stream, every=10)
  clock.now += 10.0  # a slow first (compiling) stretch
  progress.update(10, {})
  assert progress.items_per_second == 2.0
  for step in range(11, 20):  # not reported on a plain stream: the window keeps running
    clock.now += 0.1
    progress.update(step, {})
  clock.now += 0.1
  progress.update(20, {"loss": 0.25})
  # 10 steps of 2 images in 1 s, whatever the first stretch took; 10 steps left: 1 s.
  assert progress.items_per_second == pytest.approx(20.0)
  assert stream.getvalue().splitlines()[-1] == "step 20/30 loss=0.25 20.00 img/s ETA 1s"
