"""Runs a training command line with TinyNet in place of DoubleU-Net, for subprocess tests of the
training machinery (signals, workers, the profiler) that do not depend on the network:

  python -m tests.tiny_train dunet.train --workdir=... [dunet-train flags]
  python -m tests.tiny_train profiling.capture_trace --logdir=... [its flags]

  python -m tests.tiny_train profiling.record_demo [its flags]

The module named first runs as `python -m MODULE` would run it, with the rest of the arguments;
a `python -m dunet.train` command it starts (profiling/record_demo.py) goes through here too.
Tracing the 29 M-parameter network and writing its 350 MB checkpoints is most of a real run's
time on a CPU; the flags, the loop, checkpoints, signals and summaries are the same code.
"""

import functools
import runpy
import subprocess
import sys

from dunet import trainer as trainer_lib
from tests.tiny_net import TinyNet


def _through_here(run):
  """`run` (subprocess.run), with `python -m dunet.train ...` started as this module."""

  def wrapped(command, *args, **kwargs):
    if list(command[1:3]) == ["-m", "dunet.train"]:
      command = [command[0], "-m", __spec__.name, *command[2:]]
    return run(command, *args, **kwargs)

  return wrapped


def main() -> None:
  """Patches the Trainer's model and runs the module named by the first argument as __main__."""
  module, *args = sys.argv[1:]
  trainer_lib.Trainer = functools.partial(trainer_lib.Trainer, make_model=TinyNet)
  subprocess.run = _through_here(subprocess.run)
  sys.argv = [module, *args]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
