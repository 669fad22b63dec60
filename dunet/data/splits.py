"""The paper's train/valid/test split, and split files (JSON) with validation.

The rule is the reference code's (Jha et al. 2020, data.py): over the file names in sorted order,
draw int(test_fraction * N) test examples, then int(valid_fraction * N) validation examples from the
rest, each draw being scikit-learn's `train_test_split(..., random_state=seed)`, i.e. the first
n_test entries of `numpy.random.RandomState(seed).permutation(n)`. This module reproduces that
with numpy alone (RandomState's stream is frozen by numpy's compatibility policy), so for the same
sorted names it gives the reference code's split; CVC-ClinicDB's 612 images give 490/61/61.

Split file (`split.json`):
  {"format": "dunet-split", "version": 1, "seed": 42, "rule": "...", "separate_test": false,
   "train": [stems], "valid": [stems], "test": [stems]}
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from dunet.errors import DataError

SPLITS = ("train", "valid", "test")
SPLIT_FORMAT = "dunet-split"
SPLIT_VERSION = 1
RULE = (
  "sorted stems; test = first int(test_fraction*N) of RandomState(seed).permutation(N); "
  "valid = first int(valid_fraction*N) of RandomState(seed).permutation(rest) "
  "(the reference code's two train_test_split calls)"
)

PathLike = Union[str, "os.PathLike[str]"]


def make_split(
  stems: Sequence[str], seed: int = 42, valid_fraction: float = 0.1, test_fraction: float = 0.1
) -> Dict[str, List[str]]:
  """Splits example names into train/valid/test deterministically.

  Args:
    stems: unique example names (order does not matter: they are sorted first).
    seed: the split seed (the paper: 42).
    valid_fraction: share of all N examples for validation, rounded down.
    test_fraction: share of all N examples for testing, rounded down; 0 when the test set is a
      separate data set.

  Returns:
    {"train": [...], "valid": [...], "test": [...]}, each sorted.

  Raises:
    ValueError: duplicate stems, fractions outside [0, 1) or summing to 1 or more.
  """
  if len(set(stems)) != len(stems):
    duplicates = sorted({stem for stem in stems if list(stems).count(stem) > 1})
    raise ValueError(f"duplicate example names: {duplicates[:10]}")
  if not (
    0 <= valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1
  ):
    raise ValueError(
      f"valid_fraction={valid_fraction} and test_fraction={test_fraction} must "
      "be in [0, 1) and sum to less than 1"
    )
  names = sorted(stems)
  total = len(names)
  # int(fraction * N) as the reference code computes it (61 of 612), floats and all.
  n_test, n_valid = int(test_fraction * total), int(valid_fraction * total)
  test, rest = _draw(names, n_test, seed)
  valid, train = _draw(rest, n_valid, seed)
  return {"train": sorted(train), "valid": sorted(valid), "test": sorted(test)}


def _draw(names: List[str], count: int, seed: int):
  """scikit-learn's ShuffleSplit draw: (first `count` of a permutation, the rest in its order)."""
  order = np.random.RandomState(seed).permutation(len(names))
  return [names[i] for i in order[:count]], [names[i] for i in order[count:]]


def split_document(
  split: Dict[str, List[str]],
  seed: Optional[int] = None,
  rule: str = RULE,
  separate_test: bool = False,
) -> dict:
  """The JSON document written for `split` (with the seed and rule that produced it)."""
  document = {
    "format": SPLIT_FORMAT,
    "version": SPLIT_VERSION,
    "seed": seed,
    "rule": rule,
    "separate_test": separate_test,
  }
  document.update({name: list(split.get(name, [])) for name in SPLITS})
  return document


