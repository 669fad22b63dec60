r"""Scores a trained DoubleU-Net: `python -m dunet.evaluate --checkpoint=RUN [--split=test]`.

What is evaluated:
  * a split of prepared data (dunet-prepare; default: the data the run trained on, from
    its config.json): the prepared uint8 pictures go through the model (dunet.serving: resized to
    the model's input, preprocessed as in training), both heads' probabilities are resized back
    (bilinear) to each picture's ORIGINAL size and thresholded there, and counted against the
    original-resolution mask the validation and test records keep. Training records keep no
    original mask: their scores are at the prepared size, and the report says so.
  * or a whole raw data set folder as distributed (--raw_dir, e.g. ETIS-Larib as downloaded), read
    with dunet's checked readers at its original resolution, in any layout of
    dunet/data/layouts.py.

What is reported, for head 2 (the final output), head 1, and "mean" (the two heads'
probabilities averaged, then thresholded), at --threshold (foreground where probability >= it):
DSC, IoU, precision, recall (the paper's four), F2 and accuracy, each as
  per_image: the mean over images of each image's score. The HEADLINE statistic: the paper's
             tables report mean DSC and mIoU over test images (the authors' code averaged Keras
             metrics per test batch, over both heads and soft masks, which is neither statistic
             exactly); the per-image mean of head 2 at the original resolution is the
             well-defined version of it, and what dunet compares with the paper.
  pooled:    one score from the confusion counts summed over all pixels of all images (large
             objects weigh more).
Images whose prediction and ground truth are both empty score 1.0; a prediction on an empty
ground truth, or an empty prediction on a non-empty one, scores 0.0 (dunet/metrics.py); the report
counts the empty ground truths and predictions.

Beside --threshold, for prepared data the report gives head 2's validation-optimal threshold
(chosen on the valid split only, from 0.05 to 0.95 in steps of 0.05) and the evaluated split's
scores at it: a sign of a badly calibrated model when it is far from 0.5, never tuned on the
test split (--nochoose_threshold leaves it out). With --recompute_bn=N the BatchNorm statistics
are first recomputed over N unaugmented training batches (dunet/precise_bn.py) and the model is
saved with them in <out_dir>/precise_bn.

Written into --out_dir (default: <workdir>/eval/<split>[-latest][-tta], or
<workdir>/eval/raw-<folder name>[...] with --raw_dir), each file complete or not at all:
  metrics.json   everything above, plus the model, data, settings and skipped files
  metrics.md     the table printed at the end, with the same notes
  per_image.csv  one row per image: name, split, size scored, resolution, head 2's counts and
                 scores, to find the failures

Examples:
  python -m dunet.evaluate --checkpoint=runs/cvc                       # best checkpoint, test
  python -m dunet.evaluate --checkpoint=runs/cvc --split=valid --prefer=latest --tta
  python -m dunet.evaluate --checkpoint=runs/cvc --raw_dir=/data/ETIS-LaribPolypDB
  python -m dunet.evaluate --checkpoint=exported/cvc --data_dir=data/cvc --out_dir=eval/cvc
  python -m dunet.evaluate --checkpoint=runs/cvc --recompute_bn=8      # precise BN statistics

The model's path and the data are checked before the model is loaded, and nothing is written
before both are found. Exit status: 0 when the evaluation was written; 2 for a usage error (a bad
or missing flag, settings that cannot work together); 1 for another error (no checkpoint there,
missing or damaged data). Errors are one line on stderr.
"""

from __future__ import annotations

if __name__ == "__main__":
  from dunet import cli

  cli.silence_startup()  # before TensorFlow is imported

from typing import Optional, Sequence, Tuple  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from dunet import cli  # noqa: E402
from dunet import evaluation  # noqa: E402
from dunet import model_flags  # noqa: E402
from dunet import postprocess  # noqa: E402
from dunet import serving  # noqa: E402
from dunet import surface_metrics  # noqa: E402
from dunet.data import layouts  # noqa: E402
from dunet.data import pipeline  # noqa: E402
from dunet.errors import ConfigError  # noqa: E402
from dunet.errors import DataError  # noqa: E402

# ================================================================================================
# Command line
# ================================================================================================

