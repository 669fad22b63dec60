"""K-fold cross-validation: every fold trained in turn, scored on its held-out fold, aggregated.

For data prepared in K folds (`dunet-prepare --folds=K`, or the demo data with `--demo`), a
cross-validation folder holds

  fold_0/ ... fold_{K-1}/   one training workdir per fold (`dunet-train --fold=k`): trained on
                            the other K-1 folds, validated on its own
  fold_k/eval/valid/        fold k's model scored on fold k (its out-of-fold predictions), as
                            `dunet-evaluate` writes it (metrics.json, metrics.md, per_image.csv)
  cross_validation.json     the folds' headline scores, their mean and standard deviation over
                            folds, and the out-of-fold scores over the whole pool
  cross_validation.md       the same as a table
  oof_per_image.csv         every pool image's out-of-fold scores (the fold's model on it)
  postprocessing.json       head 2's post-processing chosen on ALL out-of-fold predictions
                            (nnU-Net's rule, dunet/postprocess.py): what evaluate, predict and
                            export apply to the ensemble of the folds (`--checkpoint=CV/fold_*`)

A fold whose workdir already holds its final metrics.json is not trained again (an interrupted
fold resumes from its checkpoints), so rerunning the same command only evaluates.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Callable, Dict, Optional, Sequence

from absl import logging
import numpy as np

from dunet import controller as controller_lib
from dunet import evaluation
from dunet import fileio
from dunet import postprocess
from dunet import serving
from dunet import trainer as trainer_lib
from dunet.config import TrainConfig
from dunet.data import folds as folds_lib
from dunet.errors import ConfigError

SUMMARY_JSON, SUMMARY_MD, OOF_CSV = (
  "cross_validation.json",
  "cross_validation.md",
  "oof_per_image.csv",
)
SUMMARY_FORMAT, SUMMARY_VERSION = "dunet-cross-validation", 1
# The scores aggregated over folds (head 2, mean over each fold's images), as in the paper.
SCORES = ("dsc", "iou", "recall", "precision")
# The standard deviation over folds is the sample one (ddof=1), as dunet-results reports it.
STD_DDOF = 1
EVAL_SUBDIR = os.path.join("eval", "valid")

TrainFn = Callable[[TrainConfig, str], Dict[str, object]]


def fold_workdir(cv_dir: str, fold: int) -> str:
  """Where fold `fold` is trained: CV_DIR/fold_k."""
  return os.path.join(cv_dir, folds_lib.fold_name(fold))


def number_of_folds(config: TrainConfig) -> int:
  """K of the data `config` trains on (preparing the demo data in folds if needed).

  Raises:
    ConfigError: the data is not prepared in folds.
    DataError: no prepared data.
  """
  if config.data.demo:  # the demo data is prepared in folds on first use
    data_dir = trainer_lib.check_inputs(config.updated(fold=0)).data_dir
  else:
    data_dir = str(config.data.data_dir)
  k = folds_lib.num_folds(data_dir)
  if not k:
    raise ConfigError(
      f"{data_dir} is not prepared in folds: prepare it with dunet-prepare --folds=K"
    )
  return k


def is_trained(workdir: str) -> bool:
  """True when a fold's workdir holds its final metrics.json (training ended)."""
  return os.path.exists(os.path.join(workdir, controller_lib.METRICS_FILENAME))


