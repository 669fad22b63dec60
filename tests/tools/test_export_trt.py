"""tools/export_trt.py: ONNX fp32/fp16 parity, deployability checks, the TensorRT build path (as far
as a CPU machine allows: a stand-in `tensorrt` module records the builder calls; no engine is
built or run here), the missing-TensorRT message, trtexec command, latency table, and the CLI."""

import json
import os
import re
import shlex
import subprocess
import sys
import types

import numpy as np
import onnx
from onnx import helper
from onnx import TensorProto
import onnxruntime as ort
import pytest
import tensorflow as tf

from dunet import serving
from dunet.data import preprocess
from dunet.models import DoubleUNet
from tests.test_export import leftovers
from tests.test_export import make_model
from tests.test_export import write_run

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import export_trt  # noqa: E402

SIZE = 64
TOOL = os.path.join(REPO_ROOT, "tools", "export_trt.py")
# The float16 graph's largest difference from float32 TensorFlow on this model measured ~2e-5
# here; 1e-3 leaves room for other CPUs' kernels and still fails for anything that is not a
# faithful float16 version of the model.
FP16_TEST_TOLERANCE = 1e-3


def _run_tool(*args):
  return subprocess.run([sys.executable, TOOL, *args], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=900, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


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
  result = _run_tool(f"--checkpoint={run_dir}", f"--out_dir={out_dir}", "--latency_runs=1",
                     "--latency_batch=2", "--parity_pictures=2", "--max_batch=4",
                     "--opt_batch=2")
  assert result.returncode == 0, result.stdout + result.stderr
  with open(out_dir / export_trt.REPORT_FILENAME) as handle:
    report = json.load(handle)
  return types.SimpleNamespace(root=root, run_dir=run_dir, out_dir=out_dir, stdout=result.stdout,
                               report=report)


def _pictures(count, seed):
  """Test pictures made differently from the tool's: uniform noise plus a bright square."""
  pictures = np.random.RandomState(seed).randint(0, 256, (count, SIZE, SIZE, 3))
  pictures[:, 16:40, 20:44] = np.minimum(pictures[:, 16:40, 20:44] + 120, 255)
  return pictures.astype(np.uint8)


def _tensorflow_reference(model, pictures):
  """float32 TensorFlow, through dunet.data.preprocess (histogram median), not dunet.serving."""
  outputs = model(preprocess.preprocess(tf.constant(pictures), "reference"), is_training=False)
  return {"probability": tf.sigmoid(outputs.logits2).numpy(),
          "probability_head1": tf.sigmoid(outputs.logits1).numpy()}


@pytest.mark.slow
@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-5), ("fp16", FP16_TEST_TOLERANCE)])
def test_onnx_parity_with_onnxruntime(tool_run, model, precision, tolerance):
  session = ort.InferenceSession(str(tool_run.out_dir / export_trt.ONNX_FILES[precision]),
                                 providers=["CPUExecutionProvider"])
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
  for precision, filename in export_trt.ONNX_FILES.items():
    proto = onnx.load(str(tool_run.out_dir / filename))
    onnx.checker.check_model(proto, full_check=True)
    info = export_trt.describe_onnx(proto)
    assert (info.input_name, info.input_type, info.input_shape) == (
        "images", "uint8", ["batch", SIZE, SIZE, 3])
    assert info.outputs == {"probability": "float32", "probability_head1": "float32"}
    assert not set(info.op_counts) & {"If", "Loop", "Scan", "Unique", "Compress", "NonZero",
                                      "ScatterND"}, info.op_counts
    assert info.op_counts["Conv"] == 54
    conv_weights = {node.input[1] for node in proto.graph.node if node.op_type == "Conv"}
    weight_types = {init.data_type for init in proto.graph.initializer if init.name in conv_weights}
    assert weight_types == {TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT}
    assert tool_run.report["onnx"][precision]["op_counts"] == info.op_counts


