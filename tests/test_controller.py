"""dunet/controller.py's actions on plain numbers, without a training run: the finite check,
chunking, the plateau schedule, best-DSC keeping, early stopping and checkpoint saving; and one
short run on a stand-in model with several steps per compiled call."""

import functools
import os

import numpy as np
import pytest
import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet import controller
from dunet import pictures
from dunet import precision
from dunet import train
from dunet import trainer as trainer_lib
from dunet.data import demo
from dunet.errors import DivergedError
from tests import testing_utils
from tests.tiny_net import TinyNet


@pytest.mark.parametrize(
  "measured,message",
  [
    (dict(loss=float("nan")), "the training loss is nan"),
    (dict(loss=float("inf"), applied=1.0), "the training loss is inf"),
    (dict(applied=0.0), "the gradients are not finite"),
    (dict(parameters=float("inf")), "the parameters overflowed"),
  ],
)
def test_check_finite_covers_each_way_to_diverge(measured, message):
  # The loss path on its own: no real float32 run here produced a non-finite loss with finite
  # gradients (the logits saturate first), so these measurements are made up.
  values = {
    "loss/total": measured.get("loss", 0.5),
    "update_applied": measured.get("applied", 1.0),
    "norm/parameters": measured.get("parameters", 10.0),
  }
  float32 = precision.Policy("float32")
  with pytest.raises(DivergedError, match=f"at step 7: {message}.*/ckpt-6"):
    controller.check_finite(values, 7, float32, "run/checkpoints/ckpt-6")
  float16 = precision.Policy("mixed_float16")
  if "parameters" in measured:
    with pytest.raises(DivergedError, match="none \\(none was saved yet\\)"):
      controller.check_finite(values, 7, float16, None)
  else:  # the dynamic loss scale skips such steps by design
    controller.check_finite(values, 7, float16, None)


@pytest.mark.parametrize(
  "step,epoch_end,every,expected",
  [
    (0, 5, (1, 0), 1),  # logging every step
    (0, 5, (10, 0), 5),  # the epoch ends first
    (3, 10, (4, 0), 4),  # up to the next multiple, not 4 steps more
    (4, 10, (4, 0), 8),
    (5, 20, (10, 3), 6),  # the nearer of logging and checkpointing
    (7, 7, (10, 0), 7),  # nothing left in the epoch
  ],
)
def test_chunk_end_stops_at_the_next_log_checkpoint_or_epoch_end(step, epoch_end, every, expected):
  assert controller.chunk_end(step, epoch_end, every) == expected


def _metrics(dsc, loss=0.5):
  return {"head2/per_image/dsc": dsc, "loss/total": loss}


def test_plateau_on_the_loss_reduces_the_rate_after_patience():
  judge = controller.ValidationJudge(
    monitor="loss",
    lr_schedule="plateau",
    plateau_factor=0.5,
    plateau_patience=2,
    min_learning_rate=0.1,
  )
  rates = []
  rate = 1.0
  for loss in (1.0, 0.9, 0.95, 0.92, 0.91, 0.93, 0.99):
    rate = judge.judge(_metrics(0.1, loss), rate).learning_rate
    rates.append(rate)
  # Best 0.9 after the second; two without improvement halve it, the count restarts.
  assert rates == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_other_schedules_keep_the_rate():
  judge = controller.ValidationJudge(monitor="dsc", lr_schedule="cosine", plateau_patience=1)
  for dsc in (0.5, 0.4, 0.3):
    assert judge.judge(_metrics(dsc), 0.3).learning_rate == 0.3


def test_best_dsc_improves_only_on_a_strictly_better_value():
  judge = controller.ValidationJudge()
  improved = [judge.judge(_metrics(dsc), 1e-3).improved for dsc in (0.2, 0.5, 0.5, 0.4, 0.6)]
  assert improved == [True, True, False, False, True]
  assert float(judge.best_dsc.numpy()) == pytest.approx(0.6)


def test_early_stopping_after_patience_validations_without_improvement():
  judge = controller.ValidationJudge(monitor="dsc", early_stopping_patience=2)
  stops = [judge.judge(_metrics(dsc), 1e-3).stop for dsc in (0.5, 0.6, 0.55, 0.58, 0.7)]
  assert stops == [False, False, False, True, False]
  never = controller.ValidationJudge(monitor="dsc", early_stopping_patience=0)
  assert not any(never.judge(_metrics(0.1), 1e-3).stop for _ in range(5))


