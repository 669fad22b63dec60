"""A trained DoubleU-Net as a function of raw pictures: what evaluate, predict and export share.

`Segmenter` binds a DoubleUNet to what it was trained with (input size, preprocessing) so that
callers hand it uint8 RGB images of any size and get probability masks at that same size:

  uint8 [B, h, w, 3]
    -> resized to the model's H x W (area when shrinking, bilinear otherwise: what
       dunet/data/prepare.py did to the training images, so inputs look the same)
    -> preprocessed (dunet/data/preprocess.py: reference, unit or caffe)
    -> DoubleUNet in inference mode -> sigmoid
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
import os
from typing import Callable, Dict, Optional, Sequence

import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet import precision
from dunet.errors import CheckpointError
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
  """uint8 RGB images of any size in, probability masks of the same size out."""

  def __init__(
    self, model: DoubleUNet, height: int, width: int, preprocessing: str, name: str = "segmenter"
  ):
    """Args:
      model: a (trained) DoubleUNet; it is called in inference mode only.
      height: the model's input height (divisible by 16): what it was trained at.
      width: the model's input width (divisible by 16).
      preprocessing: one of dunet.data.preprocess.PREPROCESSING, as in training.

    Raises:
      ConfigError: a size not divisible by 16 or an unknown preprocessing.
    """
    super().__init__(name=name)
    check_size(height, width)
    if preprocessing not in preprocess.PREPROCESSING:
      raise ConfigError(
        f"unknown preprocessing {preprocessing!r}; expected one of {preprocess.PREPROCESSING}"
      )
    self.model = model
    self.height, self.width, self.preprocessing = int(height), int(width), preprocessing
    # Variables (not constants) so that a reloaded SavedModel still says what it expects.
    self.input_size = tf.Variable(
      [self.height, self.width], dtype=tf.int32, trainable=False, name="input_size"
    )
    self.preprocessing_name = tf.Variable(
      preprocessing, dtype=tf.string, trainable=False, name="preprocessing"
    )
    # Built here because its input signature depends on the model size.
    self.serve_model_size = tf.function(
      self._segment_model_size,
      input_signature=[tf.TensorSpec([None, self.height, self.width, 3], tf.uint8, name=IMAGES)],
    )

  @tf.function(input_signature=[IMAGE_SPEC])
  def serve(self, images: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Segments a batch of same-size pictures.

    Args:
      images: uint8 [B, h, w, 3], RGB, any h and w.

    Returns:
      {"probability": head 2, "probability_head1": head 1}: float32 [B, h, w, 1] in [0, 1].
    """
    return self._segment(images)

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

  def _segment_model_size(self, images: tf.Tensor) -> Dict[str, tf.Tensor]:
    """`serve_model_size`: uint8 [B, H, W, 3] at the model size -> float32 [B, H, W, 1] each.

    No resizing and no control flow, for ONNX and TensorRT. At the model size `serve` computes
    the same values (its resizes are identities there).
    """
    inputs = preprocess.preprocess(images, self.preprocessing, export_friendly=True)
    outputs = self.model(inputs, is_training=False).probabilities()
    return {PROBABILITY: outputs.logits2, PROBABILITY_HEAD1: outputs.logits1}

  def _segment(self, images: tf.Tensor) -> Dict[str, tf.Tensor]:
    original_size = tf.shape(images)[1:3]
    pixels = resize_images(images, self.height, self.width)
    outputs = self.model(
      preprocess.preprocess(pixels, self.preprocessing), is_training=False
    ).probabilities()
    return {
      PROBABILITY: resize_probabilities(outputs.logits2, original_size),
      PROBABILITY_HEAD1: resize_probabilities(outputs.logits1, original_size),
    }


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
    source: the checkpoint prefix or SavedModel folder read.
    module: the Segmenter (checkpoints) or the loaded SavedModel object; it owns the variables
      `serve` reads, so keep it alive as long as `serve` is used.
  """

  serve: ServeFunction
  height: int
  width: int
  preprocessing: str
  kind: str
  source: str
  module: tf.Module


def is_saved_model(path: str) -> bool:
  """True when `path` is a SavedModel folder."""
  return tf.io.gfile.exists(os.path.join(path, "saved_model.pb"))


def resolve_model_source(path: str, prefer: str = "best") -> str:
  """What `load_segmenter(path)` would read, found without loading anything (a cheap check).

  Args:
    path: as for `load_segmenter`.
    prefer: "best" or "latest", for workdirs.

  Returns:
    The SavedModel folder, or the checkpoint prefix.

  Raises:
    dunet.errors.CheckpointNotFoundError: nothing to load at `path` (the message names it).
  """
  if is_saved_model(path):
    return path
  return checkpoint_lib.resolve_checkpoint(path, prefer)


def find_run_config(path: str) -> Dict[str, object]:
  """The config.json of the run `path` belongs to (a workdir, its best/ or checkpoints/ folder,
  or a checkpoint prefix inside them); {} when there is none."""
  candidates = [path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))]
  for folder in candidates:
    if folder and tf.io.gfile.exists(os.path.join(folder, checkpoint_lib.CONFIG_FILENAME)):
      return checkpoint_lib.read_config(folder)
  return {}


def load_segmenter(
  path: str,
  *,
  prefer: str = "best",
  height: Optional[int] = None,
  width: Optional[int] = None,
  preprocessing: Optional[str] = None,
  precision_name: Optional[str] = None,
) -> LoadedSegmenter:
  """A Segmenter from a workdir, checkpoint prefix or exported SavedModel.

  Args:
    path: a training workdir (its best checkpoint unless `prefer="latest"`), a converted Keras
      workdir (dunet-convert-keras), a checkpoint prefix such as `run/best/ckpt-12`, or a
      SavedModel folder written by dunet/export.py.
    prefer: "best" or "latest", for workdirs.
    height, width: the model input size; default: the run's config.json. Needed when the run
      recorded none (a converted Keras file without an input shape). Ignored for SavedModels,
      which carry theirs (a different value is an error).
    preprocessing: default: the run's config.json ("reference" when it has none).
    precision_name: compute precision ("float32", "mixed_float16", "mixed_bfloat16", "auto");
      default: float32, whatever the run trained with (inference needs no loss scaling, and
      float32 gives the scores the paper's table compares).

  Returns:
    A LoadedSegmenter.

  Raises:
    dunet.checkpoint.CheckpointNotFoundError: nothing to load at `path`.
    ConfigError: no input size known, a size not divisible by 16, or a SavedModel that
      disagrees with the given size or preprocessing.
    dunet.errors.CheckpointError: a SavedModel dunet did not export, or a checkpoint of another
      model.
  """
  if is_saved_model(path):
    return _load_saved_model(path, height, width, preprocessing)
  prefix = checkpoint_lib.resolve_checkpoint(path, prefer)
  config = find_run_config(path if tf.io.gfile.isdir(path) else prefix)
  height = height or config.get("height")
  width = width or config.get("width")
  if not height or not width:
    raise ConfigError(
      f"{path}: the run's config.json records no input size; pass the size the "
      "model was trained at (e.g. --height=288 --width=384)"
    )
  preprocessing = preprocessing or config.get("preprocessing") or "reference"
  policy = precision.Policy(precision.resolve_policy_name(precision_name or "float32"))
  model = DoubleUNet(compute_dtype=policy.compute_dtype)
  checkpoint_lib.restore_model(model, prefix, prefer)
  segmenter = Segmenter(model, int(height), int(width), preprocessing)
  return LoadedSegmenter(
    serve=segmenter.serve,
    height=segmenter.height,
    width=segmenter.width,
    preprocessing=preprocessing,
    kind="checkpoint",
    source=prefix,
    module=segmenter,
  )


def _load_saved_model(
  path: str, height: Optional[int], width: Optional[int], preprocessing: Optional[str]
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
  return LoadedSegmenter(
    serve=loaded.serve,
    height=saved_height,
    width=saved_width,
    preprocessing=saved_preprocessing,
    kind="saved_model",
    source=path,
    module=loaded,
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