@pytest.mark.slow
def test_tool_output_report_and_trtexec_line(tool_run):
  out_dir, report, stdout = tool_run.out_dir, tool_run.report, tool_run.stdout
  assert sorted(os.listdir(out_dir)) == sorted(
      ["saved_model", "dunet_fp32.onnx", "dunet_fp16.onnx", "export_trt.json"])
  assert leftovers(tool_run.root) == []
  assert serving.is_saved_model(str(out_dir / "saved_model"))
  for precision, tolerance in (("fp32", export_trt.DEFAULT_FP32_TOLERANCE),
                               ("fp16", export_trt.DEFAULT_FP16_TOLERANCE)):
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
      "trtexec", f"--onnx={out_dir / 'dunet_fp16.onnx'}",
      f"--saveEngine={out_dir / 'dunet_fp16.plan'}", "--stronglyTyped",
      f"--minShapes=images:1x{SIZE}x{SIZE}x3", f"--optShapes=images:2x{SIZE}x{SIZE}x3",
      f"--maxShapes=images:4x{SIZE}x{SIZE}x3", "--memPoolSize=workspace:4096M"]
  assert report["tf_trt"]["supported"] == bool(
      tf.sysconfig.get_build_info().get("is_tensorrt_build", False))
  names = {(row["name"], row["batch"]) for row in report["latency"]}
  assert names == {(name, batch) for batch in (1, 2) for name in (
      "TF SavedModel (serving_default)", "ONNX fp32 (onnxruntime CPU)",
      "ONNX fp16 (onnxruntime CPU)")}
  assert all(row["ms_per_image"] > 0 for row in report["latency"])
  assert export_trt.format_latency_table(
      [export_trt.LatencyRow(**row) for row in report["latency"]]) in stdout


# ------------------------------------------------------------------------------------------------
# Pieces, without converting a model.
# ------------------------------------------------------------------------------------------------
def test_trtexec_command_quotes_paths_and_uses_the_input_name():
  command = export_trt.trtexec_command("/data/my models/m.onnx", "/data/e.plan", "images", 288,
                                       384, export_trt.BatchProfile(1, 8, 32), 2048)
  assert shlex.split(command) == [
      "trtexec", "--onnx=/data/my models/m.onnx", "--saveEngine=/data/e.plan", "--stronglyTyped",
      "--minShapes=images:1x288x384x3", "--optShapes=images:8x288x384x3",
      "--maxShapes=images:32x288x384x3", "--memPoolSize=workspace:2048M"]


@pytest.mark.parametrize("batches", [(0, 1, 1), (2, 1, 4), (1, 8, 4)])
def test_batch_profile_must_be_ordered(batches):
  with pytest.raises(ValueError, match="min_batch <= opt_batch <= max_batch"):
    export_trt.BatchProfile(*batches)


