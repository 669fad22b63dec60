"""profiling/bench.py: the command-line contract other tools rely on, and --record."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench(*args):
  return subprocess.run(
    [sys.executable, "-m", "profiling.bench", *args],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=REPO,
  )


@pytest.mark.slow
def test_last_line_is_json_and_record_writes_table_and_file(tmp_path):
  result = _bench(
    "--height=32",
    "--width=32",
    "--batch=2",
    "--steps=1",
    "--windows=2",
    "--warmup=1",
    "--precision=float32",
    "--jit_compile=false",
    "--record",
    f"--results_dir={tmp_path}",
    "--note=test run",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  measured = json.loads(result.stdout.strip().splitlines()[-1])
  for key in ("train_images_per_s", "infer_images_per_s", "peak_rss_mb", "mfu"):
    assert measured[key] > 0, key
  assert len(measured["train_windows_s"]) == 2
  assert measured["mfu"] < 1.5  # a FLOP count or a timing off by orders of magnitude shows here
  # The model's analytic training cost at 32x32: 3 x forward, 1/16 of the 128x128 figure (26.8
  # GFLOP forward) up to the ASPP taps dropped at small sizes.
  assert 3 * 26.8 / 16 * 0.8 < measured["training_gflop_per_image"] < 3 * 26.8 / 16

  # (--steps_per_loop's loop function is tested in tests/test_trainer.py: a second traced step
  # of the whole network here doubled this test's time.)
  assert measured["steps_per_loop"] == 1 and measured["batch_norm_folded_for_inference"]
  saved = json.loads((tmp_path / "bench-32x32-b2-float32-jit0.json").read_text())
  assert saved["train_images_per_s"] == measured["train_images_per_s"]
  assert saved["note"] == "test run (steps_per_loop 1; inference folded)"
  rows = (tmp_path / "bench.md").read_text().splitlines()
  assert rows[-1].startswith("| 32x32 | 2 | float32 | False | ")
  assert "test run" in rows[-1] and "--height=32" in rows[-1]


def test_rejects_sizes_the_network_cannot_take_and_loops_that_do_not_divide_a_window():
  result = _bench("--height=40", "--width=32")
  assert result.returncode != 0
  assert "divisible by 16" in result.stderr
  result = _bench("--steps=5", "--steps_per_loop=2")
  assert result.returncode != 0
  assert "--steps_per_loop=2 must divide --steps=5" in result.stderr
