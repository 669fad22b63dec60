"""Surface-distance metrics: hand-computed tiny cases, scipy as an independent reference, the
empty-mask convention and input checks."""

import math

import numpy as np
import pytest
from scipy import ndimage

from dunet import surface_metrics
from dunet.errors import ConfigError

ANISOTROPIC = (0.5, 2.0)  # (row mm, column mm), exact in binary so hand values are exact


def _mask(shape, *pixels):
  mask = np.zeros(shape, bool)
  for row, col in pixels:
    mask[row, col] = True
  return mask


def _square(shape, top, left, size):
  mask = np.zeros(shape, bool)
  mask[top : top + size, left : left + size] = True
  return mask


# --- boundary -------------------------------------------------------------------------------------


def test_boundary_is_the_ring_of_a_square():
  square = _square((7, 7), 1, 1, 5)
  expected = square.copy()
  expected[2:5, 2:5] = False
  np.testing.assert_array_equal(surface_metrics.boundary(square), expected)


def test_boundary_counts_the_image_edge_and_uses_the_cross():
  full = np.ones((4, 5), np.uint8)
  ring = np.ones((4, 5), bool)
  ring[1:3, 1:4] = False
  # Every pixel on the image edge is a boundary pixel (outside counts as background).
  np.testing.assert_array_equal(surface_metrics.boundary(full), ring)
  # (1, 1) touches the background only at its corner (0, 0): interior under the 3x3 cross
  # (a 3x3 square erosion would make it a boundary pixel).
  notched = np.ones((5, 5), bool)
  notched[0, 0] = False
  edge = surface_metrics.boundary(notched)
  assert not edge[1, 1]
  assert edge[0, 1] and edge[1, 0]
  np.testing.assert_array_equal(
    surface_metrics.boundary(_mask((3, 3), (1, 1))), _mask((3, 3), (1, 1))
  )


@pytest.mark.parametrize("seed", range(4))
def test_boundary_matches_scipy_erosion(seed):
  mask = _blobs(np.random.default_rng(seed), (64, 64))
  # scipy's default structure is the cross and its default border_value 0 erodes edge pixels.
  expected = mask & ~ndimage.binary_erosion(mask)
  np.testing.assert_array_equal(surface_metrics.boundary(mask), expected)


# --- distance maps --------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [None, 0.5, (1.0, 1.0), (0.7, 1.9), (2.5, 0.3), ANISOTROPIC])
@pytest.mark.parametrize("density", [0.002, 0.05, 0.5])
def test_distance_to_boundary_matches_scipy(spacing, density):
  rng = np.random.default_rng(int(density * 1000))
  for shape in [(64, 64), (37, 50), (1, 40), (40, 1), (1, 1)]:
    targets = rng.random(shape) < density
    targets[rng.integers(shape[0]), rng.integers(shape[1])] = True
    sampling = None if spacing is None else np.broadcast_to(spacing, (2,))
    expected = ndimage.distance_transform_edt(~targets, sampling=sampling)
    got = surface_metrics.distance_to_boundary(targets, spacing)
    assert got.dtype == np.float64 and got.shape == shape
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


def test_isotropic_distances_are_exact_and_reproducible(monkeypatch):
  rng = np.random.default_rng(5)
  targets = rng.random((64, 64)) < 0.003
  targets[0, 0] = True
  _, nearest = ndimage.distance_transform_edt(~targets, return_indices=True)
  squared = np.square(np.indices(targets.shape) - nearest).sum(axis=0)
  exact = np.sqrt(squared.astype(np.float64))
  # OpenCV's float32 result alone differs from call to call by an ulp; dunet's may not.
  for _ in range(3):
    np.testing.assert_array_equal(surface_metrics.distance_to_boundary(targets), exact)
  np.testing.assert_array_equal(surface_metrics.distance_to_boundary(targets, 0.5), exact * 0.5)
  # Past the limit (here: any distance) the numpy transform takes over.
  monkeypatch.setattr(surface_metrics, "_OPENCV_LIMIT", 0.0)
  np.testing.assert_allclose(surface_metrics.distance_to_boundary(targets), exact, rtol=1e-15)


def test_numpy_transform_is_exact_in_float64():
  rng = np.random.default_rng(7)
  targets = rng.random((64, 48)) < 0.01
  for spacing in [(1.0, 1.0), (0.5, 0.5), (0.7, 1.9)]:
    expected = ndimage.distance_transform_edt(~targets, sampling=spacing)
    np.testing.assert_allclose(
      surface_metrics._exact_edt(targets, *spacing), expected, rtol=1e-12, atol=1e-12
    )


