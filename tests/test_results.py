"""dunet/results.py: the results table from hand-made dunet-evaluate reports (the keys of
evaluate.build_report), single runs and folds (mean ± std computed here by hand), optional HD95,
data set names, the markdown and CSV files, and the errors."""

import csv
import io
import json
import math
import os

import pytest

from dunet import results
from dunet.errors import ConfigError
from dunet.errors import DataError

SCORES = ("dsc", "iou", "recall", "precision")


def _scores(dsc, iou, recall, precision):
  return dict(dsc=dsc, iou=iou, recall=recall, precision=precision, f2=0.5, accuracy=0.9)


def write_eval(
  eval_dir,
  *,
  dsc=0.9239,
  iou=0.8611,
  recall=0.8446,
  precision=0.9592,
  images=61,
  data=None,
  hd95=None,
  hd95_statistic="per_image",
  per_image=None,
  tta=None,
  threshold=0.5,
):
  """A metrics.json (and per_image.csv) as dunet-evaluate writes them (evaluate.build_report)."""
  os.makedirs(eval_dir, exist_ok=True)
  head2 = {
    "per_image": _scores(dsc, iou, recall, precision),
    # Pooled scores differ from the per-image means: the table must not show these.
    "pooled": _scores(0.11, 0.12, 0.13, 0.14),
  }
  if hd95 is not None:
    head2.setdefault(hd95_statistic, {})["hd95"] = hd95
  other = {"per_image": _scores(0.2, 0.2, 0.2, 0.2), "pooled": _scores(0.3, 0.3, 0.3, 0.3)}
  report = {
    "format": "dunet-eval",
    "version": 1,
    "model": {
      "source": os.path.join(str(eval_dir), "best", "ckpt-1"),
      "kind": "checkpoint",
      "input_height": 32,
      "input_width": 64,
      "preprocessing": "unit",
    },
    "data": data
    or {
      "data_dir": "/data/prepared/cvc",
      "split": "test",
      "splits": {"test": images},
      "prepared_height": 32,
      "prepared_width": 64,
      "layout": "cvc",
    },
    "images": images,
    "resolution": "original",
    "images_by_resolution": {"original": images, "prepared": 0},
    "threshold": threshold,
    "tta": tta,
    "headline": {
      "head": "head2",
      "statistic": "per_image",
      "dsc": dsc,
      "iou": iou,
      "recall": recall,
      "precision": precision,
    },
    "statistics": "...",
    "empty_masks": {"convention": "...", "ground_truth": 0, "prediction": {}},
    "metrics": {"head2": head2, "head1": other, "mean": other},
    "validation_threshold": None,
    "notes": [],
    "skipped": [],
    "created": "2026-12-01T00:00:00+00:00",
    "command": "dunet-evaluate",
  }
  with open(os.path.join(eval_dir, "metrics.json"), "w") as handle:
    json.dump(report, handle, indent=1)
  if per_image is not None:
    columns = ["name", "split", "dsc", *sorted({key for row in per_image for key in row} - {"dsc"})]
    with open(os.path.join(eval_dir, "per_image.csv"), "w", newline="") as handle:
      writer = csv.DictWriter(handle, columns, lineterminator="\n")
      writer.writeheader()
      for index, row in enumerate(per_image):
        writer.writerow({"name": f"img{index:02d}", "split": "test", **row})
  return eval_dir


def write_run(workdir, *, fold=None, folds=None, config_fold=False, **eval_kwargs):
  """A training workdir: config.json, train_config.json (with the data section's fold) and an
  evaluation in eval/<split>."""
  os.makedirs(workdir, exist_ok=True)
  data_config = {"data_dir": "/data/prepared/cvc", "fold": -1 if fold is None else fold}
  if folds is not None:
    data_config["folds"] = folds
  run_config = {"height": 32, "width": 64, "data_dir": "/data/prepared/cvc"}
  if config_fold:  # recorded in config.json only
    data_config.pop("fold")
    data_config.pop("folds", None)
    run_config.update(fold=fold, folds=folds)
  with open(os.path.join(workdir, "train_config.json"), "w") as handle:
    json.dump({"data": data_config, "seed": 42}, handle)
  with open(os.path.join(workdir, "config.json"), "w") as handle:
    json.dump(run_config, handle)
  with open(os.path.join(workdir, "metrics.json"), "w") as handle:  # training's, not a report
    json.dump({"step": 20, "best_valid_dsc": 0.5, "stopped_by": None, "valid": {}}, handle)
  variant = eval_kwargs.pop("variant", "test")
  if eval_kwargs.pop("evaluate", True):
    write_eval(os.path.join(workdir, "eval", variant), **eval_kwargs)
  return workdir


