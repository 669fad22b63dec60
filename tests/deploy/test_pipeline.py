"""dunet/deploy/pipeline.py and its CLI (dunet/export_trt.py, run as `python tools/export_trt.py`):
ONNX fp32/fp16 parity, deployability of the written graphs, the report, the missing-TensorRT
message and trtexec command, the latency table, the stage timings, and the checks made before
anything is converted."""

import json
import os
import re
import shlex
import subprocess
import sys
import types

import numpy as np
import onnx
from onnx import TensorProto
import onnxruntime as ort
import pytest
import tensorflow as tf

from dunet import serving
from dunet.data import preprocess
from dunet.deploy import latency
from dunet.deploy import onnx as onnx_lib
from dunet.deploy import pipeline
from dunet.deploy import tensorrt
from dunet.errors import ConfigError
from dunet.errors import ExportError
from tests.export_helpers import SIZE
from tests.export_helpers import leftovers
from tests.export_helpers import make_model
from tests.export_helpers import write_run

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO_ROOT, "tools", "export_trt.py")
# The float16 graph's largest difference from float32 TensorFlow on this model measured ~2e-5
# here; 1e-3 leaves room for other CPUs' kernels and still fails for anything that is not a
# faithful float16 version of the model.
FP16_TEST_TOLERANCE = 1e-3


def _run_tool(*args):
  """`python tools/export_trt.py ...`, as users spell it (dunet is installed: pip install -e .).

  Run from another folder than the checkout, and without the suite's TF_CPP_MIN_LOG_LEVEL (the
  program quiets TensorFlow's start-up itself).
  """
  env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
  return subprocess.run(
    [sys.executable, TOOL, *args],
    cwd=os.path.dirname(REPO_ROOT),
    capture_output=True,
    text=True,
    timeout=900,
    env=env,
  )


@pytest.fixture(scope="module")
def model():
  return make_model(seed=5)


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory, model):
  """One full run of the CLI from a checkpoint (SavedModel, both ONNX graphs, parity, latency)."""
  root = tmp_path_factory.mktemp("export_trt")
  run_dir = root / "run"
  write_run(run_dir, model, preprocessing="reference")
  out_dir = root / "deploy"
  result = _run_tool(
    f"--checkpoint={run_dir}",
    f"--out_dir={out_dir}",
    "--latency_runs=1",
    "--latency_batch=2",
    "--parity_pictures=2",
    "--max_batch=4",
    "--opt_batch=2",
  )
  assert result.returncode == 0, result.stdout + result.stderr
  with open(out_dir / pipeline.REPORT_FILENAME) as handle:
    report = json.load(handle)
  return types.SimpleNamespace(
    root=root, run_dir=run_dir, out_dir=out_dir, stdout=result.stdout, report=report
  )


def _pictures(count, seed):
  """Test pictures made differently from the tool's: uniform noise plus a bright square."""
  pictures = np.random.RandomState(seed).randint(0, 256, (count, SIZE, SIZE, 3))
  pictures[:, 16:40, 20:44] = np.minimum(pictures[:, 16:40, 20:44] + 120, 255)
  return pictures.astype(np.uint8)


def _tensorflow_reference(model, pictures):
  """float32 TensorFlow, through dunet.data.preprocess (histogram median), not dunet.serving."""
  outputs = model(preprocess.preprocess(tf.constant(pictures), "reference"), is_training=False)
  return {
    "probability": tf.sigmoid(outputs.logits2).numpy(),
    "probability_head1": tf.sigmoid(outputs.logits1).numpy(),
  }