def test_missing_tensorrt_and_gpu_are_both_named(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
  library = str(tmp_path / "libcuda.so.1")
  module, missing = export_trt.tensorrt_requirements(library)
  assert module is None
  assert len(missing) == 2
  assert missing[0].startswith("the `tensorrt` Python package")
  assert missing[1].startswith("a CUDA GPU (no NVIDIA driver: ") and library in missing[1]


def test_tensorrt_without_gpu_is_not_usable(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
  module, missing = export_trt.tensorrt_requirements(str(tmp_path / "nothing.so"))
  assert module is None and len(missing) == 1 and missing[0].startswith("a CUDA GPU")


def test_tftrt_status_follows_what_tensorflow_reports(monkeypatch):
  monkeypatch.setattr(tf.sysconfig, "get_build_info", lambda: {"is_tensorrt_build": True})
  assert export_trt.tftrt_status()[0] is True
  monkeypatch.setattr(tf.sysconfig, "get_build_info", lambda: {"is_cuda_build": True})
  supported, reason = export_trt.tftrt_status()
  assert supported is False and "is_tensorrt_build=False" in reason


class _Recorder:
  """A stand-in for the parts of the `tensorrt` module build_engine uses; it records each call
  and builds nothing (its "engine" is a marker string)."""

  ENGINE = b"not a TensorRT engine: written by the test's stand-in builder"

  def __init__(self, parse_ok=True, build_ok=True, strongly_typed=True, input_name="images"):
    self.calls = []
    recorder = self

    class Logger:
      WARNING = "warning"

      def __init__(self, severity):
        recorder.calls.append(("Logger", severity))

    class Flag:
      pass
    if strongly_typed:
      Flag.STRONGLY_TYPED = 5

    class Network:
      num_inputs = 1

      def get_input(self, index):
        return types.SimpleNamespace(name=input_name)

    class Parser:
      num_errors = 0 if parse_ok else 2

      def __init__(self, network, logger):
        recorder.calls.append(("OnnxParser",))

      def parse_from_file(self, path):
        recorder.calls.append(("parse_from_file", path))
        return parse_ok

      def get_error(self, index):
        return f"parser error {index}"

    class Profile:
      def set_shape(self, name, smallest, optimal, largest):
        recorder.calls.append(("set_shape", name, smallest, optimal, largest))

    class Config:
      def set_memory_pool_limit(self, pool, size):
        recorder.calls.append(("set_memory_pool_limit", pool, size))

      def add_optimization_profile(self, profile):
        recorder.calls.append(("add_optimization_profile",))

    class Builder:
      def __init__(self, logger):
        recorder.calls.append(("Builder",))

      def create_network(self, flags):
        recorder.calls.append(("create_network", flags))
        return Network()

      def create_builder_config(self):
        return Config()

      def create_optimization_profile(self):
        return Profile()

      def build_serialized_network(self, network, config):
        recorder.calls.append(("build_serialized_network",))
        return bytearray(recorder.ENGINE) if build_ok else None

    self.module = types.SimpleNamespace(
        Logger=Logger, Builder=Builder, OnnxParser=Parser, NetworkDefinitionCreationFlag=Flag,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"))


def test_build_engine_drives_the_builder_as_trtexec_would(tmp_path):
  fake = _Recorder()
  engine_path = str(tmp_path / "m.plan")
  size = export_trt.build_engine(fake.module, "/x/m.onnx", engine_path, "images", 288, 384,
                                 export_trt.BatchProfile(1, 4, 16), workspace_mib=512)
  assert size == len(_Recorder.ENGINE)
  with open(engine_path, "rb") as handle:
    assert handle.read() == _Recorder.ENGINE  # the stand-in's bytes, written as returned
  assert ("create_network", 1 << 5) in fake.calls  # strongly typed
  assert ("parse_from_file", "/x/m.onnx") in fake.calls
  assert ("set_shape", "images", (1, 288, 384, 3), (4, 288, 384, 3), (16, 288, 384, 3)) \
      in fake.calls
  assert ("set_memory_pool_limit", "workspace", 512 << 20) in fake.calls
  names = [call[0] for call in fake.calls]
  assert names.index("add_optimization_profile") < names.index("build_serialized_network")
  assert os.listdir(tmp_path) == ["m.plan"]


def test_build_engine_without_the_strongly_typed_flag(tmp_path):
  # A TensorRT whose networks are always strongly typed and has dropped the flag.
  fake = _Recorder(strongly_typed=False)
  export_trt.build_engine(fake.module, "m.onnx", str(tmp_path / "m.plan"), "images", 64, 64,
                          export_trt.BatchProfile(1, 1, 1), workspace_mib=1)
  assert ("create_network", 0) in fake.calls


@pytest.mark.parametrize("recorder,message", [
    (_Recorder(parse_ok=False), "ONNX parser rejected m.onnx: parser error 0; parser error 1"),
    (_Recorder(build_ok=False), "could not build an engine from m.onnx"),
    (_Recorder(input_name="input_1"), r"TensorRT sees inputs \['input_1'\]"),
], ids=["parser", "builder", "input"])
def test_build_engine_failures_are_explained(tmp_path, recorder, message):
  with pytest.raises(export_trt.ExportError, match=message):
    export_trt.build_engine(recorder.module, "m.onnx", str(tmp_path / "m.plan"), "images", 64,
                            64, export_trt.BatchProfile(1, 2, 4), workspace_mib=1)
  assert os.listdir(tmp_path) == []


def test_cuda_device_count_names_the_missing_driver(tmp_path):
  count, reason = export_trt.cuda_device_count(str(tmp_path / "libcuda.so.1"))
  assert count == 0 and "cannot be loaded" in reason


def test_latency_table_format_and_median():
  ticks = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # three timed runs: 1 s, 3 s, 2 s
  calls = []
  seconds = export_trt.measure_latency(calls.append, np.zeros((4, 2, 2, 3)), runs=3, warmup=1,
                                       clock=lambda: next(ticks))
  assert len(calls) == 4 and seconds == pytest.approx(2.0 / 4)
  table = export_trt.format_latency_table([
      export_trt.LatencyRow("TF SavedModel (serving_default)", 1, 1234.567, 5),
      export_trt.LatencyRow("TensorRT fp16", 16, 0.5, 5)])
  lines = table.splitlines()
  assert lines[0].split() == ["format", "batch", "ms/image", "runs"]
  assert set(lines[1]) == {"-"} and len(lines[1]) == len(lines[0])
  assert lines[2].split() == ["TF", "SavedModel", "(serving_default)", "1", "1234.57", "5"]
  assert lines[3].split() == ["TensorRT", "fp16", "16", "0.50", "5"]
  assert len({len(line) for line in lines}) == 1


def test_parity_stats_and_tolerance():
  expected = {"probability": np.array([0.1, 0.6, 0.9]), "probability_head1": np.zeros(3)}
  got = {"probability": np.array([0.1, 0.4, 0.95]), "probability_head1": np.zeros(3)}
  stats = export_trt.parity_stats(expected, got)
  assert stats["probability"] == pytest.approx(
      {"max_abs": 0.2, "mean_abs": 0.25 / 3, "mask_disagreement": 1 / 3})
  assert export_trt.check_parity("x", stats, 0.2) == pytest.approx(0.2)
  with pytest.raises(export_trt.ExportError, match="x: largest difference .* 0.2 exceeds"):
    export_trt.check_parity("x", stats, 0.1)
  got["probability"][0] = np.nan
  with pytest.raises(export_trt.ExportError):
    export_trt.check_parity("x", export_trt.parity_stats(expected, got), 1.0)


def _tiny_onnx(op="Relu", input_type=TensorProto.UINT8, shape=("batch", 4, 4, 3)):
  nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT)]
  if op == "If":
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y_branch"])], "branch", [],
                               [helper.make_tensor_value_info("y_branch", TensorProto.FLOAT,
                                                              list(shape))])
    nodes += [helper.make_node("Constant", [], ["c"], value=helper.make_tensor(
                  "c", TensorProto.BOOL, [], [True])),
              helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)]
  else:
    nodes.append(helper.make_node(op, ["x"], ["y"]))
  nodes += [helper.make_node("Sigmoid", ["y"], ["probability"]),
            helper.make_node("Sigmoid", ["y"], ["probability_head1"])]
  graph = helper.make_graph(
      nodes, "tiny", [helper.make_tensor_value_info("images", input_type, list(shape))],
      [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
       for name in ("probability", "probability_head1")])
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_check_deployable_accepts_a_plain_graph_and_names_problems():
  info = export_trt.check_deployable(_tiny_onnx(), 4, 4, "tiny")
  assert info.op_counts == {"Cast": 1, "Relu": 1, "Sigmoid": 2}
  with pytest.raises(export_trt.ExportError, match=r"tiny: the graph contains \['If'\]"):
    export_trt.check_deployable(_tiny_onnx(op="If"), 4, 4, "tiny")
  with pytest.raises(export_trt.ExportError, match="expected uint8 \\[batch, 4, 4, 3\\]"):
    export_trt.check_deployable(_tiny_onnx(input_type=TensorProto.FLOAT), 4, 4, "tiny")
  with pytest.raises(export_trt.ExportError, match="expected uint8"):
    export_trt.check_deployable(_tiny_onnx(shape=("batch", "h", "w", 3)), 4, 4, "tiny")


