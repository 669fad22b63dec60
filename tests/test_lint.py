"""The code passes the linter and formatter configured in pyproject.toml ([tool.ruff])."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff(*args):
  command = [sys.executable, "-m", "ruff"] if shutil.which("ruff") is None else ["ruff"]
  return subprocess.run(
    [*command, *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
  )


@pytest.mark.parametrize(
  "args", [("check", "."), ("format", "--check", ".")], ids=["lint", "format"]
)
def test_ruff_passes(args):
  completed = _ruff(*args)
  assert completed.returncode == 0, (
    f"`ruff {' '.join(args)}` failed (fix with `ruff check --fix .` / `ruff format .`):\n"
    f"{completed.stdout}{completed.stderr}"
  )
