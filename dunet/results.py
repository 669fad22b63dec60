"""The paper's results table from dunet-evaluate's reports, over runs and cross-validation folds.

    evaluations = results.find_evaluations(["runs/cvc", "runs/cv_kvasir/fold_*"], split="test")
    rows = results.build_rows(evaluations)
    results.write_results(rows, "results")        # results.md, results.csv

An evaluation is one folder dunet-evaluate wrote (<workdir>/eval/<split>[-latest][-tta] or any
--out_dir): its metrics.json and per_image.csv. A row of the table is one evaluation, or the
evaluations of the folds of one cross-validation experiment (workdirs whose train_config.json
records {"fold": k, "folds": K} in its data section, or config.json {"fold", "folds"}, or
folders named fold_<k>; one experiment = the folds in one parent folder), shown as the mean and
the sample standard deviation (ddof=1) over the folds, with the fold count. A fold's evaluation
of its own held-out split (fold_<k>) counts as the split "held-out fold".

The scores are head 2's (the final output) means over images, the statistic the paper reports:
DSC, mIoU, recall and precision, and HD95 (95th-percentile Hausdorff distance, in pixels) where
the report holds it (an optional score: "-" otherwise).

Nothing here reads flags or prints; dunet/results_table.py is the command line.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from dunet import fileio
from dunet.errors import ConfigError
from dunet.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

# What dunet-evaluate writes (dunet/evaluate.py; not imported: reading reports needs no model).
REPORT_FORMAT = "dunet-eval"
METRICS_JSON, PER_IMAGE_CSV = "metrics.json", "per_image.csv"
EVAL_SUBDIR = "eval"
HEAD = "head2"
# Where a score may sit under metrics -> head2: the per-image mean (evaluate's name for it), or
# "mean" (a name boundary metrics may use).
STATISTICS = ("per_image", "mean")
# Files of a training workdir (dunet/train.py, dunet/checkpoint.py).
TRAIN_CONFIG_JSON, RUN_CONFIG_JSON = "train_config.json", "config.json"
SUMMARY_JSON = "summary.json"  # a prepared data folder's (dunet/data/prepare.py)

# The table's scores in the paper's order, then HD95 (optional), with how each is printed.
SCORES = ("dsc", "iou", "recall", "precision", "hd95")
OPTIONAL_SCORES = frozenset({"hd95"})
SCORE_TITLES = {
  "dsc": "DSC",
  "iou": "mIoU",
  "recall": "recall",
  "precision": "precision",
  "hd95": "HD95",
}
DECIMALS = {"dsc": 4, "iou": 4, "recall": 4, "precision": 4, "hd95": 2}
CSV_DECIMALS = 6
MISSING = "-"
HELD_OUT = "held-out fold"  # a fold run's evaluation on its own fold_<k> split
SPLIT_ORDER = ("train", "valid", HELD_OUT, "test", "all", "raw")

# The data sets' names in the paper, by the layout name dunet-prepare records.
DATASET_NAMES = {
  "cvc": "CVC-ClinicDB",
  "kvasir": "Kvasir-SEG",
  "etis": "ETIS-LaribPolypDB",
  "isic2018": "ISIC 2018",
  "dsb2018": "2018 Data Science Bowl",
}
RESULTS_MD, RESULTS_CSV = "results.md", "results.csv"
_FOLD_DIR = re.compile(r"^fold[_-]?(\d+)$")
_GLOB_CHARACTERS = "*?["

STATISTICS_NOTE = (
  "Scores: head 2 (the final output), mean over the images of each image's score (the paper's "
  "statistic), at each evaluation's threshold. Rows with folds: mean ± sample standard "
  "deviation (ddof=1) over the folds, images summed over them; a score is shown only when "
  "every fold has it; a fold count such as 3 of 5 means that folds are missing. HD95: "
  "95th-percentile Hausdorff distance in pixels; - where an evaluation has none."
)


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One evaluation folder, reduced to what the table needs.

  Attributes:
    eval_dir: the folder holding metrics.json (and per_image.csv).
    workdir: the training run it belongs to (<workdir>/eval/<name>); None for a loose folder.
    run: the run's name (the workdir's folder name, else the evaluation folder's).
    variant: the evaluation folder's name (test, test-tta, raw-ETIS...); "" for a loose folder.
    dataset: the data set's name (DATASET_NAMES, else the data folder's name).
    split: the report's split (test, valid, train, all, raw).
    images: images scored.
    scores: {score: value or None} for SCORES.
    fold: the fold index when the run is a cross-validation fold, else None.
    folds: the experiment's fold count when recorded, else None.
    experiment: the folder the folds of one experiment share (the workdir's parent); "" when not
      a fold.
    report: the whole metrics.json.
  """

  eval_dir: str
  workdir: Optional[str]
  run: str
  variant: str
  dataset: str
  split: str
  images: int
  scores: Dict[str, Optional[float]]
  fold: Optional[int] = None
  folds: Optional[int] = None
  experiment: str = ""
  report: Dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.eval_dir, METRICS_JSON)

  @property
  def per_image_path(self) -> str:
    return os.path.join(self.eval_dir, PER_IMAGE_CSV)

  @property
  def name(self) -> str:
    """The run and, when it says more than the split, the evaluation folder: `cvc [test-tta]`."""
    return self.run if self.variant in ("", self.split) else f"{self.run} [{self.variant}]"


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the table: one evaluation, or the folds of one experiment.

  Attributes:
    dataset, split: as in Evaluation.
    run: the run's name, or the experiment's (its folder name) for folds.
    variant: the evaluation folder's name.
    folds: how many folds were averaged; 0 for a single run.
    folds_expected: the experiment's fold count when the folds record it, else None.
    images: images scored (summed over the folds).
    mean: {score: value or None}: the run's value, or the mean over the folds.
    std: {score: value or None}: the sample standard deviation over the folds; None for a
      single run or a single fold.
    evaluations: what the row was made from (folds in fold order).
  """

  dataset: str
  split: str
  run: str
  variant: str
  folds: int
  images: int
  mean: Dict[str, Optional[float]]
  std: Dict[str, Optional[float]]
  evaluations: Tuple[Evaluation, ...]
  folds_expected: Optional[int] = None

  @property
  def name(self) -> str:
    return self.run if self.variant in ("", self.split) else f"{self.run} [{self.variant}]"


# ================================================================================================
# Finding and reading evaluations
# ================================================================================================


def expand_paths(patterns: Sequence[str]) -> List[str]:
  """Folders named by paths and glob patterns, in the given order, each once.

  Raises:
    ConfigError: nothing named, or a pattern that matches nothing.
  """
  folders: List[str] = []
  for pattern in patterns:
    pattern = pattern.strip()
    if not pattern:
      continue
    if any(character in pattern for character in _GLOB_CHARACTERS):
      matches = sorted(path for path in glob.glob(pattern) if os.path.isdir(path))
      if not matches:
        raise ConfigError(f"--workdirs pattern {pattern!r} matches no folder")
    else:
      matches = [pattern]
    for match in matches:
      if os.path.abspath(match) not in {os.path.abspath(folder) for folder in folders}:
        folders.append(match)
  if not folders:
    raise ConfigError("no workdir given: pass --workdirs=A,B,... (folders or glob patterns)")
  return folders


def find_evaluations(paths: Sequence[PathLike], split: Optional[str] = None) -> List[Evaluation]:
  """The evaluations of workdirs, evaluation folders and folders of workdirs (a cross-validation
  folder holding fold_<k>/ workdirs).

  Args:
    paths: folders (already expanded: see `expand_paths`). An evaluation folder (holding a
      dunet-evaluate metrics.json) contributes itself; a training workdir every
      eval/*/metrics.json; another folder (a cross-validation folder) its own eval/*/ (an
      ensemble's evaluations) and those of each workdir directly inside it, each of which
      must have been evaluated.
    split: only evaluations of this split (the report's data split); None: all of them.

  Returns:
    The evaluations, in the order found.

  Raises:
    DataError: a folder that does not exist, a workdir without an evaluation (of `split`), a
      folder that holds no workdir, or an unreadable report; each names the path.
  """
  found: List[Evaluation] = []
  for path in paths:
    folder = os.fspath(path)
    if not tf.io.gfile.isdir(folder):
      raise DataError(folder, "no such folder (expected a training workdir or an evaluation)")
    if _is_report_folder(folder):
      found.extend(_filtered([read_evaluation(folder)], split, folder))
      continue
    # A run's own evaluations; a folder of runs (a cross-validation folder, which may also hold
    # an ensemble's evaluations in its eval/) adds each run inside it.
    own = _own_evaluations(folder)
    runs = [] if _is_training_run(folder) else [c for c in _child_dirs(folder) if _is_workdir(c)]
    if not own and not runs:
      if _is_workdir(folder):
        raise DataError(folder, _no_evaluation(folder, split))
      raise DataError(
        folder,
        "neither a training workdir nor an evaluation folder, and no workdir inside it: "
        f"pass workdirs evaluated with dunet-evaluate (its {EVAL_SUBDIR}/*/{METRICS_JSON})",
      )
    evaluations = list(own)
    for run in runs:
      run_evaluations = _own_evaluations(run)
      if not run_evaluations:
        raise DataError(run, _no_evaluation(run, split))
      evaluations.extend(run_evaluations)
    found.extend(_filtered(evaluations, split, folder))
  return found


def read_evaluation(eval_dir: PathLike, workdir: Optional[PathLike] = None) -> Evaluation:
  """Reads one evaluation folder.

  Args:
    eval_dir: a folder holding dunet-evaluate's metrics.json.
    workdir: the run it belongs to; default: found from the path (<workdir>/eval/<name>).

  Returns:
    The Evaluation; HD95 comes from the report, else from per_image.csv's "hd95" column (the mean
    of its finite values), else None.

  Raises:
    DataError: a missing, unreadable or foreign metrics.json (naming it).
  """
  eval_dir = os.fspath(eval_dir)
  path = os.path.join(eval_dir, METRICS_JSON)
  report = _read_report(path)
  if workdir is None:
    parent = os.path.dirname(os.path.normpath(eval_dir))
    workdir = os.path.dirname(parent) if os.path.basename(parent) == EVAL_SUBDIR else None
  workdir = os.fspath(workdir) if workdir is not None else None
  data = report["data"]
  split = str(data.get("split") or "")
  scores = {name: _report_score(report, name) for name in SCORES}
  if scores["hd95"] is None:
    scores["hd95"] = _per_image_mean(os.path.join(eval_dir, PER_IMAGE_CSV), "hd95")
  for name in SCORES:
    if scores[name] is None and name not in OPTIONAL_SCORES:
      raise DataError(path, f"the report holds no {name!r} score for {HEAD}")
  fold, folds = fold_of(workdir) if workdir else (None, None)
  eval_name = os.path.basename(os.path.normpath(eval_dir))
  if fold is not None:
    # Each fold's own held-out split (fold_<k>) is one split for the experiment's row.
    own_split = f"fold_{fold}"
    if split == own_split:
      split = HELD_OUT
    eval_name = eval_name.replace(own_split, HELD_OUT)
  return Evaluation(
    eval_dir=eval_dir,
    workdir=workdir,
    run=os.path.basename(os.path.normpath(workdir)) if workdir else eval_name,
    variant=eval_name if workdir else "",
    dataset=dataset_name(data),
    split=split,
    images=int(report.get("images", 0)),
    scores=scores,
    fold=fold,
    folds=folds,
    experiment=os.path.dirname(os.path.abspath(workdir)) if fold is not None else "",
    report=report,
  )


def fold_of(workdir: PathLike) -> Tuple[Optional[int], Optional[int]]:
  """(fold, folds) of a cross-validation fold's workdir; (None, None) for another run.

  Read from train_config.json's data section, else config.json, else the folder's name
  (fold_<k>: the count is then unknown, None). A recorded fold of -1 means no fold.
  """
  workdir = os.fspath(workdir)
  train_data = _read_json_or_empty(os.path.join(workdir, TRAIN_CONFIG_JSON)).get("data")
  run_config = _read_json_or_empty(os.path.join(workdir, RUN_CONFIG_JSON))
  for section in (train_data, run_config):
    # dunet-train records fold -1 for a run that is not a fold.
    if isinstance(section, Mapping) and section.get("fold") is not None:
      if int(section["fold"]) < 0:
        return None, None
      folds = section.get("folds")
      return int(section["fold"]), (int(folds) if folds is not None else None)
  match = _FOLD_DIR.match(os.path.basename(os.path.normpath(workdir)))
  if match:
    return int(match.group(1)), None
  return None, None


def dataset_name(data: Mapping[str, Any]) -> str:
  """The data set's name from a report's data section.

  A name the section records ("dataset" or "name") first; else the paper's name of the recorded
  layout (DATASET_NAMES); else the data folder's name. A test split prepared from a separate
  test folder (dunet-prepare --test_raw_dir: the MICCAI 2015 setting, CVC-ClinicDB -> ETIS) is
  named after that folder's data set, with the one trained on, when the prepared folder's
  summary.json still says so.
  """
  for key in ("dataset", "name"):
    if data.get(key):
      return str(data[key])
  if data.get("raw_dir"):
    return _layout_name(data.get("layout"), data["raw_dir"])
  data_dir = data.get("data_dir")
  if not data_dir:
    return "unknown"
  main = _layout_name(data.get("layout"), data_dir)
  if data.get("split") == "test":
    summary = _read_json_or_empty(os.path.join(os.fspath(data_dir), SUMMARY_JSON))
    test_raw = summary.get("test_raw")
    if isinstance(test_raw, Mapping) and test_raw.get("dir"):
      trained_on = _layout_name(summary.get("layout"), summary.get("raw_dir") or data_dir)
      return f"{_layout_name(test_raw.get('layout'), test_raw['dir'])} (trained on {trained_on})"
  return main


def read_per_image_csv(path: PathLike) -> List[Dict[str, str]]:
  """per_image.csv's rows as {column: text}.

  Raises:
    DataError: a missing or unreadable file, or one without the name and dsc columns.
  """
  path = os.fspath(path)
  try:
    with tf.io.gfile.GFile(path, "r") as handle:
      text = handle.read()
  except (tf.errors.OpError, OSError, UnicodeDecodeError) as error:
    raise DataError(path, f"cannot read the per-image scores ({_short(error)})") from error
  reader = csv.DictReader(io.StringIO(text))
  columns = reader.fieldnames or []
  if "name" not in columns or "dsc" not in columns:
    raise DataError(path, f"not a dunet-evaluate per_image.csv (columns {columns})")
  return list(reader)


def per_image_values(rows: Sequence[Mapping[str, str]], column: str) -> np.ndarray:
  """A per_image.csv column as float64; NaN where a row has no number."""
  values = []
  for row in rows:
    try:
      values.append(float(row.get(column) or "nan"))
    except ValueError:
      values.append(float("nan"))
  return np.asarray(values, np.float64)


# ================================================================================================
# Rows
# ================================================================================================


def build_rows(evaluations: Sequence[Evaluation]) -> List[Row]:
  """The table's rows, sorted by data set, split and run.

  Evaluations of folds of one experiment (same parent folder) with the same data set, split
  and evaluation folder name become one row: the mean and sample standard deviation over them.

  Raises:
    ConfigError: two evaluations of the same fold in one group (the mean would count it twice).
  """
  groups: Dict[Tuple[str, ...], List[Evaluation]] = {}
  for evaluation in evaluations:
    if evaluation.fold is not None:
      key = (
        "folds",
        evaluation.experiment,
        evaluation.dataset,
        evaluation.split,
        evaluation.variant,
      )
    else:
      key = ("run", os.path.abspath(evaluation.eval_dir))
    groups.setdefault(key, [])
    if key[0] == "run" and groups[key]:
      continue  # the same folder named twice
    groups[key].append(evaluation)
  rows = [_row(key[0] == "folds", members) for key, members in groups.items()]
  order = {split: index for index, split in enumerate(SPLIT_ORDER)}
  rows.sort(key=lambda row: (row.dataset, order.get(row.split, len(order)), row.split, row.name))
  return rows


def _row(is_folds: bool, members: List[Evaluation]) -> Row:
  first = members[0]
  if not is_folds:
    return Row(
      first.dataset,
      first.split,
      first.run,
      first.variant,
      0,
      first.images,
      dict(first.scores),
      {name: None for name in SCORES},
      (first,),
    )
  members = sorted(members, key=lambda evaluation: evaluation.fold)
  seen: Dict[int, Evaluation] = {}
  for evaluation in members:
    if evaluation.fold in seen:
      raise ConfigError(
        f"{seen[evaluation.fold].eval_dir} and {evaluation.eval_dir} are both fold "
        f"{evaluation.fold} of {first.experiment}: pass only one of them in --workdirs"
      )
    seen[evaluation.fold] = evaluation
  mean: Dict[str, Optional[float]] = {}
  std: Dict[str, Optional[float]] = {}
  for name in SCORES:
    values = [evaluation.scores[name] for evaluation in members]
    if any(value is None for value in values):
      mean[name] = std[name] = None
      continue
    array = np.asarray(values, np.float64)
    mean[name] = float(array.mean())
    std[name] = float(array.std(ddof=1)) if len(array) > 1 else None
  expected = {evaluation.folds for evaluation in members if evaluation.folds is not None}
  return Row(
    first.dataset,
    first.split,
    os.path.basename(first.experiment) or first.run,
    first.variant,
    len(members),
    sum(evaluation.images for evaluation in members),
    mean,
    std,
    tuple(members),
    max(expected) if expected else None,
  )


# ================================================================================================
# The table
# ================================================================================================


def format_value(row: Row, name: str) -> str:
  """A score as the paper prints it: `0.9239`, or `0.9012 ± 0.0101` over folds; "-" if none."""
  value = row.mean.get(name)
  if value is None or not math.isfinite(value):
    return MISSING if value is None else f"{value}"
  decimals = DECIMALS[name]
  text = f"{value:.{decimals}f}"
  spread = row.std.get(name)
  if spread is not None:
    text += f" ± {spread:.{decimals}f}"
  return text


def format_markdown(rows: Sequence[Row], title: str = "DoubleU-Net results") -> str:
  """The table as markdown, with the notes and the report each row was made from."""
  header = ["data set", "split", "model / run", "folds", "images"] + [
    SCORE_TITLES[name] for name in SCORES
  ]
  lines = [
    f"# {title}",
    "",
    "| " + " | ".join(header) + " |",
    "| --- | --- | --- |" + " ---: |" * (len(header) - 3),
  ]
  for row in rows:
    cells = [
      row.dataset,
      row.split,
      row.name,
      _folds_text(row),
      str(row.images),
    ] + [format_value(row, name) for name in SCORES]
    lines.append("| " + " | ".join(_escape(cell) for cell in cells) + " |")
  lines += ["", STATISTICS_NOTE, "", "Reports:"]
  for row in rows:
    for evaluation in row.evaluations:
      fold = f" fold {evaluation.fold}" if row.folds else ""
      lines.append(
        f"- {row.dataset}, {row.split}, {row.name}{fold}: `{evaluation.metrics_path}` "
        f"({_settings_text(evaluation.report)})"
      )
  return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[Row]) -> str:
  """The table as CSV: one line per row, each score and its spread (`dsc`, `dsc_std`) with
  CSV_DECIMALS decimals, empty where there is none; `reports` lists the metrics.json files."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  score_columns = [column for name in SCORES for column in (name, f"{name}_std")]
  writer.writerow(
    ["dataset", "split", "run", "variant", "folds", "images", *score_columns, "reports"]
  )
  for row in rows:
    values = []
    for name in SCORES:
      for value in (row.mean.get(name), row.std.get(name)):
        values.append("" if value is None else f"{value:.{CSV_DECIMALS}f}")
    writer.writerow(
      [
        row.dataset,
        row.split,
        row.run,
        row.variant,
        row.folds,
        row.images,
        *values,
        ";".join(evaluation.metrics_path for evaluation in row.evaluations),
      ]
    )
  return buffer.getvalue()


def write_results(rows: Sequence[Row], out_dir: PathLike) -> Dict[str, str]:
  """Writes results.md and results.csv into `out_dir` atomically; returns {name: path}."""
  out_dir = os.fspath(out_dir)
  tf.io.gfile.makedirs(out_dir)
  paths = {name: os.path.join(out_dir, name) for name in (RESULTS_MD, RESULTS_CSV)}
  fileio.write_text_atomic(paths[RESULTS_MD], format_markdown(rows))
  fileio.write_text_atomic(paths[RESULTS_CSV], format_csv(rows))
  return paths


# ================================================================================================
# Helpers
# ================================================================================================


def _is_report_folder(folder: str) -> bool:
  path = os.path.join(folder, METRICS_JSON)
  if not tf.io.gfile.exists(path):
    return False
  # A training workdir also holds a metrics.json (the last validation's): not a report.
  return _read_json_or_empty(path).get("format") == REPORT_FORMAT or not _is_workdir(folder)


def _is_training_run(folder: str) -> bool:
  return any(
    tf.io.gfile.exists(os.path.join(folder, name)) for name in (TRAIN_CONFIG_JSON, RUN_CONFIG_JSON)
  )


def _is_workdir(folder: str) -> bool:
  return _is_training_run(folder) or tf.io.gfile.isdir(os.path.join(folder, EVAL_SUBDIR))


def _child_dirs(folder: str) -> List[str]:
  return [
    os.path.join(folder, name.rstrip("/"))
    for name in sorted(tf.io.gfile.listdir(folder))
    if tf.io.gfile.isdir(os.path.join(folder, name.rstrip("/")))
  ]


def _own_evaluations(workdir: str) -> List[Evaluation]:
  """The evaluations in <workdir>/eval/*/metrics.json."""
  eval_root = os.path.join(workdir, EVAL_SUBDIR)
  if not tf.io.gfile.isdir(eval_root):
    return []
  return [
    read_evaluation(child, workdir)
    for child in _child_dirs(eval_root)
    if tf.io.gfile.exists(os.path.join(child, METRICS_JSON))
  ]


def _no_evaluation(workdir: str, split: Optional[str]) -> str:
  return (
    f"no evaluation ({EVAL_SUBDIR}/*/{METRICS_JSON}): run dunet-evaluate "
    f"--checkpoint={workdir}{f' --split={split}' if split else ''} first"
  )


def _filtered(evaluations: List[Evaluation], split: Optional[str], where: str) -> List[Evaluation]:
  if not split:
    return evaluations
  kept = [evaluation for evaluation in evaluations if evaluation.split == split]
  if not kept:
    found = ", ".join(f"{e.variant or e.run} ({e.split})" for e in evaluations)
    raise DataError(
      where,
      f"no evaluation of the {split!r} split (found {found}): run dunet-evaluate "
      f"--checkpoint=WORKDIR --split={split} first, or choose another --split",
    )
  return kept


def _read_report(path: str) -> Dict[str, Any]:
  if not tf.io.gfile.exists(path):
    raise DataError(path, "no evaluation report here: run dunet-evaluate first")
  try:
    with tf.io.gfile.GFile(path, "r") as handle:
      report = json.loads(handle.read())
  except (tf.errors.OpError, OSError, UnicodeDecodeError, ValueError) as error:
    raise DataError(
      path, f"cannot read the evaluation report ({_short(error)}): run dunet-evaluate again"
    ) from error
  if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
    found = report.get("format") if isinstance(report, dict) else type(report).__name__
    raise DataError(
      path, f"not a dunet-evaluate report (format {found!r}, expected {REPORT_FORMAT!r})"
    )
  metrics = report.get("metrics")
  if not isinstance(metrics, dict) or not isinstance(metrics.get(HEAD), dict):
    raise DataError(path, f"the report holds no metrics for {HEAD}: run dunet-evaluate again")
  if not isinstance(report.get("data"), dict):
    raise DataError(path, "the report has no data section: run dunet-evaluate again")
  return report


def _report_score(report: Mapping[str, Any], name: str) -> Optional[float]:
  head = report["metrics"][HEAD]
  for statistic in STATISTICS:
    values = head.get(statistic)
    if isinstance(values, Mapping) and values.get(name) is not None:
      return float(values[name])
  headline = report.get("headline") or {}
  if headline.get(name) is not None:
    return float(headline[name])
  return None


def _per_image_mean(path: str, column: str) -> Optional[float]:
  """The mean of a per_image.csv column's finite values; None without the file or column."""
  if not tf.io.gfile.exists(path):
    return None
  rows = read_per_image_csv(path)
  if not rows or column not in rows[0]:
    return None
  values = per_image_values(rows, column)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else None


def _read_json_or_empty(path: str) -> Dict[str, Any]:
  """A JSON object file's content; {} when it is missing or unreadable (optional context)."""
  try:
    if not tf.io.gfile.exists(path):
      return {}
    with tf.io.gfile.GFile(path, "r") as handle:
      value = json.loads(handle.read())
  except (tf.errors.OpError, OSError, UnicodeDecodeError, ValueError):
    return {}
  return value if isinstance(value, dict) else {}


def _layout_name(layout: Optional[str], folder: PathLike) -> str:
  if layout in DATASET_NAMES:
    return DATASET_NAMES[layout]
  return os.path.basename(os.path.normpath(os.fspath(folder))) or "unknown"


def _settings_text(report: Mapping[str, Any]) -> str:
  flips = report.get("tta")
  parts = [
    f"{report.get('images', '?')} images",
    f"threshold {report.get('threshold', '?')}",
    f"TTA {'+'.join(flips)}" if flips else "no TTA",
    f"resolution {report.get('resolution', '?')}",
  ]
  if report.get("batch_norm_recomputed"):
    parts.append("BatchNorm statistics recomputed")
  return ", ".join(parts)


def _folds_text(row: Row) -> str:
  """`5`, or `3 of 5` when folds are missing; "-" for a single run."""
  if not row.folds:
    return MISSING
  if row.folds_expected and row.folds_expected != row.folds:
    return f"{row.folds} of {row.folds_expected}"
  return str(row.folds)


def _escape(cell: str) -> str:
  return cell.replace("|", "\\|")


def _short(error: BaseException) -> str:
  return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
