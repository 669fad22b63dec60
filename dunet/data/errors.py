"""The one exception type of the data package."""

from __future__ import annotations

import os
from typing import Union


class DataError(ValueError):
  """Bad input data. The message always names the offending file or folder first."""

  def __init__(self, path: Union[str, "os.PathLike[str]"], problem: str):
    self.path = os.fspath(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}")