def cross_validate(
  config: TrainConfig,
  cv_dir: str,
  train_fn: TrainFn,
  *,
  folds: Optional[Sequence[int]] = None,
  batch_size: int = 8,
  progress: bool = True,
  choose_postprocessing: bool = True,
) -> Dict[str, object]:
  """Trains (or resumes, or skips) every fold, scores each on its own fold, aggregates.

  Args:
    config: the settings every fold trains with (its `fold` is replaced).
    cv_dir: the cross-validation folder.
    train_fn: trains one fold: (config with fold=k, workdir) -> final metrics
      (`dunet.train.train`, or a stand-in in tests).
    folds: the folds to train and score (default: all K); the aggregate covers these.
    batch_size: pictures per model call when scoring.
    progress: show progress lines.
    choose_postprocessing: choose head 2's post-processing on the out-of-fold predictions and
      keep it in CV_DIR/postprocessing.json.

  Returns:
    The summary written to CV_DIR/cross_validation.json.

  Raises:
    ConfigError: data not in folds, a fold out of range.
  """
  k = number_of_folds(config)
  chosen = list(range(k)) if folds is None else sorted(set(folds))
  for fold in chosen:
    if not 0 <= fold < k:
      raise ConfigError(f"fold {fold} is out of range: the data has {k} folds (0..{k - 1})")
  os.makedirs(cv_dir, exist_ok=True)
  for fold in chosen:
    workdir = fold_workdir(cv_dir, fold)
    if is_trained(workdir):
      logging.info("fold %d of %d: already trained in %s", fold, k, workdir)
      continue
    print(f"Cross-validation: training fold {fold} of 0..{k - 1} in {workdir}", file=sys.stderr)
    train_fn(config.updated(fold=fold), workdir)
  reports = {}
  for fold in chosen:
    print(f"Cross-validation: scoring fold {fold} on its held-out images", file=sys.stderr)
    reports[fold] = score_fold(cv_dir, fold, batch_size=batch_size, progress=progress)
  summary = aggregate(reports, config.validation.threshold)
  if choose_postprocessing:
    summary["postprocessing"] = _choose_on_out_of_fold(cv_dir, reports, config)
  summary.update(
    cv_dir=os.path.abspath(cv_dir),
    folds=k,
    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  )
  write_summary(cv_dir, summary, reports)
  return summary


def score_fold(
  cv_dir: str, fold: int, *, batch_size: int = 8, progress: bool = True
) -> Dict[str, object]:
  """Fold `fold`'s best model on its held-out fold, written to fold_k/eval/valid/.

  Scored without post-processing (what is chosen from these predictions must not have seen
  them already), at the original resolution, with the probabilities kept for that choice.
  """
  workdir = fold_workdir(cv_dir, fold)
  run_config = serving.find_run_config(workdir)
  valid_split = str(run_config.get("valid_split") or folds_lib.fold_name(fold))
  loaded = serving.load_segmenter(workdir, postprocessing="none")
  report = evaluation.evaluate(
    loaded,
    data_dir=str(run_config["data_dir"]),
    split="valid",
    valid_split=valid_split,
    threshold=float(run_config.get("threshold", 0.5)),
    batch_size=batch_size,
    progress=progress,
    choose_threshold=False,
    keep_probabilities=True,
  )
  evaluation.write_report(report, os.path.join(workdir, EVAL_SUBDIR))
  return report


def aggregate(reports: Dict[int, Dict[str, object]], threshold: float) -> Dict[str, object]:
  """Per-fold headline scores, their mean and std over folds, and the pooled out-of-fold scores.

  Args:
    reports: {fold: its evaluation report on its own fold (with "_scores")}.
    threshold: the threshold the folds were scored at (recorded).

  Returns:
    {"format", "version", "threshold", "per_fold": {fold: {score: value}},
     "over_folds": {score: {"mean", "std", "folds"}}, "out_of_fold": evaluate's metrics over
     every held-out image, "images"}.
  """
  per_fold = {}
  for fold, report in sorted(reports.items()):
    headline = report["headline"]
    per_fold[str(fold)] = {
      **{name: float(headline[name]) for name in SCORES},
      "hd95": headline.get("hd95"),
      "images": int(report["images"]),
    }
  over_folds = {}
  for name in (*SCORES, "hd95"):
    values = [row[name] for row in per_fold.values() if row[name] is not None]
    over_folds[name] = {
      "mean": float(np.mean(values)) if values else None,
      "std": float(np.std(values, ddof=STD_DDOF)) if len(values) > 1 else None,
      "folds": len(values),
    }
  scores = [score for report in reports.values() for score in report["_scores"]]
  return {
    "format": SUMMARY_FORMAT,
    "version": SUMMARY_VERSION,
    "threshold": threshold,
    "statistic": "head 2, mean over each fold's held-out images; std over folds (ddof=1)",
    "per_fold": per_fold,
    "over_folds": over_folds,
    "out_of_fold": evaluation.summarize(scores)["head2"],
    "images": len(scores),
  }


