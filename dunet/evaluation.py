"""Scoring a trained DoubleU-Net: the library behind dunet-evaluate (dunet/evaluate.py).

  Example, ImageScore  one picture to score, and its confusion counts per head (and boundary
                       metrics, and optionally its probability map)
  splits_to_evaluate   the prepared splits a --split names (fold runs: their own fold as valid)
  prepared_batches, raw_examples   pictures of prepared splits, or of a raw data set folder
  score_batch(es)      the model on pictures, counted at each mask's (original) resolution
  summarize, summarize_boundary, best_threshold   the report's statistics
  evaluate             all of it for one model and one data source -> the report
  choose_validation_threshold, choose_postprocessing_on_validation, recompute_batch_norm
  build_report, format_markdown, per_image_csv, write_report, default_out_dir

What is scored, how, and the conventions for empty masks: dunet/evaluate.py's docstring and
BUILD.md ("Using a trained model"). Reads no flags.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import os
import sys
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from absl import logging
import numpy as np
import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet import fileio
from dunet import inference
from dunet import metrics
from dunet import postprocess
from dunet import precise_bn
from dunet import serving
from dunet import surface_metrics
from dunet.data import folds as folds_lib
from dunet.data import layouts
from dunet.data import pipeline
from dunet.data import prepare
from dunet.data import readers
from dunet.data import records
from dunet.data import splits as splits_lib
from dunet.errors import ConfigError
from dunet.errors import DataError
from dunet.models import DoubleUNet

PathLike = Union[str, "os.PathLike[str]"]
SegmentFn = inference.SegmentFn

# Report order: the final output first.
HEADS = ("head2", "head1", "mean")
HEAD_TITLES = {"head2": "head 2 (final output)", "head1": "head 1", "mean": "mean of heads 1 and 2"}
STATISTIC_TITLES = {"per_image": "mean over images", "pooled": "pooled over pixels"}
# Columns of the table: the paper's four in its order, then F2 and accuracy.
TABLE_SCORES = (
  ("dsc", "DSC"),
  ("iou", "mIoU / IoU"),
  ("recall", "recall"),
  ("precision", "precision"),
  ("f2", "F2"),
  ("accuracy", "accuracy"),
)
SPLIT_CHOICES = ("test", "valid", "train", "all")
ORIGINAL, PREPARED = "original", "prepared"
RAW_SPLIT = "raw"
METRICS_JSON, METRICS_MD, PER_IMAGE_CSV = "metrics.json", "metrics.md", "per_image.csv"
REPORT_FORMAT, REPORT_VERSION = "dunet-eval", 1
STATISTICS_NOTE = (
  "per_image = the mean over images of each image's score (the headline: the paper's tables "
  "report mean DSC and mIoU over test images; the authors' code averaged per-batch Keras "
  "metrics over both heads on soft masks, which is neither statistic exactly); pooled = one "
  "score from the counts summed over all pixels of all images."
)
EMPTY_MASK_NOTE = (
  "an image whose prediction and ground truth are both empty scores 1.0; a prediction on an "
  "empty ground truth, or an empty prediction on a non-empty one, scores 0.0 (accuracy is "
  "always defined)."
)


@dataclasses.dataclass
class Example:
  """One picture to score.

  Attributes:
    name: its name (record name or file stem).
    split: "train", "valid", "test", or "raw" for a raw folder.
    image: uint8 RGB [h, w, 3], what the model is given (prepared or original pixels).
    truth: uint8 {0, 1} [H, W], the mask scored against (original or prepared size).
    resolution: "original" or "prepared": where `truth` lives.
  """

  name: str
  split: str
  image: np.ndarray
  truth: np.ndarray
  resolution: str


@dataclasses.dataclass
class ImageScore:
  """One image's confusion counts (tp, fp, fn, tn) per head, at the size it was scored.

  `swept` holds head 2's counts at other thresholds ({threshold: counts}), when asked for.
  """

  name: str
  split: str
  height: int
  width: int
  resolution: str
  counts: Dict[str, np.ndarray]
  swept: Dict[float, np.ndarray] = dataclasses.field(default_factory=dict)
  # Head 2's boundary metrics (dunet/surface_metrics.py): hd95, assd, nsd[, *_mm].
  surface: Dict[str, float] = dataclasses.field(default_factory=dict)
  # Head 2's probability [H, W] float16 and the truth [H, W] bool, kept only when asked for
  # (choosing the post-processing needs them).
  probability: Optional[np.ndarray] = None
  truth: Optional[np.ndarray] = None


# ================================================================================================
# Examples: prepared splits and raw folders
# ================================================================================================


def splits_to_evaluate(
  data_dir: PathLike, split: str, valid_split: str = "valid"
) -> Dict[str, int]:
  """The prepared splits `split` names, with their example counts.

  Args:
    data_dir: a prepared folder.
    split: one of SPLIT_CHOICES ("all": every non-empty split).
    valid_split: the split "valid" means: a cross-validation fold's run validated on its fold
      (`fold_k`, dunet/data/folds.py), and trained on the other folds, which "train" then means.

  Returns:
    {split name: examples}, in train, valid, test order.

  Raises:
    DataError: `data_dir` is not a prepared folder (the message hints at dunet-prepare).
    ConfigError: an unknown split, or one the data does not have.
  """
  if split not in SPLIT_CHOICES:
    raise ConfigError(f"unknown split {split!r}; expected one of {SPLIT_CHOICES}")
  counts = {name: int(count) for name, count in pipeline.read_data_info(data_dir)["counts"].items()}
  fold_splits = sorted(name for name in counts if name.startswith(folds_lib.FOLD_PREFIX))
  meaning = {
    "train": [name for name in fold_splits if name != valid_split] if fold_splits else ["train"],
    "valid": [valid_split],
    "test": ["test"],
  }
  names = [name for key in splits_lib.SPLITS for name in meaning[key]]
  if split == "all":
    chosen = {name: counts[name] for name in names if counts.get(name, 0) > 0}
    if not chosen:
      raise ConfigError(f"{data_dir}: the prepared data holds no examples (counts {counts})")
    return chosen
  chosen = {name: counts.get(name, 0) for name in meaning[split]}
  if not chosen or any(count <= 0 for count in chosen.values()):
    raise ConfigError(
      f"{data_dir}: the prepared data has no {split!r} examples (counts "
      f"{counts}); choose another --split, or prepare the data again with "
      "dunet-prepare (e.g. --test_raw_dir for a separate test set)"
      + (
        "; it is prepared in folds: evaluate a fold's run (its config.json names its "
        "validation fold) or the test split"
        if fold_splits and split == "valid" and valid_split == "valid"
        else ""
      )
    )
  return chosen


def prepared_batches(
  data_dir: PathLike, split_names: Iterable[str], batch_size: int
) -> Iterator[List[Example]]:
  """Batches of prepared examples, each split in file order.

  Validation and test records are scored against their original-resolution mask; training
  records (which keep none) against the prepared mask.
  """
  for split in split_names:
    dataset = pipeline.make_eval_dataset(data_dir, split, batch_size=batch_size, preprocessing=None)
    # A damaged shard is reported as a DataError naming it, not as a bare TF read error.
    for batch in records.name_read_errors(
      dataset.as_numpy_iterator(), pipeline.shard_files(data_dir, split)
    ):
      examples = []
      for index, name in enumerate(batch["name"]):
        png = batch["original_mask_png"][index]
        if png:
          truth, resolution = records.decode_mask_png(png), ORIGINAL
          expected = (int(batch["original_height"][index]), int(batch["original_width"][index]))
          if truth.shape != expected:
            raise DataError(
              data_dir,
              f"record {name.decode()!r} of the {split} split holds a "
              f"{truth.shape} original mask but records the size {expected}: "
              "prepare the data again",
            )
        else:
          truth, resolution = batch["mask"][index, :, :, 0].astype(np.uint8), PREPARED
        examples.append(Example(name.decode(), split, batch["image"][index], truth, resolution))
      yield examples


def raw_examples(
  raw_dir: PathLike,
  layout: str = "auto",
  on_error: str = "raise",
  skipped: Optional[List[Dict[str, str]]] = None,
) -> Iterator[Example]:
  """The pairs of a raw data set folder, read at their original resolution.

  Args:
    raw_dir: the data set as distributed.
    layout: a name from dunet.data.layouts.LAYOUTS, or "auto".
    on_error: "raise" stops at the first bad file; "skip" leaves it out, lists it in `skipped`
      and goes on (the report then says how many were left out).
    skipped: receives {"file", "reason"} for each file left out.

  Yields:
    Examples in stem order.

  Raises:
    DataError: naming the file (on_error="raise") or the folder (nothing to evaluate).
  """
  skipped = skipped if skipped is not None else []
  scan = layouts.scan_checked(raw_dir, layout, on_error=on_error, skipped=skipped)
  for pair in scan.pairs:
    try:
      example = readers.read_pair(pair)
    except DataError as error:
      if on_error == "raise":
        raise
      logging.warning("skipped %s", error)
      skipped.append({"file": error.path, "reason": error.problem})
      continue
    yield Example(pair.stem, RAW_SPLIT, example.image, example.mask, ORIGINAL)


# ================================================================================================
# Scoring
# ================================================================================================


@dataclasses.dataclass(frozen=True)
class BoundarySettings:
  """How head 2's boundary metrics are measured (dunet/surface_metrics.py).

  Attributes:
    spacing_mm: the pixel spacing of the ORIGINAL pictures in mm (one number, or row and column
      spacing); None: distances in pixels only. Images scored at the prepared size (training
      records) get no millimetre values.
    tolerance: normalised surface Dice tolerance in pixels.
    tolerance_mm: the same in mm (None: the number `tolerance`).
  """

  spacing_mm: Union[None, float, Tuple[float, float]] = None
  tolerance: float = surface_metrics.DEFAULT_TOLERANCE
  tolerance_mm: Optional[float] = None


def score_batch(
  segment: SegmentFn,
  examples: Sequence[Example],
  threshold: float,
  sweep: Sequence[float] = (),
  boundary: BoundarySettings = BoundarySettings(),
  keep_probabilities: bool = False,
) -> List[ImageScore]:
  """Runs one batch of same-size pictures and counts each head against each image's mask.

  Head 2, head 1 and their mean (probabilities averaged at the model's output size, then
  thresholded) are resized bilinearly from the pictures' size to each mask's size when these
  differ, and pixels with probability >= threshold count as foreground. Head 2 is also counted
  at each threshold of `sweep` (ImageScore.swept), and its boundary metrics are measured
  (ImageScore.surface); with `keep_probabilities` its probability map and the truth are kept.
  """
  outputs = segment(np.stack([example.image for example in examples]))
  head2 = outputs[serving.PROBABILITY]
  head1 = outputs[serving.PROBABILITY_HEAD1]
  maps = np.concatenate([head2, head1, metrics.mean_of_heads(head1, head2)], axis=-1)
  scores = []
  for index, example in enumerate(examples):
    probabilities = maps[index]
    if probabilities.shape[:2] != example.truth.shape:
      probabilities = serving.resize_probabilities(
        probabilities[None], tf.constant(example.truth.shape, tf.int32)
      )[0].numpy()
    truth = example.truth > 0
    counts = {
      head: metrics.confusion_counts_np(
        metrics.binarize(probabilities[:, :, channel], threshold), truth
      )
      for channel, head in enumerate(HEADS)
    }
    swept = {
      float(value): metrics.confusion_counts_np(
        metrics.binarize(probabilities[:, :, 0], value), truth
      )
      for value in sweep
    }
    spacing = boundary.spacing_mm if example.resolution == ORIGINAL else None
    surface = surface_metrics.surface_metrics(
      metrics.binarize(probabilities[:, :, 0], threshold),
      truth,
      spacing=spacing,
      tolerance=boundary.tolerance,
      tolerance_mm=boundary.tolerance_mm,
    )
    if boundary.spacing_mm is not None and spacing is None:
      surface.update({name + surface_metrics.MM_SUFFIX: np.nan for name in MM_NAMES})
    scores.append(
      ImageScore(
        example.name,
        example.split,
        truth.shape[0],
        truth.shape[1],
        example.resolution,
        counts,
        swept,
        surface,
        probabilities[:, :, 0].astype(np.float16) if keep_probabilities else None,
        truth if keep_probabilities else None,
      )
    )
  return scores


def score_batches(
  segment: SegmentFn,
  batches: Iterable[Sequence[Example]],
  threshold: float,
  total: Optional[int] = None,
  progress: bool = True,
  sweep: Sequence[float] = (),
  boundary: BoundarySettings = BoundarySettings(),
  keep_probabilities: bool = False,
) -> List[ImageScore]:
  """`score_batch` over batches, with a progress line on stderr when `progress`."""
  bar = inference.ImageProgress(total or 0, progress)
  scores: List[ImageScore] = []
  for batch in batches:
    scores.extend(score_batch(segment, batch, threshold, sweep, boundary, keep_probabilities))
    bar.advance(len(batch))
  bar.close()  # ends the line when files were skipped
  return scores


def summarize(scores: Sequence[ImageScore]) -> Dict[str, Dict[str, Dict[str, float]]]:
  """{head: {"per_image" | "pooled": {score: value}}} over `scores`.

  Raises:
    ConfigError: no image was scored.
  """
  if not scores:
    raise ConfigError("no image was scored")
  result = {}
  for head in HEADS:
    accumulator = metrics.MetricAccumulator()
    accumulator.update(np.stack([score.counts[head] for score in scores]))
    result[head] = accumulator.nested_result()
  return result


MM_NAMES = surface_metrics.METRIC_NAMES


def summarize_boundary(
  scores: Sequence[ImageScore], boundary: BoundarySettings
) -> Dict[str, object]:
  """Head 2's boundary metrics over `scores` (JSON-ready: undefined values are None)."""
  summary = surface_metrics.summarize_surface([score.surface for score in scores])
  return {
    "head2": {
      name: {field: _json_number(value) for field, value in fields.items()}
      for name, fields in summary.items()
    },
    "spacing_mm": (
      None
      if boundary.spacing_mm is None
      else list(np.atleast_1d(np.asarray(boundary.spacing_mm, float)).tolist())
    ),
    "nsd_tolerance": boundary.tolerance,
    "nsd_tolerance_mm": (
      (boundary.tolerance if boundary.tolerance_mm is None else boundary.tolerance_mm)
      if boundary.spacing_mm
      else None
    ),
    "definitions": BOUNDARY_NOTE,
    "empty_masks": surface_metrics.EMPTY_MASK_CONVENTION,
    "monai_empty_masks": surface_metrics.MONAI_EMPTY_MASK_BEHAVIOUR,
  }


