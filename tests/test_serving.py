"""dunet/serving.py: raw pictures in, masks at their size out; loading from runs and SavedModels."""

import numpy as np
import pytest
import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet import folding
from dunet import postprocess
from dunet import serving
from dunet.data import prepare, preprocess
from dunet.errors import CheckpointError
from dunet.errors import ConfigError
from dunet.models import DoubleUNet
from tests.test_folding import randomize_batch_norms

SIZE = 64


@pytest.fixture(scope="module")
def model():
  tf.random.set_seed(3)
  return DoubleUNet()


@pytest.fixture(scope="module")
def images():
  return np.random.RandomState(0).randint(0, 256, (2, 96, 80, 3)).astype(np.uint8)


@pytest.mark.parametrize(
  "shape", [(2, 96, 80, 3), (2, 40, 50, 3), (1, 96, 40, 3)], ids=["shrink", "grow", "mixed"]
)
def test_resize_matches_preparation(shape):
  pictures = np.random.RandomState(1).randint(0, 256, shape).astype(np.uint8)
  resized = serving.resize_images(tf.constant(pictures), SIZE, SIZE).numpy()
  expected = np.stack([prepare.resize_image(p, SIZE, SIZE) for p in pictures])
  # OpenCV rounds to uint8; TF keeps float: at most half a grey level apart (plus float error).
  np.testing.assert_allclose(resized, expected.astype(np.float32), atol=0.76)


