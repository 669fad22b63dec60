"""Image preprocessing choices (TF ops), and the inverse for display.

  reference  what the authors' train.py/predict.py did (read_image): OpenCV's BGR channel order,
             a per-image median shift `clip(x - median(x) + 127, 0, 255)` where the median is one
             scalar over all pixels and channels (np.median, so the mean of the two middle values
             for an even count), then / 255. Computed here exactly for uint8 inputs; float inputs
             (after colour augmentation) are rounded to uint8 first, as the reference only ever
             saw 8-bit files.
  unit       RGB / 255, in [0, 1].
  caffe      Keras' ImageNet "caffe" mode that VGG19's ImageNet weights expect: BGR minus
             [103.939, 116.779, 123.68], no scaling.
  standardize  RGB, each image moved to mean 0 and scaled to standard deviation 1 over its
             pixels and channels (tf.image.per_image_standardization): centred inputs of unit
             scale for a network trained from random weights, whatever the modality's
             brightness (dark fluorescence or bright endoscopy), like the reference's
             per-image median shift but without clipping.

Inputs: RGB values in [0, 255], uint8 or float, [H, W, 3] or [B, H, W, 3]. Output: float32.
"""

from __future__ import annotations

import tensorflow as tf

PREPROCESSING = ("reference", "unit", "caffe", "standardize")
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
# The grey level the reference code moves each image's median to.
REFERENCE_MEDIAN_TARGET = 127.0
# Bisection steps that pin one of 256 grey levels (the counting median).
_GREY_LEVEL_BITS = 8


def preprocess(images: tf.Tensor, mode: str, *, export_friendly: bool = False) -> tf.Tensor:
  """Turns RGB images with values in [0, 255] into the network's input.

  Args:
    images: uint8 or float, [H, W, 3] or [B, H, W, 3], RGB.
    mode: one of `PREPROCESSING`.
    export_friendly: compute the "reference" median by counting (`median_uint8_by_counting`:
      comparisons and sums only, static H and W needed) instead of from a histogram
      (`tf.math.bincount`, which tf2onnx turns into ONNX ops TensorRT does not take). Both give
      exactly np.median, so the result is the same bit for bit; the histogram is cheaper.

  Returns:
    float32 of the same shape.
  """
  _check_mode(mode)
  images = tf.convert_to_tensor(images)
  if mode == "unit":
    return tf.cast(images, tf.float32) / 255.0
  if mode == "caffe":
    return tf.cast(images, tf.float32)[..., ::-1] - tf.constant(CAFFE_BGR_MEAN, tf.float32)
  if mode == "standardize":
    return tf.image.per_image_standardization(tf.cast(images, tf.float32))
  # reference
  pixels = _as_uint8(images)
  # Per image, broadcastable.
  median = median_uint8_by_counting(pixels) if export_friendly else _median_uint8(pixels)
  shifted = tf.clip_by_value(
    tf.cast(pixels, tf.float32) - median + REFERENCE_MEDIAN_TARGET, 0.0, 255.0
  )
  return shifted[..., ::-1] / 255.0


def to_display_uint8(images: tf.Tensor, mode: str) -> tf.Tensor:
  """Inverse of `preprocess` for viewing: uint8 RGB of the same shape.

  For "reference" the median shift cannot be undone: the shifted image is shown; for
  "standardize", each image is shown with its mean at 128 and +-2.5 standard deviations spanning
  the grey levels.
  """
  _check_mode(mode)
  images = tf.convert_to_tensor(images, tf.float32)
  if mode == "standardize":
    rgb = images * (127.5 / 2.5) + 127.5
  elif mode == "unit":
    rgb = images * 255.0
  elif mode == "caffe":
    rgb = (images + tf.constant(CAFFE_BGR_MEAN, tf.float32))[..., ::-1]
  else:
    rgb = images[..., ::-1] * 255.0
  return tf.cast(tf.clip_by_value(tf.round(rgb), 0.0, 255.0), tf.uint8)


def _check_mode(mode: str) -> None:
  if mode not in PREPROCESSING:
    raise ValueError(f"unknown preprocessing {mode!r}; expected one of {PREPROCESSING}")


def _as_uint8(images: tf.Tensor) -> tf.Tensor:
  if images.dtype == tf.uint8:
    return images
  return tf.cast(tf.clip_by_value(tf.round(tf.cast(images, tf.float32)), 0.0, 255.0), tf.uint8)


def _median_uint8(images: tf.Tensor) -> tf.Tensor:
  """np.median over each image's pixels and channels, from a 256-bin histogram (O(pixels)).

  Returns float32 of shape [1, 1, 1] or [B, 1, 1, 1].
  """
  batched = images.shape.rank == 4
  flat = (
    tf.reshape(images, [-1, tf.reduce_prod(tf.shape(images)[-3:])])
    if batched
    else tf.reshape(images, [1, -1])
  )
  rows, count = tf.shape(flat)[0], tf.shape(flat)[1]
  # One histogram per image: offset each image's values by 256 * its index.
  offsets = 256 * tf.range(rows)[:, None]
  histogram = tf.math.bincount(
    tf.cast(flat, tf.int32) + offsets, minlength=256 * rows, maxlength=256 * rows, dtype=tf.int32
  )
  cumulative = tf.cumsum(tf.reshape(histogram, [-1, 256]), axis=1)

  def value_at(rank):  # the rank-th smallest value (0-based) = how many bins end at or before it
    return tf.reduce_sum(tf.cast(cumulative <= rank, tf.float32), axis=1)

  median = 0.5 * (value_at((count - 1) // 2) + value_at(count // 2))
  return tf.reshape(median, [-1, 1, 1, 1]) if batched else tf.reshape(median, [1, 1, 1])


def median_uint8_by_counting(images: tf.Tensor) -> tf.Tensor:
  """np.median over each uint8 image's pixels and channels, by bisection over the grey levels.

  Equal to the histogram median (both exact) but built from comparisons, sums and selects only,
  for graphs that go to ONNX and TensorRT. Eight halvings of [0, 255] find the k-th smallest
  value as the smallest v with #(x <= v) > k, for the two middle ranks at once. Counts are
  float32, exact below 2**24 values per image (a 2,300 x 2,300 RGB picture).

  Args:
    images: uint8 [H, W, C] or [B, H, W, C] with static H, W, C.

  Returns:
    float32 [1, 1, 1] or [B, 1, 1, 1].
  """
  batched = images.shape.rank == 4
  count = images.shape[-3:].num_elements()
  if count is None:
    raise ValueError(f"the counting median needs static image dimensions, got {images.shape}")
  flat = tf.cast(tf.reshape(images, [-1, count, 1]), tf.float32)
  ranks = tf.constant([[(count - 1) // 2, count // 2]], tf.float32)  # [1, 2]
  low = tf.zeros_like(flat[:, 0, :]) + tf.zeros_like(ranks)  # [B, 2]
  high = low + 255.0
  for _ in range(_GREY_LEVEL_BITS):
    middle = tf.floor((low + high) * 0.5)
    at_or_below = tf.reduce_sum(tf.cast(flat <= middle[:, None, :], tf.float32), axis=1)
    found = at_or_below > ranks
    high = tf.where(found, middle, high)
    low = tf.where(found, low, middle + 1.0)
  median = 0.5 * (low[:, 0] + low[:, 1])
  return tf.reshape(median, [-1, 1, 1, 1]) if batched else tf.reshape(median, [1, 1, 1])
