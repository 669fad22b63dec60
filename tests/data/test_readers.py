"""Pixel checks and conversions of raw images and masks; every error names its file."""

import cv2
import numpy as np
import pytest

from dunet.data import readers
from dunet.errors import DataError
from dunet.data.layouts import Pair
from tests.data.helpers import picture, write_mask, write_rgb


def test_reads_rgb_in_rgb_order(tmp_path):
  image, mask = picture(0)
  path = write_rgb(tmp_path / "a.png", image)
  decoded, notes = readers.read_image(path)
  np.testing.assert_array_equal(decoded, image)
  assert notes == []


def test_grayscale_is_repeated_over_rgb(tmp_path):
  gray = picture(1)[0][:, :, 0]
  path = write_rgb(tmp_path / "g.png", gray)
  decoded, notes = readers.read_image(path)
  np.testing.assert_array_equal(decoded, np.stack([gray] * 3, axis=2))
  assert "grayscale" in notes[0] and str(path) in notes[0]


def test_rgba_drops_alpha(tmp_path):
  image = picture(2)[0]
  rgba_bgr = np.concatenate([image[:, :, ::-1], np.full(image.shape[:2] + (1,), 7, np.uint8)], 2)
  path = tmp_path / "rgba.png"
  cv2.imwrite(str(path), rgba_bgr)
  decoded, notes = readers.read_image(path)
  np.testing.assert_array_equal(decoded, image)
  assert "alpha" in notes[0]


def test_16_bit_is_scaled_to_8_bit(tmp_path):
  values = np.array([[0, 257, 65535, 32896]], np.uint16)
  path = tmp_path / "deep.png"
  cv2.imwrite(str(path), np.stack([values] * 3, axis=2))
  decoded, notes = readers.read_image(path)
  np.testing.assert_array_equal(decoded[0, :, 0], [0, 1, 255, 128])
  assert "16-bit" in notes[0]


def test_16_bit_tiff(tmp_path):
  values = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20
  path = tmp_path / "deep.tif"
  cv2.imwrite(str(path), values)
  decoded, _ = readers.read_image(path)
  np.testing.assert_array_equal(decoded[:, :, 1], np.round(values / 257.0).astype(np.uint8))


@pytest.mark.parametrize("name", ["empty.png", "empty.jpg"])
def test_zero_size_file(tmp_path, name):
  path = tmp_path / name
  path.write_bytes(b"")
  with pytest.raises(DataError, match=f"{path}: empty file"):
    readers.read_image(path)


@pytest.mark.parametrize("extension", [".jpg", ".png"])
def test_truncated_file(tmp_path, extension):
  image = picture(3)[0]
  path = write_rgb(tmp_path / f"cut{extension}", image)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(DataError, match=f"{path}: truncated"):
    readers.read_image(path)


def test_not_an_image(tmp_path):
  path = tmp_path / "text.png"
  path.write_bytes(b"this is not a picture at all")
  with pytest.raises(DataError, match=f"{path}: cannot decode"):
    readers.read_image(path)


def test_mask_values_0_255_and_0_1_are_binary(tmp_path):
  _, mask = picture(4)
  for value in (255, 1):
    path = write_mask(tmp_path / f"m{value}.png", mask, value=value)
    decoded, notes = readers.read_mask([path], mask.shape)
    np.testing.assert_array_equal(decoded, mask)
    assert notes == []


def test_non_binary_mask_is_thresholded_at_half_range_and_says_so(tmp_path):
  soft = np.array([[0, 10, 127, 128, 200, 255]], np.uint8)
  path = tmp_path / "soft.png"
  cv2.imwrite(str(path), soft)
  decoded, notes = readers.read_mask([path], soft.shape)
  np.testing.assert_array_equal(decoded, [[0, 0, 0, 1, 1, 1]])
  assert str(path) in notes[0] and "not binary" in notes[0] and "128" in notes[0]


def test_jpeg_mask_is_thresholded(tmp_path):
  _, mask = picture(5)
  path = tmp_path / "m.jpg"
  cv2.imwrite(str(path), mask * 255, [cv2.IMWRITE_JPEG_QUALITY, 70])
  decoded, notes = readers.read_mask([path], mask.shape)
  assert np.mean(decoded != mask) < 0.01
  assert "not binary" in notes[0]


def test_colour_mask_uses_the_brightest_channel(tmp_path):
  _, mask = picture(6)
  red = np.zeros(mask.shape + (3,), np.uint8)
  red[:, :, 0] = mask * 255
  path = write_rgb(tmp_path / "red.png", red)
  decoded, _ = readers.read_mask([path], mask.shape)
  np.testing.assert_array_equal(decoded, mask)


def test_instance_masks_are_merged(tmp_path):
  first = np.zeros((8, 8), np.uint8)
  second = np.zeros((8, 8), np.uint8)
  first[1:3, 1:3] = 1
  second[5:7, 4:8] = 1
  paths = [write_mask(tmp_path / "0.png", first), write_mask(tmp_path / "1.png", second)]
  decoded, _ = readers.read_mask(paths, (8, 8))
  np.testing.assert_array_equal(decoded, first | second)


def test_size_mismatch_names_the_mask(tmp_path):
  image, mask = picture(7)
  image_path = write_rgb(tmp_path / "i.png", image)
  mask_path = write_mask(tmp_path / "m.png", mask[:, :-1])
  with pytest.raises(DataError, match=f"{mask_path}: mask is 48x63 but its image is 48x64"):
    readers.read_pair(Pair("i", image_path, (mask_path,)))


def test_read_pair(tmp_path):
  image, mask = picture(8)
  example = readers.read_pair(
    Pair("x", write_rgb(tmp_path / "i.tif", image), (write_mask(tmp_path / "m.tif", mask),))
  )
  np.testing.assert_array_equal(example.image, image)
  np.testing.assert_array_equal(example.mask, mask)
  assert example.stem == "x"
