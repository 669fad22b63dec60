"""A trained DoubleU-Net as a function of raw pictures: what evaluate, predict and export share.

`Segmenter` binds a DoubleUNet to what it was trained with (input size, preprocessing) so that
callers hand it uint8 RGB images of any size and get probability masks at that same size:

  uint8 [B, h, w, 3]
    -> resized to the model's H x W (area when shrinking, bilinear otherwise: what
       dunet/data/prepare.py did to the training images, so inputs look the same)
    -> preprocessed (dunet/data/preprocess.py: reference, unit or caffe)
    -> DoubleUNet in inference mode, its BatchNorms folded into the convolutions
       (dunet/folding.py) -> sigmoid
    -> bilinear back to h x w
  = {"probability": head 2 (the final mask), "probability_head1": head 1}, float32 [B, h, w, 1].

Its `serve` is a `tf.function` with a fixed input signature, so `tf.saved_model.save` exports it as
the serving signature unchanged (dunet/export.py). `load_segmenter` gives the same call for a
training workdir, a checkpoint prefix, a converted Keras workdir, or an exported SavedModel.

`serve_model_size` is the deployment form of the same computation: uint8 [B, H, W, 3] at exactly
the model's size -> the same two probabilities, with no resizing and no control flow (`serve`
needs `tf.cond` for its resizes), and the reference preprocessing's median computed with
comparisons and sums only (dunet.data.preprocess's `export_friendly` median) instead of
`tf.math.bincount`. That is the
graph ONNX exporters and TensorRT take (dunet/deploy/); at the model size it returns exactly
what `serve` returns.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet import fileio
from dunet import folding
from dunet import postprocess
from dunet import precision
from dunet import tiling
from dunet.errors import CheckpointError
from dunet.errors import CheckpointNotFoundError
from dunet.errors import CheckpointReadError
from dunet.errors import ConfigError
from dunet.data import preprocess
from dunet.models import DoubleUNet
from dunet.models.doubleunet import SIZE_DIVISOR

PROBABILITY = "probability"
PROBABILITY_HEAD1 = "probability_head1"
OUTPUT_NAMES = (PROBABILITY, PROBABILITY_HEAD1)
IMAGES = "images"
IMAGE_SPEC = tf.TensorSpec([None, None, None, 3], tf.uint8, name=IMAGES)
# SavedModel signature keys (dunet/export.py): any size in, and the model size only.
SERVING_SIGNATURE = "serving_default"
MODEL_SIZE_SIGNATURE = "model_size"
# The flips test-time augmentation can average over, as (flip height, flip width).
FLIPS = {"none": (False, False), "horizontal": (False, True), "vertical": (True, False)}
# The post-processing chosen on validation, kept beside a run's config.json (or in the folder a
# cross-validation's fold runs share).
POSTPROCESSING_FILENAME = "postprocessing.json"
AUTO = "auto"
# Tiled inference's default overlap between neighbouring windows (nnU-Net and MONAI use 0.5).
DEFAULT_TILE_OVERLAP = 0.5

ServeFunction = Callable[[tf.Tensor], Dict[str, tf.Tensor]]


def resize_images(images: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """uint8 [B, h, w, 3] -> float32 [B, height, width, 3] in [0, 255], as preparation resizes.

  Area interpolation when neither side grows, bilinear (half-pixel centres, as OpenCV's) when
  one does; the identity when the size already matches.
  """
  size = tf.shape(images)[1:3]
  target = tf.constant([height, width], tf.int32)
  pixels = tf.cast(images, tf.float32)

  def resize() -> tf.Tensor:
    shrinking = tf.reduce_all(size >= target)
    return tf.cond(
      shrinking,
      lambda: tf.image.resize(pixels, target, method="area"),
      lambda: tf.image.resize(pixels, target, method="bilinear"),
    )

  resized = tf.cond(tf.reduce_all(tf.equal(size, target)), lambda: pixels, resize)
  return tf.ensure_shape(resized, [None, height, width, 3])


def resize_probabilities(probabilities: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """float32 [B, H, W, C] -> [B, size[0], size[1], C], bilinear (identity at the same size)."""
  same = tf.reduce_all(tf.equal(tf.shape(probabilities)[1:3], size))
  return tf.cond(
    same, lambda: probabilities, lambda: tf.image.resize(probabilities, size, method="bilinear")
  )


class Segmenter(tf.Module):
  """uint8 RGB images of any size in, probability masks of the same size out.

  One model, or an ensemble of models trained at the same input size with the same
  preprocessing (their probabilities are averaged, head by head). Optionally with flip
  test-time augmentation, sliding-window (tiled) inference at the pictures' own resolution, and
  connected-component post-processing of head 2, all inside `serve`, so that an exported
  SavedModel computes exactly what evaluate and predict score.
  """

  def __init__(
    self,
    model: Union[DoubleUNet, Sequence[DoubleUNet]],
    height: int,
    width: int,
    preprocessing: str,
    name: str = "segmenter",
    *,
    flips: Sequence[str] = (),
    tile_overlap: Optional[float] = None,
    postprocessing: Optional[postprocess.PostProcessing] = None,
    threshold: float = 0.5,
    fold_batch_norm: bool = True,
  ):
    """Args:
      model: a (trained) DoubleUNet, or several (an ensemble); called in inference mode only.
        The Segmenter serves copies with their BatchNorms folded into the convolutions
        (dunet/folding.py), so changing `model` afterwards does not change what it serves.
      height: the model's input height (divisible by 16): what it was trained at.
      width: the model's input width (divisible by 16).
      preprocessing: one of dunet.data.preprocess.PREPROCESSING, as in training.
      name: the module name.
      flips: flip test-time augmentation inside `serve` (names from FLIPS); () for none.
      tile_overlap: None: resize each picture to the model size (the default, as the paper).
        A number in [0, 1): segment the picture at its own resolution by sliding windows of
        the model size overlapping by this fraction, Gaussian-weighted (dunet/tiling.py).
      postprocessing: applied to head 2 inside `serve` (dunet/postprocess.py); None: none.
      threshold: the foreground threshold the post-processing binarises at.
      fold_batch_norm: fold the BatchNorms (the same outputs to float32 rounding, fused
        convolution kernels, smaller exports); False serves the models as they are.

    Raises:
      ConfigError: a size not divisible by 16, an unknown preprocessing or flip, no model, a
        bad overlap or threshold.
    """
    super().__init__(name=name)
    check_size(height, width)
    if preprocessing not in preprocess.PREPROCESSING:
      raise ConfigError(
        f"unknown preprocessing {preprocessing!r}; expected one of {preprocess.PREPROCESSING}"
      )
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
      raise ConfigError("an ensemble needs at least one model")
    for flip in flips:
      if flip not in FLIPS:
        raise ConfigError(f"unknown flip {flip!r}; expected some of {sorted(FLIPS)}")
    if tile_overlap is not None and not 0.0 <= tile_overlap < 1.0:
      raise ConfigError(f"tile overlap must be in [0, 1), got {tile_overlap}")
    if not 0.0 <= threshold <= 1.0:
      raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
    if fold_batch_norm:
      models = [folding.fold_batch_norms(member) for member in models]
    # `model` is the first member under the name a single model's SavedModel has always used
    # (dunet/deploy/onnx.py restores it from there); `members` are all of them.
    self.model = models[0]
    self.members = models
    self.height, self.width, self.preprocessing = int(height), int(width), preprocessing
    self.flips = tuple(flips)
    self.tile_overlap = tile_overlap
    self.postprocessing = postprocessing or postprocess.PostProcessing.none()
    self.threshold = float(threshold)
    # Variables (not constants) so that a reloaded SavedModel still says what it expects and
    # what it does inside.
    self.input_size = tf.Variable(
      [self.height, self.width], dtype=tf.int32, trainable=False, name="input_size"
    )
    self.preprocessing_name = tf.Variable(
      preprocessing, dtype=tf.string, trainable=False, name="preprocessing"
    )
    self.inference_settings = tf.Variable(
      json.dumps(self.settings(), sort_keys=True), dtype=tf.string, trainable=False
    )
    # Built here because its input signature depends on the model size.
    self.serve_model_size = tf.function(
      self._segment_model_size,
      input_signature=[tf.TensorSpec([None, self.height, self.width, 3], tf.uint8, name=IMAGES)],
    )

  def settings(self) -> Dict[str, object]:
    """What `serve` does beside the plain model call (JSON-ready; kept in a SavedModel)."""
    return {
      "members": len(self.members),
      "flips": list(self.flips),
      "tile_overlap": self.tile_overlap,
      "postprocessing": self.postprocessing.to_string(),
      "threshold": self.threshold,
    }

  @tf.function(input_signature=[IMAGE_SPEC])
  def serve(self, images: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Segments a batch of same-size pictures.

    Args:
      images: uint8 [B, h, w, 3], RGB, any h and w.

    Returns:
      {"probability": head 2, "probability_head1": head 1}: float32 [B, h, w, 1] in [0, 1].
    """
    segment = self._segment_tiled if self.tile_overlap is not None else self._segment
    outputs = flip_tta(segment, images, self.flips) if self.flips else segment(images)
    if not self.postprocessing.is_none:
      outputs = dict(outputs)
      outputs[PROBABILITY] = postprocess.apply_tf(
        outputs[PROBABILITY], self.threshold, self.postprocessing
      )
    return outputs

  def __call__(self, images: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Same as `serve`."""
    return self.serve(images)

  def signatures(self) -> Dict[str, Callable[..., Dict[str, tf.Tensor]]]:
    """The SavedModel signatures: `serve` as "serving_default", `serve_model_size` as
    "model_size" (pass to `tf.saved_model.save(segmenter, path, signatures=...)`)."""
    return {
      SERVING_SIGNATURE: self.serve.get_concrete_function(),
      MODEL_SIZE_SIGNATURE: self.serve_model_size.get_concrete_function(),
    }

  def _members(self, inputs: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Preprocessed [B, H, W, 3] -> the members' mean probabilities of each head."""
    head2 = head1 = None
    for model in self.members:
      outputs = model(inputs, is_training=False).probabilities()
      head2 = outputs.logits2 if head2 is None else head2 + outputs.logits2
      head1 = outputs.logits1 if head1 is None else head1 + outputs.logits1
    if len(self.members) > 1:  # one model: its own values, bit for bit
      head2, head1 = head2 / len(self.members), head1 / len(self.members)
    return {PROBABILITY: head2, PROBABILITY_HEAD1: head1}

  def _segment_model_size(self, images: tf.Tensor) -> Dict[str, tf.Tensor]:
    """`serve_model_size`: uint8 [B, H, W, 3] at the model size -> float32 [B, H, W, 1] each.

    No resizing and no control flow, for ONNX and TensorRT: the members' mean, with the flips
    when there are any; no post-processing (its connected components need a loop that
    TensorRT does not take: apply dunet.postprocess.apply_numpy to its output instead).
    """

    def plain(pixels: tf.Tensor) -> Dict[str, tf.Tensor]:
      return self._members(preprocess.preprocess(pixels, self.preprocessing, export_friendly=True))

    return flip_tta(plain, images, self.flips) if self.flips else plain(images)

  def _segment(self, images: tf.Tensor) -> Dict[str, tf.Tensor]:
    original_size = tf.shape(images)[1:3]
    pixels = resize_images(images, self.height, self.width)
    outputs = self._members(preprocess.preprocess(pixels, self.preprocessing))
    return {key: resize_probabilities(value, original_size) for key, value in outputs.items()}

  def _segment_tiled(self, images: tf.Tensor) -> Dict[str, tf.Tensor]:
    # Each window is preprocessed on its own, as the training crops were.
    def window_fn(windows: tf.Tensor) -> Dict[str, tf.Tensor]:
      return self._members(preprocess.preprocess(windows, self.preprocessing))

    return tiling.sliding_window(
      window_fn,
      images,
      window=(self.height, self.width),
      overlap=self.tile_overlap,
    )


def check_size(height: int, width: int) -> None:
  """Checks a model input size.

  Raises:
    ConfigError: unless both are positive multiples of 16.
  """
  for name, value in (("height", height), ("width", width)):
    if value is None or value <= 0 or value % SIZE_DIVISOR:
      raise ConfigError(
        f"model input {name} must be a positive multiple of {SIZE_DIVISOR}, got {value}"
      )


@dataclasses.dataclass
class LoadedSegmenter:
  """What `load_segmenter` returns: the serve call and where it came from.

  Attributes:
    serve: uint8 [B, h, w, 3] -> {"probability", "probability_head1"} float32 [B, h, w, 1].
    height, width: the model's input size.
    preprocessing: the preprocessing it applies.
    kind: "checkpoint" or "saved_model".
    source: the checkpoint prefix or SavedModel folder read (for an ensemble: all prefixes,
      joined by commas).
    module: the Segmenter (checkpoints) or the loaded SavedModel object; it owns the variables
      `serve` reads, so keep it alive as long as `serve` is used.
    sources: every checkpoint prefix (one per ensemble member) or the SavedModel folder.
    settings: what `serve` does beside the plain model call (`Segmenter.settings`): members,
      flips, tile_overlap, postprocessing, threshold.
  """

  serve: ServeFunction
  height: int
  width: int
  preprocessing: str
  kind: str
  source: str
  module: tf.Module
  sources: Sequence[str] = ()
  settings: Dict[str, object] = dataclasses.field(default_factory=dict)


def is_saved_model(path: str) -> bool:
  """True when `path` is a SavedModel folder."""
  return tf.io.gfile.exists(os.path.join(path, "saved_model.pb"))


def expand_model_paths(paths: Union[str, Sequence[str]]) -> List[str]:
  """The model paths a --checkpoint value names: comma-separated entries, each a path or a
  glob pattern (`runs/cv/fold_*`: its matches, sorted).

  Raises:
    CheckpointNotFoundError: a pattern that matches nothing, or no entry at all.
  """
  entries = paths.split(",") if isinstance(paths, str) else list(paths)
  expanded: List[str] = []
  for entry in (entry.strip() for entry in entries):
    if not entry:
      continue
    if any(character in entry for character in "*?["):
      matches = sorted(glob.glob(entry))
      if not matches:
        raise CheckpointNotFoundError(f"no model matches {entry!r}")
      expanded.extend(matches)
    else:
      expanded.append(entry)
  if not expanded:
    raise CheckpointNotFoundError(f"no model path given in {paths!r}")
  return expanded


def resolve_model_source(path: str, prefer: str = "best") -> str:
  """What `load_segmenter(path)` would read, found without loading anything (a cheap check).

  Args:
    path: as for `load_segmenter`; several (comma-separated or globs) for an ensemble.
    prefer: "best" or "latest", for workdirs.

  Returns:
    The SavedModel folder, or the checkpoint prefix (for an ensemble: the prefixes, joined by
    commas).

  Raises:
    dunet.errors.CheckpointNotFoundError: nothing to load at `path` (the message names it).
    ConfigError: an ensemble that names a SavedModel.
  """
  paths = expand_model_paths(path)
  if len(paths) == 1 and is_saved_model(paths[0]):
    return paths[0]
  for member in paths:
    if len(paths) > 1 and is_saved_model(member):
      raise ConfigError(
        f"{member} is a SavedModel: an ensemble is built from checkpoints (export the "
        "ensemble with dunet-export --checkpoint=A,B,...)"
      )
  return ",".join(checkpoint_lib.resolve_checkpoint(member, prefer) for member in paths)


def find_run_config(path: str) -> Dict[str, object]:
  """The config.json of the run `path` belongs to (a workdir, its best/ or checkpoints/ folder,
  or a checkpoint prefix inside them); {} when there is none."""
  folder = find_run_folder(path)
  return checkpoint_lib.read_config(folder) if folder else {}


def find_run_folder(path: str) -> Optional[str]:
  """The folder holding the config.json of the run `path` belongs to; None when there is none."""
  candidates = [path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))]
  for folder in candidates:
    if folder and tf.io.gfile.exists(os.path.join(folder, checkpoint_lib.CONFIG_FILENAME)):
      return folder
  return None


