"""How close a deployed model is to TensorFlow: per-output differences, a tolerance check, and
the lines the export prints."""

from __future__ import annotations

import json
from typing import Dict, Mapping

import numpy as np

from dunet.errors import ExportError


def parity_stats(
  expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]
) -> Dict[str, Dict[str, float]]:
  """Per output: the largest and mean absolute difference, and the share of pixels whose mask
  (p > 0.5) differs."""
  if set(expected) != set(got):
    raise ExportError(f"outputs differ: expected {sorted(expected)}, got {sorted(got)}")
  stats = {}
  for name in sorted(expected):
    want = np.asarray(expected[name], np.float64)
    have = np.asarray(got[name], np.float64)
    if want.shape != have.shape:
      raise ExportError(f"output {name!r} has shape {have.shape}, expected {want.shape}")
    difference = np.abs(want - have)
    stats[name] = {
      "max_abs": float(np.max(difference)),
      "mean_abs": float(np.mean(difference)),
      "mask_disagreement": float(np.mean((want > 0.5) != (have > 0.5))),
    }
  return stats


def check_parity(label: str, stats: Mapping[str, Mapping[str, float]], tolerance: float) -> float:
  """Returns the largest difference over the outputs; raises ExportError above `tolerance`."""
  worst = max(entry["max_abs"] for entry in stats.values())
  if not worst <= tolerance:  # NaN fails too
    raise ExportError(
      f"{label}: largest difference from TensorFlow {worst:.3g} exceeds the "
      f"tolerance {tolerance:.3g} ({json.dumps(stats)})"
    )
  return worst


def format_parity(label: str, stats: Mapping[str, Mapping[str, float]], tolerance: float) -> str:
  """One line per output: max/mean absolute difference and mask disagreement."""
  lines = []
  for name, entry in stats.items():
    lines.append(
      f"  {label:<14} {name:<18} max |diff| {entry['max_abs']:.2e}  mean "
      f"{entry['mean_abs']:.2e}  masks differ {100 * entry['mask_disagreement']:.3f}%"
      f"  (tolerance {tolerance:.0e})"
    )
  return "\n".join(lines)
