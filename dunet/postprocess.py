"""Connected-component post-processing of predicted masks, and its choice on validation data.

A `PostProcessing` spec names one operation on the binary mask (probability >= threshold):

  "none"        the mask as it is;
  "largest"     keep only the largest connected foreground component (all of them if several
                share the largest size: a choice between equal blobs would be arbitrary);
  "min_size=N"  remove the components of fewer than N pixels.

Components are 8-connected (pixels touching at a corner belong together), as OpenCV's default
and scipy.ndimage with a 3 x 3 structure: a thin diagonal polyp boundary stays one object.

Two implementations that agree pixel for pixel:
  numpy/OpenCV  `filter_mask`, `apply_numpy`: for evaluate and predict (cv2.connectedComponents-
                WithStats, fast on any size);
  TF graph      `filter_mask_tf`, `apply_tf`, `label_components_tf`: pure TF ops on dynamic
                shapes, usable in a tf.function and an exported SavedModel. Labels start as unique
                pixel ids and spread by 3 x 3 maximum filtering (plus pointer jumping: each pixel
                also takes the label of the pixel its label names) inside a tf.while_loop until
                nothing changes; sizes come from tf.math.unsorted_segment_sum.

`apply_*` takes probabilities and returns probabilities, with the pixels of removed components
set to 0 and every other pixel unchanged: a SavedModel still returns a probability map, "none" is
the identity, and thresholding the output at the same threshold gives exactly the filtered mask.

`choose_postprocessing` picks the operation as nnU-Net does: on validation predictions, keep a
candidate only if it raises the mean per-image DSC (dunet/metrics.py's convention: an image with
both masks empty scores 1) by more than a tiny margin over no post-processing.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import tensorflow as tf

from dunet import metrics
from dunet.errors import ConfigError

NONE, LARGEST, MIN_SIZE = "none", "largest", "min_size"
KINDS = (NONE, LARGEST, MIN_SIZE)
CONNECTIVITY = 8
# Default "min_size" candidates, as fractions of the (median) validation image area: 0.05 % is
# about the specks a network leaves (55 pixels at 288 x 384), 1 % is a small polyp; larger would
# only ever remove true objects. Each is kept only if it helps on validation.
DEFAULT_MIN_SIZE_FRACTIONS = (0.0005, 0.002, 0.01)
# A candidate must beat no post-processing by more than this mean DSC (float noise, one pixel).
MIN_IMPROVEMENT = 1e-4


@dataclasses.dataclass(frozen=True)
class PostProcessing:
  """One post-processing operation.

  Attributes:
    kind: "none", "largest" or "min_size".
    min_size: for "min_size", the fewest pixels a component keeps (>= 1); 0 otherwise.
  """

  kind: str = NONE
  min_size: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ConfigError(f"unknown post-processing {self.kind!r}; expected one of {KINDS}")
    if isinstance(self.min_size, bool) or not isinstance(self.min_size, (int, np.integer)):
      raise ConfigError(f"min_size must be an integer, got {self.min_size!r}")
    if self.kind == MIN_SIZE and self.min_size < 1:
      raise ConfigError(f"min_size must be at least 1 pixel, got {self.min_size}")
    if self.kind != MIN_SIZE and self.min_size != 0:
      raise ConfigError(f"min_size only goes with kind 'min_size', not {self.kind!r}")
    object.__setattr__(self, "min_size", int(self.min_size))

  @classmethod
  def none(cls) -> "PostProcessing":
    """No post-processing."""
    return cls(NONE)

  @property
  def is_none(self) -> bool:
    """True for "none" (the identity)."""
    return self.kind == NONE

  def to_string(self) -> str:
    """ "none", "largest" or "min_size=N" (what `from_string` reads)."""
    return f"{MIN_SIZE}={self.min_size}" if self.kind == MIN_SIZE else self.kind

  def __str__(self) -> str:
    return self.to_string()

  @classmethod
  def from_string(cls, text: str) -> "PostProcessing":
    """Reads "none", "largest" or "min_size=N" (spaces around the parts are allowed).

    Raises:
      ConfigError: anything else.
    """
    expected = "expected 'none', 'largest' or 'min_size=N' with N a positive integer"
    if not isinstance(text, str):
      raise ConfigError(f"post-processing must be a string, got {text!r}; {expected}")
    name, separator, value = (part.strip() for part in text.strip().partition("="))
    if not separator:
      if name in (NONE, LARGEST):
        return cls(name)
      raise ConfigError(f"unknown post-processing {text!r}; {expected}")
    if name != MIN_SIZE or not value.isdigit():
      raise ConfigError(f"bad post-processing {text!r}; {expected}")
    return cls(MIN_SIZE, int(value))

  def to_dict(self) -> Dict[str, object]:
    """{"kind": ..., "min_size": ...}, JSON-ready."""
    return {"kind": self.kind, "min_size": self.min_size}

  @classmethod
  def from_dict(cls, values: Mapping[str, object]) -> "PostProcessing":
    """The inverse of `to_dict` ("min_size" may be left out for "none" and "largest").

    Raises:
      ConfigError: missing or unknown keys, or bad values.
    """
    if not isinstance(values, Mapping) or "kind" not in values:
      raise ConfigError(f"a post-processing record needs a 'kind', got {values!r}")
    unknown = set(values) - {"kind", "min_size"}
    if unknown:
      raise ConfigError(f"unknown post-processing keys {sorted(unknown)} in {dict(values)!r}")
    return cls(values["kind"], values.get("min_size", 0))


Spec = Union[PostProcessing, str]


def as_spec(spec: Spec) -> PostProcessing:
  """A PostProcessing from itself or its string.

  Raises:
    ConfigError: a bad string.
  """
  return spec if isinstance(spec, PostProcessing) else PostProcessing.from_string(spec)


def _check_threshold(threshold) -> None:
  if isinstance(threshold, (int, float, np.floating)) and not 0.0 < threshold <= 1.0:
    raise ConfigError(f"threshold must be in (0, 1], got {threshold}")


# numpy / OpenCV -------------------------------------------------------------------------------


def _as_image_mask(mask: np.ndarray) -> np.ndarray:
  """[H, W] or [H, W, 1] -> boolean [H, W]."""
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[-1] == 1:
    mask = mask[..., 0]
  if mask.ndim != 2:
    raise ConfigError(
      f"a mask must be [H, W] or [H, W, 1] (a batch: [B, H, W, 1]), got shape {mask.shape}"
    )
  return mask.astype(bool)


def _components(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(labels [H, W] int32 with 0 the background, sizes [count] with sizes[0] = 0)."""
  _, labels, stats, _ = cv2.connectedComponentsWithStats(
    mask.astype(np.uint8), connectivity=CONNECTIVITY, ltype=cv2.CV_32S
  )
  sizes = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
  sizes[0] = 0  # the background is no component
  return labels, sizes