def postprocessing_folder(paths: Sequence[str]) -> Optional[str]:
  """Where a model's chosen post-processing is kept (POSTPROCESSING_FILENAME): the run's folder
  for one model; for an ensemble, the folder its members' runs share (a cross-validation
  folder holding fold_0/, fold_1/, ...); None when there is no such folder."""
  folders = [find_run_folder(path) for path in paths]
  if not folders or any(folder is None for folder in folders):
    return None
  if len(folders) == 1:
    return folders[0]
  parents = {os.path.dirname(os.path.normpath(folder)) for folder in folders}
  return parents.pop() if len(parents) == 1 else None


def read_postprocessing_choice(folder: Optional[str]) -> Optional[Dict[str, object]]:
  """The post-processing record chosen on validation and kept in `folder`; None if there is none.

  Raises:
    CheckpointReadError: the file exists but is not a post-processing record (names it).
  """
  if not folder:
    return None
  path = os.path.join(folder, POSTPROCESSING_FILENAME)
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as handle:
      record = json.load(handle)
    postprocess.PostProcessing.from_string(record["choice"])
    float(record["threshold"])
  except (ValueError, KeyError, TypeError, ConfigError) as error:
    raise CheckpointReadError(
      f"{path}: not a post-processing record ({error}); remove it or choose again with "
      "dunet-evaluate --choose_postprocessing"
    ) from error
  return record