def test_checkpoint_actions_save_each_step_once_keep_the_best_and_restore(tmp_path):
  step = tf.Variable(0, dtype=tf.int64)
  best = tf.Variable(-1.0)
  state = tf.train.Checkpoint(global_step=step, best_dsc=best)
  actions = controller.CheckpointActions(
    state, str(tmp_path), str(tmp_path), chief=True, keep_checkpoints=2
  )
  assert actions.restore(lambda: int(step.numpy()), lambda: float(best.numpy())) is None
  actions.save(0)  # step 0 counts as saved already (a fresh run)
  assert actions.latest is None
  step.assign(3)
  actions.save(3)
  actions.save(3)
  assert checkpoint_lib.listed_checkpoints(str(tmp_path / "checkpoints")) == [
    str(tmp_path / "checkpoints" / "ckpt-3")
  ]
  best.assign(0.7)
  step.assign(4)
  actions.save(4)
  actions.keep_best()
  assert checkpoint_lib.step_of(checkpoint_lib.best_checkpoint(str(tmp_path))) == 4

  step.assign(0)
  best.assign(-1.0)
  again = controller.CheckpointActions(
    state, str(tmp_path), str(tmp_path), chief=True, keep_checkpoints=2
  )
  restored = again.restore(lambda: int(step.numpy()), lambda: float(best.numpy()))
  assert restored == str(tmp_path / "checkpoints" / "ckpt-4")
  assert int(step.numpy()) == 4 and float(best.numpy()) == pytest.approx(0.7)
  again.save(4)  # restored: not written again
  assert checkpoint_lib.listed_checkpoints(str(tmp_path / "checkpoints"))[-1].endswith("ckpt-4")


def test_training_scalars_are_written_every_n_steps_and_at_the_end(tmp_path):
  actions = controller.SummaryActions(
    str(tmp_path),
    chief=False,
    log_every_steps=4,
    total_steps=10,
    summary_images=2,
    preprocessing="unit",
  )
  assert [s for s in range(1, 11) if actions.is_log_step(s)] == [4, 8, 10]
  assert actions.overlays(4) is None  # not the chief: nothing is written
  assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_run_with_steps_per_loop_logs_and_ends_like_one_step_per_call(tmp_path, monkeypatch):
  """dunet.train.train end to end (a stand-in model): loops of 4 steps, logging every 2 steps
  and checkpointing every 3, over two epochs of 5 steps. The calls end at every log, checkpoint
  and epoch boundary, so the same training scalars are written at the same steps, the same
  checkpoints are kept, and the weights end the same."""
  monkeypatch.setattr(
    train.trainer_lib, "Trainer", functools.partial(trainer_lib.Trainer, make_model=TinyNet)
  )
  data_dir = demo.ensure_demo_data(tmp_path / "demo", count=24, height=32, width=32, seed=1)
  runs = {}
  for steps_per_loop in (1, 4):
    workdir = tmp_path / f"loop{steps_per_loop}"
    config = testing_utils.small_train_config(
      data_dir,
      steps_per_loop=steps_per_loop,
      log_every_steps=2,
      checkpoint_every_steps=3,
      keep_checkpoints=10,
      lr_schedule="cosine",
      warmup_steps=1,
    )
    result = train.train(config, str(workdir))
    tags = ("loss/total", "learning_rate", "norm/gradients")
    runs[steps_per_loop] = (
      result,
      pictures.read_scalars(workdir / "train", tags),
      sorted(os.listdir(workdir / "checkpoints")),
      tf.train.load_checkpoint(str(workdir / "checkpoints" / "ckpt-10")),
    )
  (result1, scalars1, files1, reader1), (result4, scalars4, files4, reader4) = runs[1], runs[4]
  assert result1["step"] == result4["step"] == 10
  assert result1["valid"] == result4["valid"]
  assert files1 == files4
  for tag, (steps, values) in scalars1.items():
    assert list(steps) == [2, 4, 6, 8, 10], tag
    np.testing.assert_array_equal(scalars4[tag][0], steps)
    np.testing.assert_array_equal(scalars4[tag][1], values, err_msg=tag)
  for name in reader1.get_variable_to_shape_map():
    if name.startswith("model/"):
      np.testing.assert_array_equal(reader4.get_tensor(name), reader1.get_tensor(name), name)
