"""SavedModel -> ONNX: conversion with tf2onnx, the checks a deployable graph must pass, and
onnxruntime sessions to compare it with TensorFlow.

tf2onnx, onnx and onnxruntime are imported only when used (the `export` extra), with their
import-time deprecation warnings filtered: they are about those packages' own code, and a user
can do nothing about them.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import functools
import gc
import importlib
import logging as std_logging
import os
from typing import Any, Callable, Dict, List, Sequence
import warnings

import numpy as np
import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet import fileio
from dunet import folding
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
    ExportError: tf2onnx is missing, the signature is missing, or tf2onnx could not convert a node
      (its optimizer errors are raised, not skipped).
  """
  _import_quietly("tf2onnx")  # before the slow load, so a missing package is said first
  loaded = tf.saved_model.load(saved_model_dir)  # kept alive: it owns the variables
  if signature not in loaded.signatures:
    raise ExportError(f"{saved_model_dir} has no {signature!r} signature")
  return concrete_function_to_onnx(loaded.signatures[signature], opset, name=f"dunet {signature}")


def function_to_onnx(function: Callable, input_spec: tf.TensorSpec, opset: int = DEFAULT_OPSET):
  """Converts a tf.function with one input with tf2onnx.

  Returns:
    An onnx.ModelProto.

  Raises:
    ExportError: tf2onnx could not convert a node (its optimizer errors are raised, not skipped).
  """
  _import_quietly("tf2onnx")
  concrete = function.get_concrete_function(input_spec)
  return concrete_function_to_onnx(concrete, opset, name=concrete.name)


def release_memory() -> None:
  """Frees what the previous step dropped, so that the next step's peak does not stack on it.

  tf2onnx's graphs are reference cycles (nodes and graph point at each other) that only the
  cycle collector frees, and they hold ~100 MB of weights per copy: without `gc.collect()` several
  copies stayed alive into the next conversion. glibc keeps freed heap pages (from TensorFlow's
  freezing and Grappler, ~1.9 GB at 128x128) in the process unless asked: `malloc_trim(0)` hands
  them back, where the C library has it.
  """
  gc.collect()
  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (AttributeError, OSError):  # not glibc (macOS): nothing to trim
    pass


def _output_renames(function, input_names: List[str], output_names: List[str]) -> Dict[str, str]:
  """Graph tensor name -> name in the ONNX graph: the input's TensorSpec name and the output
  dict's keys (a concrete function's flat outputs follow `tf.nest.flatten` of its structured
  outputs, which orders a dict by key; for a loaded signature those are TensorSpecs, not the
  graph's tensors, so their names cannot be matched)."""
  specs = [
    spec
    for spec in tf.nest.flatten(function.structured_input_signature)
    if isinstance(spec, tf.TensorSpec)
  ]
  renames = {name: spec.name for name, spec in zip(input_names, specs) if spec.name}
  structured = function.structured_outputs
  if isinstance(structured, dict):
    keys = sorted(structured)
    if len(keys) != len(output_names):
      raise ExportError(f"outputs {output_names} do not match the structured outputs {keys}")
    renames.update(zip(output_names, keys))
  return renames


def _compact_node_protos(graph) -> None:
  """Rebuilds each tf2onnx node's NodeProto (and its attribute protos) as a fresh message.

  tf2onnx (1.17) ends every optimizer pass with `Node.update_proto`, which clears the node's
  attributes and adds them again. Under the upb protobuf runtime a message's memory is an arena
  freed only with the whole message, so each pass left one more copy of every constant in its
  node: 36 passes on the 29 M-weight model held 3.9 GB (measured at 128x128, profiling/results/
  export_trt.md). A fresh copy holds one. The graph is the same: the copies are equal messages.

  This reads tf2onnx's private `_op` and `_attr`; where a tf2onnx lays its nodes out otherwise,
  nothing is compacted (the conversion is the same, in more memory).
  """
  onnx = _import_quietly("onnx")
  for node in graph.get_nodes():
    old_proto, old_attributes = getattr(node, "_op", None), getattr(node, "_attr", None)
    if not isinstance(old_proto, onnx.NodeProto) or not isinstance(old_attributes, dict):
      return
    proto = onnx.NodeProto()
    proto.CopyFrom(old_proto)
    written = {attribute.name: attribute for attribute in proto.attribute}
    attributes = {}
    for key, value in old_attributes.items():
      if key in written and written[key] == value:
        attributes[key] = written[key]  # shared with the node proto, as tf2onnx makes them
      elif isinstance(value, onnx.AttributeProto):
        attributes[key] = onnx.AttributeProto()
        attributes[key].CopyFrom(value)
      else:
        attributes[key] = value
    node._op, node._attr = proto, attributes  # private: see the docstring


class _CompactingPass:
  """A tf2onnx optimizer pass followed by `_compact_node_protos` (the factory interface
  `tf2onnx.optimizer.optimize_graph` calls: `optimize(graph, iteration)`, `graph_been_opt`)."""

  def __init__(self, factory: Callable):
    self._optimizer = factory()

  @property
  def graph_been_opt(self) -> bool:
    return self._optimizer.graph_been_opt

  def optimize(self, graph, iteration: int):
    graph = self._optimizer.optimize(graph, iteration)
    _compact_node_protos(graph)
    return graph