FLAGS = flags.FLAGS
PROGRAM = "dunet-evaluate"
HELP_GROUPS = (
  ("Model", model_flags.MODEL_FLAGS),
  ("Data", ("data_dir", "split", "raw_dir", "layout", "on_error")),
  (
    "Scoring",
    ("threshold", "choose_threshold", "choose_postprocessing", "recompute_bn", "batch_size"),
  ),
  ("Boundary metrics", ("pixel_spacing", "nsd_tolerance", "nsd_tolerance_mm")),
  ("Output", ("out_dir",)),
  ("Inference", model_flags.INFERENCE_FLAGS),
)


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines the command-line flags (only when run as a program: dunet.predict and dunet.train
  define flags of the same names, and tests import them all)."""
  fv = dict(flag_values=flag_values)
  model_flags.define_model_flags(flag_values)
  flags.DEFINE_string(
    "data_dir",
    None,
    "A prepared data folder (dunet-prepare). Default: "
    "the data_dir in the run's config.json (the data it trained on).",
    **fv,
  )
  flags.DEFINE_enum(
    "split",
    "test",
    list(evaluation.SPLIT_CHOICES),
    "The prepared split to evaluate: test, "
    "valid, train (scored at the prepared size: training records keep no "
    "original-resolution mask) or all of them.",
    **fv,
  )
  flags.DEFINE_string(
    "raw_dir",
    None,
    "Evaluate a whole raw data set folder as distributed "
    "instead (e.g. ETIS-LaribPolypDB), read at its original resolution; "
    "replaces --data_dir and --split.",
    **fv,
  )
  flags.DEFINE_enum(
    "layout",
    "auto",
    ["auto", *layouts.LAYOUTS],
    "Folder layout of --raw_dir "
    "(auto: detected from its sub-folder names; see dunet-prepare "
    "--help).",
    **fv,
  )
  flags.DEFINE_enum(
    "on_error",
    "raise",
    list(layouts.ON_ERROR),
    "Bad files in --raw_dir "
    "(unreadable, unpaired, size mismatch): raise = stop naming the file; skip = "
    "leave them out and list them in metrics.json (the scores then omit them).",
    **fv,
  )
  flags.DEFINE_float(
    "threshold",
    0.5,
    "A pixel is foreground where the probability is >= this.",
    lower_bound=0.0,
    upper_bound=1.0,
    **fv,
  )
  flags.DEFINE_integer(
    "recompute_bn",
    0,
    "Before evaluating, recompute the BatchNorm "
    "statistics over this many unaugmented training batches (of "
    "--batch_size) of the run's data, and save the model with them in "
    "<out_dir>/precise_bn (0: use the checkpoint's statistics).",
    lower_bound=0,
    **fv,
  )
  flags.DEFINE_bool(
    "choose_threshold",
    True,
    "Also report head 2's validation-optimal "
    "threshold (chosen on the prepared data's valid split, never on the test "
    "split) and the scores at it, beside --threshold.",
    **fv,
  )
  flags.DEFINE_list(
    "pixel_spacing",
    [],
    "The original pictures' pixel spacing in mm (one value, or row,column): adds HD95, ASSD "
    "and NSD in millimetres beside pixels (images scored at the prepared size get none).",
    **fv,
  )
  flags.DEFINE_float(
    "nsd_tolerance",
    surface_metrics.DEFAULT_TOLERANCE,
    "Normalised surface Dice tolerance in pixels.",
    lower_bound=0.0,
    **fv,
  )
  flags.DEFINE_float(
    "nsd_tolerance_mm",
    None,
    "Normalised surface Dice tolerance in mm, with --pixel_spacing (default: the number "
    "--nsd_tolerance).",
    lower_bound=0.0,
    **fv,
  )
  flags.DEFINE_bool(
    "choose_postprocessing",
    False,
    "Before evaluating, choose head 2's post-processing on the validation split (keep the "
    "largest component, or drop components under a size, only if that raises the validation "
    "DSC: nnU-Net's rule), keep the choice with the run "
    f"({serving.POSTPROCESSING_FILENAME}), and apply it here and in later evaluate, predict "
    "and export runs (--postprocessing=auto).",
    **fv,
  )
  flags.DEFINE_integer(
    "batch_size",
    8,
    "Pictures per model call (raw pictures of one size are batched together).",
    lower_bound=1,
    **fv,
  )
  flags.DEFINE_string(
    "out_dir",
    None,
    "Where metrics.json, metrics.md and per_image.csv go. "
    "Default: <workdir>/eval/<split>[-latest][-tta] (eval/raw-<folder name>... "
    "with --raw_dir), replaced by the next run with the same settings; "
    "required for SavedModels and checkpoint prefixes outside a workdir.",
    **fv,
  )


def _resolve_data_dir(checkpoint: str) -> str:
  """--data_dir, or the run's recorded data_dir; checked to be prepared data."""
  if FLAGS.data_dir:
    pipeline.read_data_info(FLAGS.data_dir)  # DataError naming it, with the hint
    return FLAGS.data_dir
  first = serving.expand_model_paths(checkpoint)[0]  # an ensemble's members share their data
  config = {} if serving.is_saved_model(first) else serving.find_run_config(first)
  recorded = config.get("data_dir")
  if not recorded:
    raise ConfigError(
      f"{checkpoint} records no data folder (no config.json with a "
      "data_dir): pass --data_dir (a folder prepared with "
      "dunet-prepare) or --raw_dir (a data set as distributed)"
    )
  try:
    pipeline.read_data_info(recorded)
  except DataError as error:
    raise DataError(
      recorded,
      f"the run's config.json names this data folder, but it is not "
      f"usable ({error.problem}); pass --data_dir or --raw_dir",
    ) from error
  return recorded


