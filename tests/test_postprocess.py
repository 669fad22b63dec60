"""dunet/postprocess.py: OpenCV and TF connected components agree; specs; the validation choice."""

import json

import cv2
import numpy as np
import pytest
from scipy import ndimage
import tensorflow as tf

from dunet import postprocess
from dunet.errors import ConfigError
from dunet.postprocess import PostProcessing

EIGHT = np.ones((3, 3), bool)  # scipy's 8-connectivity


def _blobs(shape, seed):
  """Random smooth blobs of many sizes, with single-pixel specks and diagonal contacts."""
  state = np.random.RandomState(seed)
  noise = cv2.GaussianBlur(state.rand(*shape).astype(np.float32), (0, 0), 2.0)
  mask = noise > np.quantile(noise, 0.7)
  mask |= state.rand(*shape) > 0.985
  return mask


def _serpentine(size):
  """One long, thin, winding component: the worst case for label propagation."""
  mask = np.zeros((size, size), bool)
  mask[::2] = True  # full even rows, joined at alternate ends by one pixel
  mask[1::4, -1] = True
  mask[3::4, 0] = True
  return mask


def _same_partition(labels, expected):
  """Two labellings describe the same components (labels may differ)."""
  assert ((labels > 0) == (expected > 0)).all()
  pairs = {(a, b) for a, b in zip(labels[labels > 0], expected[expected > 0])}
  assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


def _reference_filter(mask, spec):
  """scipy.ndimage's labelling and an explicit selection, as a third implementation."""
  labels, count = ndimage.label(mask, structure=EIGHT)
  sizes = np.array([np.count_nonzero(labels == i) for i in range(1, count + 1)])
  if spec.kind == "largest":
    keep = [i + 1 for i, size in enumerate(sizes) if size == sizes.max()]
  else:
    keep = [i + 1 for i, size in enumerate(sizes) if size >= spec.min_size]
  return np.isin(labels, keep)


SPECS = ["largest", "min_size=3", "min_size=20", "min_size=100"]


@pytest.mark.parametrize("shape", [(64, 64), (37, 53)])
def test_numpy_and_tf_agree_on_random_blobs(shape):
  masks = np.stack([_blobs(shape, seed) for seed in range(4)])
  labels = tf.function(postprocess.label_components_tf)(masks).numpy()
  for mask, label in zip(masks, labels):
    _same_partition(label, ndimage.label(mask, structure=EIGHT)[0])
  filter_tf = tf.function(postprocess.filter_mask_tf)
  for spec in SPECS:
    for pair in (masks[:2], masks[2:]):  # batches of 2
      kept_tf = filter_tf(pair, spec).numpy()
      for mask, kept in zip(pair, kept_tf):
        kept_np = postprocess.filter_mask(mask, spec)
        np.testing.assert_array_equal(kept, kept_np)
        np.testing.assert_array_equal(
          kept_np, _reference_filter(mask, PostProcessing.from_string(spec))
        )
    assert filter_tf(masks[:2, ..., None], spec).shape == (2, *shape, 1)


def test_a_long_winding_component_converges():
  mask = _serpentine(31)
  assert ndimage.label(mask, structure=EIGHT)[1] == 1
  labels = postprocess.label_components_tf(mask[None]).numpy()[0]
  assert set(np.unique(labels[mask])) == {np.flatnonzero(mask.ravel())[-1] + 1}
  assert (labels[~mask] == 0).all()


def _two_components():
  mask = np.zeros((8, 10), bool)
  mask[1, 1:6] = True  # 5 pixels
  mask[4:7, 5:8] = True  # 9 pixels
  return mask


@pytest.mark.parametrize("implementation", ["numpy", "tf"])
def test_by_hand(implementation):
  def run(mask, spec):
    if implementation == "numpy":
      return postprocess.filter_mask(mask, spec)
    return postprocess.filter_mask_tf(mask[None], spec).numpy()[0]

  mask = _two_components()
  nine = np.zeros_like(mask)
  nine[4:7, 5:8] = True
  np.testing.assert_array_equal(run(mask, "largest"), nine)
  np.testing.assert_array_equal(run(mask, "min_size=6"), nine)
  np.testing.assert_array_equal(run(mask, "min_size=5"), mask)
  np.testing.assert_array_equal(run(mask, "min_size=10"), np.zeros_like(mask))
  np.testing.assert_array_equal(run(mask, "none"), mask)
  # Pixels touching at a corner are one component (8-connectivity): 3 pixels beat 2.
  diagonal = np.zeros((6, 6), bool)
  diagonal[[0, 1, 2], [0, 1, 2]] = True
  diagonal[4, 4:6] = True
  expected = diagonal.copy()
  expected[4] = False
  np.testing.assert_array_equal(run(diagonal, "largest"), expected)
  np.testing.assert_array_equal(run(diagonal, "min_size=3"), expected)
  # Equal largest components are all kept.
  ties = np.zeros((5, 7), bool)
  ties[0, :2] = ties[4, 5:] = True
  ties[2, 3] = True
  expected = ties.copy()
  expected[2, 3] = False
  np.testing.assert_array_equal(run(ties, "largest"), expected)
  # Empty masks stay empty; a full mask is one component.
  for spec in ["none", *SPECS]:
    assert not run(np.zeros((7, 9), bool), spec).any()
  assert run(np.ones((7, 9), bool), "largest").all()
  assert run(np.ones((7, 9), bool), "min_size=63").all()


