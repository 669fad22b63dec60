import io
import time

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


def test_throughput_counts_from_the_start_step_and_creation_time():
  stream = io.StringIO()
  progress = ProgressLine(total_steps=30, items_per_step=4, stream=stream, every=10,
                          start_step=5)
  started = time.perf_counter()
  time.sleep(0.05)
  progress.update(10, {})
  elapsed = time.perf_counter() - started
  # 5 steps of 4 images since creation: no more than 20 / 0.05 s, and not absurdly less.
  assert 20 / (elapsed + 0.05) < progress.items_per_second <= 20 / 0.05
  assert stream.getvalue().startswith("step 10/30 ")