def write_postprocessing_choice(folder: str, record: Dict[str, object]) -> str:
  """Keeps a post-processing record (from dunet.postprocess.choose_postprocessing) in `folder`,
  atomically; returns the file's path."""
  path = os.path.join(folder, POSTPROCESSING_FILENAME)
  fileio.write_json_atomic(path, record, indent=1, sort_keys=False)
  return path


def with_postprocessing(
  loaded: LoadedSegmenter, spec: postprocess.PostProcessing, threshold: float
) -> LoadedSegmenter:
  """The same checkpoint model(s), flips and tiling, with another post-processing.

  Raises:
    ConfigError: a SavedModel (its post-processing is fixed at export).
  """
  if loaded.kind != "checkpoint":
    raise ConfigError(
      f"{loaded.source} is a SavedModel: its post-processing was fixed at export "
      "(choose it on the checkpoints, then export)"
    )
  return _rebuilt(loaded, loaded.module.members, spec, threshold)


def with_models(loaded: LoadedSegmenter, models: Sequence[tf.Module]) -> LoadedSegmenter:
  """The same flips, tiling and post-processing around other models of the same input size
  (e.g. the loaded ones with recomputed BatchNorm statistics)."""
  old = loaded.module
  return _rebuilt(loaded, models, old.postprocessing, old.threshold)


