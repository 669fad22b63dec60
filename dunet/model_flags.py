"""The flags that choose and run a trained model, shared by dunet.predict and dunet.evaluate.

For command-line modules only: library code takes these settings as arguments and never reads
flags. Each program defines them (and its own) when it runs, so that importing both modules (as
tests do) defines nothing twice.
"""

from __future__ import annotations

from typing import List

from absl import flags

from dunet import precision
from dunet import serving

# The --help groups these flags form in each program.
MODEL_FLAGS = ("checkpoint", "prefer", "height", "width", "precision")
INFERENCE_FLAGS = ("tta", "tta_flips", "progress")


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
    "RUN/best/ckpt-12, or a SavedModel folder from dunet.export.",
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
  flags.DEFINE_bool("progress", True, "Show a progress line on stderr.", **fv)
  return ["checkpoint", "prefer", "tta", "tta_flips", "height", "width", "precision", "progress"]