def test_distance_to_an_empty_boundary_is_infinite():
  distances = surface_metrics.distance_to_boundary(np.zeros((3, 4), bool), (0.5, 2.0))
  assert distances.shape == (3, 4) and np.all(np.isinf(distances))


# --- hand-computed metrics ------------------------------------------------------------------------


def test_two_single_pixels_three_apart():
  prediction, truth = _mask((5, 8), (2, 1)), _mask((5, 8), (2, 4))
  values = surface_metrics.surface_metrics(prediction, truth, spacing=ANISOTROPIC, tolerance=3.0)
  # Three columns apart: 3 pixels, 3 * 2.0 = 6 mm; nsd counts distance <= tolerance.
  assert values == {"hd95": 3, "assd": 3, "nsd": 1, "hd95_mm": 6, "assd_mm": 6, "nsd_mm": 0}
  below = surface_metrics.surface_metrics(prediction, truth, tolerance=2.99)
  assert below == {"hd95": 3, "assd": 3, "nsd": 0}
  mm = surface_metrics.surface_metrics(
    prediction, truth, spacing=ANISOTROPIC, tolerance=2.0, tolerance_mm=6.0
  )
  assert (mm["nsd"], mm["nsd_mm"]) == (0, 1)


def test_anisotropic_diagonal_by_hand():
  prediction, truth = _mask((5, 6), (0, 0)), _mask((5, 6), (3, 4))
  values = surface_metrics.surface_metrics(prediction, truth, spacing=(2.0, 0.5))
  assert values["hd95"] == pytest.approx(5.0) and values["assd"] == pytest.approx(5.0)
  # sqrt((3 * 2.0)^2 + (4 * 0.5)^2) = sqrt(40).
  assert values["hd95_mm"] == pytest.approx(math.sqrt(40), rel=1e-12)
  assert values["assd_mm"] == pytest.approx(math.sqrt(40), rel=1e-12)
  # One number: square pixels, so millimetres are pixels times the spacing.
  square = surface_metrics.surface_metrics(prediction, truth, spacing=0.25)
  assert square["hd95_mm"] == pytest.approx(1.25) and square["assd_mm"] == pytest.approx(1.25)


def test_square_shifted_by_one_column():
  # Two 4x4 squares, the second one column to the right: each ring has 12 pixels. In pixels, six
  # of each ring lie on the other ring and six are 1 away.
  truth = _square((10, 10), 2, 2, 4)
  prediction = _square((10, 10), 2, 3, 4)
  pixels = surface_metrics.surface_metrics(prediction, truth, tolerance=0.5)
  assert pixels == {"hd95": 1, "assd": 0.5, "nsd": 0.5}
  assert surface_metrics.surface_metrics(prediction, truth, tolerance=1.0)["nsd"] == 1
  # With (0.5 mm, 2 mm) pixels each ring has six points at 0, two at 0.5 mm (a row away) and four
  # at 2 mm (a column away): assd 18 / 24, hd95 2 mm, four of 12 points per ring beyond 1 mm.
  values = surface_metrics.surface_metrics(prediction, truth, spacing=ANISOTROPIC, tolerance_mm=1.0)
  assert values["hd95_mm"] == pytest.approx(2.0)
  assert values["assd_mm"] == pytest.approx(0.75)
  assert values["nsd_mm"] == pytest.approx(2 / 3)
  to_truth, to_prediction = surface_metrics.surface_distances(
    prediction, truth, spacing=ANISOTROPIC
  )
  np.testing.assert_allclose(np.sort(to_truth), [0] * 6 + [0.5] * 2 + [2] * 4)
  np.testing.assert_allclose(np.sort(to_prediction), [0] * 6 + [0.5] * 2 + [2] * 4)


def test_hd95_is_the_larger_directed_percentile_and_assd_pools_both_sides():
  # Truth: a one-pixel-thick line of 10 pixels (all boundary); prediction: its first pixel.
  truth = np.zeros((3, 12), bool)
  truth[1, 1:11] = True
  prediction = _mask((3, 12), (1, 1))
  values = surface_metrics.surface_metrics(prediction, truth, tolerance=2.0)
  # prediction -> truth: [0]; truth -> prediction: [0, 1, ..., 9], whose 95th percentile with
  # linear interpolation is at rank 0.95 * 9 = 8.55. (The pooled percentile would be 8.5.)
  assert values["hd95"] == pytest.approx(8.55)
  # The mean over the 11 pooled distances (not the mean of the two directed means, 2.25).
  assert values["assd"] == pytest.approx(45 / 11)
  # Within 2: the prediction's pixel and the truth's 0, 1, 2.
  assert values["nsd"] == pytest.approx(4 / 11)


