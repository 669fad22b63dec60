"""The paper's split rule, checked against the reference code's own calls, and split files."""

import json

import pytest

from dunet.data import splits
from dunet.errors import DataError

# Computed once with scikit-learn 1.x exactly as the reference code's data.py does it:
#   paths = sorted(glob("images/*")); n = int(0.1 * len(paths))
#   train, test = train_test_split(paths, test_size=n, random_state=42)
#   train, valid = train_test_split(train, test_size=n, random_state=42)
# for CVC-ClinicDB's names 1.png ... 612.png.
CVC_TEST = [
  "100",
  "108",
  "125",
  "126",
  "149",
  "162",
  "169",
  "172",
  "173",
  "190",
  "193",
  "217",
  "232",
  "237",
  "239",
  "246",
  "258",
  "272",
  "275",
  "276",
  "283",
  "289",
  "29",
  "296",
  "303",
  "307",
  "31",
  "313",
  "319",
  "324",
  "333",
  "337",
  "340",
  "360",
  "361",
  "369",
  "388",
  "389",
  "419",
  "424",
  "439",
  "441",
  "444",
  "454",
  "481",
  "486",
  "504",
  "524",
  "534",
  "544",
  "556",
  "565",
  "572",
  "59",
  "592",
  "61",
  "72",
  "82",
  "89",
  "95",
  "96",
]
CVC_VALID = [
  "107",
  "113",
  "130",
  "163",
  "175",
  "176",
  "182",
  "195",
  "222",
  "230",
  "236",
  "247",
  "251",
  "263",
  "264",
  "265",
  "267",
  "269",
  "27",
  "277",
  "286",
  "288",
  "295",
  "297",
  "311",
  "321",
  "330",
  "331",
  "336",
  "338",
  "349",
  "352",
  "372",
  "374",
  "378",
  "390",
  "436",
  "448",
  "451",
  "457",
  "474",
  "478",
  "487",
  "489",
  "490",
  "498",
  "518",
  "526",
  "536",
  "537",
  "584",
  "60",
  "610",
  "612",
  "62",
  "78",
  "85",
  "86",
  "88",
  "92",
  "99",
]


def test_cvc_clinicdb_split_matches_the_reference_code():
  split = splits.make_split([str(i) for i in range(1, 613)], seed=42)
  assert [len(split[name]) for name in splits.SPLITS] == [490, 61, 61]
  assert split["test"] == CVC_TEST
  assert split["valid"] == CVC_VALID


def test_small_split_matches_the_reference_code():
  split = splits.make_split([f"img{i:02d}" for i in range(25)], seed=42)
  assert split["valid"] == ["img12", "img21"]
  assert split["test"] == ["img08", "img16"]


@pytest.mark.parametrize("total", [1, 9, 10, 19, 20, 99, 196, 612, 1000, 2594])
def test_counts_and_disjoint_cover(total):
  names = [f"n{i}" for i in range(total)]
  split = splits.make_split(names, seed=7)
  assert len(split["test"]) == int(0.1 * total)
  assert len(split["valid"]) == int(0.1 * total)
  together = split["train"] + split["valid"] + split["test"]
  assert sorted(together) == sorted(names)  # every name once: disjoint and complete


def test_deterministic_order_independent_and_seed_dependent():
  names = [f"n{i}" for i in range(100)]
  first = splits.make_split(names, seed=3)
  assert splits.make_split(list(reversed(names)), seed=3) == first
  assert splits.make_split(names, seed=4)["test"] != first["test"]


def test_fractions_and_duplicates_are_checked():
  with pytest.raises(ValueError, match="duplicate"):
    splits.make_split(["a", "a", "b"])
  with pytest.raises(ValueError, match="sum to less than 1"):
    splits.make_split(["a", "b"], valid_fraction=0.5, test_fraction=0.5)


def test_write_then_read_round_trip(tmp_path):
  split = splits.make_split([f"n{i}" for i in range(30)])
  path = tmp_path / "split.json"
  splits.write_split(path, split, seed=42)
  document = json.loads(path.read_text())
  assert document["format"] == "dunet-split" and document["seed"] == 42
  assert splits.read_split(path) == split


def test_read_accepts_plain_lists_with_file_names(tmp_path):
  path = tmp_path / "mine.json"
  path.write_text(json.dumps({"train": ["a.png", "b"], "valid": ["c.tif"]}))
  assert splits.read_split(path) == {"train": ["a", "b"], "valid": ["c"], "test": []}


@pytest.mark.parametrize(
  "content, message",
  [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object with a 'train' list"),
    ('{"train": ["a"], "tests": []}', "unknown keys"),
    ('{"train": [1]}', "'train' must be a list of non-empty strings"),
    ('{"train": ["a", "a"]}', "lists \\['a'\\] more than once"),
    ('{"train": ["a", "b"], "test": ["b"]}', "both 'train' and 'test'.*leak"),
  ],
)
def test_bad_split_files_name_the_file(tmp_path, content, message):
  path = tmp_path / "bad.json"
  path.write_text(content)
  with pytest.raises(DataError, match=f"{path}: .*{message}"):
    splits.read_split(path)


def test_shared_test_names_allowed_for_a_separate_test_set(tmp_path):
  path = tmp_path / "cross.json"
  path.write_text(json.dumps({"train": ["1", "2"], "valid": ["3"], "test": ["1"]}))
  assert splits.read_split(path, allow_shared_test=True)["test"] == ["1"]


def test_split_listing_unknown_names(tmp_path):
  with pytest.raises(DataError, match="bad.json: 1 names are not in"):
    splits.check_split_covers(
      {"train": ["a"], "valid": ["zzz"], "test": []}, ["a", "b"], tmp_path / "bad.json", tmp_path
    )
  assert splits.check_split_covers(
    {"train": ["a"], "valid": [], "test": []}, ["a", "b"], "s.json", tmp_path
  ) == ["b"]
