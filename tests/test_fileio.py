"""Atomic files and folders: a reader sees the old version or the whole new one."""

import json
import os

import pytest

from dunet import fileio


def hidden(folder) -> list:
  """Temporary files and folders left in `folder` (all of fileio's start with a dot or hold
  ".tmp-")."""
  return sorted(name for name in os.listdir(folder) if name.startswith(".") or ".tmp-" in name)


def test_write_bytes_replaces_the_whole_file(tmp_path):
  path = tmp_path / "a.bin"
  fileio.write_bytes_atomic(path, b"old content")
  fileio.write_bytes_atomic(path, b"new")
  assert path.read_bytes() == b"new"
  assert hidden(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
  path = tmp_path / "a.txt"
  fileio.write_text_atomic(path, "old")

  def fail_rename(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(fileio.tf.io.gfile, "rename", fail_rename)
  with pytest.raises(OSError, match="No space left"):
    fileio.write_text_atomic(path, "new")
  assert path.read_text() == "old"
  assert hidden(tmp_path) == []


def test_write_json_is_sorted_indented_and_ends_with_a_newline(tmp_path):
  path = tmp_path / "a.json"
  fileio.write_json_atomic(path, {"b": 1, "a": [1, 2]})
  text = path.read_text()
  assert text.endswith("}\n") and text.index('"a"') < text.index('"b"')
  assert json.loads(text) == {"a": [1, 2], "b": 1}
  fileio.write_json_atomic(path, {"b": 1, "a": 2}, indent=1, sort_keys=False)
  assert path.read_text().index('"b"') < path.read_text().index('"a"')


def test_check_out_dir(tmp_path):
  fileio.check_out_dir(tmp_path / "new", overwrite=False)  # absent: fine
  (tmp_path / "empty").mkdir()
  fileio.check_out_dir(tmp_path / "empty", overwrite=False)  # empty folder: fine
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  with pytest.raises(FileExistsError, match=f"{tmp_path / 'full'} already exists.*--overwrite"):
    fileio.check_out_dir(tmp_path / "full", overwrite=False)
  fileio.check_out_dir(tmp_path / "full", overwrite=True)
  (tmp_path / "file").write_text("x")
  with pytest.raises(FileExistsError, match="file already exists"):
    fileio.check_out_dir(tmp_path / "file", overwrite=False)


def test_staging_folder_is_hidden_next_to_the_output_with_ordinary_permissions(tmp_path):
  staging = fileio.make_staging_dir(tmp_path / "sub" / "out", "convert")
  assert os.path.dirname(staging) == str(tmp_path / "sub")
  assert os.path.basename(staging).startswith(".out.convert-")
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(staging).st_mode & 0o777 == 0o777 & ~umask


def test_staged_directory_commits_only_on_success(tmp_path):
  target = tmp_path / "out"
  with fileio.staged_directory(target, overwrite=False, purpose="test") as staging:
    assert os.path.dirname(staging) == str(tmp_path) and not target.exists()
    with open(os.path.join(staging, "a.txt"), "w") as handle:
      handle.write("new")
  assert (target / "a.txt").read_text() == "new"
  with pytest.raises(KeyboardInterrupt):
    with fileio.staged_directory(target, overwrite=True, purpose="test") as staging:
      with open(os.path.join(staging, "b.txt"), "w") as handle:
        handle.write("half")
      raise KeyboardInterrupt
  assert sorted(os.listdir(target)) == ["a.txt"]
  with pytest.raises(FileExistsError):
    with fileio.staged_directory(target, overwrite=False, purpose="test"):
      pass
  with fileio.staged_directory(target, overwrite=True, purpose="test") as staging:
    with open(os.path.join(staging, "c.txt"), "w") as handle:
      handle.write("replacement")
  assert sorted(os.listdir(target)) == ["c.txt"]
  assert hidden(tmp_path) == []


def test_replace_directory_takes_the_place_of_an_empty_folder(tmp_path):
  (tmp_path / "out").mkdir()
  staging = fileio.make_staging_dir(tmp_path / "out", "test")
  open(os.path.join(staging, "x"), "w").close()
  fileio.replace_directory(staging, tmp_path / "out")
  assert os.listdir(tmp_path / "out") == ["x"] and hidden(tmp_path) == []
