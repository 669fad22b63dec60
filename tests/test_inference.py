"""dunet/inference.py: the segment call with test-time augmentation, batching by size, PNG
encoding, input discovery and duplicate output names (no model: stand-ins or plain arrays)."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

from dunet import inference
from dunet import serving
from dunet.errors import ConfigError


def test_find_inputs(tmp_path):
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  for name in ("a.png", "b.png", "c.png", "d.png", "notes.txt"):
    (inputs / name).write_bytes(b"")  # found by name: nothing is read here
  # Lists mix files, patterns and folders; a file named twice is taken once; patterns that match
  # nothing are reported; listed files are taken whatever their extension.
  paths, problems = inference.find_inputs(
    f"{inputs}/a.png, {inputs}/[bc].png,{inputs}/a.png,{inputs}/nothing*.png,{inputs}/notes.txt"
  )
  assert [path.name for path in paths] == ["a.png", "b.png", "c.png", "notes.txt"]
  assert problems == [
    {"file": f"{inputs}/nothing*.png", "reason": "no image file matches this pattern"}
  ]
  # Folders: image extensions only (any case), no hidden files; sub-folders only if recursive;
  # the output folder is never read back.
  folders = tmp_path / "folders"
  (folders / "sub").mkdir(parents=True)
  (folders / "out" / "masks").mkdir(parents=True)
  for name in ("x.PNG", "sub/y.tif", "out/masks/x.png", "z.json"):
    (folders / name).write_bytes(b"")
  assert [p.name for p in inference.find_inputs(str(folders))[0]] == ["x.PNG"]
  found = inference.find_inputs([str(folders)], recursive=True, exclude=folders / "out")[0]
  assert sorted(p.name for p in found) == ["x.PNG", "y.tif"]


def test_duplicate_stems_name_the_files():
  paths = [Path(name) for name in ("one/1.png", "two/1.png", "two/2.png", "two/2.tif", "3.png")]
  with pytest.raises(ConfigError, match="2 output name.*'1': one/1.png, two/1.png; '2': "):
    inference.check_unique_stems(paths)
  inference.check_unique_stems(paths[1:3])


@pytest.mark.parametrize("batch_size,max_waiting", [(1, None), (2, None), (3, 3), (4, 100)])
def test_batches_by_size(batch_size, max_waiting):
  sizes = [(1, 1), (2, 2), (1, 1), (3, 3), (1, 1), (2, 2), (4, 4), (1, 1), (5, 5), (1, 1)] * 3
  items = list(enumerate(sizes))
  batches = list(
    inference.batches_by_size(iter(items), lambda item: item[1], batch_size, max_waiting)
  )
  assert sorted(item for batch in batches for item in batch) == items
  for batch in batches:
    assert 1 <= len(batch) <= batch_size
    assert len({size for _, size in batch}) == 1
    assert [index for index, _ in batch] == sorted(index for index, _ in batch)
  if max_waiting is None:  # enough room: only the last batch of each size may be partial
    partial = [batch for batch in batches if len(batch) < batch_size]
    assert len({batch[0][1] for batch in partial}) == len(partial)


def test_batches_by_size_holds_a_bounded_number_of_items():
  consumed = []

  def source():
    for index in range(50):
      consumed.append(index)
      yield index, (index, index)  # every item has its own size: nothing fills a batch

  yielded = 0
  for batch in inference.batches_by_size(source(), lambda item: item[1], 4, max_waiting=6):
    yielded += len(batch)
    assert len(consumed) - yielded <= 6
  assert yielded == 50


def test_batches_by_size_refuses_an_empty_batch():
  with pytest.raises(ConfigError, match="batch size must be positive"):
    list(inference.batches_by_size([1], lambda item: item, 0))


def _loaded(serve):
  return serving.LoadedSegmenter(
    serve=serve,
    height=4,
    width=4,
    preprocessing="unit",
    kind="checkpoint",
    source="stand-in",
    module=None,
  )


def _width_ramp(images):
  """Not flip-equivariant: the red channel's cumulative sum along the width."""
  pixels = tf.cast(images[..., :1], tf.float32)
  return {"probability": tf.cumsum(pixels, axis=2), "probability_head1": pixels}


def test_segment_fn_returns_numpy_and_averages_flips():
  images = np.random.RandomState(0).randint(0, 256, (2, 4, 6, 3)).astype(np.uint8)
  plain = inference.make_segment_fn(_loaded(_width_ramp))(images)
  assert set(plain) == {"probability", "probability_head1"}
  assert isinstance(plain["probability"], np.ndarray)
  np.testing.assert_allclose(plain["probability"], np.cumsum(images[..., :1], axis=2))
  flipped = inference.make_segment_fn(_loaded(_width_ramp), tta=True, flips=("none", "horizontal"))(
    images
  )
  red = images[..., :1].astype(np.float64)
  expected = (np.cumsum(red, axis=2) + np.cumsum(red[:, :, ::-1], axis=2)[:, :, ::-1]) / 2
  np.testing.assert_allclose(flipped["probability"], expected, rtol=1e-6)
  np.testing.assert_allclose(flipped["probability_head1"], red)


@pytest.mark.parametrize(
  "flips,message", [((), "at least one flip"), (("none", "diagonal"), "unknown flip 'diagonal'")]
)
def test_segment_fn_refuses_bad_flips_before_running(flips, message):
  with pytest.raises(ConfigError, match=message):
    inference.make_segment_fn(_loaded(_width_ramp), tta=True, flips=flips)


def test_encode_png_round_trips_masks_and_rgb():
  mask = (np.arange(30).reshape(5, 6) % 2 * 255).astype(np.uint8)
  np.testing.assert_array_equal(
    cv2.imdecode(np.frombuffer(inference.encode_png(mask), np.uint8), cv2.IMREAD_UNCHANGED), mask
  )
  rgb = np.random.RandomState(1).randint(0, 256, (5, 6, 3)).astype(np.uint8)
  decoded = cv2.imdecode(np.frombuffer(inference.encode_png(rgb), np.uint8), cv2.IMREAD_COLOR)
  np.testing.assert_array_equal(decoded[:, :, ::-1], rgb)  # written as RGB, not BGR
