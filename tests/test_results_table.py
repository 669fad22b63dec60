"""dunet/results_table.py (dunet-results) end to end on a tiny real run: a random calibrated
model evaluated with dunet.evaluate on tiny prepared data; the table holds the report's scores;
the pictures are written; the worst-images montage shows the images per_image.csv ranks lowest,
with predictions that score what per_image.csv says. Errors: one line, the right exit status."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tensorflow as tf
from absl import app
from absl import flags

from dunet import checkpoint as checkpoint_lib
from dunet import cli
from dunet import evaluation
from dunet import metrics
from dunet import pictures
from dunet import results
from dunet import results_table
from dunet import serving
from dunet.data import prepare
from dunet.errors import DataError
from tests import testing_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAW_SIZE = (48, 80)  # not the model's size: evaluation scores at this size
MODEL_SIZE = (32, 64)
STEMS = [f"img{i:02d}" for i in range(8)]
SPLIT = {"test": STEMS[:4], "valid": STEMS[4:6], "train": STEMS[6:]}


def _raw_pair(index):
  rng = np.random.default_rng(300 + index)
  image = cv2.GaussianBlur(rng.integers(0, 256, (*RAW_SIZE, 3), dtype=np.uint8), (5, 5), 0)
  mask = np.zeros(RAW_SIZE, np.uint8)
  top, left = rng.integers(0, RAW_SIZE[0] // 2), rng.integers(0, RAW_SIZE[1] // 2)
  mask[top : top + RAW_SIZE[0] // 2, left : left + RAW_SIZE[1] // 3] = 1
  return image, mask


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, loaded model): a prepared tiny data set, a calibrated model's workdir with
  TensorBoard scalars, and its evaluation of the test split in workdir/eval/test."""
  root = tmp_path_factory.mktemp("results_table")
  raw = root / "raw"
  for folder in ("images", "masks"):
    (raw / folder).mkdir(parents=True)
  for index, stem in enumerate(STEMS):
    image, mask = _raw_pair(index)
    assert cv2.imwrite(str(raw / "images" / f"{stem}.png"), image[:, :, ::-1])
    assert cv2.imwrite(str(raw / "masks" / f"{stem}.png"), mask * 255)
  (root / "split.json").write_text(json.dumps(SPLIT))
  data_dir = root / "tiny"
  prepare.prepare_dataset(
    raw,
    data_dir,
    height=MODEL_SIZE[0],
    width=MODEL_SIZE[1],
    split_file=root / "split.json",
    progress=False,
    workers=1,
  )
  pictures_at_model_size = np.stack(
    [cv2.resize(_raw_pair(i)[0], MODEL_SIZE[::-1], interpolation=cv2.INTER_AREA) for i in range(4)]
  )
  model = testing_utils.calibrated_model(pictures_at_model_size, seed=5)
  workdir = root / "tiny_run"
  prefix = tf.train.Checkpoint(model=model).write(str(workdir / "best" / "ckpt-1"))
  tf.compat.v1.train.update_checkpoint_state(str(workdir / "best"), prefix)
  checkpoint_lib.write_config(
    str(workdir),
    {
      "height": MODEL_SIZE[0],
      "width": MODEL_SIZE[1],
      "preprocessing": "unit",
      "data_dir": str(data_dir),
    },
  )
  for folder, tag, values in (
    ("train", "loss/total", [0.9, 0.7, 0.6]),
    ("valid", "head2/per_image/dsc", [0.3, 0.5, 0.6]),
  ):
    writer = tf.summary.create_file_writer(str(workdir / folder))
    with writer.as_default():
      for step, value in enumerate(values):
        tf.summary.scalar(tag, value, step=10 * step)
    writer.close()
  loaded = serving.load_segmenter(str(workdir))
  report = evaluation.evaluate(
    loaded, data_dir=str(data_dir), split="test", progress=False, choose_threshold=False
  )
  evaluation.write_report(report, str(workdir / "eval" / "test"))
  return workdir, loaded


def _run_main(argv):
  """results_table.main with its flags parsed from `argv` into fresh FlagValues."""
  flag_values = flags.FlagValues()
  results_table.define_flags(flag_values)
  flag_values(["dunet-results", *argv])
  original = results_table.FLAGS
  results_table.FLAGS = flag_values
  try:
    return results_table.main(["dunet-results"])
  finally:
    results_table.FLAGS = original