def _table_lines(markdown):
  lines = [line for line in markdown.splitlines() if line.startswith("| ")]
  return lines[2:]  # after the header and the alignment line


def _csv_rows(text):
  return list(csv.DictReader(io.StringIO(text)))


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------


def test_a_single_run_shows_its_head2_per_image_scores(tmp_path):
  run = write_run(str(tmp_path / "cvc"))
  rows = results.build_rows(results.find_evaluations([run]))
  assert len(rows) == 1
  row = rows[0]
  assert (row.dataset, row.split, row.run, row.folds, row.images) == (
    "CVC-ClinicDB",
    "test",
    "cvc",
    0,
    61,
  )
  assert row.mean == {
    "dsc": 0.9239,
    "iou": 0.8611,
    "recall": 0.8446,
    "precision": 0.9592,
    "hd95": None,
  }
  assert all(value is None for value in row.std.values())
  (line,) = _table_lines(results.format_markdown(rows))
  assert line == "| CVC-ClinicDB | test | cvc | - | 61 | 0.9239 | 0.8611 | 0.8446 | 0.9592 | - |"
  (record,) = _csv_rows(results.format_csv(rows))
  assert record["dsc"] == "0.923900" and record["dsc_std"] == "" and record["hd95"] == ""
  assert record["folds"] == "0" and record["images"] == "61" and record["variant"] == "test"
  assert record["reports"] == os.path.join(run, "eval", "test", "metrics.json")


def test_three_folds_give_mean_and_sample_std(tmp_path):
  cv = tmp_path / "cv_kvasir"
  values = {
    "dsc": [0.80, 0.85, 0.90],
    "iou": [0.70, 0.72, 0.77],
    "recall": [0.90, 0.88, 0.86],
    "precision": [0.75, 0.80, 0.95],
  }
  hd95 = [12.0, 9.5, 4.0]
  images = [33, 33, 34]
  for k in range(3):
    write_run(
      str(cv / f"fold_{k}"),
      fold=k,
      folds=3,
      images=images[k],
      hd95=hd95[k],
      **{name: values[name][k] for name in SCORES},
    )
  # Named in reverse order: folds are sorted.
  folders = [str(cv / f"fold_{k}") for k in (2, 1, 0)]
  (row,) = results.build_rows(results.find_evaluations(folders))
  assert row.folds == 3 and row.run == "cv_kvasir" and row.images == 100
  assert [evaluation.fold for evaluation in row.evaluations] == [0, 1, 2]

  def by_hand(numbers):
    mean = sum(numbers) / len(numbers)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in numbers) / (len(numbers) - 1))

  for name, numbers in [*values.items(), ("hd95", hd95)]:
    mean, std = by_hand(numbers)
    assert row.mean[name] == pytest.approx(mean, abs=1e-12), name
    assert row.std[name] == pytest.approx(std, abs=1e-12), name
  assert by_hand(values["dsc"]) == pytest.approx((0.85, 0.05))
  (line,) = _table_lines(results.format_markdown([row]))
  assert line == (
    "| CVC-ClinicDB | test | cv_kvasir | 3 | 100 | 0.8500 ± 0.0500 | 0.7300 ± 0.0361 | "
    "0.8800 ± 0.0200 | 0.8333 ± 0.1041 | 8.50 ± 4.09 |"
  )
  (record,) = _csv_rows(results.format_csv([row]))
  assert float(record["dsc"]) == pytest.approx(0.85) and float(record["dsc_std"]) == pytest.approx(
    0.05
  )
  assert record["folds"] == "3"
  assert record["reports"].split(";") == [
    os.path.join(str(cv / f"fold_{k}"), "eval", "test", "metrics.json") for k in range(3)
  ]


