"""Runs a training command line with TinyNet in place of DoubleU-Net, for subprocess tests of the
training machinery (signals, workers, the profiler) that do not depend on the network:

  python -m tests.tiny_train dunet.train --workdir=... [dunet-train flags]
  python -m tests.tiny_train profiling.capture_trace --logdir=... [its flags]

The module named first runs as `python -m MODULE` would run it, with the rest of the arguments.
Tracing the 29 M-parameter network and writing its 350 MB checkpoints is most of a real run's
time on a CPU; the flags, the loop, checkpoints, signals and summaries are the same code.
"""

import functools
import runpy
import sys

from dunet import trainer as trainer_lib
from tests.tiny_net import TinyNet


def main() -> None:
  """Patches the Trainer's model and runs the module named by the first argument as __main__."""
  module, *args = sys.argv[1:]
  trainer_lib.Trainer = functools.partial(trainer_lib.Trainer, make_model=TinyNet)
  sys.argv = [module, *args]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
