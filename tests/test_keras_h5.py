"""Converting the authors' Keras DoubleU-Net HDF5 files (dunet.keras_h5, tools/convert_keras_h5.py).

The oracle is an independent Keras 3 build of the reference model (tests/keras_reference.py) with
random weights everywhere, BatchNorm statistics included, saved as legacy HDF5. The main test
converts it with the command-line tool and requires dunet to reproduce both Keras heads: this is
also the strongest check that dunet's network is the reference architecture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Callable, Dict, Optional, Tuple

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet import keras_h5
from dunet.models.doubleunet import DoubleUNet
from tests.keras_reference import build_reference_model, randomize_weights

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO_ROOT, "tools", "convert_keras_h5.py")
# Non-square, so that a height/width mix-up anywhere (ASPP pooling, upsampling) shows.
HEIGHT, WIDTH = 64, 96
# float32 through ~60 layers in two implementations: observed differences are ~2e-7.
PROBABILITY_TOLERANCE = 1e-5


class Reference:
  """The Keras oracle's file and its outputs on a fixed batch."""

  def __init__(self, h5_path: str, images: np.ndarray, probabilities: np.ndarray):
    self.h5_path = h5_path
    self.images = images
    self.probabilities = probabilities  # [B, H, W, 2]: head 1, head 2.


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
  keras.utils.clear_session()  # Layer names from conv2d / batch_normalization / dense onwards.
  model = build_reference_model(HEIGHT, WIDTH)
  randomize_weights(model, seed=0)
  h5_path = str(tmp_path_factory.mktemp("keras") / "model.h5")
  model.save(h5_path)  # Legacy HDF5, as the reference ModelCheckpoint writes it.
  images = np.random.default_rng(1).uniform(0.0, 1.0, (2, HEIGHT, WIDTH, 3)).astype(np.float32)
  probabilities = np.asarray(model(images, training=False))
  return Reference(h5_path, images, probabilities)


@pytest.fixture(scope="module")
def model() -> DoubleUNet:
  """A DoubleUNet to match files against (tests that assign use their own)."""
  return DoubleUNet()


@pytest.fixture(scope="module")
def baseline(reference, model) -> Dict[Tuple[str, str], Tuple[str, np.ndarray]]:
  """{(dunet path, role): (Keras layer, array)} for the unmodified Keras 3 file."""
  assignments = keras_h5.match_doubleunet(keras_h5.read_keras_h5(reference.h5_path), model)
  return {(a.dunet_path, a.role): (a.keras_layer, a.value) for a in assignments}


# --- helpers ---------------------------------------------------------------------------------


def _decode(value) -> str:
  return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _rename_strings(value, rename: Callable[[str], str]):
  """Applies `rename` to every string value (not key) of a JSON structure."""
  if isinstance(value, dict):
    return {key: _rename_strings(item, rename) for key, item in value.items()}
  if isinstance(value, list):
    return [_rename_strings(item, rename) for item in value]
  return rename(value) if isinstance(value, str) else value