def _valid_split(checkpoint: str) -> Optional[str]:
  """The split "valid" means for this model: a fold run's validation fold (its config.json);
  None for an ensemble of fold runs (every pool image trained some member: it has none)."""
  members = serving.expand_model_paths(checkpoint)
  if serving.is_saved_model(members[0]):
    return "valid"
  configs = [serving.find_run_config(member) for member in members]
  if len(members) > 1 and any(int(config.get("folds") or 0) for config in configs):
    return None
  return str(configs[0].get("valid_split") or "valid")


def _boundary_settings() -> evaluation.BoundarySettings:
  """--pixel_spacing and the NSD tolerances, checked."""
  try:
    spacing = tuple(float(value) for value in FLAGS.pixel_spacing)
  except ValueError:
    raise app.UsageError(
      f"--pixel_spacing={','.join(FLAGS.pixel_spacing)}: expected one or two numbers (mm)"
    ) from None
  if len(spacing) > 2 or any(not value > 0 for value in spacing):
    raise app.UsageError(
      f"--pixel_spacing={','.join(FLAGS.pixel_spacing)}: expected one or two positive numbers"
    )
  return evaluation.BoundarySettings(
    spacing_mm=(spacing[0] if len(spacing) == 1 else spacing) if spacing else None,
    tolerance=FLAGS.nsd_tolerance,
    tolerance_mm=FLAGS.nsd_tolerance_mm,
  )


def _check_inputs() -> Tuple[str, Optional[str]]:
  """The model's path, the data and the output folder, checked before anything is loaded or
  written; returns (out_dir, data_dir or None for --raw_dir)."""
  # The checkpoint first: its absence is the likelier mistake, and the error names the path.
  serving.resolve_model_source(FLAGS.checkpoint, FLAGS.prefer)
  if FLAGS.choose_postprocessing:
    members = serving.expand_model_paths(FLAGS.checkpoint)
    if FLAGS.raw_dir or any(serving.is_saved_model(member) for member in members):
      raise app.UsageError(
        "--choose_postprocessing needs checkpoints (not a SavedModel) and prepared data "
        "with a validation split (not --raw_dir)"
      )
    if serving.postprocessing_folder(members) is None:
      raise app.UsageError(
        "--choose_postprocessing keeps the choice with the run: the checkpoint(s) must be in "
        "a workdir (an ensemble's in one folder)"
      )
    if FLAGS["postprocessing"].present and FLAGS.postprocessing != serving.AUTO:
      raise app.UsageError(
        "--choose_postprocessing chooses the post-processing: drop --postprocessing"
      )
  out_dir = FLAGS.out_dir or evaluation.default_out_dir(
    FLAGS.checkpoint, FLAGS.split, FLAGS.raw_dir, FLAGS.tta, FLAGS.prefer
  )
  if out_dir is None:
    raise app.UsageError(
      f"--out_dir is required: {FLAGS.checkpoint} is not inside a training workdir"
    )
  if FLAGS.raw_dir:
    layouts.scan(FLAGS.raw_dir, FLAGS.layout)  # DataError naming a missing or empty folder
    data_dir = None
  else:
    data_dir = _resolve_data_dir(FLAGS.checkpoint)
  if FLAGS.recompute_bn and data_dir is None:
    _resolve_data_dir(FLAGS.checkpoint)  # the run's own data, for the statistics
  return out_dir, data_dir


