r"""Deployment export: SavedModel -> ONNX (float32, float16) -> TensorRT engine, each checked.

Current TensorFlow wheels are built without TF-TRT (this tool asks TensorFlow, through
`tf.sysconfig.get_build_info()`, and says what it reports), so the route to TensorRT is ONNX:

  1. SavedModel: --saved_model (written by `python -m dunet.export`), or exported first from
     --checkpoint into <out_dir>/saved_model (verified by reloading, see dunet/export.py).
  2. ONNX, converted with tf2onnx from the SavedModel's "model_size" signature:
       dunet_fp32.onnx  float32 arithmetic.
       dunet_fp16.onnx  float16 arithmetic: the same weights in a DoubleUNet built with
                        compute_dtype=float16 (TensorFlow's own mixed precision: float16
                        convolutions, BatchNorm and squeeze-excite averages in float32, logits
                        cast to float32), converted the same way. Inputs and outputs keep their
                        types (uint8 in, float32 out).
     Both graphs are checked with the ONNX checker and must contain no control flow and no
     data-dependent shapes (If, Loop, Scan, Unique, Compress, NonZero): their node types are
     listed in the report. Then onnxruntime runs each on deterministic pictures and is compared
     with the SavedModel's serving signature: the run fails when the largest difference of a
     probability exceeds --fp32_tolerance / --fp16_tolerance.
  3. TensorRT, where the `tensorrt` package imports and an NVIDIA driver reports a GPU: the ONNX
     file is parsed with TensorRT's OnnxParser into a strongly typed network (the precision comes
     from the ONNX types), built with one optimization profile over the batch dimension
     (--min_batch/--opt_batch/--max_batch), serialized to dunet_fp16.plan (and/or
     dunet_fp32.plan, --engines), then run on the same pictures and compared with TensorFlow
     (--engine_tolerance); device buffers come from the NVIDIA driver library through ctypes, so
     nothing beyond `tensorrt` is needed. Elsewhere the tool says exactly what is missing and
     prints the `trtexec` command that builds the same engine on a GPU machine.
  4. A latency table: median milliseconds per image, batch 1 and --latency_batch, for every
     format produced (TensorFlow SavedModel, ONNX fp32 and fp16 in onnxruntime, TensorRT).

Why the "model_size" signature and not "serving_default": serving_default accepts any picture
size and resizes inside, with `tf.cond` (ONNX `If`) around the resizes; tf2onnx also maps
TensorFlow's area resize to ONNX nearest-neighbour, which silently changes results for
pictures larger than the model. model_size takes uint8 pictures at exactly the model size
(dynamic batch only) and has no control flow, which is what TensorRT builds best. Resize
pictures to the model size before calling the ONNX model or engine, as
dunet.data.prepare.resize_image does (OpenCV area when shrinking, bilinear otherwise), and
resize the probabilities back (bilinear).

Everything is written into a hidden folder next to --out_dir and renamed at the end; a failed
check leaves no --out_dir behind.

  <out_dir>/saved_model/      (with --checkpoint) the verified SavedModel
  <out_dir>/dunet_fp32.onnx, dunet_fp16.onnx
  <out_dir>/dunet_fp16.plan   where TensorRT built it
  <out_dir>/export_trt.json   inputs, node types, parity, latency, TensorRT status, trtexec line

Examples:
  python tools/export_trt.py --checkpoint=runs/cvc --out_dir=exports/cvc_trt
  python tools/export_trt.py --saved_model=exports/cvc --out_dir=exports/cvc_trt --max_batch=32
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import json
import logging as std_logging
import os
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import app
from absl import flags
import numpy as np

# Runnable as `python tools/export_trt.py` from a checkout without installing dunet.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

from dunet import checkpoint as checkpoint_lib  # noqa: E402
from dunet import export as export_lib  # noqa: E402
from dunet import fileio  # noqa: E402
from dunet import serving  # noqa: E402
from dunet.models import DoubleUNet  # noqa: E402

SAVED_MODEL_SUBDIR = "saved_model"
ONNX_FILES = {"fp32": "dunet_fp32.onnx", "fp16": "dunet_fp16.onnx"}
ENGINE_FILES = {"fp32": "dunet_fp32.plan", "fp16": "dunet_fp16.plan"}
REPORT_FILENAME = "export_trt.json"
DEFAULT_OPSET = 17
# ONNX parity against TensorFlow, as the largest difference of a probability. float32: the same
# arithmetic in another runtime (measured ~2e-7). float16: measured against float32 TensorFlow on
# random-weight models at 64x64 and 128x128, with logits from ~0.1 up to ~90 in magnitude: at
# most 1.2e-3 in onnxruntime (TensorFlow's own float16 run: 2.2e-3), no mask changed; 2e-2
# leaves a 10x margin for larger pictures and trained weights.
DEFAULT_FP32_TOLERANCE = 1e-4
DEFAULT_FP16_TOLERANCE = 2e-2
# TensorRT chooses its own kernels and accumulation orders, and nothing could be measured on a GPU
# here: a wider bound for engines, to be tightened with measurements (the report has them).
DEFAULT_ENGINE_TOLERANCE = 5e-2
# Node types that mean control flow or data-dependent shapes: TensorRT takes them badly or not at
# all, and none belongs in the model-size graph.
FORBIDDEN_OPS = frozenset({"If", "Loop", "Scan", "Unique", "Compress", "NonZero"})
PARITY_PICTURES = 4
# The NVIDIA driver library: present wherever a CUDA GPU is usable, whatever else is installed.
CUDA_DRIVER_LIBRARY = "libcuda.so.1"


class ExportError(RuntimeError):
  """A step failed or a check did not pass; the message says which and why."""


# ================================================================================================
# ONNX
# ================================================================================================
@contextlib.contextmanager
def _strict_tf2onnx():
  """tf2onnx with its optimizer errors raised instead of logged and skipped.

  TF2ONNX_CATCH_ERRORS=FALSE also stops tf2onnx from deep-copying the whole graph (29 M weights)
  before each optimizer pass to roll back on errors: conversion takes half the time.
  """
  previous = os.environ.get("TF2ONNX_CATCH_ERRORS")
  os.environ["TF2ONNX_CATCH_ERRORS"] = "FALSE"
  tf2onnx_logger = std_logging.getLogger("tf2onnx")
  level = tf2onnx_logger.level
  tf2onnx_logger.setLevel(std_logging.ERROR)
  try:
    yield
  finally:
    tf2onnx_logger.setLevel(level)
    if previous is None:
      os.environ.pop("TF2ONNX_CATCH_ERRORS", None)
    else:
      os.environ["TF2ONNX_CATCH_ERRORS"] = previous


def saved_model_to_onnx(saved_model_dir: str, signature: str = serving.MODEL_SIZE_SIGNATURE,
                        opset: int = DEFAULT_OPSET):
  """Converts one signature of a SavedModel with tf2onnx (what `python -m tf2onnx.convert
  --saved-model DIR --signature_def KEY` does), keeping the signature's input/output names.

  Returns:
    An onnx.ModelProto.
  """
  import tf2onnx  # pylint: disable=g-import-not-at-top
  from tf2onnx import tf_loader  # pylint: disable=g-import-not-at-top
  with _strict_tf2onnx():
    graph_def, inputs, outputs, renames = tf_loader.from_saved_model(
        saved_model_dir, None, None, tag="serve", signatures=[signature],
        return_tensors_to_rename=True)
    proto, _ = tf2onnx.convert.from_graph_def(
        graph_def, name=f"dunet {signature}", input_names=inputs, output_names=outputs,
        opset=opset, tensors_to_rename=renames)
  return proto


def function_to_onnx(function: Callable, input_spec: tf.TensorSpec, opset: int = DEFAULT_OPSET):
  """Converts a tf.function with one input with tf2onnx.

  Returns:
    An onnx.ModelProto.
  """
  import tf2onnx  # pylint: disable=g-import-not-at-top
  with _strict_tf2onnx():
    proto, _ = tf2onnx.convert.from_function(function, input_signature=[input_spec], opset=opset)
  return proto


def float16_segmenter(saved_model_dir: str, height: int, width: int,
                      preprocessing: str) -> serving.Segmenter:
  """A Segmenter computing in float16 with the weights of a dunet SavedModel.

  The SavedModel's variables are a checkpoint whose root is the exported Segmenter, so its
  `model` child restores into a DoubleUNet built with compute_dtype=float16 (variables stay
  float32; every one must match).
  """
  model = DoubleUNet(compute_dtype=tf.float16)
  checkpoint_lib.restore_model(model, os.path.join(saved_model_dir, "variables", "variables"))
  return serving.Segmenter(model, height, width, preprocessing)


@dataclasses.dataclass
class OnnxInfo:
  """What an ONNX graph takes and is made of."""
  input_name: str
  input_type: str
  input_shape: List[Any]
  outputs: Dict[str, str]
  op_counts: Dict[str, int]
  weight_types: Dict[str, int]


_ONNX_TYPE_NAMES = {1: "float32", 2: "uint8", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
                    11: "float64", 16: "bfloat16"}


def describe_onnx(proto) -> OnnxInfo:
  """Inputs, outputs, node-type histogram and weight types of an ONNX model."""
  def type_name(value_info) -> str:
    code = value_info.type.tensor_type.elem_type
    return _ONNX_TYPE_NAMES.get(code, str(code))

  def shape(value_info) -> List[Any]:
    return [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
            for dim in value_info.type.tensor_type.shape.dim]

  graph = proto.graph
  if len(graph.input) != 1:
    raise ExportError(f"expected one ONNX input, got {[i.name for i in graph.input]}")
  ops = collections.Counter(node.op_type for node in graph.node)
  weights = collections.Counter(_ONNX_TYPE_NAMES.get(init.data_type, str(init.data_type))
                                for init in graph.initializer)
  return OnnxInfo(input_name=graph.input[0].name, input_type=type_name(graph.input[0]),
                  input_shape=shape(graph.input[0]),
                  outputs={output.name: type_name(output) for output in graph.output},
                  op_counts=dict(sorted(ops.items())), weight_types=dict(sorted(weights.items())))


def check_deployable(proto, height: int, width: int, label: str) -> OnnxInfo:
  """Checks an ONNX model is what TensorRT and callers expect; raises ExportError otherwise.

  The ONNX checker (full check, with shape inference) must pass; every node must be a standard
  ONNX operator; none may be control flow or data-dependent (FORBIDDEN_OPS); the input must be
  uint8 [batch, height, width, 3] with only the batch dynamic, and both probabilities float32.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  try:
    onnx.checker.check_model(proto, full_check=True)
  except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
    raise ExportError(f"{label}: the ONNX checker rejects the graph: {error}") from error
  foreign = sorted({f"{node.domain}:{node.op_type}" for node in proto.graph.node
                    if node.domain not in ("", "ai.onnx")})
  if foreign:
    raise ExportError(f"{label}: non-standard ONNX nodes (TensorFlow ops tf2onnx could not "
                      f"convert?): {foreign}")
  info = describe_onnx(proto)
  bad = sorted(FORBIDDEN_OPS & set(info.op_counts))
  if bad:
    raise ExportError(f"{label}: the graph contains {bad} (control flow or data-dependent "
                      "shapes); export the SavedModel's model_size signature")
  if info.input_type != "uint8" or len(info.input_shape) != 4 or \
      info.input_shape[1:] != [height, width, 3] or isinstance(info.input_shape[0], int):
    raise ExportError(f"{label}: input {info.input_name!r} is {info.input_type} "
                      f"{info.input_shape}, expected uint8 [batch, {height}, {width}, 3]")
  expected_outputs = {name: "float32" for name in serving.OUTPUT_NAMES}
  if info.outputs != expected_outputs:
    raise ExportError(f"{label}: outputs {info.outputs}, expected {expected_outputs}")
  return info