def test_apply_zeroes_removed_components_only():
  mask = _two_components()
  state = np.random.RandomState(0)
  probabilities = np.where(
    mask, 0.5 + 0.5 * state.rand(*mask.shape), 0.49 * state.rand(*mask.shape)
  )
  probabilities = probabilities.astype(np.float32)[..., None]
  batch = np.stack([probabilities, probabilities[::-1]])  # [2, 8, 10, 1]
  result_tf = postprocess.apply_tf(batch, 0.5, "largest").numpy()
  result_np = postprocess.apply_numpy(batch, 0.5, "largest")
  assert result_np.dtype == np.float32 and result_np.shape == batch.shape
  np.testing.assert_array_equal(result_tf, result_np)
  removed = np.zeros_like(mask)
  removed[1, 1:6] = True
  expected = np.where(removed[..., None], 0.0, probabilities)
  np.testing.assert_array_equal(result_np[0], expected)
  np.testing.assert_array_equal(postprocess.apply_numpy(probabilities, 0.5, "largest"), expected)
  np.testing.assert_array_equal(
    postprocess.apply_numpy(probabilities[..., 0], 0.5, "largest"), expected[..., 0]
  )
  # Thresholding the output gives the filtered mask; "none" is the identity.
  np.testing.assert_array_equal(
    result_np[0, ..., 0] >= 0.5, postprocess.filter_mask(mask, "largest")
  )
  np.testing.assert_array_equal(postprocess.apply_numpy(batch, 0.5, "none"), batch)
  np.testing.assert_array_equal(postprocess.apply_tf(batch, 0.5, "none").numpy(), batch)
  # A threshold exactly at a pixel's value counts it as foreground, in both.
  both = postprocess.apply_tf(batch[:, :, :, 0], np.float32(0.25), "min_size=6").numpy()
  np.testing.assert_array_equal(both, postprocess.apply_numpy(batch, 0.25, "min_size=6")[..., 0])


def test_tf_inside_a_tf_function_with_dynamic_shapes():
  apply = tf.function(
    lambda p: postprocess.apply_tf(p, 0.5, PostProcessing("min_size", 20)),
    input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)],
  )
  for shape in [(64, 64), (37, 53), (5, 3)]:
    masks = np.stack([_blobs(shape, 7), _blobs(shape, 8)]).astype(np.float32)[..., None]
    np.testing.assert_array_equal(
      apply(masks).numpy(), postprocess.apply_numpy(masks, 0.5, "min_size=20")
    )
  assert apply.experimental_get_tracing_count() == 1


def test_spec_round_trips():
  for text in ["none", "largest", "min_size=50", "min_size=1"]:
    spec = PostProcessing.from_string(text)
    assert spec.to_string() == str(spec) == text
    assert PostProcessing.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
  assert PostProcessing.from_string(" min_size = 7 ") == PostProcessing("min_size", 7)
  assert PostProcessing.from_dict({"kind": "largest"}) == PostProcessing("largest")
  assert PostProcessing.none().is_none and not PostProcessing("largest").is_none
  assert PostProcessing() == PostProcessing.none()
  assert postprocess.as_spec("largest") is not None
  assert PostProcessing("min_size", np.int64(4)).to_dict() == {"kind": "min_size", "min_size": 4}


@pytest.mark.parametrize(
  "text",
  [
    "",
    "biggest",
    "min_size",
    "min_size=",
    "min_size=0",
    "min_size=-3",
    "min_size=2.5",
    "largest=3",
    "min_size=x",
    None,
    5,
  ],
)
def test_bad_spec_strings(text):
  with pytest.raises(ConfigError, match="post-processing|min_size"):
    PostProcessing.from_string(text)


def test_bad_specs_and_arguments():
  for kind, size in [("median", 0), ("min_size", 0), ("largest", 5), ("min_size", 2.5)]:
    with pytest.raises(ConfigError):
      PostProcessing(kind, size)
  for values in [{}, {"kind": "none", "size": 3}, "largest", {"kind": "min_size"}]:
    with pytest.raises(ConfigError):
      PostProcessing.from_dict(values)
  with pytest.raises(ConfigError, match="threshold"):
    postprocess.apply_numpy(np.zeros((4, 4)), 0.0, "largest")
  with pytest.raises(ConfigError, match="threshold"):
    postprocess.apply_tf(np.zeros((1, 4, 4)), 1.5, "largest")
  with pytest.raises(ConfigError, match="shape"):
    postprocess.filter_mask(np.zeros((2, 4, 4), bool), "largest")
  with pytest.raises(ConfigError, match="shape"):
    postprocess.filter_mask_tf(np.zeros((4, 4), bool), "largest")
  with pytest.raises(ConfigError, match="shape"):
    postprocess.apply_numpy(np.zeros((2, 4, 4, 3)), 0.5, "largest")


