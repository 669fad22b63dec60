"""Checkpoint -> verified SavedModel, atomically (what `python -m dunet.export` runs).

The SavedModel's root is a `dunet.serving.Segmenter` (what `dunet.serving.load_segmenter`, and so
evaluate and predict, read back), with two signatures:

  serving_default  uint8 [B, h, w, 3] RGB of any size -> {"probability", "probability_head1"},
                   float32 [B, h, w, 1]: resized to the model size inside, preprocessed,
                   segmented, resized back.
  model_size       uint8 [B, H, W, 3] at exactly the model size -> the same outputs, with no
                   resizing and no control flow: the graph dunet/deploy/onnx.py converts.

Everything is written into a hidden temporary folder next to the output, reloaded there and
compared with the in-memory model on deterministic pictures (at the model size and at two other
sizes, one shrunk and one enlarged), and only then renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from dunet import fileio
from dunet import postprocess
from dunet import serving
from dunet.data import demo
from dunet.errors import ConfigError
from dunet.errors import ExportError

EXPORT_INFO_FILENAME = "dunet_export.json"
# Reloading a SavedModel runs the same graph on the same weights: anything above float32 rounding
# noise means the export is not the model.
DEFAULT_TOLERANCE = 1e-5
# Pictures compared per size, and the seed that makes them the same on every run.
PARITY_PICTURES = 2
PARITY_SEED = 1234


@dataclasses.dataclass
class ExportSummary:
  """What `export_saved_model` wrote and measured.

  Attributes:
    out_dir: the SavedModel folder.
    source: the checkpoint prefix exported.
    height, width: the model's input size.
    preprocessing: the preprocessing inside the signatures.
    parity: for each "signature HxW", the largest absolute difference between the reloaded
      SavedModel and the in-memory model over both outputs.
    tolerance: the largest difference allowed.
    info: the contents of dunet_export.json.
  """

  out_dir: str
  source: str
  height: int
  width: int
  preprocessing: str
  parity: Dict[str, float]
  tolerance: float
  info: Dict[str, object]


def parity_pictures(count: int, height: int, width: int, seed: int = PARITY_SEED) -> np.ndarray:
  """Deterministic polyp-like uint8 RGB pictures (the synthetic demo set's drawing).

  Pictures with structure (not white noise) give the network something to respond to, so the
  comparison covers confident and uncertain pixels alike.

  Args:
    count: how many.
    height, width: their size.
    seed: the same seed gives the same pictures.

  Returns:
    uint8 [count, height, width, 3].
  """
  return np.stack([demo.draw_example(seed, index, height, width)[0] for index in range(count)])


def parity_sizes(height: int, width: int) -> List[Tuple[int, int]]:
  """The sizes the export is checked at: the model size, a larger and a smaller odd size.

  The larger one is shrunk with area interpolation inside `serve`, the smaller one enlarged
  bilinearly, so both resize paths (and the identity) are covered.
  """
  return [
    (height, width),
    (height + height // 2 + 3, width + width // 4 + 5),
    (max(16, height // 2 + 1), max(16, width * 3 // 4 - 1)),
  ]


def max_abs_difference(first: Dict[str, tf.Tensor], second: Dict[str, tf.Tensor]) -> float:
  """The largest |a - b| over the outputs both dicts share (and they must share all)."""
  if set(first) != set(second):
    raise ExportError(f"outputs differ: {sorted(first)} vs {sorted(second)}")
  return max(
    float(np.max(np.abs(np.asarray(first[key]) - np.asarray(second[key])))) for key in first
  )


def export_saved_model(
  checkpoint: str,
  out_dir: str,
  *,
  prefer: str = "best",
  height: Optional[int] = None,
  width: Optional[int] = None,
  preprocessing: Optional[str] = None,
  overwrite: bool = False,
  tolerance: float = DEFAULT_TOLERANCE,
  flips: Sequence[str] = (),
  tile_overlap: Union[None, float, str] = None,
  postprocessing: Union[None, str, postprocess.PostProcessing] = None,
  threshold: Optional[float] = None,
) -> ExportSummary:
  """Exports a checkpoint (or an ensemble of checkpoints) as a verified SavedModel, atomically.

  Args:
    checkpoint: a training workdir, a converted Keras workdir (dunet-convert-keras) or a
      checkpoint prefix such as `run/best/ckpt-12`; several (comma-separated, or glob patterns
      such as `runs/cv/fold_*`) export one SavedModel that averages their probabilities.
    out_dir: the SavedModel folder to create (a local path).
    prefer: "best" or "latest" checkpoint of a workdir.
    height, width: the model input size; default: the run's config.json.
    preprocessing: default: the run's config.json.
    overwrite: replace an existing `out_dir`.
    tolerance: the largest absolute difference allowed between the reloaded SavedModel and the
      in-memory model.
    flips, tile_overlap, postprocessing, threshold: built into `serving_default`, as
      `dunet.serving.load_segmenter` takes them (post-processing: "auto" = the choice kept
      with the run); the `model_size` signature has the flips but no post-processing.

  Returns:
    An ExportSummary.

  Raises:
    dunet.errors.CheckpointNotFoundError: no checkpoint at `checkpoint` (the message names it).
    dunet.errors.OutputExistsError: `out_dir` exists and `overwrite` is False.
    ExportError: `checkpoint` is already a SavedModel, or the reloaded SavedModel differs from the
      model by more than `tolerance` (nothing is left at `out_dir` then).
    ConfigError: no input size known, a size not divisible by 16, a negative tolerance.
  """
  if tolerance < 0:
    raise ConfigError(f"tolerance must be >= 0, got {tolerance}")
  out_dir = os.path.abspath(out_dir)
  fileio.check_out_dir(out_dir, overwrite)  # before the slow part
  for member in serving.expand_model_paths(checkpoint):
    if serving.is_saved_model(member):
      raise ExportError(
        f"{member} is already a SavedModel; pass the training workdir or checkpoint it came from"
      )
  loaded = serving.load_segmenter(
    checkpoint,
    prefer=prefer,
    height=height,
    width=width,
    preprocessing=preprocessing,
    flips=flips,
    tile_overlap=tile_overlap,
    postprocessing=postprocessing,
    threshold=threshold,
  )
  segmenter = loaded.module
  with fileio.staged_directory(out_dir, overwrite, purpose="export") as staging:
    tf.saved_model.save(segmenter, staging, signatures=segmenter.signatures())
    parity = verify_saved_model(staging, segmenter)
    info = {
      "source_checkpoint": ",".join(os.path.abspath(path) for path in loaded.sources),
      "members": [os.path.abspath(path) for path in loaded.sources],
      "inference": loaded.settings,
      "height": loaded.height,
      "width": loaded.width,
      "preprocessing": loaded.preprocessing,
      "signatures": {
        serving.SERVING_SIGNATURE: "uint8 [B, h, w, 3] any size -> probabilities at h x w",
        serving.MODEL_SIZE_SIGNATURE: (
          f"uint8 [B, {loaded.height}, {loaded.width}, 3] -> "
          "probabilities, no resizing (ONNX/TensorRT)"
        ),
      },
      "outputs": list(serving.OUTPUT_NAMES),
      "tensorflow_version": tf.__version__,
      "parity_max_abs_difference": parity,
      "parity_tolerance": tolerance,
    }
    worst = max(parity.values())
    if not worst <= tolerance:  # also catches NaN
      raise ExportError(
        f"the reloaded SavedModel differs from the model by {worst:.3g} (> tolerance "
        f"{tolerance:.3g}): {json.dumps(parity)}; nothing was written to {out_dir}"
      )
    with open(os.path.join(staging, EXPORT_INFO_FILENAME), "w") as handle:
      json.dump(info, handle, indent=2, sort_keys=True)
  return ExportSummary(
    out_dir=out_dir,
    source=loaded.source,
    height=loaded.height,
    width=loaded.width,
    preprocessing=loaded.preprocessing,
    parity=parity,
    tolerance=tolerance,
    info=info,
  )


def verify_saved_model(
  path: str, segmenter: serving.Segmenter, count: int = PARITY_PICTURES
) -> Dict[str, float]:
  """Reloads the SavedModel at `path` and compares it with `segmenter`.

  Both signatures (looked up by key, as a serving system would) are compared at every size of
  `parity_sizes` (the model-size signature only at the model size), on `parity_pictures`.

  Args:
    path: the SavedModel folder.
    segmenter: the in-memory Segmenter it was saved from.
    count: pictures per size.

  Returns:
    {"SIGNATURE HxW": largest absolute difference over both outputs}.

  Raises:
    ExportError: a signature or output is missing.
  """
  reloaded = tf.saved_model.load(path)
  missing = [
    key
    for key in (serving.SERVING_SIGNATURE, serving.MODEL_SIZE_SIGNATURE)
    if key not in reloaded.signatures
  ]
  if missing:
    raise ExportError(f"{path}: the reloaded SavedModel has no signature {missing}")
  parity: Dict[str, float] = {}
  for height, width in parity_sizes(segmenter.height, segmenter.width):
    pictures = parity_pictures(count, height, width)
    # Each signature against its in-memory function (model_size has no post-processing).
    functions = {serving.SERVING_SIGNATURE: segmenter.serve}
    if (height, width) == (segmenter.height, segmenter.width):
      functions[serving.MODEL_SIZE_SIGNATURE] = segmenter.serve_model_size
    for key, function in functions.items():
      expected = {name: value.numpy() for name, value in function(pictures).items()}
      got = reloaded.signatures[key](**{serving.IMAGES: tf.constant(pictures)})
      parity[f"{key} {height}x{width}"] = max_abs_difference(
        expected, {name: value.numpy() for name, value in got.items()}
      )
  return parity
