"""Preparation: a raw data set read once, checked, resized and written as sharded TFRecords.

`prepare_dataset` writes into a temporary folder next to `out_dir` and renames it at the end, so an
interrupted run leaves no usable-looking output. The prepared folder holds

  {train,valid,test}-SSSSS-of-NNNNN.tfrecord   records (see `dunet.data.records`)
  split.json                                   the split used (see `dunet.data.splits`)
  folds.json                                   only with folds=K: the K folds of split.json's
                                               train+valid names (see `dunet.data.folds`); the
                                               records are then fold_0 ... fold_{K-1} and test
                                               (no train/valid splits), each fold keeping the
                                               original-resolution masks as valid does
  summary.json                                 sizes, counts, foreground fractions, shards (with
                                               their sizes, record counts and SHA-256 digests),
                                               skipped files, notes, and a fingerprint of the raw
                                               files
  raw_files.json                               each raw file used, with its size and modification
                                               time, so that a change can be named file by file

Checks against the preparation: `verify_shards` (shards still as written: size at every training
start, content on request) and `raw_data_changes` / `check_fresh` (the raw folder since then).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import tensorflow as tf
from absl import logging

from dunet import errors
from dunet import fileio
from dunet import progress as progress_lib
from dunet.data import folds as folds_lib
from dunet.data import layouts, readers, records, splits
from dunet.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

SUMMARY_FILE = "summary.json"
SPLIT_FILE = "split.json"
RAW_FILES_FILE = "raw_files.json"
SUMMARY_FORMAT = "dunet-prepared"
SUMMARY_VERSION = 1
# Default shard size: a few shards per split let tf.data read files in parallel and shard across
# workers, without thousands of small files.
EXAMPLES_PER_SHARD = 256
# How many notes (conversions) and skips summary.json lists by name; all are counted.
_LISTED = 50
# How many changed raw files an error message names per kind (added, removed, modified).
_NAMED_CHANGES = 5


def prepare_dataset(
  raw_dir: PathLike,
  out_dir: PathLike,
  *,
  height: int,
  width: int,
  layout: str = "auto",
  split_file: Optional[PathLike] = None,
  seed: int = 42,
  valid_fraction: float = 0.1,
  test_fraction: float = 0.1,
  test_raw_dir: Optional[PathLike] = None,
  test_layout: str = "auto",
  on_error: str = "raise",
  num_shards: Optional[int] = None,
  progress: bool = True,
  overwrite: bool = False,
  workers: Optional[int] = None,
  folds: int = 0,
  folds_file: Optional[PathLike] = None,
) -> dict:
  """Prepares a raw data set for training and evaluation.

  Args:
    raw_dir: the data set folder as downloaded.
    out_dir: the prepared folder to create.
    height: prepared image height (DoubleU-Net needs a multiple of 16).
    width: prepared image width.
    layout: a name from `dunet.data.layouts.LAYOUTS`, or "auto".
    split_file: a split JSON to use instead of drawing one.
    seed: the split seed (the paper: 42).
    valid_fraction: share of the examples for validation (rounded down).
    test_fraction: share for testing (ignored with `test_raw_dir`).
    test_raw_dir: a separate data set used whole as the test split (e.g. ETIS-Larib for a model
      trained on CVC-ClinicDB); `raw_dir` is then split into train and valid only.
    test_layout: the layout of `test_raw_dir`.
    on_error: "raise" stops at the first bad file; "skip" logs, counts and lists it, and goes on.
    num_shards: shards per split (fewer for small splits); None: one per 256 examples.
    progress: show a progress line on stderr.
    overwrite: replace an existing prepared `out_dir` (only once the new one is complete).
    workers: threads that decode and resize (default: the CPU count).
    folds: K >= 2: divide the split's train+valid names into K folds drawn from `seed`
      (`dunet.data.folds.make_folds`) and write them as the prepared splits fold_0 ...
      fold_{K-1} plus test, with folds.json; 0: no folds (train, valid, test as ever).
    folds_file: a folds.json to use instead of drawing the folds (implies its K; checked against
      the split: no fold may hold a test name or a name the data set lacks).

  Returns:
    The summary (also written to `out_dir/summary.json`); with folds, its "folds" entry gives K,
    the fold splits, the seed and the rule.

  Raises:
    ConfigError: bad settings (sizes, on_error, num_shards, folds).
    DataError: naming the offending file or folder.
  """
  if height <= 0 or width <= 0:
    raise errors.ConfigError(f"height and width must be positive, got {height}x{width}")
  if on_error not in layouts.ON_ERROR:
    raise errors.ConfigError(f"on_error must be one of {layouts.ON_ERROR}, got {on_error!r}")
  if num_shards is not None and num_shards <= 0:
    raise errors.ConfigError(f"num_shards must be positive, got {num_shards}")
  if folds < 0 or folds == 1:
    raise errors.ConfigError(f"folds must be 0 (no folds) or at least 2, got {folds}")
  out_dir = Path(out_dir)
  _check_out_dir(out_dir, overwrite)

  skipped: List[dict] = []
  main_scan = layouts.scan_checked(raw_dir, layout, on_error=on_error, skipped=skipped)
  test_scan = (
    layouts.scan_checked(test_raw_dir, test_layout, on_error=on_error, skipped=skipped)
    if test_raw_dir
    else None
  )
  split, unassigned, split_rule = _choose_split(
    main_scan, test_scan, split_file, seed, valid_fraction, test_fraction
  )
  chosen_folds = _choose_folds(split, folds, folds_file, seed, main_scan.raw_dir)
  if chosen_folds is not None:
    unassigned = unassigned + chosen_folds.unassigned
  # (prepared split name, its stems, whether it keeps the original-resolution masks)
  to_write = _splits_to_write(split, chosen_folds)
  by_stem = {pair.stem: (pair, main_scan.raw_dir) for pair in main_scan.pairs}
  test_by_stem = (
    {pair.stem: (pair, test_scan.raw_dir) for pair in test_scan.pairs} if test_scan else by_stem
  )

  with fileio.staged_directory(out_dir, overwrite, purpose="partial") as staging_name:
    staging = Path(staging_name)
    notes: List[str] = []
    split_stats = {}
    total = sum(len(stems) for _, stems, _ in to_write)
    bar = (
      progress_lib.ProgressLine(total, 1, every=max(1, total // 20), unit="img")
      if progress and total
      else None
    )
    done = [0]

    def advance() -> None:
      done[0] += 1
      if bar is not None:
        bar.update(done[0], {})

    for name, stems, keep_original in to_write:
      source = test_by_stem if name == "test" else by_stem
      split_stats[name] = _write_split(
        staging,
        name,
        [source[stem] for stem in stems],
        height,
        width,
        keep_original=keep_original,
        on_error=on_error,
        num_shards=num_shards,
        workers=workers or os.cpu_count() or 1,
        skipped=skipped,
        notes=notes,
        advance=advance,
      )
    if bar is not None:
      bar.close()
    if not any(stats["count"] for name, stats in split_stats.items() if name != "test"):
      raise DataError(main_scan.raw_dir, "no example could be prepared")

    splits.write_split(
      staging / SPLIT_FILE,
      split,
      seed=None if split_file else seed,
      rule=split_rule,
      separate_test=test_scan is not None,
    )
    if chosen_folds is not None:
      folds_lib.write_folds(
        staging / folds_lib.FOLDS_FILE,
        chosen_folds.folds,
        seed=chosen_folds.seed,
        rule=chosen_folds.rule,
      )
    summary = _summary(
      main_scan, test_scan, height, width, seed, split_rule, split_stats, unassigned, skipped, notes
    )
    if chosen_folds is not None:
      summary["folds"] = {
        "k": len(chosen_folds.folds),
        "file": folds_lib.FOLDS_FILE,
        "splits": [folds_lib.fold_name(i) for i in range(len(chosen_folds.folds))],
        "seed": chosen_folds.seed,
        "rule": chosen_folds.rule,
      }
    _write_json(
      staging / RAW_FILES_FILE,
      {"raw": _raw_listing(main_scan), "test_raw": _raw_listing(test_scan) if test_scan else None},
    )
    _write_json(staging / SUMMARY_FILE, summary)
  for note in notes[:10]:
    logging.info("converted %s", note)
  if len(notes) > 10:
    logging.info(
      "... and %d more conversions (listed in %s)", len(notes) - 10, out_dir / SUMMARY_FILE
    )
  logging.info(
    "prepared %s: %s (%d skipped)",
    out_dir,
    {name: stats["count"] for name, stats in split_stats.items()},
    len(skipped),
  )
  return summary


def read_summary(data_dir: PathLike) -> dict:
  """The summary.json of a prepared folder, checked.

  Raises:
    DataError: naming the folder, when it is not a complete prepared data set.
  """
  path = Path(data_dir) / SUMMARY_FILE
  if not path.is_file():
    hint = (
      " (an interrupted preparation leaves only a .partial folder: run it again)"
      if Path(data_dir).is_dir()
      else ""
    )
    raise DataError(
      data_dir,
      f"not a prepared data set: no {SUMMARY_FILE}{hint}. Prepare one with dunet-prepare",
    )
  try:
    summary = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as error:
    raise DataError(path, f"not valid JSON: {error}") from error
  if summary.get("format") != SUMMARY_FORMAT or summary.get("version") != SUMMARY_VERSION:
    raise DataError(
      path,
      f"not a dunet summary of version {SUMMARY_VERSION}: prepare the data "
      "again with dunet-prepare",
    )
  return summary


def raw_fingerprint(paths: Iterable[Path], root: Path) -> str:
  """SHA-256 over the relative names, sizes and modification times of `paths`."""
  digest = hashlib.sha256()
  for path in sorted(paths):
    stat = path.stat()
    digest.update(f"{os.path.relpath(path, root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def raw_data_changes(data_dir: PathLike) -> Optional[DataError]:
  """How the raw data changed since `data_dir` was prepared, as an error to raise or report.

  The raw folder(s) recorded in summary.json are scanned again; a file added, removed, or with
  another size or modification time is a change, named in the message (up to 5 of each kind).
  A raw folder that is gone is not a change (prepared data may outlive it).

  Returns:
    A DataError naming the raw folder and the changed files, or None when nothing changed.
  """
  summary = read_summary(data_dir)
  recorded_files = _read_raw_files(data_dir)
  for key in ("raw", "test_raw"):
    recorded = summary.get(key)
    if not recorded or not Path(recorded["dir"]).is_dir():
      continue
    try:
      scan = layouts.scan(recorded["dir"], recorded["layout"])
    except DataError as error:
      return DataError(
        recorded["dir"], f"can no longer be read as it was when {data_dir} was prepared: {error}"
      )
    if _scan_fingerprint(scan) == recorded["fingerprint"]:
      continue
    before = recorded_files.get(key)
    detail = (
      _describe_changes(before, _raw_listing(scan))
      if before is not None
      else "files added, removed or modified"
    )
    return DataError(
      recorded["dir"],
      f"changed since {data_dir} was prepared ({detail}): "
      "prepare it again (dunet-prepare --overwrite)",
    )
  return None


def check_fresh(data_dir: PathLike) -> Optional[str]:
  """Says how the raw data changed since `data_dir` was prepared; None when it did not.

  The message of `raw_data_changes`.
  """
  change = raw_data_changes(data_dir)
  return None if change is None else str(change)


def verify_shards(
  data_dir: PathLike, splits_to_check: Optional[Sequence[str]] = None, content: bool = False
) -> None:
  """Checks that the record shards are still as preparation wrote them.

  Always: each listed shard exists and has the size summary.json recorded (a stat per file, cheap
  enough for every start). With `content`: also reads every shard in full (`records.check_shard`:
  checksums, framing, PNG decoding), compares its record count and SHA-256 digest.
  Preparations older than these records (no `shard_checks` in summary.json) are checked for
  existence only.

  Args:
    data_dir: a prepared folder.
    splits_to_check: the splits to check (default: all).
    content: read and hash the shards too.

  Raises:
    DataError: naming the first shard that is missing, damaged or changed.
  """
  summary = read_summary(data_dir)
  for split in splits_to_check or list(summary["splits"]):
    stats = summary["splits"][split]
    expected_by_name = stats.get("shard_checks", {})
    for name in stats["shards"]:
      path = Path(data_dir) / name
      if not path.is_file():
        raise DataError(
          path,
          "listed in summary.json but missing: prepare the data again (dunet-prepare --overwrite)",
        )
      expected = expected_by_name.get(name)
      if expected is not None and path.stat().st_size != expected["bytes"]:
        raise DataError(
          path,
          f"is {path.stat().st_size} bytes but was {expected['bytes']} when "
          f"prepared ({summary.get('created', 'see summary.json')}): truncated or "
          "rewritten since; prepare the data again (dunet-prepare "
          "--overwrite)",
        )
      if not content:
        continue
      report = records.check_shard(str(path))
      if report.problem:
        raise DataError(
          path,
          f"corrupt TFRecord shard ({report.problem}): prepare the data "
          "again (dunet-prepare --overwrite)",
        )
      if expected is None:
        continue
      if report.records != expected["records"]:
        raise DataError(
          path,
          f"holds {report.records} records but {expected['records']} were "
          "written at preparation: prepare the data again",
        )
      if _sha256(path) != expected["sha256"]:
        raise DataError(
          path,
          "its content changed since preparation (SHA-256 differs from "
          "summary.json): prepare the data again (dunet-prepare "
          "--overwrite)",
        )


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
  if out_dir.exists() and not out_dir.is_dir():
    raise DataError(out_dir, "exists and is not a folder")
  if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
    raise DataError(
      out_dir, "already exists and is not empty: choose another --out_dir or pass --overwrite"
    )


def _choose_split(
  main_scan: layouts.Scan,
  test_scan: Optional[layouts.Scan],
  split_file: Optional[PathLike],
  seed: int,
  valid_fraction: float,
  test_fraction: float,
) -> Tuple[Dict[str, List[str]], List[str], str]:
  """The split to write, the stems it leaves out, and a description of how it was made."""
  stems = [pair.stem for pair in main_scan.pairs]
  if split_file:
    split = splits.read_split(split_file, allow_shared_test=test_scan is not None)
    listed = {"train": split["train"], "valid": split["valid"], "test": []}
    unassigned = splits.check_split_covers(
      listed if test_scan else split, stems, split_file, main_scan.raw_dir
    )
    if test_scan is not None:
      test_stems = [pair.stem for pair in test_scan.pairs]
      splits.check_split_covers(
        {"train": [], "valid": [], "test": split["test"]}, test_stems, split_file, test_scan.raw_dir
      )
    if unassigned:
      logging.warning(
        "%s leaves %d examples of %s out of every split, e.g. %s",
        split_file,
        len(unassigned),
        main_scan.raw_dir,
        unassigned[:5],
      )
    return split, unassigned, f"from {split_file}"
  if test_scan is not None:
    split = splits.make_split(stems, seed=seed, valid_fraction=valid_fraction, test_fraction=0.0)
    split["test"] = sorted(pair.stem for pair in test_scan.pairs)
    return split, [], splits.RULE + f"; test = all of {test_scan.raw_dir}"
  return (
    splits.make_split(stems, seed=seed, valid_fraction=valid_fraction, test_fraction=test_fraction),
    [],
    splits.RULE,
  )


@dataclasses.dataclass(frozen=True)
class _Folds:
  """The folds a preparation writes, and where they came from."""

  folds: List[List[str]]
  seed: Optional[int]  # None: read from a folds file that names no seed
  rule: str
  unassigned: List[str]  # train+valid names a folds file leaves out


def _choose_folds(
  split: Dict[str, List[str]],
  folds: int,
  folds_file: Optional[PathLike],
  seed: int,
  raw_dir: Path,
) -> Optional[_Folds]:
  """The folds to write (None without folds): drawn from `seed`, or read and checked."""
  pool = list(split["train"]) + list(split["valid"])
  if folds_file:
    document = folds_lib.read_folds_document(folds_file)
    given = [list(fold) for fold in document["folds"]]
    if folds and folds != len(given):
      raise errors.ConfigError(f"--folds={folds} but {folds_file} holds {len(given)} folds")
    unassigned = folds_lib.check_folds_cover(given, pool, split["test"], folds_file, raw_dir)
    if unassigned:
      logging.warning(
        "%s leaves %d train/valid examples of %s out of every fold, e.g. %s",
        folds_file,
        len(unassigned),
        raw_dir,
        unassigned[:5],
      )
    return _Folds(given, document.get("seed"), f"from {folds_file}", unassigned)
  if not folds:
    return None
  return _Folds(folds_lib.make_folds(pool, folds, seed), seed, folds_lib.RULE, [])


def _splits_to_write(
  split: Dict[str, List[str]], chosen_folds: Optional[_Folds]
) -> List[Tuple[str, List[str], bool]]:
  """(prepared split, stems, keep the original masks) in writing order.

  Evaluation splits keep the original-resolution masks (scored at the original size); the
  training split does not need them. Every fold is some run's validation split, so each keeps
  them; train and valid are not written then (the folds hold the same images: disk would double).
  """
  if chosen_folds is None:
    return [(name, list(split[name]), name != "train") for name in splits.SPLITS]
  written = [
    (folds_lib.fold_name(index), list(fold), True) for index, fold in enumerate(chosen_folds.folds)
  ]
  return written + [("test", list(split["test"]), True)]


def _prepared(
  item: Tuple[layouts.Pair, Path], height: int, width: int, keep_original: bool
) -> Union[Tuple[bytes, float, Tuple[int, int], List[str]], DataError]:
  """Reads, checks, resizes and serializes one pair (in a worker thread); errors are returned."""
  pair, root = item
  try:
    example = readers.read_pair(pair)
  except DataError as error:
    return error
  original_height, original_width = example.mask.shape
  image = resize_image(example.image, height, width)
  mask = resize_mask(example.mask, height, width)
  serialized = records.serialize_example(
    name=pair.stem,
    source=os.path.relpath(pair.image_path, root),
    image=image,
    mask=mask,
    original_height=original_height,
    original_width=original_width,
    original_mask=example.mask if keep_original else None,
  )
  return serialized, float(mask.mean()), (original_height, original_width), example.notes


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Area interpolation when shrinking (no aliasing), bilinear otherwise; uint8 RGB."""
  if image.shape[:2] == (height, width):
    return image
  shrinking = height <= image.shape[0] and width <= image.shape[1]
  return cv2.resize(
    image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
  )


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
  """Nearest neighbour by pixel centres, then thresholded: stays {0, 1}.

  OpenCV's INTER_NEAREST_EXACT: where a centre falls exactly between two source pixels it takes
  the lower one (TF's nearest resize takes the upper one), so the two differ only at such ties.
  """
  if mask.shape == (height, width):
    return mask
  resized = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
  return (resized > 0).astype(np.uint8)