@pytest.mark.parametrize("spacing", [None, 0.3, ANISOTROPIC])
def test_identical_masks(spacing):
  mask = _blobs(np.random.default_rng(3), (32, 40))
  values = surface_metrics.surface_metrics(mask, mask.astype(np.uint8) * 255, spacing=spacing)
  assert all(values[name] == expected for name, expected in [("hd95", 0), ("assd", 0), ("nsd", 1)])
  if spacing is not None:
    assert (values["hd95_mm"], values["assd_mm"], values["nsd_mm"]) == (0, 0, 1)


def test_mask_types_agree():
  rng = np.random.default_rng(11)
  truth, prediction = _blobs(rng, (40, 40)), _blobs(rng, (40, 40))
  expected = surface_metrics.surface_metrics(prediction, truth)
  for cast in [lambda m: m.astype(np.uint8), lambda m: m * 255, lambda m: m.astype(np.float32)]:
    assert surface_metrics.surface_metrics(cast(prediction), cast(truth)) == expected


# --- against scipy on random blobs ----------------------------------------------------------------


def _blobs(rng, shape):
  """Smooth random blobs, some cut by the image edge."""
  noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=4.0)
  return noise > 0.05


def _scipy_reference(prediction, truth, spacing, tolerance):
  """The metrics from scipy's erosion and exact distance transform (independent of dunet)."""
  edges = [mask & ~ndimage.binary_erosion(mask, border_value=0) for mask in (prediction, truth)]
  maps = [ndimage.distance_transform_edt(~edge, sampling=spacing) for edge in edges]
  to_truth, to_prediction = maps[1][edges[0]], maps[0][edges[1]]
  both = np.concatenate([to_truth, to_prediction])
  return {
    "hd95": max(np.percentile(to_truth, 95), np.percentile(to_prediction, 95)),
    "assd": both.mean(),
    "nsd": np.mean(both <= tolerance),
  }


@pytest.mark.parametrize("seed", range(5))
def test_random_blobs_match_scipy(seed):
  rng = np.random.default_rng(100 + seed)
  truth = _blobs(rng, (64, 64))
  # A prediction that is the truth moved, grown or shrunk, with its own noise.
  shifted = np.roll(truth, rng.integers(-4, 5, 2), axis=(0, 1))
  prediction = ndimage.binary_dilation(shifted, iterations=int(rng.integers(0, 3)))
  prediction ^= _blobs(rng, (64, 64)) & (rng.random((64, 64)) < 0.1)
  assert prediction.any() and truth.any()
  spacing = (0.7, 1.3)
  values = surface_metrics.surface_metrics(
    prediction, truth, spacing=spacing, tolerance=1.5, tolerance_mm=2.2
  )
  pixels = _scipy_reference(prediction, truth, None, 1.5)
  mm = _scipy_reference(prediction, truth, spacing, 2.2)
  for name in surface_metrics.METRIC_NAMES:
    assert values[name] == pytest.approx(pixels[name], rel=1e-12, abs=1e-12), name
    assert values[name + "_mm"] == pytest.approx(mm[name], rel=1e-12, abs=1e-12), name


# --- empty masks ----------------------------------------------------------------------------------


def test_empty_mask_convention():
  empty = np.zeros((16, 16), bool)
  present = _square((16, 16), 4, 4, 5)
  both = surface_metrics.surface_metrics(empty, empty, spacing=(0.5, 0.5))
  assert both == {"hd95": 0, "assd": 0, "nsd": 1, "hd95_mm": 0, "assd_mm": 0, "nsd_mm": 1}
  for prediction, truth in [(present, empty), (empty, present)]:
    values = surface_metrics.surface_metrics(prediction, truth, spacing=0.5)
    assert set(values) == {"hd95", "assd", "nsd", "hd95_mm", "assd_mm", "nsd_mm"}
    for suffix in ("", "_mm"):
      assert math.isnan(values["hd95" + suffix]) and math.isnan(values["assd" + suffix])
      assert values["nsd" + suffix] == 0
  assert dict(surface_metrics.BOTH_EMPTY) == {"hd95": 0, "assd": 0, "nsd": 1}
  assert surface_metrics.ONE_EMPTY["nsd"] == 0
  assert "both masks empty" in surface_metrics.EMPTY_MASK_CONVENTION
  assert "MONAI" in surface_metrics.MONAI_EMPTY_MASK_BEHAVIOUR


