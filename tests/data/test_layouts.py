"""Folder layouts: detection, pairing, and the problems that stop pairing."""

from pathlib import Path

import pytest

from dunet.data import layouts
from dunet.errors import DataError
from tests.data.helpers import make_generic, make_pairs, picture, write_mask, write_rgb


def stems(pairs):
  return [pair.stem for pair in pairs]


def test_generic_pairs_by_stem_sorted(tmp_path):
  make_generic(tmp_path, count=3)
  pairs = layouts.find_pairs(tmp_path)
  assert stems(pairs) == ["img00", "img01", "img02"]
  assert pairs[0].image_path == tmp_path / "images" / "img00.png"
  assert pairs[0].mask_paths == (tmp_path / "masks" / "img00.png",)
  assert layouts.detect_layout(tmp_path) == "generic"


def test_generic_accepts_mixed_case_extensions_and_mask_suffixes(tmp_path):
  make_pairs(tmp_path / "images", tmp_path / "masks", ["a"], image_ext=".JPG", mask_ext=".PNG")
  make_pairs(
    tmp_path / "images",
    tmp_path / "masks",
    ["b"],
    image_ext=".tif",
    mask_name=lambda stem: stem + "_segmentation",
  )
  make_pairs(
    tmp_path / "images",
    tmp_path / "masks",
    ["c"],
    image_ext=".jpeg",
    mask_ext=".TIFF",
    mask_name=lambda stem: stem + "_mask",
  )
  (tmp_path / "images" / ".DS_Store").write_text("junk")
  (tmp_path / "masks" / "README.txt").write_text("ignored")
  pairs = layouts.find_pairs(tmp_path)
  assert stems(pairs) == ["a", "b", "c"]
  assert pairs[1].mask_paths[0].name == "b_segmentation.png"
  assert pairs[2].mask_paths[0].name == "c_mask.TIFF"


def test_cvc_layout(tmp_path):
  make_pairs(
    tmp_path / "Original",
    tmp_path / "Ground Truth",
    ["1", "2", "10"],
    image_ext=".tif",
    mask_ext=".tif",
  )
  assert layouts.detect_layout(tmp_path) == "cvc"
  assert stems(layouts.find_pairs(tmp_path)) == ["1", "10", "2"]


def test_kvasir_layout_detected_by_its_bounding_box_file(tmp_path):
  make_pairs(
    tmp_path / "images",
    tmp_path / "masks",
    ["cju0qkwl35piu0993l0dewei2"],
    image_ext=".jpg",
    mask_ext=".jpg",
  )
  (tmp_path / "kavsir_bboxes.json").write_text("{}")
  assert layouts.detect_layout(tmp_path) == "kvasir"
  assert stems(layouts.find_pairs(tmp_path)) == ["cju0qkwl35piu0993l0dewei2"]


def test_etis_layout_as_distributed(tmp_path):
  make_pairs(
    tmp_path,
    tmp_path / "GroundTruth",
    ["1", "2"],
    image_ext=".tif",
    mask_ext=".tif",
    mask_name=lambda stem: "p" + stem,
  )
  assert layouts.detect_layout(tmp_path) == "etis"
  pairs = layouts.find_pairs(tmp_path)
  assert stems(pairs) == ["1", "2"]
  assert pairs[0].mask_paths[0].name == "p1.tif"


def test_etis_repackaged_as_images_and_masks_reads_with_the_etis_name(tmp_path):
  make_generic(tmp_path, count=2)
  assert stems(layouts.find_pairs(tmp_path, "etis")) == ["img00", "img01"]


def test_isic2018_layout(tmp_path):
  make_pairs(
    tmp_path / "ISIC2018_Task1-2_Training_Input",
    tmp_path / "ISIC2018_Task1_Training_GroundTruth",
    ["ISIC_0000000", "ISIC_0000001"],
    image_ext=".jpg",
    mask_name=lambda stem: stem + "_segmentation",
  )
  (tmp_path / "ISIC2018_Task1-2_Training_Input" / "LICENSE.txt").write_text("licence")
  assert layouts.detect_layout(tmp_path) == "isic2018"
  assert stems(layouts.find_pairs(tmp_path)) == ["ISIC_0000000", "ISIC_0000001"]


