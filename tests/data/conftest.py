"""Fixtures shared by the data tests: a small prepared demo set."""

from __future__ import annotations

from pathlib import Path

import pytest

from dunet.data import demo, prepare


@pytest.fixture(scope="session")
def demo_prepared(tmp_path_factory) -> Path:
  """40 demo pictures (64x64) prepared at 64x64: 32 train, 4 valid, 4 test, 2 train shards."""
  root = tmp_path_factory.mktemp("demo")
  raw = demo.generate_demo_dataset(root / "raw", count=40, height=64, width=64, seed=3)
  out = root / "prepared"
  prepare.prepare_dataset(raw, out, height=64, width=64, num_shards=2, progress=False)
  return out
