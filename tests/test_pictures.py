"""dunet/pictures.py: PNG files of the expected size, curves where their values put them (from
event files written here with tf.summary and as TF 1 simple values), histogram bars proportional
to counts, and the montage's layout with known coloured arrays. The worst-case builder, which
needs a model, is tested in test_results_table.py."""

import os

import cv2
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import summary_pb2
from tensorflow.core.util import event_pb2

from dunet import pictures
from dunet import results


def _read_png(path):
  with open(path, "rb") as handle:
    data = handle.read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]  # RGB


def _is(picture, color):
  return np.all(picture == np.asarray(color, np.uint8), axis=-1)


def _write_tf2_scalars(folder, tag, steps, values):
  writer = tf.summary.create_file_writer(str(folder))
  with writer.as_default():
    for step, value in zip(steps, values):
      tf.summary.scalar(tag, value, step=step)
  writer.close()


def _write_tf1_scalars(folder, tag, steps, values):
  """Scalars as TF 1 wrote them (`simple_value`), one Event record each."""
  os.makedirs(folder, exist_ok=True)
  with tf.io.TFRecordWriter(os.path.join(folder, "events.out.tfevents.1.tf1")) as writer:
    for step, value in zip(steps, values):
      summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
      writer.write(event_pb2.Event(step=step, wall_time=1.0, summary=summary).SerializeToString())


def test_nice_ticks():
  assert pictures.nice_ticks(0, 1).tolist() == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
  assert pictures.nice_ticks(0, 1000).tolist() == [0, 200, 400, 600, 800, 1000]
  assert pictures.nice_ticks(0.13, 0.71).tolist() == [0.0, 0.2, 0.4, 0.6, 0.8]
  assert pictures.nice_ticks(0.13, 0.31).tolist() == [0.1, 0.15, 0.2, 0.25, 0.3, 0.35]
  ticks = pictures.nice_ticks(5, 5)  # one value: a range around it
  assert ticks[0] < 5 < ticks[-1]


def test_read_scalars_reads_tensors_and_simple_values(tmp_path):
  _write_tf2_scalars(tmp_path / "a", "loss/total", [0, 10, 20], [1.0, 0.5, 0.25])
  _write_tf1_scalars(tmp_path / "a", "head2/per_image/dsc", [10, 20], [0.5, 0.75])
  # A resumed run writes step 20 again in a later file: the last value counts.
  _write_tf2_scalars(tmp_path / "b", "loss/total", [0, 10], [1.0, 0.5])
  read = pictures.read_scalars(tmp_path / "a", ["loss/total", "head2/per_image/dsc", "other"])
  assert sorted(read) == ["head2/per_image/dsc", "loss/total"]
  steps, values = read["loss/total"]
  assert steps.tolist() == [0, 10, 20] and values.tolist() == pytest.approx([1.0, 0.5, 0.25])
  steps, values = read["head2/per_image/dsc"]
  assert steps.tolist() == [10, 20] and values.tolist() == pytest.approx([0.5, 0.75])
  assert pictures.read_scalars(tmp_path / "missing", ["loss/total"]) == {}


def test_learning_curves_draw_each_line_where_its_values_are(tmp_path):
  workdir = tmp_path / "run"
  steps = list(range(0, 101, 5))
  # Train loss falls linearly from 2 to 1 (TF 2 tensors); validation DSC rises linearly from
  # 0.2 to 0.8 (TF 1 simple values), on the right scale (0 to 1).
  _write_tf2_scalars(workdir / "train", "loss/total", steps, [2.0 - s / 100 for s in steps])
  valid_steps = list(range(0, 101, 25))
  _write_tf1_scalars(
    workdir / "valid",
    "head2/per_image/dsc",
    valid_steps,
    [0.2 + 0.6 * s / 100 for s in valid_steps],
  )
  picture = pictures.learning_curves(str(workdir))
  path = pictures.write_png(tmp_path / "curves.png", picture)
  picture = _read_png(path)
  assert picture.shape == (*pictures.PLOT_SIZE, 3)
  top, left, bottom, right = pictures.plot_area()

  def line_y(color, fraction):
    """Mean row of `color`'s pixels in the plot area's column at `fraction` of the x range."""
    x = int(round(left + fraction * (right - left)))
    rows = np.nonzero(_is(picture[top:bottom, x - 1 : x + 2], color).any(axis=1))[0] + top
    assert rows.size, f"no pixel of {color} at x={x}"
    return rows.mean()

  def y_of(value, low, high):
    return bottom + (value - low) / (high - low) * (top - bottom)

  # The x axis runs over 0..100 (round ticks); the DSC scale is 0..1.
  for fraction in (0.1, 0.4, 0.6, 0.9):
    assert line_y(pictures.VALID_DSC_COLOR, fraction) == pytest.approx(
      y_of(0.2 + 0.6 * fraction, 0.0, 1.0), abs=3
    )
  # The loss scale covers 1..2 with round ticks: 1.0 .. 2.0 (the lines cross at the middle).
  for fraction in (0.1, 0.3, 0.8):
    assert line_y(pictures.TRAIN_LOSS_COLOR, fraction) == pytest.approx(
      y_of(2.0 - fraction, 1.0, 2.0), abs=3
    )
  # No validation loss was written: its colour appears nowhere (not even in the legend).
  assert not _is(picture, pictures.VALID_LOSS_COLOR).any()
  # The legend and the title lie above the plot area; tick labels to its left and below.
  assert _is(picture[:top], pictures.TRAIN_LOSS_COLOR).any()
  assert (picture[:top] < 100).all(axis=-1).any()
  assert (picture[bottom + 2 :, left:right] < 100).all(axis=-1).any()
  assert (picture[top:bottom, : left - 2] < 100).all(axis=-1).any()


