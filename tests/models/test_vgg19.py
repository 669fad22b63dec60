"""VGG19 encoder and the ImageNet weight loader, on h5 files written in Keras' layout."""

import h5py
import numpy as np
import pytest
import tensorflow as tf

from dunet.models import vgg19
from dunet.models.doubleunet import DoubleUNet
from tests.nn.helpers import numpy_conv_same


def _layer_shapes():
  shapes, channels = {}, 3
  for block, count, filters in vgg19.VGG19_BLOCKS:
    for index in range(1, count + 1):
      shapes[f"block{block}_conv{index}"] = ((3, 3, channels, filters), (filters,))
      channels = filters
  return shapes


def _known_weights(seed=0):
  """Different random values for every layer: a swapped layer or transpose cannot go unnoticed."""
  rng = np.random.default_rng(seed)
  return {
    name: (
      rng.normal(0, 0.05, kernel).astype(np.float32),
      rng.normal(0, 0.05, bias).astype(np.float32),
    )
    for name, (kernel, bias) in _layer_shapes().items()
  }


def write_keras_notop_h5(path, weights, nested=False, skip=(), shape_override=None):
  """Writes weights as Keras' vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 stores them.

  Root attribute `layer_names`; one group per layer whose `weight_names` attribute lists its
  datasets: `block1_conv1_W_1:0` and `block1_conv1_b_1:0` (the distributed file), or, with
  nested=True, `block1_conv1/kernel:0` and `block1_conv1/bias:0` (what later Keras versions save).
  """
  with h5py.File(path, "w") as h5:
    names = [name for name in weights if name not in skip]
    h5.attrs["layer_names"] = np.array([n.encode() for n in ["input_1", *names]])
    h5.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
    for name in names:
      kernel, bias = weights[name]
      if shape_override and name in shape_override:
        kernel = np.zeros(shape_override[name], np.float32)
      group = h5.create_group(name)
      if nested:
        dataset_names = [f"{name}/kernel:0", f"{name}/bias:0"]
      else:
        dataset_names = [f"{name}_W_1:0", f"{name}_b_1:0"]
      group.attrs["weight_names"] = np.array([n.encode() for n in dataset_names])
      group.create_dataset(dataset_names[0], data=kernel)
      group.create_dataset(dataset_names[1], data=bias)


@pytest.fixture(scope="module")
def model():
  return DoubleUNet()


@pytest.mark.parametrize("nested", [False, True])
def test_weights_land_in_the_right_variables(tmp_path, model, nested):
  weights = _known_weights()
  path = tmp_path / "vgg19.h5"
  write_keras_notop_h5(path, weights, nested=nested)
  loaded = vgg19.load_imagenet_weights(model, str(path))
  assert loaded == 20_024_384
  for name, (kernel, bias) in weights.items():
    conv = model.vgg19.layer(name)
    np.testing.assert_array_equal(conv.kernel.numpy(), kernel, err_msg=name)
    np.testing.assert_array_equal(conv.bias.numpy(), bias, err_msg=name)


def test_loaded_first_layer_computes_the_keras_convolution(tmp_path):
  """The HWIO kernel is used as stored: the first conv equals a direct convolution with it."""
  weights = _known_weights(1)
  path = tmp_path / "vgg19.h5"
  write_keras_notop_h5(path, weights)
  encoder = vgg19.VGG19Encoder()
  vgg19.load_imagenet_weights(encoder, str(path))
  images = np.random.default_rng(2).normal(size=(1, 16, 16, 3)).astype(np.float32)
  kernel, bias = weights["block1_conv1"]
  expected = np.maximum(numpy_conv_same(images, kernel, bias, 1), 0)
  got = tf.nn.relu(encoder.block1_conv1(images)).numpy()
  np.testing.assert_allclose(got, expected, atol=1e-4)


def test_encoder_outputs():
  outputs = vgg19.VGG19Encoder()(tf.zeros([1, 32, 48, 3]))
  assert [s.shape.as_list() for s in outputs.skips] == [
    [1, 32, 48, 64],
    [1, 16, 24, 128],
    [1, 8, 12, 256],
    [1, 4, 6, 512],
  ]
  assert outputs.bottleneck.shape == (1, 2, 3, 512)