def _json_number(value: float) -> Optional[float]:
  """A float for JSON: nan and infinities (not JSON) become None."""
  value = float(value)
  return value if np.isfinite(value) else None


BOUNDARY_NOTE = (
  "head 2 at the threshold, at the resolution each image is scored: hd95 = the larger of the "
  "two directed 95th percentiles of boundary-to-boundary distances, assd = the mean over both "
  "boundaries' pixels of the distance to the other boundary, nsd = the share of both "
  "boundaries' pixels within the tolerance of the other (normalised surface Dice); boundaries "
  "are the mask minus its erosion by a 3x3 cross, as MONAI's; pixels unless *_mm."
)


# Thresholds tried on the validation split for head 2 (`choose_threshold`).
THRESHOLD_GRID = tuple(round(0.05 * step, 2) for step in range(1, 20))
THRESHOLD_NOTE = (
  "the validation-optimal threshold maximises head 2's mean per-image DSC over the validation "
  "split (thresholds 0.05 to 0.95 in steps of 0.05; ties go to the one nearest 0.5); it is "
  "chosen on validation only and then applied to the evaluated split, never tuned on the "
  "test split."
)


def best_threshold(scores: Sequence[ImageScore], default: float = 0.5) -> Dict[str, float]:
  """The swept threshold with the highest mean per-image head-2 DSC over `scores`.

  Returns:
    {"threshold", "dsc" (at it), "dsc_at_default"}; ties go to the threshold nearest `default`.
  """
  thresholds = sorted(scores[0].swept)
  if not thresholds:
    raise ValueError("the scores hold no swept thresholds")
  mean_dsc = {
    t: float(np.mean([metrics.scores_from_counts(score.swept[t])["dsc"] for score in scores]))
    for t in thresholds
  }
  chosen = max(thresholds, key=lambda t: (round(mean_dsc[t], 9), -abs(t - default)))
  at_default = (
    mean_dsc[default]
    if default in mean_dsc
    else float(
      np.mean([metrics.scores_from_counts(score.counts["head2"])["dsc"] for score in scores])
    )
  )
  return {"threshold": chosen, "dsc": mean_dsc[chosen], "dsc_at_default": at_default}