def _rewrite_h5(
  source: str,
  target: str,
  *,
  rename: Callable[[str], str] = lambda name: name,
  keras2: bool = False,
  weights_only: bool = False,
  drop_model_config: bool = False,
  reverse_layer_order: bool = False,
  modify: Optional[Dict[Tuple[str, str], Callable]] = None,
) -> str:
  """Rewrites a Keras 3 legacy h5 in another dialect or with edits.

  Args:
    source: the Keras 3 `model.save("x.h5")` file.
    target: the file to write.
    rename: new name for each layer (groups, weight names, layer_names, model_config).
    keras2: Keras 2 (TF 2.1) layout: datasets `<layer>/<layer>/kernel:0`, bytes weight_names,
      keras_version '2.3.0-tf', `batch_input_shape` in the input layer's config.
    weights_only: layer groups at the root (model.save_weights("w.h5")), no model_config.
    drop_model_config: leave out the architecture attribute.
    reverse_layer_order: write layer_names backwards (creation order must not come from it).
    modify: {(original layer, role): f} replaces that array by f(array), or drops it if f
      returns None.

  Returns:
    `target`.
  """
  modify = modify or {}
  with h5py.File(source, "r") as src, h5py.File(target, "w") as dst:
    src_root = src["model_weights"]
    dst_root = dst if weights_only else dst.create_group("model_weights")
    layer_names = [_decode(name) for name in src_root.attrs["layer_names"]]
    if reverse_layer_order:
      layer_names.reverse()
    for name in layer_names:
      new_name = rename(name)
      group = dst_root.create_group(new_name)
      weight_names = []
      for weight_name in (_decode(w) for w in src_root[name].attrs["weight_names"]):
        role = weight_name.rsplit("/", 1)[-1]
        array = src_root[name][weight_name][()]
        if (name, role) in modify:
          array = modify[(name, role)](array)
          if array is None:
            continue
        new_weight_name = f"{new_name}/{role}:0" if keras2 else f"{new_name}/{role}"
        group[new_weight_name] = array  # Creates the inner <layer>/ group, as Keras does.
        weight_names.append(new_weight_name)
      group.attrs["weight_names"] = _string_array(weight_names, keras2)
    dst_root.attrs["layer_names"] = _string_array([rename(name) for name in layer_names], keras2)
    version = "2.3.0-tf" if keras2 else _decode(src.attrs["keras_version"])
    dst_root.attrs["keras_version"] = version.encode() if keras2 else version
    dst_root.attrs["backend"] = "tensorflow"
    if not (weights_only or drop_model_config):
      config = _rename_strings(json.loads(_decode(src.attrs["model_config"])), rename)
      if keras2:
        config["class_name"] = "Model"
        input_config = config["config"]["layers"][0]["config"]
        input_config["batch_input_shape"] = input_config.pop("batch_shape")
      dst.attrs["model_config"] = json.dumps(config).encode() if keras2 else json.dumps(config)
  return target


def _string_array(strings, keras2: bool) -> np.ndarray:
  """Keras 2 wrote name lists as fixed-length bytes, Keras 3 as variable-length strings."""
  if keras2:
    return np.array([string.encode() for string in strings], dtype="S")
  return np.array(strings, dtype=h5py.string_dtype())


def _offset_auto_names(offsets: Dict[str, int]) -> Callable[[str], str]:
  """Renames 'conv2d_5' to 'conv2d_<5 + offset>' ('conv2d' counts as 0): a later session."""

  def rename(name: str) -> str:
    for base, offset in offsets.items():
      if name == base or (name.startswith(base + "_") and name[len(base) + 1 :].isdigit()):
        index = int(name[len(base) + 1 :]) if name != base else 0
        return f"{base}_{index + offset}"
    return name

  return rename


def _swap_names(first: str, second: str) -> Callable[[str], str]:
  return lambda name: {first: second, second: first}.get(name, name)


def _matched(path: str, model: DoubleUNet) -> Dict[Tuple[str, str], Tuple[str, np.ndarray]]:
  assignments = keras_h5.match_doubleunet(keras_h5.read_keras_h5(path), model)
  return {(a.dunet_path, a.role): (a.keras_layer, a.value) for a in assignments}


def _assert_same_arrays(matched, baseline) -> None:
  assert matched.keys() == baseline.keys()
  for key, (_, value) in baseline.items():
    np.testing.assert_array_equal(matched[key][1], value, err_msg=str(key))


# --- the main test ---------------------------------------------------------------------------