def _frozen_graph_def(function, input_names: List[str], output_names: List[str], tf_loader):
  """The function's graph with its variables as constants, after Grappler: the steps of
  `tf2onnx.tf_loader.from_function`, with memory released between them.

  Freezing left ~0.5 GB of freed heap behind that Grappler's ~1.6 GB (at 128x128) would have
  stacked on; and the frozen graph is not imported into a TensorFlow graph first (tf2onnx does
  that only to drop resource inputs, which `input_names` already excludes).
  """
  from tensorflow.python.framework import convert_to_constants  # pylint: disable=g-direct-tensorflow-import

  try:
    frozen = convert_to_constants.convert_variables_to_constants_v2(
      function, lower_control_flow=False, aggressive_inlining=True
    )
  except ValueError:  # tf2onnx repairs some freezing failures: let it, in its own way
    return tf_loader.from_function(function, input_names, output_names)
  graph_def = frozen.graph.as_graph_def(add_shapes=True)
  del frozen
  release_memory()
  graph_def = tf_loader.fix_freezing_errors_part2(graph_def)
  with tf.Graph().as_default():  # an empty graph: no collections of another graph exported
    return tf_loader.tf_optimize(input_names, output_names, graph_def)


def concrete_function_to_onnx(function, opset: int = DEFAULT_OPSET, name: str = "dunet"):
  """Converts a concrete function (one picture input, a dict of outputs) with tf2onnx.

  The steps of `tf2onnx.convert.from_function` (freeze the variables, Grappler, TF -> ONNX ops,
  tf2onnx's optimizers, the model proto), with the graph names of the function's signature and
  memory released between the steps: each step's objects are dropped before the next, and every
  optimizer pass is followed by `_compact_node_protos`. At 128x128 this conversion peaks ~2.2 GB
  above the process's ~0.8 GB; tf2onnx's own route from the SavedModel reached 6-7 GB.

  Args:
    function: a tf ConcreteFunction, e.g. a loaded SavedModel's signature.
    opset: the ONNX opset.
    name: recorded in the model's doc string.

  Returns:
    An onnx.ModelProto.

  Raises:
    ExportError: tf2onnx is not installed or could not convert a node (its optimizer errors are
      raised, not skipped).
  """
  _import_quietly("tf2onnx")
  tf_loader = _import_quietly("tf2onnx.tf_loader")
  tfonnx = _import_quietly("tf2onnx.tfonnx")
  optimizer = _import_quietly("tf2onnx.optimizer")
  input_names = [tensor.name for tensor in function.inputs if tensor.dtype != tf.resource]
  output_names = [tensor.name for tensor in function.outputs if tensor.dtype != tf.resource]
  renames = _output_renames(function, input_names, output_names)
  # tf2onnx's default passes, each wrapped (its public optimize_graph takes the factories).
  passes = {
    key: functools.partial(_CompactingPass, factory)
    for key, factory in optimizer._get_optimizers().items()
  }
  with _strict_tf2onnx(), tf.device("/cpu:0"):
    graph_def = _frozen_graph_def(function, input_names, output_names, tf_loader)
    release_memory()
    with tf.Graph().as_default() as tf_graph:
      tf.import_graph_def(graph_def, name="")
      del graph_def
      graph = tfonnx.process_tf_graph(
        tf_graph,
        continue_on_error=True,  # as tf2onnx.convert: check_deployable names foreign nodes
        opset=opset,
        input_names=input_names,
        output_names=output_names,
        tensors_to_rename=renames,
      )
    del tf_graph
    release_memory()
    graph = optimizer.optimize_graph(graph, catch_errors=False, optimizers=passes)
    proto = graph.make_model(f"converted from {name}")
    del graph
  release_memory()
  return proto


def float16_segmenter(
  saved_model_dir: str, height: int, width: int, preprocessing: str
) -> serving.Segmenter:
  """A Segmenter computing in float16 with the weights of a dunet SavedModel.

  The SavedModel's variables are a checkpoint whose root is the exported Segmenter, so its
  `model` child restores into a DoubleUNet built with compute_dtype=float16 (variables stay
  float32; every one must match). That model has its BatchNorms folded (dunet/folding.py), so
  it restores into a folded float16 DoubleUNet; a SavedModel exported before dunet folded them
  restores into an unfolded one, which the Segmenter then folds.
  """
  variables = os.path.join(saved_model_dir, "variables", "variables")
  model = DoubleUNet(compute_dtype=tf.float16)
  folded = folding.fold_batch_norms(model)
  try:
    checkpoint_lib.restore_model(folded, variables)
  except ValueError:  # unfolded weights: an older export
    checkpoint_lib.restore_model(model, variables)
    folded = model
  return serving.Segmenter(folded, height, width, preprocessing)


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
