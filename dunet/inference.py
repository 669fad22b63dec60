"""Inference pieces that predict, evaluate and export share: the segment call, batching, inputs.

  make_segment_fn    a loaded model (dunet.serving.load_segmenter) as numpy in, numpy out, with
                     optional flip test-time augmentation
  describe_model     what a report says about the model: source, size, ensemble, tiling...
  batches_by_size    groups pictures of one size (a serve call takes one size), memory bounded
  ImageProgress      a progress line counted in images, updated once per batch
  encode_png         PNG bytes of a mask or an RGB picture
  find_inputs        the picture files a list of folders, glob patterns and files names
  check_unique_stems refuses inputs that would write the same output name

Nothing here reads flags or prints results: the command-line modules (dunet/predict.py,
dunet/evaluate.py) do.
"""

from __future__ import annotations

import collections
import glob
import os
import sys
from pathlib import Path
from typing import (
  Callable,
  Dict,
  Hashable,
  Iterable,
  Iterator,
  List,
  Optional,
  Sequence,
  Tuple,
  TypeVar,
  Union,
)

from absl import logging
import cv2
import numpy as np
import tensorflow as tf

from dunet import serving
from dunet.data import layouts
from dunet.errors import ConfigError
from dunet.progress import ProgressLine

PathLike = Union[str, "os.PathLike[str]"]
SegmentFn = Callable[[np.ndarray], Dict[str, np.ndarray]]
T = TypeVar("T")

_GLOB_CHARACTERS = "*?["


def make_segment_fn(
  loaded: serving.LoadedSegmenter, tta: bool = False, flips: Sequence[str] = tuple(serving.FLIPS)
) -> SegmentFn:
  """uint8 [B, h, w, 3] -> {"probability", "probability_head1"}: float32 [B, h, w, 1] numpy.

  Args:
    loaded: from `dunet.serving.load_segmenter`.
    tta: average over flipped copies (`dunet.serving.flip_tta`).
    flips: the flips averaged with `tta` (names from `dunet.serving.FLIPS`).

  Returns:
    The segment function.

  Raises:
    ConfigError: with `tta`, no flips or an unknown one.
  """
  if tta:
    for flip in flips:
      if flip not in serving.FLIPS:
        raise ConfigError(f"unknown flip {flip!r}; expected some of {sorted(serving.FLIPS)}")
    if not flips:
      raise ConfigError("--tta needs at least one flip")

  def segment(images: np.ndarray) -> Dict[str, np.ndarray]:
    pixels = tf.convert_to_tensor(images, tf.uint8)
    outputs = serving.flip_tta(loaded.serve, pixels, tuple(flips)) if tta else loaded.serve(pixels)
    return {key: value.numpy() for key, value in outputs.items()}

  return segment


def describe_model(loaded: serving.LoadedSegmenter) -> Dict[str, object]:
  """The "model" section of evaluate's and predict's reports (JSON-ready).

  Holds the source (for an ensemble: every member's checkpoint), kind, input size,
  preprocessing, and what the serve call does beside the plain model call: ensemble members,
  flips averaged inside, tiled inference, post-processing.
  """
  settings = dict(loaded.settings)
  return {
    "source": loaded.source,
    "kind": loaded.kind,
    "input_height": loaded.height,
    "input_width": loaded.width,
    "preprocessing": loaded.preprocessing,
    "members": list(loaded.sources) or [loaded.source],
    "flips": settings.get("flips") or None,
    "tiling": (
      None
      if settings.get("tile_overlap") is None
      else {
        "window": [loaded.height, loaded.width],
        "overlap": settings["tile_overlap"],
        "weighting": "gaussian",
      }
    ),
    "postprocessing": settings.get("postprocessing", "none"),
  }


def batches_by_size(
  items: Iterable[T],
  size_of: Callable[[T], Hashable],
  batch_size: int,
  max_waiting: Optional[int] = None,
) -> Iterator[List[T]]:
  """Groups items into batches whose items share one size (a serve call takes one size).

  Items wait in one queue per size; a full queue is yielded at once. When more than
  `max_waiting` items wait (many different sizes, as in Kvasir-SEG), the longest queue is
  yielded early, so memory stays bounded. The rest are yielded at the end, oldest size first.

  Args:
    items: anything; consumed lazily.
    size_of: an item's size key, e.g. (height, width).
    batch_size: the most items per batch.
    max_waiting: the most items held back (default 4 x batch_size).

  Yields:
    Non-empty lists of items of one size, in arrival order within each list.

  Raises:
    ConfigError: a batch size below 1.
  """
  if batch_size <= 0:
    raise ConfigError(f"batch size must be positive, got {batch_size}")
  max_waiting = max(batch_size, max_waiting or 4 * batch_size)
  waiting: "collections.OrderedDict[Hashable, List[T]]" = collections.OrderedDict()
  held = 0
  for item in items:
    queue = waiting.setdefault(size_of(item), [])
    queue.append(item)
    held += 1
    if len(queue) == batch_size:
      held -= len(queue)
      yield waiting.pop(size_of(item))
    elif held > max_waiting:
      longest = max(waiting, key=lambda key: len(waiting[key]))
      held -= len(waiting[longest])
      yield waiting.pop(longest)
  for queue in waiting.values():
    yield queue