def _rebuilt(
  loaded: LoadedSegmenter,
  models: Sequence[tf.Module],
  spec: postprocess.PostProcessing,
  threshold: float,
) -> LoadedSegmenter:
  old = loaded.module
  segmenter = Segmenter(
    list(models) if len(models) > 1 else models[0],
    old.height,
    old.width,
    old.preprocessing,
    flips=old.flips,
    tile_overlap=old.tile_overlap,
    postprocessing=spec,
    threshold=threshold,
  )
  return dataclasses.replace(
    loaded, serve=segmenter.serve, module=segmenter, settings=segmenter.settings()
  )


def _postprocessing_for(
  requested: Union[None, str, postprocess.PostProcessing], paths: Sequence[str]
) -> Tuple[postprocess.PostProcessing, Optional[float]]:
  """(spec, threshold recorded with the choice or None) for a `postprocessing` argument."""
  if isinstance(requested, postprocess.PostProcessing):
    return requested, None
  if requested in (None, "", AUTO):
    record = read_postprocessing_choice(postprocessing_folder(paths))
    if record is None:
      return postprocess.PostProcessing.none(), None
    return postprocess.PostProcessing.from_string(str(record["choice"])), float(record["threshold"])
  return postprocess.PostProcessing.from_string(str(requested)), None


