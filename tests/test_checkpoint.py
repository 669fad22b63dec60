"""Crash-safe checkpoints: keep/sweep, fallback past damaged ones, a full disk (a real file-size
limit), kills at every phase of a write (real SIGKILL), best/ copies, the workdir check."""

import os
import resource
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from dunet import checkpoint as checkpoint_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 20000  # floats: an 80 kB data file


class State(tf.Module):
  def __init__(self):
    super().__init__()
    self.values = tf.Variable(tf.zeros([SIZE]))
    self.step = tf.Variable(0, dtype=tf.int64)


def make_state():
  state = State()
  return state, tf.train.Checkpoint(state=state)


def set_step(state, step):
  state.values.assign(tf.fill([SIZE], float(step)))
  state.step.assign(int(step))


def saved_value(prefix):
  return float(checkpoint_lib.read_scalar(prefix, "state/step"))


def names(directory):
  return sorted(os.listdir(directory))


def test_save_keeps_the_newest_and_leaves_nothing_else(tmp_path):
  state, checkpoint = make_state()
  writer = checkpoint_lib.Checkpointer(checkpoint, str(tmp_path / "ck"), max_to_keep=2)
  for step in (1, 2, 3):
    set_step(state, step)
    assert writer.save(step) == str(tmp_path / "ck" / f"ckpt-{step}")
  assert writer.checkpoints == [str(tmp_path / "ck" / "ckpt-2"), str(tmp_path / "ck" / "ckpt-3")]
  assert names(tmp_path / "ck") == [
    "checkpoint",
    "ckpt-2.data-00000-of-00001",
    "ckpt-2.index",
    "ckpt-3.data-00000-of-00001",
    "ckpt-3.index",
  ]
  # TensorFlow's own reader and the consumers' helper agree.
  assert tf.train.latest_checkpoint(str(tmp_path / "ck")) == writer.latest
  assert checkpoint_lib.latest_checkpoint(str(tmp_path)) is None  # not a workdir layout
  assert checkpoint_lib.resolve_checkpoint(str(tmp_path / "ck")) == writer.latest

  # Saving a listed step again replaces it (through the staged copy; see test_kill_...).
  set_step(state, 30)
  writer.save(3)
  assert saved_value(writer.latest) == 30
  assert writer.checkpoints[-1].endswith("ckpt-3") and len(names(tmp_path / "ck")) == 5

  restored_state, restored = make_state()
  assert checkpoint_lib.restore_newest(restored, str(tmp_path / "ck")) == writer.latest
  np.testing.assert_array_equal(restored_state.values.numpy(), np.full([SIZE], 30.0))


def test_fresh_folder_restores_nothing(tmp_path):
  _, checkpoint = make_state()
  assert checkpoint_lib.restore_newest(checkpoint, str(tmp_path / "none")) is None


def _three_checkpoints(directory):
  state, checkpoint = make_state()
  writer = checkpoint_lib.Checkpointer(checkpoint, str(directory), max_to_keep=3)
  for step in (1, 2, 3):
    set_step(state, step)
    writer.save(step)
  return writer


@pytest.mark.parametrize(
  "damage", ["truncated data", "flipped byte", "missing index", "empty index"]
)
def test_restore_falls_back_past_a_damaged_newest_checkpoint(tmp_path, damage, caplog):
  directory = tmp_path / "ck"
  _three_checkpoints(directory)
  data = directory / "ckpt-3.data-00000-of-00001"
  if damage == "truncated data":
    data.write_bytes(data.read_bytes()[:1000])
  elif damage == "flipped byte":
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
  elif damage == "missing index":
    (directory / "ckpt-3.index").unlink()
  else:
    (directory / "ckpt-3.index").write_bytes(b"")

  # A reader that must not repair (e.g. another worker) only skips it.
  state, checkpoint = make_state()
  assert checkpoint_lib.restore_newest(checkpoint, str(directory)) == str(directory / "ckpt-2")
  assert int(state.step.numpy()) == 2
  assert "ckpt-3" in " ".join(os.listdir(directory))

  state, checkpoint = make_state()
  with caplog.at_level("WARNING"):
    assert checkpoint_lib.restore_newest(checkpoint, str(directory), repair=True) == str(
      directory / "ckpt-2"
    )
  assert f"cannot read checkpoint {directory / 'ckpt-3'}" in caplog.text
  np.testing.assert_array_equal(state.values.numpy(), np.full([SIZE], 2.0))
  # Set aside for inspection, no longer listed; the next save continues after ckpt-2.
  assert not [name for name in os.listdir(directory) if name.startswith("ckpt-3")]
  assert [name for name in os.listdir(directory / "broken") if name.startswith("ckpt-3")]
  assert checkpoint_lib.listed_checkpoints(str(directory)) == [
    str(directory / "ckpt-1"),
    str(directory / "ckpt-2"),
  ]