def test_converted_checkpoint_reproduces_both_keras_heads(reference, tmp_path):
  out_dir = tmp_path / "converted"
  result = subprocess.run(
    [sys.executable, TOOL, f"--keras_h5={reference.h5_path}", f"--out_dir={out_dir}"],
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Keras layers mapped: 114" in result.stdout
  assert "29,297,570 (29,290,274 trainable + 7,296 BatchNorm moving statistics)" in result.stdout

  # The workdir layout every consumer reads.
  assert checkpoint_lib.best_checkpoint(str(out_dir)) == str(out_dir / "best" / "ckpt-1")
  config = checkpoint_lib.read_config(str(out_dir))
  assert config["preprocessing"] == "reference"
  assert config["source"]["path"] == os.path.abspath(reference.h5_path)
  assert (config["height"], config["width"]) == (HEIGHT, WIDTH)
  assert [entry for entry in os.listdir(tmp_path) if entry.startswith(".")] == []

  model = DoubleUNet()
  checkpoint_lib.restore_model(model, str(out_dir))
  probabilities = model(tf.constant(reference.images), is_training=False).probabilities()
  # A weak signal would let a mapping error hide: the heads must really vary over the image.
  assert reference.probabilities[..., 1].std() > 1e-2
  np.testing.assert_allclose(
    probabilities.logits1.numpy()[..., 0],
    reference.probabilities[..., 0],
    rtol=0,
    atol=PROBABILITY_TOLERANCE,
    err_msg="head 1 differs from the Keras reference",
  )
  np.testing.assert_allclose(
    probabilities.logits2.numpy()[..., 0],
    reference.probabilities[..., 1],
    rtol=0,
    atol=PROBABILITY_TOLERANCE,
    err_msg="head 2 differs from the Keras reference",
  )

  # The comparison is sharp enough to see two same-shaped layers swapped (ASPP 2's rate-12 and
  # rate-18 convolutions, which only the file's config tells apart).
  rate12, rate18 = model.aspp2.atrous_convs[1].kernel, model.aspp2.atrous_convs[2].kernel
  kernel12 = rate12.numpy()
  rate12.assign(rate18)
  rate18.assign(kernel12)
  swapped = model(tf.constant(reference.images), is_training=False).probabilities()
  assert np.abs(swapped.logits2.numpy()[..., 0] - reference.probabilities[..., 1]).max() > 1e-3


def test_converted_workdir_serves_evaluates_predicts_and_exports(reference, tmp_path):
  """What users do with converted weights: dunet's evaluate, predict and export read the workdir
  as they read a training run (input size and the reference preprocessing from config.json)."""
  import cv2  # pylint: disable=g-import-not-at-top
  from dunet import evaluation, predict, serving  # pylint: disable=g-import-not-at-top
  from dunet.deploy import saved_model  # pylint: disable=g-import-not-at-top
  from dunet.data import preprocess  # pylint: disable=g-import-not-at-top

  out_dir = tmp_path / "converted"
  keras_h5.convert_keras_h5(reference.h5_path, str(out_dir))
  loaded = serving.load_segmenter(str(out_dir))
  assert (loaded.height, loaded.width, loaded.preprocessing) == (HEIGHT, WIDTH, "reference")
  rng = np.random.default_rng(5)
  pictures = rng.integers(0, 256, (2, HEIGHT, WIDTH, 3), dtype=np.uint8)
  model = DoubleUNet()
  checkpoint_lib.restore_model(model, str(out_dir))
  expected = model(preprocess.preprocess(pictures, "reference"), is_training=False)
  np.testing.assert_allclose(
    loaded.serve(pictures)["probability"].numpy(),
    tf.sigmoid(expected.logits2).numpy(),
    atol=PROBABILITY_TOLERANCE,
  )

  # A raw images/ + masks/ folder at another size: evaluate and predict at that size.
  raw = tmp_path / "raw"
  for folder in ("images", "masks"):
    (raw / folder).mkdir(parents=True)
  for index in range(2):
    picture = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    mask = np.zeros((50, 70), np.uint8)
    mask[10:30, 20:50] = 255
    cv2.imwrite(str(raw / "images" / f"{index}.png"), picture)
    cv2.imwrite(str(raw / "masks" / f"{index}.png"), mask)
  report = evaluation.evaluate(loaded, raw_dir=str(raw), progress=False)
  assert report["images"] == 2 and report["resolution"] == "original"
  assert 0.0 <= report["headline"]["dsc"] <= 1.0
  summary = predict.predict(
    loaded, sorted((raw / "images").iterdir()), tmp_path / "predicted", progress=False
  )
  assert summary["written"] == 2 and not summary["skipped"]
  written = cv2.imread(str(tmp_path / "predicted" / "masks" / "0.png"), cv2.IMREAD_UNCHANGED)
  assert written.shape == (50, 70)

  exported = saved_model.export_saved_model(str(out_dir), str(tmp_path / "saved_model"))
  assert max(exported.parity.values()) <= saved_model.DEFAULT_TOLERANCE
  reloaded = serving.load_segmenter(str(tmp_path / "saved_model"))
  np.testing.assert_allclose(
    reloaded.serve(pictures)["probability"].numpy(),
    loaded.serve(pictures)["probability"].numpy(),
    atol=1e-5,
  )


def test_mapping_table_anchors(baseline):
  """Spot checks of the creation-order table against the Keras 3 file's auto names."""
  expected = {
    ("vgg19.block3_conv4", "kernel"): "block3_conv4",
    ("aspp1.pool_conv", "bias"): "conv2d",  # The only biased ASPP conv.
    ("aspp1.atrous_convs[2]", "kernel"): "conv2d_4",  # rate 18
    ("aspp1.project_bn", "moving_variance"): "batch_normalization_5",
    ("decoder1.blocks[0].se.excite", "kernel"): "dense_1",
    ("head1", "kernel"): "conv2d_14",
    ("encoder2.blocks[0].bn1", "gamma"): "batch_normalization_14",
    ("aspp2.pool_conv", "kernel"): "conv2d_23",
    ("decoder2.blocks[3].se.squeeze", "kernel"): "dense_22",
    ("head2", "bias"): "conv2d_37",
  }
  for key, keras_layer in expected.items():
    assert baseline[key][0] == keras_layer, key
  # Every dunet variable once: 16 x 2 VGG + 38 convs (14 with bias) ... = 266.
  assert len(baseline) == 266


# --- other layouts of the same weights -------------------------------------------------------


def test_keras2_layout_from_a_later_session_in_any_file_order(reference, model, baseline, tmp_path):
  rename = _offset_auto_names({"conv2d": 17, "batch_normalization": 9, "dense": 3})
  path = _rewrite_h5(
    reference.h5_path,
    str(tmp_path / "keras2.h5"),
    rename=rename,
    keras2=True,
    reverse_layer_order=True,
  )
  with h5py.File(path, "r") as h5:  # The layout really is Keras 2's.
    assert "conv2d_22/conv2d_22/kernel:0" in h5["model_weights"]
  keras_file = keras_h5.read_keras_h5(path)
  assert keras_file.keras_version == "2.3.0-tf"
  assert keras_file.input_shape == (HEIGHT, WIDTH, 3)
  matched = _matched(path, model)
  _assert_same_arrays(matched, baseline)
  assert matched[("head1", "kernel")][0] == "conv2d_31"


def test_weights_only_file_without_architecture(reference, model, baseline, tmp_path):
  path = _rewrite_h5(
    reference.h5_path, str(tmp_path / "weights.h5"), weights_only=True, reverse_layer_order=True
  )
  keras_file = keras_h5.read_keras_h5(path)
  assert not keras_file.has_model_config and keras_file.input_shape is None
  _assert_same_arrays(_matched(path, model), baseline)


def test_load_assigns_every_variable(reference, baseline):
  model = DoubleUNet()
  assignments = keras_h5.load_keras_h5(model, reference.h5_path)
  assert len(assignments) == len(model.variables)
  np.testing.assert_array_equal(
    model.aspp2.atrous_bns[1].moving_mean.numpy(),
    baseline[("aspp2.atrous_bns[1]", "moving_mean")][1],
  )


# --- errors ----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
  with pytest.raises(keras_h5.KerasH5Error, match="not found"):
    keras_h5.read_keras_h5(str(tmp_path / "nothing.h5"))


def test_not_hdf5(tmp_path):
  path = tmp_path / "model.h5"
  path.write_text("not an HDF5 file")
  with pytest.raises(keras_h5.KerasH5Error, match="not an HDF5 file"):
    keras_h5.read_keras_h5(str(path))


def _small_other_model() -> keras.Model:
  inputs = keras.layers.Input((32, 32, 3))
  x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
  x = keras.layers.BatchNormalization()(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  return keras.Model(inputs, keras.layers.Dense(2)(x))


def test_keras3_native_weights_file_is_refused_clearly(tmp_path):
  path = str(tmp_path / "other.weights.h5")
  _small_other_model().save_weights(path)
  with pytest.raises(keras_h5.KerasH5Error, match="not a Keras legacy model or weights file"):
    keras_h5.read_keras_h5(path)


def test_file_of_another_model_names_what_does_not_match(model, tmp_path):
  path = str(tmp_path / "other.h5")
  _small_other_model().save(path)
  with pytest.raises(keras_h5.KerasH5Error) as raised:
    keras_h5.match_doubleunet(keras_h5.read_keras_h5(path), model)
  message = str(raised.value)
  assert "is not the reference DoubleU-Net" in message
  assert "VGG19 layers missing: block1_conv1" in message
  assert "1 Conv2D layers where DoubleU-Net has 38" in message
  assert "1 Dense layers where DoubleU-Net has 24" in message


def test_wrong_shape_names_keras_layer_and_dunet_variable(reference, model, tmp_path):
  # conv2d_5 is ASPP 1's projection (320 -> 64 channels); cut its output channels.
  path = _rewrite_h5(
    reference.h5_path,
    str(tmp_path / "bad.h5"),
    modify={("conv2d_5", "kernel"): lambda kernel: kernel[..., :32]},
  )
  with pytest.raises(keras_h5.KerasH5Error) as raised:
    keras_h5.match_doubleunet(keras_h5.read_keras_h5(path), model)
  message = str(raised.value)
  assert "'conv2d_5'" in message and "aspp1.project" in message
  assert model.aspp1.project.kernel.name in message
  assert "(1, 1, 320, 32)" in message and "(1, 1, 320, 64)" in message


def test_missing_bias_names_keras_layer_and_dunet_slot(reference, model, tmp_path):
  path = _rewrite_h5(
    reference.h5_path, str(tmp_path / "bad.h5"), modify={("conv2d", "bias"): lambda bias: None}
  )
  expected = (
    r"'conv2d' -> dunet aspp1\.pool_conv .*"
    r"holds \['kernel'\], dunet needs \['kernel', 'bias'\]"
  )
  with pytest.raises(keras_h5.KerasH5Error, match=expected):
    keras_h5.match_doubleunet(keras_h5.read_keras_h5(path), model)


def test_swapped_same_shape_layers_are_caught_by_the_config(reference, model, tmp_path):
  # conv2d_2 (rate 6) and conv2d_3 (rate 12) have identical shapes; the config tells them apart.
  path = _rewrite_h5(
    reference.h5_path, str(tmp_path / "swapped.h5"), rename=_swap_names("conv2d_2", "conv2d_3")
  )
  with pytest.raises(
    keras_h5.KerasH5Error, match=r"'conv2d_2'.*aspp1\.atrous_convs\[0\].*dilation_rate"
  ):
    keras_h5.match_doubleunet(keras_h5.read_keras_h5(path), model)


# --- the workdir -----------------------------------------------------------------------------


def test_failed_conversion_leaves_nothing(tmp_path):
  path = tmp_path / "model.h5"
  path.write_text("not an HDF5 file")
  with pytest.raises(keras_h5.KerasH5Error):
    keras_h5.convert_keras_h5(str(path), str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path)) == ["model.h5"]


def test_existing_out_dir_needs_overwrite(reference, tmp_path):
  out_dir = tmp_path / "out"
  out_dir.mkdir()
  (out_dir / "old.txt").write_text("previous run")
  with pytest.raises(FileExistsError, match="--overwrite"):
    keras_h5.convert_keras_h5(reference.h5_path, str(out_dir))
  summary = keras_h5.convert_keras_h5(reference.h5_path, str(out_dir), overwrite=True)
  assert sorted(os.listdir(out_dir)) == ["best", "config.json"]
  assert sorted(os.listdir(tmp_path)) == ["out"]  # No staging or retired folders left.
  assert summary.checkpoint_prefix == str(out_dir / "best" / "ckpt-1")
  assert summary.keras_layers == 114 and summary.scalars == 29_297_570


def test_tool_help_documents_every_flag():
  result = subprocess.run(
    [sys.executable, TOOL, "--help"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
  )
  # absl exits with status 1 after printing --help.
  assert "--keras_h5" in result.stdout, result.stderr[-2000:]
  for flag in ("--keras_h5", "--out_dir", "--[no]overwrite"):
    assert flag in result.stdout


def test_tool_reports_errors_without_a_traceback(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      TOOL,
      f"--keras_h5={tmp_path / 'missing.h5'}",
      f"--out_dir={tmp_path / 'out'}",
    ],
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
    timeout=120,
    # The command quiets TensorFlow itself unless the caller set this (as tests/conftest.py does).
    env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
  )
  # A missing input file is a usage error: one line naming the flag, before anything is written.
  assert result.returncode == 2
  assert result.stderr.startswith("dunet-convert-keras: error: --keras_h5=")
  assert "no such file (see --help)" in result.stderr and result.stderr.count("\n") == 1
  assert not (tmp_path / "out").exists()


def test_conversion_records_the_preprocessing_the_model_was_trained_with(reference, tmp_path):
  summary = keras_h5.convert_keras_h5(
    reference.h5_path, str(tmp_path / "unit"), preprocessing="unit"
  )
  assert summary.config["preprocessing"] == "unit"
  assert checkpoint_lib.read_config(str(tmp_path / "unit"))["preprocessing"] == "unit"
  with pytest.raises(ValueError, match="unknown preprocessing 'bgr'"):
    keras_h5.convert_keras_h5(reference.h5_path, str(tmp_path / "bad"), preprocessing="bgr")
  assert not (tmp_path / "bad").exists()
