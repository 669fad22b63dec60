"""Damaged record shards are found and named: truncated (also where TensorFlow itself stays
silent), flipped bytes, undecodable pictures; read errors of a pipeline name the shard."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from dunet.data import pipeline, records
from dunet.errors import DataError


@pytest.fixture
def shards(demo_prepared, tmp_path) -> Path:
  """A private copy of the shared prepared demo set (the tests damage it)."""
  copy = tmp_path / "prepared"
  shutil.copytree(demo_prepared, copy)
  return copy


def _records_in(path):
  return sum(1 for _ in tf.data.TFRecordDataset(str(path)))


def test_an_intact_shard_passes(shards):
  path = shards / "train-00000-of-00002.tfrecord"
  assert records.check_shard(str(path)) == (_records_in(path), None)
  assert records.find_corrupt_shard(pipeline.shard_files(shards, "train")) is None


def test_a_record_cut_in_its_data_is_named(shards):
  path = shards / "train-00001-of-00002.tfrecord"
  path.write_bytes(path.read_bytes()[:-100])
  count, problem = records.check_shard(str(path))
  assert "truncated record at" in problem and problem.startswith(f"record {count}:")
  error = records.find_corrupt_shard(pipeline.shard_files(shards, "train"))
  assert error.path == str(path) and "corrupt TFRecord shard" in str(error)


def test_a_cut_off_header_is_found_although_tensorflow_ignores_it(shards):
  path = shards / "train-00000-of-00002.tfrecord"
  full = path.read_bytes()
  length = int(np.frombuffer(full[:8], "<u8")[0]) + 16  # first record: header, data, checksum
  records_before = _records_in(path)
  path.write_bytes(full + full[:6])  # a second copy of the first record, cut after 6 bytes
  assert _records_in(path) == records_before  # TensorFlow reads on as if nothing were wrong
  count, problem = records.check_shard(str(path))
  assert count == records_before
  assert problem == (
    f"truncated: 6 stray bytes after record {count - 1} (byte {len(full)}) are "
    "the start of a record cut off"
  )
  assert length < len(full)


def test_a_flipped_byte_is_named(shards):
  path = Path(pipeline.shard_files(shards, "valid")[0])
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0x01
  path.write_bytes(bytes(raw))
  _, problem = records.check_shard(str(path))
  assert "corrupted record at" in problem


def test_a_picture_that_does_not_decode_is_named(tmp_path):
  path = tmp_path / "bad.tfrecord"
  good = np.zeros([4, 4, 3], np.uint8)
  with tf.io.TFRecordWriter(str(path)) as writer:
    writer.write(
      records.serialize_example(
        name="a",
        source="a.png",
        image=good,
        mask=good[:, :, 0],
        original_height=4,
        original_width=4,
      )
    )
    example = tf.train.Example.FromString(
      records.serialize_example(
        name="b",
        source="b.png",
        image=good,
        mask=good[:, :, 0],
        original_height=4,
        original_width=4,
      )
    )
    example.features.feature["image_png"].bytes_list.value[0] = b"not a png"
    writer.write(example.SerializeToString())
  count, problem = records.check_shard(str(path))
  assert count == 1 and problem.startswith("record 1:")


def test_read_errors_of_a_pipeline_name_the_shard(shards):
  path = Path(pipeline.shard_files(shards, "valid")[0])
  raw = bytearray(path.read_bytes())
  raw[100] ^= 0xFF
  path.write_bytes(bytes(raw))
  dataset = pipeline.make_eval_dataset(shards, "valid", batch_size=2)
  with pytest.raises(tf.errors.DataLossError):
    list(dataset)  # what TensorFlow says: no file name
  with pytest.raises(DataError, match=f"^{path}: corrupt TFRecord shard") as raised:
    list(records.name_read_errors(dataset, pipeline.shard_files(shards, "valid")))
  assert isinstance(raised.value.__cause__, tf.errors.DataLossError)


def test_other_errors_pass_through_unchanged(shards):

  def failing():
    yield 1
    raise tf.errors.InvalidArgumentError(None, None, "not about the data")

  items = records.name_read_errors(failing(), pipeline.shard_files(shards, "train"))
  assert next(items) == 1
  with pytest.raises(tf.errors.InvalidArgumentError, match="not about the data"):
    next(items)
  assert list(records.name_read_errors([1, 2], [])) == [1, 2]
