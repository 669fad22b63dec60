"""BatchNorm folding: the folded copy computes what the unfolded model computes in inference."""

import numpy as np
import pytest
import tensorflow as tf

from dunet import folding
from dunet.errors import ConfigError
from dunet.models import DoubleUNet
from dunet.nn.aspp import ASPP
from dunet.nn.batch_norm import BatchNorm
from dunet.nn.conv import Conv2D
from dunet.nn.conv_block import ConvBlock
from tests.nn.helpers import numpy_conv_same

# DoubleU-Net's BatchNorms: 12 ConvBlocks with two each, two ASPPs with six each.
DOUBLE_U_NET_BATCH_NORMS = 36


def randomize_batch_norms(module: tf.Module, seed: int = 0) -> None:
  """Statistics and affine parameters far from their initial values, so that folding matters."""
  rng = np.random.default_rng(seed)
  for batch_norm in folding.remaining_batch_norms(module):
    size = batch_norm.num_channels
    batch_norm.gamma.assign(rng.uniform(0.5, 2.0, size).astype(np.float32))
    batch_norm.beta.assign(rng.normal(0.0, 0.5, size).astype(np.float32))
    batch_norm.moving_mean.assign(rng.normal(0.0, 0.5, size).astype(np.float32))
    batch_norm.moving_variance.assign(rng.uniform(0.2, 3.0, size).astype(np.float32))


def _as_arrays(outputs):
  return [np.asarray(tf.cast(t, tf.float32)) for t in tf.nest.flatten(outputs)]


def test_folded_parameters_equal_conv_then_batch_norm_in_float64():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, 7, 3))
  kernel = rng.normal(size=(3, 3, 3, 4))
  gamma, beta = rng.uniform(0.5, 2, 4), rng.normal(size=4)
  mean, variance = rng.normal(size=4), rng.uniform(0.2, 3, 4)
  epsilon = 1e-3
  for bias in (None, rng.normal(size=4)):
    conv = numpy_conv_same(x, kernel, bias, dilation=2)
    expected = (conv - mean) / np.sqrt(variance + epsilon) * gamma + beta
    folded_kernel, folded_bias = folding.folded_parameters(
      kernel, bias, gamma, beta, mean, variance, epsilon
    )
    assert folded_kernel.dtype == folded_bias.dtype == np.float32
    actual = numpy_conv_same(x, folded_kernel.astype(np.float64), folded_bias, dilation=2)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_fold_into_matches_tensorflow_conv_then_batch_norm():
  conv = Conv2D(5, 6, 3, dilation_rate=2, with_bias=False)
  batch_norm = BatchNorm(6)
  randomize_batch_norms(batch_norm, seed=2)
  images = tf.random.stateless_normal([2, 12, 12, 5], seed=[3, 4])
  expected = batch_norm(conv(images), is_training=False)
  folding.fold_into(conv, batch_norm)
  assert conv.with_bias and conv.bias is not None
  np.testing.assert_allclose(conv(images), expected, rtol=1e-5, atol=1e-5)


BLOCKS = {
  "conv_block": (lambda dtype: ConvBlock(3, 16, compute_dtype=dtype), (2, 16, 16, 3), 2),
  "aspp": (lambda dtype: ASPP(8, 16, compute_dtype=dtype), (2, 8, 8, 8), 6),
  "double_u_net": (
    lambda dtype: DoubleUNet(compute_dtype=dtype),
    (2, 32, 32, 3),
    DOUBLE_U_NET_BATCH_NORMS,
  ),
}


