"""tf.data pipelines: shapes, epochs, determinism, sharding across input pipelines, eval order."""

import hashlib

import numpy as np
import pytest
import tensorflow as tf

from dunet.data import pipeline, records, splits
from dunet.data.augment import AugmentConfig
from dunet.errors import ConfigError, DataError

NONE = AugmentConfig.none()


def digests(batches, key="image"):
  return [
    hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
    for batch in batches
    for image in np.asarray(batch[key])
  ]


def train_records(data_dir):
  """Digests of every training image, read through the (unshuffled) eval pipeline."""
  return digests(pipeline.make_eval_dataset(data_dir, "train", batch_size=8, preprocessing="unit"))


def test_info_and_counts(demo_prepared):
  info = pipeline.read_data_info(demo_prepared)
  assert (info["height"], info["width"]) == (64, 64)
  assert [pipeline.count_examples(demo_prepared, name) for name in splits.SPLITS] == [32, 4, 4]
  assert pipeline.steps_per_epoch(demo_prepared, 5) == 6


def test_train_batches_shapes_and_binary_masks(demo_prepared):
  dataset = pipeline.make_train_dataset(demo_prepared, global_batch_size=5, epoch=0, seed=1)
  batches = list(dataset.as_numpy_iterator())
  assert len(batches) == 32 // 5
  assert dataset.element_spec["image"].shape == (5, 64, 64, 3)  # static: drop_remainder
  assert dataset.element_spec["mask"].shape == (5, 64, 64, 1)
  for batch in batches:
    assert batch["image"].dtype == np.float32 and batch["mask"].dtype == np.float32
    assert set(np.unique(batch["mask"])) <= {0.0, 1.0}


def test_an_epoch_visits_training_examples_once(demo_prepared):
  epoch = pipeline.make_train_dataset(
    demo_prepared, batch_size=8, preprocessing="unit", augment_config=NONE, epoch=0, seed=1
  )
  seen = digests(epoch.as_numpy_iterator())
  assert len(seen) == 32 and len(set(seen)) == 32
  assert sorted(seen) == sorted(train_records(demo_prepared))


def test_order_depends_only_on_seed_and_epoch(demo_prepared):
  def order(seed, epoch):
    return digests(
      pipeline.make_train_dataset(
        demo_prepared,
        batch_size=8,
        preprocessing="unit",
        augment_config=NONE,
        seed=seed,
        epoch=epoch,
      ).as_numpy_iterator()
    )

  assert order(1, 0) == order(1, 0)
  assert order(1, 0) != order(1, 1)
  assert order(1, 0) != order(2, 0)


@pytest.fixture
def global_seed():
  """Sets TF's global seed (tf.random.set_seed) for one test; the previous one is put back."""
  from tensorflow.python.eager import context  # pylint: disable=g-import-not-at-top

  previous = context.global_seed()
  yield tf.random.set_seed
  tf.random.set_seed(previous)


# A bug found in dunet/data/pipeline.py (reported, not fixed here: not this test file's module):
# `dataset.shuffle(seed=<tensor>)` builds its seed pair from the process's global seed too.
_GLOBAL_SEED_BUG = (
  "pipeline.py one_epoch: Dataset.shuffle's seed pair is (global seed, seed), "
  "so the order follows tf.random.set_seed, and global seed 0 breaks the "
  "endless dataset (TF's get_seed compares the seed tensor with 0 in Python)"
)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=_GLOBAL_SEED_BUG)
def test_order_does_not_depend_on_the_global_seed(demo_prepared, global_seed):
  def order():
    return digests(
      pipeline.make_train_dataset(
        demo_prepared, batch_size=8, preprocessing="unit", augment_config=NONE, seed=1, epoch=0
      ).as_numpy_iterator()
    )

  global_seed(1)
  first = order()
  global_seed(2)
  assert order() == first


@pytest.mark.xfail(
  strict=True, raises=tf.errors.OperatorNotAllowedInGraphError, reason=_GLOBAL_SEED_BUG
)
def test_endless_dataset_with_global_seed_zero(demo_prepared, global_seed):
  global_seed(0)
  dataset = pipeline.make_train_dataset(demo_prepared, batch_size=8, seed=5, epoch=None)
  assert len(list(dataset.take(2).as_numpy_iterator())) == 2


