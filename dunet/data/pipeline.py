"""tf.data input pipelines over prepared TFRecords: pure TF ops from file to batch.

Training (`make_train_dataset`): the epoch's order is a function of (seed, epoch) only: shard
files are shuffled statelessly, interleaved in a fixed order, shuffled through a seeded buffer,
and numbered; example i of epoch e is augmented with the seed fold_in(fold_in(seed, e), i). With
several input pipelines (`tf.distribute` workers) every pipeline draws the same order and keeps
every n-th example, so the epoch is partitioned between them and each pipeline yields exactly
the trainer's steps per epoch. Batches have static shapes (drop_remainder=True) for XLA.
Training may draw from several prepared splits at once (the other folds of a cross-validation
fold): their shard files are pooled. With `crop_size`, each example is first cut to a random
window (`augment.random_crop`, seeded by the example's augmentation seed).

Evaluation (`make_eval_dataset`): every example of a split once, in file order, unaugmented.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import tensorflow as tf

from dunet.data import augment as augment_lib
from dunet.data import prepare, preprocess, records
from dunet.errors import ConfigError
from dunet.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]
# One prepared split ("train"), or several whose examples are pooled (["fold_1", "fold_2"]).
Splits = Union[str, Sequence[str]]
DEFAULT_SHUFFLE_BUFFER = 1024
# Seed streams derived from the user's seed, so that order and augmentation are independent.
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1
# Records read from this many shard files at once.
_INTERLEAVE = 4


def read_data_info(data_dir: PathLike) -> dict:
  """The summary of a prepared data folder (height, width, counts, layout, raw_dir, ...)."""
  return prepare.read_summary(data_dir)


def _split_names(split: Splits) -> List[str]:
  """[split] for one name, the names for several (at least one)."""
  names = [split] if isinstance(split, str) else list(split)
  if not names:
    raise ValueError("no split given")
  return names


def count_examples(data_dir: PathLike, split: Splits) -> int:
  """Examples in a prepared split (or the sum over several), from summary.json."""
  counts = read_data_info(data_dir)["counts"]
  total = 0
  for name in _split_names(split):
    if name not in counts:
      raise ValueError(f"unknown split {name!r}; expected one of {sorted(counts)}")
    total += int(counts[name])
  return total


def steps_per_epoch(data_dir: PathLike, global_batch_size: int, split: Splits = "train") -> int:
  """Full global batches in one epoch (the remainder is dropped, as the training dataset does)."""
  return count_examples(data_dir, split) // global_batch_size


def shard_files(data_dir: PathLike, split: Splits) -> List[str]:
  """The split's TFRecord files (several splits': one after the other), as listed in
  summary.json; each must exist."""
  info = read_data_info(data_dir)
  files = []
  for name in _split_names(split):
    if name not in info["splits"]:
      raise ValueError(f"unknown split {name!r}; expected one of {sorted(info['splits'])}")
    files += [os.path.join(os.fspath(data_dir), shard) for shard in info["splits"][name]["shards"]]
  for path in files:
    if not tf.io.gfile.exists(path):
      raise DataError(path, "record file listed in summary.json is missing: prepare the data again")
  return files


def make_train_dataset(
  data_dir: PathLike,
  *,
  global_batch_size: Optional[int] = None,
  batch_size: Optional[int] = None,
  preprocessing: str = "reference",
  augment_config: Optional[augment_lib.AugmentConfig] = None,
  seed: int = 42,
  epoch: Optional[int] = None,
  deterministic: bool = True,
  input_context: Optional[tf.distribute.InputContext] = None,
  shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
  split: Splits = "train",
  crop_size: Optional[Tuple[int, int]] = None,
) -> tf.data.Dataset:
  """Shuffled, augmented, batched training examples.

  Args:
    data_dir: a prepared folder.
    global_batch_size: examples per step over all replicas (or give `batch_size`, same meaning).
    batch_size: alias of `global_batch_size`.
    preprocessing: one of `dunet.data.preprocess.PREPROCESSING`.
    augment_config: what to augment; None: the defaults; `AugmentConfig.none()`: nothing.
    seed: seeds the order and the augmentation.
    epoch: yield this one epoch (steps_per_epoch batches per replica); None: all epochs from 0 on,
      forever, epoch after epoch exactly as separate calls would give them.
    deterministic: keep the order of parallel map results (reproducible); False may be faster.
    input_context: from `strategy.distribute_datasets_from_function`: this pipeline gets its share
      of each epoch, in per-replica batches.
    shuffle_buffer: records in the shuffle buffer (data sets larger than this are also shuffled
      by shard file order).
    split: the prepared split to train on, or several (their examples pooled: the union of their
      shard files, their counts summed).
    crop_size: (height, width): each example is cut to a random window of this size before it is
      augmented (`augment.random_crop`); None: whole prepared images.

  Returns:
    Batches {"image": float32 [B, H, W, 3], "mask": float32 [B, H, W, 1] in {0, 1}}, with B the
    per-replica batch size and H x W the prepared size (the crop size with `crop_size`).

  Raises:
    DataError: the folder is not prepared, or holds fewer examples than one global batch.
    ConfigError: a crop larger than the prepared images.
  """
  if (global_batch_size is None) == (batch_size is None):
    raise ValueError("give exactly one of global_batch_size and batch_size")
  global_batch_size = global_batch_size or batch_size
  if global_batch_size <= 0:
    raise ValueError(f"batch size must be positive, got {global_batch_size}")
  if shuffle_buffer <= 0:
    raise ValueError(f"shuffle_buffer must be positive, got {shuffle_buffer}")
  if preprocessing not in preprocess.PREPROCESSING:
    raise ValueError(
      f"unknown preprocessing {preprocessing!r}; expected one of {preprocess.PREPROCESSING}"
    )
  config = augment_config if augment_config is not None else augment_lib.AugmentConfig()
  info = read_data_info(data_dir)
  height, width = int(info["height"]), int(info["width"])
  if crop_size is not None:
    crop_height, crop_width = (int(size) for size in crop_size)
    if not (0 < crop_height <= height and 0 < crop_width <= width):
      raise ConfigError(
        f"a {crop_height}x{crop_width} crop does not fit the {height}x{width} images of {data_dir}"
      )
  files = shard_files(data_dir, split)
  steps = count_examples(data_dir, split) // global_batch_size
  if steps == 0:
    described = split if isinstance(split, str) else "+".join(split)
    raise DataError(
      data_dir,
      f"the {described} split has {count_examples(data_dir, split)} "
      f"examples, fewer than one batch of {global_batch_size}",
    )

  if input_context is None:
    pipelines, pipeline_id, per_replica_batch = 1, 0, global_batch_size
    replicas_per_pipeline = 1
  else:
    pipelines, pipeline_id = input_context.num_input_pipelines, input_context.input_pipeline_id
    per_replica_batch = input_context.get_per_replica_batch_size(global_batch_size)
    replicas_per_pipeline = input_context.num_replicas_in_sync // pipelines
  examples_per_pipeline = steps * per_replica_batch * replicas_per_pipeline

  order_seed = tf.constant([seed, _ORDER_STREAM], tf.int64)
  augment_seed = tf.constant([seed, _AUGMENT_STREAM], tf.int64)

  def load(epoch_index, index, serialized) -> Dict[str, tf.Tensor]:
    example = records.decode_image_and_mask(records.parse_example(serialized), height, width)
    image, mask = example["image"], tf.cast(example["mask"], tf.float32)
    if config.enabled or crop_size is not None:
      example_seed = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(augment_seed, epoch_index), index
      )
    if crop_size is not None:
      # Cropped first, so that the augmentations (resampling, elastic field, colour) work on
      # the window only: their cost is per output pixel. The crop's seed is derived from the
      # example's seed (`random_crop`), so the augmentations draw what they would uncropped.
      image, mask = augment_lib.random_crop(image, mask, crop_size, example_seed)
    if config.enabled:
      image, mask = augment_lib.augment(image, mask, config, example_seed)
    return {"image": preprocess.preprocess(image, preprocessing), "mask": mask}

  def one_epoch(epoch_index) -> tf.data.Dataset:
    epoch_index = tf.cast(epoch_index, tf.int64)
    epoch_seed = tf.random.experimental.stateless_fold_in(order_seed, epoch_index)
    file_seed, buffer_seed = tf.unstack(tf.random.experimental.stateless_split(epoch_seed, 2))
    shuffled_files = tf.random.experimental.stateless_shuffle(tf.constant(files), file_seed)
    dataset = tf.data.Dataset.from_tensor_slices(shuffled_files).interleave(
      tf.data.TFRecordDataset,
      cycle_length=min(len(files), _INTERLEAVE),
      block_length=1,
      num_parallel_calls=min(len(files), _INTERLEAVE),
      deterministic=True,
    )
    dataset = dataset.shuffle(shuffle_buffer, seed=buffer_seed[0], reshuffle_each_iteration=False)
    dataset = dataset.enumerate()
    if pipelines > 1:
      dataset = dataset.shard(pipelines, pipeline_id)
    dataset = dataset.take(examples_per_pipeline)
    return dataset.map(
      lambda index, serialized: load(epoch_index, index, serialized),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=deterministic,
    )

  if epoch is None:
    dataset = tf.data.Dataset.range(2**62).flat_map(one_epoch)
  else:
    dataset = one_epoch(tf.constant(epoch, tf.int64))
  dataset = dataset.batch(per_replica_batch, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = deterministic
  return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def make_statistics_dataset(
  data_dir: PathLike,
  *,
  global_batch_size: int,
  batches: int,
  preprocessing: str = "reference",
  seed: int = 42,
  input_context: Optional[tf.distribute.InputContext] = None,
  shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
  split: Splits = "train",
  crop_size: Optional[Tuple[int, int]] = None,
) -> tf.data.Dataset:
  """Training batches to recompute BatchNorm statistics from (dunet/precise_bn.py).

  The first `batches` batches of epoch 0's training order, unaugmented: the same every time
  (a resumed run recomputes exactly what an uninterrupted one did), a random sample of the
  training images, as the validation and test images are (not augmented). At most one epoch.
  `split` and `crop_size` as `make_train_dataset`'s: a run trained on crops gets its statistics
  from crops of the same size (the pictures its batch statistics came from in training, and the
  window tiled inference feeds it), still drawn from the seed alone.

  Returns:
    Batches {"image", "mask"} as `make_train_dataset` yields them.
  """
  if batches <= 0:
    raise ValueError(f"batches must be positive, got {batches}")
  return make_train_dataset(
    data_dir,
    global_batch_size=global_batch_size,
    preprocessing=preprocessing,
    augment_config=augment_lib.AugmentConfig.none(),
    seed=seed,
    epoch=0,
    input_context=input_context,
    shuffle_buffer=shuffle_buffer,
    split=split,
    crop_size=crop_size,
  ).take(batches)


def make_eval_dataset(
  data_dir: PathLike, split: str, *, batch_size: int, preprocessing: Optional[str] = "reference"
) -> tf.data.Dataset:
  """Every example of a split once, in file order, not augmented.

  Args:
    data_dir: a prepared folder.
    split: "valid", "test" (or "train").
    batch_size: examples per batch; the last batch may be smaller.
    preprocessing: one of `dunet.data.preprocess.PREPROCESSING`; None: "image" is the prepared
      uint8 RGB picture itself (for dunet.serving, which preprocesses on its own).

  Returns:
    Batches {"image": float32 [B, H, W, 3] (uint8 when `preprocessing` is None),
    "mask": float32 [B, H, W, 1] at the prepared size,
    "name": string [B], "original_mask_png": string [B] (PNG, one channel, values {0, 1}; empty
    for training records; decode with tf.io.decode_png or `records.decode_mask_png`),
    "original_height": int64 [B], "original_width": int64 [B]}.
  """
  if batch_size <= 0:
    raise ValueError(f"batch size must be positive, got {batch_size}")
  if preprocessing is not None and preprocessing not in preprocess.PREPROCESSING:
    raise ValueError(
      f"unknown preprocessing {preprocessing!r}; expected one of {preprocess.PREPROCESSING} or None"
    )
  info = read_data_info(data_dir)
  height, width = int(info["height"]), int(info["width"])

  def load(serialized) -> Dict[str, tf.Tensor]:
    features = records.parse_example(serialized)
    example = records.decode_image_and_mask(features, height, width)
    image = example["image"]
    return {
      "image": image if preprocessing is None else preprocess.preprocess(image, preprocessing),
      "mask": tf.cast(example["mask"], tf.float32),
      "name": features["name"],
      "original_mask_png": features["original_mask_png"],
      "original_height": features["original_height"],
      "original_width": features["original_width"],
    }

  dataset = tf.data.TFRecordDataset(shard_files(data_dir, split))
  dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