def load_segmenter(
  path: Union[str, Sequence[str]],
  *,
  prefer: str = "best",
  height: Optional[int] = None,
  width: Optional[int] = None,
  preprocessing: Optional[str] = None,
  precision_name: Optional[str] = None,
  flips: Sequence[str] = (),
  tile_overlap: Union[None, float, str] = None,
  postprocessing: Union[None, str, postprocess.PostProcessing] = None,
  threshold: Optional[float] = None,
) -> LoadedSegmenter:
  """A Segmenter from a workdir, checkpoint prefix or exported SavedModel, or an ensemble.

  Args:
    path: a training workdir (its best checkpoint unless `prefer="latest"`), a converted Keras
      workdir (dunet-convert-keras), a checkpoint prefix such as `run/best/ckpt-12`, or a
      SavedModel folder written by dunet/export.py. Several checkpoints (a list, or a string of
      comma-separated paths and glob patterns such as `runs/cv/fold_*`) make an ensemble that
      averages their probabilities; they must share input size and preprocessing.
    prefer: "best" or "latest", for workdirs.
    height, width: the model input size; default: the run's config.json. Needed when the run
      recorded none (a converted Keras file without an input shape). Ignored for SavedModels,
      which carry theirs (a different value is an error).
    preprocessing: default: the run's config.json ("reference" when it has none).
    precision_name: compute precision ("float32", "mixed_float16", "mixed_bfloat16", "auto");
      default: float32, whatever the run trained with (inference needs no loss scaling, and
      float32 gives the scores the paper's table compares).
    flips: flip test-time augmentation (names from FLIPS); () for none. For a SavedModel it is
      applied around its serve function.
    tile_overlap: None or "off": resize pictures to the model size; a float in [0, 1): tiled
      inference with that overlap; "auto": tiled (overlap DEFAULT_TILE_OVERLAP) when the run
      trained on random crops (its config.json records crop_height), resized otherwise.
    postprocessing: None or "auto": the choice kept with the run (POSTPROCESSING_FILENAME, see
      `read_postprocessing_choice`), none when there is none; "none", "largest",
      "min_size=N" or a PostProcessing: that.
    threshold: the threshold post-processing binarises at; default: the one recorded with the
      choice, else 0.5.

  Returns:
    A LoadedSegmenter.

  Raises:
    dunet.checkpoint.CheckpointNotFoundError: nothing to load at `path`.
    ConfigError: no input size known, a size not divisible by 16, a SavedModel that
      disagrees with the given size or preprocessing or is asked for tiling or
      post-processing (fixed at export), ensemble members that disagree.
    dunet.errors.CheckpointError: a SavedModel dunet did not export, or a checkpoint of another
      model.
  """
  paths = expand_model_paths(path)
  if len(paths) == 1 and is_saved_model(paths[0]):
    return _load_saved_model(
      paths[0], height, width, preprocessing, flips, tile_overlap, postprocessing
    )
  prefixes = resolve_model_source(",".join(paths), prefer).split(",")
  configs = [find_run_config(p if tf.io.gfile.isdir(p) else q) for p, q in zip(paths, prefixes)]
  height = height or configs[0].get("height")
  width = width or configs[0].get("width")
  if not height or not width:
    raise ConfigError(
      f"{paths[0]}: the run's config.json records no input size; pass the size the "
      "model was trained at (e.g. --height=288 --width=384)"
    )
  preprocessing = preprocessing or configs[0].get("preprocessing") or "reference"
  _check_members_agree(paths, configs, int(height), int(width), preprocessing)
  spec, recorded_threshold = _postprocessing_for(postprocessing, paths)
  policy = precision.Policy(precision.resolve_policy_name(precision_name or "float32"))
  models = []
  for prefix in prefixes:
    model = DoubleUNet(compute_dtype=policy.compute_dtype)
    checkpoint_lib.restore_model(model, prefix, prefer)
    models.append(model)
  segmenter = Segmenter(
    models if len(models) > 1 else models[0],
    int(height),
    int(width),
    preprocessing,
    flips=tuple(flips),
    tile_overlap=_tile_overlap_for(tile_overlap, configs[0]),
    postprocessing=spec,
    threshold=threshold if threshold is not None else (recorded_threshold or 0.5),
  )
  return LoadedSegmenter(
    serve=segmenter.serve,
    height=segmenter.height,
    width=segmenter.width,
    preprocessing=preprocessing,
    kind="checkpoint",
    source=",".join(prefixes),
    module=segmenter,
    sources=tuple(prefixes),
    settings=segmenter.settings(),
  )