class ImageProgress:
  """A progress line counted in images and updated once per batch, so that its throughput is
  measured over whole batches; at most about `reports` lines when stderr is not a terminal."""

  def __init__(self, total: int, enabled: bool = True, reports: int = 20):
    self.total, self.done = total, 0
    self.every = max(1, total // reports)
    self.bar = ProgressLine(total, 1, every=1, unit="img") if enabled and total > 0 else None

  def advance(self, count: int = 1) -> None:
    """Counts `count` more images done (or skipped)."""
    before, self.done = self.done, self.done + count
    if self.bar is None or count <= 0:
      return
    if (
      self.bar.is_terminal
      or self.done // self.every > before // self.every
      or self.done >= self.total
    ):
      self.bar.update(min(self.done, self.total), {})

  def message(self, text: str) -> None:
    """Prints `text` on stderr on a line of its own (not after a half-written progress line)."""
    if self.bar is not None and self.bar.is_terminal:
      self.bar.stream.write("\r\x1b[2K")
    print(text, file=sys.stderr, flush=True)

  def close(self) -> None:
    """Ends the line if the total was not reached."""
    if self.bar is not None and self.done < self.total:
      self.bar.close()


def encode_png(pixels: np.ndarray) -> bytes:
  """PNG bytes of uint8 [H, W] or RGB [H, W, 3].

  Raises:
    RuntimeError: OpenCV could not encode the array (a bug: the shape or type is wrong).
  """
  if pixels.ndim == 3:
    pixels = pixels[:, :, ::-1]  # OpenCV writes BGR
  ok, buffer = cv2.imencode(".png", np.ascontiguousarray(pixels))
  if not ok:
    raise RuntimeError(f"PNG encoding failed for an array of shape {pixels.shape}")
  return buffer.tobytes()


def _is_image_file(path: Path) -> bool:
  return (
    path.is_file()
    and not path.name.startswith(".")
    and path.suffix.lower() in layouts.IMAGE_EXTENSIONS
  )


def find_inputs(
  entries: Union[str, Sequence[str]], recursive: bool = False, exclude: Optional[PathLike] = None
) -> Tuple[List[Path], List[Dict[str, str]]]:
  """The picture files named by `entries`, and the entries that named nothing.

  Args:
    entries: folders (their image files: extensions in `dunet.data.layouts.IMAGE_EXTENSIONS`,
      case-insensitive, hidden files ignored), glob patterns (the image files they match), or
      files (taken whatever their extension; a missing one is read, fails and is reported like
      any unreadable picture). A string is split at commas.
    recursive: also scan the sub-folders of folders (and let `**` in patterns cross folders).
    exclude: a folder whose files are never taken (the output folder, when it is inside an input
      folder).

  Returns:
    (files in the order given, each folder's and pattern's sorted, the same file only once;
     [{"file": entry, "reason": ...}] for patterns that matched no image file).
  """
  if isinstance(entries, str):
    entries = [entry for entry in entries.split(",")]
  entries = [entry.strip() for entry in entries if entry.strip()]
  excluded = os.path.realpath(exclude) if exclude else None
  found: List[Path] = []
  problems: List[Dict[str, str]] = []
  seen = set()

  def add(path: Path) -> None:
    real = os.path.realpath(path)
    if excluded and (real == excluded or real.startswith(excluded + os.sep)):
      return
    if real not in seen:
      seen.add(real)
      found.append(path)

  for entry in entries:
    path = Path(entry)
    if path.is_dir():
      candidates = path.rglob("*") if recursive else path.iterdir()
      files = sorted(
        p
        for p in candidates
        if _is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)
      )
      if not files:
        logging.warning("%s: no image files (extensions %s)", path, layouts.IMAGE_EXTENSIONS)
      for file in files:
        add(file)
    elif any(character in entry for character in _GLOB_CHARACTERS):
      files = sorted(Path(p) for p in glob.glob(entry, recursive=recursive))
      files = [p for p in files if _is_image_file(p)]
      if not files:
        problems.append({"file": entry, "reason": "no image file matches this pattern"})
      for file in files:
        add(file)
    else:
      add(path)
  return found, problems


def check_unique_stems(paths: Sequence[Path]) -> None:
  """Refuses inputs of which two would write the same output name (outputs are named by stem).

  Raises:
    ConfigError: naming the clashing files.
  """
  by_stem: Dict[str, List[Path]] = collections.defaultdict(list)
  for path in paths:
    by_stem[path.stem].append(path)
  clashes = {stem: files for stem, files in by_stem.items() if len(files) > 1}
  if clashes:
    listed = "; ".join(
      f"{stem!r}: " + ", ".join(str(p) for p in files)
      for stem, files in sorted(clashes.items())[:10]
    )
    raise ConfigError(
      f"{len(clashes)} output name(s) would be written by several inputs (outputs "
      f"are named by file stem): {listed}. Pass a narrower --input (e.g. a glob "
      "like 'folder/*.png') or run once per folder with its own --out_dir"
    )
