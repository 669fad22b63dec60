"""TensorRT: whether it can build here, the engine builder (TensorRT's ONNX parser, strongly
typed, one batch profile), the equivalent trtexec command, and a runner for built engines.

Nothing beyond the `tensorrt` wheel is needed: device buffers come from the NVIDIA driver library
through ctypes (`CudaDriver`). TF-TRT is not used: current TensorFlow wheels are built without it
(`tftrt_status` says what this one reports).
"""

from __future__ import annotations

import ctypes
import dataclasses
import shlex
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from dunet import fileio
from dunet.errors import ConfigError
from dunet.errors import ExportError

# The NVIDIA driver library: present wherever a CUDA GPU is usable, whatever else is installed.
CUDA_DRIVER_LIBRARY = "libcuda.so.1"


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
    missing.append(
      f"the `tensorrt` Python package ({error}); install the wheel matching the "
      "GPU machine's CUDA, e.g. `pip install tensorrt`"
    )
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
      raise ConfigError(
        f"need 1 <= min_batch <= opt_batch <= max_batch, got {self.min_batch}, "
        f"{self.opt_batch}, {self.max_batch}"
      )

  def shapes(self, height: int, width: int) -> Tuple[Tuple[int, ...], ...]:
    """(min, opt, max) input shapes [batch, height, width, 3]."""
    return tuple(
      (batch, height, width, 3) for batch in (self.min_batch, self.opt_batch, self.max_batch)
    )


def trtexec_command(
  onnx_path: str,
  engine_path: str,
  input_name: str,
  height: int,
  width: int,
  profile: BatchProfile,
  workspace_mib: int,
) -> str:
  """The trtexec command line that builds the same engine as `build_engine`.

  --stronglyTyped takes the precision from the ONNX types (required on TensorRT 10.x for that,
  the default and only mode on 11.x, where the old --fp16 flag is gone).
  """

  def shape(spec):
    return f"{input_name}:{'x'.join(str(size) for size in spec)}"

  smallest, optimal, largest = profile.shapes(height, width)
  arguments = [
    "trtexec",
    f"--onnx={onnx_path}",
    f"--saveEngine={engine_path}",
    "--stronglyTyped",
    f"--minShapes={shape(smallest)}",
    f"--optShapes={shape(optimal)}",
    f"--maxShapes={shape(largest)}",
    f"--memPoolSize=workspace:{workspace_mib}M",
  ]
  return " ".join(shlex.quote(argument) for argument in arguments)


def build_engine(
  trt: Any,
  onnx_path: str,
  engine_path: str,
  input_name: str,
  height: int,
  width: int,
  profile: BatchProfile,
  workspace_mib: int,
) -> int:
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
    raise ExportError(
      f"TensorRT could not build an engine from {onnx_path} (its log above says why)"
    )
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
    self._check(
      lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle), "cuDevicePrimaryCtxRetain"
    )
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
    self._check(self._lib.cuMemcpyHtoD_v2(pointer, array.ctypes.data, array.nbytes), "cuMemcpyHtoD")

  def to_host(self, array: np.ndarray, pointer: int) -> None:
    self._check(self._lib.cuMemcpyDtoH_v2(array.ctypes.data, pointer, array.nbytes), "cuMemcpyDtoH")

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
    inputs = [
      name for name in self._names if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
    ]
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
