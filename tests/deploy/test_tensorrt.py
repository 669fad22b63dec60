"""dunet/deploy/tensorrt.py: the trtexec command, what is missing where TensorRT cannot build, the
builder's calls (a stand-in `tensorrt` module records them), the engine runner's buffers (a
stand-in engine over host memory), and, where a GPU and TensorRT exist, a real engine's parity
with the SavedModel."""

import os
import shlex
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from dunet import serving
from dunet.deploy import pipeline
from dunet.deploy import tensorrt
from dunet.errors import ConfigError
from dunet.errors import ExportError
from tests.export_helpers import SIZE
from tests.export_helpers import make_model
from tests.export_helpers import write_run


def test_trtexec_command_quotes_paths_and_uses_the_input_name():
  command = tensorrt.trtexec_command(
    "/data/my models/m.onnx",
    "/data/e.plan",
    "images",
    288,
    384,
    tensorrt.BatchProfile(1, 8, 32),
    2048,
  )
  assert shlex.split(command) == [
    "trtexec",
    "--onnx=/data/my models/m.onnx",
    "--saveEngine=/data/e.plan",
    "--stronglyTyped",
    "--minShapes=images:1x288x384x3",
    "--optShapes=images:8x288x384x3",
    "--maxShapes=images:32x288x384x3",
    "--memPoolSize=workspace:2048M",
  ]


@pytest.mark.parametrize("batches", [(0, 1, 1), (2, 1, 4), (1, 8, 4)])
def test_batch_profile_must_be_ordered(batches):
  with pytest.raises(ConfigError, match="min_batch <= opt_batch <= max_batch"):
    tensorrt.BatchProfile(*batches)


def test_missing_tensorrt_and_gpu_are_both_named(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
  library = str(tmp_path / "libcuda.so.1")
  module, missing = tensorrt.tensorrt_requirements(library)
  assert module is None
  assert len(missing) == 2
  assert missing[0].startswith("the `tensorrt` Python package")
  assert missing[1].startswith("a CUDA GPU (no NVIDIA driver: ") and library in missing[1]


def test_tensorrt_without_gpu_is_not_usable(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
  module, missing = tensorrt.tensorrt_requirements(str(tmp_path / "nothing.so"))
  assert module is None and len(missing) == 1 and missing[0].startswith("a CUDA GPU")


def test_tftrt_status_follows_what_tensorflow_reports(monkeypatch):
  monkeypatch.setattr(tf.sysconfig, "get_build_info", lambda: {"is_tensorrt_build": True})
  assert tensorrt.tftrt_status()[0] is True
  monkeypatch.setattr(tf.sysconfig, "get_build_info", lambda: {"is_cuda_build": True})
  supported, reason = tensorrt.tftrt_status()
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
      Logger=Logger,
      Builder=Builder,
      OnnxParser=Parser,
      NetworkDefinitionCreationFlag=Flag,
      MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"),
    )


def test_build_engine_makes_the_builder_calls_and_writes_what_it_returns(tmp_path):
  # A stand-in records the calls: strongly typed network, the ONNX file parsed, the profile's
  # three shapes, the workspace limit, the profile added before building. No engine is built
  # (test_real_engine_matches_the_saved_model does that where a GPU is).
  fake = _Recorder()
  engine_path = str(tmp_path / "m.plan")
  size = tensorrt.build_engine(
    fake.module,
    "/x/m.onnx",
    engine_path,
    "images",
    288,
    384,
    tensorrt.BatchProfile(1, 4, 16),
    workspace_mib=512,
  )
  assert size == len(_Recorder.ENGINE)
  with open(engine_path, "rb") as handle:
    assert handle.read() == _Recorder.ENGINE  # the stand-in's bytes, written as returned
  assert ("create_network", 1 << 5) in fake.calls  # strongly typed
  assert ("parse_from_file", "/x/m.onnx") in fake.calls
  assert (
    "set_shape",
    "images",
    (1, 288, 384, 3),
    (4, 288, 384, 3),
    (16, 288, 384, 3),
  ) in fake.calls
  assert ("set_memory_pool_limit", "workspace", 512 << 20) in fake.calls
  names = [call[0] for call in fake.calls]
  assert names.index("add_optimization_profile") < names.index("build_serialized_network")
  assert os.listdir(tmp_path) == ["m.plan"]


def test_build_engine_without_the_strongly_typed_flag(tmp_path):
  # A TensorRT whose networks are always strongly typed and has dropped the flag.
  fake = _Recorder(strongly_typed=False)
  tensorrt.build_engine(
    fake.module,
    "m.onnx",
    str(tmp_path / "m.plan"),
    "images",
    64,
    64,
    tensorrt.BatchProfile(1, 1, 1),
    workspace_mib=1,
  )
  assert ("create_network", 0) in fake.calls


@pytest.mark.parametrize(
  "recorder,message",
  [
    (_Recorder(parse_ok=False), "ONNX parser rejected m.onnx: parser error 0; parser error 1"),
    (_Recorder(build_ok=False), "could not build an engine from m.onnx"),
    (_Recorder(input_name="input_1"), r"TensorRT sees inputs \['input_1'\]"),
  ],
  ids=["parser", "builder", "input"],
)
def test_build_engine_failures_are_explained(tmp_path, recorder, message):
  with pytest.raises(ExportError, match=message):
    tensorrt.build_engine(
      recorder.module,
      "m.onnx",
      str(tmp_path / "m.plan"),
      "images",
      64,
      64,
      tensorrt.BatchProfile(1, 2, 4),
      workspace_mib=1,
    )
  assert os.listdir(tmp_path) == []


def test_cuda_device_count_names_the_missing_driver(tmp_path):
  count, reason = tensorrt.cuda_device_count(str(tmp_path / "libcuda.so.1"))
  assert count == 0 and "cannot be loaded" in reason


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
  io = {
    "images": ("INPUT", "UINT8"),
    "probability": ("OUTPUT", "FLOAT"),
    "probability_head1": ("OUTPUT", "FLOAT"),
  }

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
      for name, value in (("probability", mean), ("probability_head1", mean**2)):
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
    Logger=_Recorder().module.Logger,
    Runtime=Runtime,
    TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
    nptype=lambda dtype: {"UINT8": np.uint8, "FLOAT": np.float32}[dtype],
  )