def test_learning_curves_of_a_run_without_events_is_none(tmp_path):
  assert pictures.learning_curves(str(tmp_path)) is None


def test_plot_series_leaves_out_non_finite_values_and_marks_single_points():
  picture = pictures.plot_series(
    [
      pictures.Series("a", np.array([0, 1, 2]), np.array([1.0, np.nan, np.inf]), (255, 0, 0)),
      pictures.Series("b", np.array([5]), np.array([0.5]), (0, 0, 255), "right"),
    ],
    title="t",
    right_range=(0.0, 1.0),
    size=(300, 500),
  )
  assert picture.shape == (300, 500, 3)
  top, left, bottom, right = pictures.plot_area((300, 500))
  assert _is(picture[top:bottom, left:right], (255, 0, 0)).any()  # the one finite point
  assert _is(picture[top:bottom, left:right], (0, 0, 255)).any()


def test_histogram_bars_are_proportional_to_their_counts(tmp_path):
  scores = [0.12] * 2 + [0.5, 0.51, 0.52, 0.549] + [0.97] * 7 + [1.0] + [float("nan")]
  counts = pictures.histogram_counts(scores)
  expected = np.zeros(20, int)
  for score in scores:
    if score == score:
      expected[min(int(score / 0.05 + 1e-9), 19)] += 1
  assert counts.tolist() == expected.tolist()
  assert (counts[2], counts[10], counts[19]) == (2, 4, 8)
  path = pictures.write_png(tmp_path / "h.png", pictures.dsc_histogram(scores, "run test"))
  picture = _read_png(path)
  assert picture.shape == (*pictures.PLOT_SIZE, 3)
  top, left, bottom, right = pictures.plot_area()
  heights = []
  for index in range(20):
    x = int(round(left + (index + 0.5) * 0.05 * (right - left)))
    column = _is(picture[top:bottom, x], pictures.BAR_COLOR)
    heights.append(int(column.sum()))
    # Each drawn count is written just above its bar; empty bins have neither.
    bar_top = bottom - heights[-1]
    label = (picture[bar_top - 18 : bar_top - 2, x - 8 : x + 8] < 100).all(axis=-1).any()
    assert label == bool(counts[index]), index
  heights = np.asarray(heights)
  assert (heights[counts == 0] == 0).all()
  per_image = heights[counts > 0] / counts[counts > 0]
  assert per_image.max() - per_image.min() <= 2 / 2  # within a pixel for a count of 2
  # The y scale: 0 to 10 (round ticks over the largest count, 8, plus room for its label).
  assert heights[19] == pytest.approx(0.8 * (bottom - top), abs=2)


