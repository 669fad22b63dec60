"""dunet/deploy/saved_model.py and its CLI dunet/export.py: verified, atomic SavedModel export of a
checkpoint."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet import postprocess
from dunet import serving
from dunet.data import prepare
from dunet.data import preprocess
from dunet.deploy import saved_model as export
from dunet.errors import ExportError
from tests.export_helpers import SIZE
from tests.export_helpers import leftovers
from tests.export_helpers import make_model
from tests.export_helpers import write_run

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
  return make_model()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model):
  workdir = tmp_path_factory.mktemp("run")
  write_run(workdir, model)
  return str(workdir)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, run_dir):
  out_dir = str(tmp_path_factory.mktemp("exports") / "saved")
  return export.export_saved_model(run_dir, out_dir)


@pytest.fixture(scope="module")
def reloaded(exported):
  return serving.load_segmenter(exported.out_dir)


def _model_probabilities(model, pictures, mode):
  """The network on already-sized pictures, computed without dunet.serving."""
  outputs = model(preprocess.preprocess(tf.constant(pictures), mode), is_training=False)
  return {
    "probability": tf.sigmoid(outputs.logits2).numpy(),
    "probability_head1": tf.sigmoid(outputs.logits1).numpy(),
  }


def test_round_trip_at_the_model_size_is_the_model(reloaded, model):
  loaded = reloaded
  assert (loaded.kind, loaded.height, loaded.width, loaded.preprocessing) == (
    "saved_model",
    SIZE,
    SIZE,
    "reference",
  )
  pictures = np.random.RandomState(21).randint(0, 256, (3, SIZE, SIZE, 3)).astype(np.uint8)
  expected = _model_probabilities(model, pictures, "reference")
  got = loaded.serve(pictures)
  by_key = loaded.module.signatures["model_size"](images=tf.constant(pictures))
  for key, value in expected.items():
    np.testing.assert_allclose(got[key].numpy(), value, atol=1e-6)
    np.testing.assert_allclose(by_key[key].numpy(), value, atol=1e-6)


@pytest.mark.parametrize("height,width", [(97, 83), (40, 52)], ids=["shrink", "grow"])
def test_round_trip_at_other_sizes(reloaded, model, height, width):
  loaded = reloaded
  pictures = export.parity_pictures(2, height, width, seed=99)
  got = loaded.serve(pictures)["probability"].numpy()
  assert got.shape == (2, height, width, 1)
  # The same as a fresh in-memory Segmenter over the same weights...
  fresh = serving.Segmenter(model, SIZE, SIZE, "reference")(pictures)["probability"].numpy()
  np.testing.assert_allclose(got, fresh, atol=1e-6)
  # ...and close to resizing the way preparation does (OpenCV, rounded to uint8), running the
  # network, and resizing its probabilities back.
  resized = np.stack([prepare.resize_image(picture, SIZE, SIZE) for picture in pictures])
  at_model_size = _model_probabilities(model, resized, "reference")["probability"]
  back = tf.image.resize(at_model_size, [height, width]).numpy()
  np.testing.assert_allclose(got, back, atol=3e-2)


def test_parity_numbers_and_export_info(exported, run_dir, model):
  prefix = checkpoint_lib.resolve_checkpoint(run_dir)
  assert exported.source == prefix
  sizes = export.parity_sizes(SIZE, SIZE)
  expected_keys = {f"serving_default {h}x{w}" for h, w in sizes} | {f"model_size {SIZE}x{SIZE}"}
  assert set(exported.parity) == expected_keys
  # The numbers recomputed here, not trusted: the SavedModel as written, called by signature key,
  # against a Segmenter over the checkpoint's model, on the exporter's pictures and on others.
  reloaded = tf.saved_model.load(exported.out_dir)
  reference = serving.Segmenter(model, SIZE, SIZE, "reference")
  for key, value in exported.parity.items():
    signature, size = key.split()
    height, width = (int(side) for side in size.split("x"))
    differences = []
    for pictures in (
      export.parity_pictures(export.PARITY_PICTURES, height, width),
      np.random.RandomState(height).randint(0, 256, (2, height, width, 3)),
    ):
      pictures = pictures.astype(np.uint8)
      got = reloaded.signatures[signature](images=tf.constant(pictures))
      want = reference.serve(pictures)
      differences.append(
        max(
          float(np.max(np.abs(got[name].numpy() - want[name].numpy())))
          for name in serving.OUTPUT_NAMES
        )
      )
    assert max(differences) <= export.DEFAULT_TOLERANCE, (key, differences)
    # The exporter's number is the one measured here on its pictures.
    assert 0.0 <= value <= export.DEFAULT_TOLERANCE
    assert value == pytest.approx(differences[0], abs=1e-6)
  with open(os.path.join(exported.out_dir, export.EXPORT_INFO_FILENAME)) as handle:
    info = json.load(handle)
  assert info["source_checkpoint"] == os.path.abspath(prefix)
  assert (info["height"], info["width"], info["preprocessing"]) == (SIZE, SIZE, "reference")
  assert info["tensorflow_version"] == tf.__version__
  assert info["parity_max_abs_difference"] == pytest.approx(exported.parity)
  assert info["parity_tolerance"] == export.DEFAULT_TOLERANCE
  assert leftovers(os.path.dirname(exported.out_dir)) == []


def test_parity_sizes_cover_identity_shrink_and_grow():
  (same, larger, smaller) = export.parity_sizes(64, 96)
  assert same == (64, 96)
  assert larger[0] > 64 and larger[1] > 96 and larger[0] % 16 and larger[1] % 16
  assert smaller[0] < 64 and smaller[1] < 96


def test_parity_pictures_are_deterministic():
  first = export.parity_pictures(2, 40, 56)
  assert first.shape == (2, 40, 56, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, export.parity_pictures(2, 40, 56))
  assert not np.array_equal(first, export.parity_pictures(2, 40, 56, seed=5))
  assert first.std() > 5  # pictures, not flat fields


def test_existing_out_dir_is_refused_without_overwrite(tmp_path, run_dir):
  out_dir = tmp_path / "taken"
  out_dir.mkdir()
  (out_dir / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match=re.escape(str(out_dir)) + ".*--overwrite"):
    export.export_saved_model(run_dir, str(out_dir))
  assert (out_dir / "keep.txt").read_text() == "mine"
  assert leftovers(tmp_path) == []


def test_a_failed_check_leaves_nothing_and_keeps_the_old_export(tmp_path, run_dir, monkeypatch):
  out_dir = tmp_path / "export"
  out_dir.mkdir()
  (out_dir / "keep.txt").write_text("previous export")
  monkeypatch.setattr(
    export, "verify_saved_model", lambda path, segmenter: {"serving_default": 0.5}
  )
  with pytest.raises(ExportError, match="differs from the model by 0.5"):
    export.export_saved_model(run_dir, str(out_dir), overwrite=True)
  assert os.listdir(out_dir) == ["keep.txt"]
  assert leftovers(tmp_path) == []


def test_an_interrupted_export_leaves_nothing(tmp_path, run_dir, monkeypatch):
  def interrupted(path, segmenter):
    assert os.path.exists(os.path.join(path, "saved_model.pb"))  # written, not yet verified
    raise KeyboardInterrupt

  monkeypatch.setattr(export, "verify_saved_model", interrupted)
  with pytest.raises(KeyboardInterrupt):
    export.export_saved_model(run_dir, str(tmp_path / "export"))
  assert os.listdir(tmp_path) == []


def test_missing_checkpoint_names_the_path(tmp_path):
  missing = tmp_path / "no_such_run"
  with pytest.raises(checkpoint_lib.CheckpointNotFoundError, match=re.escape(str(missing))):
    export.export_saved_model(str(missing), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_a_saved_model_is_not_exported_again(exported, tmp_path):
  with pytest.raises(ExportError, match="already a SavedModel"):
    export.export_saved_model(exported.out_dir, str(tmp_path / "again"))


def _run_cli(*args):
  # Without the suite's TF_CPP_MIN_LOG_LEVEL: the program quiets TensorFlow's start-up itself.
  env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
  return subprocess.run(
    [sys.executable, "-m", "dunet.export", *args],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )


def test_cli_errors_are_one_line_and_write_nothing(tmp_path):
  result = _run_cli(f"--checkpoint={tmp_path / 'nothing'}", f"--out_dir={tmp_path / 'out'}")
  assert result.returncode == 1, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith(f"dunet-export: error: no checkpoint at '{tmp_path / 'nothing'}'")
  result = _run_cli(f"--checkpoint={tmp_path / 'nothing'}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
    "dunet-export: error: required: --out_dir (see --help)"
  ]
  assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_cli_exports_and_overwrites(tmp_path, run_dir, model):
  out_dir = tmp_path / "cli_export"
  out_dir.mkdir()
  (out_dir / "old.txt").write_text("old")
  result = _run_cli(
    f"--checkpoint={run_dir}", f"--out_dir={out_dir}", "--overwrite", "--preprocessing=unit"
  )
  assert result.returncode == 0, result.stderr
  for key in ("serving_default 64x64", "model_size 64x64", "serving_default 99x85"):
    assert key in result.stdout
  assert "preprocessing: unit" in result.stdout
  assert sorted(os.listdir(out_dir)) == sorted(
    ["assets", "dunet_export.json", "fingerprint.pb", "saved_model.pb", "variables"]
  )
  loaded = serving.load_segmenter(str(out_dir))
  assert loaded.preprocessing == "unit"
  pictures = np.random.RandomState(3).randint(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
  expected = _model_probabilities(model, pictures, "unit")
  np.testing.assert_allclose(
    loaded.serve(pictures)["probability"].numpy(), expected["probability"], atol=1e-6
  )
  assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_an_ensemble_exports_as_one_verified_saved_model(tmp_path, model):
  """Two runs of one folder (cross-validation folds) with their post-processing choice: one
  SavedModel whose serving_default is the in-memory ensemble with the post-processing."""
  size = 32  # small: two networks, traced for three sizes and both signatures
  second = make_model(seed=5)
  for name, member in (("fold_0", model), ("fold_1", second)):
    write_run(tmp_path / "cv" / name, member, size=size)
  serving.write_postprocessing_choice(str(tmp_path / "cv"), {"choice": "largest", "threshold": 0.5})
  summary = export.export_saved_model(f"{tmp_path}/cv/fold_*", str(tmp_path / "saved"))
  assert len(summary.info["members"]) == 2
  assert summary.info["inference"]["postprocessing"] == "largest"
  assert summary.info["inference"]["members"] == 2
  assert {f"model_size {size}x{size}", f"serving_default {size}x{size}"} <= set(summary.parity)
  reloaded = serving.load_segmenter(summary.out_dir)
  expected = serving.Segmenter(
    [model, second],
    size,
    size,
    "reference",
    postprocessing=postprocess.PostProcessing.from_string("largest"),
  )
  pictures = export.parity_pictures(2, 40, 36)
  np.testing.assert_allclose(
    reloaded.serve(tf.constant(pictures))["probability"].numpy(),
    expected(pictures)["probability"].numpy(),
    atol=1e-5,
  )
