import tensorflow as tf

from dunet import flops
from dunet.models import DoubleUNet
from dunet.nn import conv as conv_lib
from dunet.nn.conv import Conv2D


class _TwoConvs(tf.Module):
  def __init__(self):
    super().__init__()
    self.a = Conv2D(3, 8, 3)
    self.b = Conv2D(8, 4, 1)

  def __call__(self, images, is_training=False):
    return self.b(tf.nn.max_pool2d(self.a(images), 2, 2, "VALID"))


def test_counts_each_convolution_by_hand():
  counted = flops.forward_flops(_TwoConvs(), 16, 16, batch_size=2)
  expected = 2 * (2 * 16 * 16 * 8 * 3 * 3 * 3) + 2 * (2 * 8 * 8 * 4 * 8)
  assert counted == {"conv": expected, "matmul": 0, "total": expected}


def test_doubleunet_cost_matches_the_design_figure():
  # DESIGN.md measured 26.8 GFLOP per 128x128 image for the reference Keras model.
  total = flops.forward_flops(DoubleUNet(), 128, 128)["total"]
  assert abs(total / 1e9 - 26.8) < 0.2, total
  # Convolutions scale with pixels once every ASPP tap reads real data (bottleneck >= 19 pixels;
  # below that, dunet.nn.conv drops taps that only read padding, as 128x128 does at rates 12, 18).
  at_384x512 = flops.forward_flops(DoubleUNet(), 384, 512)["total"]
  # (The image-pooling branch's 1x1 convolution on the pooled vector is the one fixed cost.)
  assert abs(flops.forward_flops(DoubleUNet(), 768, 1024)["total"] / at_384x512 - 4) < 1e-5
  assert at_384x512 > 12 * total


def test_dilated_convolution_counts_the_kept_outputs_only(monkeypatch):
  # The space-to-batch form (float16 on CPU) convolves a padded grid; only kept outputs count.
  monkeypatch.setattr(conv_lib, "needs_space_to_batch", lambda dtype: True)
  conv = Conv2D(3, 4, 3, dilation_rate=2)
  counted = flops.forward_flops(lambda images, is_training: conv(images), 21, 21)["total"]
  assert counted == 2 * 21 * 21 * 4 * 3 * 3 * 3  # the padded grid would be 22x22
