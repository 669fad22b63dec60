"""Numpy references shared by the nn and models tests."""

from typing import Optional

import numpy as np


def numpy_conv_same(
  x: np.ndarray, kernel: np.ndarray, bias: Optional[np.ndarray], dilation: int
) -> np.ndarray:
  """Direct 'same' convolution: out[b,i,j,o] = sum x[b, i+d*(p-c), j+d*(q-c), :] k[p,q,:,o].

  Args:
    x: [batch, height, width, in] input.
    kernel: [size, size, in, out] kernel (HWIO), size odd.
    bias: [out] bias, or None.
    dilation: the dilation rate.

  Returns:
    The float64 [batch, height, width, out] output, zero-padded at the borders.
  """
  batch, height, width, _ = x.shape
  size = kernel.shape[0]
  centre = size // 2
  out = np.zeros((batch, height, width, kernel.shape[-1]), np.float64)
  for p in range(size):
    for q in range(size):
      di, dj = dilation * (p - centre), dilation * (q - centre)
      shifted = np.zeros_like(x, dtype=np.float64)
      src_i = slice(max(0, di), min(height, height + di))
      dst_i = slice(max(0, -di), min(height, height - di))
      src_j = slice(max(0, dj), min(width, width + dj))
      dst_j = slice(max(0, -dj), min(width, width - dj))
      shifted[:, dst_i, dst_j, :] = x[:, src_i, src_j, :]
      out += shifted @ kernel[p, q]
  return out + (0 if bias is None else bias)
