"""Folder layouts of the public data sets, as users download them, turned into image/mask pairs.

Each layout maps a raw folder to a sorted list of `Pair`s (one image, one or more mask files). Only
file names are looked at here; the pixels are checked by `dunet.data.readers` during preparation.

| layout     | folder as distributed                                                              |
| ---------- | ---------------------------------------------------------------------------------- |
| `cvc`      | `Original/N.tif` + `Ground Truth/N.tif` (also `GroundTruth/`, `.png` copies)       |
| `kvasir`   | `images/X.jpg` + `masks/X.jpg` (+ `kavsir_bboxes.json`, which is ignored)          |
| `etis`     | `N.tif` (top level or `ETIS-LaribPolypDB/`) + `GroundTruth/pN.tif`                 |
| `isic2018` | `ISIC2018_Task1-2_Training_Input/ISIC_X.jpg` +                                     |
|            | `ISIC2018_Task1_Training_GroundTruth/ISIC_X_segmentation.png`                      |
| `dsb2018`  | `[stage1_train/]<id>/images/<id>.png` + `<id>/masks/*.png` (instance masks, merged)|
| `generic`  | `images/X.*` + `masks/X.*` (mask stems may end in `_segmentation` or `_mask`)      |

Extensions are matched case-insensitively (.png .jpg .jpeg .tif .tiff .bmp); hidden files and
other files (licences, JSON) are ignored. Repackaged copies of ETIS-Larib and Kvasir-SEG that use
`images/` + `masks/` are read by the generic rule whichever of the three names is given.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from absl import logging

from dunet.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

LAYOUTS = ("cvc", "kvasir", "etis", "isic2018", "dsb2018", "generic")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Suffixes that mask files add to their image's stem (ISIC 2018 and common repackagings).
MASK_SUFFIXES = ("_segmentation", "_mask")
ON_ERROR = ("raise", "skip")

_IMAGES_DIRS = ("images", "image")
_MASKS_DIRS = ("masks", "mask")
_CVC_IMAGES_DIRS = ("original",)
_CVC_MASKS_DIRS = ("ground truth", "groundtruth", "ground_truth")
_ETIS_MASKS_DIRS = ("groundtruth", "ground truth")
_ETIS_IMAGES_DIRS = ("etis-laribpolypdb",)
_ISIC_INPUT = re.compile(r"^ISIC2018_Task1-2_(Training|Validation|Test)_Input$", re.IGNORECASE)
_ISIC_TRUTH = re.compile(r"^ISIC2018_Task1_(Training|Validation|Test)_GroundTruth$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Pair:
  """One example: an image and the mask file(s) that label it (DSB 2018: one per instance)."""

  stem: str
  image_path: Path
  mask_paths: Tuple[Path, ...]


@dataclasses.dataclass(frozen=True)
class Problem:
  """A file that cannot be paired, with the reason; `error()` turns it into a DataError."""

  path: str
  problem: str

  def error(self) -> DataError:
    return DataError(self.path, self.problem)


@dataclasses.dataclass
class Scan:
  """What a raw folder holds: the layout used, the pairs found, and the files that did not pair."""

  raw_dir: Path
  layout: str
  pairs: List[Pair]
  problems: List[Problem]


def detect_layout(raw_dir: PathLike) -> str:
  """Names the layout of `raw_dir` from its folder names.

  Args:
    raw_dir: the data set folder as downloaded (or its `stage1_train` parent for DSB 2018).

  Returns:
    One of `LAYOUTS`.

  Raises:
    DataError: the folder is missing, matches no layout, or matches several (pass a layout).
  """
  root = _existing_dir(raw_dir)
  matches = [name for name, rule in _DETECTORS if rule(root)]
  if not matches:
    children = sorted(entry.name for entry in os.scandir(root) if not entry.name.startswith("."))
    raise DataError(
      root,
      "no known data set layout (expected e.g. images/ + masks/, Original/ + "
      "'Ground Truth/', ISIC2018_Task1-2_Training_Input/, or DSB 2018 <id>/images "
      f"folders); it holds {children[:10]}{' ...' if len(children) > 10 else ''}",
    )
  if len(matches) > 1:
    raise DataError(root, f"the folder fits several layouts {matches}: choose one with --layout")
  return matches[0]


def scan(raw_dir: PathLike, layout: str = "auto") -> Scan:
  """Pairs every image of `raw_dir` with its mask(s), collecting files that do not pair.

  Args:
    raw_dir: the data set folder.
    layout: one of `LAYOUTS`, or "auto" to detect it.

  Returns:
    A `Scan` with pairs sorted by stem and the problems found (mask missing for an image or the
    other way round, duplicate stems, DSB folders without an image).

  Raises:
    DataError: unknown layout, missing folder, or no image at all.
  """
  root = _existing_dir(raw_dir)
  if layout == "auto":
    layout = detect_layout(root)
  if layout not in _READERS:
    raise DataError(root, f"unknown layout {layout!r}; expected 'auto' or one of {LAYOUTS}")
  pairs, problems = _READERS[layout](root)
  if not pairs and not problems:
    raise DataError(root, f"no images found (layout {layout}; extensions {IMAGE_EXTENSIONS})")
  pairs.sort(key=lambda pair: pair.stem)
  return Scan(raw_dir=root, layout=layout, pairs=pairs, problems=problems)


def scan_checked(
  raw_dir: PathLike,
  layout: str = "auto",
  *,
  on_error: str = "raise",
  skipped: Optional[List[dict]] = None,
) -> Scan:
  """`scan`, with the files that do not pair either raised or logged and skipped.

  Args:
    raw_dir: the data set folder.
    layout: one of `LAYOUTS` or "auto".
    on_error: "raise" stops at the first file that does not pair; "skip" logs each and goes on.
    skipped: if given, receives {"file", "reason"} for each file left out.

  Returns:
    The Scan (its `problems` are those that were skipped).

  Raises:
    DataError: naming the file, when something does not pair and `on_error` is "raise", or when
      nothing pairs at all.
  """
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
  result = scan(raw_dir, layout)
  for problem in result.problems:
    if on_error == "raise":
      raise problem.error()
    logging.warning("skipped %s: %s", problem.path, problem.problem)
    if skipped is not None:
      skipped.append({"file": problem.path, "reason": problem.problem})
  if not result.pairs:
    raise DataError(result.raw_dir, f"no image/mask pairs found (layout {result.layout})")
  return result


def find_pairs(raw_dir: PathLike, layout: str = "auto", *, on_error: str = "raise") -> List[Pair]:
  """The image/mask pairs of a raw data set, sorted by stem (`scan_checked`'s pairs)."""
  return scan_checked(raw_dir, layout, on_error=on_error).pairs


# ------------------------------------------------------------------------------------------------
# Folder helpers
# ------------------------------------------------------------------------------------------------


def _existing_dir(path: PathLike) -> Path:
  root = Path(path)
  if not root.is_dir():
    raise DataError(root, "not a folder" if root.exists() else "folder does not exist")
  return root


def _child_dir(root: Path, names: Sequence[str]) -> Optional[Path]:
  """The sub-folder of `root` whose lower-cased name is in `names` (first in `names` order)."""
  by_name = {entry.name.lower(): Path(entry.path) for entry in os.scandir(root) if entry.is_dir()}
  for name in names:
    if name in by_name:
      return by_name[name]
  return None


def _image_files(folder: Path) -> List[Path]:
  return sorted(
    Path(entry.path)
    for entry in os.scandir(folder)
    if entry.is_file()
    and not entry.name.startswith(".")
    and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
  )


def _index_by_key(
  files: Iterable[Path], key: Callable[[str], str], problems: List[Problem]
) -> Dict[str, Path]:
  """Maps key(stem) to file, reporting files whose keys collide (e.g. 1.png and 1.tif)."""
  index: Dict[str, Path] = {}
  for path in files:
    name = key(path.stem)
    if name in index:
      problems.append(Problem(str(path), f"duplicate stem {name!r}: also {index[name]}"))
      continue
    index[name] = path
  return index


def _pair_folders(
  image_dir: Path, mask_dir: Path, mask_key: Callable[[str], str]
) -> Tuple[List[Pair], List[Problem]]:
  """Pairs image and mask files whose keys agree; `mask_key` maps a mask stem to its image stem."""
  problems: List[Problem] = []
  images = _index_by_key(_image_files(image_dir), lambda stem: stem, problems)
  masks = _index_by_key(_image_files(mask_dir), mask_key, problems)
  if not images:
    raise DataError(image_dir, f"no images found (extensions {IMAGE_EXTENSIONS})")
  pairs = []
  for stem, image_path in images.items():
    if stem in masks:
      pairs.append(Pair(stem, image_path, (masks[stem],)))
    else:
      problems.append(Problem(str(image_path), f"no mask for this image in {mask_dir}"))
  for stem, mask_path in masks.items():
    if stem not in images:
      problems.append(Problem(str(mask_path), f"no image for this mask in {image_dir}"))
  return pairs, problems


def _strip_mask_suffix(stem: str) -> str:
  for suffix in MASK_SUFFIXES:
    if stem.lower().endswith(suffix) and len(stem) > len(suffix):
      return stem[: -len(suffix)]
  return stem


# ------------------------------------------------------------------------------------------------
# Layouts: a detector (does the folder look like it?) and a reader (the pairs) for each
# ------------------------------------------------------------------------------------------------


def _is_generic(root: Path) -> bool:
  return bool(_child_dir(root, _IMAGES_DIRS) and _child_dir(root, _MASKS_DIRS))


def _is_kvasir(root: Path) -> bool:
  return _is_generic(root) and (root / "kavsir_bboxes.json").is_file()


def _read_generic(root: Path) -> Tuple[List[Pair], List[Problem]]:
  image_dir, mask_dir = _child_dir(root, _IMAGES_DIRS), _child_dir(root, _MASKS_DIRS)
  if image_dir is None or mask_dir is None:
    raise DataError(root, "expected images/ and masks/ sub-folders")
  return _pair_folders(image_dir, mask_dir, _strip_mask_suffix)


def _is_cvc(root: Path) -> bool:
  return bool(_child_dir(root, _CVC_IMAGES_DIRS) and _child_dir(root, _CVC_MASKS_DIRS))


def _read_cvc(root: Path) -> Tuple[List[Pair], List[Problem]]:
  image_dir, mask_dir = _child_dir(root, _CVC_IMAGES_DIRS), _child_dir(root, _CVC_MASKS_DIRS)
  if image_dir is None or mask_dir is None:
    if _is_generic(root):
      return _read_generic(root)
    raise DataError(root, "expected CVC-ClinicDB's Original/ and 'Ground Truth/' sub-folders")
  return _pair_folders(image_dir, mask_dir, lambda stem: stem)


def _etis_image_dir(root: Path) -> Path:
  return _child_dir(root, _ETIS_IMAGES_DIRS) or root


def _is_etis(root: Path) -> bool:
  mask_dir = _child_dir(root, _ETIS_MASKS_DIRS)
  if mask_dir is None or _child_dir(root, _CVC_IMAGES_DIRS):
    return False
  masks = _image_files(mask_dir)
  return (
    bool(masks)
    and all(path.stem.lower().startswith("p") for path in masks)
    and bool(_image_files(_etis_image_dir(root)))
  )


def _read_etis(root: Path) -> Tuple[List[Pair], List[Problem]]:
  mask_dir = _child_dir(root, _ETIS_MASKS_DIRS)
  if mask_dir is None:
    if _is_generic(root):
      return _read_generic(root)
    raise DataError(root, "expected ETIS-Larib's GroundTruth/ sub-folder (masks named pN.tif)")
  return _pair_folders(
    _etis_image_dir(root), mask_dir, lambda stem: stem[1:] if stem[:1] in "pP" else stem
  )


def _isic_dirs(root: Path) -> Optional[Tuple[Path, Path]]:
  """The Task 1 input and ground-truth folders, preferring the Training pair when several exist."""
  inputs, truths = {}, {}
  for entry in os.scandir(root):
    if entry.is_dir():
      for pattern, found in ((_ISIC_INPUT, inputs), (_ISIC_TRUTH, truths)):
        match = pattern.match(entry.name)
        if match:
          found[match.group(1).lower()] = Path(entry.path)
  for part in ("training", "validation", "test"):
    if part in inputs and part in truths:
      return inputs[part], truths[part]
  return None


def _is_isic(root: Path) -> bool:
  return _isic_dirs(root) is not None


def _read_isic(root: Path) -> Tuple[List[Pair], List[Problem]]:
  dirs = _isic_dirs(root)
  if dirs is None:
    if _is_generic(root):
      return _read_generic(root)
    raise DataError(
      root,
      "expected ISIC2018_Task1-2_Training_Input/ and "
      "ISIC2018_Task1_Training_GroundTruth/ sub-folders",
    )
  return _pair_folders(dirs[0], dirs[1], _strip_mask_suffix)


def _dsb_root(root: Path) -> Path:
  return _child_dir(root, ("stage1_train",)) or root


def _is_dsb_sample(folder: Path) -> bool:
  return (folder / "images").is_dir() and (folder / "masks").is_dir()


def _is_dsb(root: Path) -> bool:
  base = _dsb_root(root)
  if _is_generic(base):
    return False
  samples = [Path(entry.path) for entry in os.scandir(base) if entry.is_dir()]
  return bool(samples) and any(_is_dsb_sample(sample) for sample in samples)


def _read_dsb(root: Path) -> Tuple[List[Pair], List[Problem]]:
  base = _dsb_root(root)
  pairs, problems = [], []
  for sample in sorted(
    Path(entry.path)
    for entry in os.scandir(base)
    if entry.is_dir() and not entry.name.startswith(".")
  ):
    images = _image_files(sample / "images") if (sample / "images").is_dir() else []
    masks = _image_files(sample / "masks") if (sample / "masks").is_dir() else []
    if len(images) != 1:
      problems.append(Problem(str(sample / "images"), f"expected one image, found {len(images)}"))
    elif not masks:
      problems.append(Problem(str(images[0]), f"no mask for this image in {sample / 'masks'}"))
    else:
      pairs.append(Pair(sample.name, images[0], tuple(masks)))
  if not pairs and not problems:
    raise DataError(base, "no DSB 2018 sample folders (<id>/images/<id>.png, <id>/masks/*.png)")
  return pairs, problems


# Order matters only for the error message listing several matches.
_DETECTORS = (
  ("cvc", _is_cvc),
  ("kvasir", _is_kvasir),
  ("etis", _is_etis),
  ("isic2018", _is_isic),
  ("dsb2018", _is_dsb),
  ("generic", lambda root: _is_generic(root) and not _is_kvasir(root)),
)
_READERS = {
  "cvc": _read_cvc,
  "kvasir": _read_generic,
  "etis": _read_etis,
  "isic2018": _read_isic,
  "dsb2018": _read_dsb,
  "generic": _read_generic,
}
