"""Full-resolution inference by sliding windows, in TF ops (usable inside a SavedModel).

`sliding_window(window_fn, images, window)` segments images of any size with a function that only
takes one size (the model's H x W, e.g. `dunet.serving.Segmenter.serve_model_size`), the way
nnU-Net and MONAI do it:

  images [B, h, w, C]
    -> reflect-padded (centred) to at least the window where smaller  (`reflect_pad`)
    -> windows on a regular grid, the first flush with the top/left border and the last flush
       with the bottom/right one, evenly spaced at most window * (1 - overlap) apart (then
       rounded to whole pixels)  (`window_starts`)
    -> window_fn on `windows_per_call` windows at a time (memory stays bounded)
    -> each window's output times an importance map (`importance_map`: a Gaussian, 1 at the
       centre, or constant), summed into the padded frame, divided by the summed weights
    -> cropped back to h x w.

Why no padding to "the grid": nnU-Net's step rule spaces the windows evenly between the first and
the last position, so any size >= the window is covered exactly; padding is needed only where the
image is smaller than the window. The padding mirrors the image without repeating its edge pixel
(tf.pad's REFLECT, numpy's "reflect"), continued periodically when the image is too small for one
reflection (a 3-pixel row a b c becomes ... b c b a b c b a ...), so any size pads, even 1 pixel.

Everything here is TF ops on dynamic shapes: it traces inside a `tf.function` with the input
signature [None, None, None, C] and exports in a SavedModel. The window size, overlap and weighting
are Python values fixed at trace time.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Sequence, Tuple, Union

import tensorflow as tf

from dunet.errors import ConfigError

WEIGHTINGS = ("gaussian", "constant")
DEFAULT_OVERLAP = 0.5
DEFAULT_SIGMA_SCALE = 0.125  # nnU-Net's: sigma = window / 8 per axis
DEFAULT_WINDOWS_PER_CALL = 8
# The importance map's floor, relative to its peak 1. Far below any weight a window's centre region
# has, so it only matters in corners no other window covers better; above float16's smallest normal
# number (6.1e-5), so the map survives a cast to half precision and no pixel ever weighs 0.
MIN_WEIGHT = 1e-4

_BARE = "output"  # the key of a window_fn that returns one tensor

WindowFn = Callable[[tf.Tensor], Union[Dict[str, tf.Tensor], tf.Tensor]]


def check_arguments(
  window: Sequence[int],
  overlap: float = DEFAULT_OVERLAP,
  sigma_scale: float = DEFAULT_SIGMA_SCALE,
  weighting: str = "gaussian",
  windows_per_call: int = DEFAULT_WINDOWS_PER_CALL,
  min_weight: float = MIN_WEIGHT,
) -> Tuple[int, int]:
  """Validates sliding-window settings (a command line can call this before loading anything).

  Args:
    window: (height, width) of a window, positive integers.
    overlap: the fraction of a window two neighbours share at least, in [0, 1).
    sigma_scale: the Gaussian's sigma as a fraction of the window size, > 0.
    weighting: one of WEIGHTINGS.
    windows_per_call: the most windows one window_fn call gets, >= 1.
    min_weight: the importance map's floor, in (0, 1].

  Returns:
    (height, width) as ints.

  Raises:
    ConfigError: naming the bad setting.
  """
  try:
    height, width = (int(v) for v in window)
    exact = all(float(v) == int(v) for v in window)
  except (TypeError, ValueError):
    raise ConfigError(f"window must be (height, width), got {window!r}") from None
  if not exact or height <= 0 or width <= 0:
    raise ConfigError(f"window must be two positive integers (height, width), got {window!r}")
  if not 0.0 <= overlap < 1.0:
    raise ConfigError(f"overlap must be in [0, 1), got {overlap!r}")
  if weighting not in WEIGHTINGS:
    raise ConfigError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
  if not sigma_scale > 0:
    raise ConfigError(f"sigma_scale must be positive, got {sigma_scale!r}")
  if not 0.0 < min_weight <= 1.0:
    raise ConfigError(f"min_weight must be in (0, 1], got {min_weight!r}")
  if int(windows_per_call) != windows_per_call or windows_per_call < 1:
    raise ConfigError(f"windows_per_call must be a positive integer, got {windows_per_call!r}")
  return height, width


def importance_map(
  window: Sequence[int],
  weighting: str = "gaussian",
  sigma_scale: float = DEFAULT_SIGMA_SCALE,
  min_weight: float = MIN_WEIGHT,
) -> tf.Tensor:
  """The weight of each pixel of a window's output when windows are blended.

  Gaussian: exp(-d^2 / (2 sigma^2)) per axis, d the distance to the window's centre
  ((n - 1) / 2, so the map is symmetric), sigma = sigma_scale * n, the product of both axes
  scaled to peak exactly 1 (the centre pixel, or the central 2 x 2 for even sizes), then raised to
  at least `min_weight`. Constant: 1 everywhere (plain averaging).

  Args:
    window: (height, width).
    weighting: one of WEIGHTINGS.
    sigma_scale: sigma as a fraction of the window size (nnU-Net: 1/8).
    min_weight: the floor, so that no pixel weighs 0.

  Returns:
    float32 [height, width].

  Raises:
    ConfigError: bad settings.
  """
  height, width = check_arguments(window, 0.0, sigma_scale, weighting, 1, min_weight)
  if weighting == "constant":
    return tf.ones([height, width], tf.float32)

  def axis(size: int) -> tf.Tensor:
    distance = tf.range(size, dtype=tf.float64) - (size - 1) / 2.0
    sigma = sigma_scale * size
    values = tf.exp(-tf.square(distance) / (2.0 * sigma * sigma))
    return values / tf.reduce_max(values)

  weights = axis(height)[:, None] * axis(width)[None, :]
  return tf.cast(tf.maximum(weights, min_weight), tf.float32)


def window_starts(size: Union[int, tf.Tensor], window: int, overlap: float) -> tf.Tensor:
  """Where windows start along one axis (nnU-Net's step rule).

  n = ceil((size - window) / (window * (1 - overlap))) + 1 windows, evenly spaced from 0 to
  size - window (rounded half to even, as numpy), so neighbours are at most
  ceil(window * (1 - overlap)) apart and the last one is flush with the border.

  Args:
    size: the (padded) image size along the axis, >= window (a smaller one gives the single
      start 0).
    window: the window size along the axis.
    overlap: in [0, 1).

  Returns:
    int32 [n], increasing, starting at 0.
  """
  span = tf.cast(tf.maximum(tf.cast(size, tf.int32) - window, 0), tf.float64)
  count = tf.cast(tf.math.ceil(span / (window * (1.0 - overlap))), tf.int32) + 1
  step = span / tf.cast(tf.maximum(count - 1, 1), tf.float64)
  return tf.cast(tf.round(step * tf.range(count, dtype=tf.float64)), tf.int32)


def _reflect_indices(size: tf.Tensor, before: tf.Tensor, total: tf.Tensor) -> tf.Tensor:
  """Source indices of a reflect padding to `total` with `before` pixels in front."""
  period = tf.maximum(2 * (size - 1), 1)
  position = tf.math.floormod(tf.range(total) - before, period)
  return tf.where(position < size, position, period - position)


def reflect_pad(images: tf.Tensor, height: int, width: int) -> Tuple[tf.Tensor, tf.Tensor]:
  """Pads images smaller than height x width to at least that, centred, by reflection.

  The reflection does not repeat the edge pixel (tf.pad REFLECT) and repeats periodically when
  the pad is wider than the image (as numpy's np.pad mode "reflect"); sides already at least as
  large are unchanged. An odd pad puts the extra pixel after (below, right of) the image.

  Args:
    images: [B, h, w, C], any dtype.
    height, width: the least output size.

  Returns:
    (padded [B, max(h, height), max(w, width), C] of the same dtype,
     int32 [2]: the (top, left) offset of the image inside it).
  """
  size = tf.shape(images)[1:3]
  target = tf.maximum(size, tf.constant([height, width], tf.int32))
  before = (target - size) // 2
  rows = _reflect_indices(size[0], before[0], target[0])
  cols = _reflect_indices(size[1], before[1], target[1])
  padded = tf.gather(tf.gather(images, rows, axis=1), cols, axis=2)
  return padded, before


def sliding_window(
  window_fn: WindowFn,
  images: tf.Tensor,
  window: Sequence[int],
  overlap: float = DEFAULT_OVERLAP,
  sigma_scale: float = DEFAULT_SIGMA_SCALE,
  weighting: str = "gaussian",
  windows_per_call: int = DEFAULT_WINDOWS_PER_CALL,
  min_weight: float = MIN_WEIGHT,
) -> Union[Dict[str, tf.Tensor], tf.Tensor]:
  """Applies a fixed-size window function to images of any size and blends the windows.

  Args:
    window_fn: [N, H, W, C] windows (the dtype of `images`, e.g. uint8 for
      `Segmenter.serve_model_size`) -> a dict of [N, H, W, K] maps (or one such tensor), any
      float dtype; called with 1 to `windows_per_call` windows at a time (the last call may get
      fewer), so it must accept a dynamic batch size.
    images: [B, h, w, C], any h and w (dynamic shapes are fine).
    window: (H, W), the size window_fn takes.
    overlap: the fraction of a window neighbours share at least, in [0, 1) (nnU-Net: 0.5).
    sigma_scale: the Gaussian importance map's sigma as a fraction of the window (nnU-Net 1/8).
    weighting: "gaussian" (nnU-Net, MONAI's "gaussian" mode) or "constant" (plain average).
    windows_per_call: the most windows per window_fn call; bounds memory at about that many
      window outputs besides the float32 accumulators of the (padded) batch.
    min_weight: the importance map's floor relative to its peak (see `importance_map`).

  Returns:
    The same structure as window_fn's: float32 [B, h, w, K] each, the weighted mean of every
    window's output at each pixel.

  Raises:
    ConfigError: bad settings, images not of rank 4, or a window_fn output of another
      spatial size than the window (when its shape is known at trace time).
  """
  height, width = check_arguments(
    window, overlap, sigma_scale, weighting, windows_per_call, min_weight
  )
  images = tf.convert_to_tensor(images)
  if images.shape.rank is not None and images.shape.rank != 4:
    raise ConfigError(f"images must be [B, h, w, C], got shape {images.shape}")
  weights = importance_map((height, width), weighting, sigma_scale, min_weight)[None, :, :, None]

  shape = tf.shape(images)
  batch = shape[0]
  padded, offset = reflect_pad(images, height, width)
  padded_size = tf.shape(padded)[1:3]
  starts = tf.stack(
    tf.meshgrid(
      window_starts(padded_size[0], height, overlap),
      window_starts(padded_size[1], width, overlap),
      indexing="ij",
    ),
    axis=-1,
  )
  starts = tf.reshape(starts, [-1, 2])
  # Every (window position, image) pair, the image index running fastest.
  total = tf.shape(starts)[0] * batch
  chunks = (total + windows_per_call - 1) // windows_per_call
  channels = images.shape[-1]
  window_rows = tf.range(height)
  window_cols = tf.range(width)
  bare = []  # set when window_fn returns one tensor, not a dict

  def indices(chunk: tf.Tensor) -> tf.Tensor:
    """[k, H, W, 3] (image, row, column) indices into `padded` of one chunk's windows."""
    pair = tf.range(chunk * windows_per_call, tf.minimum((chunk + 1) * windows_per_call, total))
    image = pair % batch
    start = tf.gather(starts, pair // batch)
    grid = [tf.size(pair), height, width]
    return tf.stack(
      [
        tf.broadcast_to(image[:, None, None], grid),
        tf.broadcast_to((start[:, 0:1] + window_rows[None, :])[:, :, None], grid),
        tf.broadcast_to((start[:, 1:2] + window_cols[None, :])[:, None, :], grid),
      ],
      axis=-1,
    )

  def weighted_outputs(index: tf.Tensor) -> Dict[str, tf.Tensor]:
    windows = tf.ensure_shape(tf.gather_nd(padded, index), [None, height, width, channels])
    outputs = window_fn(windows)
    if not isinstance(outputs, dict):
      bare.append(True)
      outputs = {_BARE: outputs}
    weighted = {}
    for key, value in outputs.items():
      value = tf.convert_to_tensor(value)
      if not value.shape.is_compatible_with([None, height, width, None]):
        raise ConfigError(
          f"window_fn output {key!r} must be [N, {height}, {width}, K], got shape {value.shape}"
        )
      weighted[key] = tf.cast(value, tf.float32) * weights
    return weighted

  # The first chunk runs outside the loop: its outputs give the accumulators' keys and channels.
  first = indices(tf.constant(0))
  first_outputs = weighted_outputs(first)
  frame = [batch, padded_size[0], padded_size[1]]
  sums = {
    key: tf.tensor_scatter_nd_add(
      tf.zeros(tf.stack([*frame, tf.shape(value)[3]]), tf.float32), first, value
    )
    for key, value in first_outputs.items()
  }
  weight_grid = [tf.shape(first)[0], height, width, 1]
  total_weight = tf.tensor_scatter_nd_add(
    tf.zeros(tf.stack([*frame, 1]), tf.float32), first, tf.broadcast_to(weights, weight_grid)
  )

  def body(chunk, sums, total_weight):
    index = indices(chunk)
    # Overlapping windows of one chunk give duplicate indices: tensor_scatter_nd_add sums them.
    outputs = weighted_outputs(index)
    sums = {key: tf.tensor_scatter_nd_add(sums[key], index, outputs[key]) for key in sums}
    grid = [tf.shape(index)[0], height, width, 1]
    total_weight = tf.tensor_scatter_nd_add(total_weight, index, tf.broadcast_to(weights, grid))
    return chunk + 1, sums, total_weight

  _, sums, total_weight = tf.while_loop(
    lambda chunk, *_: chunk < chunks, body, (tf.constant(1), sums, total_weight)
  )
  results = {}
  for key, value in sums.items():
    mean = (value / total_weight)[
      :, offset[0] : offset[0] + shape[1], offset[1] : offset[1] + shape[2]
    ]
    results[key] = tf.ensure_shape(
      mean, images.shape[:3].concatenate([first_outputs[key].shape[3]])
    )
  return results[_BARE] if bare else results


def count_windows(size: Sequence[int], window: Sequence[int], overlap: float) -> int:
  """How many windows `sliding_window` runs per image of `size` (h, w), e.g. for cost estimates.

  Raises:
    ConfigError: bad window or overlap.
  """
  height, width = check_arguments(window, overlap)
  count = 1
  for extent, length in zip(size, (height, width)):
    count *= math.ceil((max(int(extent), length) - length) / (length * (1.0 - overlap))) + 1
  return count
