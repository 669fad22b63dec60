"""dunet/trainer.py: the input checks, N training steps, and a validation on a tiny model."""

import os

import numpy as np
import pytest
import tensorflow as tf

from dunet import precision
from dunet import trainer as trainer_lib
from dunet.config import TrainConfig
from dunet.data import demo
from dunet.data import pipeline
from dunet.data.augment import AugmentConfig
from dunet.errors import ConfigError
from dunet.errors import DataError
from tests.tiny_net import TinyNet

SIZE = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """24 demo pictures at 32x32: 20 train (5 steps of 4), 2 valid, 2 test."""
  return demo.ensure_demo_data(
    tmp_path_factory.mktemp("demo"), count=24, height=SIZE, width=SIZE, seed=1
  )


def _config(data_dir, **settings):
  defaults = dict(
    data_dir=str(data_dir),
    batch_size=4,
    epochs=2,
    preprocessing="unit",
    augment=AugmentConfig.none(),
    precision="float32",
    lr_schedule="constant",
    seed=7,
  )
  return TrainConfig().updated(**dict(defaults, **settings))


def _trainer(config):
  tf.random.set_seed(config.seed)
  return trainer_lib.Trainer(
    config,
    trainer_lib.check_inputs(config),
    tf.distribute.get_strategy(),
    precision.Policy("float32"),
    make_model=TinyNet,
  )


def test_check_inputs_counts_steps_and_names_problems(data_dir, tmp_path):
  data = trainer_lib.check_inputs(_config(data_dir, max_steps=7))
  assert (data.height, data.width, data.train_examples, data.steps_per_epoch, data.total_steps) == (
    SIZE,
    SIZE,
    20,
    5,
    7,
  )
  with pytest.raises(ConfigError, match="fewer than --batch_size=32"):
    trainer_lib.check_inputs(_config(data_dir, batch_size=32))
  with pytest.raises(ConfigError, match="differ from the prepared data"):
    trainer_lib.check_inputs(_config(data_dir, height=64, width=64))
  with pytest.raises(DataError, match=f"^{tmp_path}: no prepared data"):
    trainer_lib.check_inputs(_config(tmp_path))


def test_train_runs_n_steps_and_stops_when_asked(data_dir):
  trainer = _trainer(_config(data_dir))
  results = trainer.train(3)
  assert [step for step, _ in results] == [1, 2, 3] and trainer.step == 3
  assert all(np.isfinite(m["loss/total"]) and m["update_applied"] == 1.0 for _, m in results)
  assert len(trainer.train(10, should_stop=lambda: True)) == 1 and trainer.step == 4


def _state(trainer):
  """Every number a step changes: the model (weights and BatchNorm statistics), the optimizer's
  slots and step count, the learning rate."""
  return [v.numpy() for v in (*trainer.model.variables, *trainer.optimizer.variables)]


@pytest.mark.parametrize("replicas", [1, 2])
def test_steps_per_loop_computes_exactly_what_one_step_per_call_does(data_dir, replicas):
  """7 steps with a warm-up + cosine schedule and augmentation: one step per call, against loops
  of 3 (calls of 3, 2 up to the epoch's end at step 5, then 2): the same measurements at the
  steps both report, and the same weights, statistics and optimizer state, bit for bit."""
  config = _config(
    data_dir,
    lr_schedule="cosine",
    warmup_steps=2,
    max_steps=7,
    augment=AugmentConfig(),
  )
  strategy = (
    tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    if replicas > 1
    else tf.distribute.get_strategy()
  )

  def run(steps_per_loop):
    looped = config.updated(steps_per_loop=steps_per_loop)
    tf.random.set_seed(config.seed)
    with strategy.scope():
      trainer = trainer_lib.Trainer(
        looped,
        trainer_lib.check_inputs(looped),
        strategy,
        precision.Policy("float32"),
        make_model=TinyNet,
      )
    return trainer, dict(trainer.train(7))

  one_by_one, every_step = run(1)
  looped, per_call = run(3)
  assert sorted(every_step) == list(range(1, 8)) and sorted(per_call) == [3, 5, 7]
  assert looped.train_loop_function is not None and looped.step == one_by_one.step == 7
  for step, measured in per_call.items():
    assert measured == every_step[step], step
  for got, want in zip(_state(looped), _state(one_by_one)):
    np.testing.assert_array_equal(got, want)


def test_a_non_finite_step_ends_the_call(data_dir):
  trainer = _trainer(_config(data_dir))
  real_function, calls = trainer.train_function, []

  def diverging(batch):
    measured = dict(real_function(batch))
    calls.append(len(calls))
    if len(calls) == 2:  # the second step "diverges"
      measured["loss/total"] = tf.constant(float("nan"))
      measured["update_applied"] = tf.constant(0.0)
    return measured

  trainer.train_function = diverging
  results = trainer.train(5)
  # The controller sees the bad step before any further step runs.
  assert len(results) == 2 and len(calls) == 2 and np.isnan(results[-1][1]["loss/total"])


