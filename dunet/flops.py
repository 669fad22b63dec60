"""Analytic FLOP counts from the shapes of the convolutions a model actually runs."""

from __future__ import annotations

from typing import Dict

import numpy as np
import tensorflow as tf


def forward_flops(model: tf.Module, height: int, width: int, batch_size: int = 1) -> Dict[str, int]:
  """Counts multiply-adds x 2 of every convolution and matmul in one inference forward pass.

  Traces `model(images, is_training=False)` and reads each Conv2D/MatMul op's static shapes, so the
  count follows the network as built (a researcher's changed block is counted as it is).

  Args:
    model: a module called as model(images, is_training=False).
    height, width: input size.
    batch_size: images per pass.

  Returns:
    {"conv": FLOPs of convolutions, "matmul": FLOPs of dense layers, "total": their sum} for the
    whole batch. Elementwise ops, batch norm and resizing are not counted (well under 1% here).
  """
  function = tf.function(lambda images: model(images, is_training=False))
  graph = function.get_concrete_function(
    tf.TensorSpec([batch_size, height, width, 3], tf.float32)
  ).graph
  conv = matmul = 0
  for op in graph.get_operations():
    if op.type == "Conv2D":
      output = op.outputs[0]
      # A dilated convolution run as space-to-batch (dunet.nn.conv on CPU) computes on a padded
      # grid; count the outputs the network keeps, i.e. what batch-to-space hands on.
      to_space = [c for c in output.consumers() if c.type == "BatchToSpaceND"]
      kept = to_space[0].outputs[0] if to_space else output
      kernel_shape = op.inputs[1].shape.as_list()
      conv += 2 * int(np.prod(kept.shape.as_list())) * int(np.prod(kernel_shape[:3]))
    elif op.type in ("MatMul", "BatchMatMulV2"):
      a_shape, b_shape = op.inputs[0].shape.as_list(), op.inputs[1].shape.as_list()
      matmul += 2 * int(np.prod(a_shape)) * int(b_shape[-1])
  return {"conv": conv, "matmul": matmul, "total": conv + matmul}


def training_flops_per_image(model: tf.Module, height: int, width: int) -> int:
  """Forward x 3: the backward pass costs about twice the forward (input and weight gradients)."""
  return 3 * forward_flops(model, height, width, 1)["total"]