def summarize_swept(scores: Sequence[ImageScore], threshold: float) -> Dict[str, Dict[str, float]]:
  """Head 2's {"per_image", "pooled"} scores at a swept threshold."""
  accumulator = metrics.MetricAccumulator()
  accumulator.update(np.stack([score.swept[threshold] for score in scores]))
  return accumulator.nested_result()


# ================================================================================================
# The evaluation and its report
# ================================================================================================


def evaluate(
  loaded: serving.LoadedSegmenter,
  *,
  data_dir: Optional[PathLike] = None,
  split: str = "test",
  raw_dir: Optional[PathLike] = None,
  layout: str = "auto",
  on_error: str = "raise",
  threshold: float = 0.5,
  tta: bool = False,
  flips: Sequence[str] = tuple(serving.FLIPS),
  batch_size: int = 8,
  progress: bool = True,
  choose_threshold: bool = True,
  boundary: BoundarySettings = BoundarySettings(),
  valid_split: str = "valid",
  keep_probabilities: bool = False,
) -> Dict[str, object]:
  """Evaluates a model on a prepared split or a raw data set folder.

  Args:
    loaded: the model, from `dunet.serving.load_segmenter`.
    data_dir: a prepared folder (give this or `raw_dir`).
    split: one of SPLIT_CHOICES, for `data_dir`.
    raw_dir: a data set folder as distributed, evaluated whole at its original resolution.
    layout: the layout of `raw_dir` (dunet.data.layouts.LAYOUTS or "auto").
    on_error: for `raw_dir`: "raise" or "skip" unreadable or unpaired files.
    threshold: foreground where probability >= threshold.
    tta: flip test-time augmentation (dunet.serving.flip_tta).
    flips: the flips averaged with `tta`.
    batch_size: pictures per model call.
    progress: show a progress line on stderr.
    choose_threshold: for prepared data with a validation split, also choose head 2's
      validation-optimal threshold (THRESHOLD_GRID) and report the evaluated split's scores at
      it ("validation_threshold"); for the valid split itself the choice is tuned on it, and
      the report says so.
    boundary: how head 2's boundary metrics (HD95, ASSD, NSD) are measured.
    valid_split: the prepared split that "valid" means (a fold run's `fold_k`; see
      `splits_to_evaluate`); thresholds are chosen on it.
    keep_probabilities: keep head 2's probability map and the truth of each image in its
      ImageScore (for choosing a post-processing afterwards).

  Returns:
    The report (see `build_report`), with the per-image scores under "_scores" (not written to
    metrics.json; `write_report` puts them into per_image.csv).

  Raises:
    DataError: bad or missing data, naming the file or folder.
    ConfigError: nothing to evaluate, an unknown or missing split, bad settings.
  """
  if (data_dir is None) == (raw_dir is None):
    raise ConfigError(
      "give exactly one of a prepared data folder (--data_dir) and a raw data "
      "set folder (--raw_dir)"
    )
  if batch_size <= 0:
    raise ConfigError(f"batch size must be positive, got {batch_size}")
  if not 0.0 <= threshold <= 1.0:
    raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
  if tta and loaded.settings.get("postprocessing", "none") != "none":
    raise ConfigError(
      "flips averaged around a post-processed model would post-process each flip: load the "
      "model with the flips instead (dunet.serving.load_segmenter(..., flips=...))"
    )
  segment = inference.make_segment_fn(loaded, tta, flips)
  skipped: List[Dict[str, str]] = []
  if data_dir is not None:
    chosen = splits_to_evaluate(data_dir, split, valid_split)
    info = pipeline.read_data_info(data_dir)
    prepare.verify_shards(data_dir, list(chosen))  # missing or truncated shards, named
    stale = prepare.check_fresh(data_dir)
    if stale:
      logging.warning("%s", stale)
    if (info["height"], info["width"]) != (loaded.height, loaded.width) and loaded.settings.get(
      "tile_overlap"
    ) is None:
      logging.warning(
        "%s was prepared at %dx%d but the model takes %dx%d: pictures are resized "
        "twice (the model resizes its inputs)",
        data_dir,
        info["height"],
        info["width"],
        loaded.height,
        loaded.width,
      )
    data = {
      "data_dir": os.path.abspath(data_dir),
      "split": split,
      "splits": chosen,
      "prepared_height": info["height"],
      "prepared_width": info["width"],
      "layout": info.get("layout"),
    }
    batches: Iterable[Sequence[Example]] = prepared_batches(data_dir, chosen, batch_size)
    total = sum(chosen.values())
  else:
    scan = layouts.scan(raw_dir, layout)  # early: a bad folder fails before the model runs
    data = {"raw_dir": os.path.abspath(raw_dir), "layout": scan.layout, "split": RAW_SPLIT}
    batches = inference.batches_by_size(
      raw_examples(raw_dir, scan.layout, on_error, skipped),
      lambda example: example.image.shape[:2],
      batch_size,
    )
    total = len(scan.pairs)
  sweep = THRESHOLD_GRID if choose_threshold and data_dir is not None else ()
  scores = score_batches(
    segment,
    batches,
    threshold,
    total=total,
    progress=progress,
    sweep=sweep,
    boundary=boundary,
    keep_probabilities=keep_probabilities,
  )
  if not scores:
    raise ConfigError(f"no image could be evaluated ({len(skipped)} skipped)")
  validation_threshold = (
    choose_validation_threshold(
      segment, data_dir, scores, threshold, batch_size, progress, valid_split
    )
    if sweep
    else None
  )
  report = build_report(
    scores,
    loaded=loaded,
    data=data,
    threshold=threshold,
    flips=list(flips) if tta else (loaded.settings.get("flips") or None),
    skipped=skipped,
    validation_threshold=validation_threshold,
    boundary=boundary,
  )
  report["_scores"] = scores
  return report