def _select(labels: np.ndarray, sizes: np.ndarray, spec: PostProcessing) -> np.ndarray:
  """The kept pixels of a labelled mask."""
  if spec.kind == LARGEST:
    keep = (sizes == sizes.max()) & (sizes > 0)
  elif spec.kind == MIN_SIZE:
    keep = sizes >= spec.min_size
  else:
    keep = sizes > 0
  keep[0] = False
  return keep[labels]


def filter_mask(mask: np.ndarray, spec: Spec) -> np.ndarray:
  """Applies a post-processing to one binary mask (numpy, OpenCV's connected components).

  Args:
    mask: [H, W] or [H, W, 1]; foreground where true (non-zero).
    spec: a PostProcessing or its string.

  Returns:
    Boolean mask of the same shape: the kept foreground.

  Raises:
    ConfigError: a bad spec or shape.
  """
  spec = as_spec(spec)
  shape = np.shape(mask)
  binary = _as_image_mask(mask)
  if spec.is_none:
    return binary.reshape(shape)
  return _select(*_components(binary), spec).reshape(shape)


def apply_numpy(probabilities: np.ndarray, threshold: float, spec: Spec) -> np.ndarray:
  """Zeroes the pixels of the components a post-processing removes (numpy twin of `apply_tf`).

  Args:
    probabilities: one image [H, W] or [H, W, 1], or a batch [B, H, W, 1]; any float dtype.
      Foreground where >= threshold (`dunet.metrics.binarize`).
    threshold: in (0, 1].
    spec: a PostProcessing or its string.

  Returns:
    A copy of the same shape and dtype: removed components' pixels 0, the rest unchanged.

  Raises:
    ConfigError: a bad spec, threshold or shape.
  """
  spec = as_spec(spec)
  _check_threshold(threshold)
  probabilities = np.asarray(probabilities)
  if probabilities.ndim == 4:
    if probabilities.shape[-1] != 1:
      raise ConfigError(f"a batch must be [B, H, W, 1], got shape {probabilities.shape}")
    return np.stack([apply_numpy(image, threshold, spec) for image in probabilities]).reshape(
      probabilities.shape
    )
  foreground = _as_image_mask(metrics.binarize(probabilities, threshold))
  result = probabilities.copy()
  if spec.is_none:
    return result
  removed = foreground & ~_select(*_components(foreground), spec)
  result[removed.reshape(probabilities.shape)] = 0
  return result