def _blob(shape, centre, radius):
  rows, cols = np.ogrid[: shape[0], : shape[1]]
  return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def test_the_chooser_keeps_largest_against_specks():
  state = np.random.RandomState(3)
  truths, predictions = [], []
  for index in range(4):
    truth = _blob((64, 64), (20 + 5 * index, 30), 10)
    prediction = _blob((64, 64), (21 + 5 * index, 31), 10).astype(np.float32) * 0.9
    specks = state.randint(0, 64, (6, 2))
    prediction[specks[:, 0], specks[:, 1]] = np.where(truth[specks[:, 0], specks[:, 1]], 0.9, 0.7)
    truths.append(truth)
    predictions.append(prediction[..., None])
  choice, record = postprocess.choose_postprocessing(predictions, truths)
  assert choice == PostProcessing("largest")
  json.dumps(record)
  assert record["choice"] == "largest" and record["threshold"] == 0.5 and record["images"] == 4
  by_name = {entry["postprocessing"]: entry for entry in record["candidates"]}
  # Defaults: none, largest, min_size at 0.05 %, 0.2 % and 1 % of 64 x 64 pixels.
  assert list(by_name) == ["none", "largest", "min_size=2", "min_size=8", "min_size=41"]
  assert by_name["largest"]["mean_dsc"] > by_name["none"]["mean_dsc"]
  assert record["reason"] == f"kept: {by_name['largest']['improvement']:+.4f} DSC over none"
  # The DSC recorded for none is the metrics module's per-image mean.
  expected = np.mean(
    [
      2 * (p[..., 0] >= 0.5)[t].sum() / ((p >= 0.5).sum() + t.sum())
      for p, t in zip(predictions, truths)
    ]
  )
  assert by_name["none"]["mean_dsc"] == pytest.approx(expected, abs=1e-12)


def test_the_chooser_keeps_none_when_post_processing_hurts():
  # Each truth has a large and a small object, predicted exactly: every candidate removes one.
  truths = []
  for index in range(3):
    truth = _blob((48, 64), (15, 15 + index), 9)
    truth[38:41, 50 + index : 53 + index] = True
    truths.append(truth)
  predictions = [truth.astype(np.float32) for truth in truths]
  candidates = ["largest", "min_size=10", PostProcessing("min_size", 4)]
  choice, record = postprocess.choose_postprocessing(predictions, truths, candidates=candidates)
  assert choice.is_none and record["choice"] == "none"
  assert record["reason"].startswith("none: no candidate improved")
  means = {entry["postprocessing"]: entry["mean_dsc"] for entry in record["candidates"]}
  assert means["none"] == 1.0 and means["min_size=4"] == 1.0  # equal is not better
  assert means["largest"] < 1.0 and means["min_size=10"] < 1.0


def test_the_chooser_prefers_the_best_and_respects_the_margin():
  truth = _blob((40, 40), (20, 20), 8)
  prediction = truth.copy()
  prediction[0, 0] = True  # one speck: min_size=2 and largest remove it alike
  _, record = postprocess.choose_postprocessing(
    [prediction], [truth], candidates=["min_size=2", "largest"]
  )
  assert record["choice"] == "min_size=2"  # equal means: the earlier candidate
  choice, record = postprocess.choose_postprocessing(
    [prediction], [truth], candidates=["largest"], min_improvement=0.1
  )
  assert choice.is_none and "0.1" in record["reason"]
  # Both empty scores 1 (metrics.py's convention): nothing to remove, nothing to gain.
  choice, record = postprocess.choose_postprocessing([np.zeros((8, 8))], [np.zeros((8, 8), bool)])
  assert choice.is_none and record["candidates"][0]["mean_dsc"] == 1.0


def test_the_chooser_rejects_bad_input():
  with pytest.raises(ConfigError, match="at least one"):
    postprocess.choose_postprocessing([], [])
  with pytest.raises(ConfigError, match="ground truths"):
    postprocess.choose_postprocessing([np.zeros((4, 4))], [])
  with pytest.raises(ConfigError, match="image 0"):
    postprocess.choose_postprocessing([np.zeros((4, 4))], [np.zeros((4, 5))])
  with pytest.raises(ConfigError, match="post-processing"):
    postprocess.choose_postprocessing([np.zeros((4, 4))], [np.zeros((4, 4))], candidates=["big"])
  with pytest.raises(ConfigError, match="threshold"):
    postprocess.choose_postprocessing([np.zeros((4, 4))], [np.zeros((4, 4))], threshold=2.0)
