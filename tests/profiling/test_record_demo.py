"""profiling/record_demo.py: runs the demo training command and records what it measured."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = ["-m", "profiling.record_demo"]


@pytest.mark.slow
def test_runs_the_demo_config_and_appends_a_row(tmp_path):
  extra = [
    "--demo_count=24",
    "--height=32",
    "--width=32",
    "--epochs=1",
    "--batch_size=4",
    f"--data_dir={tmp_path / 'data'}",
    "--precision=float32",
  ]
  # The training command trains TinyNet (tests/tiny_train.py): what is tested is the recording
  # of its run, not DoubleU-Net (tracing it was most of the 100 s this took).
  completed = subprocess.run(
    [
      sys.executable,
      "-m",
      "tests.tiny_train",
      *SCRIPT[1:],
      "--record",
      f"--results_dir={tmp_path}",
      "--note=tiny",
      "--",
      *extra,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  # The numbers are the run's own: the same as its workdir's metrics.json.
  metrics = json.loads(open(os.path.join(result["workdir"], "metrics.json")).read())
  assert result["steps"] == metrics["step"] == 5  # 20 training pictures, batch 4, one epoch
  assert result["final_valid_dsc"] == round(metrics["valid"]["head2/per_image/dsc"], 4)
  assert result["final_valid_dsc_head1"] == round(metrics["valid"]["head1/per_image/dsc"], 4)
  assert result["precision"] == "float32" and result["wall_s"] > 0
  rows = (tmp_path / "demo_training.md").read_text().splitlines()
  assert (
    rows[-1].count("|") == 13
    and "--epochs=1" in rows[-1]
    and "| tiny; head 1 final valid DSC " in rows[-1]
  )


def test_rejects_stray_arguments():
  completed = subprocess.run(
    [sys.executable, *SCRIPT, "--", "epochs=1"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert completed.returncode != 0
  assert "must look like --name=value" in completed.stderr
