"""Latency of each deployed format: median time per image over timed runs, and the table."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Sequence

import numpy as np


@dataclasses.dataclass
class LatencyRow:
  """One line of the latency table."""

  name: str
  batch: int
  ms_per_image: float
  runs: int


def measure_latency(
  function: Callable[[np.ndarray], Any],
  images: np.ndarray,
  runs: int,
  warmup: int = 1,
  clock: Callable[[], float] = time.perf_counter,
) -> float:
  """Median seconds per image of `function(images)` over `runs` timed calls after `warmup`."""
  for _ in range(warmup):
    function(images)
  times = []
  for _ in range(runs):
    start = clock()
    function(images)
    times.append(clock() - start)
  return statistics.median(times) / len(images)


def format_latency_table(rows: Sequence[LatencyRow]) -> str:
  """A fixed-width table: format, batch, median ms per image, timed runs."""
  header = f"{'format':<34} {'batch':>5} {'ms/image':>10} {'runs':>5}"
  lines = [header, "-" * len(header)]
  for row in rows:
    lines.append(f"{row.name:<34} {row.batch:>5} {row.ms_per_image:>10.2f} {row.runs:>5}")
  return "\n".join(lines)
