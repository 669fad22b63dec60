"""Builders of tiny raw data sets in every layout, shared by the data tests (and others)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Tuple

import cv2
import numpy as np

SIZE = (48, 64)  # (height, width) of raw test images


def picture(seed: int, size: Tuple[int, int] = SIZE) -> Tuple[np.ndarray, np.ndarray]:
  """A random RGB image and a binary mask (a rectangle) of `size`, from `seed`."""
  rng = np.random.default_rng(seed)
  height, width = size
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  mask = np.zeros((height, width), np.uint8)
  top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
  mask[top : top + height // 3, left : left + width // 3] = 1
  return image, mask


def write_rgb(path: Path, image: np.ndarray) -> Path:
  """Writes an RGB uint8 array (any extension OpenCV knows; lossless unless .jpg)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = image[:, :, ::-1] if image.ndim == 3 and image.shape[2] == 3 else image
  assert cv2.imwrite(str(path), pixels), path
  return path


def write_mask(path: Path, mask: np.ndarray, value: int = 255) -> Path:
  """Writes a 0/1 mask as uint8 `mask * value` (lossless unless .jpg)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  assert cv2.imwrite(str(path), (mask * value).astype(np.uint8)), path
  return path


def make_pairs(
  image_dir: Path,
  mask_dir: Path,
  stems: Iterable[str],
  *,
  image_ext: str = ".png",
  mask_ext: str = ".png",
  mask_name=lambda stem: stem,
  seed: int = 0,
) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """Writes one image/mask pair per stem; returns what was written."""
  written = {}
  for index, stem in enumerate(stems):
    image, mask = picture(seed + index)
    write_rgb(image_dir / f"{stem}{image_ext}", image)
    write_mask(mask_dir / f"{mask_name(stem)}{mask_ext}", mask)
    written[stem] = (image, mask)
  return written


def make_generic(root: Path, count: int = 10, **kwargs) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """Writes `count` pairs in the generic layout (root/images, root/masks); returns them."""
  return make_pairs(
    root / "images", root / "masks", [f"img{i:02d}" for i in range(count)], **kwargs
  )
