"""dunet/predict.py: masks and overlays at each picture's own size, unreadable pictures skipped
and named, batching by size, input lists, duplicate names, the exit status, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from absl import app
import pytest
import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet import inference
from dunet import predict
from dunet import serving
from dunet.models import DoubleUNet
from dunet.errors import ConfigError
from tests import testing_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_SIZE = (32, 32)
# name -> (height, width); two sizes repeat, so batches of 2 mix full and partial batches.
SIZES = {"a": (40, 56), "b": (64, 64), "c": (40, 56), "d": (64, 64), "e": (40, 56), "f": (37, 45)}


def _picture(index, size):
  rng = np.random.default_rng(200 + index)
  image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
  return cv2.GaussianBlur(image, (5, 5), 0)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run with a random DoubleU-Net whose head 2 is sharpened and centred on its median logit,
  so that masks are about half foreground."""
  pictures = np.stack([cv2.resize(_picture(i, (40, 56)), MODEL_SIZE[::-1]) for i in range(3)])
  model = testing_utils.calibrated_model(pictures, seed=5)
  root = tmp_path_factory.mktemp("run")
  prefix = tf.train.Checkpoint(model=model).write(str(root / "best" / "ckpt-1"))
  tf.compat.v1.train.update_checkpoint_state(str(root / "best"), prefix)
  checkpoint_lib.write_config(
    str(root), {"height": MODEL_SIZE[0], "width": MODEL_SIZE[1], "preprocessing": "unit"}
  )
  return root