# TF graph ------------------------------------------------------------------------------------


def _as_batch_mask(mask: tf.Tensor) -> tf.Tensor:
  """[B, H, W] or [B, H, W, 1] -> boolean [B, H, W]."""
  mask = tf.convert_to_tensor(mask)
  rank = mask.shape.rank
  if rank == 4 and mask.shape[-1] in (1, None):
    mask = mask[..., 0]
  elif rank != 3:
    raise ConfigError(f"masks must be [B, H, W] or [B, H, W, 1], got shape {mask.shape}")
  return tf.cast(mask, tf.bool)


def _max_3x3(labels: tf.Tensor) -> tf.Tensor:
  """The maximum over each pixel's 3 x 3 neighbourhood (zeros outside), for [B, H, W] int32.

  Shifted slices instead of tf.nn.max_pool2d, which has no int32 kernel on every device.
  """
  padded = tf.pad(labels, [[0, 0], [1, 1], [1, 1]])
  rows = tf.maximum(tf.maximum(padded[:, :-2, :], padded[:, 1:-1, :]), padded[:, 2:, :])
  return tf.maximum(tf.maximum(rows[:, :, :-2], rows[:, :, 1:-1]), rows[:, :, 2:])


def label_components_tf(mask: tf.Tensor) -> tf.Tensor:
  """8-connected component labels in TF ops (dynamic shapes; tf.function and SavedModel safe).

  Each foreground pixel starts with its own id (1 + its row-major index) and repeatedly takes
  the largest label in its 3 x 3 neighbourhood, then the label held by the pixel its label
  names (pointer jumping, which shortens long thin components from O(length) rounds to about
  O(log length)); both only ever copy labels within a component, so at the fixed point each
  component carries the id of its last pixel in row-major order.

  Args:
    mask: [B, H, W] or [B, H, W, 1]; foreground where true (non-zero).

  Returns:
    int32 [B, H, W]: 0 for the background, else 1 + the row-major index (within the image) of
    the component's last pixel.

  Raises:
    ConfigError: another rank.
  """
  foreground = _as_batch_mask(mask)
  shape = tf.shape(foreground)
  batch, pixels = shape[0], shape[1] * shape[2]
  ids = tf.reshape(tf.range(1, pixels + 1), [1, shape[1], shape[2]])
  labels = tf.where(foreground, ids, 0)

  def step(labels: tf.Tensor, _) -> Tuple[tf.Tensor, tf.Tensor]:
    spread = tf.where(foreground, _max_3x3(labels), 0)
    flat = tf.reshape(spread, [batch, pixels])
    jumped = tf.gather(flat, tf.maximum(flat - 1, 0), batch_dims=1)
    updated = tf.where(foreground, tf.reshape(tf.maximum(flat, jumped), shape), 0)
    updated = tf.ensure_shape(updated, foreground.shape)  # the loop keeps its static shape
    return updated, tf.reduce_any(tf.not_equal(updated, labels))

  labels, _ = tf.while_loop(lambda _, changed: changed, step, (labels, tf.constant(True)))
  return labels


