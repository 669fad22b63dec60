r"""Prepares a raw segmentation data set for dunet: checked, resized, split, written as TFRecords.

Reads the data set once as downloaded (CVC-ClinicDB, Kvasir-SEG, ETIS-LaribPolypDB, ISIC 2018
task 1, 2018 Data Science Bowl stage1_train, or any images/ + masks/ folder), checks every
image/mask pair, resizes (images: area when shrinking, else bilinear; masks: nearest, kept
{0, 1}), draws the paper's 80/10/10 split (or uses --split_file, or --test_raw_dir as the whole
test set), and writes into --out_dir:

  {train,valid,test}-SSSSS-of-NNNNN.tfrecord   PNG inside (lossless); validation and test records
                                               also keep the original-resolution mask
  split.json                                   the split (keep it with your results)
  summary.json                                 sizes, counts, foreground fractions, skipped files

With --folds=K (cross-validation) the split's train+valid images are divided into K folds
(seeded by --seed; or --folds_file) and written as fold_0 ... fold_{K-1} records (each keeping the
original-resolution masks) plus test, with folds.json; there are no train/valid records then.
`dunet-train --fold=k` trains on the other folds and validates on fold_k.

The folder appears only when complete (written next to it and renamed). `--verify` checks an
existing prepared folder instead: every shard read in full against what summary.json recorded
(size, record count, SHA-256, checksums, PNG decoding), and whether the raw data changed since.

`python tools/prepare_data.py` and `python -m dunet.prepare_data` are the same command.

Examples:
  dunet-prepare --raw_dir=/data/CVC-ClinicDB --out_dir=data/cvc \
      --height=288 --width=384
  # MICCAI 2015: train/valid on CVC-ClinicDB, test on all of ETIS-Larib
  dunet-prepare --raw_dir=/data/CVC-ClinicDB --test_raw_dir=/data/ETIS \
      --out_dir=data/cvc_etis --height=288 --width=384
  # 5-fold cross-validation folds of the train+valid images (test as above)
  dunet-prepare --raw_dir=/data/CVC-ClinicDB --out_dir=data/cvc_folds5 \
      --height=288 --width=384 --folds=5
  # Is data/cvc still as prepared, and is its raw folder unchanged?
  dunet-prepare --verify --out_dir=data/cvc
"""

from __future__ import annotations

if __name__ == "__main__":  # before TensorFlow is imported: its start-up noise
  from dunet import cli as _cli

  _cli.silence_startup()

import json
import os

from absl import app
from absl import flags

from dunet import cli
from dunet.data import layouts
from dunet.data import prepare
from dunet.models.doubleunet import SIZE_DIVISOR

FLAGS = flags.FLAGS
flags.DEFINE_string("raw_dir", None, "The data set folder as downloaded (required).")
flags.DEFINE_string(
  "out_dir",
  None,
  "The prepared folder to create (required); it must not exist or be empty unless --overwrite.",
)
flags.DEFINE_enum(
  "layout",
  "auto",
  ["auto", *layouts.LAYOUTS],
  "Folder layout of --raw_dir: auto detects it from the sub-folder names; "
  "cvc (Original/, 'Ground Truth/'), kvasir (images/, masks/), etis (N.tif, "
  "GroundTruth/pN.tif), isic2018 (ISIC2018_Task1-2_Training_Input/, "
  "ISIC2018_Task1_Training_GroundTruth/), dsb2018 (<id>/images/, <id>/masks/ "
  "instance masks, merged), generic (images/, masks/ matched by file stem).",
)
flags.DEFINE_integer(
  "height",
  None,
  "Prepared image height in pixels (required; DoubleU-Net "
  "needs a multiple of 16; the reference code used 384).",
  lower_bound=1,
)
flags.DEFINE_integer(
  "width",
  None,
  "Prepared image width in pixels (required; a multiple of 16; the reference code used 512).",
  lower_bound=1,
)
flags.DEFINE_string(
  "split_file",
  None,
  'A split JSON ({"train": [...], "valid": [...], '
  '"test": [...]} of file stems) to use instead of drawing the split.',
)
flags.DEFINE_integer("seed", 42, "Seed of the drawn split and folds (the paper's code: 42).")
flags.DEFINE_integer(
  "folds",
  0,
  "Cross-validation: divide the split's train+valid images into this many folds (>= 2; "
  "a seeded permutation, sizes differing by at most one), written as fold_0 ... fold_{K-1} "
  "records plus test and folds.json (no train/valid records). 0: no folds.",
  lower_bound=0,
)
flags.DEFINE_string(
  "folds_file",
  None,
  "A folds.json (from an earlier --folds preparation) to use instead of drawing the folds; "
  "checked against the split (no test image, no unknown name).",
)
flags.DEFINE_float(
  "valid_fraction",
  0.1,
  "Share of the images drawn for validation (rounded down: 61 of CVC-ClinicDB's 612).",
)
flags.DEFINE_float(
  "test_fraction",
  0.1,
  "Share of the images drawn for testing (rounded down); ignored with --test_raw_dir.",
)
flags.DEFINE_string(
  "test_raw_dir",
  None,
  "A separate data set used whole as the test split "
  "(e.g. ETIS-Larib for a model trained on CVC-ClinicDB, the MICCAI 2015 "
  "setting); --raw_dir then gives only train and valid.",
)
flags.DEFINE_enum(
  "test_layout",
  "auto",
  ["auto", *layouts.LAYOUTS],
  "Folder layout of --test_raw_dir (as --layout).",
)
flags.DEFINE_enum(
  "on_error",
  "raise",
  list(layouts.ON_ERROR),
  "Bad input (unreadable, truncated or empty file, missing mask or image, "
  "size mismatch, duplicate stem): raise = stop with an error naming the file; "
  "skip = log it, leave the pair out and list it in summary.json.",
)
flags.DEFINE_integer(
  "num_shards",
  None,
  "TFRecord files per split (fewer for small splits); default: one per 256 images.",
  lower_bound=1,
)
flags.DEFINE_bool(
  "overwrite", False, "Replace an existing --out_dir (only once the new one is complete)."
)
flags.DEFINE_bool("progress", True, "Show a progress line on the terminal.")
flags.DEFINE_bool(
  "verify",
  False,
  "Prepare nothing: check the prepared --out_dir (every shard "
  "read in full against summary.json: size, records, SHA-256, checksums, PNGs) "
  "and whether the raw data it was prepared from changed since. Exit status 1 "
  "with the offending file named, else 0.",
)
flags.DEFINE_integer(
  "workers",
  None,
  "Threads decoding and resizing images (default: the number of CPUs).",
  lower_bound=1,
)