def choose_validation_threshold(
  segment: SegmentFn,
  data_dir: PathLike,
  scores: Sequence[ImageScore],
  threshold: float,
  batch_size: int,
  progress: bool,
  valid_split: str = "valid",
) -> Optional[Dict[str, object]]:
  """Head 2's validation-optimal threshold and the evaluated images' scores at it.

  The validation images (of `valid_split`) are those among `scores` when the evaluation covers
  that split, else they are scored now. None when the prepared data has no such split.
  """
  valid_count = int(pipeline.read_data_info(data_dir)["counts"].get(valid_split, 0))
  if not valid_count:
    return None
  valid_scores = [score for score in scores if score.split == valid_split]
  includes_valid = bool(valid_scores)
  if not includes_valid:
    valid_scores = score_batches(
      segment,
      prepared_batches(data_dir, [valid_split], batch_size),
      threshold,
      total=valid_count,
      progress=progress,
      sweep=THRESHOLD_GRID,
    )
  choice = best_threshold(valid_scores, default=threshold)
  return {
    "threshold": choice["threshold"],
    "valid_dsc": choice["dsc"],
    "valid_dsc_at_threshold": choice["dsc_at_default"],
    "chosen_on": (
      f"{valid_split} (also evaluated here: its scores at this threshold are optimistic)"
      if includes_valid
      else valid_split
    ),
    "rule": THRESHOLD_NOTE,
    "head2": summarize_swept(scores, choice["threshold"]),
  }


