r"""Converts DoubleU-Net weights trained with the authors' Keras code into a dunet workdir.

Reads the `model.h5` that the reference training script's ModelCheckpoint saves (Keras 2 or
Keras 3 legacy HDF5, full model or weights only) with h5py (Keras is not needed), checks every
layer against dunet's DoubleUNet, and writes

  <out_dir>/best/ckpt-1.*   the model (restore with dunet.checkpoint.restore_model)
  <out_dir>/config.json     "preprocessing": "reference" (cv2 BGR / 255, as the authors fed it)
                            and the source file

so that evaluate, predict and export take `<out_dir>` as their workdir. The checkpoint is
verified by reloading before the folder appears. `python tools/convert_keras_h5.py` and
`python -m dunet.convert_keras` are the same command.

Example:
  dunet-convert-keras --keras_h5=files/model.h5 --out_dir=runs/cvc_reference
"""

from __future__ import annotations

if __name__ == "__main__":  # before TensorFlow is imported: its start-up noise
  from dunet import cli as _cli

  _cli.silence_startup()

import os

from absl import app
from absl import flags

from dunet import cli
from dunet import keras_h5

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "keras_h5",
  None,
  "The Keras HDF5 file of the reference DoubleU-Net: the model.h5 its ModelCheckpoint saved "
  "(model.save('x.h5') in Keras 2 or 3), or a model.save_weights('x.h5') file.",
)
flags.DEFINE_string(
  "out_dir",
  None,
  "The dunet workdir to create (local path). It must not exist or be empty unless --overwrite.",
)
flags.DEFINE_bool("overwrite", False, "Replace --out_dir if it already exists.")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.keras_h5 or not FLAGS.out_dir:
    raise app.UsageError("both --keras_h5 and --out_dir are required")
  if not os.path.isfile(FLAGS.keras_h5):
    raise app.UsageError(f"--keras_h5={FLAGS.keras_h5}: no such file")
  summary = keras_h5.convert_keras_h5(FLAGS.keras_h5, FLAGS.out_dir, overwrite=FLAGS.overwrite)
  moving = summary.scalars - summary.trainable_scalars
  print(
    f"Converted {FLAGS.keras_h5}\n"
    f"  Keras layers mapped: {summary.keras_layers}\n"
    f"  dunet variables:     {summary.variables}\n"
    f"  scalars:             {summary.scalars:,} ({summary.trainable_scalars:,} trainable + "
    f"{moving:,} BatchNorm moving statistics)\n"
    f"  keras version:       {summary.config['source']['keras_version']}\n"
    f"  checkpoint:          {summary.checkpoint_prefix} (verified by reloading)\n"
    f"  preprocessing:       {summary.config['preprocessing']}\n"
    f"Use {summary.out_dir} as the workdir for evaluate, predict and export."
  )
  return 0


HELP_GROUPS = (("Conversion", ("keras_h5", "out_dir", "overwrite")),)


def run() -> None:
  """The program (console-script entry point `dunet-convert-keras`)."""
  cli.run(
    main,
    program="dunet-convert-keras",
    help_groups=HELP_GROUPS,
    summary=cli.docstring_summary(__doc__),
  )


if __name__ == "__main__":
  run()