def write_split(
  path: PathLike,
  split: Dict[str, List[str]],
  seed: Optional[int] = None,
  rule: str = RULE,
  separate_test: bool = False,
) -> None:
  """Writes a split file (validated first, so a bad split is never written).

  `separate_test` records that the test names come from another data set (see
  `validate_split`); reading the file then allows them to coincide with training names.
  """
  validate_split(split, path, allow_shared_test=separate_test)
  with open(path, "w", encoding="utf-8") as handle:
    json.dump(split_document(split, seed, rule, separate_test), handle, indent=1)
    handle.write("\n")


def read_split(path: PathLike, *, allow_shared_test: bool = False) -> Dict[str, List[str]]:
  """Reads and validates a split file.

  Accepts dunet's own files and plain {"train": [...], "valid": [...], "test": [...]} objects
  (a missing "test" or "valid" means empty); entries may be stems or file names (the extension
  is dropped).

  Args:
    path: the JSON file.
    allow_shared_test: see `validate_split` (also allowed when the file says "separate_test").

  Returns:
    {"train", "valid", "test"} lists of stems.

  Raises:
    DataError: naming the file: unreadable, not JSON, wrong structure, overlapping splits.
  """
  try:
    with open(path, encoding="utf-8") as handle:
      document = json.load(handle)
  except OSError as error:
    raise DataError(path, f"cannot read the split file: {error.strerror or error}") from error
  except json.JSONDecodeError as error:
    raise DataError(path, f"split file is not valid JSON: {error}") from error
  if not isinstance(document, dict) or "train" not in document:
    raise DataError(
      path, "split file must be a JSON object with a 'train' list (and 'valid', 'test' lists)"
    )
  unknown = sorted(
    set(document) - set(SPLITS) - {"format", "version", "seed", "rule", "separate_test"}
  )
  if unknown:
    raise DataError(path, f"split file has unknown keys {unknown}; expected {list(SPLITS)}")
  split = {}
  for name in SPLITS:
    entries = document.get(name, [])
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
      raise DataError(path, f"'{name}' must be a list of non-empty strings")
    split[name] = [_stem(entry) for entry in entries]
  validate_split(
    split, path, allow_shared_test=allow_shared_test or bool(document.get("separate_test", False))
  )
  return split


def validate_split(
  split: Dict[str, List[str]], path: PathLike = "<split>", *, allow_shared_test: bool = False
) -> None:
  """Checks that no name repeats within a split or appears in two splits.

  Args:
    split: {"train", "valid", "test"} lists.
    path: named in the error.
    allow_shared_test: the test split comes from a separate data set (test_raw_dir), so its names
      may coincide with training names without being the same images.

  Raises:
    DataError: naming `path` and the offending names.
  """
  for name in SPLITS:
    entries = split.get(name, [])
    if len(set(entries)) != len(entries):
      repeated = sorted({e for e in entries if entries.count(e) > 1})
      raise DataError(path, f"'{name}' lists {repeated[:10]} more than once")
  pairs = [("train", "valid")]
  if not allow_shared_test:
    pairs += [("train", "test"), ("valid", "test")]
  for first, second in pairs:
    shared = sorted(set(split.get(first, [])) & set(split.get(second, [])))
    if shared:
      raise DataError(
        path,
        f"{len(shared)} examples are in both '{first}' and '{second}' "
        f"(e.g. {shared[:5]}): test images would leak into training",
      )


def _stem(entry: str) -> str:
  base = os.path.basename(entry)
  root, extension = os.path.splitext(base)
  return root if extension.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp") else base


def check_split_covers(
  split: Dict[str, List[str]], stems: Sequence[str], path: PathLike, raw_dir: PathLike
) -> List[str]:
  """Checks a user-given split against the examples found; returns stems it leaves unassigned.

  Raises:
    DataError: naming the split file, when it lists names that are not in `raw_dir`.
  """
  known = set(stems)
  listed = [stem for name in SPLITS for stem in split[name]]
  missing = sorted(set(listed) - known)
  if missing:
    raise DataError(path, f"{len(missing)} names are not in {raw_dir}, e.g. {missing[:5]}")
  return sorted(known - set(listed))