POSTPROCESSING_FORMAT, POSTPROCESSING_VERSION = "dunet-postprocessing", 1


def choose_postprocessing_on_validation(
  loaded: serving.LoadedSegmenter,
  data_dir: PathLike,
  valid_split: str = "valid",
  threshold: float = 0.5,
  batch_size: int = 8,
  progress: bool = True,
) -> Tuple[postprocess.PostProcessing, Dict[str, object]]:
  """Chooses head 2's post-processing on the validation split (dunet.postprocess's rule).

  Args:
    loaded: the model WITHOUT post-processing (`dunet.serving.with_postprocessing`).
    data_dir: the prepared data.
    valid_split: the split chosen on ("valid", or a fold run's `fold_k`).
    threshold: the foreground threshold.
    batch_size: pictures per model call.
    progress: show a progress line.

  Returns:
    (the choice, the JSON-ready record to keep with the run: the candidates' validation DSC
    and the reason, what it was chosen on).

  Raises:
    ConfigError: the model already post-processes, or the data has no such split.
  """
  if loaded.settings.get("postprocessing", "none") != "none":
    raise ConfigError("choose the post-processing on the model without one")
  counts = splits_to_evaluate(data_dir, "valid", valid_split)
  scores = score_batches(
    inference.make_segment_fn(loaded),
    prepared_batches(data_dir, list(counts), batch_size),
    threshold,
    total=sum(counts.values()),
    progress=progress,
    keep_probabilities=True,
  )
  spec, record = postprocess.choose_postprocessing(
    [score.probability for score in scores], [score.truth for score in scores], threshold
  )
  return spec, {
    "format": POSTPROCESSING_FORMAT,
    "version": POSTPROCESSING_VERSION,
    **record,
    "chosen_on": {
      "data_dir": os.path.abspath(data_dir),
      "split": valid_split,
      "model": loaded.source,
      "resolution": sorted({score.resolution for score in scores}),
    },
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


PRECISE_BN_SUBDIR = "precise_bn"


def recompute_batch_norm(
  loaded: serving.LoadedSegmenter,
  data_dir: PathLike,
  batches: int,
  batch_size: int,
  out_dir: PathLike,
  seed: int = 42,
) -> Tuple[Dict[str, object], serving.LoadedSegmenter]:
  """Recomputes the loaded model's BatchNorm statistics and saves the model with them.

  The population statistics over `batches` unaugmented training batches of `data_dir`
  (dunet/precise_bn.py) replace the model's, for the evaluation that follows, and the model is
  written to `out_dir/precise_bn` (a workdir: `best/ckpt-1` and the run's config.json), which
  evaluate, predict and export read like any run.

  Returns:
    ({"images", "batches", "checkpoint"}: what was pooled and where the model went; the
    LoadedSegmenter serving the recomputed model with the same flips, tiling and
    post-processing, for the evaluation that follows).

  Raises:
    ConfigError: a SavedModel (its statistics are constants), or data at another size.
  """
  if loaded.kind != "checkpoint":
    raise ConfigError(
      f"{loaded.source}: --recompute_bn needs a checkpoint; a SavedModel's "
      "BatchNorm statistics are constants (recompute before exporting)"
    )
  if len(loaded.sources) > 1:
    raise ConfigError(
      "--recompute_bn recomputes one model's statistics: run it on each member of the "
      "ensemble, then evaluate the ensemble of the precise_bn workdirs it writes"
    )
  info = pipeline.read_data_info(data_dir)
  config = dict(serving.find_run_config(loaded.source))
  # A run trained on crops takes crops of its prepared pictures; a fold run its other folds.
  prepared = (
    int(config.get("prepared_height") or loaded.height),
    int(config.get("prepared_width") or loaded.width),
  )
  if (int(info["height"]), int(info["width"])) != prepared:
    raise ConfigError(
      f"{data_dir} was prepared at {info['height']}x{info['width']}, the "
      f"model was trained on {prepared[0]}x{prepared[1]} pictures: BatchNorm statistics "
      "must come from pictures like its training ones"
    )
  fold = int(config.get("fold", -1))
  train_splits = folds_lib.fold_splits(data_dir, fold)[0] if fold >= 0 else "train"
  crop_size = (
    (loaded.height, loaded.width) if config.get("crop_height") or config.get("crop_width") else None
  )
  # The served model has its BatchNorms folded: recompute on the checkpoint's own model.
  model = DoubleUNet(compute_dtype=loaded.module.model.compute_dtype)
  checkpoint_lib.restore_model(model, loaded.source)
  dataset = pipeline.make_statistics_dataset(
    data_dir,
    global_batch_size=batch_size,
    batches=batches,
    preprocessing=loaded.preprocessing,
    seed=seed,
    split=train_splits,
    crop_size=crop_size,
  )
  summary = precise_bn.recompute_statistics(
    model, records.name_read_errors(dataset, pipeline.shard_files(data_dir, train_splits))
  )
  folder = os.path.join(os.fspath(out_dir), PRECISE_BN_SUBDIR)
  config.update(
    preprocessing=loaded.preprocessing,
    height=loaded.height,
    width=loaded.width,
    batch_norm_statistics=precise_bn.PRECISE,
    recomputed_from={
      "checkpoint": loaded.source,
      "data_dir": os.path.abspath(data_dir),
      "images": summary.images,
      "batches": summary.batches,
    },
  )
  with fileio.staged_directory(folder, overwrite=True, purpose="precise-bn") as staging:
    tf.train.CheckpointManager(
      tf.train.Checkpoint(model=model),
      os.path.join(staging, checkpoint_lib.BEST_SUBDIR),
      max_to_keep=1,
    ).save(checkpoint_number=1)
    checkpoint_lib.write_config(staging, config)
  logging.info(
    "BatchNorm statistics recomputed over %d training images; model saved in %s",
    summary.images,
    folder,
  )
  record = {"images": summary.images, "batches": summary.batches, "checkpoint": folder}
  return record, serving.with_models(loaded, [model])


def build_report(
  scores: Sequence[ImageScore],
  *,
  loaded: serving.LoadedSegmenter,
  data: Dict[str, object],
  threshold: float,
  flips: Optional[List[str]],
  skipped: Sequence[Dict[str, str]],
  validation_threshold: Optional[Dict[str, object]] = None,
  boundary: BoundarySettings = BoundarySettings(),
) -> Dict[str, object]:
  """The evaluation as a JSON-ready dict (what metrics.json holds)."""
  results = summarize(scores)
  boundary_summary = summarize_boundary(scores, boundary)
  by_resolution = {
    name: sum(score.resolution == name for score in scores) for name in (ORIGINAL, PREPARED)
  }
  resolution = (
    "mixed" if all(by_resolution.values()) else ORIGINAL if by_resolution[ORIGINAL] else PREPARED
  )
  notes = []
  if by_resolution[PREPARED]:
    notes.append(
      f"{by_resolution[PREPARED]} image(s) of the train split were scored at the "
      "prepared size (training records keep no original-resolution mask); score a "
      "whole data set at its original size with --raw_dir"
    )
  if skipped:
    notes.append(
      f"{len(skipped)} file(s) skipped (listed under 'skipped'): these scores leave them out"
    )
  headline = results["head2"][metrics.HEADLINE_STATISTIC]
  empty_truth = sum(not score.counts["head2"][[metrics.TP, metrics.FN]].any() for score in scores)
  empty_prediction = {
    head: int(sum(not score.counts[head][[metrics.TP, metrics.FP]].any() for score in scores))
    for head in HEADS
  }
  return {
    "format": REPORT_FORMAT,
    "version": REPORT_VERSION,
    "model": inference.describe_model(loaded),
    "data": data,
    "images": len(scores),
    "resolution": resolution,
    "images_by_resolution": by_resolution,
    "threshold": threshold,
    "tta": flips,
    "headline": {
      "head": "head2",
      "statistic": metrics.HEADLINE_STATISTIC,
      "dsc": headline["dsc"],
      "iou": headline["iou"],
      "recall": headline["recall"],
      "precision": headline["precision"],
      "hd95": boundary_summary["head2"]["hd95"]["mean"],
      "hd95_undefined": boundary_summary["head2"]["hd95"]["count_undefined"],
    },
    "statistics": STATISTICS_NOTE,
    "empty_masks": {
      "convention": EMPTY_MASK_NOTE,
      "ground_truth": int(empty_truth),
      "prediction": empty_prediction,
    },
    "metrics": results,
    "boundary": boundary_summary,
    "validation_threshold": validation_threshold,
    "notes": notes,
    "skipped": list(skipped),
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": " ".join(sys.argv),
  }


def format_markdown(report: Dict[str, object]) -> str:
  """The report as markdown: a few lines of context, the table, and the notes."""
  model, data = report["model"], report["data"]
  if "raw_dir" in data:
    where = f"raw data set `{data['raw_dir']}` (layout {data['layout']})"
  else:
    where = f"`{data['data_dir']}`, split {data['split']}"
  flips = report["tta"]
  headline = report["headline"]
  lines = [
    "# DoubleU-Net evaluation",
    "",
    f"- model: `{model['source']}` ({model['kind']}, input {model['input_height']}x"
    f"{model['input_width']}, preprocessing {model['preprocessing']})" + _inference_text(model),
    f"- data: {where}: {report['images']} images, scored {_resolution_text(report)}",
    f"- threshold {report['threshold']:g}; test-time augmentation: "
    f"{'flips ' + ', '.join(flips) if flips else 'none'}",
    f"- headline (head 2, mean over images): DSC {headline['dsc']:.4f}, mIoU "
    f"{headline['iou']:.4f}, recall {headline['recall']:.4f}, precision "
    f"{headline['precision']:.4f}",
    "",
    "| output | statistic | " + " | ".join(title for _, title in TABLE_SCORES) + " |",
    "| --- | --- |" + " ---: |" * len(TABLE_SCORES),
  ]
  for head in HEADS:
    for statistic in metrics.STATISTICS:
      values = report["metrics"][head][statistic]
      lines.append(
        f"| {HEAD_TITLES[head]} | {STATISTIC_TITLES[statistic]} | "
        + " | ".join(f"{values[name]:.4f}" for name, _ in TABLE_SCORES)
        + " |"
      )
  chosen = report.get("validation_threshold")
  if chosen:
    values = chosen["head2"]["per_image"]
    lines += [
      "",
      f"Validation-optimal threshold {chosen['threshold']:g} (chosen on {chosen['chosen_on']};"
      f" validation DSC {chosen['valid_dsc']:.4f} there, {chosen['valid_dsc_at_threshold']:.4f}"
      f" at {report['threshold']:g}): head 2 on this split, mean over images: DSC "
      f"{values['dsc']:.4f}, mIoU {values['iou']:.4f}, recall {values['recall']:.4f}, "
      f"precision {values['precision']:.4f}.",
    ]
  lines += ["", *_boundary_lines(report.get("boundary"))]
  choice = report.get("postprocessing_choice")
  applied = model.get("postprocessing", "none")
  lines += [
    "",
    f"Post-processing of head 2: {applied}"
    + (
      f" (chosen on {choice['chosen_on']['split']} of {choice['chosen_on']['data_dir']}: "
      f"{choice['reason']})"
      if choice and choice.get("choice") == applied
      else " (given)"
      if applied != "none"
      else ""
    )
    + ".",
  ]
  empty = report["empty_masks"]
  lines += [
    "",
    f"Statistics: {report['statistics']}",
    "",
    f"Empty masks: {empty['ground_truth']} empty ground truth(s), "
    f"{empty['prediction']['head2']} empty head-2 prediction(s); {empty['convention']}",
  ]
  for note in report["notes"]:
    lines += ["", f"Note: {note}"]
  return "\n".join(lines) + "\n"


def _inference_text(model: Dict[str, object]) -> str:
  """What the serve call does beside one plain model call, for the report's model line."""
  parts = []
  members = model.get("members") or []
  if len(members) > 1:
    parts.append(f"an ensemble of {len(members)} models, probabilities averaged")
  tiling = model.get("tiling")
  if tiling:
    parts.append(
      f"tiled at full resolution: {tiling['window'][0]}x{tiling['window'][1]} windows, "
      f"overlap {tiling['overlap']:g}, {tiling['weighting']} weights"
    )
  return "; " + "; ".join(parts) if parts else ""


def _boundary_lines(boundary: Optional[Dict[str, object]]) -> List[str]:
  """The boundary-metric table of the markdown report."""
  if not boundary:
    return []

  def cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"

  lines = [
    "| head 2 boundary | mean | median | std | images (undefined) |",
    "| --- | ---: | ---: | ---: | ---: |",
  ]
  for name, fields in boundary["head2"].items():
    lines.append(
      f"| {name} | {cell(fields['mean'])} | {cell(fields['median'])} | {cell(fields['std'])} "
      f"| {int(fields['count_defined'])} ({int(fields['count_undefined'])}) |"
    )
  spacing = boundary["spacing_mm"]
  lines += [
    "",
    f"Boundary metrics: {boundary['definitions']} NSD tolerance {boundary['nsd_tolerance']:g} px"
    + (f", {boundary['nsd_tolerance_mm']:g} mm at spacing {spacing} mm/px." if spacing else "."),
    f"Empty masks: {boundary['empty_masks']} ({boundary['monai_empty_masks']}).",
  ]
  return lines


def _resolution_text(report: Dict[str, object]) -> str:
  counts = report["images_by_resolution"]
  if report["resolution"] == ORIGINAL:
    return "at their original resolution"
  if report["resolution"] == PREPARED:
    return "at the prepared size (training records keep no original-resolution mask)"
  return (
    f"at their original resolution ({counts[ORIGINAL]}) and at the prepared size "
    f"({counts[PREPARED]}, training records)"
  )


def per_image_csv(scores: Sequence[ImageScore]) -> str:
  """One CSV row per image with head 2's counts, scores and boundary metrics ("nan" where
  undefined), sorted by split and name."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  surface_columns = sorted({name for score in scores for name in score.surface})
  surface_columns.sort(key=lambda name: (name.endswith(surface_metrics.MM_SUFFIX), name))
  writer.writerow(
    [
      "name",
      "split",
      "height",
      "width",
      "resolution",
      "tp",
      "fp",
      "fn",
      "tn",
      "dsc",
      "iou",
      "precision",
      "recall",
      *surface_columns,
    ]
  )
  order = {name: index for index, name in enumerate((*splits_lib.SPLITS, RAW_SPLIT))}
  for score in sorted(scores, key=lambda s: (order.get(s.split, len(order)), s.name)):
    counts = score.counts["head2"]
    values = metrics.scores_from_counts(counts)
    writer.writerow(
      [
        score.name,
        score.split,
        score.height,
        score.width,
        score.resolution,
        *(int(c) for c in counts),
        *(f"{float(values[name]):.6f}" for name in ("dsc", "iou", "precision", "recall")),
        *(f"{score.surface.get(name, np.nan):.6f}" for name in surface_columns),
      ]
    )
  return buffer.getvalue()


def write_report(report: Dict[str, object], out_dir: PathLike) -> Dict[str, str]:
  """Writes metrics.json, metrics.md and per_image.csv atomically; returns their paths."""
  tf.io.gfile.makedirs(os.fspath(out_dir))
  paths = {
    name: os.path.join(os.fspath(out_dir), name)
    for name in (METRICS_JSON, METRICS_MD, PER_IMAGE_CSV)
  }
  document = {key: value for key, value in report.items() if not key.startswith("_")}
  fileio.write_json_atomic(paths[METRICS_JSON], document, indent=1, sort_keys=False)
  fileio.write_text_atomic(paths[METRICS_MD], format_markdown(report))
  fileio.write_text_atomic(paths[PER_IMAGE_CSV], per_image_csv(report["_scores"]))
  return paths


def find_workdir(checkpoint: str) -> Optional[str]:
  """The run folder a checkpoint path belongs to; None for SavedModels and loose prefixes."""
  if serving.is_saved_model(checkpoint):
    return None
  if tf.io.gfile.isdir(checkpoint):
    folder = os.path.normpath(checkpoint)
    if os.path.basename(folder) in (checkpoint_lib.BEST_SUBDIR, checkpoint_lib.CHECKPOINT_SUBDIR):
      return os.path.dirname(folder)
    return folder
  folder = os.path.dirname(os.path.normpath(checkpoint))
  if os.path.basename(folder) in (checkpoint_lib.BEST_SUBDIR, checkpoint_lib.CHECKPOINT_SUBDIR):
    return os.path.dirname(folder)
  if tf.io.gfile.exists(os.path.join(folder, checkpoint_lib.CONFIG_FILENAME)):
    return folder
  return None


def default_out_dir(
  checkpoint: str, split: str, raw_dir: Optional[str], tta: bool, prefer: str = "best"
) -> Optional[str]:
  """<workdir>/eval/<split or raw-NAME>[-latest][-tta]; None when there is no workdir.

  "-latest" marks workdir evaluations of the latest (not the best) checkpoint. An ensemble
  (several checkpoints, see dunet.serving.expand_model_paths) of runs in one folder (a
  cross-validation's fold_0/, fold_1/, ...) is evaluated into <that folder>/eval/ensemble-...;
  None for members in different folders.
  """
  members = serving.expand_model_paths(checkpoint)
  workdirs = [find_workdir(member) for member in members]
  if any(workdir is None for workdir in workdirs):
    return None
  name = f"raw-{os.path.basename(os.path.normpath(raw_dir))}" if raw_dir else split
  if len(workdirs) == 1:
    workdir = workdirs[0]
  else:
    parents = {os.path.dirname(os.path.normpath(folder)) for folder in workdirs}
    if len(parents) != 1:
      return None
    workdir, name = parents.pop(), f"ensemble-{name}"
  if prefer == "latest" and all(tf.io.gfile.isdir(member) for member in members):
    name += "-latest"
  return os.path.join(workdir, "eval", name + ("-tta" if tta else ""))
