"""dunet/deploy/onnx.py without converting a model: the deployability checks on tiny graphs, the
batch dimension's name, and the float16 model restored from a SavedModel's weights. (The
conversions themselves run in tests/deploy/test_pipeline.py.)"""

import sys

import numpy as np
from onnx import helper
from onnx import TensorProto
import pytest
import tensorflow as tf

from dunet import serving
from dunet.deploy import onnx as onnx_lib
from dunet.errors import ExportError
from dunet.models import DoubleUNet


def _tiny_onnx(op="Relu", input_type=TensorProto.UINT8, shape=("batch", 4, 4, 3)):
  nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT)]
  if op == "If":
    branch = helper.make_graph(
      [helper.make_node("Identity", ["x"], ["y_branch"])],
      "branch",
      [],
      [helper.make_tensor_value_info("y_branch", TensorProto.FLOAT, list(shape))],
    )
    nodes += [
      helper.make_node(
        "Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])
      ),
      helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
    ]
  else:
    nodes.append(helper.make_node(op, ["x"], ["y"]))
  nodes += [
    helper.make_node("Sigmoid", ["y"], ["probability"]),
    helper.make_node("Sigmoid", ["y"], ["probability_head1"]),
  ]
  graph = helper.make_graph(
    nodes,
    "tiny",
    [helper.make_tensor_value_info("images", input_type, list(shape))],
    [
      helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
      for name in ("probability", "probability_head1")
    ],
  )
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_check_deployable_accepts_a_plain_graph_and_names_problems():
  info = onnx_lib.check_deployable(_tiny_onnx(), 4, 4, "tiny")
  assert info.op_counts == {"Cast": 1, "Relu": 1, "Sigmoid": 2}
  with pytest.raises(ExportError, match=r"tiny: the graph contains \['If'\]"):
    onnx_lib.check_deployable(_tiny_onnx(op="If"), 4, 4, "tiny")
  with pytest.raises(ExportError, match="expected uint8 \\[batch, 4, 4, 3\\]"):
    onnx_lib.check_deployable(_tiny_onnx(input_type=TensorProto.FLOAT), 4, 4, "tiny")
  with pytest.raises(ExportError, match="expected uint8"):
    onnx_lib.check_deployable(_tiny_onnx(shape=("batch", "h", "w", 3)), 4, 4, "tiny")


def test_check_deployable_reports_the_onnx_checker():
  proto = _tiny_onnx()
  proto.graph.node[1].op_type = "NoSuchOp"
  with pytest.raises(ExportError, match="tiny: the ONNX checker rejects the graph"):
    onnx_lib.check_deployable(proto, 4, 4, "tiny")


def test_batch_dimension_gets_a_name():
  proto = _tiny_onnx(shape=("unk__7", 4, 4, 3))
  onnx_lib.name_batch_dimension(proto)
  assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_float16_segmenter_restores_the_saved_weights(tmp_path):
  model = DoubleUNet()
  model.head2.bias.assign(np.full([1], 0.25, np.float32))
  segmenter = serving.Segmenter(model, 32, 32, "unit")
  tf.saved_model.save(segmenter, str(tmp_path / "sm"), signatures=segmenter.signatures())
  half = onnx_lib.float16_segmenter(str(tmp_path / "sm"), 32, 32, "unit")
  assert half.model.compute_dtype == tf.float16
  for restored, original in zip(half.model.variables, model.variables):
    np.testing.assert_array_equal(restored.numpy(), original.numpy())
  assert restored.dtype == tf.float32


def test_a_missing_onnx_package_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "tf2onnx", None)  # `import tf2onnx` raises ImportError
  with pytest.raises(ExportError, match=r"tf2onnx is not installed .*pip install -e \.\[export\]"):
    onnx_lib.saved_model_to_onnx("unused")
