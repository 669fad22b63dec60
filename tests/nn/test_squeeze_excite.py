import numpy as np
import pytest

from dunet.nn.squeeze_excite import SqueezeExcite


def test_matches_numpy():
  se = SqueezeExcite(16, ratio=8)
  x = np.random.default_rng(0).normal(size=(2, 5, 5, 16)).astype(np.float32)
  squeeze = np.maximum(x.mean(axis=(1, 2)) @ se.squeeze.kernel.numpy(), 0)
  gates = 1 / (1 + np.exp(-(squeeze @ se.excite.kernel.numpy())))
  np.testing.assert_allclose(se(x).numpy(), x * gates[:, None, None, :], atol=1e-5)


def test_shapes_and_no_biases():
  se = SqueezeExcite(32)
  assert sorted(v.shape.as_list() for v in se.trainable_variables) == [[4, 32], [32, 4]]


def test_too_few_channels():
  with pytest.raises(ValueError, match="ratio"):
    SqueezeExcite(4, ratio=8)
