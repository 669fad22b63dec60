"""PNG pictures of a run, drawn with OpenCV: learning curves, the per-image DSC histogram, and
a montage of the worst images of an evaluation.

  learning_curves  train loss, validation loss and validation DSC against the step, from the
                   run's TensorBoard event files (<workdir>/train, <workdir>/valid)
  dsc_histogram    per_image.csv's DSC in bins of 0.05, each bar's count written above it
  montage          picture | ground truth | prediction, one row per image, name and DSC written
  worst_cases      the arrays `montage` takes, for an evaluation's lowest-DSC images: pictures
                   and masks from the evaluated data, predictions from the evaluated model, run
                   again on those images only (dunet-evaluate keeps no predicted masks)
  write_run_pictures  all of them for one run, as PNG files

Pictures are uint8 RGB arrays [H, W, 3] until written (`write_png`, atomic). Nothing here reads
flags; dunet/results_table.py is the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import tensorflow as tf

from dunet import evaluation as evaluation_lib
from dunet import fileio
from dunet import inference
from dunet import metrics
from dunet import results
from dunet import serving
from dunet import summaries
from dunet.data import layouts
from dunet.data import readers
from dunet.errors import DataError
from dunet.errors import DunetError

PathLike = Union[str, "os.PathLike[str]"]
Color = Tuple[int, int, int]  # RGB

PLOT_SIZE = (500, 800)  # (height, width) of the curves and the histogram
# Plot area margins: title and legend above, tick labels and axis titles around.
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 80, 70, 70, 60
WHITE, BLACK, GRID = (255, 255, 255), (0, 0, 0), (225, 225, 225)
TRAIN_LOSS_COLOR: Color = (31, 119, 180)
VALID_LOSS_COLOR: Color = (44, 160, 44)
VALID_DSC_COLOR: Color = (255, 127, 14)
BAR_COLOR: Color = (31, 119, 180)
TRUTH_COLOR: Color = (0, 255, 0)
PREDICTION_COLOR: Color = (255, 0, 0)
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE, TITLE_SCALE = 0.45, 0.6

# TensorBoard scalars training writes (dunet/controller.py, dunet/trainer.py).
TRAIN_DIR, VALID_DIR = "train", "valid"
LOSS_TAG, DSC_TAG = "loss/total", "head2/per_image/dsc"

HISTOGRAM_BIN = 0.05
# Montage: a title line over the columns, a text band over each row's pictures, gaps.
MONTAGE_HEADER, MONTAGE_BAND, MONTAGE_GAP = 30, 26, 6
MONTAGE_CELL = (192, 256)  # (height, width) each picture is fitted into
MONTAGE_COLUMNS = ("picture", "ground truth", "prediction")
MONTAGE_BACKGROUND = (240, 240, 240)
DEFAULT_WORST = 8

CURVES_PNG = "learning_curves.png"
HISTOGRAM_PNG = "dsc_histogram-{variant}.png"
WORST_PNG = "worst-{variant}.png"


@dataclasses.dataclass(frozen=True)
class Series:
  """One line of a plot: values against steps, drawn in `color` against the `axis` scale."""

  label: str
  steps: np.ndarray
  values: np.ndarray
  color: Color
  axis: str = "left"  # "left" or "right"


@dataclasses.dataclass(frozen=True)
class Cases:
  """What `montage` takes: per image, the picture (uint8 RGB [H, W, 3]), its ground truth and
  prediction (bool or {0, 1} [H, W], the picture's size), its name and DSC."""

  images: List[np.ndarray]
  truths: List[np.ndarray]
  predictions: List[np.ndarray]
  names: List[str]
  scores: List[float]


# ================================================================================================
# Plots
# ================================================================================================


def plot_area(size: Tuple[int, int] = PLOT_SIZE) -> Tuple[int, int, int, int]:
  """(top, left, bottom, right) pixel bounds of the data area of a plot of `size` (H, W)."""
  height, width = size
  return MARGIN_TOP, MARGIN_LEFT, height - MARGIN_BOTTOM, width - MARGIN_RIGHT


def nice_ticks(low: float, high: float, count: int = 5) -> np.ndarray:
  """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [low, high]; the
  first and last are the axis' ends."""
  if not (math.isfinite(low) and math.isfinite(high)):
    low, high = 0.0, 1.0
  if high <= low:
    pad = abs(low) * 0.1 or 1.0
    low, high = low - pad, high + pad
  raw = (high - low) / max(count, 1)
  magnitude = 10.0 ** math.floor(math.log10(raw))
  step = next(m * magnitude for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw * 0.999)
  start = math.floor(low / step + 1e-9) * step
  stop = math.ceil(high / step - 1e-9) * step
  return np.round(np.arange(start, stop + step / 2, step), 10)


def plot_series(
  series: Sequence[Series],
  *,
  title: str,
  x_label: str = "step",
  left_label: str = "",
  right_label: str = "",
  right_range: Optional[Tuple[float, float]] = None,
  size: Tuple[int, int] = PLOT_SIZE,
) -> np.ndarray:
  """A line plot: axes with tick labels and grid, a left and an optional right scale, a legend
  above the plot area, and a title.

  Args:
    series: the lines; non-finite values are left out; a line of one point is a dot.
    title: drawn at the top.
    x_label, left_label, right_label: the axes' titles.
    right_range: the right scale's (low, high); default: its series' range.
    size: (height, width) in pixels.

  Returns:
    uint8 RGB [height, width, 3].
  """
  canvas = np.full((*size, 3), WHITE, np.uint8)
  top, left, bottom, right = plot_area(size)
  cleaned = [_finite(line) for line in series]
  steps = np.concatenate([line.steps for line in cleaned] + [np.zeros(0)])
  x_ticks = nice_ticks(float(steps.min()), float(steps.max())) if steps.size else nice_ticks(0, 1)
  scales = {}
  for axis in ("left", "right"):
    values = np.concatenate([line.values for line in cleaned if line.axis == axis] + [np.zeros(0)])
    if axis == "right" and right_range is not None:
      scales[axis] = nice_ticks(*right_range)
    elif values.size:
      scales[axis] = nice_ticks(float(values.min()), float(values.max()))
  if not scales:
    scales["left"] = nice_ticks(0.0, 1.0)
  x_of = _mapper(x_ticks[0], x_ticks[-1], left, right)
  # Grid lines at the primary scale's ticks (the left one when present).
  primary = "left" if "left" in scales else "right"
  y_grid = _mapper(scales[primary][0], scales[primary][-1], bottom, top)
  for tick in x_ticks:
    cv2.line(canvas, (x_of(tick), top), (x_of(tick), bottom), GRID, 1)
  for tick in scales[primary]:
    cv2.line(canvas, (left, y_grid(tick)), (right, y_grid(tick)), GRID, 1)
  for line in cleaned:
    if not line.steps.size:
      continue
    ticks = scales[line.axis]
    y_of = _mapper(ticks[0], ticks[-1], bottom, top)
    points = np.array(
      [[x_of(x), y_of(y)] for x, y in zip(line.steps, line.values)], np.int32
    ).reshape(-1, 1, 2)
    if len(points) > 1:
      cv2.polylines(canvas, [points], False, line.color, 2, cv2.LINE_AA)
    if len(points) <= 20:  # few points (validations): mark each
      for point in points[:, 0]:
        cv2.circle(canvas, tuple(int(v) for v in point), 3, line.color, -1, cv2.LINE_AA)
  cv2.rectangle(canvas, (left, top), (right, bottom), BLACK, 1)
  _x_axis(canvas, x_ticks, x_of, bottom, x_label)
  for axis, ticks in scales.items():
    _y_axis(canvas, ticks, axis, left if axis == "left" else right, top, bottom)
  _y_title(canvas, left_label if "left" in scales else "", right_label, size)
  _title(canvas, title)
  _legend(canvas, [(line.label, line.color) for line in series], right, top - 14)
  return canvas


def read_scalars(event_dir: PathLike, tags: Sequence[str]) -> Dict[str, Tuple[np.ndarray, ...]]:
  """Scalars of TensorBoard event files, by tag: (steps, values), sorted by step.

  Scalars written as tensors (tf.summary in TF 2) and as `simple_value` (TF 1) are both read; a
  step written twice (a resumed run) keeps its last value; a truncated last record (a run
  killed while writing) ends that file. Tags with no values are left out; a missing folder
  gives {}.
  """
  event_dir = os.fspath(event_dir)
  found: Dict[str, Dict[int, float]] = {tag: {} for tag in tags}
  if not tf.io.gfile.isdir(event_dir):
    return {}
  names = sorted(name for name in tf.io.gfile.listdir(event_dir) if "tfevents" in name)
  for name in names:
    try:
      for event in tf.compat.v1.train.summary_iterator(os.path.join(event_dir, name)):
        for value in event.summary.value:
          if value.tag not in found:
            continue
          if value.HasField("tensor"):
            number = float(np.asarray(tf.make_ndarray(value.tensor)).reshape(-1)[0])
          elif value.HasField("simple_value"):
            number = float(value.simple_value)
          else:
            continue
          found[value.tag][int(event.step)] = number
    except tf.errors.DataLossError:
      continue
  return {
    tag: (
      np.array(sorted(values), np.int64),
      np.array([values[step] for step in sorted(values)], np.float64),
    )
    for tag, values in found.items()
    if values
  }


def learning_curves(workdir: PathLike, title: str = "") -> Optional[np.ndarray]:
  """The run's train loss, validation loss (left scale) and validation DSC of head 2 (right
  scale, 0 to 1) against the step; None when the workdir holds no such scalars."""
  workdir = os.fspath(workdir)
  train = read_scalars(os.path.join(workdir, TRAIN_DIR), [LOSS_TAG])
  valid = read_scalars(os.path.join(workdir, VALID_DIR), [LOSS_TAG, DSC_TAG])
  series = []
  if LOSS_TAG in train:
    series.append(Series("loss (train)", *train[LOSS_TAG], TRAIN_LOSS_COLOR))
  if LOSS_TAG in valid:
    series.append(Series("loss (valid)", *valid[LOSS_TAG], VALID_LOSS_COLOR))
  if DSC_TAG in valid:
    series.append(Series("DSC head 2 (valid)", *valid[DSC_TAG], VALID_DSC_COLOR, "right"))
  if not series:
    return None
  return plot_series(
    series,
    title=title or f"{os.path.basename(os.path.normpath(workdir))}: learning curves",
    left_label="loss",
    right_label="DSC",
    right_range=(0.0, 1.0),
  )


def histogram_counts(scores: Sequence[float]) -> np.ndarray:
  """Counts of `scores` in bins of HISTOGRAM_BIN over [0, 1] (the last bin holds 1.0); values
  outside [0, 1] or not finite are left out."""
  values = np.asarray(scores, np.float64)
  values = values[np.isfinite(values) & (values >= 0.0) & (values <= 1.0)]
  edges = np.linspace(0.0, 1.0, int(round(1.0 / HISTOGRAM_BIN)) + 1)
  return np.histogram(values, bins=edges)[0]


def dsc_histogram(
  scores: Sequence[float], title: str = "", size: Tuple[int, int] = PLOT_SIZE
) -> np.ndarray:
  """Per-image DSC in bins of 0.05 over [0, 1], each bar's count written above it.

  Returns:
    uint8 RGB [height, width, 3]; bar heights are proportional to the counts, on a scale from 0
    at the plot area's bottom (see `plot_area`).
  """
  counts = histogram_counts(scores)
  values = np.asarray(scores, np.float64)
  values = values[np.isfinite(values)]
  canvas = np.full((*size, 3), WHITE, np.uint8)
  top, left, bottom, right = plot_area(size)
  y_ticks = nice_ticks(0.0, max(float(counts.max()) * 1.1, 1.0))
  if y_ticks[1] - y_ticks[0] < 1:  # counts are integers
    y_ticks = np.arange(0, max(int(math.ceil(y_ticks[-1])), 1) + 1)
  x_ticks = np.round(np.arange(0.0, 1.0001, 0.1), 1)
  x_of = _mapper(0.0, 1.0, left, right)
  y_of = _mapper(y_ticks[0], y_ticks[-1], bottom, top)
  for tick in y_ticks:
    cv2.line(canvas, (left, y_of(tick)), (right, y_of(tick)), GRID, 1)
  for index, count in enumerate(counts):
    x0, x1 = x_of(index * HISTOGRAM_BIN) + 1, x_of((index + 1) * HISTOGRAM_BIN) - 1
    if count:
      cv2.rectangle(canvas, (x0, y_of(count)), (x1, bottom - 1), BAR_COLOR, -1)
      _text(canvas, str(int(count)), ((x0 + x1) // 2, y_of(count) - 5), anchor="bottom")
  cv2.rectangle(canvas, (left, top), (right, bottom), BLACK, 1)
  _x_axis(canvas, x_ticks, x_of, bottom, "DSC (head 2, per image)")
  _y_axis(canvas, y_ticks, "left", left, top, bottom)
  _y_title(canvas, "images", "", size)
  mean = f", mean {values.mean():.4f}" if values.size else ""
  _title(canvas, f"{title + ': ' if title else ''}per-image DSC ({values.size} images{mean})")
  return canvas


# ================================================================================================
# The montage of worst cases
# ================================================================================================


def montage_cell(
  row: int, column: int, cell_size: Tuple[int, int] = MONTAGE_CELL
) -> Tuple[int, int, int, int]:
  """(top, left, bottom, right) of a picture's cell in a montage (bottom and right exclusive)."""
  height, width = cell_size
  top = MONTAGE_HEADER + row * (MONTAGE_BAND + height + MONTAGE_GAP) + MONTAGE_BAND
  left = MONTAGE_GAP + column * (width + MONTAGE_GAP)
  return top, left, top + height, left + width


def montage(
  images: Sequence[np.ndarray],
  truths: Sequence[np.ndarray],
  predictions: Sequence[np.ndarray],
  names: Sequence[str],
  scores: Sequence[float],
  cell_size: Tuple[int, int] = MONTAGE_CELL,
) -> np.ndarray:
  """One row per image: picture | ground truth (green) | prediction (red, with the ground
  truth's outline in green), overlaid on the picture, each fitted into a cell (aspect kept, grey
  margins), with the name and DSC above.

  Args:
    images: uint8 RGB [H, W, 3] each (sizes may differ between rows).
    truths, predictions: [H, W] each, foreground where >= 0.5 (bool, {0, 1} or probabilities).
    names, scores: written over each row.
    cell_size: (height, width) of a cell (see `montage_cell`).

  Returns:
    uint8 RGB: MONTAGE_HEADER + N rows of (MONTAGE_BAND + cell height + MONTAGE_GAP) high,
    3 cells and 4 gaps wide.

  Raises:
    ValueError: lists of different lengths, or a mask whose size is not its picture's.
  """
  count = len(images)
  if not count == len(truths) == len(predictions) == len(names) == len(scores):
    raise ValueError("montage: images, truths, predictions, names and scores differ in length")
  height, width = cell_size
  canvas = np.full(
    (
      MONTAGE_HEADER + count * (MONTAGE_BAND + height + MONTAGE_GAP),
      len(MONTAGE_COLUMNS) * (width + MONTAGE_GAP) + MONTAGE_GAP,
      3,
    ),
    WHITE,
    np.uint8,
  )
  for column, label in enumerate(MONTAGE_COLUMNS):
    _, x0, _, x1 = montage_cell(0, column, cell_size)
    _text(canvas, label, ((x0 + x1) // 2, MONTAGE_HEADER // 2), scale=TITLE_SCALE)
  for row, (image, truth, prediction, name, score) in enumerate(
    zip(images, truths, predictions, names, scores)
  ):
    image = np.asarray(image, np.uint8)
    for mask in (truth, prediction):
      if np.shape(mask)[:2] != image.shape[:2]:
        raise ValueError(
          f"montage: {name}'s mask is {np.shape(mask)[:2]}, its picture {image.shape[:2]}"
        )
    panels = (
      image,
      summaries.overlay(image[None], np.asarray(truth, np.float32)[None], TRUTH_COLOR)[0],
      summaries.overlay(image[None], np.asarray(prediction, np.float32)[None], PREDICTION_COLOR)[0],
    )
    top, x0, _, _ = montage_cell(row, 0, cell_size)
    _, _, _, x1 = montage_cell(row, len(MONTAGE_COLUMNS) - 1, cell_size)
    caption = _fit_text(f"{name}   DSC {score:.4f}", x1 - x0)
    cv2.putText(canvas, caption, (x0, top - 8), FONT, FONT_SCALE + 0.05, BLACK, 1, cv2.LINE_AA)
    cells = [_fit(panel, cell_size) for panel in panels]
    # The ground truth's outline on the prediction: misses and false alarms at a glance.
    fitted_truth = _fit(
      np.repeat((np.asarray(truth) >= 0.5).astype(np.uint8)[:, :, None], 3, axis=2),
      cell_size,
      cv2.INTER_NEAREST,
    )[:, :, 0]
    contours, _ = cv2.findContours(fitted_truth, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(cells[2], contours, -1, TRUTH_COLOR, 1)
    for column, cell in enumerate(cells):
      cell_top, cell_left, cell_bottom, cell_right = montage_cell(row, column, cell_size)
      canvas[cell_top:cell_bottom, cell_left:cell_right] = cell
  return canvas


def load_report_model(report: Dict[str, object]) -> serving.LoadedSegmenter:
  """The model an evaluation report scored, loaded as it was: its checkpoint (every member of an
  ensemble), input size and preprocessing, and what the report says its serve call did inside
  (flips, tiled inference, post-processing, when recorded); the model with recomputed BatchNorm
  statistics when the evaluation made one. Flips averaged outside the model are applied by
  `worst_cases`.

  Raises:
    dunet.errors.CheckpointNotFoundError: the model is no longer there.
  """
  model = report["model"]
  recomputed = (report.get("batch_norm_recomputed") or {}).get("checkpoint")
  source = recomputed or model["source"]
  # Only settings that differ from a plain call are passed: reports of older dunet versions
  # record none of them.
  options: Dict[str, object] = {}
  if model.get("flips"):
    options["flips"] = tuple(model["flips"])
  if model.get("tiling"):
    options["tile_overlap"] = float(model["tiling"]["overlap"])
  if model.get("postprocessing") not in (None, "none"):
    options["postprocessing"] = model["postprocessing"]
    options["threshold"] = float(report.get("threshold", 0.5))
  if model.get("kind") == "saved_model" and not recomputed:
    return serving.load_segmenter(source, **options)
  return serving.load_segmenter(
    source,
    height=model.get("input_height"),
    width=model.get("input_width"),
    preprocessing=model.get("preprocessing"),
    **options,
  )


def outside_flips(report: Dict[str, object]) -> List[str]:
  """The flips an evaluation averaged around the model's serve call (dunet-evaluate --tta): the
  report's "tta", unless the model recorded them as its own."""
  if report["model"].get("flips"):
    return []
  return list(report.get("tta") or [])


def worst_cases(
  evaluation: results.Evaluation,
  count: int = DEFAULT_WORST,
  *,
  loaded: Optional[serving.LoadedSegmenter] = None,
  batch_size: int = 8,
) -> Cases:
  """The `count` images of an evaluation with the lowest DSC in its per_image.csv (ties by
  name), as the evaluation saw them.

  Pictures and ground truths come from the evaluated data (the prepared split's records, with
  the original-resolution masks of validation and test records, or the raw folder), predictions
  from the evaluated model (or `loaded`) run on those images only, with the report's
  threshold and test-time flips, resized to the ground truth's size as dunet-evaluate does.
  The pictures are resized to that size too.

  Raises:
    DataError: per_image.csv or the data are missing or damaged, or lack an image it names.
    dunet.errors.CheckpointNotFoundError: the evaluated model is no longer there.
  """
  report = evaluation.report
  rows = results.read_per_image_csv(evaluation.per_image_path)
  dsc = results.per_image_values(rows, "dsc")
  order = sorted(
    (index for index in range(len(rows)) if np.isfinite(dsc[index])),
    key=lambda index: (dsc[index], rows[index]["name"]),
  )[: max(count, 0)]
  chosen = [
    (rows[index]["name"], rows[index].get("split", ""), float(dsc[index])) for index in order
  ]
  if not chosen:
    return Cases([], [], [], [], [])
  loaded = loaded or load_report_model(report)
  flips = outside_flips(report)
  segment = inference.make_segment_fn(loaded, bool(flips), flips or tuple(serving.FLIPS))
  examples = _examples(report["data"], chosen, batch_size)
  threshold = float(report.get("threshold", 0.5))
  cases = Cases([], [], [], [], [])
  for name, split, score in chosen:
    image, truth = examples[(name, split)]
    probabilities = segment(image[None])[serving.PROBABILITY]
    if probabilities.shape[1:3] != truth.shape:
      probabilities = serving.resize_probabilities(
        probabilities, tf.constant(truth.shape, tf.int32)
      ).numpy()
    if image.shape[:2] != truth.shape:
      image = cv2.resize(image, truth.shape[::-1], interpolation=cv2.INTER_LINEAR)
    cases.images.append(image)
    cases.truths.append(truth > 0)
    cases.predictions.append(metrics.binarize(probabilities[0, :, :, 0], threshold))
    cases.names.append(name)
    cases.scores.append(score)
  return cases


# ================================================================================================
# Files
# ================================================================================================


def write_png(path: PathLike, pixels: np.ndarray) -> str:
  """Writes uint8 RGB [H, W, 3] (or gray [H, W]) as a PNG file, atomically; returns the path."""
  fileio.write_bytes_atomic(path, inference.encode_png(np.asarray(pixels, np.uint8)))
  return os.fspath(path)


def runs_of(
  evaluations: Sequence[results.Evaluation],
) -> List[Tuple[str, Optional[str], List[results.Evaluation]]]:
  """The evaluations grouped by run: (folder name, workdir or None, evaluations), in the order
  found. Folder names are unique: a fold's is <experiment>-<run> (fold_0 of two experiments
  differ), and a repeated name gets -2, -3..."""
  groups: Dict[str, Tuple[Optional[str], List[results.Evaluation]]] = {}
  names: Dict[str, str] = {}
  for evaluation in evaluations:
    key = os.path.abspath(evaluation.workdir or evaluation.eval_dir)
    if key not in groups:
      name = evaluation.run
      if evaluation.experiment:
        name = f"{os.path.basename(evaluation.experiment)}-{name}"
      base, number = name, 1
      while name in names.values():
        number += 1
        name = f"{base}-{number}"
      names[key] = name
      groups[key] = (evaluation.workdir, [])
    groups[key][1].append(evaluation)
  return [(names[key], workdir, members) for key, (workdir, members) in groups.items()]


def write_run_pictures(
  workdir: Optional[PathLike],
  evaluations: Sequence[results.Evaluation],
  out_dir: PathLike,
  *,
  worst: int = DEFAULT_WORST,
  log: Callable[[str], None] = lambda message: None,
) -> Tuple[List[str], List[str]]:
  """A run's pictures into `out_dir`: learning_curves.png (when the workdir has TensorBoard
  scalars), and per evaluation dsc_histogram-<variant>.png and worst-<variant>.png (the
  `worst` lowest-DSC images; 0: no montage).

  The montage needs the evaluated model and data: when they are gone (or damaged), it is left
  out and said so, and the other pictures are still written.

  Args:
    workdir: the run (None for a loose evaluation folder: no curves).
    evaluations: the run's evaluations.
    out_dir: created if needed.
    worst: images in each montage.
    log: called with a line before each slow step and for each picture left out.

  Returns:
    (paths written, reasons for pictures left out).
  """
  out_dir = os.fspath(out_dir)
  tf.io.gfile.makedirs(out_dir)
  written: List[str] = []
  left_out: List[str] = []
  if workdir is not None:
    curves = learning_curves(workdir)
    if curves is None:
      left_out.append(f"{workdir}: no TensorBoard scalars (train/, valid/): no learning curves")
    else:
      written.append(write_png(os.path.join(out_dir, CURVES_PNG), curves))
  models: Dict[str, serving.LoadedSegmenter] = {}
  for evaluation in evaluations:
    variant = evaluation.variant or evaluation.split or "eval"
    try:
      rows = results.read_per_image_csv(evaluation.per_image_path)
    except DataError as error:
      left_out.append(f"{error}: no histogram or montage")
      continue
    title = f"{evaluation.run} {variant}"
    histogram = dsc_histogram(results.per_image_values(rows, "dsc"), title)
    written.append(
      write_png(os.path.join(out_dir, HISTOGRAM_PNG.format(variant=variant)), histogram)
    )
    if worst <= 0:
      continue
    log(f"running the model on the {worst} worst images of {evaluation.eval_dir}")
    try:
      source = _model_key(evaluation.report)
      if source not in models:
        models[source] = load_report_model(evaluation.report)
      cases = worst_cases(evaluation, worst, loaded=models[source])
    except DunetError as error:
      left_out.append(f"{evaluation.eval_dir}: no montage of the worst images ({error})")
      log(left_out[-1])
      continue
    if cases.names:
      picture = montage(cases.images, cases.truths, cases.predictions, cases.names, cases.scores)
      written.append(write_png(os.path.join(out_dir, WORST_PNG.format(variant=variant)), picture))
  return written, left_out


# ================================================================================================
# Helpers
# ================================================================================================


def _examples(
  data: Dict[str, object], chosen: Sequence[Tuple[str, str, float]], batch_size: int
) -> Dict[Tuple[str, str], Tuple[np.ndarray, np.ndarray]]:
  """{(name, split): (picture, ground truth)} of the chosen images, read as evaluate did."""
  wanted = {(name, split) for name, split, _ in chosen}
  found: Dict[Tuple[str, str], Tuple[np.ndarray, np.ndarray]] = {}
  if data.get("raw_dir"):
    raw_dir = str(data["raw_dir"])
    stems = {name for name, _ in wanted}
    for pair in layouts.scan(raw_dir, str(data.get("layout") or "auto")).pairs:
      if pair.stem in stems:
        example = readers.read_pair(pair)
        found[(pair.stem, evaluation_lib.RAW_SPLIT)] = (example.image, example.mask)
    where = raw_dir
  else:
    where = str(data.get("data_dir"))
    splits = sorted({split for _, split in wanted})
    for batch in evaluation_lib.prepared_batches(where, splits, batch_size):
      for example in batch:
        if (example.name, example.split) in wanted:
          found[(example.name, example.split)] = (example.image, example.truth)
  missing = sorted(wanted - set(found))
  if missing:
    raise DataError(where, f"holds no image {missing[0][0]!r} ({missing[0][1]}) of per_image.csv")
  return found


def _model_key(report: Dict[str, object]) -> str:
  """Evaluations whose reports load the same model (`load_report_model`) share it."""
  recomputed = (report.get("batch_norm_recomputed") or {}).get("checkpoint")
  return json.dumps(
    [recomputed, report["model"], report.get("threshold")], sort_keys=True, default=str
  )


def _finite(line: Series) -> Series:
  steps = np.asarray(line.steps, np.float64)
  values = np.asarray(line.values, np.float64)
  keep = np.isfinite(steps) & np.isfinite(values)
  return dataclasses.replace(line, steps=steps[keep], values=values[keep])


def _mapper(low: float, high: float, start: int, stop: int) -> Callable[[float], int]:
  """Data value -> pixel coordinate, `low` at `start` and `high` at `stop`."""
  span = (high - low) or 1.0
  return lambda value: int(round(start + (float(value) - low) / span * (stop - start)))


def _format_tick(value: float, ticks: np.ndarray) -> str:
  step = float(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
  if step >= 1 and float(value).is_integer():
    value = int(value)
    return f"{value // 1000}k" if abs(value) >= 10000 and value % 1000 == 0 else str(value)
  decimals = max(0, -math.floor(math.log10(step) + 1e-9))
  if not math.isclose(round(step, decimals), step, rel_tol=1e-6):
    decimals += 1
  return f"{value:.{decimals}f}"


def _text(
  canvas: np.ndarray,
  text: str,
  at: Tuple[int, int],
  *,
  anchor: str = "center",
  scale: float = FONT_SCALE,
  color: Color = BLACK,
) -> None:
  """Writes `text` centred horizontally on `at`; vertically centred on it, or above it
  (anchor="bottom"), or to its left (anchor="right")."""
  (width, height), _ = cv2.getTextSize(text, FONT, scale, 1)
  x, y = at
  if anchor == "right":
    origin = (x - width, y + height // 2)
  elif anchor == "left":
    origin = (x, y + height // 2)
  elif anchor == "bottom":
    origin = (x - width // 2, y)
  else:
    origin = (x - width // 2, y + height // 2)
  cv2.putText(canvas, text, origin, FONT, scale, color, 1, cv2.LINE_AA)


def _x_axis(canvas, ticks, x_of, bottom: int, label: str) -> None:
  for tick in ticks:
    cv2.line(canvas, (x_of(tick), bottom), (x_of(tick), bottom + 5), BLACK, 1)
    _text(canvas, _format_tick(tick, ticks), (x_of(tick), bottom + 16))
  _, _, _, right = plot_area(canvas.shape[:2])
  _text(canvas, label, ((MARGIN_LEFT + right) // 2, bottom + 40))


def _y_axis(canvas, ticks, side: str, x: int, top: int, bottom: int) -> None:
  y_of = _mapper(ticks[0], ticks[-1], bottom, top)
  direction = -1 if side == "left" else 1
  for tick in ticks:
    y = y_of(tick)
    cv2.line(canvas, (x, y), (x + 5 * direction, y), BLACK, 1)
    label = _format_tick(tick, ticks)
    _text(canvas, label, (x + 8 * direction, y), anchor="right" if side == "left" else "left")


def _y_title(canvas: np.ndarray, left_label: str, right_label: str, size: Tuple[int, int]) -> None:
  """Axis titles written bottom to top beside the tick labels."""
  top, _, bottom, _ = plot_area(size)
  for label, x in ((left_label, 14), (right_label, size[1] - 14)):
    if not label:
      continue
    (width, height), baseline = cv2.getTextSize(label, FONT, FONT_SCALE, 1)
    strip = np.full((height + baseline + 4, width + 4, 3), WHITE, np.uint8)
    cv2.putText(strip, label, (2, height + 2), FONT, FONT_SCALE, BLACK, 1, cv2.LINE_AA)
    strip = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    y0 = (top + bottom) // 2 - strip.shape[0] // 2
    x0 = x - strip.shape[1] // 2
    canvas[y0 : y0 + strip.shape[0], x0 : x0 + strip.shape[1]] = strip


def _title(canvas: np.ndarray, title: str) -> None:
  _text(
    canvas,
    _fit_text(title, canvas.shape[1] - 20, TITLE_SCALE),
    (canvas.shape[1] // 2, 20),
    scale=TITLE_SCALE,
  )


def _legend(canvas: np.ndarray, entries: Sequence[Tuple[str, Color]], right: int, y: int) -> None:
  """Entries (a short line in the colour, then the label) in a row ending at `right`."""
  x = right
  for label, color in reversed(entries):
    (width, _), _ = cv2.getTextSize(label, FONT, FONT_SCALE, 1)
    x -= width
    _text(canvas, label, (x, y), anchor="left")
    cv2.line(canvas, (x - 30, y), (x - 6, y), color, 2, cv2.LINE_AA)
    x -= 50


def _fit_text(text: str, width: int, scale: float = FONT_SCALE) -> str:
  """`text`, cut with "..." to fit `width` pixels."""
  while len(text) > 4 and cv2.getTextSize(text, FONT, scale, 1)[0][0] > width:
    text = text[:-4] + "..."
  return text


def _fit(
  panel: np.ndarray, cell_size: Tuple[int, int], interpolation: Optional[int] = None
) -> np.ndarray:
  """`panel` [h, w, 3] scaled to fit the cell (aspect kept), centred on MONTAGE_BACKGROUND
  (zeros for a mask, given `interpolation=cv2.INTER_NEAREST`)."""
  height, width = cell_size
  scale = min(height / panel.shape[0], width / panel.shape[1])
  new_size = (
    max(1, int(round(panel.shape[1] * scale))),
    max(1, int(round(panel.shape[0] * scale))),
  )
  if interpolation is None:
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    background = MONTAGE_BACKGROUND
  else:
    background = (0, 0, 0)
  resized = cv2.resize(panel, new_size, interpolation=interpolation)
  cell = np.full((height, width, 3), background, np.uint8)
  top, left = (height - resized.shape[0]) // 2, (width - resized.shape[1]) // 2
  cell[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
  return cell