def test_check_deployable_reports_the_onnx_checker():
  proto = _tiny_onnx()
  proto.graph.node[1].op_type = "NoSuchOp"
  with pytest.raises(export_trt.ExportError, match="tiny: the ONNX checker rejects the graph"):
    export_trt.check_deployable(proto, 4, 4, "tiny")


def test_batch_dimension_gets_a_name():
  proto = _tiny_onnx(shape=("unk__7", 4, 4, 3))
  export_trt.name_batch_dimension(proto)
  assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_float16_segmenter_restores_the_saved_weights(tmp_path):
  model = DoubleUNet()
  model.head2.bias.assign(np.full([1], 0.25, np.float32))
  segmenter = serving.Segmenter(model, 32, 32, "unit")
  tf.saved_model.save(segmenter, str(tmp_path / "sm"), signatures=segmenter.signatures())
  half = export_trt.float16_segmenter(str(tmp_path / "sm"), 32, 32, "unit")
  assert half.model.compute_dtype == tf.float16
  for restored, original in zip(half.model.variables, model.variables):
    np.testing.assert_array_equal(restored.numpy(), original.numpy())
  assert restored.dtype == tf.float32


def test_cli_requires_a_source_and_names_a_missing_checkpoint(tmp_path):
  usage = _run_tool(f"--out_dir={tmp_path / 'out'}")
  assert usage.returncode == 1 and "exactly one of --saved_model and --checkpoint" in usage.stderr
  missing = _run_tool(f"--checkpoint={tmp_path / 'nothing'}", f"--out_dir={tmp_path / 'out'}")
  assert missing.returncode == 1
  assert f"error: no checkpoint at '{tmp_path / 'nothing'}'" in missing.stderr
  assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_folder_that_is_no_saved_model_is_named(tmp_path):
  settings = export_trt.Settings(out_dir=str(tmp_path / "out"), saved_model=str(tmp_path))
  with pytest.raises(export_trt.ExportError, match=re.escape(f"{tmp_path} is not a SavedModel")):
    export_trt.export_trt(settings)
  assert not (tmp_path / "out").exists()