def test_unreadable_checkpoints_never_mean_a_silent_fresh_start(tmp_path):
  directory = tmp_path / "ck"
  _three_checkpoints(directory)
  for name in os.listdir(directory):
    if name.endswith(".index"):
      (directory / name).write_bytes(b"garbage")
  _, checkpoint = make_state()
  with pytest.raises(
    checkpoint_lib.CheckpointReadError,
    match=f"no checkpoint in {directory} can be read .*ckpt-3: .*ckpt-1: ",
  ):
    checkpoint_lib.restore_newest(checkpoint, str(directory), repair=True)
  assert not (directory / "broken").exists()  # nothing moved when nothing is readable


def test_listed_but_missing_files_are_skipped_by_consumers(tmp_path):
  workdir = tmp_path / "run"
  _three_checkpoints(workdir / checkpoint_lib.CHECKPOINT_SUBDIR)
  for name in ("ckpt-3.index", "ckpt-3.data-00000-of-00001"):
    (workdir / "checkpoints" / name).unlink()
  assert tf.train.latest_checkpoint(str(workdir / "checkpoints")) is None  # what TF would do
  assert checkpoint_lib.latest_checkpoint(str(workdir)) == str(workdir / "checkpoints" / "ckpt-2")
  assert checkpoint_lib.resolve_checkpoint(str(workdir)) == str(workdir / "checkpoints" / "ckpt-2")


def test_without_a_state_file_the_newest_files_are_used(tmp_path):
  directory = tmp_path / "ck"
  _three_checkpoints(directory)
  (directory / "checkpoint").unlink()
  state, checkpoint = make_state()
  assert checkpoint_lib.restore_newest(checkpoint, str(directory)) == str(directory / "ckpt-3")
  assert int(state.step.numpy()) == 3


def test_a_checkpoint_of_another_run_is_a_clear_error(tmp_path):
  directory = tmp_path / "ck"
  _three_checkpoints(directory)
  other = tf.train.Checkpoint(state=State(), extra=tf.Variable(1.0))
  with pytest.raises(ValueError, match="ckpt-3 does not match this run"):
    checkpoint_lib.restore_newest(other, str(directory))


def test_disk_full_is_a_clear_error_and_the_previous_checkpoint_stays(tmp_path):
  """A real write failure: this process's file-size limit (EFBIG), below one data file."""
  directory = tmp_path / "ck"
  writer = _three_checkpoints(directory)
  before = names(directory)
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a signal
  resource.setrlimit(resource.RLIMIT_FSIZE, (SIZE, hard))
  try:
    with pytest.raises(checkpoint_lib.CheckpointWriteError) as raised:
      writer.save(4)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous_handler)
  message = str(raised.value)
  assert f"could not write checkpoint {directory / 'ckpt-4'} into {directory}" in message
  assert "File too large" in message
  assert f"the previous checkpoint {directory / 'ckpt-3'} is intact" in message
  assert names(directory) == before  # no staging folder, nothing of ckpt-4
  state, checkpoint = make_state()
  assert checkpoint_lib.restore_newest(checkpoint, str(directory)) == str(directory / "ckpt-3")
  assert int(state.step.numpy()) == 3
  writer.save(4)  # space again: writing works again
  assert writer.latest == str(directory / "ckpt-4")


def test_check_writable_names_the_folder(tmp_path):
  checkpoint_lib.check_writable(str(tmp_path / "new" / "run"))
  assert names(tmp_path / "new" / "run") == []
  (tmp_path / "file").write_text("not a folder")
  with pytest.raises(
    checkpoint_lib.CheckpointWriteError,
    match=f"cannot write into --workdir={tmp_path / 'file' / 'run'}",
  ):
    checkpoint_lib.check_writable(str(tmp_path / "file" / "run"))


