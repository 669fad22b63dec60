"""Faults during training, each injected for real (issue 6): SIGKILL at random steps and inside
checkpoint writes, a full disk (a lowered file-size limit on the running trainer), an unwritable
workdir, divergence, SIGINT/SIGTERM (and a second signal), damaged shards, changed raw data.

The SIGKILL test draws its kill points from a seed printed at the start (pytest shows it when the
test fails); run it again with DUNET_FAULT_SEED=<seed> to draw the same points.
"""

import json
import os
import queue
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet import train
from dunet import trainer as trainer_lib
from dunet.data import demo
from dunet.data import prepare
from dunet.errors import ConfigError
from dunet.errors import DataError
from dunet.errors import DivergedError
from dunet.models import DoubleUNet
from tests import testing_utils
from tests.data.helpers import make_generic, picture, write_mask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32
# Small, fast and sensitive to what a restart must restore: Adam moments, the plateau schedule
# (it halves the rate after a validation without improvement), augmentation by (seed, epoch, i).
TRAIN_ARGS = [
  "--batch_size=4",
  "--learning_rate=1e-3",
  "--optimizer=adam",
  "--lr_schedule=plateau",
  "--plateau_patience=1",
  "--plateau_factor=0.5",
  "--batch_norm_momentum=0.9",
  "--seed=7",
  "--log_every_steps=1",
  "--summary_images=0",
  "--preprocessing=unit",
  "--precision=float32",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """24 demo pictures prepared at 32x32: 20 train (5 steps of 4), 2 valid, 2 test."""
  return demo.ensure_demo_data(
    tmp_path_factory.mktemp("demo"), count=24, height=SIZE, width=SIZE, seed=1
  )


class Training:
  """`python -m dunet.train` in a subprocess, its output read line by line as it comes; with
  `tiny`, training TinyNet (tests/tiny_train.py) where the network does not matter."""

  def __init__(self, workdir, data_dir, *args, env=None, tiny=False):
    self.workdir = workdir
    self.process = subprocess.Popen(
      [
        sys.executable,
        "-m",
        *(["tests.tiny_train"] if tiny else []),
        "dunet.train",
        f"--workdir={workdir}",
        f"--data_dir={data_dir}",
        *TRAIN_ARGS,
        *args,
      ],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", **(env or {})),
    )
    self.lines = []
    self._queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.process.stdout:
      self._queue.put(line)
    self._queue.put(None)

  def wait_for(self, pattern, timeout=300):
    """The first new output line that matches the regex `pattern` (as a match object)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      try:
        line = self._queue.get(timeout=1)
      except queue.Empty:
        continue
      if line is None:
        break
      self.lines.append(line)
      match = re.search(pattern, line)
      if match:
        return match
    raise AssertionError(f"no line matching {pattern!r}; output ends with:\n{self.output[-3000:]}")

  def finish(self, timeout=300):
    """Waits for the exit; returns the exit status."""
    self.process.wait(timeout=timeout)
    while True:
      line = self._queue.get(timeout=30)
      if line is None:
        return self.process.returncode
      self.lines.append(line)

  def kill(self):
    self.process.send_signal(signal.SIGKILL)
    assert self.finish() == -signal.SIGKILL

  @property
  def output(self):
    return "".join(self.lines)


def _all_tensors(prefix):
  reader = tf.train.load_checkpoint(prefix)
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _assert_every_listed_checkpoint_reads(workdir):
  for subdir in (checkpoint_lib.CHECKPOINT_SUBDIR, checkpoint_lib.BEST_SUBDIR):
    for prefix in checkpoint_lib.listed_checkpoints(str(workdir / subdir)):
      assert _all_tensors(prefix), prefix  # every tensor, so every byte and checksum, is read


@pytest.mark.slow
def test_sigkill_at_random_steps_and_inside_checkpoint_writes_resumes_to_the_same_weights(
  tmp_path, data_dir
):
  seed = int(os.environ.get("DUNET_FAULT_SEED", random.SystemRandom().randrange(10**6)))
  print(f"DUNET_FAULT_SEED={seed}")
  rng = random.Random(seed)
  args = ["--epochs=2", "--deterministic", "--checkpoint_every_steps=1", "--keep_checkpoints=2"]
  reference = Training(tmp_path / "reference", data_dir, *args)  # runs alongside the others
  workdir = tmp_path / "killed"
  log = []

  # 1. At a random moment after a random step: in the step, its checkpoint, or a validation.
  kill_step, delay = rng.randint(2, 5), rng.uniform(0.0, 1.5)  # ckpt-1 exists by step 2
  log.append(f"kill 1: {delay:.2f} s after step {kill_step}")
  run = Training(workdir, data_dir, *args)
  run.wait_for(rf"^step {kill_step}/")
  time.sleep(delay)
  run.kill()
  _assert_every_listed_checkpoint_reads(workdir)
  newest = checkpoint_lib.latest_checkpoint(str(workdir))

  # 2. Inside a checkpoint write: while TensorFlow writes the staged files (of a random step's
  # checkpoint), or at a pause point of the commit (the test hook in dunet/checkpoint.py; every
  # save pauses there, so the first save after the restart is the one killed).
  phase = rng.choice(["writing", *checkpoint_lib.PHASES])
  resumed_at = checkpoint_lib.step_of(newest) if newest else 0
  target = rng.randint(resumed_at + 1, max(resumed_at + 1, min(resumed_at + 3, 9)))
  env = {} if phase == "writing" else {checkpoint_lib.PAUSE_ENV: f"{phase}:60"}
  run = Training(workdir, data_dir, *args, env=env)
  if newest:
    run.wait_for(f"Resumed from {re.escape(newest)} at step {resumed_at}")
  if phase == "writing":
    run.wait_for(rf"^step {target}/")
    deadline = time.time() + 120
    while not list((workdir / "checkpoints").glob(f".ckpt-{target}-*.partial")):
      assert time.time() < deadline, "the save never started"
      time.sleep(0.002)
    staged = list((workdir / "checkpoints").glob(f".ckpt-{target}-*.partial/ckpt-*.index"))
    run.kill()
    log.append(
      f"kill 2: resumed from {newest}, killed while writing ckpt-{target} "
      f"({'after' if staged else 'before'} TensorFlow finished the staged files)"
    )
  else:
    match = run.wait_for(rf"checkpoint test pause: {phase} (\S+/ckpt-\d+) ")
    run.kill()
    log.append(f"kill 2: resumed from {newest}, killed at phase {phase!r} of {match.group(1)}")
  _assert_every_listed_checkpoint_reads(workdir)
  newest = checkpoint_lib.latest_checkpoint(str(workdir))
  log.append(f"then the newest listed was {newest}")

  print("\n".join(log))

  # 3. To the end.
  run = Training(workdir, data_dir, *args)
  assert run.finish() == 0, f"{log}\n{run.output[-3000:]}"
  if newest:
    assert f"Resumed from {newest} at step {checkpoint_lib.step_of(newest)}" in run.output, log
  else:  # killed before a first checkpoint was complete: a fresh start is right
    assert "Resumed from" not in run.output, log
  assert "cannot read checkpoint" not in run.output
  assert not (workdir / "checkpoints" / checkpoint_lib.BROKEN_SUBDIR).exists()
  assert reference.finish() == 0, reference.output[-3000:]

  for subdir in ("checkpoints", "best"):
    expected_prefix = tf.train.latest_checkpoint(str(tmp_path / "reference" / subdir))
    got_prefix = tf.train.latest_checkpoint(str(workdir / subdir))
    assert os.path.basename(got_prefix) == os.path.basename(expected_prefix), log
    expected, got = _all_tensors(expected_prefix), _all_tensors(got_prefix)
    assert got.keys() == expected.keys()
    for name in expected:  # model, Adam's moments and step, loss scale, schedules, best DSC
      np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{name} {log}")
  assert [
    path.name for path in (workdir / "checkpoints").iterdir() if path.name.endswith(".partial")
  ] == []
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics == json.loads((tmp_path / "reference" / "metrics.json").read_text())


@pytest.mark.slow
def test_disk_full_while_saving_stops_clearly_and_keeps_the_previous_checkpoint(tmp_path, data_dir):
  """EFBIG for real: the running trainer's file-size limit is lowered below a checkpoint's size
  once its first checkpoint is listed (Python ignores SIGXFSZ, so writes fail with an error)."""
  workdir = tmp_path / "run"
  run = Training(
    workdir, data_dir, "--epochs=1", "--max_steps=4", "--checkpoint_every_steps=1", "--noaugment"
  )
  run.wait_for(r"^step 2/")  # ckpt-1 is listed; ckpt-2 is about to be written
  limit = 16 << 20  # a checkpoint's data file is ~350 MB; event files stay far below
  resource.prlimit(run.process.pid, resource.RLIMIT_FSIZE, (limit, limit))
  assert run.finish() == 1, run.output[-3000:]
  checkpoints = workdir / "checkpoints"
  folder = re.escape(str(checkpoints))
  match = re.search(
    rf"error: could not write checkpoint {folder}/ckpt-(\d+) into {folder}: "
    rf".*File too large.* the previous checkpoint {folder}/ckpt-(\d+) is intact",
    run.output,
  )
  assert match, run.output[-3000:]
  failed, previous = int(match.group(1)), int(match.group(2))
  assert previous == failed - 1 >= 1
  assert "Traceback" not in run.output
  # Nothing half-written remains or is listed; the previous checkpoint restores, all finite.
  assert checkpoint_lib.listed_checkpoints(str(checkpoints))[-1] == str(
    checkpoints / f"ckpt-{previous}"
  )
  assert (
    sorted(
      path.name
      for path in checkpoints.iterdir()
      if f"ckpt-{failed}" in path.name or path.name.endswith(".partial")
    )
    == []
  )
  model = DoubleUNet()
  assert checkpoint_lib.restore_model(model, str(workdir), prefer="latest") == str(
    checkpoints / f"ckpt-{previous}"
  )
  assert all(np.isfinite(v.numpy()).all() for v in model.variables)


def run_training(workdir, data_dir, **overrides):
  """dunet.train.train in this process (no TF start-up to pay) with test-sized settings."""
  settings = dict(epochs=1, summary_images=0)
  settings.update(overrides)
  return train.train(testing_utils.small_train_config(data_dir, **settings), str(workdir))


def test_unwritable_workdir_fails_before_any_work(tmp_path, data_dir, monkeypatch):
  (tmp_path / "file").write_text("a file where the workdir's parent should be")
  workdir = tmp_path / "file" / "run"
  built = []
  monkeypatch.setattr(trainer_lib, "Trainer", lambda *args, **kwargs: built.append(args))
  with pytest.raises(
    checkpoint_lib.CheckpointWriteError, match=f"cannot write into --workdir={workdir}"
  ):
    run_training(workdir, data_dir)
  assert not built  # before the model is even built


def test_unprepared_data_dir_fails_before_the_workdir_is_made(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(DataError, match="no prepared data.*dunet-prepare --raw_dir="):
    run_training(workdir, tmp_path / "not-prepared")
  assert not workdir.exists()


def test_divergence_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
  """A real divergence: an absurd learning rate overflows the second step's gradients."""
  workdir = tmp_path / "run"
  with pytest.raises(DivergedError) as raised:
    run_training(workdir, data_dir, learning_rate=1e15, max_steps=4, checkpoint_every_steps=1)
  match = re.search(
    r"^training diverged at step (\d+): the (gradients|training loss|"
    r"parameters).* Stopped without saving this step; the last good checkpoint "
    r"is (\S+)\. Try a lower --learning_rate",
    str(raised.value),
  )
  assert match, str(raised.value)
  step, last_good = int(match.group(1)), match.group(3)
  assert last_good == str(workdir / "checkpoints" / f"ckpt-{step - 1}")
  # Nothing newer was written; the last good checkpoint loads and is finite.
  assert checkpoint_lib.listed_checkpoints(str(workdir / "checkpoints"))[-1] == last_good
  assert not list((workdir / "checkpoints").glob(f"*ckpt-{step}*"))
  assert checkpoint_lib.all_finite(last_good)
  checkpoint_lib.restore_model(DoubleUNet(), last_good)


@pytest.mark.slow
def test_sigint_saves_a_restart_resumes_and_a_second_signal_aborts(tmp_path, data_dir):
  # TinyNet: the signals' handling is the point (DoubleU-Net's 350 MB checkpoints are killed
  # mid-write in the SIGKILL test above).
  workdir = tmp_path / "run"
  run = Training(workdir, data_dir, "--epochs=50", "--noaugment", tiny=True)
  run.wait_for(r"^step 2/")
  run.process.send_signal(signal.SIGINT)
  assert run.finish() == 0, run.output[-3000:]
  assert "SIGINT received: saving a checkpoint after this step" in run.output
  metrics = json.loads((workdir / "metrics.json").read_text())
  stopped_at = metrics["step"]
  assert metrics["stopped_by"] == "SIGINT" and stopped_at >= 2
  assert checkpoint_lib.latest_checkpoint(str(workdir)).endswith(f"/ckpt-{stopped_at}")

  # The restart continues from there. Its checkpoint write pauses (test hook), and a second
  # SIGTERM during that write aborts at once: no new checkpoint, the last one still listed.
  run = Training(
    workdir,
    data_dir,
    "--epochs=50",
    "--noaugment",
    env={checkpoint_lib.PAUSE_ENV: "staged:120"},
    tiny=True,
  )
  run.wait_for(f"Resumed from {workdir}/checkpoints/ckpt-{stopped_at} at step {stopped_at}")
  run.wait_for(rf"^step {stopped_at + 1}/")
  run.process.send_signal(signal.SIGTERM)
  run.wait_for(r"checkpoint test pause: staged")
  run.process.send_signal(signal.SIGTERM)
  assert run.finish(timeout=60) == 128 + signal.SIGTERM, run.output[-3000:]
  assert "error: SIGTERM received twice: aborted without saving a checkpoint" in run.output
  assert checkpoint_lib.latest_checkpoint(str(workdir)).endswith(f"/ckpt-{stopped_at}")
  _assert_every_listed_checkpoint_reads(workdir)


def test_stop_handlers_are_put_back_and_a_second_signal_raises():
  """Real signals to this process: the first sets the flag, the second aborts."""
  before = signal.getsignal(signal.SIGINT)
  stop = train.Stop()
  stop.install()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested == "SIGINT"
    with pytest.raises(train.Aborted, match="SIGINT received twice"):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    stop.uninstall()
  assert signal.getsignal(signal.SIGINT) is before


def _copy_of(data_dir, tmp_path):
  copy = tmp_path / "prepared"
  shutil.copytree(data_dir, copy)
  return copy


def test_truncated_shard_is_named_before_training(tmp_path, data_dir):
  copy = _copy_of(data_dir, tmp_path)
  shard = copy / "train-00000-of-00001.tfrecord"
  shard.write_bytes(shard.read_bytes()[:-3000])
  with pytest.raises(DataError, match=f"^{shard}: is \\d+ bytes but was \\d+ when prepared"):
    run_training(tmp_path / "run", copy)


def test_corrupt_record_is_named_when_training_reads_it(tmp_path, data_dir):
  copy = _copy_of(data_dir, tmp_path)
  shard = copy / "train-00000-of-00001.tfrecord"
  raw = bytearray(shard.read_bytes())
  raw[len(raw) // 2] ^= 0x10  # same size: only reading finds it
  shard.write_bytes(bytes(raw))
  with pytest.raises(
    DataError, match=f"^{shard}: corrupt TFRecord shard \\(record \\d+: corrupted record at \\d+\\)"
  ) as raised:
    run_training(tmp_path / "run", copy)
  assert isinstance(raised.value.__cause__, tf.errors.DataLossError)


def test_changed_raw_data_is_an_error_naming_the_files_unless_allowed(tmp_path, caplog):
  raw = tmp_path / "raw"
  make_generic(raw, count=24)
  prepared = tmp_path / "prepared"
  prepare.prepare_dataset(raw, prepared, height=SIZE, width=SIZE, progress=False)
  _, mask = picture(77)
  write_mask(raw / "masks" / "img05.png", mask)
  with pytest.raises(
    DataError,
    match=f"^{raw}: changed since {prepared} was prepared "
    r"\(1 modified: masks/img05.png\).*--allow_changed_raw_data",
  ):
    run_training(tmp_path / "run", prepared)
  # Allowed: a warning, and set-up goes on (to the next check, which a size mismatch stops so
  # that no training has to run here).
  with caplog.at_level("WARNING"), pytest.raises(ConfigError, match="differ from the prepared"):
    run_training(tmp_path / "run", prepared, allow_changed_raw_data=True, height=64, width=64)
  assert "1 modified: masks/img05.png" in caplog.text
