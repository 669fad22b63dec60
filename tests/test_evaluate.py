"""dunet/evaluate.py: scores checked against counts computed here from the raw files, at the
original resolution, for prepared splits, raw folders and flip TTA; reports; errors; the CLI."""

import csv
import io
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

from dunet import checkpoint as checkpoint_lib
from dunet import evaluation
from dunet import folding
from dunet import serving
from dunet.data import prepare
from dunet.errors import ConfigError
from dunet.errors import DataError
from dunet.models import DoubleUNet
from tests import testing_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAW_SIZE = (48, 80)  # raw pictures: NOT the model's size
MODEL_SIZE = (32, 64)  # prepared and model input size
STEMS = [f"img{i:02d}" for i in range(10)]
# img00 has an empty mask and is in the test split: the empty-ground-truth path is exercised.
SPLIT = {
  "test": ["img00", "img01", "img02"],
  "valid": ["img03", "img04", "img05"],
  "train": ["img06", "img07", "img08", "img09"],
}
THRESHOLD = 0.5
HEADS = ("head2", "head1", "mean")


def _raw_pair(index):
  rng = np.random.default_rng(100 + index)
  height, width = RAW_SIZE
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  image = cv2.GaussianBlur(image, (5, 5), 0)  # some structure for the model to respond to
  mask = np.zeros(RAW_SIZE, np.uint8)
  if index:
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    mask[top : top + height // 2, left : left + width // 3] = 1
  return image, mask


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("raw")
  for folder in ("images", "masks"):
    (root / folder).mkdir()
  for index, stem in enumerate(STEMS):
    image, mask = _raw_pair(index)
    assert cv2.imwrite(str(root / "images" / f"{stem}.png"), image[:, :, ::-1])
    assert cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask * 255)
  return root