def _tile_overlap_for(requested: Union[None, float, str], config: Dict[str, object]):
  if requested is None or requested == "off":
    return None
  if requested == AUTO:
    return DEFAULT_TILE_OVERLAP if config.get("crop_height") else None
  try:
    return float(requested)
  except ValueError:
    raise ConfigError(
      f"tile overlap must be 'auto', 'off' or a number in [0, 1), got {requested!r}"
    ) from None


def _check_members_agree(
  paths: Sequence[str],
  configs: Sequence[Dict[str, object]],
  height: int,
  width: int,
  preprocessing: str,
) -> None:
  for path, config in zip(paths[1:], configs[1:]):
    for name, expected in (("height", height), ("width", width), ("preprocessing", preprocessing)):
      value = config.get(name)
      if value is not None and value != expected:
        raise ConfigError(
          f"ensemble members disagree: {path} was trained with {name} {value!r}, "
          f"{paths[0]} with {expected!r} (an ensemble averages models of one input size "
          "and preprocessing)"
        )


def _load_saved_model(
  path: str,
  height: Optional[int],
  width: Optional[int],
  preprocessing: Optional[str],
  flips: Sequence[str],
  tile_overlap: Union[None, float, str],
  postprocessing: Union[None, str, postprocess.PostProcessing],
) -> LoadedSegmenter:
  loaded = tf.saved_model.load(path)
  if not hasattr(loaded, "serve") or not hasattr(loaded, "input_size"):
    raise CheckpointError(
      f"{path} is a SavedModel but not one dunet exported (no serve function "
      "or input_size); export it with `python -m dunet.export`"
    )
  saved_height, saved_width = (int(v) for v in loaded.input_size.numpy())
  saved_preprocessing = loaded.preprocessing_name.numpy().decode()
  for name, given, saved in (
    ("height", height, saved_height),
    ("width", width, saved_width),
    ("preprocessing", preprocessing, saved_preprocessing),
  ):
    if given and given != saved:
      raise ConfigError(f"{path} was exported with {name} {saved!r}, not {given!r}")
  settings = (
    json.loads(loaded.inference_settings.numpy().decode())
    if hasattr(loaded, "inference_settings")
    else {"members": 1, "flips": [], "tile_overlap": None, "postprocessing": "none"}
  )
  fixed = [
    name
    for name, asked in (
      ("tiling", tile_overlap not in (None, "off", AUTO)),
      ("post-processing", postprocessing not in (None, "", AUTO)),
    )
    if asked
  ]
  if fixed:
    raise ConfigError(
      f"{path} is a SavedModel: its {' and '.join(fixed)} was fixed at export "
      f"({json.dumps(settings, sort_keys=True)}); export again with the setting you want"
    )
  serve = loaded.serve
  if flips:
    if settings.get("flips"):
      raise ConfigError(f"{path} already averages flips {settings['flips']} inside (no --tta)")

    def serve(images: tf.Tensor, _serve=loaded.serve) -> Dict[str, tf.Tensor]:
      return flip_tta(_serve, images, tuple(flips))

    settings = dict(settings, flips=list(flips))
  return LoadedSegmenter(
    serve=serve,
    height=saved_height,
    width=saved_width,
    preprocessing=saved_preprocessing,
    kind="saved_model",
    source=path,
    module=loaded,
    sources=(path,),
    settings=settings,
  )


def flip_tta(
  serve: ServeFunction, images: tf.Tensor, flips: Sequence[str] = ("none", "horizontal", "vertical")
) -> Dict[str, tf.Tensor]:
  """Test-time augmentation: the mean of `serve` over flipped copies, each flipped back.

  Args:
    serve: a Segmenter's (or LoadedSegmenter's) serve function.
    images: uint8 [B, h, w, 3].
    flips: names from FLIPS; ("none",) is plain inference.

  Returns:
    The same keys as `serve`, averaged.

  Raises:
    ConfigError: no flips, or an unknown one.
  """
  if not flips:
    raise ConfigError("flips must name at least one of " + ", ".join(FLIPS))
  total: Dict[str, tf.Tensor] = {}
  for flip in flips:
    if flip not in FLIPS:
      raise ConfigError(f"unknown flip {flip!r}; expected one of {sorted(FLIPS)}")
    axes = [axis for axis, on in zip((1, 2), FLIPS[flip]) if on]
    flipped = tf.reverse(images, axes) if axes else images
    for key, value in serve(flipped).items():
      value = tf.reverse(value, axes) if axes else value
      total[key] = value if key not in total else total[key] + value
  return {key: value / len(flips) for key, value in total.items()}
