r"""Records how closely dunet trains like the authors' Keras code: profiling/results/parity.md.

  python -m profiling.parity [--forced_steps=6] [--free_steps=20] [--record]

Run from the repository root (it uses the Keras oracle in tests/, so the test extras must be
installed). For each optimizer and loss of the paper (Adam, Nadam x BCE, Dice), dunet with
`--loss_reduction=reference` and the Keras reference model start from the same random weights
and train on the same 64x64 batches of 4 (tests/reference_training.py says how):

  teacher forcing  dunet takes Keras' state before each of the first --forced_steps steps: the
                   worst relative difference over those steps of the loss, the weight updates
                   (all, and without the biases before a BatchNorm, whose gradient is rounding
                   noise) and the BatchNorm statistics' changes;
  free running     --free_steps steps each from the same start: the largest loss gap, against
                   the noise floor (dunet against itself with each batch's images reversed),
                   and how far the weight changes drifted apart, against the same floor.

Prints the table; --record writes it (with the command, date and machine) to parity.md.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import List

from absl import app
from absl import flags
import numpy as np

from profiling import machine
from tests import reference_training as parity

FLAGS = flags.FLAGS
flags.DEFINE_integer("forced_steps", 6, "Teacher-forced steps per combination.", lower_bound=1)
flags.DEFINE_integer("free_steps", 20, "Free-running steps per combination.", lower_bound=1)
flags.DEFINE_bool("record", False, "Write the table to --results_dir/parity.md.")
flags.DEFINE_string(
  "results_dir", os.path.join("profiling", "results"), "Where --record writes parity.md."
)


def measure_all(forced_steps: int, free_steps: int) -> List[str]:
  """Measures every combination; returns the markdown table rows."""
  rows = []
  with tempfile.TemporaryDirectory() as folder:
    pair = parity.Pair(os.path.join(folder, "initial.h5"), max(forced_steps, free_steps))
    for optimizer_name, loss_name in parity.COMBINATIONS:
      started = time.monotonic()
      measured = parity.measure(pair, optimizer_name, loss_name, forced_steps, free_steps)
      forced, free = measured.forced, measured.free
      gap = np.abs(free.dunet_losses - free.keras_losses) / free.keras_losses
      floor = np.abs(free.dunet_losses - free.noise_losses) / free.keras_losses
      rows.append(
        f"| {optimizer_name} | {loss_name} "
        f"| {max(r.loss_difference for r in forced):.1e} "
        f"| {max(r.update_trainable for r in forced):.1e} "
        f"| {max(r.update_informative for r in forced):.1e} "
        f"| {max(r.update_statistics for r in forced):.1e} "
        f"| {gap[0]:.1e} | {gap.max():.1e} / {floor.max():.1e} "
        f"| {free.drift['trainable'][0]:.2f} / {free.drift['trainable'][1]:.2f} "
        f"| {free.drift['statistics'][0]:.3f} / {free.drift['statistics'][1]:.3f} "
        f"| {free.keras_losses[0]:.4f} -> {free.keras_losses[-1]:.4f} "
        f"| {free.dunet_losses[0]:.4f} -> {free.dunet_losses[-1]:.4f} "
        f"| {time.monotonic() - started:.0f} |"
      )
      print(rows[-1], flush=True)
  return rows


def table(rows: List[str], forced_steps: int, free_steps: int) -> str:
  command = "python -m profiling.parity " + " ".join(sys.argv[1:])
  return (
    f"""# Training-dynamics parity with the reference Keras code

Command: `{command.strip()}` (from the repository root, test extras installed), on
{time.strftime("%Y-%m-%d")}, {machine.machine_description()}.

dunet (`--loss_reduction=reference`, float32) and the authors' Keras model (the oracle in
tests/keras_reference.py, `model.compile(loss, Adam/Nadam(1e-4))`, `train_on_batch` steps)
start from the same random weights (BatchNorm statistics included) and see the same 64x64
batches of 4 pictures. How it is measured: tests/reference_training.py; what CI asserts:
tests/test_reference_parity.py.

- Teacher forcing ({forced_steps} steps): before each Keras step dunet takes Keras' weights,
  statistics and optimizer state and steps once too; the worst relative difference over the
  steps of the loss, of the weight updates (all trainable; "informative": without the biases
  that feed a BatchNorm, whose exact gradient is zero and whose computed one is rounding
  noise that Adam turns into full steps), and of the BatchNorm statistics' changes.
- Free running ({free_steps} steps): the relative loss gap at step 1 (same weights) and its
  largest value over the run against the noise floor (dunet against itself on the same
  batches with the images of each batch in reverse order: the same maths, other rounding);
  then how far the weight changes of the two runs ended apart, |dk - dd| / |dk|, against the
  same floor |dd - dd'| / |dd|. Adam on this network is chaotic: rounding alone separates two
  float32 runs this much within a few steps, which is why the teacher-forced columns are the
  test of the formulas.

| optimizer | loss | forced: loss | forced: update | forced: update (informative) | forced: BN statistics | free: step-1 loss gap | free: max loss gap / floor | free: weight drift / floor | free: BN statistics drift / floor | Keras loss | dunet loss | s |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
"""
    + "\n".join(rows)
    + "\n"
  )


def main(argv: List[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  rows = measure_all(FLAGS.forced_steps, FLAGS.free_steps)
  text = table(rows, FLAGS.forced_steps, FLAGS.free_steps)
  print(text)
  if FLAGS.record:
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    path = os.path.join(FLAGS.results_dir, "parity.md")
    with open(path, "w") as handle:
      handle.write(text)
    print(f"Wrote {path}")


if __name__ == "__main__":
  app.run(main)
