"""dunet's exceptions: one hierarchy, so that a command line can tell expected failures from bugs.

Every error dunet raises on purpose derives from `DunetError` and carries a message that names
the file, folder, flag or step at fault. The command-line mains (dunet/cli.py) print those as one
line and exit non-zero; any other exception is a bug and keeps its traceback.

    DunetError
    ├── ConfigError       a setting, or a combination of settings, that cannot work
    │   └── OutputExistsError   an output folder that exists (pass --overwrite)
    ├── DataError         missing, damaged, changed or unusable input data (names the file)
    ├── CheckpointError   model weights that cannot be found, read, written or matched
    │   ├── CheckpointNotFoundError
    │   ├── CheckpointReadError
    │   └── CheckpointWriteError
    ├── TrainingError     training cannot go on
    │   └── DivergedError
    └── ExportError       an export that could not be made or did not verify
"""

from __future__ import annotations

import os
from typing import Union


class DunetError(Exception):
  """Base of every error dunet raises on purpose; the message says what and where."""


class ConfigError(DunetError):
  """A setting (or a combination of settings) that cannot work; the message names the setting.

  Command lines report it as a usage error ("see --help").
  """


class OutputExistsError(ConfigError, FileExistsError):
  """An output that already exists and may not be replaced; the message names it and the fix."""


class DataError(DunetError):
  """Bad input data. The message always names the offending file or folder first."""

  def __init__(self, path: Union[str, "os.PathLike[str]"], problem: str):
    self.path = os.fspath(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}")


class CheckpointError(DunetError):
  """Model weights (a checkpoint, a Keras h5 file) that cannot be found, read, written or used."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """No checkpoint where one was expected; the message says where it looked."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint (or the workdir) could not be written; the message names the folder and the
  previous checkpoint, which is intact."""


class CheckpointReadError(CheckpointError):
  """Checkpoints are listed but none can be read; the message names each and why."""


class TrainingError(DunetError):
  """Training cannot go on; the message names the step."""


class DivergedError(TrainingError, FloatingPointError):
  """A step's loss, gradients or parameters went non-finite; nothing of that step is saved."""


class ExportError(DunetError):
  """An export step failed or a check did not pass; the message says which and why."""