def test_montage_layout_with_known_colours(tmp_path):
  colours = [(0, 0, 200), (0, 200, 200), (200, 0, 200)]
  size = (32, 64)  # half as high as wide: fitted into a 3:4 cell with grey margins above/below
  images = [np.full((*size, 3), colour, np.uint8) for colour in colours]
  truths = [np.zeros(size), np.ones(size), np.zeros(size, bool)]
  predictions = [np.ones(size), np.zeros(size), np.ones(size, bool)]
  names = ["worst", "second", "third"]
  picture = pictures.montage(images, truths, predictions, names, [0.0, 0.25, 0.5])
  height, width = pictures.MONTAGE_CELL
  assert picture.shape == (
    pictures.MONTAGE_HEADER + 3 * (pictures.MONTAGE_BAND + height + pictures.MONTAGE_GAP),
    3 * width + 4 * pictures.MONTAGE_GAP,
    3,
  )
  alpha = 0.45

  def blend(colour, over):
    return tuple(int((1 - alpha) * c + alpha * o) for c, o in zip(colour, over))

  for row, colour in enumerate(colours):
    truth_colour = blend(colour, pictures.TRUTH_COLOR) if truths[row].any() else colour
    prediction_colour = (
      blend(colour, pictures.PREDICTION_COLOR) if predictions[row].any() else colour
    )
    for column, expected in enumerate((colour, truth_colour, prediction_colour)):
      top, left, bottom, right = pictures.montage_cell(row, column)
      centre = picture[(top + bottom) // 2, (left + right) // 2]
      assert np.abs(centre.astype(int) - expected).max() <= 1, (row, column)
      # 32x64 scaled by 4 into 192x256: 128 rows of picture, 32 grey rows above and below.
      assert tuple(picture[top + 5, (left + right) // 2]) == pictures.MONTAGE_BACKGROUND
      assert tuple(picture[top + 40, (left + right) // 2]) != pictures.MONTAGE_BACKGROUND
    # The prediction's cell outlines the ground truth (row 1's covers the whole picture).
    top, left, bottom, right = pictures.montage_cell(row, 2)
    outline = _is(picture[top:bottom, left:right], pictures.TRUTH_COLOR)
    assert outline.any() == bool(truths[row].any()), row
    if truths[row].any():
      assert outline[32, width // 2] and outline[32 + 127, width // 2]  # the picture's edges
    # The row's caption (name and DSC) is written in the band above its cells.
    top, left, _, _ = pictures.montage_cell(row, 0)
    band = picture[top - pictures.MONTAGE_BAND : top, left : left + 200]
    assert (band < 100).all(axis=-1).any()
  path = pictures.write_png(tmp_path / "m.png", picture)
  assert np.array_equal(_read_png(path), picture)
  with pytest.raises(ValueError, match="differ in length"):
    pictures.montage(images, truths, predictions[:2], names, [0.0] * 3)
  with pytest.raises(ValueError, match="mask"):
    pictures.montage(images[:1], [np.zeros((8, 8))], predictions[:1], names[:1], [0.0])
  assert pictures.montage([], [], [], [], []).shape[0] == pictures.MONTAGE_HEADER


def test_montage_fits_pictures_of_different_sizes():
  images = [np.full((100, 50, 3), 90, np.uint8), np.full((20, 300, 3), 160, np.uint8)]
  masks = [np.zeros(image.shape[:2]) for image in images]
  picture = pictures.montage(images, masks, masks, ["tall", "wide"], [0.1, 0.2], cell_size=(60, 80))
  for row, image in enumerate(images):
    top, left, bottom, right = pictures.montage_cell(row, 2, (60, 80))
    cell = picture[top:bottom, left:right]
    drawn = np.all(cell == image[0, 0], axis=-1)
    rows, columns = np.nonzero(drawn)
    # Aspect kept: the drawn block's shape is the picture's, scaled to fit the cell.
    scale = min(60 / image.shape[0], 80 / image.shape[1])
    assert np.ptp(rows) + 1 == pytest.approx(image.shape[0] * scale, abs=1)
    assert np.ptp(columns) + 1 == pytest.approx(image.shape[1] * scale, abs=1)


def test_runs_of_gives_unique_folder_names(tmp_path):
  def evaluation(workdir, experiment=""):
    return results.Evaluation(
      eval_dir=os.path.join(workdir, "eval", "test"),
      workdir=workdir,
      run=os.path.basename(workdir),
      variant="test",
      dataset="d",
      split="test",
      images=1,
      scores={},
      fold=0 if experiment else None,
      experiment=experiment,
    )

  a = str(tmp_path / "cv_a")
  b = str(tmp_path / "cv_b")
  evaluations = [
    evaluation(os.path.join(a, "fold_0"), a),
    evaluation(os.path.join(b, "fold_0"), b),
    evaluation(str(tmp_path / "x" / "run")),
    evaluation(str(tmp_path / "y" / "run")),
    evaluation(os.path.join(a, "fold_0"), a),  # a second evaluation of the same run
  ]
  grouped = pictures.runs_of(evaluations)
  assert [(name, len(members)) for name, _, members in grouped] == [
    ("cv_a-fold_0", 2),
    ("cv_b-fold_0", 1),
    ("run", 1),
    ("run-2", 1),
  ]