@pytest.mark.slow
@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-5), ("fp16", FP16_TEST_TOLERANCE)])
def test_onnx_parity_with_onnxruntime(tool_run, model, precision, tolerance):
  session = ort.InferenceSession(
    str(tool_run.out_dir / pipeline.ONNX_FILES[precision]), providers=["CPUExecutionProvider"]
  )
  pictures = _pictures(3, seed=41)  # batch 3: the batch dimension is dynamic
  names = [output.name for output in session.get_outputs()]
  got = dict(zip(names, session.run(names, {"images": pictures})))
  expected = _tensorflow_reference(model, pictures)
  assert set(got) == set(expected)
  for key, value in expected.items():
    assert got[key].dtype == np.float32 and got[key].shape == (3, SIZE, SIZE, 1)
    np.testing.assert_allclose(got[key], value, atol=tolerance, err_msg=f"{precision} {key}")
  if precision == "fp16":
    # It is float16 arithmetic, not float32 in disguise.
    assert np.max(np.abs(got["probability"] - expected["probability"])) > 1e-7


@pytest.mark.slow
def test_onnx_graphs_are_deployable(tool_run):
  for precision, filename in pipeline.ONNX_FILES.items():
    proto = onnx.load(str(tool_run.out_dir / filename))
    onnx.checker.check_model(proto, full_check=True)
    info = onnx_lib.describe_onnx(proto)
    assert (info.input_name, info.input_type, info.input_shape) == (
      "images",
      "uint8",
      ["batch", SIZE, SIZE, 3],
    )
    assert info.outputs == {"probability": "float32", "probability_head1": "float32"}
    assert not set(info.op_counts) & {
      "If",
      "Loop",
      "Scan",
      "Unique",
      "Compress",
      "NonZero",
      "ScatterND",
    }, info.op_counts
    assert info.op_counts["Conv"] == 54
    conv_weights = {node.input[1] for node in proto.graph.node if node.op_type == "Conv"}
    weight_types = {init.data_type for init in proto.graph.initializer if init.name in conv_weights}
    assert weight_types == {TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT}
    assert tool_run.report["onnx"][precision]["op_counts"] == info.op_counts


@pytest.mark.slow
def test_tool_output_report_and_trtexec_line(tool_run):
  out_dir, report, stdout = tool_run.out_dir, tool_run.report, tool_run.stdout
  assert sorted(os.listdir(out_dir)) == sorted(
    ["saved_model", "dunet_fp32.onnx", "dunet_fp16.onnx", "export_trt.json"]
  )
  assert leftovers(tool_run.root) == []
  assert serving.is_saved_model(str(out_dir / "saved_model"))
  for precision, tolerance in (
    ("fp32", pipeline.DEFAULT_FP32_TOLERANCE),
    ("fp16", pipeline.DEFAULT_FP16_TOLERANCE),
  ):
    entry = report["onnx"][precision]
    assert entry["tolerance"] == tolerance
    assert 0 <= entry["max_abs_difference"] <= tolerance
    assert re.search(rf"ONNX {precision} +probability +max \|diff\| ", stdout)
  # No GPU and no tensorrt package on CI machines: the tool says so and prints the command.
  assert report["tensorrt"]["built"] is False
  assert any("tensorrt" in reason for reason in report["tensorrt"]["missing"])
  assert "TensorRT engine not built; missing: the `tensorrt` Python package" in stdout
  command = report["tensorrt"]["trtexec"]["fp16"]
  assert command in stdout
  assert shlex.split(command) == [
    "trtexec",
    f"--onnx={out_dir / 'dunet_fp16.onnx'}",
    f"--saveEngine={out_dir / 'dunet_fp16.plan'}",
    "--stronglyTyped",
    f"--minShapes=images:1x{SIZE}x{SIZE}x3",
    f"--optShapes=images:2x{SIZE}x{SIZE}x3",
    f"--maxShapes=images:4x{SIZE}x{SIZE}x3",
    "--memPoolSize=workspace:4096M",
  ]
  assert report["tf_trt"]["supported"] == bool(
    tf.sysconfig.get_build_info().get("is_tensorrt_build", False)
  )
  names = {(row["name"], row["batch"]) for row in report["latency"]}
  assert names == {
    (name, batch)
    for batch in (1, 2)
    for name in (
      "TF SavedModel (serving_default)",
      "ONNX fp32 (onnxruntime CPU)",
      "ONNX fp16 (onnxruntime CPU)",
    )
  }
  assert all(row["ms_per_image"] > 0 for row in report["latency"])
  assert (
    latency.format_latency_table([latency.LatencyRow(**row) for row in report["latency"]]) in stdout
  )


