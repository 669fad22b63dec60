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

Shards are named `{split}-{index:05d}-of-{count:05d}.tfrecord`; summary.json lists them (with
their sizes, record counts and SHA-256 digests at preparation; see `dunet.data.prepare`).

Damaged shards: TensorFlow reports a corrupt record as "corrupted record at <byte>" without the
file's name, and silently drops a final record whose header was cut off. `check_shard` reads one
shard completely and says what is wrong with it; `find_corrupt_shard` finds the first bad shard of
a list; `name_read_errors` wraps any iteration over records (a tf.data pipeline) so that a read
error becomes a `DataError` naming the damaged shard:

  for batch in records.name_read_errors(dataset, pipeline.shard_files(data_dir, "test")):
    ...
"""

from __future__ import annotations

import contextlib
import re
import struct
from typing import Dict, Iterable, Iterator, NamedTuple, Optional, Sequence, TypeVar

import cv2
import numpy as np
import tensorflow as tf

from dunet.errors import DataError

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
  ok, buffer = cv2.imencode(
    ".png", np.ascontiguousarray(pixels), [cv2.IMWRITE_PNG_COMPRESSION, _PNG_LEVEL]
  )
  if not ok:
    raise RuntimeError(f"PNG encoding failed for an array of shape {pixels.shape}")
  return buffer.tobytes()


def serialize_example(
  *,
  name: str,
  source: str,
  image: np.ndarray,
  mask: np.ndarray,
  original_height: int,
  original_width: int,
  original_mask: Optional[np.ndarray] = None,
) -> bytes:
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


def decode_image_and_mask(
  features: Dict[str, tf.Tensor], height: int, width: int
) -> Dict[str, tf.Tensor]:
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
    raise DataError(
      "<record>", "this record has no original-resolution mask (training records do not keep one)"
    )
  mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
  if mask is None:
    raise DataError("<record>", "cannot decode the mask PNG")
  return mask


# ------------------------------------------------------------------------------------------------
# Damaged shards
# ------------------------------------------------------------------------------------------------
class ShardReport(NamedTuple):
  """What `check_shard` found: the records read in full, and the problem (None: intact)."""

  records: int
  problem: Optional[str]


def check_shard(path: str) -> ShardReport:
  """Reads a TFRecord shard completely and checks it.

  Every record's checksums (as TensorFlow reads them), that every record parses as a dunet example
  whose image and mask PNGs decode, and that the file ends exactly after its last record. Reads
  and decodes the whole file: meant for when something already went wrong, or for an explicit
  verification, not for every start-up.

  Args:
    path: a shard file.

  Returns:
    ShardReport(records, problem): `problem` names the record (0-based) and what is wrong, or is
    None when the shard is intact.
  """

  def decode(serialized):
    features = parse_example(serialized)
    image = tf.io.decode_png(features["image_png"], channels=3)
    mask = tf.io.decode_png(features["mask_png"], channels=1)
    return tf.size(image) + tf.size(mask)

  count = 0
  try:
    for _ in tf.data.TFRecordDataset(path).map(decode):
      count += 1
  except tf.errors.OpError as error:
    return ShardReport(count, f"record {count}: {_short_message(error)}")
  return ShardReport(count, _framing_problem(path, count))


def _framing_problem(path: str, records: int) -> Optional[str]:
  """Checks that the file ends after its last record (TF ignores a cut-off final header).

  The record lengths were already verified by their checksums while reading.
  """
  size = tf.io.gfile.stat(path).length
  offset = 0
  with tf.io.gfile.GFile(path, "rb") as handle:
    for _ in range(records):
      handle.seek(offset)
      (length,) = struct.unpack("<Q", handle.read(8))
      offset += length + 16  # length (8), its checksum (4), data, data checksum (4)
  if offset != size:
    return (
      f"truncated: {size - offset} stray bytes after record {records - 1} (byte {offset}) "
      "are the start of a record cut off"
    )
  return None


def find_corrupt_shard(paths: Sequence[str]) -> Optional[DataError]:
  """Checks `paths` in order (see `check_shard`); a DataError naming the first damaged one.

  Returns:
    The error to raise, or None when every shard is intact.
  """
  for path in paths:
    report = check_shard(path)
    if report.problem:
      return DataError(
        path,
        f"corrupt TFRecord shard ({report.problem}): prepare the data "
        "again (dunet-prepare --overwrite)",
      )
  return None


Item = TypeVar("Item")


def name_read_errors(items: Iterable[Item], shard_paths: Sequence[str]) -> Iterator[Item]:
  """Yields from `items` (e.g. a tf.data pipeline over `shard_paths`) unchanged.

  When iterating raises a TensorFlow error, the shards are checked: a damaged one is reported as
  a DataError naming it (raised from the original error); otherwise the original error is
  re-raised as it was.

  Args:
    items: any iterable whose iteration reads `shard_paths`.
    shard_paths: the files it reads.

  Yields:
    The items of `items`.

  Raises:
    DataError: naming the damaged shard.
  """
  iterator = iter(items)
  while True:
    try:
      with naming_read_errors(shard_paths):
        item = next(iterator)
    except StopIteration:
      return
    yield item


@contextlib.contextmanager
def naming_read_errors(shard_paths: Sequence[str]) -> Iterator[None]:
  """Within this block, a TensorFlow error is checked against `shard_paths` as in
  `name_read_errors`: a damaged shard becomes a DataError naming it, anything else is re-raised.

  For code that reads the shards where no Python iteration shows (a training loop inside one
  tf.function taking the iterator).
  """
  try:
    yield
  except tf.errors.OpError as error:
    found = find_corrupt_shard(shard_paths)
    if found is None:
      raise
    raise found from error


def _short_message(error: tf.errors.OpError) -> str:
  """A TF error's message without the op decorations ({{function_node ...}}, [Op:...])."""
  message = re.sub(r"\{\{[^}]*\}\}\s*", "", error.message or str(error))
  return message.split(" [Op:")[0].strip()


def _bytes(value: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
