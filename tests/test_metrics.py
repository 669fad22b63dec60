"""Confusion counts and scores on tiny hand-made masks."""

import numpy as np
import pytest
import tensorflow as tf

from dunet import distribute
from dunet import metrics

distribute.configure_logical_cpus(2)

# Two 2x3 images. Image 0: tp 2, fp 1, fn 1, tn 2. Image 1: empty truth, one false positive.
PROBABILITIES = np.array(
  [[[0.9, 0.5, 0.7], [0.1, 0.49, 0.0]], [[0.0, 0.0, 0.2], [0.0, 0.6, 0.0]]], np.float32
)[..., None]
MASKS = np.array([[[1, 1, 0], [1, 0, 0]], [[0, 0, 0], [0, 0, 0]]], np.float32)[..., None]
EXPECTED_COUNTS = np.array([[2, 1, 1, 2], [0, 1, 0, 5]])


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
  expected = {
    "dsc": 4 / 6,
    "iou": 2 / 4,
    "precision": 2 / 3,
    "recall": 2 / 3,
    "f2": 10 / 15,
    "accuracy": 7 / 9,
  }
  assert set(scores) == set(metrics.SCORE_NAMES)
  for name, value in expected.items():
    assert float(scores[name]) == pytest.approx(value), name


def test_f2_weighs_recall_more_than_precision():
  scores = metrics.scores_from_counts([[6, 0, 4, 0], [6, 4, 0, 0]])
  precision, recall = scores["precision"], scores["recall"]
  np.testing.assert_allclose(scores["f2"], 5 * precision * recall / (4 * precision + recall))
  assert scores["f2"][1] > scores["f2"][0]  # same DSC, better recall


@pytest.mark.parametrize(
  "counts, expected",
  [
    # Prediction and truth both empty: a perfect answer.
    ([0, 0, 0, 9], dict(dsc=1, iou=1, precision=1, recall=1, f2=1, accuracy=1)),
    # Truth empty, something predicted.
    ([0, 3, 0, 6], dict(dsc=0, iou=0, precision=0, recall=0, f2=0, accuracy=6 / 9)),
    # Truth non-empty, nothing predicted.
    ([0, 0, 3, 6], dict(dsc=0, iou=0, precision=0, recall=0, f2=0, accuracy=6 / 9)),
  ],
)
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
  assert {
    f"{kind}/{name}" for kind in ("per_image", "pooled") for name in metrics.SCORE_NAMES
  } <= set(result)

  accumulator.reset()
  with pytest.raises(ValueError, match="no images"):
    accumulator.result()
  with pytest.raises(ValueError, match="shape"):
    accumulator.update(np.zeros((2, 3)))


# ------------------------------------------------------------------------------------------------
# From masks to scores, by hand: what dunet.evaluate reports per image and pooled
# ------------------------------------------------------------------------------------------------

# Four 3x4 images (12 pixels each): an ordinary one, a false alarm on an empty ground truth, a
# miss (empty prediction on a non-empty ground truth), and both empty.
TRUTHS = np.array(
  [
    [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]],
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    [[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]],
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
  ],
  bool,
)
PREDICTIONS = np.array(
  [
    [[1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]],
    [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]],
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
  ],
  bool,
)
# Counted by eye from the arrays above: (tp, fp, fn, tn).
HAND_COUNTS = [(3, 1, 1, 7), (0, 2, 0, 10), (0, 0, 2, 10), (0, 0, 0, 12)]
# Per image, written out from the definitions and the empty-mask convention.
HAND_SCORES = [
  dict(dsc=6 / 8, iou=3 / 5, precision=3 / 4, recall=3 / 4, f2=15 / 20, accuracy=10 / 12),
  dict(dsc=0, iou=0, precision=0, recall=0, f2=0, accuracy=10 / 12),  # false alarm
  dict(dsc=0, iou=0, precision=0, recall=0, f2=0, accuracy=10 / 12),  # miss
  dict(dsc=1, iou=1, precision=1, recall=1, f2=1, accuracy=1),  # both empty
]


def test_masks_to_counts_and_scores_by_hand():
  for prediction, truth, counts, expected in zip(PREDICTIONS, TRUTHS, HAND_COUNTS, HAND_SCORES):
    got = metrics.confusion_counts_np(prediction, truth)
    np.testing.assert_array_equal(got, counts)
    scores = metrics.scores_from_counts(got)
    for name, value in expected.items():
      assert float(scores[name]) == pytest.approx(value), (counts, name)


