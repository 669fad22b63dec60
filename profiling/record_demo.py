r"""Runs the README's first command (the demo training) and records its time and validation DSC.

  python -m profiling.record_demo [--record] [--note="what changed"] [-- EXTRA TRAIN FLAGS]

Runs `python -m dunet.train --flagfile=configs/demo.flags --workdir=<fresh temporary folder>`
plus any flags after `--` (e.g. `-- --precision=float32`), times the whole command (data
generation and preparation on a fresh --data_dir included when the demo data is missing), reads
the run's metrics.json, and prints one JSON object as its last line. `--record` appends a row to
profiling/results/demo_training.md with the exact command and the machine, which is where
configs/demo.flags points for its expected result.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Sequence

from absl import app
from absl import flags

from profiling.machine import machine_description

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "flagfile_path",
  os.path.join("configs", "demo.flags"),
  "The training config to run (relative to the repository root).",
)
flags.DEFINE_bool("record", False, "Append the result to --results_dir/demo_training.md.")
flags.DEFINE_string("note", "", "Free text stored with a recorded result.")
flags.DEFINE_string(
  "results_dir",
  os.path.join(REPO, "profiling", "results"),
  "Where --record writes demo_training.md.",
)
flags.DEFINE_integer("timeout_s", 3600, "Give up on the training command after this long.")

_HEADER = """# The demo training run (the README's first command)

Each row: one run of `python -m dunet.train --flagfile=configs/demo.flags` (plus the extra flags
shown) into a fresh workdir, timed end to end by `profiling/record_demo.py --record`, on the
machine shown (load = 1-minute load average when it finished; other work on the machine slows it).
DSC: head 2 (the final mask), mean over the validation images at threshold 0.5 (newer rows give
head 1's final validation DSC in the note).

| date | extra flags | precision | steps | wall s | best valid DSC | final valid DSC | final valid IoU | load | note | command | machine |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
"""


def run_demo(extra_flags: Sequence[str]) -> Dict[str, object]:
  """Runs the training command in a fresh workdir; returns the measurements."""
  workdir = tempfile.mkdtemp(prefix="dunet-demo-")
  command = [
    sys.executable,
    "-m",
    "dunet.train",
    f"--flagfile={FLAGS.flagfile_path}",
    f"--workdir={workdir}",
    *extra_flags,
  ]
  started = time.perf_counter()
  completed = subprocess.run(
    command,
    cwd=REPO,
    timeout=FLAGS.timeout_s,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
  )
  seconds = time.perf_counter() - started
  if completed.returncode != 0:
    raise RuntimeError(
      f"training failed (exit {completed.returncode}):\n{completed.stdout[-3000:]}"
    )
  with open(os.path.join(workdir, "metrics.json")) as handle:
    metrics = json.load(handle)
  with open(os.path.join(workdir, "config.json")) as handle:
    config = json.load(handle)
  valid = metrics["valid"]
  return {
    "extra_flags": " ".join(extra_flags),
    "precision": config.get("precision"),
    "steps": metrics["step"],
    "wall_s": round(seconds, 1),
    "best_valid_dsc": round(metrics["best_valid_dsc"], 4),
    "final_valid_dsc": round(valid["head2/per_image/dsc"], 4),
    "final_valid_iou": round(valid["head2/per_image/iou"], 4),
    "final_valid_dsc_head1": round(valid["head1/per_image/dsc"], 4),
    "load_average_1min": round(os.getloadavg()[0], 2),
    "workdir": workdir,
    "machine": machine_description(),
    "command": " ".join(["python", "-m", "profiling.record_demo"] + sys.argv[1:]),
  }


def record(result: Dict[str, object], results_dir: str, note: str) -> str:
  """Appends `result` as a row of demo_training.md in `results_dir`; returns the file's path."""
  os.makedirs(results_dir, exist_ok=True)
  table = os.path.join(results_dir, "demo_training.md")
  if not os.path.exists(table):
    with open(table, "w") as handle:
      handle.write(_HEADER)
  # Head 1 goes in the note (older rows have no column for it): it must learn too.
  head1 = f"head 1 final valid DSC {result['final_valid_dsc_head1']}"
  note = f"{note}; {head1}" if note else head1
  with open(table, "a") as handle:
    handle.write(
      f"| {time.strftime('%Y-%m-%d')} | {result['extra_flags'] or '(none)'} | "
      f"{result['precision']} | {result['steps']} | {result['wall_s']} | "
      f"{result['best_valid_dsc']} | {result['final_valid_dsc']} | "
      f"{result['final_valid_iou']} | {result['load_average_1min']} | {note} | "
      f"`{result['command']}` | {result['machine']} |\n"
    )
  return table


def main(argv: List[str]) -> None:
  extra_flags = argv[1:]
  for flag in extra_flags:
    if not flag.startswith("--"):
      raise app.UsageError(
        f"extra training flags must look like --name=value, got "
        f"{shlex.quote(flag)} (put them after `--`)"
      )
  result = run_demo(extra_flags)
  if FLAGS.record:
    record(result, FLAGS.results_dir, FLAGS.note)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