def test_a_cross_validation_folder_stands_for_its_folds_and_its_ensemble(tmp_path):
  cv = tmp_path / "cv"
  for k in range(2):
    write_run(str(cv / f"fold_{k}"), fold=k, folds=2, dsc=0.8 + 0.1 * k)
  write_eval(str(cv / "eval" / "ensemble-test"), dsc=0.95)  # dunet-evaluate of the folds' ensemble
  evaluations = results.find_evaluations([str(cv)])
  assert len(evaluations) == 3
  rows = results.build_rows(evaluations)
  assert [(row.name, row.folds) for row in rows] == [("cv", 2), ("cv [ensemble-test]", 0)]
  assert rows[0].mean["dsc"] == pytest.approx(0.85)
  assert rows[1].mean["dsc"] == 0.95


def test_fold_keys_come_from_train_config_config_json_or_the_folder_name(tmp_path):
  assert results.fold_of(write_run(str(tmp_path / "a"), fold=2, folds=5)) == (2, 5)
  assert results.fold_of(write_run(str(tmp_path / "b"), fold=1, folds=4, config_fold=True)) == (
    1,
    4,
  )
  assert results.fold_of(write_run(str(tmp_path / "c"))) == (None, None)  # fold -1: not a fold
  os.makedirs(tmp_path / "x" / "fold_3")
  assert results.fold_of(str(tmp_path / "x" / "fold_3")) == (3, None)
  # An incomplete experiment says so in the folds column.
  cv = tmp_path / "cv"
  for k in (0, 1, 3):
    write_run(str(cv / f"fold_{k}"), fold=k, folds=5)
  (line,) = _table_lines(
    results.format_markdown(results.build_rows(results.find_evaluations([cv])))
  )
  assert "| 3 of 5 |" in line


def test_a_fold_evaluated_on_its_own_held_out_fold(tmp_path):
  cv = tmp_path / "cv"
  for k in range(2):
    data = {"data_dir": "/data/prepared/cvc", "split": f"fold_{k}", "layout": "cvc"}
    write_run(str(cv / f"fold_{k}"), fold=k, folds=2, data=data, variant=f"fold_{k}")
  (row,) = results.build_rows(results.find_evaluations([str(cv)]))
  assert (row.split, row.folds) == (results.HELD_OUT, 2)


def test_a_fold_counted_twice_is_refused(tmp_path):
  cv = tmp_path / "cv"
  write_run(str(cv / "fold_0"), fold=0, folds=3)
  write_run(str(cv / "fold_0_again"), fold=0, folds=3)
  with pytest.raises(ConfigError, match="both fold 0"):
    results.build_rows(results.find_evaluations([str(cv)]))


def test_hd95_is_optional_and_read_where_it_is(tmp_path):
  absent = write_eval(str(tmp_path / "absent"))
  per_image = write_eval(str(tmp_path / "per_image"), hd95=7.25)
  mean_key = write_eval(str(tmp_path / "mean_key"), hd95=3.5, hd95_statistic="mean")
  # Only per_image.csv has it: the mean of its finite values (an empty mask gives nan or inf).
  from_csv = write_eval(
    str(tmp_path / "from_csv"),
    per_image=[
      {"dsc": 0.9, "hd95": 2.0},
      {"dsc": 0.8, "hd95": 4.0},
      {"dsc": 0.0, "hd95": "nan"},
      {"dsc": 0.1, "hd95": "inf"},
      {"dsc": 1.0, "hd95": ""},
    ],
  )
  no_column = write_eval(str(tmp_path / "no_column"), per_image=[{"dsc": 0.5}])
  read = {
    os.path.basename(folder): results.read_evaluation(folder).scores["hd95"]
    for folder in (absent, per_image, mean_key, from_csv, no_column)
  }
  assert read == {
    "absent": None,
    "per_image": 7.25,
    "mean_key": 3.5,
    "from_csv": 3.0,
    "no_column": None,
  }
  rows = results.build_rows(results.find_evaluations([absent, per_image]))
  assert [
    line.rsplit("|", 2)[-2].strip() for line in _table_lines(results.format_markdown(rows))
  ] == [
    "-",
    "7.25",
  ]
  # Over folds, a score is shown only when every fold has it.
  cv = tmp_path / "cv"
  write_run(str(cv / "fold_0"), fold=0, folds=2, hd95=1.0)
  write_run(str(cv / "fold_1"), fold=1, folds=2)
  (row,) = results.build_rows(results.find_evaluations([str(cv)]))
  assert row.mean["hd95"] is None and row.std["hd95"] is None
  assert results.format_value(row, "hd95") == "-"


