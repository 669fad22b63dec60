"""Build hook: ships configs/*.flags inside the package (as dunet/configs/), so that
`dunet-train --config=NAME` works after a non-editable `pip install .`. Everything else is in
setup.cfg. (An editable install reads the checkout's configs/ directly: dunet/cli.py.)"""

import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
  """build_py, plus the shipped experiment configs as package data."""

  def run(self):
    super().run()
    if getattr(self, "editable_mode", False):
      return
    target = os.path.join(self.build_lib, "dunet", "configs")
    self.mkpath(target)
    for path in sorted(
      glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "*.flags"))
    ):
      self.copy_file(path, target)


setup(cmdclass={"build_py": BuildPyWithConfigs})