HELP_GROUPS = (
  ("Input and output", ("raw_dir", "layout", "out_dir", "overwrite")),
  (
    "Size and split",
    (
      "height",
      "width",
      "split_file",
      "seed",
      "valid_fraction",
      "test_fraction",
      "test_raw_dir",
      "test_layout",
      "folds",
      "folds_file",
    ),
  ),
  ("Checks", ("on_error", "verify")),
)


def verify(out_dir: str) -> int:
  """`--verify`: 0 when `out_dir` is intact and its raw data unchanged.

  Raises:
    dunet.errors.DataError: a damaged shard, or raw data changed since (the message names the file).
  """
  prepare.verify_shards(out_dir, content=True)
  change = prepare.raw_data_changes(out_dir)
  if change is not None:
    raise change
  print(f"{out_dir}: every shard is as prepared and the raw data are unchanged")
  return 0


def _check_usage() -> None:
  """Everything the command line alone can get wrong, before anything is read or written."""
  missing = [
    name for name in ("raw_dir", "out_dir", "height", "width") if getattr(FLAGS, name) is None
  ]
  if missing:
    raise app.UsageError("required: " + ", ".join(f"--{name}" for name in missing))
  for name in ("height", "width"):
    if getattr(FLAGS, name) % SIZE_DIVISOR:
      raise app.UsageError(
        f"--{name}={getattr(FLAGS, name)} is not divisible by {SIZE_DIVISOR}, "
        f"which DoubleU-Net's four 2x poolings need (e.g. "
        f"{getattr(FLAGS, name) // SIZE_DIVISOR * SIZE_DIVISOR or SIZE_DIVISOR})"
      )
  if FLAGS.folds == 1:
    raise app.UsageError("--folds=1 is no cross-validation: pass 0 (no folds) or at least 2")
  for name in ("raw_dir", "test_raw_dir", "split_file", "folds_file"):
    path = getattr(FLAGS, name)
    if path and not os.path.exists(path):
      raise app.UsageError(f"--{name}={path}: no such file or folder")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.verify:
    if not FLAGS.out_dir:
      raise app.UsageError("--verify needs --out_dir (the prepared folder to check)")
    return verify(FLAGS.out_dir)
  _check_usage()
  summary = prepare.prepare_dataset(
    FLAGS.raw_dir,
    FLAGS.out_dir,
    height=FLAGS.height,
    width=FLAGS.width,
    layout=FLAGS.layout,
    split_file=FLAGS.split_file,
    seed=FLAGS.seed,
    valid_fraction=FLAGS.valid_fraction,
    test_fraction=FLAGS.test_fraction,
    test_raw_dir=FLAGS.test_raw_dir,
    test_layout=FLAGS.test_layout,
    on_error=FLAGS.on_error,
    num_shards=FLAGS.num_shards,
    progress=FLAGS.progress,
    overwrite=FLAGS.overwrite,
    workers=FLAGS.workers,
    folds=FLAGS.folds,
    folds_file=FLAGS.folds_file,
  )
  report = {key: summary[key] for key in ("layout", "height", "width", "counts")}
  report["skipped"] = summary["skipped"]["count"]
  report["thresholded_masks"] = summary["thresholded_masks"]["count"]
  report["foreground_fraction"] = {
    name: round(stats["foreground_fraction"], 4) for name, stats in summary["splits"].items()
  }
  print(f"Prepared {FLAGS.out_dir}: {json.dumps(report)}")
  return 0


def run() -> None:
  """The program (console-script entry point `dunet-prepare`)."""
  cli.run(
    main, program="dunet-prepare", help_groups=HELP_GROUPS, summary=cli.docstring_summary(__doc__)
  )


if __name__ == "__main__":
  run()