def _unfolded_and_folded(name: str, dtype: tf.DType):
  create, shape, count = BLOCKS[name]
  tf.random.set_seed(8)  # the kernels' initial values: the same in every run
  module = create(dtype)
  randomize_batch_norms(module, seed=5)
  folded = folding.fold_batch_norms(module)
  assert folded.folded_batch_norms == count
  assert not folding.remaining_batch_norms(folded)
  assert len(folding.remaining_batch_norms(module)) == count  # the original is left as it is
  images = tf.random.stateless_uniform(shape, seed=[6, 7], minval=-1.0, maxval=1.0)
  return module, folded, images


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_folded_matches_unfolded_in_float32(name):
  module, folded, images = _unfolded_and_folded(name, tf.float32)
  expected = _as_arrays(module(images, is_training=False))
  actual = _as_arrays(folded(images, is_training=False))
  for want, got in zip(expected, actual):
    scale = float(np.abs(want).max())
    # float32 rounding of a different summation order: 36 layers deep, still ~1e-6 relative.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(scale, 1.0))


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_folded_bfloat16_is_as_close_to_float32_as_unfolded_bfloat16(name):
  """bfloat16 rounds the folded kernel where the unfolded model rounds the raw one and the
  BatchNorm's output: both differ from float32 by bfloat16's rounding, by similar amounts.

  Measured over 12 seeds, the folded model's mean error is 0.84-1.43 times the unfolded one's;
  a wrong fold (a scale or shift off) makes it many times larger."""
  module32, _, images = _unfolded_and_folded(name, tf.float32)
  module16, folded16, _ = _unfolded_and_folded(name, tf.bfloat16)
  for source, target in zip(module32.variables, module16.variables):
    target.assign(source)
  folded16 = folding.fold_batch_norms(module16)
  reference = _as_arrays(module32(images, is_training=False))
  unfolded = _as_arrays(module16(images, is_training=False))
  folded = _as_arrays(folded16(images, is_training=False))
  for want, plain, fused in zip(reference, unfolded, folded):
    plain_error = float(np.abs(plain - want).mean())
    fused_error = float(np.abs(fused - want).mean())
    assert plain_error > 0  # bfloat16 arithmetic did happen
    assert fused_error <= 2.0 * plain_error, (fused_error, plain_error)
    assert fused_error <= 0.02 * float(np.abs(want).mean()), fused_error


def test_the_folded_model_is_inference_only_and_folding_twice_changes_nothing():
  module = ConvBlock(3, 8)
  folded = folding.fold_batch_norms(module)
  with pytest.raises(ConfigError, match="folded into its convolutions.*inference only"):
    folded(tf.zeros([1, 8, 8, 3]), is_training=True)
  assert folding.fold_batch_norms(folded) is folded
  # The unfolded block still trains.
  module(tf.zeros([1, 8, 8, 3]), is_training=True)


def test_a_folded_double_u_net_has_fewer_variables_and_scalars():
  model = DoubleUNet()
  folded = folding.fold_batch_norms(model)
  # Each BatchNorm's four vectors go; each ASPP's five convolutions without a bias (1x1, three
  # atrous, projection) gain one.
  assert len(folded.variables) == len(model.variables) - 4 * DOUBLE_U_NET_BATCH_NORMS + 2 * 5
  scalars = lambda m: sum(int(np.prod(v.shape)) for v in m.variables)  # noqa: E731
  assert scalars(folded) < scalars(model)


def test_folded_dilated_convolutions_use_the_direct_kernel():
  """Inference needs no gradient, so a folded ASPP never takes the space-to-batch detour (which
  unfolded training uses where TF has no dilated-convolution gradient: CPUs without oneDNN,
  float16)."""
  aspp = ASPP(8, 8)
  folded = folding.fold_batch_norms(aspp)
  assert all(conv.inference_only for conv in folded.atrous_convs)
  assert not any(conv.inference_only for conv in aspp.atrous_convs)
  graph = (
    tf.function(lambda x: folded(x, is_training=False))
    .get_concrete_function(tf.TensorSpec([1, 32, 32, 8]))
    .graph
  )
  op_types = {op.type for op in graph.get_operations()}
  assert "SpaceToBatchND" not in op_types and "Conv2D" in op_types