# ------------------------------------------------------------------------------------------------
# Data set names, grouping and order
# ------------------------------------------------------------------------------------------------


def test_dataset_names(tmp_path):
  assert results.dataset_name({"data_dir": "/d/kv", "layout": "kvasir", "split": "test"}) == (
    "Kvasir-SEG"
  )
  assert results.dataset_name({"data_dir": "/d/my_polyps", "layout": "generic"}) == "my_polyps"
  assert results.dataset_name({"data_dir": "/d/demo/", "layout": None}) == "demo"
  assert (
    results.dataset_name({"raw_dir": "/raw/ETIS-LaribPolypDB", "layout": "etis", "split": "raw"})
    == "ETIS-LaribPolypDB"
  )
  assert results.dataset_name({"raw_dir": "/raw/new_set", "layout": "generic"}) == "new_set"
  assert results.dataset_name({"dataset": "MICCAI 2015", "data_dir": "/d/x"}) == "MICCAI 2015"
  # Prepared with a separate test folder (dunet-prepare --test_raw_dir): its summary.json says so.
  prepared = tmp_path / "cvc_etis"
  prepared.mkdir()
  (prepared / "summary.json").write_text(
    json.dumps(
      {
        "layout": "cvc",
        "raw_dir": "/raw/CVC-ClinicDB",
        "test_raw": {"dir": "/raw/ETIS", "layout": "etis", "pairs": 196},
      }
    )
  )
  data = {"data_dir": str(prepared), "layout": "cvc"}
  assert results.dataset_name({**data, "split": "test"}) == (
    "ETIS-LaribPolypDB (trained on CVC-ClinicDB)"
  )
  assert results.dataset_name({**data, "split": "valid"}) == "CVC-ClinicDB"


def test_rows_are_grouped_by_data_set_and_split(tmp_path):
  kvasir = {"data_dir": "/d/kvasir", "layout": "kvasir"}
  write_run(str(tmp_path / "zeta"), data={**kvasir, "split": "test"})
  write_run(str(tmp_path / "alpha"), data={**kvasir, "split": "test"}, variant="test")
  write_eval(str(tmp_path / "alpha" / "eval" / "valid"), data={**kvasir, "split": "valid"})
  write_eval(str(tmp_path / "alpha" / "eval" / "test-tta"), data={**kvasir, "split": "test"})
  write_run(str(tmp_path / "cvc"))
  evaluations = results.find_evaluations(
    [str(tmp_path / name) for name in ("zeta", "alpha", "cvc")]
  )
  rows = results.build_rows(evaluations)
  assert [(row.dataset, row.split, row.name) for row in rows] == [
    ("CVC-ClinicDB", "test", "cvc"),
    ("Kvasir-SEG", "valid", "alpha"),
    ("Kvasir-SEG", "test", "alpha"),
    ("Kvasir-SEG", "test", "alpha [test-tta]"),
    ("Kvasir-SEG", "test", "zeta"),
  ]
  only_valid = results.find_evaluations([str(tmp_path / "alpha")], split="valid")
  assert [evaluation.variant for evaluation in only_valid] == ["valid"]
  # An evaluation folder named directly; the same folder twice is one row.
  direct = str(tmp_path / "alpha" / "eval" / "test-tta")
  evaluation = results.read_evaluation(direct)
  assert (evaluation.run, evaluation.variant, evaluation.workdir) == (
    "alpha",
    "test-tta",
    str(tmp_path / "alpha"),
  )
  assert len(results.build_rows(results.find_evaluations([direct, direct]))) == 1