@pytest.fixture(scope="module")
def loaded(workdir):
  return serving.load_segmenter(str(workdir))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """Pictures of three sizes, a 16-bit grayscale TIFF, an RGBA PNG, a JPEG, a corrupt PNG, a
  truncated JPEG, an empty file, and files that are not pictures."""
  root = tmp_path_factory.mktemp("inputs")
  pictures = {}
  for index, (name, size) in enumerate(SIZES.items()):
    pictures[name] = _picture(index, size)
    assert cv2.imwrite(str(root / f"{name}.png"), pictures[name][:, :, ::-1])
  gray = np.random.default_rng(1).integers(0, 65536, (30, 50), dtype=np.uint16)
  assert cv2.imwrite(str(root / "gray16.tif"), gray)
  rgba = np.concatenate([_picture(9, (40, 56)), np.full((40, 56, 1), 128, np.uint8)], axis=2)
  assert cv2.imwrite(str(root / "rgba.png"), rgba)
  assert cv2.imwrite(str(root / "photo.JPG"), _picture(10, (48, 48)))
  (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)) + b"IEND\xaeB`\x82")
  jpeg = cv2.imencode(".jpg", _picture(11, (40, 40)))[1].tobytes()
  (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
  (root / "empty.png").write_bytes(b"")
  (root / "notes.txt").write_text("not a picture")
  (root / ".hidden.png").write_bytes((root / "a.png").read_bytes())
  return root


GOOD = [*SIZES, "gray16", "rgba", "photo"]
BAD = ["corrupt", "truncated", "empty"]


def _probability(loaded, image):
  return loaded.serve(tf.constant(image[None]))["probability"].numpy()[0, :, :, 0]


def test_predict_writes_masks_and_overlays_at_each_size_and_skips_bad_files(
  loaded, inputs, tmp_path
):
  paths, problems = inference.find_inputs(str(inputs))
  assert sorted(path.stem for path in paths) == sorted(GOOD + BAD)
  assert not problems
  out = tmp_path / "out"
  summary = predict.predict(loaded, paths, out, batch_size=2, progress=False)

  assert summary["written"] == len(GOOD)
  assert sorted(Path(item["file"]).stem for item in summary["skipped"]) == sorted(BAD)
  reasons = {Path(item["file"]).stem: item["reason"] for item in summary["skipped"]}
  assert "truncated JPEG" in reasons["truncated"] and "empty file" in reasons["empty"]
  assert sorted(os.listdir(out / "masks")) == sorted(f"{stem}.png" for stem in GOOD)
  assert sorted(os.listdir(out / "overlays")) == sorted(f"{stem}.png" for stem in GOOD)
  assert not (out / "probabilities").exists()
  assert json.loads((out / "summary.json").read_text())["written"] == len(GOOD)

  expected_sizes = dict(SIZES, gray16=(30, 50), rgba=(40, 56), photo=(48, 48))
  for stem in GOOD:
    mask = cv2.imread(str(out / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
    assert mask.dtype == np.uint8 and mask.shape == expected_sizes[stem], stem
    assert set(np.unique(mask)) <= {0, 255}
    overlay = cv2.imread(str(out / "overlays" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
    assert overlay.shape == (*expected_sizes[stem], 3), stem

  # The masks are the model's head 2 at 0.5, picture by picture, at the picture's size. (The
  # batches held 1 or 2 pictures: pixels within 1e-4 of the threshold may differ.)
  for stem in SIZES:
    image = cv2.imread(str(inputs / f"{stem}.png"))[:, :, ::-1].copy()
    probability = _probability(loaded, image)
    mask = cv2.imread(str(out / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED) > 0
    clear = np.abs(probability - 0.5) > 1e-4
    np.testing.assert_array_equal(mask[clear], probability[clear] >= 0.5, err_msg=stem)
    assert 0.05 < mask.mean() < 0.95, stem  # a real test: neither empty nor full

    # Overlays: unchanged pixels far from the mask, changed pixels inside it.
    overlay = cv2.imread(str(out / "overlays" / f"{stem}.png"))[:, :, ::-1]
    inside = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    outside = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    np.testing.assert_array_equal(overlay[outside], image[outside])
    assert (overlay[inside] != image[inside]).any(axis=-1).all()
    assert (overlay[inside][:, 1] >= image[inside][:, 1]).all()  # blended towards green


def test_probabilities_tta_and_no_overlays(loaded, inputs, tmp_path):
  paths = [inputs / "a.png", inputs / "b.png"]
  summary = predict.predict(
    loaded,
    paths,
    tmp_path,
    tta=True,
    overlays=False,
    probabilities=True,
    threshold=0.6,
    progress=False,
  )
  assert summary["tta"] == ["none", "horizontal", "vertical"] and summary["threshold"] == 0.6
  assert not (tmp_path / "overlays").exists()
  for path in paths:
    image = cv2.imread(str(path))[:, :, ::-1].copy()
    expected = serving.flip_tta(loaded.serve, tf.constant(image[None]))["probability"]
    expected = expected.numpy()[0, :, :, 0]
    written = cv2.imread(str(tmp_path / "probabilities" / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED)
    assert written.shape == image.shape[:2]
    assert np.abs(written.astype(np.float32) - expected * 255).max() <= 0.5 + 1e-3
    mask = cv2.imread(str(tmp_path / "masks" / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED) > 0
    clear = np.abs(expected - 0.6) > 1e-4
    np.testing.assert_array_equal(mask[clear], expected[clear] >= 0.6)


def test_duplicate_stems_are_refused(loaded, tmp_path):
  for name in ("one/1.png", "two/1.png", "two/2.png", "two/2.tif"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(b"")
  paths = [tmp_path / name for name in ("one/1.png", "two/1.png", "two/2.png", "two/2.tif")]
  with pytest.raises(ConfigError, match="'1': .*one/1.png, .*two/1.png; '2': .*2.png, .*2.tif"):
    predict.predict(loaded, paths, tmp_path / "out", progress=False)
  assert not (tmp_path / "out").exists()


def _cli(*args, timeout=240):
  # Without the suite's TF_CPP_MIN_LOG_LEVEL: the program quiets TensorFlow's start-up itself.
  env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
  return subprocess.run(
    [sys.executable, "-m", "dunet.predict", *args],
    cwd=REPO,
    env=env,
    timeout=timeout,
    capture_output=True,
    text=True,
  )


def test_cli_skips_unreadable_pictures_and_says_so_in_the_exit_status(workdir, inputs, tmp_path):
  out = tmp_path / "out"
  completed = _cli(
    f"--checkpoint={workdir}",
    f"--input={inputs}",
    f"--out_dir={out}",
    "--batch_size=3",
    "--noprogress",
  )
  assert completed.returncode == predict.EXIT_SKIPPED == 3, completed.stderr[-3000:]
  for stem in BAD:
    assert str(inputs / stem) in completed.stderr
    assert str(inputs / stem) in completed.stdout  # the closing list
  summary = json.loads((out / "summary.json").read_text())
  assert summary["written"] == len(GOOD) and len(summary["skipped"]) == len(BAD)
  assert sorted(os.listdir(out / "masks")) == sorted(f"{stem}.png" for stem in GOOD)

  # All readable: exit status 0; TTA and probability pictures on request.
  out = tmp_path / "good"
  completed = _cli(
    f"--checkpoint={workdir}",
    f"--input={inputs}/a.png,{inputs}/[bd].png",
    f"--out_dir={out}",
    "--tta",
    "--probabilities",
    "--nooverlays",
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert sorted(os.listdir(out / "probabilities")) == ["a.png", "b.png", "d.png"]
  assert not (out / "overlays").exists()
  assert not [name for name in os.listdir(out / "masks") if ".tmp" in name]

  # Nothing to do, or a clash of names: status 1 and the reason.
  completed = _cli(
    f"--checkpoint={workdir}", f"--input={inputs}/corrupt.png", f"--out_dir={tmp_path / 'none'}"
  )
  assert completed.returncode == 1 and "corrupt.png" in completed.stderr


def test_cli_errors_and_help(tmp_path, inputs):
  # A model path with nothing there: one line naming it, exit status 1, no output folder.
  completed = _cli(
    f"--checkpoint={tmp_path / 'no_run'}",
    f"--input={inputs}/a.png",
    f"--out_dir={tmp_path / 'out'}",
  )
  assert completed.returncode == 1
  lines = completed.stderr.strip().splitlines()
  assert len(lines) == 1, completed.stderr
  assert lines[0].startswith(f"dunet-predict: error: no checkpoint at '{tmp_path / 'no_run'}'")
  # Pictures are checked first (before the model): a usage error, one line naming --input.
  completed = _cli(
    f"--checkpoint={tmp_path / 'no_run'}",
    f"--input={tmp_path / 'nope'}",
    f"--out_dir={tmp_path / 'out'}",
  )
  assert completed.returncode == 2
  assert completed.stderr.strip().splitlines() == [
    f"dunet-predict: error: --input={tmp_path / 'nope'}: no such file or folder (see --help)"
  ]
  assert not (tmp_path / "out").exists()
  completed = _cli("--help")
  for flag in (
    "checkpoint",
    "prefer",
    "input",
    "recursive",
    "out_dir",
    "batch_size",
    "threshold",
    "tta",
    "tta_flips",
    "overlays",
    "probabilities",
    "height",
    "width",
    "precision",
    "progress",
  ):
    assert f"  --{flag}\n" in completed.stdout or f"  --[no]{flag}\n" in completed.stdout, flag
  assert completed.returncode == 0 and "Segments new pictures" in completed.stdout


def test_main_refuses_inputs_that_name_no_picture(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(app.UsageError, match="--input=.*empty: no pictures found"):
    predict.find_pictures([str(tmp_path / "empty")], False, str(tmp_path / "out"))
  with pytest.raises(app.UsageError, match=r"no pictures found .*nothing\*.png: no image file"):
    predict.find_pictures([f"{tmp_path}/nothing*.png"], False, str(tmp_path / "out"))
  with pytest.raises(app.UsageError, match="no such file or folder"):
    predict.find_pictures([str(tmp_path / "a.png"), str(tmp_path / "b.png")], False, "out")
  (tmp_path / "a.png").write_bytes(b"")  # exists: read (and reported) later, like any picture
  paths, _ = predict.find_pictures([str(tmp_path / "a.png"), str(tmp_path / "b.png")], False, "out")
  assert [path.name for path in paths] == ["a.png", "b.png"]
  assert not (tmp_path / "out").exists()


def test_degenerate_masks_warning_rule():
  assert predict.degenerate_masks_warning([0.3, 0.1, 0.99, 0.0]) is None  # a mixed set
  assert predict.degenerate_masks_warning([1.0]) is None  # too few to say
  full = predict.degenerate_masks_warning([0.99, 1.0, 0.2])
  assert full and "2 of 3 masks are nearly all foreground" in full and "recompute_bn" in full
  empty = predict.degenerate_masks_warning([0.0, 0.0001, 0.0, 0.4])
  assert empty and "3 of 4 masks are nearly all background" in empty
  assert predict.degenerate_masks_warning([0.0, 0.0, 0.5, 0.5]) is None  # half is not most


def test_a_model_predicting_foreground_everywhere_is_warned_about(workdir, inputs, tmp_path):
  model = DoubleUNet()  # the checkpoint's own (unfolded) model: served ones are folded
  checkpoint_lib.restore_model(model, str(workdir))
  model.head2.bias.assign(model.head2.bias + 1e4)  # head 2's logits: huge everywhere
  degenerate = tmp_path / "run"
  prefix = tf.train.Checkpoint(model=model).write(str(degenerate / "best" / "ckpt-1"))
  tf.compat.v1.train.update_checkpoint_state(str(degenerate / "best"), prefix)
  checkpoint_lib.write_config(
    str(degenerate), {"height": MODEL_SIZE[0], "width": MODEL_SIZE[1], "preprocessing": "unit"}
  )
  summary = predict.predict(
    serving.load_segmenter(str(degenerate)),
    [inputs / f"{name}.png" for name in SIZES],
    tmp_path / "out",
    progress=False,
  )
  assert len(summary["warnings"]) == 1 and "nearly all foreground" in summary["warnings"][0]
  assert (
    json.loads((tmp_path / "out" / "summary.json").read_text())["warnings"] == (summary["warnings"])
  )
  normal = predict.predict(
    serving.load_segmenter(str(workdir)),
    [inputs / f"{name}.png" for name in SIZES],
    tmp_path / "normal",
    progress=False,
  )
  assert normal["warnings"] == []