def test_adopt_links_a_checkpoint_into_best(tmp_path):
  state, checkpoint = make_state()
  latest = checkpoint_lib.Checkpointer(checkpoint, str(tmp_path / "checkpoints"), 3)
  best = checkpoint_lib.Checkpointer(checkpoint, str(tmp_path / "best"), 1)
  for step in (1, 2):
    set_step(state, step)
    best.adopt(latest.save(step))
  assert best.checkpoints == [str(tmp_path / "best" / "ckpt-2")]
  assert names(tmp_path / "best") == ["checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index"]
  assert os.path.samefile(
    tmp_path / "best" / "ckpt-2.index", tmp_path / "checkpoints" / "ckpt-2.index"
  )
  assert saved_value(checkpoint_lib.best_checkpoint(str(tmp_path))) == 2


# A child process that saves steps 1 and 2, then (with the test hook pausing at PHASE) either a
# new step 3 or step 2 again, and is SIGKILLed during that pause.
_CHILD = textwrap.dedent(
  """
    import os, sys
    import tensorflow as tf
    from dunet import checkpoint as checkpoint_lib
    directory, phase, mode = sys.argv[1:]
    values = tf.Variable(tf.zeros([%d]))
    step = tf.Variable(0, dtype=tf.int64)
    writer = checkpoint_lib.Checkpointer(
        tf.train.Checkpoint(state=tf.train.Checkpoint(values=values, step=step)), directory, 2)
    for number in (1, 2):
      step.assign(number)
      writer.save(number)
    os.environ[checkpoint_lib.PAUSE_ENV] = phase + ":120"
    step.assign(3 if mode == "new" else 20)
    writer.save(3 if mode == "new" else 2)
    print("not killed")
"""
  % SIZE
)


@pytest.mark.slow
def test_kill_at_every_phase_of_a_write_leaves_a_complete_checkpoint_listed(tmp_path):
  """Real SIGKILLs at each pause point of `Checkpointer` (children run side by side)."""
  cases = [(phase, "new") for phase in checkpoint_lib.PHASES] + [
    ("data_moved", "replace"),
    ("moved", "replace"),
  ]
  children = {}
  for phase, mode in cases:
    directory = tmp_path / f"{phase}-{mode}"
    children[(phase, mode)] = subprocess.Popen(
      [sys.executable, "-c", _CHILD, str(directory), phase, mode],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
  try:
    for (phase, mode), child in children.items():
      deadline = time.time() + 240
      for line in child.stdout:
        if "checkpoint test pause: " + phase in line:
          child.send_signal(signal.SIGKILL)
          break
        assert time.time() < deadline, f"{phase}/{mode}: no pause"
      child.wait(timeout=60)
      assert child.returncode == -signal.SIGKILL, (phase, mode)
  finally:
    for child in children.values():
      child.kill()

  for (phase, mode), _ in children.items():
    directory = tmp_path / f"{phase}-{mode}"
    if mode == "new":
      expected = 3 if phase == "recorded" else 2  # listed only once complete
    else:
      expected = 20  # the complete staged copy is what is listed meanwhile
    state = tf.train.Checkpoint(
      values=tf.Variable(tf.zeros([SIZE])), step=tf.Variable(0, dtype=tf.int64)
    )
    restored = checkpoint_lib.restore_newest(
      tf.train.Checkpoint(state=state), str(directory), repair=True
    )
    assert int(state.step.numpy()) == expected, (phase, mode, restored)
    assert not (directory / "broken").exists(), (phase, mode)
    # The next save of the resumed run clears whatever the kill left.
    writer = checkpoint_lib.Checkpointer(tf.train.Checkpoint(state=state), str(directory), 2)
    writer.save(expected + 1)
    writer.save(expected + 2)
    assert names(directory) == ["checkpoint"] + sorted(
      f"ckpt-{expected + n}.{kind}" for n in (1, 2) for kind in ("data-00000-of-00001", "index")
    ), (phase, mode)