def test_expand_paths_globs_and_duplicates(tmp_path):
  for name in ("run_a", "run_b", "other"):
    (tmp_path / name).mkdir()
  pattern = str(tmp_path / "run_*")
  assert results.expand_paths([pattern, str(tmp_path / "run_a"), str(tmp_path / "other"), ""]) == [
    str(tmp_path / "run_a"),
    str(tmp_path / "run_b"),
    str(tmp_path / "other"),
  ]
  with pytest.raises(ConfigError, match="matches no folder"):
    results.expand_paths([str(tmp_path / "nothing_*")])
  with pytest.raises(ConfigError, match="--workdirs"):
    results.expand_paths([])


# ------------------------------------------------------------------------------------------------
# Files and errors
# ------------------------------------------------------------------------------------------------


def test_write_results(tmp_path):
  rows = results.build_rows(
    results.find_evaluations([write_run(str(tmp_path / "cvc"), tta=["none", "horizontal"])])
  )
  out = tmp_path / "out" / "table"
  paths = results.write_results(rows, str(out))
  assert sorted(os.listdir(out)) == ["results.csv", "results.md"]
  markdown = (out / "results.md").read_text()
  assert markdown == results.format_markdown(rows)
  assert markdown.startswith("# DoubleU-Net results\n")
  assert (
    "| data set | split | model / run | folds | images | DSC | mIoU | recall | precision | HD95 |"
    in markdown
  )
  assert "mean ± sample standard deviation" in markdown
  assert "TTA none+horizontal" in markdown and "threshold 0.5" in markdown
  assert (out / "results.csv").read_text() == results.format_csv(rows)
  assert paths == {"results.md": str(out / "results.md"), "results.csv": str(out / "results.csv")}


def test_errors_name_the_path(tmp_path):
  unevaluated = write_run(str(tmp_path / "unevaluated"), evaluate=False)
  with pytest.raises(DataError) as caught:
    results.find_evaluations([unevaluated])
  assert caught.value.path == unevaluated
  assert f"run dunet-evaluate --checkpoint={unevaluated} first" in str(caught.value)
  # In a cross-validation folder, the fold without an evaluation is named.
  cv = tmp_path / "cv"
  write_run(str(cv / "fold_0"), fold=0, folds=2)
  write_run(str(cv / "fold_1"), fold=1, folds=2, evaluate=False)
  with pytest.raises(DataError, match="run dunet-evaluate") as caught:
    results.find_evaluations([str(cv)])
  assert caught.value.path == str(cv / "fold_1")

  damaged = write_run(str(tmp_path / "damaged"))
  metrics_json = os.path.join(damaged, "eval", "test", "metrics.json")
  with open(metrics_json, "w") as handle:
    handle.write('{"format": "dunet-eval", "metr')
  with pytest.raises(DataError, match="cannot read the evaluation report") as caught:
    results.find_evaluations([damaged])
  assert caught.value.path == metrics_json
  with open(metrics_json, "w") as handle:
    json.dump({"step": 10, "valid": {}}, handle)  # a training metrics.json, not a report
  with pytest.raises(DataError, match="not a dunet-evaluate report"):
    results.read_evaluation(os.path.dirname(metrics_json))

  with pytest.raises(DataError, match="no such folder"):
    results.find_evaluations([str(tmp_path / "missing")])
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="neither a training workdir"):
    results.find_evaluations([str(tmp_path / "empty")])
  evaluated = write_run(str(tmp_path / "evaluated"))
  with pytest.raises(
    DataError, match=r"no evaluation of the 'valid' split \(found test \(test\)\)"
  ):
    results.find_evaluations([evaluated], split="valid")
