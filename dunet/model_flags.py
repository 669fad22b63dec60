"""The flags that choose and run a trained model, shared by dunet.predict and dunet.evaluate.

For command-line modules only: library code takes these settings as arguments and never reads
flags. Each program defines them (and its own) when it runs, so that importing both modules (as
tests do) defines nothing twice.
"""

from __future__ import annotations

from typing import Any, Dict, List

from absl import flags

from dunet import precision
from dunet import serving

# The --help groups these flags form in each program.
MODEL_FLAGS = ("checkpoint", "prefer", "height", "width", "precision")
INFERENCE_FLAGS = ("tta", "tta_flips", "tile_overlap", "postprocessing", "progress")


def define_model_flags(flag_values: flags.FlagValues) -> List[str]:
  """Defines the flags that choose and run the model: --checkpoint, --prefer, --tta,
  --tta_flips, --height, --width, --precision and --progress.

  Args:
    flag_values: where to define them (absl's global FLAGS in the programs).

  Returns:
    Their names, for the programs' --help groups.
  """
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string(
    "checkpoint",
    None,
    "The model (required): a training workdir (see "
    "--prefer), a converted Keras workdir, a checkpoint prefix such as "
    "RUN/best/ckpt-12, or a SavedModel folder from dunet.export. Several checkpoints, "
    "comma-separated or as glob patterns (runs/cv/fold_*), make an ensemble that averages "
    "their probabilities (same input size and preprocessing).",
    **fv,
  )
  flags.DEFINE_enum(
    "prefer",
    "best",
    ["best", "latest"],
    "For workdirs: the best-by-validation "
    "checkpoint or the latest training checkpoint (falling back to the other).",
    **fv,
  )
  flags.DEFINE_bool(
    "tta",
    False,
    "Flip test-time augmentation: the mean probability over the "
    "flips in --tta_flips (each flipped back); one model call per flip.",
    **fv,
  )
  flags.DEFINE_list(
    "tta_flips",
    list(serving.FLIPS),
    f"Flips averaged with --tta, from {sorted(serving.FLIPS)}.",
    **fv,
  )
  flags.DEFINE_integer(
    "height",
    0,
    "Model input height, for runs whose config.json records "
    "none (converted Keras files); 0: from the run.",
    lower_bound=0,
    **fv,
  )
  flags.DEFINE_integer("width", 0, "Model input width, as --height.", lower_bound=0, **fv)
  flags.DEFINE_enum(
    "precision",
    "float32",
    [*precision.POLICY_NAMES, precision.AUTO],
    "Compute precision for checkpoints (SavedModels keep the one they were "
    "exported with); float32 by default, whatever the run trained with.",
    **fv,
  )
  flags.DEFINE_string(
    "tile_overlap",
    serving.AUTO,
    "Tiled inference: 'off' resizes each picture to the model size (as the paper); a number "
    "in [0, 1) segments it at its own resolution by sliding windows of the model size that "
    "overlap by that fraction, Gaussian-weighted; 'auto': tiled (overlap "
    f"{serving.DEFAULT_TILE_OVERLAP}) for runs trained on random crops (--crop_height), off "
    "otherwise. SavedModels keep what they were exported with.",
    **fv,
  )
  flags.DEFINE_string(
    "postprocessing",
    serving.AUTO,
    "Connected components of head 2's mask: 'auto' = the choice kept with the run "
    f"({serving.POSTPROCESSING_FILENAME}, made on validation by dunet-evaluate "
    "--choose_postprocessing or dunet-cross-validate; none if there is none), 'none', "
    "'largest' (keep the largest component) or 'min_size=N' (drop components under N "
    "pixels). SavedModels keep what they were exported with.",
    **fv,
  )
  flags.DEFINE_bool("progress", True, "Show a progress line on stderr.", **fv)
  return [
    "checkpoint",
    "prefer",
    "tta",
    "tta_flips",
    "tile_overlap",
    "postprocessing",
    "height",
    "width",
    "precision",
    "progress",
  ]


def load_arguments(flag_values: flags.FlagValues) -> Dict[str, Any]:
  """The keyword arguments of `dunet.serving.load_segmenter` that these flags give (all but
  the path)."""
  return dict(
    prefer=flag_values.prefer,
    height=flag_values.height or None,
    width=flag_values.width or None,
    precision_name=flag_values.precision,
    flips=tuple(flag_values.tta_flips) if flag_values.tta else (),
    tile_overlap=flag_values.tile_overlap,
    postprocessing=flag_values.postprocessing,
  )
