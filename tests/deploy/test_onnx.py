"""dunet/deploy/onnx.py without converting the model: the deployability checks on tiny graphs, the
batch dimension's name, the float16 model restored from a SavedModel's weights, the memory-lean
conversion of a tiny function against tf2onnx's own, and the node compaction between tf2onnx's
optimizer passes. (The model's conversions run in tests/deploy/test_pipeline.py.)"""

import os
import sys

import numpy as np
from onnx import helper
from onnx import numpy_helper
from onnx import TensorProto
import onnxruntime as ort
import pytest
import tensorflow as tf
import tf2onnx
from tf2onnx.graph import GraphUtil

from dunet import folding
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
  # The SavedModel holds the folded model (no BatchNorm): the float16 one is folded the same way.
  assert half.model.folded_batch_norms == 36 and not folding.remaining_batch_norms(half.model)
  assert len(half.model.variables) == len(segmenter.model.variables)
  for restored, original in zip(half.model.variables, segmenter.model.variables):
    np.testing.assert_array_equal(restored.numpy(), original.numpy())
  assert restored.dtype == tf.float32


def test_float16_segmenter_reads_an_export_made_before_folding(tmp_path):
  """A SavedModel's variables are a checkpoint of the Segmenter; older exports hold the
  unfolded model (with its BatchNorms) under `model`."""
  model = DoubleUNet()
  model.head2.bias.assign(np.full([1], 0.25, np.float32))
  tf.train.Checkpoint(model=model).write(str(tmp_path / "old" / "variables" / "variables"))
  half = onnx_lib.float16_segmenter(str(tmp_path / "old"), 32, 32, "unit")
  assert half.model.compute_dtype == tf.float16 and half.model.folded_batch_norms == 36
  assert float(half.model.head2.bias.numpy()[0]) == 0.25


def test_a_missing_onnx_package_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "tf2onnx", None)  # `import tf2onnx` raises ImportError
  with pytest.raises(ExportError, match=r"tf2onnx is not installed .*pip install -e \.\[export\]"):
    onnx_lib.saved_model_to_onnx("unused")


def _run(proto, images):
  session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
  names = [output.name for output in session.get_outputs()]
  return dict(zip(names, session.run(names, {"images": images})))


def test_conversion_matches_tf2onnx_from_function():
  # A variable (frozen into a constant, as the model's weights) and a dict of two outputs.
  kernel = tf.Variable(np.random.RandomState(0).normal(size=(3, 3, 3, 4)).astype(np.float32))

  @tf.function
  def segment(images):
    logits = tf.nn.conv2d(tf.cast(images, tf.float32) / 255.0, kernel, 1, "SAME")
    return {"probability": tf.sigmoid(logits[..., :1]), "probability_head1": tf.sigmoid(logits)}

  spec = tf.TensorSpec([None, 8, 8, 3], tf.uint8, name="images")
  ours = onnx_lib.function_to_onnx(segment, spec)
  theirs, _ = tf2onnx.convert.from_function(segment, input_signature=[spec], opset=17)
  ours_info, theirs_info = onnx_lib.describe_onnx(ours), onnx_lib.describe_onnx(theirs)
  assert (ours_info.input_name, ours_info.outputs) == (
    "images",
    dict.fromkeys(serving.OUTPUT_NAMES, "float32"),
  )
  assert ours_info.op_counts == theirs_info.op_counts and "Conv" in ours_info.op_counts
  assert ours_info.weight_types == theirs_info.weight_types
  images = np.random.RandomState(1).randint(0, 256, (2, 8, 8, 3)).astype(np.uint8)
  expected = {name: value.numpy() for name, value in segment(images).items()}
  got, reference = _run(ours, images), _run(theirs, images)
  for name in serving.OUTPUT_NAMES:
    np.testing.assert_array_equal(got[name], reference[name])
    np.testing.assert_allclose(got[name], expected[name], atol=1e-6)


def _rss_mb():
  with open("/proc/self/statm") as handle:
    return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _graph_with_weights(count):
  """A tf2onnx graph holding one float32 constant of `count` values (count * 4 bytes)."""
  weights = numpy_helper.from_array(np.arange(count, dtype=np.float32), "w")
  graph = helper.make_graph(
    [
      helper.make_node("Constant", [], ["w"], value=weights),
      helper.make_node("Add", ["x", "w"], ["y"]),
    ],
    "weights",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [count])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [count])],
  )
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  return GraphUtil.create_graph_from_onnx_model(model)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_compaction_keeps_the_graph_and_one_copy_of_the_weights():
  # Each tf2onnx optimizer pass ends with update_proto; under upb protobuf every call left one
  # more copy of the 8 MiB constant in its node (measured: 10 passes kept +80 MiB resident once
  # freed memory was handed back; compacted after each pass, +0).
  passes, megabytes = 10, 8

  def resident_growth(compact):
    graph = _graph_with_weights(megabytes * 2**18)
    onnx_lib.release_memory()  # freed pages handed back, so that what is held shows in RSS
    before = _rss_mb()
    for _ in range(passes):
      graph.update_proto()
      if compact:
        onnx_lib._compact_node_protos(graph)
    onnx_lib.release_memory()
    return _rss_mb() - before, graph

  kept, _ = resident_growth(compact=False)
  compacted, graph = resident_growth(compact=True)
  assert kept > (passes - 2) * megabytes, (kept, compacted)  # the leak compaction is for
  assert compacted < 2 * megabytes, (kept, compacted)
  # The same graph: the model proto before and after compacting is the same message.
  before = graph.make_model("doc").SerializeToString()
  onnx_lib._compact_node_protos(graph)
  assert graph.make_model("doc").SerializeToString() == before
