"""The data sets the quality benchmark (profiling/quality.py) trains on, built offline.

demo     dunet's synthetic polyp-like demo set (configs/demo.flags): 200 pictures at 64x64,
         split 160/20/20 by the reference rule (dunet/data/demo.py).
nuclei   REAL fluorescence microscopy: the 512x512 image of nuclei from the 2018 Data Science
         Bowl (Caicedo et al., Nature Methods 2019; stage1_train, CC0) with its instance
         labels, as the `stardist` wheel ships it (stardist/data/images/img2d.tif and
         mask2d.tif; stardist is BSD-3-Clause; install it with `pip install -e ".[quality]"`;
         nothing is downloaded at run time and no file of it is copied into this repository).
         The picture is cut into 128x128 tiles by region, so that no pixel of the test or
         validation tiles is ever trained on: rows 0-255 train (tiles every 32 pixels: 65
         overlapping tiles, as random crops would give), rows 256-383 validation and rows
         384-511 test (7 tiles each, every 64 pixels across). Nuclei cover about 20 % of the
         pixels. The grey image is written as RGB, the labels as a 0/255 mask, in the generic
         images/ + masks/ layout, and prepared by dunet's own preparation with that split.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Dict, List

import cv2
import numpy as np

from dunet.data import demo
from dunet.data import prepare

NUCLEI_TILE = 128
# (split, first row, last row (exclusive), step between tiles) of the 512x512 picture.
NUCLEI_REGIONS = (("train", 0, 256, 32), ("valid", 256, 384, 64), ("test", 384, 512, 64))
STARDIST_IMAGE = os.path.join("data", "images", "img2d.tif")
STARDIST_LABELS = os.path.join("data", "images", "mask2d.tif")


class MissingDataPackage(RuntimeError):
  """The package that ships a real data set is not installed (the message says how to get it)."""


def stardist_files() -> Dict[str, str]:
  """Paths of the nuclei picture and labels inside the installed stardist package.

  The package is located, not imported (importing it would load its own TensorFlow models).

  Raises:
    MissingDataPackage: stardist is not installed, or ships no such files.
  """
  spec = importlib.util.find_spec("stardist")
  if spec is None or not spec.submodule_search_locations:
    raise MissingDataPackage(
      "the nuclei data set is the DSB 2018 picture that the stardist "
      'wheel ships: install it with `pip install -e ".[quality]"`'
    )
  root = list(spec.submodule_search_locations)[0]
  files = {
    "image": os.path.join(root, STARDIST_IMAGE),
    "labels": os.path.join(root, STARDIST_LABELS),
  }
  for path in files.values():
    if not os.path.isfile(path):
      raise MissingDataPackage(f"{path} is missing from the installed stardist package")
  return files


def nuclei_tiles(image: np.ndarray, labels: np.ndarray) -> Dict[str, List[tuple]]:
  """{split: [(stem, picture uint8 [T, T, 3] RGB, mask uint8 [T, T] 0/255)]} by region."""
  if image.shape != (512, 512) or labels.shape != (512, 512):
    raise ValueError(f"expected a 512x512 picture and labels, got {image.shape}, {labels.shape}")
  if image.max() > 255:
    raise ValueError(f"the picture holds values up to {image.max()}; expected 8-bit values")
  grey = image.astype(np.uint8)
  mask = np.where(labels > 0, 255, 0).astype(np.uint8)
  tiles: Dict[str, List[tuple]] = {}
  for split, top, bottom, step in NUCLEI_REGIONS:
    tiles[split] = []
    for row in range(top, bottom - NUCLEI_TILE + 1, step):
      for col in range(0, 512 - NUCLEI_TILE + 1, step):
        window = (slice(row, row + NUCLEI_TILE), slice(col, col + NUCLEI_TILE))
        tiles[split].append(
          (
            f"nuclei_{split}_r{row:03d}_c{col:03d}",
            np.repeat(grey[window][:, :, None], 3, axis=2),
            mask[window],
          )
        )
  return tiles


def build_nuclei(root: str) -> str:
  """Writes the nuclei tiles under `root` (raw/ and split.json) and prepares them (prepared/).

  Returns:
    The prepared folder (reused when it is already complete).
  """
  prepared = os.path.join(root, "prepared")
  if os.path.isfile(os.path.join(prepared, prepare.SUMMARY_FILE)):
    return prepared
  files = stardist_files()
  image = cv2.imread(files["image"], cv2.IMREAD_UNCHANGED)
  labels = cv2.imread(files["labels"], cv2.IMREAD_UNCHANGED)
  if image is None or labels is None:
    raise MissingDataPackage(f"cannot read {files['image']} or {files['labels']}")
  raw = os.path.join(root, "raw")
  for folder in ("images", "masks"):
    os.makedirs(os.path.join(raw, folder), exist_ok=True)
  split = {}
  for name, items in nuclei_tiles(image, labels).items():
    split[name] = [stem for stem, _, _ in items]
    for stem, picture, mask in items:
      cv2.imwrite(os.path.join(raw, "images", stem + ".png"), picture[:, :, ::-1])
      cv2.imwrite(os.path.join(raw, "masks", stem + ".png"), mask)
  split_file = os.path.join(root, "split.json")
  with open(split_file, "w") as handle:
    json.dump(split, handle, indent=1)
  prepare.prepare_dataset(
    raw,
    prepared,
    height=NUCLEI_TILE,
    width=NUCLEI_TILE,
    layout="generic",
    split_file=split_file,
    progress=False,
  )
  return prepared


def build_demo(root: str) -> str:
  """The demo config's prepared data (configs/demo.flags: 200 pictures, 64x64, seed 42)."""
  return demo.ensure_demo_data(root, count=200, height=64, width=64, seed=42)


BUILDERS = {"demo": build_demo, "nuclei": build_nuclei}