# The stages of tool_run's export (from a checkpoint, both graphs, latency, no TensorRT), in order.
TOOL_RUN_STAGES = [
  "saved_model",
  "load",
  "onnx_fp32_convert",
  "onnx_fp32_check",
  "onnx_fp32_parity",
  "onnx_fp32_latency",
  "onnx_fp16_convert",
  "onnx_fp16_check",
  "onnx_fp16_parity",
  "onnx_fp16_latency",
  "tf_latency",
]


@pytest.mark.slow
def test_stage_timings_in_report_and_console(tool_run):
  report, stdout = tool_run.report, tool_run.stdout
  stages = report["stages"]
  assert [entry["name"] for entry in stages] == TOOL_RUN_STAGES
  peaks = [entry["peak_rss_mb"] for entry in stages]
  # A real process: TensorFlow alone is resident in hundreds of MiB; the peak never decreases.
  assert all(peak > 100 for peak in peaks) and peaks == sorted(peaks)
  assert report["peak_rss_mb"] >= peaks[-1]
  for entry in stages:
    assert entry["seconds"] >= 0
    assert 0 < entry["rss_mb"] <= entry["peak_rss_mb"] + 1  # resident now <= the peak so far
  # The conversions are the slow stages, and the stages fit in the whole export.
  assert stages[2]["seconds"] > 0.5 and stages[6]["seconds"] > 0.5
  assert sum(entry["seconds"] for entry in stages) <= report["total_seconds"]
  # One console line per stage, as it ends, in order, with the report's numbers.
  lines = re.findall(
    r"^\[stage (\S+)\] .+: ([0-9.]+) s \(peak RSS so far ([0-9]+) MiB, ([0-9]+) MiB now\)$",
    stdout,
    re.MULTILINE,
  )
  assert [line[0] for line in lines] == TOOL_RUN_STAGES
  for (_, seconds, peak, now), entry in zip(lines, stages):
    assert float(seconds) == pytest.approx(entry["seconds"], abs=0.051)
    assert int(peak) == round(entry["peak_rss_mb"]) and int(now) == round(entry["rss_mb"])
  # The stage line of a conversion comes before the lines about its graph.
  assert stdout.index("[stage onnx_fp32_convert]") < stdout.index("ONNX fp32: ")
  # The summary table at the end of the printed report.
  table = pipeline.format_stage_table(
    [pipeline.StageTime(**entry) for entry in stages], report["total_seconds"]
  )
  assert table in stdout and stdout.index(table) > stdout.index("Latency (median per image")
  assert table.splitlines()[-1].split()[0] == "total"


