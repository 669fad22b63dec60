"""Segmentation metrics: confusion counts in TF (inside the compiled step), scores in numpy.

The compiled step only counts pixels (true positives, false positives, false negatives, true
negatives per image, at a fixed threshold); everything else happens outside it, in numpy:
`scores_from_counts` turns counts into DSC, IoU, precision, recall, F2 and accuracy, and
`MetricAccumulator` collects the counts of a whole evaluation to report both

  per_image/<score>: the mean over images of each image's score (what the literature reports as
                     "mean DSC"/"mIoU"), and
  pooled/<score>:    one score from the counts summed over all pixels of all images.

Empty-mask convention. A ratio of counts is 0/0 only when the prediction and the ground truth are
both empty for every pixel the ratio looks at. We score such a 0/0 as 1.0 when the prediction and
the ground truth are BOTH empty (nothing to find, nothing falsely found: a perfect answer) and as
0.0 otherwise. Consequences for one image:
  prediction empty, ground truth empty:     every score 1.0;
  ground truth empty, prediction non-empty: dsc, iou, precision, recall, f2 all 0.0;
  prediction empty, ground truth non-empty: dsc, iou, precision, recall, f2 all 0.0.
Accuracy is always defined (for an image with at least one pixel).
Pooled scores follow the same rule on the summed counts: the rule makes a pooled score 1.0 only
when every image has an empty prediction and an empty ground truth. The per-image mean counts an
image with both masks empty as a perfect 1.0 and a false alarm on an empty ground truth as 0.0,
so a report should say how many ground truths were empty (dunet.evaluate does; the synthetic demo
set has some, pictures without a polyp).

Which statistic the literature reports. DoubleU-Net's tables (Jha et al. 2020) give "DSC, mIoU,
recall, precision" per data set, i.e. means over test images; the authors' code averaged Keras
batch metrics over shuffled test batches, on soft masks, for both heads at once, which is neither
statistic exactly. `HEADLINE_STATISTIC` is the per-image mean, the well-defined version of what
the paper reports; pooled scores are given next to it.

Thresholding: a pixel is predicted foreground when its probability is >= the threshold, here
(`confusion_counts`) and in numpy (`binarize`) alike. Several heads are combined by averaging
their probabilities and thresholding the mean (`mean_of_heads`), not by averaging scores.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import tensorflow as tf

# Column order of every counts array.
TP, FP, FN, TN = 0, 1, 2, 3
SCORE_NAMES = ("dsc", "iou", "precision", "recall", "f2", "accuracy")
# "per_image": the mean over images of each image's score; "pooled": one score over all pixels.
STATISTICS = ("per_image", "pooled")
HEADLINE_STATISTIC = "per_image"


def confusion_counts(
  probabilities: tf.Tensor, masks: tf.Tensor, threshold: float = 0.5
) -> tf.Tensor:
  """Per-image pixel counts (tp, fp, fn, tn): TF ops only, usable inside a compiled step.

  Args:
    probabilities: [B, ...] predicted foreground probabilities (apply tf.sigmoid to logits first).
      A pixel is predicted foreground when probability >= threshold.
    masks: [B, ...] ground truth of the same shape; foreground where mask >= 0.5.
    threshold: probability threshold.

  Returns:
    [B, 4] int64 counts, columns (tp, fp, fn, tn).
  """
  predicted = tf.cast(probabilities, tf.float32) >= threshold
  truth = tf.cast(masks, tf.float32) >= 0.5
  batch = tf.shape(predicted)[0]
  predicted = tf.reshape(predicted, [batch, -1])
  truth = tf.reshape(truth, [batch, -1])

  def count(condition: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.cast(condition, tf.int64), axis=1)

  not_predicted = tf.logical_not(predicted)
  not_truth = tf.logical_not(truth)
  return tf.stack(
    [
      count(predicted & truth),
      count(predicted & not_truth),
      count(not_predicted & truth),
      count(not_predicted & not_truth),
    ],
    axis=1,
  )


def confusion_counts_np(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """Counts (tp, fp, fn, tn) over all pixels of one image, e.g. at its original resolution.

  Args:
    predicted: boolean prediction of any shape.
    truth: boolean ground truth of the same shape.

  Returns:
    [4] int64 counts (tp, fp, fn, tn).

  Raises:
    ValueError: if the shapes differ.
  """
  predicted = np.asarray(predicted, dtype=bool)
  truth = np.asarray(truth, dtype=bool)
  if predicted.shape != truth.shape:
    raise ValueError(
      f"prediction shape {predicted.shape} differs from ground truth shape {truth.shape}"
    )
  tp = np.count_nonzero(predicted & truth)
  fp = np.count_nonzero(predicted & ~truth)
  fn = np.count_nonzero(~predicted & truth)
  tn = predicted.size - tp - fp - fn
  return np.array([tp, fp, fn, tn], dtype=np.int64)


def binarize(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
  """Boolean foreground prediction: probability >= threshold (as `confusion_counts`).

  The threshold is compared in the probabilities' own float type, as TF does, so the numpy and
  TF counts agree pixel for pixel.
  """
  probabilities = np.asarray(probabilities)
  if np.issubdtype(probabilities.dtype, np.floating):
    return probabilities >= probabilities.dtype.type(threshold)
  return probabilities >= threshold


def mean_of_heads(*probabilities: np.ndarray) -> np.ndarray:
  """The mean of several heads' probability maps (same shape), to be thresholded as one head.

  Args:
    *probabilities: two or more float arrays of one shape (e.g. head 1 and head 2).

  Returns:
    Their element-wise mean, in the inputs' float type (float32 stays float32, summed in order
    and divided once, like `dunet.serving.flip_tta`).

  Raises:
    ValueError: fewer than two maps, or different shapes.
  """
  if len(probabilities) < 2:
    raise ValueError(f"mean_of_heads needs at least two probability maps, got {len(probabilities)}")
  arrays = [np.asarray(p) for p in probabilities]
  shapes = {a.shape for a in arrays}
  if len(shapes) != 1:
    raise ValueError(f"probability maps must have one shape, got {sorted(shapes)}")
  dtype = np.result_type(*arrays)
  if not np.issubdtype(dtype, np.floating):
    dtype = np.dtype(np.float32)
  total = arrays[0].astype(dtype)
  for array in arrays[1:]:
    total = total + array.astype(dtype)
  return (total / dtype.type(len(arrays))).astype(dtype)


def _ratio(numerator: np.ndarray, denominator: np.ndarray, both_empty: np.ndarray) -> np.ndarray:
  """numerator / denominator, with 0/0 scored 1.0 where both_empty and 0.0 elsewhere."""
  safe = np.where(denominator > 0, denominator, 1.0)
  return np.where(denominator > 0, numerator / safe, np.where(both_empty, 1.0, 0.0))


def scores_from_counts(counts: np.ndarray) -> Dict[str, np.ndarray]:
  """Scores from confusion counts, following the module's empty-mask convention.

  Args:
    counts: [4] or [N, 4] counts (tp, fp, fn, tn).

  Returns:
    {"dsc", "iou", "precision", "recall", "f2", "accuracy"}: float64 arrays of shape [] or [N].

  Raises:
    ValueError: if the last axis is not 4 or a count is negative.
  """
  counts = np.asarray(counts, dtype=np.float64)
  if counts.ndim not in (1, 2) or counts.shape[-1] != 4:
    raise ValueError(f"counts must have shape [4] or [N, 4] (tp, fp, fn, tn), got {counts.shape}")
  if np.any(counts < 0):
    raise ValueError("counts must be non-negative")
  tp, fp, fn, tn = (counts[..., i] for i in (TP, FP, FN, TN))
  both_empty = (tp + fp + fn) == 0
  return {
    "dsc": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
    "iou": _ratio(tp, tp + fp + fn, both_empty),
    "precision": _ratio(tp, tp + fp, both_empty),
    "recall": _ratio(tp, tp + fn, both_empty),
    # F-beta with beta = 2 (recall weighted 4x): 5·tp / (5·tp + 4·fn + fp).
    "f2": _ratio(5 * tp, 5 * tp + 4 * fn + fp, both_empty),
    "accuracy": _ratio(tp + tn, tp + fp + fn + tn, both_empty),
  }


class MetricAccumulator:
  """Collects per-image counts over an evaluation (numpy, outside the compiled step)."""

  def __init__(self):
    self._counts: List[np.ndarray] = []

  def update(self, counts: np.ndarray) -> None:
    """Adds the counts of some images.

    Args:
      counts: [B, 4] (or [4] for one image) counts (tp, fp, fn, tn), e.g. from confusion_counts.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim == 1:
      counts = counts[None]
    if counts.ndim != 2 or counts.shape[1] != 4:
      raise ValueError(f"counts must have shape [B, 4] (tp, fp, fn, tn), got {counts.shape}")
    if np.any(counts < 0):
      raise ValueError("counts must be non-negative")
    self._counts.append(counts)

  @property
  def num_images(self) -> int:
    """Images added so far."""
    return sum(len(c) for c in self._counts)

  def counts(self) -> np.ndarray:
    """All counts so far: [N, 4] int64."""
    if not self._counts:
      return np.zeros((0, 4), np.int64)
    return np.concatenate(self._counts, axis=0)

  def result(self) -> Dict[str, float]:
    """Mean per-image scores and pooled scores.

    Returns:
      {"per_image/<score>": mean over images, "pooled/<score>": from summed counts, "images": N}
      for every score in SCORE_NAMES.

    Raises:
      ValueError: if no image was added.
    """
    counts = self.counts()
    if len(counts) == 0:
      raise ValueError("no images were accumulated: nothing to score")
    per_image = scores_from_counts(counts)
    pooled = scores_from_counts(counts.sum(axis=0))
    result: Dict[str, float] = {}
    for name in SCORE_NAMES:
      result[f"per_image/{name}"] = float(np.mean(per_image[name]))
      result[f"pooled/{name}"] = float(pooled[name])
    result["images"] = float(len(counts))
    return result

  def nested_result(self) -> Dict[str, Dict[str, float]]:
    """`result()` as {"per_image": {score: value}, "pooled": {score: value}} (for reports)."""
    flat = self.result()
    return {
      statistic: {name: flat[f"{statistic}/{name}"] for name in SCORE_NAMES}
      for statistic in STATISTICS
    }

  def reset(self) -> None:
    """Forgets all counts."""
    self._counts = []