def test_require_tensorrt_fails_before_converting(tmp_path):
  if export_trt.tensorrt_requirements()[0] is not None:
    pytest.skip("TensorRT and a GPU are present here")
  settings = export_trt.Settings(out_dir=str(tmp_path / "out"), checkpoint=str(tmp_path / "run"),
                                 tensorrt="require")
  # The checkpoint does not exist either: TensorRT is checked first, before any slow step.
  with pytest.raises(export_trt.ExportError,
                     match="--tensorrt=require, but TensorRT cannot build here; missing: "):
    export_trt.export_trt(settings)
  assert os.listdir(tmp_path) == []


def test_cli_help_documents_every_flag():
  result = _run_tool("--helpfull")
  for flag in ("saved_model", "checkpoint", "out_dir", "overwrite", "fp16_tolerance",
               "fp32_tolerance", "engine_tolerance", "tensorrt", "engines", "min_batch",
               "opt_batch", "max_batch", "workspace_mib", "latency_batch", "latency_runs",
               "onnxruntime_providers", "opset", "parity_pictures"):
    assert f"--{flag}" in result.stdout


class _FakeCuda:
  """Host memory standing in for device memory, with the CudaDriver interface."""

  def __init__(self):
    self.memory = {}
    self.freed = []

  def allocate(self, nbytes):
    pointer = 4096 * (len(self.memory) + len(self.freed) + 1)
    self.memory[pointer] = np.zeros(nbytes, np.uint8)
    return pointer

  def free(self, pointer):
    del self.memory[pointer]
    self.freed.append(pointer)

  def to_device(self, pointer, array):
    self.memory[pointer][:] = np.frombuffer(np.ascontiguousarray(array).tobytes(), np.uint8)

  def to_host(self, array, pointer):
    array.view(np.uint8).reshape(-1)[:] = self.memory[pointer]

  def synchronize(self):
    pass


