"""A terminal progress line for long loops: step, measurements, throughput and ETA."""

from __future__ import annotations

import sys
import time
from typing import Dict, Optional, TextIO


def format_duration(seconds: float) -> str:
  """'1h02m', '3m05s' or '12s'."""
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


class ProgressLine:
  """Rewrites one terminal line in place (a plain line every `every` steps when not a terminal).

  Throughput is measured over the steps since the previous report (the first report: since the
  line was created), so the first (compiling) step does not distort it for long.
  """

  def __init__(
    self,
    total_steps: int,
    items_per_step: int,
    stream: Optional[TextIO] = None,
    every: int = 10,
    unit: str = "img",
    start_step: int = 0,
  ):
    """Args:
    total_steps: the step count at the end (for the ETA).
    items_per_step: images (or other units) per step, for the throughput.
    stream: where to write (default stderr).
    every: on a plain (non-terminal) stream, report every this many steps and the last.
    unit: the throughput's unit.
    start_step: steps already done when the line starts (a resumed run).
    """
    self.total_steps = total_steps
    self.items_per_step = items_per_step
    self.stream = stream or sys.stderr
    self.every = max(1, every)
    self.unit = unit
    self.is_terminal = bool(getattr(self.stream, "isatty", lambda: False)())
    self._last_time = time.perf_counter()
    self._last_step = start_step
    self.items_per_second = 0.0

  def update(self, step: int, values: Dict[str, float]) -> None:
    """Reports that `step` (1-based count of completed steps) finished with `values`."""
    now = time.perf_counter()
    if not self.is_terminal and step % self.every and step != self.total_steps:
      return
    elapsed = now - self._last_time
    if step > self._last_step and elapsed > 0:
      self.items_per_second = (step - self._last_step) * self.items_per_step / elapsed
    self._last_step, self._last_time = step, now
    remaining = self.total_steps - step
    eta = (
      remaining * self.items_per_step / self.items_per_second
      if self.items_per_second > 0
      else float("nan")
    )
    shown = " ".join(f"{key}={value:.4g}" for key, value in values.items())
    line = (
      f"step {step}/{self.total_steps} {shown} {self.items_per_second:.2f} {self.unit}/s "
      f"ETA {format_duration(eta) if eta == eta else '?'}"
    )
    if self.is_terminal:
      self.stream.write("\r\x1b[2K" + line)
      if step == self.total_steps:
        self.stream.write("\n")
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.is_terminal:
      self.stream.write("\n")
      self.stream.flush()
