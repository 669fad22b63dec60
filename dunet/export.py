r"""Exports a trained DoubleU-Net as a SavedModel: `python -m dunet.export`.

The SavedModel's root is a `dunet.serving.Segmenter` (what `dunet.serving.load_segmenter`, and so
evaluate and predict, read back), with two signatures:

  serving_default  uint8 [B, h, w, 3] RGB of any size -> {"probability", "probability_head1"},
                   float32 [B, h, w, 1]: resized to the model size inside (as preparation
                   resized the training images), preprocessed, segmented, resized back.
  model_size       uint8 [B, H, W, 3] at exactly the model size -> the same outputs, with no
                   resizing and no control flow: the graph dunet-export-trt (dunet/export_trt.py)
                   converts to ONNX and TensorRT.

The export is atomic: everything is written into a hidden temporary folder next to --out_dir,
reloaded there and compared with the in-memory model on deterministic pictures (at the model size
and at two other sizes, one shrunk and one enlarged), and only then renamed to --out_dir. A failed
or interrupted export leaves no --out_dir behind (an existing one is kept, and replaced only with
--overwrite). `dunet_export.json` in the folder records the source checkpoint, the input size,
the preprocessing, the TensorFlow version and the parity numbers.

The checkpoint is found (and an existing --out_dir refused) before anything is loaded or
written. Exit status: 0 when the export was written and verified; 2 for a usage error; 1 when the
checkpoint is missing or a check failed. Errors are one line on stderr. The library is
dunet/deploy/saved_model.py.

Example:
  python -m dunet.export --checkpoint=runs/cvc --out_dir=exports/cvc
"""

from __future__ import annotations

if __name__ == "__main__":
  from dunet import cli

  cli.silence_startup()  # before TensorFlow is imported

from typing import Sequence  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from dunet import cli  # noqa: E402
from dunet import serving  # noqa: E402
from dunet.data import preprocess  # noqa: E402
from dunet.deploy import saved_model  # noqa: E402

FLAGS = flags.FLAGS
PROGRAM = "dunet-export"
HELP_GROUPS = (
  ("Model", ("checkpoint", "prefer", "height", "width", "preprocessing")),
  ("Inference built in", ("tta", "tta_flips", "tile_overlap", "postprocessing", "threshold")),
  ("Output", ("out_dir", "overwrite", "tolerance")),
)


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program: importing the module defines
  none)."""
  flags.DEFINE_string(
    "checkpoint",
    None,
    "What to export (required): a training workdir (its best checkpoint, or the latest with "
    "--prefer=latest), a workdir written by dunet-convert-keras, or a checkpoint prefix "
    "such as runs/cvc/best/ckpt-12. Several, comma-separated or as glob patterns "
    "(runs/cv/fold_*), export one SavedModel that averages their probabilities.",
  )
  flags.DEFINE_bool(
    "tta",
    False,
    "Build flip test-time augmentation (the flips in --tta_flips) into both signatures.",
  )
  flags.DEFINE_list(
    "tta_flips", list(serving.FLIPS), f"Flips for --tta, from {sorted(serving.FLIPS)}."
  )
  flags.DEFINE_string(
    "tile_overlap",
    serving.AUTO,
    "Tiled inference in serving_default: 'off', a window overlap in [0, 1), or 'auto' "
    "(tiled for runs trained on random crops). See dunet-evaluate --help.",
  )
  flags.DEFINE_string(
    "postprocessing",
    serving.AUTO,
    "Post-processing of head 2 in serving_default: 'auto' (the choice kept with the run), "
    "'none', 'largest' or 'min_size=N'. The model_size signature (ONNX/TensorRT) has none.",
  )
  flags.DEFINE_float(
    "threshold",
    None,
    "The threshold post-processing binarises at; default: the one recorded with the choice, "
    "else 0.5.",
    lower_bound=0.0,
    upper_bound=1.0,
  )
  flags.DEFINE_string(
    "out_dir",
    None,
    "The SavedModel folder to create (required). It must not "
    "exist (or be empty) unless --overwrite.",
  )
  flags.DEFINE_integer(
    "height",
    None,
    "Model input height (a multiple of 16); default: the "
    "run's config.json. Needed for runs that recorded none.",
  )
  flags.DEFINE_integer(
    "width", None, "Model input width (a multiple of 16); default: the run's config.json."
  )
  flags.DEFINE_enum(
    "preprocessing",
    None,
    list(preprocess.PREPROCESSING),
    "Preprocessing built into the signatures; default: the run's config.json "
    "(reference when it records none).",
  )
  flags.DEFINE_enum(
    "prefer",
    "best",
    ["best", "latest"],
    "Which checkpoint of a workdir: the best by validation DSC, or the latest training checkpoint.",
  )
  flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace an existing --out_dir (only once the new export has been verified).",
  )
  flags.DEFINE_float(
    "tolerance",
    saved_model.DEFAULT_TOLERANCE,
    "Largest absolute difference "
    "allowed between the reloaded SavedModel and the in-memory model "
    "(probabilities).",
    lower_bound=0.0,
  )


def main(argv: Sequence[str]) -> int:
  """Checks the flags, exports, and prints what was written and measured."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  missing = [name for name in ("checkpoint", "out_dir") if not getattr(FLAGS, name)]
  if missing:
    raise app.UsageError("required: " + ", ".join(f"--{name}" for name in missing))
  summary = saved_model.export_saved_model(
    FLAGS.checkpoint,
    FLAGS.out_dir,
    prefer=FLAGS.prefer,
    height=FLAGS.height,
    width=FLAGS.width,
    preprocessing=FLAGS.preprocessing,
    overwrite=FLAGS.overwrite,
    tolerance=FLAGS.tolerance,
    flips=tuple(FLAGS.tta_flips) if FLAGS.tta else (),
    tile_overlap=FLAGS.tile_overlap,
    postprocessing=FLAGS.postprocessing,
    threshold=FLAGS.threshold,
  )
  print(
    f"Exported {summary.source}\n"
    f"  to:            {summary.out_dir}\n"
    f"  input size:    {summary.height}x{summary.width} (any size accepted by "
    f"serving_default)\n"
    f"  preprocessing: {summary.preprocessing}\n"
    f"  inference:     {summary.info['inference']}\n"
    f"  signatures:    {serving.SERVING_SIGNATURE}, {serving.MODEL_SIZE_SIGNATURE}\n"
    f"  parity (max |reloaded - model|, tolerance {summary.tolerance:.1e}):"
  )
  for key, value in summary.parity.items():
    print(f"    {key:<28} {value:.3e}")
  return 0


def run() -> None:
  """The program: defines the flags and runs `main` (console-script entry point)."""
  define_flags()
  cli.run(main, program=PROGRAM, help_groups=HELP_GROUPS, summary=cli.docstring_summary(__doc__))


if __name__ == "__main__":
  run()