def _fake_engine_module(cuda):
  """A stand-in `tensorrt` whose "engine" computes, from uint8 images [B, H, W, 3], the channel
  mean / 255 (probability) and its square (probability_head1): enough to check that EngineRunner
  moves the right bytes to and from the right tensors."""
  io = {"images": ("INPUT", "UINT8"), "probability": ("OUTPUT", "FLOAT"),
        "probability_head1": ("OUTPUT", "FLOAT")}

  class Context:
    def __init__(self):
      self.shape, self.addresses = None, {}

    def set_input_shape(self, name, shape):
      assert name == "images"
      self.shape = tuple(shape)
      return shape[0] <= 4  # the "profile" allows batches up to 4

    def get_tensor_shape(self, name):
      return self.shape if name == "images" else self.shape[:3] + (1,)

    def set_tensor_address(self, name, pointer):
      self.addresses[name] = pointer

    def execute_async_v3(self, stream):
      assert stream == 0
      images = cuda.memory[self.addresses["images"]].reshape(self.shape)
      mean = images.astype(np.float32).mean(axis=-1, keepdims=True) / 255
      for name, value in (("probability", mean), ("probability_head1", mean ** 2)):
        cuda.memory[self.addresses[name]][:] = np.frombuffer(value.tobytes(), np.uint8)
      return True

  class Engine:
    num_io_tensors = len(io)

    def get_tensor_name(self, index):
      return list(io)[index]

    def get_tensor_mode(self, name):
      return io[name][0]

    def get_tensor_dtype(self, name):
      return io[name][1]

    def create_execution_context(self):
      return Context()

  class Runtime:
    def __init__(self, logger):
      pass

    def deserialize_cuda_engine(self, data):
      assert data == b"plan"
      return Engine()

  return types.SimpleNamespace(
      Logger=_Recorder().module.Logger, Runtime=Runtime,
      TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
      nptype=lambda dtype: {"UINT8": np.uint8, "FLOAT": np.float32}[dtype])


def test_engine_runner_moves_inputs_and_outputs(tmp_path):
  (tmp_path / "m.plan").write_bytes(b"plan")
  cuda = _FakeCuda()
  runner = export_trt.EngineRunner(_fake_engine_module(cuda), str(tmp_path / "m.plan"), cuda)
  images = np.random.RandomState(2).randint(0, 256, (3, 4, 5, 3)).astype(np.uint8)
  expected = images.astype(np.float32).mean(axis=-1, keepdims=True) / 255
  for _ in range(2):  # buffers are reused for the same shape
    outputs = runner(images)
    np.testing.assert_allclose(outputs["probability"], expected, rtol=1e-6)
    np.testing.assert_allclose(outputs["probability_head1"], expected ** 2, rtol=1e-6)
  assert len(cuda.memory) == 3
  runner(images[:1])
  assert len(cuda.memory) == 6
  with pytest.raises(export_trt.ExportError, match="does not take input shape"):
    runner(np.zeros((5, 4, 5, 3), np.uint8))
  runner.close()
  assert not cuda.memory and len(cuda.freed) == 6


def test_cuda_driver_names_a_missing_driver(tmp_path):
  with pytest.raises(export_trt.ExportError, match="cannot load the NVIDIA driver"):
    export_trt.CudaDriver(str(tmp_path / "libcuda.so.1"))