def test_per_image_mean_and_pooled_with_empty_masks_by_hand():
  accumulator = metrics.MetricAccumulator()
  for prediction, truth in zip(PREDICTIONS, TRUTHS):
    accumulator.update(metrics.confusion_counts_np(prediction, truth))
  nested = accumulator.nested_result()
  flat = accumulator.result()
  for name in metrics.SCORE_NAMES:
    # The mean over images counts the empty pair as 1 and the false alarm and the miss as 0.
    assert nested["per_image"][name] == pytest.approx(
      sum(scores[name] for scores in HAND_SCORES) / 4
    ), name
    assert nested["per_image"][name] == flat[f"per_image/{name}"]
    assert nested["pooled"][name] == flat[f"pooled/{name}"]
  # Pooled: tp 3, fp 3, fn 3, tn 39 over 48 pixels; the empty images only add negatives.
  assert nested["pooled"]["dsc"] == pytest.approx(6 / 12)
  assert nested["pooled"]["iou"] == pytest.approx(3 / 9)
  assert nested["pooled"]["precision"] == pytest.approx(3 / 6)
  assert nested["pooled"]["recall"] == pytest.approx(3 / 6)
  assert nested["pooled"]["f2"] == pytest.approx(15 / 30)
  assert nested["pooled"]["accuracy"] == pytest.approx(42 / 48)
  assert set(nested) == set(metrics.STATISTICS)
  assert metrics.HEADLINE_STATISTIC in metrics.STATISTICS


def test_only_empty_images_pooled():
  accumulator = metrics.MetricAccumulator()
  accumulator.update(metrics.confusion_counts_np(PREDICTIONS[3], TRUTHS[3]))
  accumulator.update(metrics.confusion_counts_np(PREDICTIONS[3], TRUTHS[3]))
  assert accumulator.nested_result()["pooled"] == {name: 1.0 for name in metrics.SCORE_NAMES}
  accumulator.update(metrics.confusion_counts_np(PREDICTIONS[1], TRUTHS[1]))  # a false alarm
  pooled = accumulator.nested_result()["pooled"]
  assert pooled["dsc"] == 0 and pooled["precision"] == 0
  assert pooled["accuracy"] == pytest.approx(34 / 36)


def test_binarize_agrees_with_the_tf_counts_at_the_threshold():
  # Values at, just below and just above thresholds that are not exact in float32.
  threshold = 0.3
  below = np.nextafter(np.float32(threshold), np.float32(0))
  above = np.nextafter(np.float32(threshold), np.float32(1))
  probabilities = np.array([[below, np.float32(threshold), above, 0.0, 1.0, 0.7]], np.float32)
  truth = np.array([[1, 1, 0, 0, 1, 0]], np.float32)
  predicted = metrics.binarize(probabilities, threshold)
  np.testing.assert_array_equal(predicted, [[False, True, True, False, True, True]])
  expected = metrics.confusion_counts(probabilities, truth, threshold).numpy()[0]
  np.testing.assert_array_equal(metrics.confusion_counts_np(predicted, truth > 0), expected)
  # float64 probabilities compare in float64.
  assert not metrics.binarize(np.float64(below), threshold)
  assert metrics.binarize(np.float64(threshold), threshold)


def test_mean_of_heads():
  head1 = np.array([[0.2, 0.9], [0.4, 0.0]], np.float32)
  head2 = np.array([[0.9, 0.3], [0.6, 0.0]], np.float32)
  mean = metrics.mean_of_heads(head1, head2)
  assert mean.dtype == np.float32
  np.testing.assert_allclose(mean, [[0.55, 0.6], [0.5, 0.0]], rtol=1e-6)
  # Averaged, then thresholded: the pixel where the heads disagree most is kept at 0.5.
  np.testing.assert_array_equal(metrics.binarize(mean, 0.5), [[True, True], [True, False]])
  np.testing.assert_allclose(
    metrics.mean_of_heads(head1, head2, head2), (head1 + 2 * head2) / 3, rtol=1e-6
  )
  integers = metrics.mean_of_heads(np.array([0, 1, 1]), np.array([1, 1, 0]))
  assert integers.dtype == np.float32
  np.testing.assert_array_equal(integers, [0.5, 1.0, 0.5])
  with pytest.raises(ValueError, match="at least two"):
    metrics.mean_of_heads(head1)
  with pytest.raises(ValueError, match="one shape"):
    metrics.mean_of_heads(head1, head2[:1])
