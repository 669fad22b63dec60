"""Confusion counts and scores on tiny hand-made masks."""

import numpy as np
import pytest
import tensorflow as tf

from dunet import distribute
from dunet import metrics

distribute.configure_logical_cpus(2)

# Two 2x3 images. Image 0: tp 2, fp 1, fn 1, tn 2. Image 1: empty truth, one false positive.
PROBABILITIES = np.array([[[0.9, 0.5, 0.7],
                           [0.1, 0.49, 0.0]],
                          [[0.0, 0.0, 0.2],
                           [0.0, 0.6, 0.0]]], np.float32)[..., None]
MASKS = np.array([[[1, 1, 0],
                   [1, 0, 0]],
                  [[0, 0, 0],
                   [0, 0, 0]]], np.float32)[..., None]
EXPECTED_COUNTS = np.array([[2, 1, 1, 2],
                            [0, 1, 0, 5]])


@pytest.mark.parametrize("jit_compile", [False, True], ids=["tf_function", "xla"])
def test_confusion_counts_by_hand(jit_compile):
  count = tf.function(metrics.confusion_counts, jit_compile=jit_compile)
  counts = count(tf.constant(PROBABILITIES), tf.constant(MASKS), 0.5)
  assert counts.dtype == tf.int64
  # A probability equal to the threshold (0.5) counts as foreground.
  np.testing.assert_array_equal(counts.numpy(), EXPECTED_COUNTS)


def test_confusion_counts_threshold_and_dtype():
  counts = metrics.confusion_counts(tf.constant(PROBABILITIES, tf.float16), MASKS, threshold=0.8)
  np.testing.assert_array_equal(counts.numpy(), [[1, 0, 2, 3], [0, 0, 0, 6]])


def test_confusion_counts_np_matches_the_tf_version():
  for image in range(2):
    counts = metrics.confusion_counts_np(PROBABILITIES[image] >= 0.5, MASKS[image] > 0)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, EXPECTED_COUNTS[image])
  with pytest.raises(ValueError, match="shape"):
    metrics.confusion_counts_np(np.zeros((2, 3), bool), np.zeros((3, 2), bool))


def test_scores_from_counts_by_hand():
  scores = metrics.scores_from_counts([2, 1, 1, 5])
  expected = {"dsc": 4 / 6, "iou": 2 / 4, "precision": 2 / 3, "recall": 2 / 3,
              "f2": 10 / 15, "accuracy": 7 / 9}
  assert set(scores) == set(metrics.SCORE_NAMES)
  for name, value in expected.items():
    assert float(scores[name]) == pytest.approx(value), name


def test_f2_weighs_recall_more_than_precision():
  scores = metrics.scores_from_counts([[6, 0, 4, 0], [6, 4, 0, 0]])
  precision, recall = scores["precision"], scores["recall"]
  np.testing.assert_allclose(scores["f2"], 5 * precision * recall / (4 * precision + recall))
  assert scores["f2"][1] > scores["f2"][0]  # same DSC, better recall


@pytest.mark.parametrize("counts, expected", [
    # Prediction and truth both empty: a perfect answer.
    ([0, 0, 0, 9], dict(dsc=1, iou=1, precision=1, recall=1, f2=1, accuracy=1)),
    # Truth empty, something predicted.
    ([0, 3, 0, 6], dict(dsc=0, iou=0, precision=0, recall=0, f2=0, accuracy=6 / 9)),
    # Truth non-empty, nothing predicted.
    ([0, 0, 3, 6], dict(dsc=0, iou=0, precision=0, recall=0, f2=0, accuracy=6 / 9)),
])
def test_empty_mask_convention(counts, expected):
  scores = metrics.scores_from_counts(counts)
  for name, value in expected.items():
    assert float(scores[name]) == pytest.approx(value), name


def test_scores_reject_bad_counts():
  with pytest.raises(ValueError, match="shape"):
    metrics.scores_from_counts([1, 2, 3])
  with pytest.raises(ValueError, match="non-negative"):
    metrics.scores_from_counts([1, -2, 3, 4])


def test_accumulator_per_image_and_pooled():
  accumulator = metrics.MetricAccumulator()
  accumulator.update(EXPECTED_COUNTS[:1])
  accumulator.update(EXPECTED_COUNTS[1])  # one image as [4]
  accumulator.update(np.array([[0, 0, 0, 6]]))
  result = accumulator.result()
  assert result["images"] == 3
  # Per image: DSCs 4/6, 0 (false positive on an empty mask) and 1 (both empty).
  assert result["per_image/dsc"] == pytest.approx((4 / 6 + 0 + 1) / 3)
  assert result["per_image/iou"] == pytest.approx((2 / 4 + 0 + 1) / 3)
  # Pooled: tp 2, fp 2, fn 1, tn 13 over all 18 pixels.
  assert result["pooled/dsc"] == pytest.approx(4 / 7)
  assert result["pooled/iou"] == pytest.approx(2 / 5)
  assert result["pooled/precision"] == pytest.approx(2 / 4)
  assert result["pooled/recall"] == pytest.approx(2 / 3)
  assert result["pooled/accuracy"] == pytest.approx(15 / 18)
  assert {f"{kind}/{name}" for kind in ("per_image", "pooled")
          for name in metrics.SCORE_NAMES} <= set(result)

  accumulator.reset()
  with pytest.raises(ValueError, match="no images"):
    accumulator.result()
  with pytest.raises(ValueError, match="shape"):
    accumulator.update(np.zeros((2, 3)))
