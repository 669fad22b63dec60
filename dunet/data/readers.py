"""Reading raw images and masks with checks: every problem is a DataError naming the file.

Images come back as uint8 RGB [H, W, 3] whatever they were on disk (16-bit is scaled by 255/65535,
grayscale is repeated over three channels, an alpha channel is dropped); masks come back as uint8
{0, 1} [H, W]. Each conversion is reported in `notes`, so preparation can log and count it.
Offline code: numpy and OpenCV.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Tuple, TypeVar

import cv2
import numpy as np

from dunet.errors import DataError
from dunet.data.layouts import Pair

T = TypeVar("T")

_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND\xaeB`\x82"


@dataclasses.dataclass
class Example:
  """A decoded, checked pair at its original resolution."""

  stem: str
  image: np.ndarray  # uint8 [H, W, 3], RGB
  mask: np.ndarray  # uint8 [H, W], values {0, 1}
  notes: List[str]  # conversions applied, each naming its file


def read_pair(pair: Pair) -> Example:
  """Reads and checks one pair.

  Args:
    pair: from `dunet.data.layouts.find_pairs`.

  Returns:
    The decoded example; its mask is the union of `pair.mask_paths` (DSB 2018 instances).

  Raises:
    DataError: naming the file: empty, truncated or undecodable file, unsupported pixel type, or
      an image and mask of different sizes.
  """
  image, notes = read_image(pair.image_path)
  mask, mask_notes = read_mask(pair.mask_paths, expected_shape=image.shape[:2])
  return Example(pair.stem, image, mask, notes + mask_notes)


def read_image(path: Path) -> Tuple[np.ndarray, List[str]]:
  """Reads an image file as uint8 RGB [H, W, 3].

  Args:
    path: a .png, .jpg, .tif or .bmp file.

  Returns:
    The image and the conversions applied (e.g. "16-bit scaled to 8-bit").

  Raises:
    DataError: naming `path`.
  """
  pixels = _decode(path)
  notes: List[str] = []
  pixels = _to_uint8(path, pixels, notes)
  if pixels.ndim == 2:
    notes.append(f"{path}: grayscale image repeated over RGB")
    return np.repeat(pixels[:, :, None], 3, axis=2), notes
  channels = pixels.shape[2]
  if channels == 1:
    notes.append(f"{path}: grayscale image repeated over RGB")
    return np.repeat(pixels, 3, axis=2), notes
  if channels == 4:
    notes.append(f"{path}: alpha channel dropped")
    pixels = pixels[:, :, :3]
  elif channels != 3:
    raise DataError(path, f"unsupported image with {channels} channels (expected 1, 3 or 4)")
  return np.ascontiguousarray(pixels[:, :, ::-1]), notes  # OpenCV decodes BGR


def read_mask(
  paths: Sequence[Path], expected_shape: Tuple[int, int]
) -> Tuple[np.ndarray, List[str]]:
  """Reads mask file(s) as one uint8 {0, 1} [H, W] mask: the union of all of them.

  A mask whose pixels take more than two values (JPEG-compressed masks, soft masks) is thresholded
  at half its type's range (128 of 0..255, 32768 of 0..65535; 0.5 for floats) and a note says so;
  a mask with values {0, v} maps v to 1; colour masks use the brightest colour channel.

  Args:
    paths: one file, or several instance masks (DSB 2018).
    expected_shape: the image's (height, width); each mask must match it.

  Returns:
    The mask and the conversions applied.

  Raises:
    DataError: naming the mask file.
  """
  union = np.zeros(expected_shape, np.uint8)
  notes: List[str] = []
  for path in paths:
    pixels = _decode(path)
    if pixels.ndim == 3:
      if pixels.shape[2] not in (1, 3, 4):
        raise DataError(path, f"unsupported mask with {pixels.shape[2]} channels")
      pixels = pixels[:, :, :3].max(axis=2)
    if pixels.shape != tuple(expected_shape):
      raise DataError(
        path,
        f"mask is {pixels.shape[0]}x{pixels.shape[1]} but its image is "
        f"{expected_shape[0]}x{expected_shape[1]} (height x width)",
      )
    union |= _binarize(path, pixels, notes)
  return union, notes


def _decode(path: Path) -> np.ndarray:
  path = Path(path)
  try:
    data = path.read_bytes()
  except OSError as error:
    raise DataError(path, f"cannot read file: {error.strerror or error}") from error
  if not data:
    raise DataError(path, "empty file (0 bytes)")
  # OpenCV decodes a truncated JPEG or PNG partially (grey or black rows, a warning on stderr);
  # check for the end markers so that such files are reported instead of silently used.
  if data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00")[-2:] == _JPEG_END:
    raise DataError(path, "truncated JPEG (no end-of-image marker)")
  if data[:8] == b"\x89PNG\r\n\x1a\n" and _PNG_END not in data[-16:]:
    raise DataError(path, "truncated PNG (no IEND chunk)")
  pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if pixels is None or pixels.size == 0:
    raise DataError(path, "cannot decode the image (corrupt or not an image)")
  return pixels


def _to_uint8(path: Path, pixels: np.ndarray, notes: List[str]) -> np.ndarray:
  if pixels.dtype == np.uint8:
    return pixels
  if pixels.dtype == np.uint16:
    notes.append(f"{path}: 16-bit image scaled to 8-bit (x 255/65535)")
    return np.round(pixels.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
  raise DataError(path, f"unsupported pixel type {pixels.dtype} (expected 8- or 16-bit)")


def _binarize(path: Path, pixels: np.ndarray, notes: List[str]) -> np.ndarray:
  values = np.unique(pixels)
  if len(values) <= 2 and values[0] == 0 or len(values) == 1:
    return (pixels > 0).astype(np.uint8)
  if np.issubdtype(pixels.dtype, np.integer):
    threshold = (int(np.iinfo(pixels.dtype).max) + 1) // 2
  else:
    threshold = 0.5
  notes.append(
    f"{path}: mask is not binary ({len(values)} values from {values[0]} to "
    f"{values[-1]}); thresholded at {threshold}"
  )
  return (pixels >= threshold).astype(np.uint8)


def ordered_map(
  function: Callable[[T], object], items: Sequence[T], workers: int
) -> Iterator[object]:
  """`map(function, items)` on a few threads, results in order, at most 4 x `workers` ahead.

  OpenCV decodes and resizes without holding the GIL, so threads read pictures in parallel; the
  window bounds how many decoded pictures wait in memory.
  """
  if workers <= 1:
    yield from map(function, items)
    return
  window = 4 * workers
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending: "collections.deque[concurrent.futures.Future]" = collections.deque()
    for item in items:
      pending.append(pool.submit(function, item))
      if len(pending) >= window:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