def test_surface_distances_with_an_empty_mask():
  empty, present = np.zeros((8, 8), bool), _square((8, 8), 2, 2, 3)
  to_truth, to_prediction = surface_metrics.surface_distances(present, empty)
  assert to_truth.shape == (8,) and np.all(np.isinf(to_truth)) and to_prediction.size == 0
  to_truth, to_prediction = surface_metrics.surface_distances(empty, empty)
  assert to_truth.size == 0 and to_prediction.size == 0


# --- summaries ------------------------------------------------------------------------------------


def test_summarize_surface_skips_and_counts_undefined_values():
  per_image = [
    {"hd95": 1.0, "nsd": 0.5},
    {"hd95": math.nan, "nsd": 0.0},
    {"hd95": 3.0, "nsd": 1.0},
    {"hd95": 8.0, "nsd": 1.0},
  ]
  summary = surface_metrics.summarize_surface(per_image)
  assert set(summary) == {"hd95", "nsd"}
  assert summary["hd95"] == {
    "mean": 4.0,
    "median": 3.0,
    "std": pytest.approx(math.sqrt(26 / 3)),
    "count_defined": 3,
    "count_undefined": 1,
  }
  assert summary["nsd"]["mean"] == 0.625 and summary["nsd"]["median"] == 0.75
  assert summary["nsd"]["count_defined"] == 4 and summary["nsd"]["count_undefined"] == 0
  undefined = surface_metrics.summarize_surface([{"assd": math.nan}, {"assd": math.nan}])
  assert all(math.isnan(undefined["assd"][field]) for field in ("mean", "median", "std"))
  assert (undefined["assd"]["count_defined"], undefined["assd"]["count_undefined"]) == (0, 2)
  assert surface_metrics.summarize_surface([]) == {}


def test_summarize_surface_of_real_results():
  empty, square = np.zeros((12, 12), bool), _square((12, 12), 3, 3, 4)
  results = [
    surface_metrics.surface_metrics(square, np.roll(square, 1, axis=1), spacing=0.5),
    surface_metrics.surface_metrics(empty, square, spacing=0.5),
    surface_metrics.surface_metrics(empty, empty, spacing=0.5),
  ]
  summary = surface_metrics.summarize_surface(results)
  assert list(summary) == ["hd95", "assd", "nsd", "hd95_mm", "assd_mm", "nsd_mm"]
  assert summary["hd95"]["count_undefined"] == 1 and summary["hd95"]["mean"] == 0.5
  assert summary["nsd"]["count_defined"] == 3 and summary["nsd"]["mean"] == pytest.approx(2 / 3)
  with pytest.raises(ConfigError, match="same spacing"):
    surface_metrics.summarize_surface(results + [surface_metrics.surface_metrics(empty, empty)])


# --- input checks ---------------------------------------------------------------------------------


def test_bad_masks_are_config_errors():
  mask = np.zeros((8, 8), bool)
  with pytest.raises(ConfigError, match=r"one shape, got \(8, 8\) and \(8, 9\)"):
    surface_metrics.surface_metrics(mask, np.zeros((8, 9), bool))
  with pytest.raises(ConfigError, match="truth must be a 2-D"):
    surface_metrics.surface_metrics(mask, np.zeros((8, 8, 1), bool))
  with pytest.raises(ConfigError, match="prediction must be a 2-D"):
    surface_metrics.surface_metrics(np.zeros(8, bool), mask)
  with pytest.raises(ConfigError, match="empty"):
    surface_metrics.surface_metrics(np.zeros((0, 8), bool), np.zeros((0, 8), bool))
  with pytest.raises(ConfigError, match="binarize"):
    surface_metrics.surface_metrics(np.full((8, 8), 0.7, np.float32), mask)
  with pytest.raises(ConfigError, match="dtype"):
    surface_metrics.boundary(np.full((2, 2), "a"))


@pytest.mark.parametrize(
  "spacing", [0, -1.0, math.nan, math.inf, (1.0, 0.0), (1.0, 2.0, 3.0), "12", (1.0,), True]
)
def test_bad_spacing_is_a_config_error(spacing):
  mask = _square((8, 8), 2, 2, 3)
  with pytest.raises(ConfigError, match="spacing"):
    surface_metrics.surface_metrics(mask, mask, spacing=spacing)
  with pytest.raises(ConfigError, match="spacing"):
    surface_metrics.distance_to_boundary(mask, spacing)


@pytest.mark.parametrize("keyword", ["tolerance", "tolerance_mm"])
@pytest.mark.parametrize("value", [-0.5, math.inf, math.nan, "x"])
def test_bad_tolerance_is_a_config_error(keyword, value):
  mask = _square((8, 8), 2, 2, 3)
  with pytest.raises(ConfigError, match=keyword):
    surface_metrics.surface_metrics(mask, mask, spacing=1.0, **{keyword: value})