def test_stage_clock_lines_and_table():
  ticks = iter([10.0, 11.0, 13.5, 14.0, 14.25])
  lines, released = [], []
  clock = pipeline.StageClock(
    lines.append, clock=lambda: next(ticks), release=lambda: released.append(1)
  )
  with clock.stage("convert", "made a graph"):  # 11.0 -> 13.5
    pass
  with pytest.raises(ExportError):  # a failing stage is not recorded
    with clock.stage("check", "checked it"):  # 14.0
      raise ExportError("bad graph")
  assert [entry.name for entry in clock.stages] == ["convert"] and len(released) == 1
  entry = clock.stages[0]
  assert entry.seconds == 2.5 and entry.peak_rss_mb > 100
  assert entry.rss_mb is None or 0 < entry.rss_mb <= entry.peak_rss_mb + 1
  assert lines == [
    f"[stage convert] made a graph: 2.5 s (peak RSS so far {entry.peak_rss_mb:.0f} MiB, "
    f"{entry.rss_mb:.0f} MiB now)"
  ]
  total = clock.total_seconds()
  assert total == 4.25  # 10.0 -> 14.25
  table = pipeline.format_stage_table(
    [entry, pipeline.StageTime("parity", 0.04, 2500.4, 1200.0)], total
  ).splitlines()
  assert table[0].split() == ["stage", "seconds", "peak", "RSS", "MiB", "RSS", "after"]
  assert set(table[1]) == {"-"}
  assert table[3].split() == ["parity", "0.0", "2500", "1200"]
  # The total's peak is the largest stage peak: the real stage's is this process's own peak,
  # which can exceed 2500 MiB in a worker that ran other tests first (2646 seen in CI).
  assert table[4].split() == ["total", "4.2", f"{max(entry.peak_rss_mb, 2500.4):.0f}"]
  assert len({len(line.rstrip()) for line in table[:4]}) == 1


def _error_line(result):
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  return lines[0]


def test_cli_errors_are_one_line_and_write_nothing(tmp_path):
  usage = _run_tool(f"--out_dir={tmp_path / 'out'}")
  assert usage.returncode == 2
  assert _error_line(usage) == (
    "dunet-export-trt: error: pass exactly one of --saved_model and --checkpoint (see --help)"
  )
  missing = _run_tool(f"--checkpoint={tmp_path / 'nothing'}", f"--out_dir={tmp_path / 'out'}")
  assert missing.returncode == 1
  assert _error_line(missing).startswith(
    f"dunet-export-trt: error: no checkpoint at '{tmp_path / 'nothing'}'"
  )
  assert os.listdir(tmp_path) == []


def test_a_folder_that_is_no_saved_model_is_named(tmp_path):
  settings = pipeline.Settings(out_dir=str(tmp_path / "out"), saved_model=str(tmp_path))
  with pytest.raises(ExportError, match=re.escape(f"{tmp_path} is not a SavedModel")):
    pipeline.export_trt(settings)
  assert not (tmp_path / "out").exists()


def test_require_tensorrt_fails_before_converting(tmp_path):
  if tensorrt.tensorrt_requirements()[0] is not None:
    pytest.skip("TensorRT and a GPU are present here")
  settings = pipeline.Settings(
    out_dir=str(tmp_path / "out"), checkpoint=str(tmp_path / "run"), tensorrt="require"
  )
  # The checkpoint does not exist either: TensorRT is checked first, before any slow step.
  with pytest.raises(
    ExportError, match="--tensorrt=require, but TensorRT cannot build here; missing: "
  ):
    pipeline.export_trt(settings)
  assert os.listdir(tmp_path) == []


def test_cli_help_documents_every_flag():
  result = _run_tool("--helpfull")  # --help shows the essential ones, grouped
  for flag in (
    "saved_model",
    "checkpoint",
    "out_dir",
    "overwrite",
    "fp16_tolerance",
    "fp32_tolerance",
    "engine_tolerance",
    "tensorrt",
    "engines",
    "min_batch",
    "opt_batch",
    "max_batch",
    "workspace_mib",
    "latency_batch",
    "latency_runs",
    "onnxruntime_providers",
    "opset",
    "parity_pictures",
  ):
    assert f"--{flag}" in result.stdout


def test_settings_are_checked_before_anything_else(tmp_path):
  with pytest.raises(ConfigError, match="exactly one of --saved_model and --checkpoint"):
    pipeline.export_trt(pipeline.Settings(out_dir=str(tmp_path / "out")))
  with pytest.raises(ConfigError, match="an fp16 engine needs the fp16 ONNX graph"):
    pipeline.export_trt(
      pipeline.Settings(out_dir=str(tmp_path / "out"), checkpoint="x", fp16=False)
    )
  assert os.listdir(tmp_path) == []
