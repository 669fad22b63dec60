"""A synthetic, polyp-like demo data set, generated deterministically from a seed.

No real data set may be shipped, so the demo configuration trains on pictures drawn here: mucosa
(a reddish base colour varying across the picture, endoscope lighting with a dark rim, fine
texture, folds with a shadow and a lit ridge, vessels), specular highlights, and 0 to 3 polyps:
domes with irregular outlines, lit from the light's direction, with their own surface texture
and highlights. Flat discoloured patches of polyp-like colour are added as distractors, and polyp
colours are drawn darker or lighter than the mucosa, so colour alone does not find the polyps:
shape, shading and outline do.

The pictures are written in the generic layout (`images/demo_NNNN.png`, `masks/demo_NNNN.png`
with values {0, 255}) and then go through the same reader and preparation as real data.
Example i depends only on (seed, i): a larger count adds pictures and keeps the others.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

import cv2
import numpy as np
from absl import logging

from dunet.data import prepare
from dunet.errors import DataError

PathLike = Union[str, os.PathLike]

DEFAULT_ROOT = "data/demo"
# Raw pictures are drawn at least this large, then prepared at the size asked for.
MIN_RAW_SIZE = 128
# Share of pictures with 0, 1, 2, 3 polyps.
_POLYP_COUNT_WEIGHTS = (0.15, 0.55, 0.22, 0.08)


def generate_demo_dataset(
  out_raw_dir: PathLike, *, count: int = 200, height: int = 128, width: int = 128, seed: int = 0
) -> Path:
  """Draws the demo pictures into `out_raw_dir` (images/ + masks/), atomically.

  Args:
    out_raw_dir: folder to create (must not exist, or be empty).
    count: number of pictures.
    height: picture height in pixels.
    width: picture width in pixels.
    seed: same seed, same bytes.

  Returns:
    `out_raw_dir` as a Path.
  """
  if count <= 0 or height < 16 or width < 16:
    raise ValueError(
      f"need count > 0 and a size of at least 16x16, got {count} of {height}x{width}"
    )
  out_raw_dir = Path(out_raw_dir)
  if out_raw_dir.exists() and any(out_raw_dir.iterdir()):
    raise DataError(out_raw_dir, "already exists and is not empty")
  out_raw_dir.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{out_raw_dir.name}.partial-", dir=out_raw_dir.parent))
  try:
    (staging / "images").mkdir()
    (staging / "masks").mkdir()
    for index in range(count):
      image, mask = draw_example(seed, index, height, width)
      name = f"demo_{index:04d}.png"
      _write_png(staging / "images" / name, image[:, :, ::-1])
      _write_png(staging / "masks" / name, mask * 255)
    if out_raw_dir.is_dir():
      out_raw_dir.rmdir()
    staging.rename(out_raw_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return out_raw_dir


def ensure_demo_data(
  root: Optional[PathLike] = None,
  *,
  count: int = 200,
  height: int = 128,
  width: int = 128,
  seed: int = 0,
  folds: int = 0,
) -> str:
  """The prepared demo data folder, generated and prepared on first use.

  Raw pictures go to `root/raw-s{seed}-n{count}-{H}x{W}` and prepared records to
  `root/prepared-s{seed}-n{count}-{height}x{width}` (with folds: `...-folds{K}`, prepared in K
  cross-validation folds from the same raw pictures and split); both are reused when already
  complete, so the trainer can call this on every start (also from several workers at once).

  Args:
    root: folder for the demo data (None: data/demo).
    count: number of pictures.
    height: prepared height.
    width: prepared width.
    seed: picture, split and folds seed.
    folds: K >= 2: prepare in K folds (`prepare.prepare_dataset(folds=K)`); 0: no folds.

  Returns:
    The prepared folder, for `dunet.data.pipeline`.
  """
  root = Path(root or DEFAULT_ROOT)
  raw_height, raw_width = max(height, MIN_RAW_SIZE), max(width, MIN_RAW_SIZE)
  raw_dir = root / f"raw-s{seed}-n{count}-{raw_height}x{raw_width}"
  prepared_dir = root / f"prepared-s{seed}-n{count}-{height}x{width}"
  if folds:
    prepared_dir = prepared_dir.with_name(f"{prepared_dir.name}-folds{folds}")
  if (prepared_dir / prepare.SUMMARY_FILE).is_file():
    return str(prepared_dir)
  if not (raw_dir / "images").is_dir():
    logging.info("drawing %d demo pictures into %s", count, raw_dir)
    try:
      generate_demo_dataset(raw_dir, count=count, height=raw_height, width=raw_width, seed=seed)
    except (DataError, OSError):
      if not (raw_dir / "images").is_dir():  # not another process finishing first
        raise
  try:
    prepare.prepare_dataset(
      raw_dir,
      prepared_dir,
      height=height,
      width=width,
      layout="generic",
      seed=seed,
      progress=False,
      folds=folds,
    )
  except (DataError, OSError):
    if not (prepared_dir / prepare.SUMMARY_FILE).is_file():
      raise
  return str(prepared_dir)


def draw_example(seed: int, index: int, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
  """Picture `index` of the demo set drawn from `seed`.

  Returns:
    (uint8 RGB [height, width, 3], uint8 {0, 1} mask [height, width]).
  """
  rng = np.random.default_rng([seed, index])
  size = min(height, width)
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)

  # Mucosa: base colour, slow colour drift, light falloff from a moving light centre.
  base = np.array([rng.uniform(170, 230), rng.uniform(85, 135), rng.uniform(70, 110)], np.float32)
  # Mostly a brightness drift, with a little hue variation (real mucosa is not one colour).
  colour_drift = _smooth_noise(rng, height, width, cells=3, channels=1)[:, :, None] * rng.uniform(
    8, 20
  ) * (base / base.max()) + _smooth_noise(rng, height, width, cells=3, channels=3) * rng.uniform(
    2, 6
  )
  light_y, light_x = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
  distance = np.hypot((ys - light_y) / size, (xs - light_x) / size)
  illumination = np.clip(1.15 - rng.uniform(0.5, 0.9) * distance**1.5, 0.25, 1.2)
  image = base + colour_drift
  grain = cv2.GaussianBlur(
    _smooth_noise(rng, height, width, cells=size // 5, channels=1), (0, 0), size / 128
  )
  image += (grain * rng.uniform(6, 14))[:, :, None]

  shading = np.zeros((height, width), np.float32)
  for _ in range(rng.integers(1, 5)):
    shading += _fold(rng, ys, xs, size)
  _draw_vessels(rng, image, size)

  # Distractors: flat discoloured patches, polyp-coloured but without relief or highlights.
  # Darker or lighter than the mucosa, redder or paler: the sign varies between pictures.
  polyp_tint = np.array(
    [rng.uniform(-20, 25), rng.uniform(-25, 10), rng.uniform(-20, 15)], np.float32
  )
  for _ in range(rng.integers(0, 3)):
    inside = _blob(rng, ys, xs, size, radius_range=(0.05, 0.15))[0]
    soft = cv2.GaussianBlur(inside.astype(np.float32), (0, 0), 1.5)
    image += soft[:, :, None] * (polyp_tint * rng.uniform(0.6, 1.0))

  mask = np.zeros((height, width), np.uint8)
  highlights = np.zeros((height, width), np.float32)
  polyps = rng.choice(len(_POLYP_COUNT_WEIGHTS), p=_POLYP_COUNT_WEIGHTS)
  for _ in range(polyps):
    inside, dome, normal_y, normal_x = _blob(rng, ys, xs, size, radius_range=(0.08, 0.26))
    mask |= inside.astype(np.uint8)
    soft = cv2.GaussianBlur(inside.astype(np.float32), (0, 0), 0.7)
    tint = polyp_tint + rng.normal(0, 6, 3).astype(np.float32)
    texture = cv2.GaussianBlur(
      _smooth_noise(rng, height, width, cells=size // 4, channels=1), (0, 0), size / 160
    ) * rng.uniform(4, 10)
    image += soft[:, :, None] * (tint + texture[:, :, None])
    # Lambertian relief lit from the light centre's side, plus a shadow ring at the base.
    light = np.array([light_y - ys.mean(), light_x - xs.mean(), size], np.float32)
    light /= np.linalg.norm(light)
    lit = (
      normal_y * light[0]
      + normal_x * light[1]
      + np.sqrt(np.clip(1 - normal_y**2 - normal_x**2, 0, 1)) * light[2]
    )
    shading += soft * (rng.uniform(0.35, 0.6) * (lit - 0.75))
    rim = soft * (1 - soft) * 4
    shading -= rim * rng.uniform(0.05, 0.2)
    # Specular spots near the dome's top, towards the light.
    spot_weight = np.clip(lit - 0.9, 0, None) * dome
    if spot_weight.max() > 0:
      highlights += _specular_spots(rng, spot_weight, rng.integers(1, 4), size)

  highlights += _specular_spots(rng, np.clip(shading, 0, None) + 0.02, rng.integers(1, 6), size)
  image = image * (illumination * (1 + shading))[:, :, None]
  image += np.clip(highlights, 0, 1)[:, :, None] * 255
  image += rng.normal(0, 2.0, image.shape).astype(np.float32)
  image = cv2.GaussianBlur(image, (0, 0), 0.6)
  return np.clip(np.round(image), 0, 255).astype(np.uint8), mask


def _smooth_noise(
  rng: np.random.Generator, height: int, width: int, cells: int, channels: int
) -> np.ndarray:
  """Gaussian noise on a coarse grid, bicubically upsampled: values of order 1."""
  cells = max(2, int(cells))
  coarse = rng.normal(0, 1, (cells, cells, channels)).astype(np.float32)
  smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
  return smooth.reshape(height, width, channels) if channels > 1 else smooth.reshape(height, width)


def _fold(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, size: int) -> np.ndarray:
  """A mucosal fold: a wavy line with a dark shadow on one side and a lit ridge on the other."""
  angle = rng.uniform(0, np.pi)
  u = xs * np.cos(angle) + ys * np.sin(angle)
  v = -xs * np.sin(angle) + ys * np.cos(angle)
  centre = rng.uniform(-0.5, 1.2) * size
  curve = (
    centre
    + rng.uniform(0.03, 0.12)
    * size
    * np.sin(u / size * rng.uniform(2, 7) + rng.uniform(0, 2 * np.pi))
    + rng.uniform(-0.2, 0.2) * u
  )
  distance = (v - curve) / size
  width = rng.uniform(0.015, 0.04)
  return -rng.uniform(0.15, 0.35) * np.exp(-((distance / width) ** 2)) + rng.uniform(
    0.05, 0.15
  ) * np.exp(-(((distance - 1.5 * width) / (1.5 * width)) ** 2))


def _draw_vessels(rng: np.random.Generator, image: np.ndarray, size: int) -> None:
  """Thin dark-red random walks, blended into the mucosa."""
  layer = np.zeros(image.shape[:2], np.float32)
  height, width = image.shape[:2]
  for _ in range(rng.integers(2, 7)):
    point = np.array([rng.uniform(0, width), rng.uniform(0, height)])
    heading = rng.uniform(0, 2 * np.pi)
    points = [point.copy()]
    for _ in range(rng.integers(6, 16)):
      heading += rng.normal(0, 0.5)
      point = point + size * 0.05 * np.array([np.cos(heading), np.sin(heading)])
      points.append(point.copy())
    cv2.polylines(
      layer,
      [np.round(np.array(points)).astype(np.int32)],
      False,
      float(rng.uniform(0.3, 0.7)),
      1,
      cv2.LINE_AA,
    )
  layer = cv2.GaussianBlur(layer, (0, 0), 0.5)
  image -= layer[:, :, None] * np.array([70, 80, 50], np.float32)


def _blob(
  rng: np.random.Generator,
  ys: np.ndarray,
  xs: np.ndarray,
  size: int,
  radius_range: Tuple[float, float],
):
  """An irregular rounded shape: (inside mask, dome height, dome normal y, dome normal x)."""
  height, width = ys.shape
  radius = rng.uniform(*radius_range) * size
  centre_y = rng.uniform(radius * 0.5, height - radius * 0.5)
  centre_x = rng.uniform(radius * 0.5, width - radius * 0.5)
  aspect, tilt = rng.uniform(0.65, 1.0), rng.uniform(0, np.pi)
  dy, dx = ys - centre_y, xs - centre_x
  along = dx * np.cos(tilt) + dy * np.sin(tilt)
  across = (-dx * np.sin(tilt) + dy * np.cos(tilt)) / aspect
  theta = np.arctan2(across, along)
  outline = np.ones_like(theta)
  for harmonic in (2, 3, 4, 5):
    outline += rng.uniform(0, 0.12 / harmonic * 2) * np.cos(
      harmonic * theta + rng.uniform(0, 2 * np.pi)
    )
  rho = np.hypot(along, across) / (radius * outline)
  inside = rho < 1.0
  dome = np.sqrt(np.clip(1 - rho**2, 0, 1))
  # Surface normal of the dome (as seen from above), in image coordinates.
  grad_y, grad_x = np.gradient(dome * radius)
  norm = np.sqrt(1 + grad_y**2 + grad_x**2)
  normal_y, normal_x = -grad_y / norm, -grad_x / norm
  return inside, dome, normal_y * inside, normal_x * inside


def _specular_spots(
  rng: np.random.Generator, weight: np.ndarray, count: int, size: int
) -> np.ndarray:
  """Small bright ellipses at positions drawn with probability proportional to `weight`."""
  layer = np.zeros(weight.shape, np.float32)
  flat = weight.ravel().astype(np.float64)
  if flat.sum() <= 0:
    return layer
  positions = rng.choice(flat.size, size=int(count), p=flat / flat.sum())
  for position in positions:
    y, x = divmod(int(position), weight.shape[1])
    axes = (
      max(1, int(rng.uniform(0.005, 0.02) * size)),
      max(1, int(rng.uniform(0.005, 0.012) * size)),
    )
    cv2.ellipse(layer, (x, y), axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1, cv2.LINE_AA)
  return cv2.GaussianBlur(layer, (0, 0), 0.6)


def _write_png(path: Path, pixels: np.ndarray) -> None:
  ok, buffer = cv2.imencode(".png", pixels)
  if not ok:
    raise RuntimeError(f"PNG encoding failed for {path}")
  path.write_bytes(buffer.tobytes())
