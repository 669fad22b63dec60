"""Files and folders written so that a reader sees the old version or the whole new one.

Everything dunet writes for later use (run configs, metrics, masks, exports, converted
checkpoints, prepared data) goes through here: a crash, a kill or a full disk in the middle of a
write leaves what was there before or the complete new thing, never a torn file or a folder that
is half old, half new.

Files go through `tf.io.gfile`, so workdirs on object stores (gs://...) work; folders are staged
next to their destination on the local file system and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Union

import tensorflow as tf

from dunet import errors

PathLike = Union[str, "os.PathLike[str]"]


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` via a temporary name and a rename.

  Args:
    path: the file to create or replace (a local path or a tf.io.gfile URL).
    data: its whole content.
  """
  path = os.fspath(path)
  # The process id keeps two writers of the same file (e.g. two workers) off each other's
  # temporary file; the last rename wins with a whole file either way.
  temporary = f"{path}.tmp-{os.getpid()}"
  try:
    with tf.io.gfile.GFile(temporary, "wb") as handle:
      handle.write(data)
    tf.io.gfile.rename(temporary, path, overwrite=True)
  except BaseException:
    if tf.io.gfile.exists(temporary):
      tf.io.gfile.remove(temporary)
    raise


def write_text_atomic(path: PathLike, text: str) -> None:
  """`write_bytes_atomic` for UTF-8 text."""
  write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(
  path: PathLike, value: Any, *, indent: int = 2, sort_keys: bool = True
) -> None:
  """`write_text_atomic` of `value` as JSON (with a final newline)."""
  write_text_atomic(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n")


def check_out_dir(out_dir: PathLike, overwrite: bool) -> None:
  """Refuses an output folder that already holds something, unless `overwrite`.

  Raises:
    errors.OutputExistsError: `out_dir` exists (as a file, or as a folder that is not empty)
      and `overwrite` is False (a FileExistsError too).
  """
  out_dir = os.fspath(out_dir)
  if not os.path.lexists(out_dir) or overwrite:
    return
  if os.path.isdir(out_dir) and not os.listdir(out_dir):
    return
  raise errors.OutputExistsError(
    f"{out_dir} already exists and is not empty; choose another --out_dir or pass --overwrite"
  )


def make_staging_dir(out_dir: PathLike, purpose: str) -> str:
  """Creates a fresh hidden folder ".NAME.PURPOSE-xxxx" next to `out_dir` and returns its path.

  The folder gets the permissions of an ordinary new folder (mkdtemp's are private, 0700), since
  it becomes `out_dir`.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.{purpose}-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(staging, 0o777 & ~umask)
  return staging


def replace_directory(staging: PathLike, out_dir: PathLike) -> None:
  """Renames the finished `staging` folder to `out_dir`, replacing what was there.

  An existing `out_dir` is first moved aside (one rename), then `staging` is renamed into place,
  then the old folder is deleted: at every moment `out_dir` is either the old folder or the whole
  new one. An empty folder at `out_dir` is simply replaced.
  """
  staging, out_dir = os.fspath(staging), os.path.abspath(os.fspath(out_dir))
  if not os.path.lexists(out_dir):
    os.rename(staging, out_dir)
    return
  retired = tempfile.mkdtemp(
    prefix=f".{os.path.basename(out_dir)}.replaced-", dir=os.path.dirname(out_dir)
  )
  os.rename(out_dir, os.path.join(retired, "old"))
  os.rename(staging, out_dir)
  shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(out_dir: PathLike, overwrite: bool, purpose: str) -> Iterator[str]:
  """Yields a fresh hidden folder next to `out_dir`; when the block succeeds it becomes `out_dir`.

  On any exception (KeyboardInterrupt included) the staging folder is removed and `out_dir` is
  left as it was.

  Args:
    out_dir: the folder to create (a local path).
    overwrite: replace an existing non-empty `out_dir`.
    purpose: a word in the staging folder's name (".NAME.PURPOSE-xxxx"), so that a leftover from
      a killed process says what made it.

  Raises:
    errors.OutputExistsError: `out_dir` exists (and is not an empty folder) and `overwrite` is
      False, before the block runs, or when it appeared while the block ran (another process
      finished first: it is left as it is).
  """
  check_out_dir(out_dir, overwrite)
  staging = make_staging_dir(out_dir, purpose)
  try:
    yield staging
    if not overwrite:
      try:
        check_out_dir(out_dir, overwrite)
      except errors.OutputExistsError as error:
        raise errors.OutputExistsError(
          f"{os.fspath(out_dir)} appeared while this {purpose} ran; it was left as it is"
        ) from error
    replace_directory(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