def test_missing_file(tmp_path, model):
  with pytest.raises(vgg19.WeightFileError, match="not found.*never downloads"):
    vgg19.load_imagenet_weights(model, str(tmp_path / "absent.h5"))


def test_not_an_h5_file(tmp_path, model):
  path = tmp_path / "junk.h5"
  path.write_bytes(b"not hdf5")
  with pytest.raises(vgg19.WeightFileError, match="cannot read .*junk.h5"):
    vgg19.load_imagenet_weights(model, str(path))


def test_missing_layer_is_named(tmp_path, model):
  path = tmp_path / "vgg19.h5"
  write_keras_notop_h5(path, _known_weights(), skip=("block4_conv3",))
  with pytest.raises(vgg19.WeightFileError, match="block4_conv3.*missing"):
    vgg19.load_imagenet_weights(model, str(path))


def test_wrong_shape_is_named(tmp_path, model):
  path = tmp_path / "vgg16ish.h5"
  write_keras_notop_h5(path, _known_weights(), shape_override={"block3_conv1": (3, 3, 64, 256)})
  with pytest.raises(
    vgg19.WeightFileError, match=r"block3_conv1 kernel has shape \(3, 3, 64, 256\)"
  ):
    vgg19.load_imagenet_weights(model, str(path))


def test_failed_load_changes_nothing(tmp_path):
  encoder = vgg19.VGG19Encoder()
  before = [v.numpy() for v in encoder.variables]
  path = tmp_path / "bad.h5"
  write_keras_notop_h5(path, _known_weights(), skip=("block5_conv4",))
  with pytest.raises(vgg19.WeightFileError):
    vgg19.load_imagenet_weights(encoder, str(path))
  for variable, value in zip(encoder.variables, before):
    np.testing.assert_array_equal(variable.numpy(), value)


def test_without_a_file_logs_one_line(monkeypatch):
  # Captured at the call, not through Python logging: whether absl's records reach pytest's
  # handler depends on what earlier tests did to absl's logger (app.run installs its handler).
  lines = []
  monkeypatch.setattr(vgg19.logging, "info", lambda message, *args: lines.append(message % args))
  encoder = vgg19.VGG19Encoder()
  assert vgg19.maybe_load_imagenet_weights(encoder, None) == 0
  assert len(lines) == 1 and "starts from the Glorot-uniform" in lines[0], lines


def test_unknown_layer_name():
  with pytest.raises(KeyError, match="block6_conv1"):
    vgg19.VGG19Encoder().layer("block6_conv1")


def test_he_normal_initialisation_keeps_the_activation_scale(monkeypatch):
  """Glorot halves the second moment at every ReLU layer (fan_in = fan_out); He keeps it."""
  tf.random.set_seed(0)
  glorot = vgg19.VGG19Encoder()
  he = vgg19.VGG19Encoder(kernel_init="he_normal")
  kernel = he.layer("block3_conv2").kernel.numpy()
  fan_in = int(np.prod(kernel.shape[:3]))
  assert np.std(kernel) == pytest.approx(np.sqrt(2.0 / fan_in), rel=0.05)
  images = tf.random.stateless_uniform([2, 64, 64, 3], seed=[0, 1])
  rms = {
    name: float(tf.sqrt(tf.reduce_mean(tf.square(encoder(images).bottleneck))))
    for name, encoder in (("glorot", glorot), ("he", he))
  }
  assert rms["he"] > 30 * rms["glorot"], rms
  lines = []
  monkeypatch.setattr(vgg19.logging, "info", lambda message, *args: lines.append(message % args))
  vgg19.maybe_load_imagenet_weights(he, None)
  assert "starts from the He-normal" in lines[0], lines
  with pytest.raises(ValueError, match="'lecun'.*glorot_uniform, he_normal"):
    vgg19.VGG19Encoder(kernel_init="lecun")
