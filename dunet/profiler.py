"""Captures TensorBoard profiler traces of chosen training steps.

Traces land in `<logdir>/plugins/profile/<timestamp>/<host>.xplane.pb`, where TensorBoard's
Profile tab (the `xprof` plugin) and profiling/summarize_trace.py read them. On a GPU machine the
same trace holds the GPU kernels; on a CPU machine, host ops.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

from absl import logging
import tensorflow as tf


def parse_step_range(text: str) -> Optional[Tuple[int, int]]:
  """'20,25' -> (20, 25): trace steps 20 to 25 inclusive (1-based). '' -> None.

  Raises:
    ValueError: unless two integers with 1 <= start <= stop.
  """
  if not text:
    return None
  parts = [part.strip() for part in text.split(",")]
  try:
    start, stop = (int(part) for part in parts)
  except ValueError:
    raise ValueError(f"profile steps must be 'START,STOP' (e.g. 20,25), got {text!r}") from None
  if not 1 <= start <= stop:
    raise ValueError(f"profile steps need 1 <= START <= STOP, got {text!r}")
  return start, stop


class StepProfiler:
  """Starts the profiler before step `start`, annotates each step, and stops after step `stop`.

  Usage, with `step` the 1-based number of the step about to run:
    with profiler.step(step):
      run_one_step()
  """

  def __init__(self, logdir: str, steps: Optional[Sequence[int]]):
    """Args: logdir: TensorBoard logdir; steps: (start, stop) inclusive, or None to do nothing."""
    self.logdir = logdir
    self.steps = tuple(steps) if steps else None
    self.active = False

  @contextlib.contextmanager
  def step(self, step: int):
    if self.steps is None or not self.steps[0] <= step <= self.steps[1]:
      yield
      return
    if not self.active:
      tf.profiler.experimental.start(self.logdir)
      self.active = True
      logging.info("Profiler started at step %d (trace into %s)", step, self.logdir)
    try:
      with tf.profiler.experimental.Trace("train", step_num=step, _r=1):
        yield
    finally:
      if step == self.steps[1]:
        self.stop()

  def stop(self) -> None:
    """Stops and writes the trace (also called when training ends inside the window)."""
    if self.active:
      tf.profiler.experimental.stop()
      self.active = False
      logging.info("Profiler trace written under %s/plugins/profile", self.logdir)