def _write_split(
  staging: Path,
  split: str,
  items: Sequence[Tuple[layouts.Pair, Path]],
  height: int,
  width: int,
  *,
  keep_original: bool,
  on_error: str,
  num_shards: Optional[int],
  workers: int,
  skipped: List[dict],
  notes: List[str],
  advance: Callable[[], None],
) -> dict:
  """Writes one split's shards; returns its statistics."""
  count = len(items)
  shards = max(1, min(count, num_shards or math.ceil(count / EXAMPLES_PER_SHARD)))
  # Contiguous, nearly equal runs of the (sorted) examples per shard.
  bounds = [round(index * count / shards) for index in range(shards + 1)]
  shard_files = [records.shard_name(split, index, shards) for index in range(shards)]
  written, foreground, sizes = 0, [], []
  per_shard = [0] * shards
  results = readers.ordered_map(
    lambda item: _prepared(item, height, width, keep_original), items, workers
  )
  shard_index, writer = -1, None
  try:
    for position, result in enumerate(results):
      while position >= bounds[shard_index + 1]:
        if writer is not None:
          writer.close()
        shard_index += 1
        writer = tf.io.TFRecordWriter(str(staging / shard_files[shard_index]))
      advance()
      if isinstance(result, DataError):
        if on_error == "raise":
          raise result
        logging.warning("skipped %s", result)
        skipped.append({"file": result.path, "reason": result.problem})
        continue
      serialized, fraction, size, example_notes = result
      writer.write(serialized)
      written += 1
      per_shard[shard_index] += 1
      foreground.append(fraction)
      sizes.append(size)
      notes.extend(example_notes)
  finally:
    if writer is not None:
      writer.close()
  for index in range(shard_index + 1, shards):  # only when a split is empty: still list a file
    tf.io.TFRecordWriter(str(staging / shard_files[index])).close()
  heights = [size[0] for size in sizes] or [0]
  widths = [size[1] for size in sizes] or [0]
  # What `verify_shards` compares later: a truncated or rewritten shard shows.
  shard_checks = {
    name: {
      "records": per_shard[index],
      "bytes": (staging / name).stat().st_size,
      "sha256": _sha256(staging / name),
    }
    for index, name in enumerate(shard_files)
  }
  return {
    "count": written,
    "shards": shard_files,
    "shard_checks": shard_checks,
    "foreground_fraction": float(np.mean(foreground)) if foreground else 0.0,
    "empty_masks": int(sum(fraction == 0 for fraction in foreground)),
    "original_height": {"min": min(heights), "max": max(heights)},
    "original_width": {"min": min(widths), "max": max(widths)},
  }


