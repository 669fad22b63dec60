"""The TFRecord format of prepared data: one tf.train.Example per image, PNG inside (lossless).

Features of every record:
  name             bytes  the example's stem (unique within its split)
  source           bytes  the image file, relative to the raw folder it came from
  image_png        bytes  RGB uint8 at the prepared size (height x width)
  mask_png         bytes  one channel, values {0, 1}, at the prepared size
  height, width    int64  the prepared size
  original_height  int64  the raw image's size
  original_width   int64
Validation and test records also hold
  original_mask_png bytes one channel, values {0, 1}, at the original size (scores are computed
                          there); empty in training records.

Shards are named `{split}-{index:05d}-of-{count:05d}.tfrecord`; summary.json lists them.
"""

from __future__ import annotations

from typing import Dict, Optional

import cv2
import numpy as np
import tensorflow as tf

from dunet.data.errors import DataError

# Fast PNG compression: records are written once and decoded every epoch; level 1 is ~3x faster
# to write than the default and decodes at the same speed.
_PNG_LEVEL = 1

FEATURES = {
    "name": tf.io.FixedLenFeature([], tf.string),
    "source": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "image_png": tf.io.FixedLenFeature([], tf.string),
    "mask_png": tf.io.FixedLenFeature([], tf.string),
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
    "original_height": tf.io.FixedLenFeature([], tf.int64),
    "original_width": tf.io.FixedLenFeature([], tf.int64),
    "original_mask_png": tf.io.FixedLenFeature([], tf.string, default_value=""),
}


def shard_name(split: str, index: int, count: int) -> str:
  """`train-00000-of-00004.tfrecord`."""
  return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def encode_png(pixels: np.ndarray) -> bytes:
  """PNG bytes of a uint8 [H, W] or RGB [H, W, 3] array (RGB order, as TF decodes it)."""
  if pixels.ndim == 3:
    pixels = pixels[:, :, ::-1]  # OpenCV writes BGR
  ok, buffer = cv2.imencode(".png", np.ascontiguousarray(pixels),
                            [cv2.IMWRITE_PNG_COMPRESSION, _PNG_LEVEL])
  if not ok:
    raise RuntimeError(f"PNG encoding failed for an array of shape {pixels.shape}")
  return buffer.tobytes()


def serialize_example(*, name: str, source: str, image: np.ndarray, mask: np.ndarray,
                      original_height: int, original_width: int,
                      original_mask: Optional[np.ndarray] = None) -> bytes:
  """A serialized tf.train.Example.

  Args:
    name: the stem.
    source: the image file relative to its raw folder.
    image: uint8 RGB [height, width, 3] at the prepared size.
    mask: uint8 {0, 1} [height, width] at the prepared size.
    original_height: the raw image's height.
    original_width: the raw image's width.
    original_mask: uint8 {0, 1} [original_height, original_width], for validation and test.

  Returns:
    The bytes to write into a TFRecord file.
  """
  height, width = mask.shape
  features = {
      "name": _bytes(name.encode()),
      "source": _bytes(source.encode()),
      "image_png": _bytes(encode_png(image)),
      "mask_png": _bytes(encode_png(mask)),
      "height": _int(height),
      "width": _int(width),
      "original_height": _int(original_height),
      "original_width": _int(original_width),
  }
  if original_mask is not None:
    features["original_mask_png"] = _bytes(encode_png(original_mask))
  return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def parse_example(serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
  """Parses one serialized record into its raw features (nothing decoded). TF ops only."""
  return tf.io.parse_single_example(serialized, FEATURES)


def decode_image_and_mask(features: Dict[str, tf.Tensor], height: int,
                          width: int) -> Dict[str, tf.Tensor]:
  """Decodes the prepared image (uint8 [H, W, 3]) and mask (uint8 [H, W, 1] in {0, 1}).

  `height` and `width` (from summary.json) give the decoded tensors static shapes.
  """
  image = tf.io.decode_png(features["image_png"], channels=3)
  mask = tf.io.decode_png(features["mask_png"], channels=1)
  image = tf.ensure_shape(image, [height, width, 3])
  mask = tf.ensure_shape(mask, [height, width, 1])
  return {"image": image, "mask": mask}


def decode_mask_png(png: bytes) -> np.ndarray:
  """A mask PNG from a record (e.g. `original_mask_png`) as uint8 {0, 1} [H, W] (numpy)."""
  if not png:
    raise DataError("<record>", "this record has no original-resolution mask (training records "
                    "do not keep one)")
  mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
  if mask is None:
    raise DataError("<record>", "cannot decode the mask PNG")
  return mask


def _bytes(value: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
