"""Builders of tiny raw data sets in every layout, and a small prepared demo set shared by tests."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Tuple

import cv2
import numpy as np
import pytest

from dunet.data import demo, prepare

SIZE = (48, 64)  # (height, width) of raw test images


def picture(seed: int, size: Tuple[int, int] = SIZE) -> Tuple[np.ndarray, np.ndarray]:
  """A random RGB image and a binary mask (a rectangle) of `size`, from `seed`."""
  rng = np.random.default_rng(seed)
  height, width = size
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  mask = np.zeros((height, width), np.uint8)
  top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
  mask[top:top + height // 3, left:left + width // 3] = 1
  return image, mask


def write_rgb(path: Path, image: np.ndarray) -> Path:
  """Writes an RGB uint8 array (any extension OpenCV knows; lossless unless .jpg)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = image[:, :, ::-1] if image.ndim == 3 and image.shape[2] == 3 else image
  assert cv2.imwrite(str(path), pixels), path
  return path


def write_mask(path: Path, mask: np.ndarray, value: int = 255) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  assert cv2.imwrite(str(path), (mask * value).astype(np.uint8)), path
  return path


def make_pairs(image_dir: Path, mask_dir: Path, stems: Iterable[str], *, image_ext: str = ".png",
               mask_ext: str = ".png", mask_name=lambda stem: stem,
               seed: int = 0) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """Writes one image/mask pair per stem; returns what was written."""
  written = {}
  for index, stem in enumerate(stems):
    image, mask = picture(seed + index)
    write_rgb(image_dir / f"{stem}{image_ext}", image)
    write_mask(mask_dir / f"{mask_name(stem)}{mask_ext}", mask)
    written[stem] = (image, mask)
  return written


def make_generic(root: Path, count: int = 10, **kwargs) -> Dict[str, Tuple[np.ndarray,
                                                                         np.ndarray]]:
  return make_pairs(root / "images", root / "masks", [f"img{i:02d}" for i in range(count)],
                    **kwargs)


@pytest.fixture(scope="session")
def demo_prepared(tmp_path_factory) -> Path:
  """40 demo pictures (64x64) prepared at 64x64: 32 train, 4 valid, 4 test, 2 train shards."""
  root = tmp_path_factory.mktemp("demo")
  raw = demo.generate_demo_dataset(root / "raw", count=40, height=64, width=64, seed=3)
  out = root / "prepared"
  prepare.prepare_dataset(raw, out, height=64, width=64, num_shards=2, progress=False)
  return out
