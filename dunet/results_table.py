r"""The paper's results table over evaluated runs: `dunet-results --workdirs=A,B --out_dir=OUT`.

Reads the evaluations dunet-evaluate wrote (every <workdir>/eval/*/metrics.json, or an evaluation
folder itself; a folder of fold workdirs, such as a cross-validation folder, stands for its
workdirs) and writes OUT/results.md and OUT/results.csv: data set, split, model / run, folds,
images, DSC, mIoU, recall, precision and HD95 (where evaluated) of head 2, means over images.
The folds of one cross-validation experiment make one row: mean ± standard deviation over them.
With --pictures (default), OUT/pictures/<run>/ gets each run's learning curves, per-image DSC
histograms and a montage of its --worst images per evaluation (the evaluated model is run again
on those images).

Examples:
  dunet-results --workdirs=runs/cvc,runs/kvasir --out_dir=results
  dunet-results --workdirs='runs/cv_kvasir/fold_*' --split=test --out_dir=results --worst=4
  dunet-results --workdirs=runs/cvc/eval/test-tta --out_dir=results --nopictures

Exit status: 0 when the table was written; 2 for a usage error; 1 for another error (a workdir
without an evaluation, an unreadable report). Errors are one line on stderr.
"""

from __future__ import annotations

if __name__ == "__main__":
  from dunet import cli

  cli.silence_startup()  # before TensorFlow is imported

import os  # noqa: E402
import sys  # noqa: E402
from typing import Sequence  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from dunet import cli  # noqa: E402
from dunet import pictures  # noqa: E402
from dunet import results  # noqa: E402

FLAGS = flags.FLAGS
PROGRAM = "dunet-results"
PICTURES_SUBDIR = "pictures"
HELP_GROUPS = (
  ("Input", ("workdirs", "split")),
  ("Output", ("out_dir", "pictures", "worst")),
)


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines the command-line flags (only when run as a program)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_list(
    "workdirs",
    None,
    "Comma-separated training workdirs, evaluation folders, or folders "
    "of workdirs (a cross-validation folder with fold_<k>/ workdirs); glob "
    "patterns allowed (quote them).",
    **fv,
  )
  flags.DEFINE_string(
    "out_dir", None, "Where results.md, results.csv and pictures/ are written.", **fv
  )
  flags.DEFINE_string(
    "split",
    None,
    "Only evaluations of this split: test, valid, train, all, raw (a raw folder) or "
    f"'{results.HELD_OUT}' (default: every evaluation found).",
    **fv,
  )
  flags.DEFINE_bool(
    "pictures",
    True,
    "Also draw each run's learning curves, DSC histograms and worst-image "
    "montages into <out_dir>/pictures/<run>/.",
    **fv,
  )
  flags.DEFINE_integer(
    "worst",
    pictures.DEFAULT_WORST,
    "Images in each worst-images montage (0: no montage, no model is loaded).",
    lower_bound=0,
    **fv,
  )


def _count(number: int, noun: str) -> str:
  return f"{number} {noun}{'' if number == 1 else 's'}"


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str]) -> int:
  """Reads the evaluations, writes the table and (with --pictures) the pictures."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdirs:
    raise app.UsageError("--workdirs is required (evaluated training workdirs, comma-separated)")
  if not FLAGS.out_dir:
    raise app.UsageError("--out_dir is required (where results.md and results.csv go)")
  folders = results.expand_paths(FLAGS.workdirs)
  evaluations = results.find_evaluations(folders, FLAGS.split)
  rows = results.build_rows(evaluations)
  paths = results.write_results(rows, FLAGS.out_dir)
  written, left_out = [], []
  if FLAGS.pictures:
    for name, workdir, members in pictures.runs_of(evaluations):
      run_written, run_left_out = pictures.write_run_pictures(
        workdir,
        members,
        os.path.join(FLAGS.out_dir, PICTURES_SUBDIR, name),
        worst=FLAGS.worst,
        log=_log,
      )
      written += run_written
      left_out += run_left_out
  for reason in left_out:
    _log(f"{PROGRAM}: left out: {reason}")
  drawn = (
    f"; {_count(len(written), 'picture')} in {os.path.join(FLAGS.out_dir, PICTURES_SUBDIR)}"
    f"{f' ({len(left_out)} left out)' if left_out else ''}"
    if FLAGS.pictures
    else ""
  )
  print(
    f"Wrote {_count(len(rows), 'row')} from {_count(len(evaluations), 'evaluation')} to "
    f"{paths[results.RESULTS_MD]} and {paths[results.RESULTS_CSV]}{drawn}"
  )
  return 0


def run() -> None:
  """The program: defines the flags and runs `main` (console-script entry point)."""
  define_flags()
  cli.run(main, program=PROGRAM, help_groups=HELP_GROUPS, summary=cli.docstring_summary(__doc__))


if __name__ == "__main__":
  run()