def _choose_on_out_of_fold(
  cv_dir: str, reports: Dict[int, Dict[str, object]], config: TrainConfig
) -> Dict[str, object]:
  scores = [score for report in reports.values() for score in report["_scores"]]
  threshold = config.validation.threshold
  spec, record = postprocess.choose_postprocessing(
    [score.probability for score in scores], [score.truth for score in scores], threshold
  )
  record = {
    "format": evaluation.POSTPROCESSING_FORMAT,
    "version": evaluation.POSTPROCESSING_VERSION,
    **record,
    "chosen_on": {
      "data_dir": str(reports[min(reports)]["data"]["data_dir"]),
      "split": "out-of-fold predictions of folds " + ",".join(str(f) for f in sorted(reports)),
      "model": "each fold's model on its own held-out fold",
      "resolution": sorted({score.resolution for score in scores}),
    },
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  serving.write_postprocessing_choice(cv_dir, record)
  logging.info("post-processing chosen on the out-of-fold predictions: %s", spec)
  return record


def write_summary(
  cv_dir: str, summary: Dict[str, object], reports: Dict[int, Dict[str, object]]
) -> Dict[str, str]:
  """Writes cross_validation.json, cross_validation.md and oof_per_image.csv atomically."""
  paths = {name: os.path.join(cv_dir, name) for name in (SUMMARY_JSON, SUMMARY_MD, OOF_CSV)}
  fileio.write_json_atomic(paths[SUMMARY_JSON], summary, indent=1, sort_keys=False)
  fileio.write_text_atomic(paths[SUMMARY_MD], format_markdown(summary))
  scores = [score for report in reports.values() for score in report["_scores"]]
  fileio.write_text_atomic(paths[OOF_CSV], evaluation.per_image_csv(scores))
  return paths


def format_markdown(summary: Dict[str, object]) -> str:
  """The summary as a markdown table: one row per fold, then mean ± std over folds."""

  def cell(value: Optional[float], digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"

  lines = [
    "# Cross-validation",
    "",
    f"{summary['statistic']}; threshold {summary['threshold']:g}.",
    "",
    "| fold | images | DSC | mIoU | recall | precision | HD95 (px) |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for fold, row in summary["per_fold"].items():
    lines.append(
      f"| {fold} | {row['images']} | "
      + " | ".join(cell(row[name]) for name in SCORES)
      + f" | {cell(row['hd95'], 2)} |"
    )
  over = summary["over_folds"]

  def mean_std(name: str, digits: int = 4) -> str:
    if over[name]["mean"] is None:
      return "-"
    std = over[name]["std"]
    return cell(over[name]["mean"], digits) + ("" if std is None else f" ± {std:.{digits}f}")

  lines.append(
    f"| mean ± std | {summary['images']} | "
    + " | ".join(mean_std(name) for name in SCORES)
    + f" | {mean_std('hd95', 2)} |"
  )
  pooled = summary["out_of_fold"]["per_image"]
  lines += [
    "",
    f"Out of fold, over all {summary['images']} held-out images: DSC {pooled['dsc']:.4f}, "
    f"mIoU {pooled['iou']:.4f}, recall {pooled['recall']:.4f}, precision "
    f"{pooled['precision']:.4f}.",
  ]
  choice = summary.get("postprocessing")
  if choice:
    lines += [
      "",
      f"Post-processing for the folds' ensemble: {choice['choice']} ({choice['reason']}).",
    ]
  return "\n".join(lines) + "\n"
