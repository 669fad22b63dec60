"""profiling/quality.py: its command line (the benchmark itself trains for minutes per row)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _quality(*args):
  return subprocess.run(
    [sys.executable, "-m", "profiling.quality", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_unknown_recipe_is_named_with_the_valid_ones():
  completed = _quality("--recipes=keras,fancy")
  assert completed.returncode != 0
  assert "unknown recipes ['fancy']" in completed.stderr
  assert "keras, reference, paper, improved" in completed.stderr


def test_help_lists_the_recipes():
  completed = _quality("--help")
  for flag in ("--recipes:", "reuse_keras:", "--improved_extra:", "--steps:"):
    assert flag in completed.stdout, flag
