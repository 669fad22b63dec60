"""SavedModel -> ONNX: conversion with tf2onnx, the checks a deployable graph must pass, and
onnxruntime sessions to compare it with TensorFlow.

tf2onnx, onnx and onnxruntime are imported only when used (the `export` extra), with their
import-time deprecation warnings filtered: they are about those packages' own code, and a user
can do nothing about them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import logging as std_logging
import os
from typing import Any, Callable, Dict, List, Sequence
import warnings

import numpy as np
import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet import fileio
from dunet import serving
from dunet.errors import ExportError
from dunet.models import DoubleUNet

DEFAULT_OPSET = 17
# Node types that mean control flow or data-dependent shapes: TensorRT takes them badly or not at
# all, and none belongs in the model-size graph.
FORBIDDEN_OPS = frozenset({"If", "Loop", "Scan", "Unique", "Compress", "NonZero"})
# The packages whose imports warn about their own deprecated dependencies (numpy, protobuf, TF
# internals), and the warning kinds filtered while they are imported.
_QUIET_IMPORT_CATEGORIES = (DeprecationWarning, FutureWarning, PendingDeprecationWarning)


def _import_quietly(name: str) -> Any:
  """Imports `name` with the known import-time deprecation warnings of the ONNX packages
  filtered (only while importing: later warnings, and everybody else's, still show).

  Raises:
    ExportError: the package is not installed (the message names the extra to install).
  """
  with warnings.catch_warnings():
    for category in _QUIET_IMPORT_CATEGORIES:
      warnings.simplefilter("ignore", category)
    try:
      return importlib.import_module(name)
    except ImportError as error:
      raise ExportError(
        f"{name} is not installed ({error}): install the export extra, `pip install -e .[export]`"
      ) from error


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


def saved_model_to_onnx(
  saved_model_dir: str, signature: str = serving.MODEL_SIZE_SIGNATURE, opset: int = DEFAULT_OPSET
):
  """Converts one signature of a SavedModel with tf2onnx (what `python -m tf2onnx.convert
  --saved-model DIR --signature_def KEY` does), keeping the signature's input/output names.

  Returns:
    An onnx.ModelProto.

  Raises:
    ExportError: tf2onnx could not convert a node (its optimizer errors are raised, not skipped).
  """
  tf2onnx = _import_quietly("tf2onnx")
  tf_loader = _import_quietly("tf2onnx.tf_loader")
  with _strict_tf2onnx():
    graph_def, inputs, outputs, renames = tf_loader.from_saved_model(
      saved_model_dir,
      None,
      None,
      tag="serve",
      signatures=[signature],
      return_tensors_to_rename=True,
    )
    proto, _ = tf2onnx.convert.from_graph_def(
      graph_def,
      name=f"dunet {signature}",
      input_names=inputs,
      output_names=outputs,
      opset=opset,
      tensors_to_rename=renames,
    )
  return proto


def function_to_onnx(function: Callable, input_spec: tf.TensorSpec, opset: int = DEFAULT_OPSET):
  """Converts a tf.function with one input with tf2onnx.

  Returns:
    An onnx.ModelProto.

  Raises:
    ExportError: tf2onnx could not convert a node (its optimizer errors are raised, not skipped).
  """
  tf2onnx = _import_quietly("tf2onnx")
  with _strict_tf2onnx():
    proto, _ = tf2onnx.convert.from_function(function, input_signature=[input_spec], opset=opset)
  return proto


def float16_segmenter(
  saved_model_dir: str, height: int, width: int, preprocessing: str
) -> serving.Segmenter:
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


_ONNX_TYPE_NAMES = {
  1: "float32",
  2: "uint8",
  6: "int32",
  7: "int64",
  9: "bool",
  10: "float16",
  11: "float64",
  16: "bfloat16",
}


def describe_onnx(proto) -> OnnxInfo:
  """Inputs, outputs, node-type histogram and weight types of an ONNX model."""

  def type_name(value_info) -> str:
    code = value_info.type.tensor_type.elem_type
    return _ONNX_TYPE_NAMES.get(code, str(code))

  def shape(value_info) -> List[Any]:
    return [
      dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
      for dim in value_info.type.tensor_type.shape.dim
    ]

  graph = proto.graph
  if len(graph.input) != 1:
    raise ExportError(f"expected one ONNX input, got {[i.name for i in graph.input]}")
  ops = collections.Counter(node.op_type for node in graph.node)
  weights = collections.Counter(
    _ONNX_TYPE_NAMES.get(init.data_type, str(init.data_type)) for init in graph.initializer
  )
  return OnnxInfo(
    input_name=graph.input[0].name,
    input_type=type_name(graph.input[0]),
    input_shape=shape(graph.input[0]),
    outputs={output.name: type_name(output) for output in graph.output},
    op_counts=dict(sorted(ops.items())),
    weight_types=dict(sorted(weights.items())),
  )


def check_deployable(proto, height: int, width: int, label: str) -> OnnxInfo:
  """Checks an ONNX model is what TensorRT and callers expect; raises ExportError otherwise.

  The ONNX checker (full check, with shape inference) must pass; every node must be a standard
  ONNX operator; none may be control flow or data-dependent (FORBIDDEN_OPS); the input must be
  uint8 [batch, height, width, 3] with only the batch dynamic, and both probabilities float32.
  """
  onnx = _import_quietly("onnx")
  try:
    onnx.checker.check_model(proto, full_check=True)
  except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
    raise ExportError(f"{label}: the ONNX checker rejects the graph: {error}") from error
  foreign = sorted(
    {
      f"{node.domain}:{node.op_type}"
      for node in proto.graph.node
      if node.domain not in ("", "ai.onnx")
    }
  )
  if foreign:
    raise ExportError(
      f"{label}: non-standard ONNX nodes (TensorFlow ops tf2onnx could not convert?): {foreign}"
    )
  info = describe_onnx(proto)
  bad = sorted(FORBIDDEN_OPS & set(info.op_counts))
  if bad:
    raise ExportError(
      f"{label}: the graph contains {bad} (control flow or data-dependent "
      "shapes); export the SavedModel's model_size signature"
    )
  if (
    info.input_type != "uint8"
    or len(info.input_shape) != 4
    or info.input_shape[1:] != [height, width, 3]
    or isinstance(info.input_shape[0], int)
  ):
    raise ExportError(
      f"{label}: input {info.input_name!r} is {info.input_type} "
      f"{info.input_shape}, expected uint8 [batch, {height}, {width}, 3]"
    )
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
  ort = _import_quietly("onnxruntime")
  missing = [p for p in providers if p not in ort.get_available_providers()]
  if missing:
    raise ExportError(
      f"onnxruntime {ort.__version__} lacks {missing}; available: {ort.get_available_providers()}"
    )
  return ort.InferenceSession(path, providers=list(providers))


def run_onnx(session, images: np.ndarray) -> Dict[str, np.ndarray]:
  """Runs an onnxruntime session on uint8 images; returns {output name: array}."""
  names = [output.name for output in session.get_outputs()]
  values = session.run(names, {session.get_inputs()[0].name: images})
  return dict(zip(names, values))
