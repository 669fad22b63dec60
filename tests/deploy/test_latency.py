"""dunet/deploy/latency.py: the median per image and the table's format."""

import numpy as np
import pytest

from dunet.deploy import latency


def test_latency_table_format_and_median():
  ticks = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # three timed runs: 1 s, 3 s, 2 s
  calls = []
  seconds = latency.measure_latency(
    calls.append, np.zeros((4, 2, 2, 3)), runs=3, warmup=1, clock=lambda: next(ticks)
  )
  assert len(calls) == 4 and seconds == pytest.approx(2.0 / 4)
  table = latency.format_latency_table(
    [
      latency.LatencyRow("TF SavedModel (serving_default)", 1, 1234.567, 5),
      latency.LatencyRow("TensorRT fp16", 16, 0.5, 5),
    ]
  )
  lines = table.splitlines()
  assert lines[0].split() == ["format", "batch", "ms/image", "runs"]
  assert set(lines[1]) == {"-"} and len(lines[1]) == len(lines[0])
  assert lines[2].split() == ["TF", "SavedModel", "(serving_default)", "1", "1234.57", "5"]
  assert lines[3].split() == ["TensorRT", "fp16", "16", "0.50", "5"]
  assert len({len(line) for line in lines}) == 1