def test_augmentation_is_reproducible(demo_prepared):
  def run(deterministic):
    return list(
      pipeline.make_train_dataset(
        demo_prepared, batch_size=8, seed=3, epoch=2, deterministic=deterministic
      ).as_numpy_iterator()
    )

  first, second = run(True), run(True)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
  assert sorted(digests(run(False))) == sorted(digests(first))  # same examples, any order


def test_endless_dataset_is_the_epochs_in_sequence(demo_prepared, global_seed):
  global_seed(1)  # not 0, whatever an earlier test in this process set (_GLOBAL_SEED_BUG)

  def make(epoch):
    return pipeline.make_train_dataset(demo_prepared, batch_size=8, seed=5, epoch=epoch)

  endless = list(make(None).take(12).as_numpy_iterator())
  by_epoch = [b for e in range(3) for b in make(e).as_numpy_iterator()]
  assert len(by_epoch) == 12
  for a, b in zip(endless, by_epoch):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_input_pipelines_partition_each_epoch(demo_prepared):
  whole = digests(
    pipeline.make_train_dataset(
      demo_prepared, global_batch_size=8, preprocessing="unit", augment_config=NONE, seed=1, epoch=0
    ).as_numpy_iterator()
  )
  parts = []
  for pipeline_id in range(2):
    context = tf.distribute.InputContext(
      num_input_pipelines=2, input_pipeline_id=pipeline_id, num_replicas_in_sync=2
    )
    dataset = pipeline.make_train_dataset(
      demo_prepared,
      global_batch_size=8,
      preprocessing="unit",
      augment_config=NONE,
      seed=1,
      epoch=0,
      input_context=context,
    )
    assert dataset.element_spec["image"].shape[0] == 4  # per-replica batch
    batches = list(dataset.as_numpy_iterator())
    assert len(batches) == 32 // 8  # every pipeline makes the trainer's steps per epoch
    parts.append(digests(batches))
  assert not set(parts[0]) & set(parts[1])
  assert sorted(parts[0] + parts[1]) == sorted(whole)


def test_distribute_datasets_from_function_on_two_devices(demo_prepared):
  devices = [device.name for device in tf.config.list_logical_devices("CPU")][:2]
  if len(devices) < 2:
    pytest.fail("tests/conftest.py should provide two logical CPUs")
  strategy = tf.distribute.MirroredStrategy(devices)
  distributed = strategy.distribute_datasets_from_function(
    lambda context: pipeline.make_train_dataset(
      demo_prepared, global_batch_size=8, seed=1, epoch=0, input_context=context
    )
  )
  steps = 0
  for batch in distributed:
    local = strategy.experimental_local_results(batch["image"])
    assert [tuple(x.shape) for x in local] == [(4, 64, 64, 3)] * 2
    steps += 1
  assert steps == 32 // 8


def test_no_python_functions_in_the_training_graph(demo_prepared, global_seed):
  global_seed(1)  # not 0, whatever an earlier test in this process set (_GLOBAL_SEED_BUG)
  dataset = pipeline.make_train_dataset(demo_prepared, batch_size=8, seed=1)
  graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())
  ops = {node.op for node in graph.node}
  for function in graph.library.function:
    ops |= {node.op for node in function.node_def}
  assert "ParseExampleV2" in ops or "ParseSingleExample" in ops  # the graph is really inspected
  assert not ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}


def test_eval_dataset_is_every_example_once_in_order(demo_prepared):
  split = splits.read_split(demo_prepared / "split.json")
  batches = list(
    pipeline.make_eval_dataset(
      demo_prepared, "valid", batch_size=3, preprocessing="caffe"
    ).as_numpy_iterator()
  )
  assert [len(b["name"]) for b in batches] == [3, 1]
  names = [name.decode() for b in batches for name in b["name"]]
  assert names == split["valid"]
  for batch in batches:
    assert batch["image"].shape[1:] == (64, 64, 3) and batch["mask"].shape[1:] == (64, 64, 1)
    for png, height, width, mask in zip(
      batch["original_mask_png"], batch["original_height"], batch["original_width"], batch["mask"]
    ):
      original = records.decode_mask_png(png)
      assert original.shape == (height, width) == (64, 64)
      np.testing.assert_array_equal(original, mask[..., 0])  # prepared at the raw size


def test_eval_dataset_without_preprocessing_gives_the_prepared_pixels(demo_prepared):
  raw = next(
    iter(pipeline.make_eval_dataset(demo_prepared, "valid", batch_size=2, preprocessing=None))
  )
  unit = next(
    iter(pipeline.make_eval_dataset(demo_prepared, "valid", batch_size=2, preprocessing="unit"))
  )
  assert raw["image"].dtype == tf.uint8
  np.testing.assert_allclose(raw["image"].numpy() / 255.0, unit["image"].numpy(), atol=1e-6)
  np.testing.assert_array_equal(raw["mask"].numpy(), unit["mask"].numpy())


