"""dunet/cross_validation.py: every fold trained once, scored on its own held-out fold, and the
scores aggregated over folds; the post-processing chosen on the out-of-fold predictions."""

import json
import os

import cv2
import numpy as np
import pytest
import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet import cross_validation
from dunet import serving
from dunet.data import prepare
from dunet.errors import ConfigError
from tests import testing_utils

SIZE = (32, 48)
COUNT = 12
FOLDS = 3


def _pair(index):
  rng = np.random.default_rng(300 + index)
  image = cv2.GaussianBlur(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8), (5, 5), 0)
  mask = np.zeros(SIZE, np.uint8)
  top, left = rng.integers(0, SIZE[0] // 2), rng.integers(0, SIZE[1] // 2)
  mask[top : top + SIZE[0] // 2, left : left + SIZE[1] // 3] = 1
  return image, mask


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("cv")
  for folder in ("images", "masks"):
    (root / "raw" / folder).mkdir(parents=True)
  for index in range(COUNT):
    image, mask = _pair(index)
    cv2.imwrite(str(root / "raw" / "images" / f"p{index:02d}.png"), image[:, :, ::-1])
    cv2.imwrite(str(root / "raw" / "masks" / f"p{index:02d}.png"), mask * 255)
  out = root / "data"
  prepare.prepare_dataset(
    root / "raw",
    out,
    height=SIZE[0],
    width=SIZE[1],
    folds=FOLDS,
    test_fraction=0.2,
    valid_fraction=0.1,
    progress=False,
    workers=1,
  )
  return out


class FakeTraining:
  """Stands in for dunet.train.train: writes a fold workdir holding a calibrated model (one seed
  per fold), its config.json (as training writes it) and its final metrics.json."""

  def __init__(self):
    self.calls = []

  def __call__(self, config, workdir):
    fold = config.data.fold
    self.calls.append(fold)
    pictures = np.stack([_pair(i)[0] for i in range(4)])
    model = testing_utils.calibrated_model(pictures, seed=20 + fold)
    prefix = tf.train.Checkpoint(model=model).write(os.path.join(workdir, "best", "ckpt-1"))
    tf.compat.v1.train.update_checkpoint_state(os.path.join(workdir, "best"), prefix)
    checkpoint_lib.write_config(
      workdir,
      {
        "height": SIZE[0],
        "width": SIZE[1],
        "preprocessing": "unit",
        "data_dir": str(config.data.data_dir),
        "fold": fold,
        "folds": FOLDS,
        "valid_split": f"fold_{fold}",
        "threshold": 0.5,
      },
    )
    with open(os.path.join(workdir, "metrics.json"), "w") as handle:
      json.dump({"step": 1}, handle)
    return {"step": 1}


def test_every_fold_is_trained_scored_and_aggregated(data_dir, tmp_path):
  config = testing_utils.small_train_config(data_dir)
  training = FakeTraining()
  cv_dir = str(tmp_path / "cv")
  summary = cross_validation.cross_validate(config, cv_dir, training, progress=False)
  assert training.calls == [0, 1, 2]
  counts = json.loads((data_dir / "summary.json").read_text())["counts"]
  pool = sum(counts[f"fold_{k}"] for k in range(FOLDS))
  assert summary["images"] == pool and summary["folds"] == FOLDS
  # Each fold's report is its own model on its own held-out fold.
  per_fold = []
  for fold in range(FOLDS):
    report = json.loads(
      (tmp_path / "cv" / f"fold_{fold}" / "eval" / "valid" / "metrics.json").read_text()
    )
    assert report["data"]["splits"] == {f"fold_{fold}": counts[f"fold_{fold}"]}
    assert report["model"]["postprocessing"] == "none"
    per_fold.append(report["headline"]["dsc"])
    assert summary["per_fold"][str(fold)]["dsc"] == report["headline"]["dsc"]
  assert summary["over_folds"]["dsc"]["mean"] == pytest.approx(np.mean(per_fold))
  assert summary["over_folds"]["dsc"]["std"] == pytest.approx(np.std(per_fold, ddof=1))
  rows = (tmp_path / "cv" / "oof_per_image.csv").read_text().strip().splitlines()
  assert len(rows) == 1 + pool
  markdown = (tmp_path / "cv" / "cross_validation.md").read_text()
  assert "| mean ± std |" in markdown and f"{np.mean(per_fold):.4f}" in markdown
  # The post-processing chosen out of fold is what the folds' ensemble applies.
  kept = json.loads((tmp_path / "cv" / serving.POSTPROCESSING_FILENAME).read_text())
  assert kept["choice"] == summary["postprocessing"]["choice"]
  ensemble = serving.load_segmenter(f"{cv_dir}/fold_*")
  assert len(ensemble.sources) == FOLDS
  assert ensemble.settings["postprocessing"] == kept["choice"]
  # Run again: nothing is retrained, the scores are the same.
  again = cross_validation.cross_validate(config, cv_dir, training, progress=False)
  assert training.calls == [0, 1, 2]
  assert again["over_folds"] == summary["over_folds"]


def test_folds_are_checked(data_dir, tmp_path):
  config = testing_utils.small_train_config(data_dir)
  with pytest.raises(ConfigError, match="fold 5 is out of range: the data has 3 folds"):
    cross_validation.cross_validate(config, str(tmp_path), FakeTraining(), folds=[5])


def test_data_without_folds_is_refused(tmp_path):
  raw = tmp_path / "raw"
  for folder in ("images", "masks"):
    (raw / folder).mkdir(parents=True)
  for index in range(6):
    image, mask = _pair(index)
    cv2.imwrite(str(raw / "images" / f"p{index}.png"), image[:, :, ::-1])
    cv2.imwrite(str(raw / "masks" / f"p{index}.png"), mask * 255)
  prepare.prepare_dataset(
    raw, tmp_path / "plain", height=SIZE[0], width=SIZE[1], progress=False, workers=1
  )
  config = testing_utils.small_train_config(tmp_path / "plain")
  with pytest.raises(ConfigError, match="not prepared in folds"):
    cross_validation.number_of_folds(config)


def test_each_fold_records_flags_that_replay_it_alone():
  from dunet import train

  text = "--config=demo\n--cross_validate\n--workdir=runs/cv\n--max_steps=5\n"
  assert train.fold_flags_text(text, 3, "runs/cv/fold_3").splitlines() == [
    "--config=demo",
    "--max_steps=5",
    "--fold=3",
    "--workdir=runs/cv/fold_3",
  ]