def test_resize_is_the_identity_at_the_model_size():
  pictures = np.random.RandomState(2).randint(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
  np.testing.assert_array_equal(
    serving.resize_images(tf.constant(pictures), SIZE, SIZE).numpy(), pictures.astype(np.float32)
  )


def test_serve_at_the_model_size_is_the_model(model):
  pictures = np.random.RandomState(4).randint(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
  segmenter = serving.Segmenter(model, SIZE, SIZE, "reference")
  result = segmenter(pictures)
  expected = model(preprocess.preprocess(pictures, "reference"), is_training=False)
  np.testing.assert_allclose(
    result["probability"].numpy(), tf.sigmoid(expected.logits2).numpy(), atol=1e-6
  )
  np.testing.assert_allclose(
    result["probability_head1"].numpy(), tf.sigmoid(expected.logits1).numpy(), atol=1e-6
  )


def test_the_segmenter_serves_a_folded_copy_that_computes_the_same():
  tf.random.set_seed(5)
  trained = DoubleUNet()
  randomize_batch_norms(trained, seed=6)
  pictures = np.random.RandomState(5).randint(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
  folded = serving.Segmenter(trained, SIZE, SIZE, "unit")
  unfolded = serving.Segmenter(trained, SIZE, SIZE, "unit", fold_batch_norm=False)
  assert folded.model is not trained and folded.model.folded_batch_norms == 36
  assert unfolded.model is trained and len(folding.remaining_batch_norms(trained)) == 36
  served = folded(pictures)
  for key, value in unfolded(pictures).items():
    np.testing.assert_allclose(served[key].numpy(), value.numpy(), atol=1e-5)
  # What an export holds: one kernel and bias per convolution, no BatchNorm statistics.
  assert not [v.name for v in folded.variables if "moving_" in v.name or "gamma" in v.name]
  assert [v.name for v in unfolded.variables if "moving_mean" in v.name]


def test_serve_returns_masks_at_the_input_size(model, images):
  segmenter = serving.Segmenter(model, SIZE, SIZE, "unit")
  result = segmenter(images)
  assert set(result) == {"probability", "probability_head1"}
  for value in result.values():
    assert value.shape == (2, 96, 80, 1) and value.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(value)) and float(tf.reduce_max(value)) <= 1.0
  # The same as running the model at its size and resizing its probabilities back.
  at_model_size = segmenter(
    serving.resize_images(images, SIZE, SIZE).numpy().round().astype(np.uint8)
  )
  back = tf.image.resize(at_model_size["probability"], [96, 80]).numpy()
  np.testing.assert_allclose(result["probability"].numpy(), back, atol=2e-2)


@pytest.mark.parametrize("preprocessing", preprocess.PREPROCESSING)
def test_serve_model_size_is_serve_at_the_model_size(model, preprocessing):
  pictures = np.random.RandomState(5).randint(0, 256, (3, SIZE, SIZE, 3)).astype(np.uint8)
  segmenter = serving.Segmenter(model, SIZE, SIZE, preprocessing)
  deployed = segmenter.serve_model_size(pictures)
  expected = segmenter.serve(pictures)
  assert set(deployed) == set(expected)
  for key in expected:
    # The same arithmetic: no resize at the model size, and the same median value.
    np.testing.assert_array_equal(deployed[key].numpy(), expected[key].numpy())


def test_serve_model_size_takes_only_the_model_size(model):
  segmenter = serving.Segmenter(model, SIZE, SIZE, "unit")
  with pytest.raises((ValueError, TypeError)):
    segmenter.serve_model_size(np.zeros((1, SIZE + 16, SIZE, 3), np.uint8))


@pytest.mark.parametrize(
  "height,width,preprocessing,message",
  [
    (60, 64, "unit", "height must be a positive multiple of 16"),
    (64, 0, "unit", "width must be a positive multiple of 16"),
    (64, 64, "imagenet", "unknown preprocessing"),
  ],
)
def test_segmenter_rejects_bad_settings(model, height, width, preprocessing, message):
  with pytest.raises(ConfigError, match=message):
    serving.Segmenter(model, height, width, preprocessing)


def test_saved_model_round_trip(tmp_path, model, images):
  segmenter = serving.Segmenter(model, SIZE, SIZE, "caffe")
  tf.saved_model.save(segmenter, str(tmp_path / "saved"), signatures=segmenter.signatures())
  loaded = serving.load_segmenter(str(tmp_path / "saved"))
  assert (loaded.kind, loaded.height, loaded.width, loaded.preprocessing) == (
    "saved_model",
    SIZE,
    SIZE,
    "caffe",
  )
  np.testing.assert_allclose(
    loaded.serve(images)["probability"].numpy(), segmenter(images)["probability"].numpy(), atol=1e-6
  )
  assert set(loaded.module.signatures) == {"serving_default", "model_size"}
  pictures = np.random.RandomState(6).randint(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
  by_key = loaded.module.signatures["model_size"](images=tf.constant(pictures))
  np.testing.assert_allclose(
    by_key["probability"].numpy(), segmenter(pictures)["probability"].numpy(), atol=1e-6
  )
  with pytest.raises(ConfigError, match="exported with height 64, not 128"):
    serving.load_segmenter(str(tmp_path / "saved"), height=128)


def test_a_foreign_saved_model_is_refused(tmp_path):
  module = tf.Module()
  module.f = tf.function(lambda x: x, input_signature=[tf.TensorSpec([None], tf.float32)])
  tf.saved_model.save(module, str(tmp_path / "other"))
  with pytest.raises(CheckpointError, match="not one dunet exported"):
    serving.load_segmenter(str(tmp_path / "other"))


def _write_run(workdir, model, config):
  # A CheckpointManager writes the `checkpoint` state file that resolve_checkpoint looks for.
  manager = tf.train.CheckpointManager(
    tf.train.Checkpoint(model=model), str(workdir / "best"), max_to_keep=1
  )
  prefix = manager.save(checkpoint_number=3)
  if config is not None:
    checkpoint_lib.write_config(str(workdir), config)
  return prefix


def test_load_from_a_workdir_and_a_prefix(tmp_path, model, images):
  prefix = _write_run(tmp_path, model, {"height": SIZE, "width": SIZE, "preprocessing": "unit"})
  expected = serving.Segmenter(model, SIZE, SIZE, "unit")(images)["probability"].numpy()
  for path in (str(tmp_path), prefix):
    loaded = serving.load_segmenter(path)
    assert (loaded.kind, loaded.source, loaded.preprocessing) == ("checkpoint", prefix, "unit")
    np.testing.assert_allclose(loaded.serve(images)["probability"].numpy(), expected, atol=1e-6)


def test_load_needs_an_input_size(tmp_path, model):
  _write_run(tmp_path, model, {"preprocessing": "reference"})
  with pytest.raises(ConfigError, match="records no input size"):
    serving.load_segmenter(str(tmp_path))
  loaded = serving.load_segmenter(str(tmp_path), height=32, width=48)
  assert (loaded.height, loaded.width, loaded.preprocessing) == (32, 48, "reference")


def test_load_without_a_checkpoint_names_the_path(tmp_path):
  with pytest.raises(checkpoint_lib.CheckpointNotFoundError, match=str(tmp_path)):
    serving.load_segmenter(str(tmp_path))
  # The same check without loading, as the programs make it before anything else.
  with pytest.raises(checkpoint_lib.CheckpointNotFoundError, match=str(tmp_path)):
    serving.resolve_model_source(str(tmp_path))


def test_resolve_model_source_finds_checkpoints_and_saved_models(tmp_path, model):
  prefix = _write_run(tmp_path / "run", model, {"height": SIZE, "width": SIZE})
  assert serving.resolve_model_source(str(tmp_path / "run")) == prefix
  segmenter = serving.Segmenter(model, SIZE, SIZE, "unit")
  tf.saved_model.save(segmenter, str(tmp_path / "saved"), signatures=segmenter.signatures())
  assert serving.resolve_model_source(str(tmp_path / "saved")) == str(tmp_path / "saved")


def _asymmetric_serve(images):
  """Not flip-equivariant: a cumulative sum along the width (and along the height for head 1)."""
  pixels = tf.cast(images[..., :1], tf.float32)
  return {"probability": tf.cumsum(pixels, axis=2), "probability_head1": tf.cumsum(pixels, axis=1)}


def test_flip_tta_flips_back_and_averages(images):
  result = serving.flip_tta(_asymmetric_serve, tf.constant(images))
  pixels = images[..., :1].astype(np.float64)
  plain = np.cumsum(pixels, axis=2)
  horizontal = np.cumsum(pixels[:, :, ::-1], axis=2)[:, :, ::-1]
  vertical = np.cumsum(pixels[:, ::-1], axis=2)[:, ::-1]
  np.testing.assert_allclose(
    result["probability"].numpy(), (plain + horizontal + vertical) / 3, rtol=1e-5
  )
  only_plain = serving.flip_tta(_asymmetric_serve, tf.constant(images), flips=("none",))
  np.testing.assert_allclose(
    only_plain["probability_head1"].numpy(), np.cumsum(pixels, axis=1), rtol=1e-6
  )


def test_flip_tta_rejects_unknown_flips(images):
  with pytest.raises(ConfigError, match="unknown flip 'diagonal'"):
    serving.flip_tta(_asymmetric_serve, tf.constant(images), flips=("diagonal",))


# ------------------------------------------------------------------------------------------------
# Ensembles, flips, tiling and post-processing inside the serve call
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_model():
  tf.random.set_seed(11)
  return DoubleUNet()


def test_an_ensemble_averages_its_members(model, second_model, images):
  ensemble = serving.Segmenter([model, second_model], SIZE, SIZE, "unit")
  got = ensemble(images)
  first = serving.Segmenter(model, SIZE, SIZE, "unit")(images)
  second = serving.Segmenter(second_model, SIZE, SIZE, "unit")(images)
  for key in serving.OUTPUT_NAMES:
    expected = (first[key].numpy() + second[key].numpy()) / 2
    np.testing.assert_allclose(got[key].numpy(), expected, atol=1e-6)
    assert not np.allclose(first[key].numpy(), second[key].numpy(), atol=1e-3)  # two models
  assert ensemble.settings()["members"] == 2


def test_load_an_ensemble_from_paths_and_globs(tmp_path, model, second_model, images):
  config = {"height": SIZE, "width": SIZE, "preprocessing": "unit"}
  first = _write_run(tmp_path / "cv" / "fold_0", model, config)
  second = _write_run(tmp_path / "cv" / "fold_1", second_model, config)
  expected = serving.Segmenter([model, second_model], SIZE, SIZE, "unit")(images)["probability"]
  for spelling in (f"{tmp_path}/cv/fold_0,{tmp_path}/cv/fold_1", f"{tmp_path}/cv/fold_*"):
    loaded = serving.load_segmenter(spelling)
    assert loaded.sources == (first, second) and loaded.source == f"{first},{second}"
    np.testing.assert_allclose(loaded.serve(images)["probability"], expected, atol=1e-6)
  with pytest.raises(checkpoint_lib.CheckpointNotFoundError, match="no model matches"):
    serving.load_segmenter(f"{tmp_path}/cv/nothing_*")


def test_ensemble_members_must_agree(tmp_path, model, second_model):
  _write_run(tmp_path / "a", model, {"height": SIZE, "width": SIZE, "preprocessing": "unit"})
  _write_run(tmp_path / "b", second_model, {"height": 32, "width": SIZE, "preprocessing": "unit"})
  with pytest.raises(ConfigError, match="ensemble members disagree: .*height 32"):
    serving.load_segmenter(f"{tmp_path}/a,{tmp_path}/b")


def test_flips_inside_serve_are_flip_tta(model, images):
  flips = ("none", "horizontal", "vertical")
  plain = serving.Segmenter(model, SIZE, SIZE, "unit")
  inside = serving.Segmenter(model, SIZE, SIZE, "unit", flips=flips)
  expected = serving.flip_tta(plain.serve, tf.constant(images), flips)
  for key in serving.OUTPUT_NAMES:
    np.testing.assert_allclose(inside(images)[key].numpy(), expected[key].numpy(), atol=1e-6)
  with pytest.raises(ConfigError, match="unknown flip"):
    serving.Segmenter(model, SIZE, SIZE, "unit", flips=("diagonal",))


def test_tiling_a_picture_of_the_model_size_is_the_plain_call(model):
  pictures = np.random.RandomState(5).randint(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
  plain = serving.Segmenter(model, SIZE, SIZE, "unit")(pictures)
  tiled = serving.Segmenter(model, SIZE, SIZE, "unit", tile_overlap=0.5)(pictures)
  for key in serving.OUTPUT_NAMES:
    np.testing.assert_allclose(tiled[key].numpy(), plain[key].numpy(), atol=1e-5)


def test_tiling_keeps_a_larger_picture_at_its_resolution(model):
  pictures = np.random.RandomState(6).randint(0, 256, (1, 100, 75, 3)).astype(np.uint8)
  tiled = serving.Segmenter(model, SIZE, SIZE, "unit", tile_overlap=0.25)(pictures)
  assert tiled["probability"].shape == (1, 100, 75, 1)
  # The top-left window alone is the model at that window; far from other windows' weight the
  # tiled result is close to it (Gaussian weights of neighbours are small in the corner).
  corner = serving.Segmenter(model, SIZE, SIZE, "unit")(pictures[:, :SIZE, :SIZE])
  np.testing.assert_allclose(
    tiled["probability"].numpy()[0, :8, :8], corner["probability"].numpy()[0, :8, :8], atol=1e-2
  )
  with pytest.raises(ConfigError, match="overlap"):
    serving.Segmenter(model, SIZE, SIZE, "unit", tile_overlap=1.0)


def test_postprocessing_inside_serve_keeps_the_largest_component(model, images):
  plain = serving.Segmenter(model, SIZE, SIZE, "unit")
  spec = postprocess.PostProcessing.from_string("largest")
  processed = serving.Segmenter(model, SIZE, SIZE, "unit", postprocessing=spec, threshold=0.5)
  before = plain(images)
  after = processed(images)
  mask = postprocess.apply_numpy(before["probability"].numpy(), 0.5, spec)[..., 0] >= 0.5
  np.testing.assert_array_equal(after["probability"].numpy()[..., 0] >= 0.5, mask)
  np.testing.assert_array_equal(
    after["probability_head1"].numpy(), before["probability_head1"].numpy()
  )  # head 1 untouched


def test_the_choice_kept_with_a_run_is_applied(tmp_path, model, images):
  _write_run(tmp_path, model, {"height": SIZE, "width": SIZE, "preprocessing": "unit"})
  assert serving.load_segmenter(str(tmp_path)).settings["postprocessing"] == "none"
  (tmp_path / serving.POSTPROCESSING_FILENAME).write_text(
    '{"choice": "min_size=20", "threshold": 0.4}'
  )
  loaded = serving.load_segmenter(str(tmp_path))
  assert loaded.settings["postprocessing"] == "min_size=20"
  assert loaded.settings["threshold"] == 0.4
  assert serving.load_segmenter(str(tmp_path), postprocessing="none").settings[
    "postprocessing"
  ] == ("none")
  (tmp_path / serving.POSTPROCESSING_FILENAME).write_text('{"choice": "biggest"}')
  with pytest.raises(CheckpointError, match="postprocessing.json: not a post-processing record"):
    serving.load_segmenter(str(tmp_path))


def test_a_saved_model_says_what_it_does(tmp_path, model, images):
  # One member keeps this cheap; a saved ensemble: tests/test_export.py.
  ensemble = serving.Segmenter(model, SIZE, SIZE, "unit", flips=("none", "horizontal"))
  tf.saved_model.save(ensemble, str(tmp_path / "saved"), signatures=ensemble.signatures())
  loaded = serving.load_segmenter(str(tmp_path / "saved"))
  assert loaded.settings == ensemble.settings()
  np.testing.assert_allclose(
    loaded.serve(images)["probability"].numpy(),
    ensemble(images)["probability"].numpy(),
    atol=1e-6,
  )
  with pytest.raises(ConfigError, match="tiling was fixed at export"):
    serving.load_segmenter(str(tmp_path / "saved"), tile_overlap=0.5)
  with pytest.raises(ConfigError, match="already averages flips"):
    serving.load_segmenter(str(tmp_path / "saved"), flips=("none", "vertical"))