def test_bad_arguments(demo_prepared, tmp_path):
  with pytest.raises(DataError, match="fewer than one batch of 64"):
    pipeline.make_train_dataset(demo_prepared, batch_size=64)
  with pytest.raises(DataError, match=f"{tmp_path}: not a prepared data set"):
    pipeline.make_train_dataset(tmp_path, batch_size=2)
  with pytest.raises(ValueError, match="exactly one of"):
    pipeline.make_train_dataset(demo_prepared, batch_size=2, global_batch_size=2)
  with pytest.raises(ValueError, match="unknown preprocessing"):
    pipeline.make_eval_dataset(demo_prepared, "valid", batch_size=2, preprocessing="bgr")


def test_several_splits_are_pooled(demo_prepared):
  pooled = ["valid", "test"]
  assert pipeline.count_examples(demo_prepared, pooled) == 8
  assert pipeline.shard_files(demo_prepared, pooled) == pipeline.shard_files(
    demo_prepared, "valid"
  ) + pipeline.shard_files(demo_prepared, "test")
  epoch = pipeline.make_train_dataset(
    demo_prepared, batch_size=4, preprocessing="unit", augment_config=NONE, epoch=0, split=pooled
  )
  seen = digests(epoch.as_numpy_iterator())
  union = [
    digest
    for name in pooled
    for digest in digests(
      pipeline.make_eval_dataset(demo_prepared, name, batch_size=8, preprocessing="unit")
    )
  ]
  assert len(seen) == 8 and sorted(seen) == sorted(union)  # each pooled example once

  # One split given as a list is that split, batch for batch.
  def train_epoch(split):
    return digests(
      pipeline.make_train_dataset(
        demo_prepared, batch_size=8, augment_config=NONE, epoch=1, split=split
      ).as_numpy_iterator()
    )

  assert train_epoch(["train"]) == train_epoch("train")


def _offset(window, picture):
  """(top, left) where `window` is found in `picture` (exactly), or None."""
  height, width = window.shape[:2]
  for top in range(picture.shape[0] - height + 1):
    for left in range(picture.shape[1] - width + 1):
      if np.array_equal(picture[top : top + height, left : left + width], window):
        return top, left
  return None


def test_training_crops_are_windows_of_the_examples_in_the_same_order(demo_prepared):
  def epoch(crop_size, augment_config=NONE):
    return list(
      pipeline.make_train_dataset(
        demo_prepared,
        batch_size=8,
        preprocessing="unit",
        augment_config=augment_config,
        seed=4,
        epoch=1,
        crop_size=crop_size,
      ).as_numpy_iterator()
    )

  whole, cropped = epoch(None), epoch((32, 48))
  offsets = []
  for whole_batch, cropped_batch in zip(whole, cropped):
    assert cropped_batch["image"].shape == (8, 32, 48, 3)
    assert cropped_batch["mask"].shape == (8, 32, 48, 1)
    for picture, mask, window, window_mask in zip(
      whole_batch["image"], whole_batch["mask"], cropped_batch["image"], cropped_batch["mask"]
    ):
      top, left = _offset(window, picture)
      # The mask is cut at the image's window.
      np.testing.assert_array_equal(window_mask, mask[top : top + 32, left : left + 48])
      offsets.append((top, left))
  assert len(offsets) == 32 and len(set(offsets)) > 20  # each example its own window
  again = epoch((32, 48))
  for first, second in zip(cropped, again):  # from the seed alone
    np.testing.assert_array_equal(first["image"], second["image"])
  augmented = epoch((32, 48), AugmentConfig())
  assert augmented[0]["image"].shape == (8, 32, 48, 3)
  assert set(np.unique(augmented[0]["mask"])) <= {0.0, 1.0}
  statistics = pipeline.make_statistics_dataset(
    demo_prepared, global_batch_size=8, batches=1, crop_size=(32, 48)
  )
  assert statistics.element_spec["image"].shape == (8, 32, 48, 3)
  with pytest.raises(ConfigError, match="a 80x48 crop does not fit the 64x64 images"):
    pipeline.make_train_dataset(demo_prepared, batch_size=8, crop_size=(80, 48))