def _kept_tf(foreground: tf.Tensor, spec: PostProcessing) -> tf.Tensor:
  """Boolean [B, H, W] kept foreground of boolean [B, H, W] (spec not "none")."""
  labels = label_components_tf(foreground)
  shape = tf.shape(labels)
  batch, pixels = shape[0], shape[1] * shape[2]
  # One segment per (image, label); label 0 (the background) is counted and then ignored.
  segments = tf.reshape(labels, [batch, pixels]) + (pixels + 1) * tf.range(batch)[:, None]
  sizes = tf.math.unsorted_segment_sum(
    tf.ones_like(segments), segments, num_segments=batch * (pixels + 1)
  )
  pixel_sizes = tf.where(
    tf.reshape(foreground, [batch, pixels]), tf.gather(sizes, segments), tf.zeros_like(segments)
  )
  if spec.kind == LARGEST:
    keep = pixel_sizes == tf.reduce_max(pixel_sizes, axis=1, keepdims=True)
  else:
    keep = pixel_sizes >= spec.min_size
  return tf.reshape(keep, shape) & foreground


def filter_mask_tf(mask: tf.Tensor, spec: Spec) -> tf.Tensor:
  """`filter_mask` in TF ops, for a batch.

  Args:
    mask: [B, H, W] or [B, H, W, 1]; foreground where true (non-zero).
    spec: a PostProcessing or its string (fixed at trace time).

  Returns:
    Boolean, the shape of `mask`: the kept foreground.

  Raises:
    ConfigError: a bad spec or rank.
  """
  spec = as_spec(spec)
  mask = tf.convert_to_tensor(mask)
  foreground = _as_batch_mask(mask)
  kept = foreground if spec.is_none else _kept_tf(foreground, spec)
  return tf.reshape(kept, tf.shape(mask))


def apply_tf(probabilities: tf.Tensor, threshold, spec: Spec) -> tf.Tensor:
  """Zeroes the pixels of the components a post-processing removes, in TF ops.

  Args:
    probabilities: [B, H, W] or [B, H, W, 1], any float dtype, any (dynamic) size.
      Foreground where >= threshold (compared in the probabilities' dtype, as
      `dunet.metrics.binarize`).
    threshold: in (0, 1]; a Python number (checked) or a scalar tensor.
    spec: a PostProcessing or its string (fixed at trace time).

  Returns:
    The same shape and dtype: removed components' pixels 0, every other pixel unchanged
    ("none" returns `probabilities` itself).

  Raises:
    ConfigError: a bad spec, threshold or rank.
  """
  spec = as_spec(spec)
  _check_threshold(threshold)
  probabilities = tf.convert_to_tensor(probabilities)
  if spec.is_none:
    return probabilities
  foreground = probabilities >= tf.cast(threshold, probabilities.dtype)
  batch_mask = _as_batch_mask(foreground)
  removed = tf.reshape(batch_mask & ~_kept_tf(batch_mask, spec), tf.shape(probabilities))
  return tf.where(removed, tf.zeros_like(probabilities), probabilities)


# The choice on validation ----------------------------------------------------------------------


def default_candidates(image_area: int) -> List[PostProcessing]:
  """ "largest", then "min_size" at DEFAULT_MIN_SIZE_FRACTIONS of `image_area` (at least 1 pixel,
  without repeats), smallest first."""
  sizes = sorted(
    {max(1, int(round(fraction * image_area))) for fraction in DEFAULT_MIN_SIZE_FRACTIONS}
  )
  return [PostProcessing(LARGEST)] + [PostProcessing(MIN_SIZE, size) for size in sizes]


