"""The synthetic demo data set: deterministic, varied, not solvable by colour, ready to train."""

import shutil
from pathlib import Path

import cv2
import numpy as np

from dunet.data import demo, folds, layouts, pipeline, prepare, splits


def files(folder):
  return {
    path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*.png"))
  }


def test_same_seed_same_bytes_and_pictures_independent_of_count(tmp_path):
  first = files(demo.generate_demo_dataset(tmp_path / "a", count=6, height=64, width=64, seed=1))
  second = files(demo.generate_demo_dataset(tmp_path / "b", count=6, height=64, width=64, seed=1))
  fewer = files(demo.generate_demo_dataset(tmp_path / "c", count=3, height=64, width=64, seed=1))
  other = files(demo.generate_demo_dataset(tmp_path / "d", count=6, height=64, width=64, seed=2))
  assert len(first) == 12 and first == second
  assert all(first[name] == data for name, data in fewer.items())
  assert all(first[name] != other[name] for name in first if name.startswith("images/"))


def test_written_in_the_generic_layout_with_binary_masks(tmp_path):
  raw = demo.generate_demo_dataset(tmp_path / "raw", count=4, height=64, width=96, seed=0)
  assert layouts.detect_layout(raw) == "generic"
  pairs = layouts.find_pairs(raw)
  assert [pair.stem for pair in pairs] == [f"demo_{i:04d}" for i in range(4)]
  image = cv2.imread(str(pairs[0].image_path), cv2.IMREAD_UNCHANGED)
  mask = cv2.imread(str(pairs[0].mask_paths[0]), cv2.IMREAD_UNCHANGED)
  assert image.shape == (64, 96, 3) and mask.shape == (64, 96)
  assert set(np.unique(mask)) <= {0, 255}


def test_varied_polyps_including_pictures_without_any():
  masks = [demo.draw_example(0, index, 64, 64)[1] for index in range(60)]
  counts = [cv2.connectedComponents(mask)[0] - 1 for mask in masks]
  fractions = np.array([mask.mean() for mask in masks])
  assert 0 in counts and max(counts) >= 2
  assert 3 <= counts.count(0) <= 20  # about 15% empty
  positive = fractions[fractions > 0]
  assert positive.min() < 0.03 and positive.max() > 0.15  # small and large polyps
  assert 0.03 < fractions.mean() < 0.3


def test_colour_alone_does_not_find_the_polyps():
  """The best per-pixel quadratic colour classifier, fit on the pictures themselves, is poor."""
  pictures = [demo.draw_example(0, index, 64, 64) for index in range(40)]
  colours = np.concatenate([image.reshape(-1, 3) for image, _ in pictures]) / 255.0
  truth = np.concatenate([mask.reshape(-1) for _, mask in pictures]).astype(bool)
  red, green, blue = colours.T
  features = np.stack(
    [
      red,
      green,
      blue,
      red**2,
      green**2,
      blue**2,
      red * green,
      red * blue,
      green * blue,
      np.ones_like(red),
    ],
    axis=1,
  )
  weights, *_ = np.linalg.lstsq(features, truth.astype(float), rcond=None)
  scores = features @ weights
  best = 0.0
  for threshold in np.quantile(scores, np.linspace(0.5, 0.995, 50)):
    predicted = scores > threshold
    best = max(best, 2 * np.sum(predicted & truth) / (predicted.sum() + truth.sum()))
  assert best < 0.5


def _spy(monkeypatch, module, name):
  """Replaces module.name by a wrapper that records each call's arguments; returns the list."""
  calls = []
  original = getattr(module, name)

  def recording(*args, **kwargs):
    calls.append((args, kwargs))
    return original(*args, **kwargs)

  monkeypatch.setattr(module, name, recording)
  return calls


def test_each_picture_is_drawn_once(tmp_path, monkeypatch):
  """Generation draws each picture once, by index (how fast a draw is: not a test's business)."""
  draws = _spy(monkeypatch, demo, "draw_example")
  demo.generate_demo_dataset(tmp_path / "raw", count=5, height=32, width=48, seed=2)
  assert sorted(args for args, _ in draws) == [(2, index, 32, 48) for index in range(5)]


def test_ensure_demo_data_prepares_once(tmp_path, monkeypatch):
  draws = _spy(monkeypatch, demo, "draw_example")
  preparations = _spy(monkeypatch, prepare, "prepare_dataset")
  prepared = demo.ensure_demo_data(tmp_path, count=20, height=32, width=32, seed=4)
  assert (len(draws), len(preparations)) == (20, 1)
  assert pipeline.count_examples(prepared, "train") == 16
  assert pipeline.read_data_info(prepared)["height"] == 32
  summary = Path(prepared) / "summary.json"
  stamp = summary.stat().st_mtime_ns
  # The second call reuses everything: nothing drawn, nothing prepared, nothing rewritten.
  assert demo.ensure_demo_data(tmp_path, count=20, height=32, width=32, seed=4) == prepared
  assert (len(draws), len(preparations)) == (20, 1)
  assert summary.stat().st_mtime_ns == stamp
  assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
  # Prepared records lost, raw pictures kept: prepared again from them, not redrawn.
  shutil.rmtree(prepared)
  assert demo.ensure_demo_data(tmp_path, count=20, height=32, width=32, seed=4) == prepared
  assert (len(draws), len(preparations)) == (20, 2)


def test_ensure_demo_data_in_folds_beside_the_plain_one(tmp_path, monkeypatch):
  draws = _spy(monkeypatch, demo, "draw_example")
  plain = demo.ensure_demo_data(tmp_path, count=12, height=32, width=32, seed=4)
  folded = demo.ensure_demo_data(tmp_path, count=12, height=32, width=32, seed=4, folds=3)
  assert Path(folded).name == Path(plain).name + "-folds3"
  assert len(draws) == 12  # the same raw pictures, drawn once
  assert folds.num_folds(folded) == 3 and folds.num_folds(plain) == 0
  counts = pipeline.read_data_info(folded)["counts"]
  # 12 pictures: 1 test, 11 train+valid in folds of 4, 4 and 3; the test split as the plain one's.
  assert counts == {"fold_0": 4, "fold_1": 4, "fold_2": 3, "test": 1}
  assert splits.read_split(Path(folded) / "split.json") == splits.read_split(
    Path(plain) / "split.json"
  )
  assert demo.ensure_demo_data(tmp_path, count=12, height=32, width=32, seed=4, folds=3) == folded