def test_dsb2018_layout_collects_instance_masks(tmp_path):
  for sample, instances in (("aaa", 3), ("bbb", 1)):
    image, mask = picture(len(sample) + instances)
    write_rgb(tmp_path / "stage1_train" / sample / "images" / f"{sample}.png", image)
    for index in range(instances):
      write_mask(tmp_path / "stage1_train" / sample / "masks" / f"m{index}.png", mask)
  assert layouts.detect_layout(tmp_path) == "dsb2018"
  assert layouts.detect_layout(tmp_path / "stage1_train") == "dsb2018"
  pairs = layouts.find_pairs(tmp_path)
  assert stems(pairs) == ["aaa", "bbb"]
  assert [len(pair.mask_paths) for pair in pairs] == [3, 1]


def test_layout_flag_overrides_detection(tmp_path):
  make_generic(tmp_path, count=1)
  (tmp_path / "kavsir_bboxes.json").write_text("{}")
  assert layouts.detect_layout(tmp_path) == "kvasir"
  assert stems(layouts.find_pairs(tmp_path, "generic")) == ["img00"]


def test_ambiguous_folder_asks_for_a_layout(tmp_path):
  make_generic(tmp_path, count=1)
  make_pairs(tmp_path / "Original", tmp_path / "Ground Truth", ["1"])
  with pytest.raises(DataError, match="several layouts.*--layout"):
    layouts.detect_layout(tmp_path)


def test_unknown_folder_and_unknown_layout(tmp_path):
  (tmp_path / "stuff").mkdir()
  with pytest.raises(DataError, match=f"{tmp_path}: no known data set layout"):
    layouts.detect_layout(tmp_path)
  with pytest.raises(DataError, match="unknown layout 'coco'"):
    layouts.find_pairs(tmp_path, "coco")
  with pytest.raises(DataError, match="folder does not exist"):
    layouts.find_pairs(tmp_path / "missing")


def test_empty_image_folder_is_an_error_naming_it(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "masks").mkdir()
  with pytest.raises(DataError, match=f"{tmp_path / 'images'}: no images found"):
    layouts.find_pairs(tmp_path)


def test_missing_mask_and_missing_image_name_the_file(tmp_path):
  make_generic(tmp_path, count=3)
  (tmp_path / "masks" / "img01.png").unlink()
  (tmp_path / "images" / "img02.png").unlink()
  with pytest.raises(DataError, match=f"{tmp_path / 'images' / 'img01.png'}: no mask"):
    layouts.find_pairs(tmp_path)
  scan = layouts.scan(tmp_path)
  assert stems(scan.pairs) == ["img00"]
  problems = {
    Path(problem.path).relative_to(tmp_path).as_posix(): problem.problem
    for problem in scan.problems
  }
  assert set(problems) == {"images/img01.png", "masks/img02.png"}
  assert "no image for this mask" in problems["masks/img02.png"]
  assert stems(layouts.find_pairs(tmp_path, on_error="skip")) == ["img00"]
  skipped = []
  checked = layouts.scan_checked(tmp_path, on_error="skip", skipped=skipped)
  assert stems(checked.pairs) == ["img00"]
  assert sorted(Path(entry["file"]).name for entry in skipped) == ["img01.png", "img02.png"]
  with pytest.raises(ValueError, match="on_error"):
    layouts.scan_checked(tmp_path, on_error="ignore")


def test_nothing_paired_is_an_error_naming_the_folder_even_when_skipping(tmp_path):
  make_generic(tmp_path, count=1)
  (tmp_path / "masks" / "img00.png").unlink()
  with pytest.raises(DataError, match="no image/mask pairs found"):
    layouts.scan_checked(tmp_path, on_error="skip")


def test_duplicate_stems_are_reported(tmp_path):
  make_generic(tmp_path, count=2)
  image, _ = picture(7)
  write_rgb(tmp_path / "images" / "img01.jpg", image)
  with pytest.raises(DataError, match="duplicate stem 'img01'"):
    layouts.find_pairs(tmp_path)
  assert stems(layouts.find_pairs(tmp_path, on_error="skip")) == ["img00", "img01"]


def test_dsb_sample_without_masks_is_reported(tmp_path):
  image, mask = picture(0)
  write_rgb(tmp_path / "a" / "images" / "a.png", image)
  write_mask(tmp_path / "a" / "masks" / "0.png", mask)
  write_rgb(tmp_path / "b" / "images" / "b.png", image)
  (tmp_path / "b" / "masks").mkdir()
  with pytest.raises(DataError, match="b.png: no mask"):
    layouts.find_pairs(tmp_path, "dsb2018")