def main(argv: Sequence[str]) -> int:
  """Checks the model's path and the data, loads the model, evaluates, writes the report."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.checkpoint:
    raise app.UsageError("--checkpoint is required (a workdir, checkpoint prefix or SavedModel)")
  if FLAGS.raw_dir and (FLAGS.data_dir or FLAGS["split"].present):
    raise app.UsageError("--raw_dir evaluates a whole raw folder: leave out --data_dir and --split")
  out_dir, data_dir = _check_inputs()
  valid_split = _valid_split(FLAGS.checkpoint)
  if valid_split is None and (FLAGS.split != "test" or FLAGS.choose_postprocessing):
    raise app.UsageError(
      "an ensemble of cross-validation folds has no held-out images but the test split: "
      "evaluate --split=test (its post-processing is chosen out of fold by "
      "dunet-train --cross_validate)"
    )
  # Flips, tiling and post-processing happen inside the serve call.
  loaded = serving.load_segmenter(
    FLAGS.checkpoint, threshold=FLAGS.threshold, **model_flags.load_arguments(FLAGS)
  )
  choice = None
  if FLAGS.choose_postprocessing:
    base = serving.with_postprocessing(loaded, postprocess.PostProcessing.none(), FLAGS.threshold)
    spec, choice = evaluation.choose_postprocessing_on_validation(
      base, data_dir, valid_split, FLAGS.threshold, FLAGS.batch_size, FLAGS.progress
    )
    kept = serving.write_postprocessing_choice(
      serving.postprocessing_folder(serving.expand_model_paths(FLAGS.checkpoint)), choice
    )
    print(f"Post-processing chosen on {valid_split}: {spec} ({choice['reason']}); kept in {kept}")
    loaded = serving.with_postprocessing(loaded, spec, FLAGS.threshold)
  elif FLAGS.postprocessing == serving.AUTO and loaded.kind == "checkpoint":
    choice = serving.read_postprocessing_choice(
      serving.postprocessing_folder(serving.expand_model_paths(FLAGS.checkpoint))
    )
  recomputed = None
  if FLAGS.recompute_bn:
    recomputed, loaded = evaluation.recompute_batch_norm(
      loaded,
      data_dir or _resolve_data_dir(FLAGS.checkpoint),
      FLAGS.recompute_bn,
      FLAGS.batch_size,
      out_dir,
      seed=int(serving.find_run_config(loaded.source).get("seed", 42)),
    )
  report = evaluation.evaluate(
    loaded,
    data_dir=data_dir,
    split=FLAGS.split,
    raw_dir=FLAGS.raw_dir,
    layout=FLAGS.layout,
    on_error=FLAGS.on_error,
    threshold=FLAGS.threshold,
    batch_size=FLAGS.batch_size,
    progress=FLAGS.progress,
    choose_threshold=FLAGS.choose_threshold and valid_split is not None,
    boundary=_boundary_settings(),
    valid_split=valid_split or "valid",
  )
  report["postprocessing_choice"] = choice
  if recomputed:
    report["batch_norm_recomputed"] = recomputed
    report["notes"].append(
      f"BatchNorm statistics recomputed over {recomputed['images']} training images "
      f"before scoring; the model with them is in {recomputed['checkpoint']}"
    )
  paths = evaluation.write_report(report, out_dir)
  print(evaluation.format_markdown(report))
  print(
    f"Wrote {paths[evaluation.METRICS_JSON]}, {paths[evaluation.METRICS_MD]} and "
    f"{paths[evaluation.PER_IMAGE_CSV]}"
  )
  return 0


def run() -> None:
  """The program: defines the flags and runs `main` (console-script entry point)."""
  define_flags()
  cli.run(main, program=PROGRAM, help_groups=HELP_GROUPS, summary=cli.docstring_summary(__doc__))


if __name__ == "__main__":
  run()