def name_batch_dimension(proto, name: str = "batch") -> None:
  """Names the dynamic first dimension of every input and output `name` (tf2onnx leaves
  "unk__N"), so that tools and error messages say what it is."""
  for value_info in list(proto.graph.input) + list(proto.graph.output):
    dimension = value_info.type.tensor_type.shape.dim[0]
    if not dimension.HasField("dim_value"):
      dimension.dim_param = name


def save_onnx(proto, path: str) -> None:
  """Writes an ONNX model (via a temporary name, so `path` is whole or absent)."""
  fileio.write_bytes_atomic(path, proto.SerializeToString())


def onnxruntime_session(path: str, providers: Sequence[str]):
  """An onnxruntime InferenceSession on `providers`, which must all be available."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  missing = [p for p in providers if p not in ort.get_available_providers()]
  if missing:
    raise ExportError(f"onnxruntime {ort.__version__} lacks {missing}; available: "
                      f"{ort.get_available_providers()}")
  return ort.InferenceSession(path, providers=list(providers))


def run_onnx(session, images: np.ndarray) -> Dict[str, np.ndarray]:
  """Runs an onnxruntime session on uint8 images; returns {output name: array}."""
  names = [output.name for output in session.get_outputs()]
  values = session.run(names, {session.get_inputs()[0].name: images})
  return dict(zip(names, values))


# ================================================================================================
# Parity
# ================================================================================================
def parity_stats(expected: Mapping[str, np.ndarray],
                 got: Mapping[str, np.ndarray]) -> Dict[str, Dict[str, float]]:
  """Per output: the largest and mean absolute difference, and the share of pixels whose mask
  (p > 0.5) differs."""
  if set(expected) != set(got):
    raise ExportError(f"outputs differ: expected {sorted(expected)}, got {sorted(got)}")
  stats = {}
  for name in sorted(expected):
    want = np.asarray(expected[name], np.float64)
    have = np.asarray(got[name], np.float64)
    if want.shape != have.shape:
      raise ExportError(f"output {name!r} has shape {have.shape}, expected {want.shape}")
    difference = np.abs(want - have)
    stats[name] = {"max_abs": float(np.max(difference)),
                   "mean_abs": float(np.mean(difference)),
                   "mask_disagreement": float(np.mean((want > 0.5) != (have > 0.5)))}
  return stats


def check_parity(label: str, stats: Mapping[str, Mapping[str, float]], tolerance: float) -> float:
  """Returns the largest difference over the outputs; raises ExportError above `tolerance`."""
  worst = max(entry["max_abs"] for entry in stats.values())
  if not worst <= tolerance:  # NaN fails too
    raise ExportError(f"{label}: largest difference from TensorFlow {worst:.3g} exceeds the "
                      f"tolerance {tolerance:.3g} ({json.dumps(stats)})")
  return worst


def format_parity(label: str, stats: Mapping[str, Mapping[str, float]], tolerance: float) -> str:
  """One line per output: max/mean absolute difference and mask disagreement."""
  lines = []
  for name, entry in stats.items():
    lines.append(f"  {label:<14} {name:<18} max |diff| {entry['max_abs']:.2e}  mean "
                 f"{entry['mean_abs']:.2e}  masks differ {100 * entry['mask_disagreement']:.3f}%"
                 f"  (tolerance {tolerance:.0e})")
  return "\n".join(lines)


# ================================================================================================
# TensorRT
# ================================================================================================
def tftrt_status() -> Tuple[bool, str]:
  """Whether this TensorFlow reports TF-TRT support, from its build information."""
  info = tf.sysconfig.get_build_info()
  supported = bool(info.get("is_tensorrt_build", False))
  return supported, (f"TensorFlow {tf.__version__} reports is_tensorrt_build={supported}")


def cuda_device_count(library: str = CUDA_DRIVER_LIBRARY) -> Tuple[int, str]:
  """GPUs the NVIDIA driver reports, asked directly (TensorFlow's CPU wheels cannot see them).

  Returns:
    (count, explanation); count 0 comes with the reason.
  """
  try:
    driver = ctypes.CDLL(library)
  except OSError as error:
    return 0, f"no NVIDIA driver: {library} cannot be loaded ({error})"
  status = driver.cuInit(0)
  if status != 0:
    return 0, f"the NVIDIA driver is present but cuInit failed (CUresult {status})"
  count = ctypes.c_int(0)
  status = driver.cuDeviceGetCount(ctypes.byref(count))
  if status != 0:
    return 0, f"cuDeviceGetCount failed (CUresult {status})"
  if count.value == 0:
    return 0, "the NVIDIA driver reports no CUDA device"
  return count.value, f"{count.value} CUDA device(s)"


def tensorrt_requirements(library: str = CUDA_DRIVER_LIBRARY) -> Tuple[Optional[Any], List[str]]:
  """The `tensorrt` module if it can build here, and what is missing otherwise.

  Returns:
    (module or None, missing): `missing` names each missing piece; the module is returned only
    when nothing is missing.
  """
  missing = []
  try:
    import tensorrt  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    tensorrt = None
    missing.append(f"the `tensorrt` Python package ({error}); install the wheel matching the "
                   "GPU machine's CUDA, e.g. `pip install tensorrt`")
  count, reason = cuda_device_count(library)
  if not count:
    missing.append(f"a CUDA GPU ({reason})")
  return (tensorrt if not missing else None), missing


@dataclasses.dataclass(frozen=True)
class BatchProfile:
  """The batch sizes an engine is built for (TensorRT optimization profile)."""
  min_batch: int
  opt_batch: int
  max_batch: int

  def __post_init__(self):
    if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
      raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {self.min_batch}, "
                       f"{self.opt_batch}, {self.max_batch}")

  def shapes(self, height: int, width: int) -> Tuple[Tuple[int, ...], ...]:
    """(min, opt, max) input shapes [batch, height, width, 3]."""
    return tuple((batch, height, width, 3)
                 for batch in (self.min_batch, self.opt_batch, self.max_batch))


def trtexec_command(onnx_path: str, engine_path: str, input_name: str, height: int, width: int,
                    profile: BatchProfile, workspace_mib: int) -> str:
  """The trtexec command line that builds the same engine as `build_engine`.

  --stronglyTyped takes the precision from the ONNX types (required on TensorRT 10.x for that,
  the default and only mode on 11.x, where the old --fp16 flag is gone).
  """
  def shape(spec):
    return f"{input_name}:{'x'.join(str(size) for size in spec)}"
  smallest, optimal, largest = profile.shapes(height, width)
  arguments = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
               "--stronglyTyped", f"--minShapes={shape(smallest)}",
               f"--optShapes={shape(optimal)}", f"--maxShapes={shape(largest)}",
               f"--memPoolSize=workspace:{workspace_mib}M"]
  return " ".join(shlex.quote(argument) for argument in arguments)


def build_engine(trt: Any, onnx_path: str, engine_path: str, input_name: str, height: int,
                 width: int, profile: BatchProfile, workspace_mib: int) -> int:
  """Builds and serializes a TensorRT engine from an ONNX file with TensorRT's own parser.

  The network is strongly typed (the ONNX graph's types decide each layer's precision; the flag
  is set where this TensorRT has it, and is the only mode on 11.x) and has one optimization
  profile over the batch dimension.

  Args:
    trt: the imported `tensorrt` module.
    onnx_path: the ONNX file.
    engine_path: where to write the serialized engine (via a temporary name).
    input_name: the ONNX input (uint8 [batch, height, width, 3]).
    height, width: the fixed picture size of the graph.
    profile: batch sizes to build for.
    workspace_mib: builder workspace limit.

  Returns:
    The size of the engine file in bytes.

  Raises:
    ExportError: the parser or the builder failed (their messages are included).
  """
  logger = trt.Logger(trt.Logger.WARNING)
  builder = trt.Builder(logger)
  creation_flags = 0
  strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
  if strongly_typed is not None:
    creation_flags |= 1 << int(strongly_typed)
  network = builder.create_network(creation_flags)
  parser = trt.OnnxParser(network, logger)
  if not parser.parse_from_file(onnx_path):
    errors = [str(parser.get_error(index)) for index in range(parser.num_errors)]
    raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}: " + "; ".join(errors))
  inputs = [network.get_input(index).name for index in range(network.num_inputs)]
  if inputs != [input_name]:
    raise ExportError(f"{onnx_path}: TensorRT sees inputs {inputs}, expected [{input_name!r}]")
  config = builder.create_builder_config()
  config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
  optimization_profile = builder.create_optimization_profile()
  optimization_profile.set_shape(input_name, *profile.shapes(height, width))
  config.add_optimization_profile(optimization_profile)
  serialized = builder.build_serialized_network(network, config)
  if serialized is None:
    raise ExportError(f"TensorRT could not build an engine from {onnx_path} (its log above "
                      "says why)")
  data = memoryview(serialized).tobytes()
  fileio.write_bytes_atomic(engine_path, data)
  return len(data)


class CudaDriver:
  """The few CUDA driver calls running an engine needs, through ctypes.

  TensorRT needs device buffers; the driver library is present wherever a GPU is, so no extra
  Python package is needed. Allocations use the device's primary context, the one the CUDA
  runtime (and so TensorRT) uses.
  """

  def __init__(self, library: str = CUDA_DRIVER_LIBRARY, device: int = 0):
    try:
      self._lib = ctypes.CDLL(library)
    except OSError as error:
      raise ExportError(f"cannot load the NVIDIA driver {library}: {error}") from error
    lib = self._lib
    lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
    lib.cuMemFree_v2.argtypes = [ctypes.c_uint64]
    lib.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
    lib.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
    lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
    lib.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
    self._check(lib.cuInit(0), "cuInit")
    handle = ctypes.c_int()
    self._check(lib.cuDeviceGet(ctypes.byref(handle), device), "cuDeviceGet")
    context = ctypes.c_void_p()
    self._check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle),
                "cuDevicePrimaryCtxRetain")
    self._check(lib.cuCtxSetCurrent(context), "cuCtxSetCurrent")

  @staticmethod
  def _check(status: int, call: str) -> None:
    if status != 0:
      raise ExportError(f"CUDA driver call {call} failed (CUresult {status})")

  def allocate(self, nbytes: int) -> int:
    pointer = ctypes.c_uint64()
    self._check(self._lib.cuMemAlloc_v2(ctypes.byref(pointer), max(1, nbytes)), "cuMemAlloc")
    return pointer.value

  def free(self, pointer: int) -> None:
    self._check(self._lib.cuMemFree_v2(pointer), "cuMemFree")

  def to_device(self, pointer: int, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    self._check(self._lib.cuMemcpyHtoD_v2(pointer, array.ctypes.data, array.nbytes),
                "cuMemcpyHtoD")

  def to_host(self, array: np.ndarray, pointer: int) -> None:
    self._check(self._lib.cuMemcpyDtoH_v2(array.ctypes.data, pointer, array.nbytes),
                "cuMemcpyDtoH")

  def synchronize(self) -> None:
    self._check(self._lib.cuCtxSynchronize(), "cuCtxSynchronize")


class EngineRunner:
  """Runs a serialized TensorRT engine on host arrays: copy in, execute, copy out.

  Device buffers are allocated once per input shape and reused, so timings measure inference
  and the copies, not allocation.
  """

  def __init__(self, trt: Any, engine_path: str, cuda: Optional[CudaDriver] = None):
    self._trt = trt
    self._cuda = cuda or CudaDriver()
    self._logger = trt.Logger(trt.Logger.WARNING)
    # Kept alive as long as the engine that came from it.
    self._runtime = trt.Runtime(self._logger)
    with open(engine_path, "rb") as handle:
      self._engine = self._runtime.deserialize_cuda_engine(handle.read())
    if self._engine is None:
      raise ExportError(f"TensorRT could not deserialize {engine_path}")
    self._context = self._engine.create_execution_context()
    self._names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
    inputs = [name for name in self._names
              if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
    if len(inputs) != 1:
      raise ExportError(f"{engine_path}: expected one input, got {inputs}")
    self._input = inputs[0]
    # input shape -> ({name: host array}, {name: device pointer})
    self._buffers: Dict[Tuple[int, ...], Tuple[Dict[str, np.ndarray], Dict[str, int]]] = {}

  def _buffers_for(self, shape: Tuple[int, ...]):
    if shape not in self._buffers:
      engine, context = self._engine, self._context
      if not context.set_input_shape(self._input, shape):
        raise ExportError(f"the engine does not take input shape {shape} (outside its profile?)")
      host, device = {}, {}
      for name in self._names:
        dtype = np.dtype(self._trt.nptype(engine.get_tensor_dtype(name)))
        host[name] = np.empty(tuple(context.get_tensor_shape(name)), dtype)
        device[name] = self._cuda.allocate(host[name].nbytes)
      self._buffers[shape] = (host, device)
    return self._buffers[shape]

  def __call__(self, images: np.ndarray) -> Dict[str, np.ndarray]:
    shape = tuple(int(size) for size in images.shape)
    host, device = self._buffers_for(shape)
    context, cuda = self._context, self._cuda
    context.set_input_shape(self._input, shape)
    for name in self._names:
      context.set_tensor_address(name, device[name])
    cuda.to_device(device[self._input], np.ascontiguousarray(images, host[self._input].dtype))
    # The legacy default stream (0): ordered with the synchronous copies around it.
    if not context.execute_async_v3(0):
      raise ExportError("TensorRT execution failed")
    cuda.synchronize()
    outputs = {}
    for name in self._names:
      if name != self._input:
        cuda.to_host(host[name], device[name])
        outputs[name] = host[name].copy()
    return outputs

  def close(self) -> None:
    """Frees the device buffers."""
    for _, device in self._buffers.values():
      for pointer in device.values():
        self._cuda.free(pointer)
    self._buffers.clear()


# ================================================================================================
# Latency
# ================================================================================================
@dataclasses.dataclass
class LatencyRow:
  """One line of the latency table."""
  name: str
  batch: int
  ms_per_image: float
  runs: int


def measure_latency(function: Callable[[np.ndarray], Any], images: np.ndarray, runs: int,
                    warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> float:
  """Median seconds per image of `function(images)` over `runs` timed calls after `warmup`."""
  for _ in range(warmup):
    function(images)
  times = []
  for _ in range(runs):
    start = clock()
    function(images)
    times.append(clock() - start)
  return statistics.median(times) / len(images)


def format_latency_table(rows: Sequence[LatencyRow]) -> str:
  """A fixed-width table: format, batch, median ms per image, timed runs."""
  header = f"{'format':<34} {'batch':>5} {'ms/image':>10} {'runs':>5}"
  lines = [header, "-" * len(header)]
  for row in rows:
    lines.append(f"{row.name:<34} {row.batch:>5} {row.ms_per_image:>10.2f} {row.runs:>5}")
  return "\n".join(lines)


# ================================================================================================
# The whole export
# ================================================================================================
@dataclasses.dataclass
class Settings:
  """What `export_trt` does (the command-line flags)."""
  out_dir: str
  saved_model: Optional[str] = None
  checkpoint: Optional[str] = None
  prefer: str = "best"
  height: Optional[int] = None
  width: Optional[int] = None
  preprocessing: Optional[str] = None
  overwrite: bool = False
  opset: int = DEFAULT_OPSET
  fp16: bool = True
  fp32_tolerance: float = DEFAULT_FP32_TOLERANCE
  fp16_tolerance: float = DEFAULT_FP16_TOLERANCE
  engine_tolerance: float = DEFAULT_ENGINE_TOLERANCE
  parity_pictures: int = PARITY_PICTURES
  tensorrt: str = "auto"
  engines: Tuple[str, ...] = ("fp16",)
  profile: BatchProfile = BatchProfile(1, 8, 16)
  workspace_mib: int = 4096
  latency_batch: int = 8
  latency_runs: int = 5
  onnxruntime_providers: Tuple[str, ...] = ("CPUExecutionProvider",)


def _validate(settings: Settings) -> None:
  """Checks that need no model, so that mistakes surface before the slow steps."""
  if bool(settings.saved_model) == bool(settings.checkpoint):
    raise ValueError("pass exactly one of --saved_model and --checkpoint")
  for precision in settings.engines:
    if precision not in ENGINE_FILES:
      raise ValueError(f"unknown engine precision {precision!r}; expected fp16 or fp32")
    if precision == "fp16" and not settings.fp16:
      raise ValueError("an fp16 engine needs the fp16 ONNX graph: drop --nofp16 or use "
                       "--engines=fp32")
  if settings.saved_model and not serving.is_saved_model(settings.saved_model):
    raise ExportError(f"{settings.saved_model} is not a SavedModel folder (no saved_model.pb); "
                      "export one with `python -m dunet.export` or pass --checkpoint")


def _saved_model_step(settings: Settings, staging: str, out_dir: str, report: Dict[str, Any],
                      log: Callable[[str], None]) -> str:
  """The SavedModel to convert: the given one, or a fresh verified export; returns its folder."""
  if settings.saved_model:
    report["saved_model"] = os.path.abspath(settings.saved_model)
    return report["saved_model"]
  summary = export_lib.export_saved_model(
      settings.checkpoint, os.path.join(staging, SAVED_MODEL_SUBDIR), prefer=settings.prefer,
      height=settings.height, width=settings.width, preprocessing=settings.preprocessing)
  report["saved_model"] = os.path.join(out_dir, SAVED_MODEL_SUBDIR)
  report["source_checkpoint"] = summary.source
  log(f"SavedModel: {summary.source} -> {report['saved_model']} (reloaded, max |diff| "
      f"{max(summary.parity.values()):.1e})")
  return summary.out_dir


def _onnx_step(settings: Settings, saved_model_dir: str, loaded: serving.LoadedSegmenter,
               pictures: np.ndarray, expected: Dict[str, np.ndarray], staging: str,
               out_dir: str, log: Callable[[str], None]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Converts, checks and compares the ONNX graphs; returns (report entries, sessions)."""
  height, width = loaded.height, loaded.width
  input_spec = tf.TensorSpec([None, height, width, 3], tf.uint8, name=serving.IMAGES)
  entries, sessions = {}, {}
  for precision in ["fp32"] + (["fp16"] if settings.fp16 else []):
    started = time.perf_counter()
    if precision == "fp32":
      proto = saved_model_to_onnx(saved_model_dir, opset=settings.opset)
    else:
      segmenter = float16_segmenter(saved_model_dir, height, width, loaded.preprocessing)
      proto = function_to_onnx(segmenter.serve_model_size, input_spec, opset=settings.opset)
    name_batch_dimension(proto)
    info = check_deployable(proto, height, width, f"ONNX {precision}")
    path = os.path.join(staging, ONNX_FILES[precision])
    save_onnx(proto, path)
    del proto
    sessions[precision] = onnxruntime_session(path, settings.onnxruntime_providers)
    stats = parity_stats(expected, run_onnx(sessions[precision], pictures))
    tolerance = settings.fp32_tolerance if precision == "fp32" else settings.fp16_tolerance
    final_path = os.path.join(out_dir, ONNX_FILES[precision])
    log(f"ONNX {precision}: {final_path} ({os.path.getsize(path) / 2**20:.1f} MiB, converted in "
        f"{time.perf_counter() - started:.0f} s); input {info.input_name} {info.input_type} "
        f"{info.input_shape}; {sum(info.op_counts.values())} nodes; weights {info.weight_types}")
    log(f"  node types: {', '.join(f'{op} {n}' for op, n in info.op_counts.items())}")
    log(format_parity(f"ONNX {precision}", stats, tolerance))
    worst = check_parity(f"ONNX {precision} (onnxruntime)", stats, tolerance)
    entries[precision] = {
        "file": final_path, "input": info.input_name, "input_type": info.input_type,
        "input_shape": info.input_shape, "outputs": info.outputs, "op_counts": info.op_counts,
        "weight_types": info.weight_types, "parity": stats, "max_abs_difference": worst,
        "tolerance": tolerance, "onnxruntime_providers": list(settings.onnxruntime_providers)}
  return entries, sessions


def _tensorrt_step(settings: Settings, trt: Optional[Any], missing: List[str], input_name: str,
                   loaded: serving.LoadedSegmenter, pictures: np.ndarray,
                   expected: Dict[str, np.ndarray], staging: str, out_dir: str,
                   log: Callable[[str], None]) -> Tuple[Dict[str, Any], Dict[str, EngineRunner]]:
  """Builds, runs and compares the engines where TensorRT can; else says what is missing and
  prints the trtexec commands. Returns (report entry, engine runners)."""
  height, width = loaded.height, loaded.width
  commands = {precision: trtexec_command(
      os.path.join(out_dir, ONNX_FILES[precision]),
      os.path.join(out_dir, ENGINE_FILES[precision]), input_name, height, width,
      settings.profile, settings.workspace_mib) for precision in settings.engines}
  entry: Dict[str, Any] = {"engines": {}, "trtexec": commands, "built": False,
                           "profile": dataclasses.asdict(settings.profile), "missing": missing}
  runners: Dict[str, EngineRunner] = {}
  if settings.tensorrt == "skip" or not settings.engines:
    entry["missing"] = ["skipped (--tensorrt=skip or no --engines)"]
    log("TensorRT: skipped. To build on a GPU machine:")
  elif missing:
    log("TensorRT engine not built; missing: " + "; ".join(missing))
    log("Build the same engine on a GPU machine (TensorRT's trtexec, strongly typed):")
  if trt is None or settings.tensorrt == "skip":
    for command in commands.values():
      log(f"  {command}")
    return entry, runners
  entry["version"] = getattr(trt, "__version__", "unknown")
  for precision in settings.engines:
    path = os.path.join(staging, ENGINE_FILES[precision])
    started = time.perf_counter()
    size = build_engine(trt, os.path.join(staging, ONNX_FILES[precision]), path, input_name,
                        height, width, settings.profile, settings.workspace_mib)
    runners[precision] = EngineRunner(trt, path)
    stats = parity_stats(expected, runners[precision](pictures))
    log(f"TensorRT {entry['version']} {precision}: "
        f"{os.path.join(out_dir, ENGINE_FILES[precision])} ({size / 2**20:.1f} MiB, built in "
        f"{time.perf_counter() - started:.0f} s, batch {settings.profile.min_batch}.."
        f"{settings.profile.max_batch})")
    log(format_parity(f"TensorRT {precision}", stats, settings.engine_tolerance))
    worst = check_parity(f"TensorRT {precision}", stats, settings.engine_tolerance)
    entry["engines"][precision] = {
        "file": os.path.join(out_dir, ENGINE_FILES[precision]), "bytes": size, "parity": stats,
        "max_abs_difference": worst, "tolerance": settings.engine_tolerance}
  entry["built"] = True
  return entry, runners


def _latency_step(settings: Settings, candidates: Sequence[Tuple[str, Callable]], height: int,
                  width: int, log: Callable[[str], None]) -> List[LatencyRow]:
  """Times every format at batch 1 and --latency_batch."""
  rows: List[LatencyRow] = []
  if settings.latency_runs <= 0:
    return rows
  for batch in sorted({1, settings.latency_batch}):
    images = export_lib.parity_pictures(batch, height, width, seed=export_lib.PARITY_SEED + 1)
    for name, function in candidates:
      seconds = measure_latency(function, images, settings.latency_runs)
      rows.append(LatencyRow(name, batch, 1000 * seconds, settings.latency_runs))
  log("Latency (median per image; TensorRT includes the host<->device copies):")
  log(format_latency_table(rows))
  return rows


def export_trt(settings: Settings, log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Runs the whole deployment export into settings.out_dir, atomically; returns the report.

  Args:
    settings: what to export and check (the command-line flags).
    log: receives each line of the progress and results.

  Returns:
    The report written to <out_dir>/export_trt.json.

  Raises:
    ExportError, FileExistsError, dunet.checkpoint.CheckpointNotFoundError, ValueError: with a
      message naming what failed; nothing is left at out_dir then.
  """
  _validate(settings)
  out_dir = os.path.abspath(settings.out_dir)
  fileio.check_out_dir(out_dir, settings.overwrite)
  trt, missing = None, []
  if settings.tensorrt != "skip" and settings.engines:
    trt, missing = tensorrt_requirements()
    if missing and settings.tensorrt == "require":
      raise ExportError("--tensorrt=require, but TensorRT cannot build here; missing: "
                        + "; ".join(missing))
  report: Dict[str, Any] = {"tensorflow_version": tf.__version__, "opset": settings.opset}
  with fileio.staged_directory(out_dir, settings.overwrite, purpose="export_trt") as staging:
    saved_model_dir = _saved_model_step(settings, staging, out_dir, report, log)
    loaded = serving.load_segmenter(saved_model_dir, height=settings.height, width=settings.width,
                                    preprocessing=settings.preprocessing)
    signatures = loaded.module.signatures
    if serving.MODEL_SIZE_SIGNATURE not in signatures:
      raise ExportError(f"{saved_model_dir} has no {serving.MODEL_SIZE_SIGNATURE!r} signature "
                        "(an older export): export it again with python -m dunet.export")
    height, width = loaded.height, loaded.width
    report.update(height=height, width=width, preprocessing=loaded.preprocessing)
    supported, reason = tftrt_status()
    report["tf_trt"] = {"supported": supported, "reason": reason}
    log(f"Model: {height}x{width}, preprocessing {loaded.preprocessing}. TF-TRT "
        f"{'available' if supported else 'not available'} ({reason}): exporting through ONNX")

    # The reference: the serving signature, as evaluate and predict call it.
    serving_default = signatures[serving.SERVING_SIGNATURE]

    def run_tf(images: np.ndarray) -> Dict[str, np.ndarray]:
      outputs = serving_default(**{serving.IMAGES: tf.constant(images)})
      return {name: value.numpy() for name, value in outputs.items()}

    pictures = export_lib.parity_pictures(settings.parity_pictures, height, width)
    expected = run_tf(pictures)
    report["onnx"], sessions = _onnx_step(settings, saved_model_dir, loaded, pictures, expected,
                                          staging, out_dir, log)
    report["tensorrt"], runners = _tensorrt_step(
        settings, trt, missing, report["onnx"]["fp32"]["input"], loaded, pictures, expected,
        staging, out_dir, log)

    provider = settings.onnxruntime_providers[0].replace("ExecutionProvider", "")
    candidates: List[Tuple[str, Callable]] = [("TF SavedModel (serving_default)", run_tf)]
    candidates += [(f"ONNX {precision} (onnxruntime {provider})",
                    lambda images, session=session: run_onnx(session, images))
                   for precision, session in sessions.items()]
    candidates += [(f"TensorRT {precision}", runner) for precision, runner in runners.items()]
    try:
      rows = _latency_step(settings, candidates, height, width, log)
    finally:
      for runner in runners.values():
        runner.close()
    report["latency"] = [dataclasses.asdict(row) for row in rows]
    with open(os.path.join(staging, REPORT_FILENAME), "w") as handle:
      json.dump(report, handle, indent=2, sort_keys=True)
  log(f"Wrote {out_dir} ({REPORT_FILENAME} has every number above)")
  return report


# ================================================================================================
# Command line
# ================================================================================================
FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags; only when run as a program, so that importing this module
  (tests, other tools) defines none."""
  flags.DEFINE_string("saved_model", None, "A SavedModel written by `python -m dunet.export` "
                      "(one of --saved_model and --checkpoint is required).")
  flags.DEFINE_string("checkpoint", None, "Export from a training workdir, a converted Keras "
                      "workdir or a checkpoint prefix instead: the verified SavedModel is written "
                      "to <out_dir>/saved_model first.")
  flags.DEFINE_string("out_dir", None, "The folder to create (required); it must not exist (or "
                      "be empty) unless --overwrite.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out_dir (only once everything new "
                    "passed its checks).")
  flags.DEFINE_enum("prefer", "best", ["best", "latest"], "With --checkpoint: the best or the "
                    "latest checkpoint of a workdir.")
  flags.DEFINE_integer("height", None, "With --checkpoint: model input height when the run's "
                       "config.json records none (a multiple of 16).")
  flags.DEFINE_integer("width", None, "With --checkpoint: model input width, as --height.")
  flags.DEFINE_enum("preprocessing", None, ["reference", "unit", "caffe"], "With --checkpoint: "
                    "override the run's preprocessing.")
  flags.DEFINE_integer("opset", DEFAULT_OPSET, "ONNX opset for tf2onnx.", lower_bound=13)
  flags.DEFINE_bool("fp16", True, "Also write the float16 ONNX graph (float16 arithmetic, uint8 "
                    "in, float32 out).")
  flags.DEFINE_float("fp32_tolerance", DEFAULT_FP32_TOLERANCE, "Largest allowed difference of a "
                     "probability between onnxruntime (fp32 graph) and TensorFlow.",
                     lower_bound=0)
  flags.DEFINE_float("fp16_tolerance", DEFAULT_FP16_TOLERANCE, "Largest allowed difference of a "
                     "probability between onnxruntime (fp16 graph) and TensorFlow (float32).",
                     lower_bound=0)
  flags.DEFINE_float("engine_tolerance", DEFAULT_ENGINE_TOLERANCE, "Largest allowed difference "
                     "of a probability between a TensorRT engine and TensorFlow (float32).",
                     lower_bound=0)
  flags.DEFINE_integer("parity_pictures", PARITY_PICTURES, "Deterministic pictures (one batch) "
                       "the ONNX graphs and engines are compared with TensorFlow on.",
                       lower_bound=1)
  flags.DEFINE_enum("tensorrt", "auto", ["auto", "require", "skip"], "auto: build engines where "
                    "the tensorrt package and a CUDA GPU are present, else say what is missing "
                    "and print the trtexec command; require: fail (before any conversion) when "
                    "they are missing; skip: never build (the trtexec command is still printed).")
  flags.DEFINE_list("engines", ["fp16"], "TensorRT engines to build, from the ONNX graph of each "
                    "listed precision (fp16, fp32).")
  flags.DEFINE_integer("min_batch", 1, "Smallest batch of the engine's optimization profile.",
                       lower_bound=1)
  flags.DEFINE_integer("opt_batch", 8, "Batch TensorRT tunes its kernels for.", lower_bound=1)
  flags.DEFINE_integer("max_batch", 16, "Largest batch the engine accepts.", lower_bound=1)
  flags.DEFINE_integer("workspace_mib", 4096, "TensorRT builder workspace limit in MiB.",
                       lower_bound=1)
  flags.DEFINE_integer("latency_batch", 8, "The larger batch of the latency table (besides 1).",
                       lower_bound=1)
  flags.DEFINE_integer("latency_runs", 5, "Timed runs per format and batch (after one warm-up); "
                       "0 skips the latency table.", lower_bound=0)
  flags.DEFINE_list("onnxruntime_providers", ["CPUExecutionProvider"], "onnxruntime execution "
                    "providers for the parity checks and the latency table, in order of "
                    "preference.")


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.out_dir:
    raise app.UsageError("--out_dir is required")
  if bool(FLAGS.saved_model) == bool(FLAGS.checkpoint):
    raise app.UsageError("pass exactly one of --saved_model and --checkpoint")
  try:
    settings = Settings(
        out_dir=FLAGS.out_dir, saved_model=FLAGS.saved_model, checkpoint=FLAGS.checkpoint,
        prefer=FLAGS.prefer, height=FLAGS.height, width=FLAGS.width,
        preprocessing=FLAGS.preprocessing, overwrite=FLAGS.overwrite, opset=FLAGS.opset,
        fp16=FLAGS.fp16, fp32_tolerance=FLAGS.fp32_tolerance,
        fp16_tolerance=FLAGS.fp16_tolerance, engine_tolerance=FLAGS.engine_tolerance,
        parity_pictures=FLAGS.parity_pictures, tensorrt=FLAGS.tensorrt,
        engines=tuple(FLAGS.engines),
        profile=BatchProfile(FLAGS.min_batch, FLAGS.opt_batch, FLAGS.max_batch),
        workspace_mib=FLAGS.workspace_mib, latency_batch=FLAGS.latency_batch,
        latency_runs=FLAGS.latency_runs,
        onnxruntime_providers=tuple(FLAGS.onnxruntime_providers))
    export_trt(settings)
  except (ExportError, export_lib.ExportError, checkpoint_lib.CheckpointNotFoundError,
          FileExistsError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
