"""Preparation: records, split and summary, written atomically; bad input raised or skipped."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

from dunet.data import prepare, records, splits
from dunet.errors import DataError
from tests.data.helpers import make_generic, make_pairs, picture, write_mask

REPO = Path(__file__).resolve().parents[2]


def read_records(path):
  examples = []
  for serialized in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
    features = tf.train.Example.FromString(serialized).features.feature
    example = {
      key: (value.bytes_list.value[0] if value.bytes_list.value else value.int64_list.value[0])
      for key, value in features.items()
    }
    example["image"] = cv2.imdecode(
      np.frombuffer(example["image_png"], np.uint8), cv2.IMREAD_UNCHANGED
    )[:, :, ::-1]
    example["mask"] = records.decode_mask_png(example["mask_png"])
    examples.append(example)
  return examples


def box_mean(image, factor):
  """Area downscaling by an integer factor, computed with numpy (the reference for INTER_AREA)."""
  height, width = image.shape[0] // factor, image.shape[1] // factor
  blocks = image.reshape(height, factor, width, factor, -1).astype(np.float64)
  return np.floor(blocks.mean(axis=(1, 3)) + 0.5).astype(np.uint8)  # halves round up


def nearest(mask, height, width):
  """Pixel-centre nearest neighbour with numpy."""
  rows = np.floor((np.arange(height) + 0.5) * mask.shape[0] / height).astype(int)
  cols = np.floor((np.arange(width) + 0.5) * mask.shape[1] / width).astype(int)
  return mask[rows][:, cols]


def test_prepare_writes_checked_records_split_and_summary(tmp_path):
  written = make_generic(tmp_path / "raw", count=10)
  out = tmp_path / "prepared"
  summary = prepare.prepare_dataset(
    tmp_path / "raw", out, height=24, width=32, num_shards=2, progress=False
  )
  assert sorted(os.listdir(out)) == [
    "raw_files.json",
    "split.json",
    "summary.json",
    "test-00000-of-00001.tfrecord",
    "train-00000-of-00002.tfrecord",
    "train-00001-of-00002.tfrecord",
    "valid-00000-of-00001.tfrecord",
  ]
  split = splits.read_split(out / "split.json")
  assert split == splits.make_split(list(written), seed=42)
  assert summary["counts"] == {"train": 8, "valid": 1, "test": 1}
  assert json.loads((out / "summary.json").read_text()) == summary
  assert (summary["height"], summary["width"], summary["layout"]) == (24, 32, "generic")
  assert summary["raw_dir"] == str((tmp_path / "raw").resolve())

  fractions = []
  for name in splits.SPLITS:
    examples = [e for shard in summary["splits"][name]["shards"] for e in read_records(out / shard)]
    assert [e["name"].decode() for e in examples] == split[name]
    for example in examples:
      image, mask = written[example["name"].decode()]
      np.testing.assert_array_equal(example["image"], box_mean(image, 2))
      np.testing.assert_array_equal(example["mask"], nearest(mask, 24, 32))
      assert (example["height"], example["width"]) == (24, 32)
      assert (example["original_height"], example["original_width"]) == (48, 64)
      assert example["source"] == f"images/{example['name'].decode()}.png".encode()
      if name == "train":
        assert "original_mask_png" not in example
      else:
        np.testing.assert_array_equal(records.decode_mask_png(example["original_mask_png"]), mask)
      fractions.append(example["mask"].mean())
    assert summary["splits"][name]["count"] == len(examples)
  assert summary["splits"]["train"]["foreground_fraction"] == pytest.approx(np.mean(fractions[:8]))


def assert_nearest_neighbour(resized, mask):
  """Each pixel of `resized` is `mask`'s pixel whose centre is nearest (pixel-centre mapping).

  Where two source centres are equally near (e.g. output column 4 of 64 -> 96 maps to 3.0),
  either may be taken: OpenCV's fixed point takes the lower one at some such ties, TF the upper.
  """

  def choices(size_in, size_out):
    # Source coordinate (2i + 1) * size_in / (2 * size_out), in exact integer arithmetic.
    numerators = (2 * np.arange(size_out) + 1) * size_in
    upper = numerators // (2 * size_out)
    tie = numerators % (2 * size_out) == 0
    return np.where(tie, upper - 1, upper), upper

  rows, cols = choices(mask.shape[0], resized.shape[0]), choices(mask.shape[1], resized.shape[1])
  allowed = [mask[r][:, c] for r in rows for c in cols]
  assert np.any([resized == a for a in allowed], axis=0).all()


def bilinear(image, height, width):
  """Half-pixel-centre bilinear resizing with edge clamping (OpenCV's INTER_LINEAR), in numpy."""

  def taps(size_in, size_out):
    source = np.maximum((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(int), size_in - 1)
    return low, np.minimum(low + 1, size_in - 1), source - low

  top, bottom, dy = taps(image.shape[0], height)
  left, right, dx = taps(image.shape[1], width)
  pixels = image.astype(np.float64)
  rows = pixels[top] * (1 - dy)[:, None, None] + pixels[bottom] * dy[:, None, None]
  return rows[:, left] * (1 - dx)[None, :, None] + rows[:, right] * dx[None, :, None]


# Growing both sides, and growing one side while shrinking the other: bilinear either way (area
# interpolation is only for shrinking both).
@pytest.mark.parametrize("height,width", [(80, 96), (32, 96)])
def test_upscaling_is_bilinear_and_masks_nearest_and_binary(tmp_path, height, width):
  written = make_generic(tmp_path / "raw", count=3)
  out = tmp_path / "big"
  prepare.prepare_dataset(tmp_path / "raw", out, height=height, width=width, progress=False)
  examples = read_records(out / "train-00000-of-00001.tfrecord")
  assert examples
  for example in examples:
    image, mask = written[example["name"].decode()]
    assert example["image"].shape == (height, width, 3)
    expected = bilinear(image, height, width)
    # OpenCV interpolates uint8 in fixed point: within one grey level of the exact value.
    assert np.abs(example["image"].astype(np.float64) - expected).max() <= 1.0
    # Not a nearest-neighbour or area result that happens to be close: random pixels differ a lot.
    assert np.abs(nearest(image, height, width).astype(np.float64) - expected).mean() > 10
    assert_nearest_neighbour(example["mask"], mask)


@pytest.mark.parametrize("height,width", [(20, 24), (8, 24)])
def test_resize_mask_thresholds_grey_levels_after_nearest(height, width):
  """Any non-zero grey level is foreground; nearest neighbour never invents values in between."""
  grey = np.random.default_rng(5).choice(np.array([0, 0, 0, 1, 7, 128, 255], np.uint8), (12, 16))
  resized = prepare.resize_mask(grey, height, width)
  assert resized.dtype == np.uint8 and set(np.unique(resized)) == {0, 1}
  assert_nearest_neighbour(resized, (grey > 0).astype(np.uint8))
  # OpenCV's legacy nearest (no pixel-centre offset) picks other pixels of this noise.
  legacy = cv2.resize(grey, (width, height), interpolation=cv2.INTER_NEAREST) > 0
  with pytest.raises(AssertionError):
    assert_nearest_neighbour(legacy.astype(np.uint8), (grey > 0).astype(np.uint8))


def test_thresholded_masks_and_conversions_are_counted(tmp_path):
  make_generic(tmp_path / "raw", count=3)
  _, mask = picture(0)
  cv2.imwrite(str(tmp_path / "raw" / "masks" / "img00.png"), mask * 200 + 20)
  summary = prepare.prepare_dataset(
    tmp_path / "raw", tmp_path / "out", height=24, width=32, progress=False
  )
  assert summary["thresholded_masks"]["count"] == 1
  assert "img00.png" in summary["thresholded_masks"]["files"][0]


def bad_raw(root: Path) -> Path:
  """Ten good pairs and one truncated image (img05)."""
  make_generic(root, count=10)
  bad = root / "images" / "img05.png"
  bad.write_bytes(bad.read_bytes()[:200])
  return bad


def test_bad_file_raises_naming_it_and_leaves_nothing(tmp_path):
  bad = bad_raw(tmp_path / "raw")
  out = tmp_path / "out"
  with pytest.raises(DataError, match=f"{bad}: truncated PNG"):
    prepare.prepare_dataset(tmp_path / "raw", out, height=24, width=32, progress=False)
  assert sorted(os.listdir(tmp_path)) == ["raw"]  # no output and no partial folder


def test_skip_mode_counts_and_lists_bad_files(tmp_path):
  bad = bad_raw(tmp_path / "raw")
  (tmp_path / "raw" / "masks" / "img07.png").unlink()
  image, mask = picture(3)
  write_mask(tmp_path / "raw" / "masks" / "img08.png", mask[:10])
  summary = prepare.prepare_dataset(
    tmp_path / "raw", tmp_path / "out", height=24, width=32, on_error="skip", progress=False
  )
  skipped = {Path(entry["file"]).name: entry["reason"] for entry in summary["skipped"]["files"]}
  assert summary["skipped"]["count"] == 3
  assert set(skipped) == {"img05.png", "img07.png", "img08.png"}
  assert "truncated" in skipped["img05.png"] and "no mask" in skipped["img07.png"]
  assert "mask is 10x64" in skipped["img08.png"]
  assert sum(summary["counts"].values()) == 7
  assert str(bad) in [entry["file"] for entry in summary["skipped"]["files"]]


def test_interrupted_run_leaves_no_usable_output(tmp_path, monkeypatch):
  make_generic(tmp_path / "raw", count=10)
  calls = []
  original = records.serialize_example

  def interrupted(**kwargs):
    calls.append(1)
    if len(calls) == 5:
      raise KeyboardInterrupt
    return original(**kwargs)

  monkeypatch.setattr(records, "serialize_example", interrupted)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare_dataset(
      tmp_path / "raw", tmp_path / "out", height=24, width=32, progress=False, workers=1
    )
  assert sorted(os.listdir(tmp_path)) == ["raw"]
  with pytest.raises(DataError, match="not a prepared data set"):
    prepare.read_summary(tmp_path / "out")


def test_existing_output_needs_overwrite(tmp_path):
  make_generic(tmp_path / "raw", count=10)
  out = tmp_path / "out"
  prepare.prepare_dataset(tmp_path / "raw", out, height=24, width=32, progress=False)
  with pytest.raises(DataError, match=f"{out}: already exists"):
    prepare.prepare_dataset(tmp_path / "raw", out, height=16, width=16, progress=False)
  prepare.prepare_dataset(
    tmp_path / "raw", out, height=16, width=16, progress=False, overwrite=True
  )
  assert prepare.read_summary(out)["height"] == 16
  assert sorted(os.listdir(tmp_path)) == ["out", "raw"]


def test_separate_test_data_set(tmp_path):
  make_pairs(
    tmp_path / "cvc" / "Original",
    tmp_path / "cvc" / "Ground Truth",
    [str(i) for i in range(1, 21)],
    image_ext=".tif",
    mask_ext=".tif",
  )
  make_pairs(
    tmp_path / "etis",
    tmp_path / "etis" / "GroundTruth",
    ["1", "2", "3"],
    image_ext=".tif",
    mask_ext=".tif",
    mask_name=lambda stem: "p" + stem,
    seed=50,
  )
  summary = prepare.prepare_dataset(
    tmp_path / "cvc",
    tmp_path / "out",
    height=24,
    width=32,
    test_raw_dir=tmp_path / "etis",
    progress=False,
  )
  assert summary["counts"] == {"train": 18, "valid": 2, "test": 3}
  assert (summary["layout"], summary["test_raw"]["layout"]) == ("cvc", "etis")
  split = splits.read_split(tmp_path / "out" / "split.json", allow_shared_test=True)
  assert split["test"] == ["1", "2", "3"]
  assert len(set(split["train"]) | set(split["valid"])) == 20


def test_user_split_file(tmp_path):
  make_generic(tmp_path / "raw", count=6)
  split_file = tmp_path / "mine.json"
  split_file.write_text(
    json.dumps({"train": ["img00", "img01", "img02"], "valid": ["img03"], "test": ["img04"]})
  )
  summary = prepare.prepare_dataset(
    tmp_path / "raw", tmp_path / "out", height=24, width=32, split_file=split_file, progress=False
  )
  assert summary["counts"] == {"train": 3, "valid": 1, "test": 1}
  assert summary["unassigned"] == 1
  split_file.write_text(json.dumps({"train": ["img00", "nope"], "valid": [], "test": []}))
  with pytest.raises(DataError, match=f"{split_file}: 1 names are not in"):
    prepare.prepare_dataset(
      tmp_path / "raw",
      tmp_path / "out2",
      height=24,
      width=32,
      split_file=split_file,
      progress=False,
    )


def test_fingerprint_detects_changed_raw_data(tmp_path):
  make_generic(tmp_path / "raw", count=10)
  out = tmp_path / "out"
  prepare.prepare_dataset(tmp_path / "raw", out, height=24, width=32, progress=False)
  assert prepare.check_fresh(out) is None
  make_pairs(tmp_path / "raw" / "images", tmp_path / "raw" / "masks", ["new"], seed=99)
  assert "changed since" in prepare.check_fresh(out)


def test_raw_changes_are_named_file_by_file(tmp_path):
  raw = tmp_path / "raw"
  make_generic(raw, count=10)
  out = tmp_path / "out"
  prepare.prepare_dataset(raw, out, height=24, width=32, progress=False)
  listing = json.loads((out / "raw_files.json").read_text())
  assert sorted(listing["raw"]) == sorted(
    f"{kind}/img{i:02d}.png" for i in range(10) for kind in ("images", "masks")
  )
  assert prepare.raw_data_changes(out) is None

  _, mask = picture(50)
  write_mask(raw / "masks" / "img03.png", mask)  # other content
  (raw / "images" / "img07.png").unlink()
  (raw / "masks" / "img07.png").unlink()
  make_pairs(raw / "images", raw / "masks", ["img99"], seed=99)
  change = prepare.raw_data_changes(out)
  assert change.path == str(raw.resolve())
  assert (
    f"changed since {out} was prepared (1 modified: masks/img03.png; 2 added: "
    "images/img99.png, masks/img99.png; 2 removed: images/img07.png, masks/img07.png)"
    in change.problem
  )
  assert prepare.check_fresh(out) == str(change)

  # A touched file (same bytes, newer time) counts too: only size and time are compared.
  shutil.rmtree(raw)
  make_generic(raw, count=10)
  os.utime(raw / "images" / "img00.png", ns=(1, 1))
  assert "modified: " in prepare.raw_data_changes(out).problem

  # Preparations without raw_files.json still detect a change, without names.
  (out / "raw_files.json").unlink()
  assert "(files added, removed or modified)" in prepare.raw_data_changes(out).problem
  # Prepared data may outlive its raw folder: that is no change.
  shutil.rmtree(raw)
  assert prepare.raw_data_changes(out) is None


def test_summary_records_each_shard_and_verify_shards_compares(tmp_path):
  make_generic(tmp_path / "raw", count=10)
  out = tmp_path / "out"
  summary = prepare.prepare_dataset(
    tmp_path / "raw", out, height=24, width=32, num_shards=2, progress=False
  )
  checks = summary["splits"]["train"]["shard_checks"]
  assert sorted(checks) == summary["splits"]["train"]["shards"]
  for name, check in checks.items():
    path = out / name
    assert check["bytes"] == path.stat().st_size
    assert check["records"] == len(read_records(path))
    assert check["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
  assert sum(check["records"] for check in checks.values()) == summary["counts"]["train"]
  prepare.verify_shards(out)
  prepare.verify_shards(out, content=True)

  # Truncated: caught by the size alone, at no cost.
  shard = out / "train-00001-of-00002.tfrecord"
  original = shard.read_bytes()
  shard.write_bytes(original[:-10])
  with pytest.raises(
    DataError,
    match=f"^{shard}: is {len(original) - 10} bytes but was {len(original)} when prepared",
  ):
    prepare.verify_shards(out, ["train"])
  prepare.verify_shards(out, ["valid", "test"])

  # A flipped byte keeps the size: found when the content is checked.
  flipped = bytearray(original)
  flipped[len(flipped) // 2] ^= 0x01
  shard.write_bytes(bytes(flipped))
  prepare.verify_shards(out)
  with pytest.raises(
    DataError, match=f"^{shard}: corrupt TFRecord shard \\(record \\d+: corrupted record at"
  ):
    prepare.verify_shards(out, content=True)

  # Valid records of the same size, other content: only the digest shows it.
  rewritten = []
  for serialized in tf.data.TFRecordDataset(str(out / "train-00000-of-00002.tfrecord")):
    example = tf.train.Example.FromString(serialized.numpy())
    name = example.features.feature["name"].bytes_list.value[0]
    example.features.feature["name"].bytes_list.value[0] = name[:-1] + b"X"
    rewritten.append(example.SerializeToString())
  shard.write_bytes(original)
  other = out / "train-00000-of-00002.tfrecord"
  size = other.stat().st_size
  with tf.io.TFRecordWriter(str(other)) as writer:
    for serialized in rewritten:
      writer.write(serialized)
  assert other.stat().st_size == size
  with pytest.raises(DataError, match=f"^{other}: its content changed since preparation"):
    prepare.verify_shards(out, content=True)

  other.unlink()
  with pytest.raises(DataError, match=f"^{other}: listed in summary.json but missing"):
    prepare.verify_shards(out)


def test_cli_help_documents_every_flag_and_errors_name_the_file(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  # --help lists the essential flags (grouped), --helpfull every one.
  result = subprocess.run(
    [sys.executable, "tools/prepare_data.py", "--helpfull"],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
  )
  for flag in (
    "raw_dir",
    "out_dir",
    "layout",
    "height",
    "width",
    "split_file",
    "test_raw_dir",
    "on_error",
    "seed",
    "num_shards",
    "overwrite",
    "valid_fraction",
    "test_fraction",
  ):
    assert f"--{flag}" in result.stdout, flag
  bad = bad_raw(tmp_path / "raw")
  result = subprocess.run(
    [
      sys.executable,
      "tools/prepare_data.py",
      f"--raw_dir={tmp_path / 'raw'}",
      f"--out_dir={tmp_path / 'out'}",
      "--height=16",
      "--width=16",
      "--noprogress",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
  )
  assert result.returncode == 1
  assert f"error: {bad}: truncated PNG" in result.stderr


def test_cli_verify_names_a_damaged_shard(tmp_path):
  make_generic(tmp_path / "raw", count=10)
  out = tmp_path / "out"
  prepare.prepare_dataset(tmp_path / "raw", out, height=24, width=32, progress=False)
  shard = out / "valid-00000-of-00001.tfrecord"
  raw = bytearray(shard.read_bytes())
  raw[-20] ^= 0x01
  shard.write_bytes(bytes(raw))
  result = subprocess.run(
    [sys.executable, "tools/prepare_data.py", "--verify", f"--out_dir={out}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    timeout=120,
  )
  assert result.returncode == 1, result.stderr[-2000:]
  assert f"error: {shard}: corrupt TFRecord shard (record 0: corrupted record at " in (
    result.stderr
  )