def test_evaluate_recomputes_statistics_then_scores_the_validation_set(data_dir):
  trainer = _trainer(
    _config(data_dir, batch_norm_statistics="precise", precise_bn_batches=2, loss="bce")
  )
  trainer.train(2)
  seen = []
  values = trainer.evaluate(on_first_batch=lambda batch, result: seen.append(batch))
  # The recomputed statistics are the population moments of training batches, not the moving
  # averages (momentum 0.99 after 2 steps: still near their initial 0 and 1).
  assert np.abs(trainer.model.bn.moving_mean.numpy()).max() > 0.01
  # Losses and DSC recomputed independently, in numpy, from the model's outputs.
  valid = next(
    iter(pipeline.make_eval_dataset(data_dir, "valid", batch_size=4, preprocessing="unit"))
  )
  assert len(seen) == 1 and seen[0]["image"].shape[0] == 2
  outputs = [
    logits.numpy().astype(np.float64) for logits in trainer.model(valid["image"], is_training=False)
  ]
  masks = valid["mask"].numpy() >= 0.5
  bce = [np.mean(np.maximum(x, 0) - x * masks + np.log1p(np.exp(-np.abs(x)))) for x in outputs]
  np.testing.assert_allclose(values["loss/total"], sum(bce), rtol=1e-5)
  predicted = 1.0 / (1.0 + np.exp(-outputs[1])) >= 0.5
  tp = (predicted & masks).sum(axis=(1, 2, 3))
  wrong = (predicted ^ masks).sum(axis=(1, 2, 3))
  dsc = np.where(2 * tp + wrong > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 1.0)
  np.testing.assert_allclose(values["head2/per_image/dsc"], dsc.mean(), rtol=1e-6)
  assert {"head1/pooled/iou", "loss/head1", "loss/head2"} <= set(values)


@pytest.fixture(scope="module")
def folds_dir(data_dir):
  """The same 24 pictures (seed 1) prepared in 3 folds: 8, 7 and 7 images, 2 test."""
  return demo.ensure_demo_data(
    os.path.dirname(data_dir), count=24, height=SIZE, width=SIZE, seed=1, folds=3
  )


def test_check_inputs_picks_the_fold_splits_and_the_crop(data_dir, folds_dir):
  data = trainer_lib.check_inputs(_config(folds_dir, fold=1, crop_height=16))
  assert (data.train_splits, data.valid_split, data.fold, data.folds) == (
    ("fold_0", "fold_2"),
    "fold_1",
    1,
    3,
  )
  assert (data.train_examples, data.steps_per_epoch) == (15, 3)  # 8 + 7 images, batches of 4
  assert (data.height, data.width, data.crop_size) == (SIZE, SIZE, (16, SIZE))
  assert (data.input_height, data.input_width) == (16, SIZE)
  plain = trainer_lib.check_inputs(_config(data_dir))
  assert (plain.train_splits, plain.valid_split, plain.crop_size, plain.folds) == (
    ("train",),
    "valid",
    None,
    0,
  )
  assert (plain.input_height, plain.input_width) == (SIZE, SIZE)
  # --demo --fold=k prepares the demo data in --demo_folds folds, beside the plain demo data.
  on_demo = trainer_lib.check_inputs(
    _config(
      os.path.dirname(data_dir), demo=True, demo_count=24, height=SIZE, width=SIZE, seed=1, fold=2
    ).updated(demo_folds=3)
  )
  assert (on_demo.data_dir, on_demo.valid_split) == (folds_dir, "fold_2")


@pytest.mark.parametrize(
  "on_folds,settings,message",
  [
    (False, dict(fold=0), "--fold=0: .* was not prepared in folds"),
    (True, dict(fold=3), r"--fold=3 is out of range: .* 3 folds \(pass --fold=0..2\)"),
    (True, dict(), r"prepared in 3 folds: pass --fold=0..2"),
    (True, dict(fold=0, crop_height=48), "--crop_height=48 is larger than the prepared height 32"),
    (False, dict(crop_width=64), "--crop_width=64 is larger than the prepared width 32"),
  ],
)
def test_fold_and_crop_errors(data_dir, folds_dir, on_folds, settings, message):
  with pytest.raises(ConfigError, match=message):
    trainer_lib.check_inputs(_config(folds_dir if on_folds else data_dir, **settings))


def test_a_fold_trains_on_crops_of_the_other_folds_and_validates_whole_images_of_its_own(
  folds_dir,
):
  trainer = _trainer(_config(folds_dir, fold=1, crop_height=16, batch_norm_statistics="precise"))
  real_function, shapes = trainer.train_function, []

  def recording(batch):
    shapes.append(tuple(batch["image"].shape))
    return real_function(batch)

  trainer.train_function = recording
  assert len(trainer.train(2)) == 2
  assert shapes == [(4, 16, SIZE, 3)] * 2
  seen = []
  values = trainer.evaluate(on_first_batch=lambda batch, result: seen.append(batch))
  assert seen[0]["image"].shape[1:] == (SIZE, SIZE, 3)  # whole prepared images
  fold_1 = pipeline.make_eval_dataset(folds_dir, "fold_1", batch_size=4, preprocessing="unit")
  assert [name.decode() for name in seen[0]["name"].numpy()] == [
    name.decode() for name in next(iter(fold_1))["name"].numpy()
  ]
  assert np.isfinite(values["head2/per_image/dsc"])
