"""K-fold cross-validation: folds of the train+valid pool, the folds file, and a fold's splits.

`make_folds` divides the pool (split.json's train and valid names; the test split is left as it
is) into K folds: over the names in sorted order, `numpy.random.RandomState(seed).permutation(N)`
cut into K contiguous runs (`numpy.array_split`: sizes differ by at most one), each fold sorted.
Same names and seed, same folds, on every machine (RandomState's stream is frozen by numpy's
compatibility policy).

A prepared folder made with `dunet-prepare --folds=K` holds one prepared split per fold,
`fold_0` ... `fold_{K-1}` (each with the original-resolution masks, as a valid split has), plus
`test`, and no `train`/`valid` splits. Training on fold k (`dunet-train --fold=k`) trains on the
other K-1 folds and validates on `fold_k` (`fold_splits`).

Folds file (`folds.json`, beside split.json):
  {"format": "dunet-folds", "version": 1, "seed": 42, "k": 5, "rule": "...",
   "folds": [[names of fold 0], [names of fold 1], ...]}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from dunet.errors import ConfigError
from dunet.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

FOLDS_FILE = "folds.json"
FOLDS_FORMAT = "dunet-folds"
FOLDS_VERSION = 1
FOLD_PREFIX = "fold_"
RULE = (
  "sorted train+valid names of split.json; RandomState(seed).permutation(N) cut into k "
  "contiguous runs (numpy.array_split); each fold sorted"
)
_KEYS = ("format", "version", "seed", "k", "rule", "folds")


def fold_name(index: int) -> str:
  """The prepared split holding fold `index`: "fold_3"."""
  return f"{FOLD_PREFIX}{index}"


def make_folds(names: Sequence[str], k: int, seed: int = 42) -> List[List[str]]:
  """Divides `names` into `k` folds deterministically.

  Args:
    names: unique example names (order does not matter: they are sorted first).
    k: the number of folds, at least 2 and at most len(names).
    seed: seeds the permutation.

  Returns:
    `k` sorted lists, disjoint, together `names`, their sizes differing by at most one.

  Raises:
    ConfigError: k < 2, more folds than names, or repeated names.
  """
  if k < 2:
    raise ConfigError(f"--folds must be at least 2 (0: no folds), got {k}")
  if len(set(names)) != len(names):
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    raise ConfigError(f"repeated example names cannot be divided into folds: {repeated[:10]}")
  if k > len(names):
    raise ConfigError(f"--folds={k} is more than the {len(names)} train+valid examples")
  ordered = sorted(names)
  order = np.random.RandomState(seed).permutation(len(ordered))
  return [sorted(ordered[i] for i in run) for run in np.array_split(order, k)]


def folds_document(folds: Sequence[Sequence[str]], seed: Optional[int], rule: str = RULE) -> dict:
  """The JSON document written for `folds` (with the seed and rule that produced them)."""
  return {
    "format": FOLDS_FORMAT,
    "version": FOLDS_VERSION,
    "seed": seed,
    "k": len(folds),
    "rule": rule,
    "folds": [list(fold) for fold in folds],
  }


def validate_folds(folds: Sequence[Sequence[str]], path: PathLike = "<folds>") -> None:
  """Checks that there are at least 2 folds, none empty, and no name in two places.

  Raises:
    DataError: naming `path` and the offending fold or names.
  """
  if len(folds) < 2:
    raise DataError(path, f"needs at least 2 folds, has {len(folds)}")
  seen = {}
  for index, fold in enumerate(folds):
    if not fold:
      raise DataError(path, f"fold {index} is empty")
    for name in fold:
      if name in seen:
        where = "twice in fold" if seen[name] == index else f"in folds {seen[name]} and"
        raise DataError(path, f"{name!r} is listed {where} {index}: folds must be disjoint")
      seen[name] = index


def write_folds(
  path: PathLike, folds: Sequence[Sequence[str]], seed: Optional[int], rule: str = RULE
) -> None:
  """Writes a folds file (validated first, so bad folds are never written).

  Raises:
    DataError: folds that `validate_folds` rejects.
  """
  validate_folds(folds, path)
  with open(path, "w", encoding="utf-8") as handle:
    json.dump(folds_document(folds, seed, rule), handle, indent=1)
    handle.write("\n")


def read_folds_document(path: PathLike) -> dict:
  """Reads and checks a folds file; returns its whole document (seed, k, rule, folds).

  Raises:
    DataError: naming the file: unreadable, not JSON, not a dunet folds file of this version,
      k not the number of folds, entries that are not names, empty or overlapping folds.
  """
  try:
    with open(path, encoding="utf-8") as handle:
      document = json.load(handle)
  except OSError as error:
    raise DataError(path, f"cannot read the folds file: {error.strerror or error}") from error
  except json.JSONDecodeError as error:
    raise DataError(path, f"folds file is not valid JSON: {error}") from error
  if not isinstance(document, dict) or document.get("format") != FOLDS_FORMAT:
    raise DataError(
      path, f'not a folds file: expected a JSON object with "format": {FOLDS_FORMAT!r}'
    )
  if document.get("version") != FOLDS_VERSION:
    raise DataError(
      path, f"folds file version {document.get('version')!r}; this dunet reads {FOLDS_VERSION}"
    )
  unknown = sorted(set(document) - set(_KEYS))
  if unknown:
    raise DataError(path, f"folds file has unknown keys {unknown}; expected {list(_KEYS)}")
  folds = document.get("folds")
  if not isinstance(folds, list) or not all(
    isinstance(fold, list) and all(isinstance(name, str) and name for name in fold)
    for fold in folds
  ):
    raise DataError(path, '"folds" must be a list of lists of non-empty names')
  if document.get("k") != len(folds):
    raise DataError(path, f'"k" is {document.get("k")!r} but {len(folds)} folds are listed')
  validate_folds(folds, path)
  return document


def read_folds(path: PathLike) -> List[List[str]]:
  """The folds of a folds file, checked (see `read_folds_document`).

  Raises:
    DataError: naming the file.
  """
  return [list(fold) for fold in read_folds_document(path)["folds"]]


def check_folds_cover(
  folds: Sequence[Sequence[str]],
  pool: Sequence[str],
  test: Sequence[str],
  path: PathLike,
  raw_dir: PathLike,
) -> List[str]:
  """Checks user-given folds against the train+valid pool; returns pool names left out.

  Args:
    folds: the folds read from `path`.
    pool: the train+valid names of the split in use.
    test: the test split's names (no fold may hold one: it would train on test images).
    path: the folds file, named in errors.
    raw_dir: the data set folder, named in errors.

  Raises:
    DataError: naming the folds file, when a fold lists a test name or a name not in the pool.
  """
  listed = [name for fold in folds for name in fold]
  # With a separate test data set (test_raw_dir) its names may coincide with pool names.
  leaked = sorted(set(listed) & (set(test) - set(pool)))
  if leaked:
    raise DataError(
      path,
      f"{len(leaked)} names are in the test split (e.g. {leaked[:5]}): "
      "test images would leak into training",
    )
  missing = sorted(set(listed) - set(pool))
  if missing:
    raise DataError(
      path, f"{len(missing)} names are not train/valid examples of {raw_dir}, e.g. {missing[:5]}"
    )
  return sorted(set(pool) - set(listed))


def num_folds(data_dir: PathLike) -> int:
  """K for a folder prepared in K folds (it holds folds.json), else 0.

  Raises:
    DataError: a folds.json that cannot be read, naming it.
  """
  path = Path(data_dir) / FOLDS_FILE
  if not path.is_file():
    return 0
  return len(read_folds_document(path)["folds"])


def fold_splits(data_dir: PathLike, fold: int) -> Tuple[List[str], str]:
  """The prepared splits of fold `fold`: (training splits, the validation split).

  Args:
    data_dir: a folder prepared in K folds.
    fold: 0 ... K-1.

  Returns:
    (["fold_0", ..., without "fold_{fold}"], "fold_{fold}").

  Raises:
    ConfigError: the folder has no folds, or `fold` is out of range.
  """
  k = num_folds(data_dir)
  if not k:
    raise ConfigError(
      f"--fold={fold}: {data_dir} was not prepared in folds (prepare it with dunet-prepare "
      "--folds=K, or leave out --fold)"
    )
  if not 0 <= fold < k:
    raise ConfigError(
      f"--fold={fold} is out of range: {data_dir} was prepared in {k} folds "
      f"(pass --fold=0..{k - 1})"
    )
  return [fold_name(index) for index in range(k) if index != fold], fold_name(fold)