def _scan_files(scan: layouts.Scan) -> List[Path]:
  return [Path(path) for pair in scan.pairs for path in (pair.image_path, *pair.mask_paths)]


def _scan_fingerprint(scan: layouts.Scan) -> str:
  return raw_fingerprint(_scan_files(scan), scan.raw_dir)


def _raw_listing(scan: layouts.Scan) -> Dict[str, List[int]]:
  """{file relative to the raw folder: [size, modification time in ns]} of the files used."""
  listing = {}
  for path in _scan_files(scan):
    stat = path.stat()
    listing[os.path.relpath(path, scan.raw_dir)] = [stat.st_size, stat.st_mtime_ns]
  return listing


def _read_raw_files(data_dir: PathLike) -> dict:
  path = Path(data_dir) / RAW_FILES_FILE
  if not path.is_file():  # prepared before raw_files.json existed
    return {}
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as error:
    raise DataError(path, f"not valid JSON: {error}") from error


def _describe_changes(before: Dict[str, List[int]], after: Dict[str, List[int]]) -> str:
  """'1 modified: images/a.png; 2 added: images/b.png, masks/b.png' (a few names per kind)."""
  kinds = {
    "modified": sorted(
      name for name in before.keys() & after.keys() if list(before[name]) != list(after[name])
    ),
    "added": sorted(after.keys() - before.keys()),
    "removed": sorted(before.keys() - after.keys()),
  }
  parts = []
  for kind, names in kinds.items():
    if names:
      shown = ", ".join(names[:_NAMED_CHANGES])
      more = f" and {len(names) - _NAMED_CHANGES} more" if len(names) > _NAMED_CHANGES else ""
      parts.append(f"{len(names)} {kind}: {shown}{more}")
  # Same files, sizes and times but another fingerprint: only the recorded listing is older.
  return "; ".join(parts) or "files changed"


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as handle:
    for block in iter(lambda: handle.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _summary(
  main_scan: layouts.Scan,
  test_scan: Optional[layouts.Scan],
  height: int,
  width: int,
  seed: int,
  split_rule: str,
  split_stats: dict,
  unassigned: List[str],
  skipped: List[dict],
  notes: List[str],
) -> dict:
  def raw(scan: layouts.Scan) -> dict:
    return {
      "dir": str(scan.raw_dir.resolve()),
      "layout": scan.layout,
      "pairs": len(scan.pairs),
      "fingerprint": _scan_fingerprint(scan),
    }

  thresholded = [note for note in notes if "not binary" in note]
  return {
    "format": SUMMARY_FORMAT,
    "version": SUMMARY_VERSION,
    "height": height,
    "width": width,
    "layout": main_scan.layout,
    "raw_dir": str(main_scan.raw_dir.resolve()),
    "raw": raw(main_scan),
    "test_raw": raw(test_scan) if test_scan else None,
    "seed": seed,
    "split_rule": split_rule,
    "counts": {name: stats["count"] for name, stats in split_stats.items()},
    "splits": split_stats,
    "unassigned": len(unassigned),
    "skipped": {"count": len(skipped), "files": skipped[:_LISTED]},
    "thresholded_masks": {"count": len(thresholded), "files": thresholded[:_LISTED]},
    "conversions": {"count": len(notes), "notes": notes[:_LISTED]},
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": " ".join(sys.argv),
  }


def _write_json(path: Path, value: dict) -> None:
  path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