def test_table_and_pictures_of_an_evaluated_run(run, tmp_path, capsys):
  workdir, _ = run
  out = tmp_path / "out"
  assert _run_main([f"--workdirs={workdir}", f"--out_dir={out}", "--worst=3"]) == 0
  report = json.loads((workdir / "eval" / "test" / "metrics.json").read_text())
  headline = report["headline"]
  (record,) = list(csv.DictReader((out / "results.csv").open()))
  assert record["dataset"] == "tiny"  # generic layout: the prepared folder's name
  assert (record["split"], record["run"], record["images"]) == ("test", "tiny_run", "4")
  for name in ("dsc", "iou", "recall", "precision"):
    assert float(record[name]) == pytest.approx(headline[name], abs=1e-6)
  markdown = (out / "results.md").read_text()
  assert f"| tiny | test | tiny_run | - | 4 | {headline['dsc']:.4f} |" in markdown
  # The pictures.
  folder = out / "pictures" / "tiny_run"
  assert sorted(os.listdir(folder)) == [
    "dsc_histogram-test.png",
    "learning_curves.png",
    "worst-test.png",
  ]
  for name in ("dsc_histogram-test.png", "learning_curves.png"):
    assert cv2.imread(str(folder / name)).shape == (*pictures.PLOT_SIZE, 3)
  montage = cv2.imread(str(folder / "worst-test.png"))
  height, width = pictures.MONTAGE_CELL
  assert montage.shape[:2] == (
    pictures.MONTAGE_HEADER + 3 * (pictures.MONTAGE_BAND + height + pictures.MONTAGE_GAP),
    3 * width + 4 * pictures.MONTAGE_GAP,
  )
  printed = capsys.readouterr()
  assert (
    printed.out.strip()
    .splitlines()[-1]
    .startswith(f"Wrote 1 row from 1 evaluation to {out / 'results.md'}")
  )
  assert "3 pictures" in printed.out


def test_worst_cases_are_the_lowest_scores_as_evaluated(run):
  workdir, loaded = run  # the CLI test loads it from the report (load_report_model)
  evaluation = results.read_evaluation(str(workdir / "eval" / "test"))
  rows = results.read_per_image_csv(evaluation.per_image_path)
  ranked = sorted(rows, key=lambda row: (float(row["dsc"]), row["name"]))
  cases = pictures.worst_cases(evaluation, 3, loaded=loaded)
  assert cases.names == [row["name"] for row in ranked[:3]]
  assert cases.scores == pytest.approx([float(row["dsc"]) for row in ranked[:3]])
  for image, truth, prediction, score in zip(
    cases.images, cases.truths, cases.predictions, cases.scores
  ):
    # At the original resolution, as scored; the prediction scores what per_image.csv says.
    assert image.shape == (*RAW_SIZE, 3) and image.dtype == np.uint8
    assert truth.shape == prediction.shape == RAW_SIZE
    counts = metrics.confusion_counts_np(prediction, truth)
    assert float(metrics.scores_from_counts(counts)["dsc"]) == pytest.approx(score, abs=1e-5)
  # The ground truths are the raw masks.
  index = STEMS.index(cases.names[0])
  assert np.array_equal(cases.truths[0], _raw_pair(index)[1] > 0)


def test_pictures_without_a_model_keep_the_rest(run, tmp_path):
  """A run whose checkpoint is gone still gets its curves and histogram; the montage is left
  out with the reason."""
  workdir, _ = run
  evaluation = results.read_evaluation(str(workdir / "eval" / "test"))
  report = json.loads(json.dumps(evaluation.report))
  report["model"]["source"] = str(tmp_path / "gone" / "ckpt-1")
  moved = dataclasses.replace(evaluation, report=report)
  written, left_out = pictures.write_run_pictures(str(workdir), [moved], str(tmp_path / "p"))
  assert sorted(os.path.basename(path) for path in written) == [
    "dsc_histogram-test.png",
    "learning_curves.png",
  ]
  assert len(left_out) == 1 and "no montage" in left_out[0] and "gone" in left_out[0]
  # --worst=0: no model is loaded, no montage.
  written, left_out = pictures.write_run_pictures(None, [moved], str(tmp_path / "q"), worst=0)
  assert [os.path.basename(path) for path in written] == ["dsc_histogram-test.png"]
  assert left_out == []


def test_usage_errors_and_help(tmp_path):
  with pytest.raises(app.UsageError, match="--workdirs is required"):
    _run_main([f"--out_dir={tmp_path}"])
  with pytest.raises(app.UsageError, match="--out_dir is required"):
    _run_main([f"--workdirs={tmp_path}"])
  with pytest.raises(DataError, match="run dunet-evaluate"):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    _run_main([f"--workdirs={tmp_path / 'run'}", f"--out_dir={tmp_path / 'out'}"])
  assert not (tmp_path / "out").exists()  # nothing written before the inputs are read
  flag_values = flags.FlagValues()
  results_table.define_flags(flag_values)
  names = [name for _, group in results_table.HELP_GROUPS for name in group]
  assert cli.unknown_names(names, flag_values) == []
  assert sorted(names) == sorted(flag_values)


def test_cli_error_is_one_line(tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text("{}")
  env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
  completed = subprocess.run(
    [
      sys.executable,
      "-m",
      "dunet.results_table",
      f"--workdirs={tmp_path / 'run'}",
      f"--out_dir={tmp_path / 'out'}",
    ],
    cwd=REPO,
    env=env,
    timeout=240,
    capture_output=True,
    text=True,
  )
  assert completed.returncode == 1, completed.stderr
  assert completed.stderr.strip().splitlines() == [
    f"dunet-results: error: {tmp_path / 'run'}: no evaluation (eval/*/metrics.json): run "
    f"dunet-evaluate --checkpoint={tmp_path / 'run'} first"
  ]