def choose_postprocessing(
  probabilities_list: Sequence[np.ndarray],
  truths_list: Sequence[np.ndarray],
  threshold: float = 0.5,
  candidates: Optional[Sequence[Spec]] = None,
  min_improvement: float = MIN_IMPROVEMENT,
) -> Tuple[PostProcessing, Dict[str, object]]:
  """Picks the post-processing that helps on validation predictions (nnU-Net's rule).

  The mean per-image DSC is computed for no post-processing and for each candidate; the
  candidate with the highest mean is chosen if it beats no post-processing by more than
  `min_improvement`, else "none". Equal means go to the earlier candidate.

  Args:
    probabilities_list: per image, [H, W] or [H, W, 1] probabilities (sizes may differ between
      images), e.g. head 2 at the original resolution.
    truths_list: per image, the ground truth of the same size; foreground where >= 0.5.
    threshold: the foreground threshold, in (0, 1].
    candidates: PostProcessings or strings; default `default_candidates(median image area)`
      ("none" among them is ignored: it is always the baseline).
    min_improvement: the margin a candidate must beat, >= 0.

  Returns:
    (the chosen PostProcessing, a JSON-ready record:
      {"choice": "largest", "threshold": 0.5, "images": N, "connectivity": 8,
       "min_improvement": 1e-4,
       "candidates": [{"postprocessing": "none", "mean_dsc": ..., "improvement": 0.0}, ...],
       "reason": "kept: +0.0120 DSC over none"  or  "none: no candidate improved ..."}).

  Raises:
    ConfigError: no images, different counts or sizes, bad candidates, threshold or margin.
  """
  _check_threshold(threshold)
  if not min_improvement >= 0:
    raise ConfigError(f"min_improvement must be >= 0, got {min_improvement!r}")
  if len(probabilities_list) != len(truths_list):
    raise ConfigError(f"{len(probabilities_list)} predictions but {len(truths_list)} ground truths")
  if not len(probabilities_list):
    raise ConfigError("choosing a post-processing needs at least one validation image")
  images = []
  for index, (probabilities, truth) in enumerate(zip(probabilities_list, truths_list)):
    predicted = _as_image_mask(metrics.binarize(probabilities, threshold))
    truth = _as_image_mask(np.asarray(truth) >= 0.5)
    if predicted.shape != truth.shape:
      raise ConfigError(
        f"validation image {index}: prediction {predicted.shape} and ground truth "
        f"{truth.shape} differ in size"
      )
    images.append((_components(predicted), truth))

  if candidates is None:
    candidates = default_candidates(int(np.median([truth.size for _, truth in images])))
  specs = [PostProcessing.none()]
  for candidate in candidates:
    spec = as_spec(candidate)
    if spec not in specs:
      specs.append(spec)

  means = []
  for spec in specs:
    scores = [
      metrics.scores_from_counts(metrics.confusion_counts_np(_select(*components, spec), truth))[
        "dsc"
      ]
      for components, truth in images
    ]
    means.append(float(np.mean(scores)))
  baseline = means[0]
  best = max(range(1, len(specs)), key=lambda i: (means[i], -i), default=0)
  chosen = best if best and means[best] - baseline > min_improvement else 0
  if chosen:
    reason = f"kept: {means[chosen] - baseline:+.4f} DSC over none"
  else:
    reason = f"none: no candidate improved the mean DSC by more than {min_improvement:g}"
  record = {
    "choice": specs[chosen].to_string(),
    "threshold": float(threshold),
    "images": len(images),
    "connectivity": CONNECTIVITY,
    "min_improvement": float(min_improvement),
    "candidates": [
      {"postprocessing": spec.to_string(), "mean_dsc": mean, "improvement": mean - baseline}
      for spec, mean in zip(specs, means)
    ],
    "reason": reason,
  }
  return specs[chosen], record
