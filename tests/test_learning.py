"""Training learns: a short run of the demo recipe (configs/demo.flags, the README's first
command) on the synthetic demo data, scored in inference mode.

A per-pixel colour classifier fit on the pictures themselves stays below DSC 0.5 on this data
(tests/data/test_demo.py), so clearing 0.5 with EACH head needs shape: both networks learned.
The full demo (400 steps) reaches about 0.9 (profiling/results/demo_training.md); this run is
under a third of it, to fit CI.
"""

import json
import os
import subprocess
import sys

import pytest

from dunet import checkpoint as checkpoint_lib
from tests import testing_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 120  # 6 of the demo's 20 epochs, on its own (shorter) cosine schedule
# What a colour-only classifier cannot reach (tests/data/test_demo.py).
DSC_BAR = 0.5


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  workdir = root / "run"
  completed = subprocess.run(
    [
      sys.executable,
      "-m",
      "dunet.train",
      "--flagfile=configs/demo.flags",
      f"--data_dir={root / 'data'}",
      f"--workdir={workdir}",
      f"--max_steps={STEPS}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_both_heads_learn_in_inference_mode(demo_run):
  metrics = json.loads((demo_run / "metrics.json").read_text())
  assert metrics["step"] == STEPS
  valid = metrics["valid"]  # the last validation: inference mode, as evaluation runs
  for head in ("head1", "head2"):
    assert valid[f"{head}/per_image/dsc"] > DSC_BAR, (head, valid[f"{head}/per_image/dsc"])
  # Not by predicting one class: both heads find most of the foreground, and mostly only it.
  for head in ("head1", "head2"):
    assert valid[f"{head}/pooled/recall"] > 0.5 and valid[f"{head}/pooled/precision"] > 0.5


@pytest.mark.slow
def test_the_best_checkpoint_holds_the_best_validation_step(demo_run):
  dsc = testing_utils.event_scalars(demo_run / "valid", "head2/per_image/dsc")
  assert len(dsc) >= 5
  best_step = max(dsc, key=lambda step: (dsc[step], -step))  # the first of equal bests
  best = checkpoint_lib.best_checkpoint(str(demo_run))
  assert checkpoint_lib.step_of(best) == best_step, (best, dsc)
  assert checkpoint_lib.read_scalar(best, "best_dsc") == pytest.approx(dsc[best_step], abs=1e-6)
  metrics = json.loads((demo_run / "metrics.json").read_text())
  assert metrics["best_valid_dsc"] == pytest.approx(dsc[best_step], abs=1e-6)
