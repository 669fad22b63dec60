"""What a recorded measurement ran on: shared by the benchmarks in profiling/."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
  try:
    with open("/proc/cpuinfo") as handle:
      for line in handle:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def machine_description() -> str:
  """'N CPU cores (model); GPUs: ...; TensorFlow X' for result tables."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only when a row is written)

  gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
  return (
    f"{os.cpu_count()} CPU cores ({cpu_model()}); GPUs: {', '.join(gpus) or 'none'}; "
    f"TensorFlow {tf.__version__}"
  )