@pytest.fixture(scope="module")
def data_dir(raw_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("prepared")
  split_file = root / "split.json"
  split_file.write_text(json.dumps(SPLIT))
  out = root / "data"
  prepare.prepare_dataset(
    raw_dir,
    out,
    height=MODEL_SIZE[0],
    width=MODEL_SIZE[1],
    split_file=split_file,
    progress=False,
    workers=1,
  )
  return out


def calibrated_model(seed=11):
  """`testing_utils.calibrated_model` centred on pictures like the test data."""
  pictures = np.stack(
    [cv2.resize(_raw_pair(i)[0], MODEL_SIZE[::-1], interpolation=cv2.INTER_AREA) for i in range(4)]
  )
  return testing_utils.calibrated_model(pictures, seed)


@pytest.fixture(scope="module")
def workdir(data_dir, tmp_path_factory):
  """A run holding `calibrated_model()`, trained on nothing, with a config.json."""
  model = calibrated_model()
  root = tmp_path_factory.mktemp("run")
  prefix = tf.train.Checkpoint(model=model).write(str(root / "best" / "ckpt-1"))
  tf.compat.v1.train.update_checkpoint_state(str(root / "best"), prefix)
  checkpoint_lib.write_config(
    str(root),
    {
      "height": MODEL_SIZE[0],
      "width": MODEL_SIZE[1],
      "preprocessing": "unit",
      "data_dir": str(data_dir),
    },
  )
  return root


@pytest.fixture(scope="module")
def loaded(workdir):
  return serving.load_segmenter(str(workdir))


# ------------------------------------------------------------------------------------------------
# Independent reference: files read with OpenCV, counts and scores in plain numpy
# ------------------------------------------------------------------------------------------------


def _read_raw(raw_dir, stem):
  image = cv2.imread(str(raw_dir / "images" / f"{stem}.png"), cv2.IMREAD_COLOR)[:, :, ::-1]
  mask = cv2.imread(str(raw_dir / "masks" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE) > 127
  return np.ascontiguousarray(image), mask


def _serve(loaded, images, tta=False):
  """head2, head1 probabilities [B, h, w] in float32; TTA written out flip by flip."""

  def run(pictures):
    out = loaded.serve(tf.constant(pictures))
    return out["probability"].numpy()[..., 0], out["probability_head1"].numpy()[..., 0]

  if not tta:
    return run(images)
  plain = run(images)
  horizontal = [p[:, :, ::-1] for p in run(np.ascontiguousarray(images[:, :, ::-1]))]
  vertical = [p[:, ::-1] for p in run(np.ascontiguousarray(images[:, ::-1]))]
  return tuple((plain[k] + horizontal[k] + vertical[k]) / np.float32(3) for k in range(2))


def _resize(probability, size):
  if probability.shape == tuple(size):
    return probability
  return tf.image.resize(probability[None, :, :, None], size, method="bilinear").numpy()[0, :, :, 0]


def _counts(probability, truth):
  predicted = probability >= np.float32(THRESHOLD)
  return np.array(
    [
      np.sum(predicted & truth),
      np.sum(predicted & ~truth),
      np.sum(~predicted & truth),
      np.sum(~predicted & ~truth),
    ]
  )


def _scores(tp, fp, fn, tn):
  """The six scores of one set of counts, with the empty-mask rule written out."""

  def ratio(numerator, denominator):
    if denominator:
      return numerator / denominator
    return 1.0 if tp + fp + fn == 0 else 0.0

  return {
    "dsc": ratio(2 * tp, 2 * tp + fp + fn),
    "iou": ratio(tp, tp + fp + fn),
    "precision": ratio(tp, tp + fp),
    "recall": ratio(tp, tp + fn),
    "f2": ratio(5 * tp, 5 * tp + 4 * fn + fp),
    "accuracy": ratio(tp + tn, tp + fp + fn + tn),
  }


def _expected(counts_per_image):
  """{"per_image": mean of per-image scores, "pooled": scores of summed counts}."""
  per_image = [_scores(*c) for c in counts_per_image]
  return {
    "per_image": {
      name: float(np.mean([scores[name] for scores in per_image])) for name in per_image[0]
    },
    "pooled": _scores(*np.sum(counts_per_image, axis=0)),
  }


def _reference_counts(loaded, images, masks, tta=False):
  """{head: [N, 4]}: probabilities resized to each mask's size, then thresholded and counted."""
  head2, head1 = _serve(loaded, np.stack(images), tta)
  mean = (head1 + head2) / np.float32(2)
  result = {head: [] for head in HEADS}
  for index, mask in enumerate(masks):
    for head, maps in zip(HEADS, (head2, head1, mean)):
      result[head].append(_counts(_resize(maps[index], mask.shape), mask))
  return {head: np.array(value) for head, value in result.items()}


def _check_report(report, expected_counts, names):
  scores = {score.name: score for score in report["_scores"]}
  assert sorted(scores) == sorted(names)
  for head in HEADS:
    got = np.array([scores[name].counts[head] for name in names])
    np.testing.assert_array_equal(got, expected_counts[head], err_msg=head)
    expected = _expected(expected_counts[head])
    for statistic in ("per_image", "pooled"):
      for name, value in expected[statistic].items():
        assert report["metrics"][head][statistic][name] == pytest.approx(value, abs=1e-12), (
          head,
          statistic,
          name,
        )


# ------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "flip_tta"])
def test_test_split_is_scored_at_the_original_resolution(loaded, raw_dir, data_dir, tta):
  report = evaluation.evaluate(
    loaded,
    data_dir=str(data_dir),
    split="test",
    threshold=THRESHOLD,
    tta=tta,
    batch_size=8,
    progress=False,
  )
  names = SPLIT["test"]
  raw = [_read_raw(raw_dir, stem) for stem in names]
  # What the records hold: the raw pictures shrunk as preparation does (area), PNG-lossless.
  prepared = [cv2.resize(image, MODEL_SIZE[::-1], interpolation=cv2.INTER_AREA) for image, _ in raw]
  expected = _reference_counts(loaded, prepared, [mask for _, mask in raw], tta)
  _check_report(report, expected, names)
  assert report["resolution"] == "original" and report["images"] == 3
  for score in report["_scores"]:
    assert (score.height, score.width, score.resolution) == (*RAW_SIZE, "original")
  # Every kind of pixel occurs: the predictions are neither empty nor everything.
  assert (expected["head2"].sum(axis=0) > 0).all(), expected["head2"]
  assert (expected["head1"].sum(axis=0) > 0).all(), expected["head1"]
  # img00's ground truth is empty.
  assert report["empty_masks"]["ground_truth"] == 1
  assert report["tta"] == (["none", "horizontal", "vertical"] if tta else None)


def test_tta_changes_the_predictions(loaded, data_dir):
  plain, flipped = (
    evaluation.evaluate(loaded, data_dir=str(data_dir), split="test", tta=tta, progress=False)
    for tta in (False, True)
  )
  assert any(
    not np.array_equal(a.counts["head2"], b.counts["head2"])
    for a, b in zip(plain["_scores"], flipped["_scores"])
  )


def test_all_splits_train_is_scored_at_the_prepared_size(loaded, raw_dir, data_dir):
  report = evaluation.evaluate(
    loaded, data_dir=str(data_dir), split="all", batch_size=3, progress=False
  )
  assert report["images"] == 10
  assert report["resolution"] == "mixed"
  assert report["images_by_resolution"] == {"original": 6, "prepared": 4}
  assert any("prepared size" in note for note in report["notes"])
  by_name = {score.name: score for score in report["_scores"]}
  for stem in STEMS:
    score = by_name[stem]
    size = MODEL_SIZE if stem in SPLIT["train"] else RAW_SIZE
    assert (score.height, score.width) == size
    assert score.counts["head2"].sum() == size[0] * size[1]
  # Train images: counted against the prepared (nearest-neighbour) mask, at the model's size.
  train = [_read_raw(raw_dir, stem) for stem in SPLIT["train"]]
  images = [cv2.resize(image, MODEL_SIZE[::-1], interpolation=cv2.INTER_AREA) for image, _ in train]
  masks = [
    cv2.resize(mask.astype(np.uint8), MODEL_SIZE[::-1], interpolation=cv2.INTER_NEAREST_EXACT) > 0
    for _, mask in train
  ]
  head2, _ = _serve(loaded, np.stack(images))
  for index, stem in enumerate(SPLIT["train"]):
    got = by_name[stem].counts["head2"]
    expected = _counts(head2[index], masks[index])
    # Batches of 3 here, of 4 in the reference: allow a pixel or two at the threshold.
    assert np.abs(got - expected).max() <= 2, (stem, got, expected)


def test_raw_folder_is_scored_at_its_original_resolution(loaded, raw_dir):
  report = evaluation.evaluate(loaded, raw_dir=str(raw_dir), batch_size=16, progress=False)
  raw = [_read_raw(raw_dir, stem) for stem in STEMS]
  expected = _reference_counts(loaded, [image for image, _ in raw], [mask for _, mask in raw])
  _check_report(report, expected, STEMS)
  assert report["data"]["layout"] == "generic"
  assert report["resolution"] == "original" and not report["skipped"]


def test_raw_folder_bad_files_raise_or_are_skipped(loaded, raw_dir, tmp_path):
  root = tmp_path / "raw"
  for folder in ("images", "masks"):
    (root / folder).mkdir(parents=True)
    for stem in STEMS[:3]:
      (root / folder / f"{stem}.png").write_bytes((raw_dir / folder / f"{stem}.png").read_bytes())
  (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  (root / "masks" / "broken.png").write_bytes((raw_dir / "masks" / "img01.png").read_bytes())
  with pytest.raises(DataError, match="broken.png"):
    evaluation.evaluate(loaded, raw_dir=str(root), progress=False)
  report = evaluation.evaluate(loaded, raw_dir=str(root), on_error="skip", progress=False)
  assert report["images"] == 3
  assert [Path(item["file"]).name for item in report["skipped"]] == ["broken.png"]
  assert any("skipped" in note for note in report["notes"])


def test_batches_by_size_do_not_change_the_scores(loaded, raw_dir, tmp_path):
  """Mixed sizes in a raw folder: each picture is scored at its own size."""
  root = tmp_path / "mixed"
  sizes = {"a": (48, 80), "b": (40, 40), "c": (48, 80), "d": (40, 40), "e": (33, 47)}
  expected = {}
  for folder in ("images", "masks"):
    (root / folder).mkdir(parents=True)
  for index, (stem, size) in enumerate(sizes.items()):
    image, mask = _raw_pair(index + 1)
    image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask, size[::-1], interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(root / "images" / f"{stem}.png"), image[:, :, ::-1])
    cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask * 255)
    head2, _ = _serve(loaded, image[None])
    expected[stem] = _counts(head2[0], mask > 0)
  report = evaluation.evaluate(loaded, raw_dir=str(root), batch_size=2, progress=False)
  for score in report["_scores"]:
    assert (score.height, score.width) == sizes[score.name]
    # Batched differently from the one-picture reference: a pixel or two may sit at 0.5.
    assert np.abs(score.counts["head2"] - expected[score.name]).max() <= 2, score.name


def test_a_saved_model_scores_like_its_checkpoint(loaded, data_dir, tmp_path):
  segmenter = serving.Segmenter(loaded.module.model, *MODEL_SIZE, "unit")
  tf.saved_model.save(segmenter, str(tmp_path / "saved"))
  from_saved = serving.load_segmenter(str(tmp_path / "saved"))
  assert from_saved.kind == "saved_model"
  reports = [
    evaluation.evaluate(model, data_dir=str(data_dir), split="valid", progress=False)
    for model in (loaded, from_saved)
  ]
  for ours, theirs in zip(*(report["_scores"] for report in reports)):
    assert ours.name == theirs.name
    for head in HEADS:
      # The same graph, reloaded: at most a pixel at the threshold may differ.
      assert np.abs(ours.counts[head] - theirs.counts[head]).max() <= 1, (ours.name, head)
  assert reports[1]["model"]["kind"] == "saved_model"
  assert evaluation.default_out_dir(str(tmp_path / "saved"), "test", None, False) is None


# ------------------------------------------------------------------------------------------------
# Report files
# ------------------------------------------------------------------------------------------------


def test_report_files(loaded, data_dir, tmp_path):
  report = evaluation.evaluate(loaded, data_dir=str(data_dir), split="test", progress=False)
  paths = evaluation.write_report(report, tmp_path / "out")
  assert sorted(os.listdir(tmp_path / "out")) == ["metrics.json", "metrics.md", "per_image.csv"]

  document = json.loads(Path(paths["metrics.json"]).read_text())
  assert document["format"] == "dunet-eval" and "_scores" not in document
  assert document["headline"]["statistic"] == "per_image"
  assert document["headline"]["dsc"] == report["metrics"]["head2"]["per_image"]["dsc"]
  assert set(document["metrics"]) == set(HEADS)
  for head in HEADS:
    assert set(document["metrics"][head]) == {"per_image", "pooled"}
    assert set(document["metrics"][head]["pooled"]) == {
      "dsc",
      "iou",
      "precision",
      "recall",
      "f2",
      "accuracy",
    }
  assert document["data"]["split"] == "test" and document["threshold"] == 0.5

  markdown = Path(paths["metrics.md"]).read_text()
  rows = [
    line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| ---")
  ]
  assert rows[0].startswith("| output | statistic | DSC | mIoU")
  table_end = markdown.index("| head 2 boundary")
  assert len([row for row in rows if markdown.index(row) < table_end]) == 1 + 6  # 3 heads x 2
  head2_mean = report["metrics"]["head2"]["per_image"]
  assert rows[1] == (
    "| head 2 (final output) | mean over images | "
    + " | ".join(
      f"{head2_mean[name]:.4f}" for name in ("dsc", "iou", "recall", "precision", "f2", "accuracy")
    )
    + " |"
  )
  assert "mean over images of each image's score" in markdown
  assert "both empty scores 1.0" in markdown

  table = list(csv.DictReader(io.StringIO(Path(paths["per_image.csv"]).read_text())))
  assert [row["name"] for row in table] == SPLIT["test"]
  for row, score in zip(table, sorted(report["_scores"], key=lambda s: s.name)):
    tp, fp, fn, tn = (int(row[key]) for key in ("tp", "fp", "fn", "tn"))
    np.testing.assert_array_equal([tp, fp, fn, tn], score.counts["head2"])
    assert (int(row["height"]), int(row["width"]), row["resolution"]) == (*RAW_SIZE, "original")
    assert float(row["dsc"]) == pytest.approx(_scores(tp, fp, fn, tn)["dsc"], abs=1e-6)
  # Their mean is the headline.
  assert np.mean([float(row["dsc"]) for row in table]) == pytest.approx(head2_mean["dsc"], abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_errors_name_what_is_wrong(loaded, raw_dir, data_dir, tmp_path):
  with pytest.raises(DataError, match="dunet-prepare"):
    evaluation.evaluate(loaded, data_dir=str(tmp_path / "nothing"), progress=False)
  with pytest.raises(ConfigError, match="unknown split 'bogus'"):
    evaluation.evaluate(loaded, data_dir=str(data_dir), split="bogus", progress=False)
  with pytest.raises(ConfigError, match="exactly one"):
    evaluation.evaluate(loaded, data_dir=str(data_dir), raw_dir=str(raw_dir), progress=False)
  with pytest.raises(ConfigError, match="exactly one"):
    evaluation.evaluate(loaded, progress=False)
  with pytest.raises(DataError, match="does not exist"):
    evaluation.evaluate(loaded, raw_dir=str(tmp_path / "no_raw"), progress=False)

  no_test = tmp_path / "no_test"
  prepare.prepare_dataset(
    raw_dir,
    no_test,
    height=MODEL_SIZE[0],
    width=MODEL_SIZE[1],
    test_fraction=0.0,
    progress=False,
    workers=1,
  )
  with pytest.raises(ConfigError, match="no 'test' examples"):
    evaluation.evaluate(loaded, data_dir=str(no_test), split="test", progress=False)


def test_a_damaged_shard_is_named(loaded, data_dir, tmp_path):
  copy = tmp_path / "data"
  copy.mkdir()
  for path in data_dir.iterdir():
    (copy / path.name).write_bytes(path.read_bytes())
  shard = next(copy.glob("test-*.tfrecord"))
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF  # same size, one byte changed: only reading finds it
  shard.write_bytes(bytes(data))
  with pytest.raises(DataError, match=shard.name):
    evaluation.evaluate(loaded, data_dir=str(copy), split="test", progress=False)
  shard.write_bytes(bytes(data[:-10]))  # truncated: found before reading
  with pytest.raises(DataError, match=shard.name):
    evaluation.evaluate(loaded, data_dir=str(copy), split="test", progress=False)


def test_default_output_folders(workdir, tmp_path):
  prefix = tf.train.latest_checkpoint(str(workdir / "best"))
  assert evaluation.default_out_dir(str(workdir), "test", None, False) == str(
    workdir / "eval" / "test"
  )
  assert evaluation.default_out_dir(prefix, "valid", None, True) == str(
    workdir / "eval" / "valid-tta"
  )
  assert evaluation.default_out_dir(str(workdir), "test", "/data/ETIS/", False, "latest") == str(
    workdir / "eval" / "raw-ETIS-latest"
  )
  assert evaluation.default_out_dir(str(tmp_path / "loose" / "ckpt-3"), "test", None, False) is None


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _cli(*args, timeout=240):
  # Without the suite's TF_CPP_MIN_LOG_LEVEL: the program quiets TensorFlow's start-up itself.
  env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
  return subprocess.run(
    [sys.executable, "-m", "dunet.evaluate", *args],
    cwd=REPO,
    env=env,
    timeout=timeout,
    capture_output=True,
    text=True,
  )


def test_cli_evaluates_the_runs_own_data(workdir, loaded, data_dir):
  completed = _cli(f"--checkpoint={workdir}", "--noprogress")
  assert completed.returncode == 0, completed.stderr[-3000:]
  out = workdir / "eval" / "test"
  document = json.loads((out / "metrics.json").read_text())
  assert document["data"]["data_dir"] == str(data_dir)  # from config.json
  expected = evaluation.evaluate(loaded, data_dir=str(data_dir), split="test", progress=False)
  for head in HEADS:
    for statistic in ("per_image", "pooled"):
      for name, value in expected["metrics"][head][statistic].items():
        assert document["metrics"][head][statistic][name] == pytest.approx(value, abs=1e-3)
  # The table is printed, as written.
  assert (out / "metrics.md").read_text().strip() in completed.stdout
  assert not [name for name in os.listdir(out) if ".tmp" in name]


def _error_line(completed):
  """The one line a failed command writes on stderr."""
  lines = completed.stderr.strip().splitlines()
  assert len(lines) == 1, completed.stderr
  return lines[0]


def test_cli_errors(tmp_path, workdir):
  out = tmp_path / "out"
  completed = _cli(f"--checkpoint={tmp_path / 'missing_run'}", f"--out_dir={out}")
  assert completed.returncode == 1
  assert _error_line(completed).startswith(
    f"dunet-evaluate: error: no checkpoint at '{tmp_path / 'missing_run'}'"
  )
  completed = _cli(
    f"--checkpoint={workdir}", f"--data_dir={tmp_path / 'unprepared'}", f"--out_dir={out}"
  )
  assert completed.returncode == 1
  line = _error_line(completed)
  assert str(tmp_path / "unprepared") in line and "dunet-prepare" in line
  # A usage error: one line naming the flags, exit status 2; the data is checked before the
  # model is loaded and before anything is written.
  completed = _cli(
    f"--checkpoint={workdir}", f"--raw_dir={tmp_path}", "--split=valid", f"--out_dir={out}"
  )
  assert completed.returncode == 2
  assert _error_line(completed) == (
    "dunet-evaluate: error: --raw_dir evaluates a whole raw folder: leave out --data_dir and "
    "--split (see --help)"
  )
  assert not out.exists()


def test_cli_help_documents_every_flag():
  completed = _cli("--help")
  for flag in (
    "checkpoint",
    "prefer",
    "data_dir",
    "split",
    "raw_dir",
    "layout",
    "on_error",
    "threshold",
    "tta",
    "tta_flips",
    "batch_size",
    "out_dir",
    "height",
    "width",
    "precision",
    "progress",
    "choose_threshold",
    "recompute_bn",
  ):
    assert f"  --{flag}\n" in completed.stdout or f"  --[no]{flag}\n" in completed.stdout, flag
  assert completed.returncode == 0 and "Scores a trained DoubleU-Net" in completed.stdout


# ------------------------------------------------------------------------------------------------
# The validation-optimal threshold, and BatchNorm statistics recomputed on demand
# ------------------------------------------------------------------------------------------------


def _mean_dsc(loaded, raw_dir, stems, threshold):
  """Head 2's mean per-image DSC over `stems` at `threshold`, computed here from the raw files."""
  raw = [_read_raw(raw_dir, stem) for stem in stems]
  prepared = [cv2.resize(image, MODEL_SIZE[::-1], interpolation=cv2.INTER_AREA) for image, _ in raw]
  head2, _ = _serve(loaded, np.stack(prepared))
  values = []
  for probability, (_, mask) in zip(head2, raw):
    predicted = _resize(probability, mask.shape) >= np.float32(threshold)
    tp, fp, fn = (np.sum(predicted & mask), np.sum(predicted & ~mask), np.sum(~predicted & mask))
    values.append(_scores(tp, fp, fn, 0)["dsc"])
  return float(np.mean(values))


def test_threshold_is_chosen_on_validation_and_applied_to_test(loaded, raw_dir, data_dir):
  report = evaluation.evaluate(loaded, data_dir=str(data_dir), split="test", progress=False)
  chosen = report["validation_threshold"]
  grid = evaluation.THRESHOLD_GRID
  valid_dsc = {t: _mean_dsc(loaded, raw_dir, SPLIT["valid"], t) for t in grid}
  best = max(valid_dsc.values())
  # The best on VALIDATION (ties: the one nearest 0.5), not on the test split.
  expected = min((t for t in grid if valid_dsc[t] >= best - 1e-9), key=lambda t: abs(t - 0.5))
  assert chosen["threshold"] == expected
  assert chosen["valid_dsc"] == pytest.approx(best, abs=1e-9)
  assert chosen["valid_dsc_at_threshold"] == pytest.approx(valid_dsc[0.5], abs=1e-9)
  assert chosen["chosen_on"] == "valid"
  assert chosen["head2"]["per_image"]["dsc"] == pytest.approx(
    _mean_dsc(loaded, raw_dir, SPLIT["test"], expected), abs=1e-9
  )
  # The headline stays at --threshold.
  assert report["metrics"]["head2"]["per_image"]["dsc"] == pytest.approx(
    _mean_dsc(loaded, raw_dir, SPLIT["test"], 0.5), abs=1e-9
  )
  assert "Validation-optimal threshold" in evaluation.format_markdown(report)
  # Evaluating the valid split itself says that the choice is tuned on it.
  on_valid = evaluation.evaluate(loaded, data_dir=str(data_dir), split="valid", progress=False)
  assert on_valid["validation_threshold"]["threshold"] == expected
  assert "optimistic" in on_valid["validation_threshold"]["chosen_on"]
  # Off, and for raw folders (no validation split): none.
  assert (
    evaluation.evaluate(
      loaded, data_dir=str(data_dir), split="test", progress=False, choose_threshold=False
    )["validation_threshold"]
    is None
  )
  assert (
    evaluation.evaluate(loaded, raw_dir=str(raw_dir), progress=False)["validation_threshold"]
    is None
  )


def test_best_threshold_ties_go_to_the_nearest_to_the_default():
  def score(counts_at):
    return evaluation.ImageScore(
      "x",
      "valid",
      1,
      1,
      "original",
      {"head2": np.zeros(4)},
      {t: np.array(c) for t, c in counts_at.items()},
    )

  perfect, wrong = (1, 0, 0, 1), (0, 1, 1, 0)
  scores = [score({0.3: perfect, 0.45: perfect, 0.5: wrong, 0.7: perfect})]
  assert evaluation.best_threshold(scores)["threshold"] == 0.45
  assert evaluation.best_threshold(scores)["dsc_at_default"] == 0.0


def test_cli_recompute_bn_saves_a_model_that_scores_what_was_reported(workdir, data_dir, tmp_path):
  out = tmp_path / "eval"
  completed = _cli(
    f"--checkpoint={workdir}",
    "--recompute_bn=1",
    "--batch_size=2",
    f"--out_dir={out}",
    "--noprogress",
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  document = json.loads((out / "metrics.json").read_text())
  recomputed = document["batch_norm_recomputed"]
  assert (recomputed["images"], recomputed["batches"]) == (2, 1)
  saved = recomputed["checkpoint"]
  assert saved == str(out / "precise_bn")
  # The saved model holds statistics of its own (not the run's), and scores what was reported.
  original = serving.load_segmenter(str(workdir))
  again = serving.load_segmenter(saved)
  assert again.preprocessing == "unit" and (again.height, again.width) == MODEL_SIZE
  # (The served models have their BatchNorms folded: read the checkpoints' own statistics.)
  statistics = []
  for loaded in (original, again):
    model = DoubleUNet()
    checkpoint_lib.restore_model(model, loaded.source)
    statistics.append([bn.moving_variance.numpy() for bn in folding.remaining_batch_norms(model)])
  assert len(statistics[0]) == 36
  assert any(not np.allclose(a, b) for a, b in zip(*statistics))
  rescored = evaluation.evaluate(again, data_dir=str(data_dir), split="test", progress=False)
  assert rescored["metrics"]["head2"]["per_image"]["dsc"] == pytest.approx(
    document["metrics"]["head2"]["per_image"]["dsc"], abs=1e-6
  )
  assert "recomputed" in (out / "metrics.md").read_text()


# ------------------------------------------------------------------------------------------------
# Boundary metrics, post-processing chosen on validation, folds, ensembles
# ------------------------------------------------------------------------------------------------


def test_boundary_metrics_per_image_and_summarized(loaded, data_dir, tmp_path):
  spacing = (0.25, 0.25)
  report = evaluation.evaluate(
    loaded,
    data_dir=str(data_dir),
    split="test",
    progress=False,
    boundary=evaluation.BoundarySettings(spacing_mm=spacing, tolerance=1.0, tolerance_mm=0.25),
  )
  scores = report["_scores"]
  for score in scores:
    # Distances scale with an isotropic spacing; NSD at 1 px equals NSD at 0.25 mm.
    for name in ("hd95", "assd"):
      if np.isnan(score.surface[name]):
        assert np.isnan(score.surface[name + "_mm"])
      else:
        assert score.surface[name + "_mm"] == pytest.approx(score.surface[name] * 0.25, rel=1e-9)
    assert score.surface["nsd_mm"] == pytest.approx(score.surface["nsd"], abs=1e-12)
  summary = report["boundary"]["head2"]
  hd95 = np.array([score.surface["hd95"] for score in scores])
  assert summary["hd95"]["count_undefined"] == int(np.isnan(hd95).sum())
  if np.isfinite(hd95).any():
    assert summary["hd95"]["mean"] == pytest.approx(float(np.nanmean(hd95)))
  assert report["headline"]["hd95"] == summary["hd95"]["mean"]
  paths = evaluation.write_report(report, tmp_path / "out")
  text = Path(paths["metrics.json"]).read_text()
  assert "NaN" not in text and "Infinity" not in text  # strict JSON
  rows = list(csv.DictReader(io.StringIO(Path(paths["per_image.csv"]).read_text())))
  assert [key for key in rows[0] if "hd95" in key or "nsd" in key] == [
    "hd95",
    "nsd",
    "hd95_mm",
    "nsd_mm",
  ]
  markdown = Path(paths["metrics.md"]).read_text()
  assert "| hd95 |" in markdown and "at spacing [0.25, 0.25] mm/px" in markdown
  assert "MONAI" in markdown


def _copy_run(workdir, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval"))
  return copy


def test_postprocessing_is_chosen_on_validation_kept_and_applied(workdir, data_dir, tmp_path):
  run = _copy_run(workdir, tmp_path)
  plain = serving.load_segmenter(str(run))
  spec, record = evaluation.choose_postprocessing_on_validation(plain, data_dir, progress=False)
  assert record["chosen_on"]["split"] == "valid" and record["images"] == len(SPLIT["valid"])
  assert record["choice"] == spec.to_string()
  names = [candidate["postprocessing"] for candidate in record["candidates"]]
  assert names[0] == "none" and "largest" in names
  # The chosen candidate has the best validation DSC, or none won by the margin.
  best = max(record["candidates"], key=lambda c: c["mean_dsc"])
  assert spec.is_none or best["postprocessing"] == spec.to_string()
  serving.write_postprocessing_choice(str(run), dict(record, choice="largest"))
  again = serving.load_segmenter(str(run))
  assert again.settings["postprocessing"] == "largest"
  with pytest.raises(ConfigError, match="without one"):
    evaluation.choose_postprocessing_on_validation(again, data_dir, progress=False)


def test_cli_chooses_postprocessing_and_reports_it(workdir, tmp_path):
  run = _copy_run(workdir, tmp_path)
  completed = _cli(
    f"--checkpoint={run}", "--noprogress", "--choose_postprocessing", "--pixel_spacing=0.5"
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  kept = json.loads((run / serving.POSTPROCESSING_FILENAME).read_text())
  assert kept["format"] == "dunet-postprocessing"
  document = json.loads((run / "eval" / "test" / "metrics.json").read_text())
  assert document["model"]["postprocessing"] == kept["choice"]
  assert document["postprocessing_choice"]["reason"] == kept["reason"]
  assert document["boundary"]["spacing_mm"] == [0.5]
  assert "Post-processing chosen on valid" in completed.stdout
  bad = _cli(f"--checkpoint={run}", "--choose_postprocessing", f"--raw_dir={tmp_path}")
  assert bad.returncode == 2 and "needs checkpoints" in bad.stderr


def test_a_fold_run_evaluates_its_own_fold_as_valid(raw_dir, tmp_path):
  out = tmp_path / "folds"
  split_file = tmp_path / "split.json"
  split_file.write_text(json.dumps(SPLIT))
  prepare.prepare_dataset(
    raw_dir,
    out,
    height=MODEL_SIZE[0],
    width=MODEL_SIZE[1],
    split_file=split_file,
    folds=2,
    progress=False,
    workers=1,
  )
  counts = json.loads((out / "summary.json").read_text())["counts"]
  assert evaluation.splits_to_evaluate(out, "valid", "fold_1") == {"fold_1": counts["fold_1"]}
  assert evaluation.splits_to_evaluate(out, "train", "fold_1") == {"fold_0": counts["fold_0"]}
  assert list(evaluation.splits_to_evaluate(out, "all", "fold_1")) == ["fold_0", "fold_1", "test"]
  with pytest.raises(ConfigError, match="prepared in folds"):
    evaluation.splits_to_evaluate(out, "valid")


def test_an_ensemble_of_one_run_twice_scores_like_the_run(workdir, loaded, data_dir, tmp_path):
  ensemble = serving.load_segmenter(f"{workdir},{workdir}")
  assert len(ensemble.sources) == 2
  single = evaluation.evaluate(loaded, data_dir=str(data_dir), split="test", progress=False)
  both = evaluation.evaluate(ensemble, data_dir=str(data_dir), split="test", progress=False)
  assert both["metrics"] == single["metrics"]  # (a + a) / 2 == a exactly
  assert both["model"]["members"] == [ensemble.sources[0]] * 2
  cv = tmp_path / "cv"
  for fold in ("fold_0", "fold_1"):
    (cv / fold).mkdir(parents=True)
  assert evaluation.default_out_dir(f"{cv}/fold_*", "test", None, False) == str(
    cv / "eval" / "ensemble-test"
  )
