"""K-fold cross-validation: the folds, the folds file, and preparation in folds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dunet.data import folds, prepare, splits
from dunet.errors import ConfigError, DataError
from tests.data.helpers import make_generic
from tests.data.test_prepare import read_records

REPO = Path(__file__).resolve().parents[2]
NAMES = [f"case{i:03d}" for i in range(23)]


@pytest.mark.parametrize("k", [2, 3, 5, 23])
def test_folds_are_disjoint_cover_the_pool_and_differ_in_size_by_at_most_one(k):
  drawn = folds.make_folds(NAMES[::-1], k, seed=7)  # the order given does not matter
  assert len(drawn) == k
  assert sorted(name for fold in drawn for name in fold) == NAMES  # each name exactly once
  assert all(fold == sorted(fold) for fold in drawn)
  sizes = [len(fold) for fold in drawn]
  assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(NAMES)


def test_folds_are_the_seeded_permutation_cut_in_runs():
  # The rule, computed another way: fold i holds the names at permutation positions
  # [start_i, start_i + size_i), the first len % k folds one longer.
  order = np.random.RandomState(11).permutation(len(NAMES))
  expected, start = [], 0
  for index in range(4):
    size = len(NAMES) // 4 + (index < len(NAMES) % 4)
    expected.append(sorted(NAMES[i] for i in order[start : start + size]))
    start += size
  assert folds.make_folds(NAMES, 4, seed=11) == expected
  assert folds.make_folds(NAMES, 4, seed=11) == folds.make_folds(list(NAMES), 4, seed=11)
  assert folds.make_folds(NAMES, 4, seed=12) != expected


@pytest.mark.parametrize(
  "names,k,message",
  [
    (NAMES, 1, "at least 2"),
    (NAMES[:3], 4, "more than the 3"),
    (["a", "b", "a"], 2, "repeated"),
  ],
)
def test_make_folds_rejects_what_cannot_be_folded(names, k, message):
  with pytest.raises(ConfigError, match=message):
    folds.make_folds(names, k)


def test_folds_file_round_trip(tmp_path):
  drawn = folds.make_folds(NAMES, 3, seed=5)
  path = tmp_path / "folds.json"
  folds.write_folds(path, drawn, seed=5)
  assert folds.read_folds(path) == drawn
  document = folds.read_folds_document(path)
  assert (document["format"], document["version"], document["seed"], document["k"]) == (
    "dunet-folds",
    1,
    5,
    3,
  )
  with pytest.raises(DataError, match="folds must be disjoint"):
    folds.write_folds(tmp_path / "bad.json", [["a", "b"], ["b"]], seed=None)
  assert not (tmp_path / "bad.json").exists()


def _document(**changes):
  document = folds.folds_document([["a", "b"], ["c"]], seed=1)
  document.update(changes)
  return document


@pytest.mark.parametrize(
  "content,message",
  [
    ("{not json", "not valid JSON"),
    (json.dumps([["a"], ["b"]]), "not a folds file"),
    (json.dumps(_document(version=2)), "version 2"),
    (json.dumps(_document(extra=1)), r"unknown keys \['extra'\]"),
    (json.dumps(_document(folds=[["a"], [3]])), "lists of non-empty names"),
    (json.dumps(_document(k=3)), '"k" is 3 but 2 folds'),
    (json.dumps(_document(folds=[["a", "b"], []], k=2)), "fold 1 is empty"),
    (json.dumps(_document(folds=[["a"], ["b", "a"]], k=2)), "'a' is listed in folds 0 and 1"),
    (json.dumps(_document(folds=[["a", "b", "c"]], k=1)), "at least 2 folds"),
  ],
)
def test_bad_folds_files_are_rejected_naming_the_file(tmp_path, content, message):
  path = tmp_path / "folds.json"
  path.write_text(content)
  with pytest.raises(DataError, match=message) as raised:
    folds.read_folds(path)
  assert str(raised.value).startswith(f"{path}: ")
  with pytest.raises(DataError, match=message):
    folds.num_folds(tmp_path)  # a prepared folder with this folds.json


def test_fold_splits_and_their_errors(tmp_path):
  assert folds.num_folds(tmp_path) == 0
  with pytest.raises(ConfigError, match="not prepared in folds"):
    folds.fold_splits(tmp_path, 0)
  folds.write_folds(tmp_path / folds.FOLDS_FILE, folds.make_folds(NAMES, 4), seed=42)
  assert folds.num_folds(tmp_path) == 4
  assert folds.fold_splits(tmp_path, 2) == (["fold_0", "fold_1", "fold_3"], "fold_2")
  for bad in (4, -1):
    with pytest.raises(ConfigError, match=r"out of range: .* 4 folds \(pass --fold=0..3\)"):
      folds.fold_splits(tmp_path, bad)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("raw")
  make_generic(root, count=20)
  return root


@pytest.fixture(scope="module")
def plain_and_folded(raw_dir, tmp_path_factory):
  """The same raw set prepared plainly and in 3 folds (seed 42)."""
  root = tmp_path_factory.mktemp("prepared")
  plain = prepare.prepare_dataset(raw_dir, root / "plain", height=16, width=32, progress=False)
  folded = prepare.prepare_dataset(
    raw_dir, root / "folded", height=16, width=32, folds=3, progress=False
  )
  return (root / "plain", plain), (root / "folded", folded)


def test_preparation_in_folds_writes_each_fold_and_the_same_test(plain_and_folded):
  (plain_dir, plain), (folded_dir, folded) = plain_and_folded
  split = splits.read_split(plain_dir / "split.json")
  # The test split is untouched: the same names and the same records as without folds.
  assert splits.read_split(folded_dir / "split.json") == split
  test_shard = folded["splits"]["test"]["shards"][0]
  assert (folded_dir / test_shard).read_bytes() == (plain_dir / test_shard).read_bytes()
  # The folds: split.json's train+valid names, drawn with the preparation's seed.
  expected = folds.make_folds(split["train"] + split["valid"], 3, seed=42)
  assert folds.read_folds(folded_dir / "folds.json") == expected
  assert folded["folds"]["k"] == 3 and folded["folds"]["splits"] == ["fold_0", "fold_1", "fold_2"]
  assert folded["counts"] == {"fold_0": 6, "fold_1": 6, "fold_2": 6, "test": 2}
  assert not any(name.startswith(("train", "valid")) for name in os.listdir(folded_dir))
  assert "folds" not in plain  # without folds: the summary as before
  for index, names in enumerate(expected):
    shards = folded["splits"][f"fold_{index}"]["shards"]
    examples = [e for shard in shards for e in read_records(folded_dir / shard)]
    assert [e["name"].decode() for e in examples] == names
    # Each fold is some run's validation split: it keeps the original-resolution masks.
    assert all(e["original_mask_png"] for e in examples)
  # summary.json lists the folds, so the shard checks cover them.
  prepare.verify_shards(folded_dir, content=True)
  shard = folded_dir / folded["splits"]["fold_1"]["shards"][0]
  content = shard.read_bytes()
  shard.write_bytes(content[:-5])
  try:
    with pytest.raises(DataError, match="fold_1-00000-of-00001.tfrecord: is"):
      prepare.verify_shards(folded_dir)
  finally:
    shard.write_bytes(content)  # the folder is shared by this module's tests


def test_a_folds_file_is_reused_and_checked(raw_dir, plain_and_folded, tmp_path):
  _, (folded_dir, folded) = plain_and_folded
  given = folded_dir / "folds.json"
  again = prepare.prepare_dataset(
    raw_dir, tmp_path / "again", height=16, width=32, folds_file=given, progress=False
  )
  assert folds.read_folds(tmp_path / "again" / "folds.json") == folds.read_folds(given)
  assert again["counts"] == folded["counts"] and again["folds"]["seed"] == 42
  test_names = splits.read_split(folded_dir / "split.json")["test"]
  cases = [
    ([[test_names[0]], ["img99"]], "names are in the test split"),
    ([["nope"], []], "fold 1 is empty"),
    ([["nope"], ["img98"]], "2 names are not train/valid examples"),
  ]
  for index, (lists, message) in enumerate(cases):
    path = tmp_path / f"bad{index}.json"
    path.write_text(json.dumps(folds.folds_document(lists, seed=None)))
    with pytest.raises(DataError, match=f"^{path}: .*{message}"):
      prepare.prepare_dataset(
        raw_dir, tmp_path / f"out{index}", height=16, width=32, folds_file=path, progress=False
      )
  with pytest.raises(ConfigError, match="--folds=4 but .* holds 3 folds"):
    prepare.prepare_dataset(
      raw_dir, tmp_path / "k", height=16, width=32, folds=4, folds_file=given, progress=False
    )
  with pytest.raises(ConfigError, match="folds must be 0"):
    prepare.prepare_dataset(raw_dir, tmp_path / "one", height=16, width=32, folds=1)


def test_cli_prepares_in_folds(raw_dir, tmp_path):
  out = tmp_path / "cli"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "dunet.prepare_data",
      f"--raw_dir={raw_dir}",
      f"--out_dir={out}",
      "--height=16",
      "--width=32",
      "--folds=4",
      "--seed=3",
      "--noprogress",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert '"fold_3": ' in result.stdout
  assert folds.num_folds(out) == 4
  split = splits.read_split(out / "split.json")
  assert folds.read_folds(out / "folds.json") == folds.make_folds(
    split["train"] + split["valid"], 4, seed=3
  )