def test_engine_runner_moves_inputs_and_outputs(tmp_path):
  (tmp_path / "m.plan").write_bytes(b"plan")
  cuda = _FakeCuda()
  runner = tensorrt.EngineRunner(_fake_engine_module(cuda), str(tmp_path / "m.plan"), cuda)
  images = np.random.RandomState(2).randint(0, 256, (3, 4, 5, 3)).astype(np.uint8)
  expected = images.astype(np.float32).mean(axis=-1, keepdims=True) / 255
  for _ in range(2):  # buffers are reused for the same shape
    outputs = runner(images)
    np.testing.assert_allclose(outputs["probability"], expected, rtol=1e-6)
    np.testing.assert_allclose(outputs["probability_head1"], expected**2, rtol=1e-6)
  assert len(cuda.memory) == 3
  runner(images[:1])
  assert len(cuda.memory) == 6
  with pytest.raises(ExportError, match="does not take input shape"):
    runner(np.zeros((5, 4, 5, 3), np.uint8))
  runner.close()
  assert not cuda.memory and len(cuda.freed) == 6


def test_cuda_driver_names_a_missing_driver(tmp_path):
  with pytest.raises(ExportError, match="cannot load the NVIDIA driver"):
    tensorrt.CudaDriver(str(tmp_path / "libcuda.so.1"))


# ------------------------------------------------------------------------------------------------
# A real engine, where TensorRT and a CUDA GPU exist (never on CI's CPU machines).
# ------------------------------------------------------------------------------------------------
_TRT_MODULE, _TRT_MISSING = tensorrt.tensorrt_requirements()
# fp32 engines: TensorRT's own kernels and accumulation orders on the same float32 arithmetic.
ENGINE_FP32_TEST_TOLERANCE = 1e-3


@pytest.mark.slow
@pytest.mark.skipif(
  _TRT_MODULE is None, reason="needs TensorRT and a CUDA GPU; missing: " + "; ".join(_TRT_MISSING)
)
def test_real_engine_matches_the_saved_model(tmp_path):
  run_dir = tmp_path / "run"
  write_run(run_dir, make_model(seed=7), preprocessing="reference")
  out_dir = tmp_path / "deploy"
  report = pipeline.export_trt(
    pipeline.Settings(
      out_dir=str(out_dir),
      checkpoint=str(run_dir),
      tensorrt="require",
      engines=("fp32", "fp16"),
      profile=tensorrt.BatchProfile(1, 2, 4),
      workspace_mib=1024,
      parity_pictures=2,
      latency_runs=1,
      latency_batch=2,
    ),
    log=lambda line: None,
  )
  assert report["tensorrt"]["built"] is True
  # Recomputed here: the engine on new pictures against the SavedModel's serving signature.
  signature = tf.saved_model.load(str(out_dir / "saved_model")).signatures["serving_default"]
  pictures = np.random.RandomState(3).randint(0, 256, (3, SIZE, SIZE, 3)).astype(np.uint8)
  outputs = signature(images=tf.constant(pictures))
  expected = {name: value.numpy() for name, value in outputs.items()}
  for precision, tolerance in (
    ("fp32", ENGINE_FP32_TEST_TOLERANCE),
    ("fp16", pipeline.DEFAULT_ENGINE_TOLERANCE),
  ):
    runner = tensorrt.EngineRunner(_TRT_MODULE, str(out_dir / pipeline.ENGINE_FILES[precision]))
    try:
      got = runner(pictures)
    finally:
      runner.close()
    for name in serving.OUTPUT_NAMES:
      assert got[name].shape == (3, SIZE, SIZE, 1) and got[name].dtype == np.float32
      np.testing.assert_allclose(
        got[name], expected[name], atol=tolerance, err_msg=f"{precision} {name}"
      )
