"""Reads DoubleU-Net weights from the authors' Keras HDF5 files into a dunet `DoubleUNet`.

The authors' training script (DebeshJha/2020-CBMS-DoubleU-Net) saves the whole model with Keras'
`ModelCheckpoint` as legacy HDF5: `model_weights/<layer name>/...`, one group per layer, the root
of `model_weights` listing the layers in its `layer_names` attribute and each layer group listing
its arrays in its `weight_names` attribute. Two dialects exist and both are read:

  Keras 2 (TF 2.1 era):  model_weights/conv2d_3/conv2d_3/kernel:0   weight_names "conv2d_3/kernel:0"
  Keras 3 (`.h5` save):  model_weights/conv2d_3/conv2d_3/kernel     weight_names "conv2d_3/kernel"

Weight-only files (`model.save_weights("w.h5")`) have the same layer groups at the root.

How layers are matched (never by shape alone: many layers share shapes):
  * The 16 VGG19 convolutions carry fixed names (`block1_conv1` ... `block5_conv4`).
  * Every other layer has a Keras auto-generated name, `<type>` or `<type>_<n>`, where `n` counts
    the layers of that type created so far in the Python session. Sorting each type by `n` gives
    the order in which `model.py` created them, whatever number the session started at (a user
    who built other models first has `conv2d_17`, ...). `reference_creation_order` spells that
    order out for dunet's modules, so Keras' k-th Conv2D maps to dunet's k-th convolution slot.
  * When the file carries its `model_config`, each layer's type comes from it, and its dilation
    rate, kernel size, padding, bias and BatchNorm epsilon are checked against the dunet slot
    (the three dilated ASPP convolutions have identical shapes; only this catches a swap).
  * Every array's shape is checked against the dunet variable it goes to.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from dunet import errors
from dunet.models.doubleunet import DoubleUNet
from dunet.models.vgg19 import VGG19_LAYER_NAMES
from dunet.nn.aspp import ASPP
from dunet.nn.batch_norm import BatchNorm
from dunet.nn.conv import Conv2D
from dunet.nn.conv_block import ConvBlock
from dunet.nn.dense import Dense

# Layer kinds: the Keras class name, and the base of the names Keras generates for it.
CONV2D = "Conv2D"
BATCH_NORM = "BatchNormalization"
DENSE = "Dense"
KERAS_AUTO_NAME_BASE: Dict[str, str] = {
  CONV2D: "conv2d",
  BATCH_NORM: "batch_normalization",
  DENSE: "dense",
}
# Arrays of each kind, in the order Keras writes them (and the dunet attribute each one sets).
KERAS_WEIGHT_ROLES: Dict[str, Tuple[str, ...]] = {
  CONV2D: ("kernel", "bias"),
  BATCH_NORM: ("gamma", "beta", "moving_mean", "moving_variance"),
  DENSE: ("kernel", "bias"),
}
# The reference model's layer counts (VGG19's 16 convolutions are counted apart).
EXPECTED_LAYER_COUNTS: Dict[str, int] = {CONV2D: 38, BATCH_NORM: 36, DENSE: 24}


class KerasH5Error(errors.CheckpointError):
  """The file is missing, not HDF5, not a Keras layout, or not the reference DoubleU-Net.

  The message names the file and, where it applies, the Keras layer and the dunet variable.
  """


@dataclasses.dataclass(frozen=True)
class KerasLayer:
  """One Keras layer with weights, as the file stores it.

  Attributes:
    name: the layer name (the h5 group name), e.g. 'conv2d_3'.
    position: index in the file's `layer_names` attribute (the model's layer order).
    class_name: Keras class from `model_config` ('Conv2D', ...), or None without a config.
    config: the layer's config from `model_config` ({} without one).
    weights: {role: array}, role being the weight's own name ('kernel', 'gamma', ...).
  """

  name: str
  position: int
  class_name: Optional[str]
  config: Mapping[str, Any]
  weights: Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class KerasH5File:
  """What `read_keras_h5` found in a file.

  Attributes:
    path: the file read.
    layers: layers that hold weights, in the file's layer order.
    keras_version: the `keras_version` attribute ('2.3.0-tf', '3.15.1', ...) or 'unknown'.
    backend: the `backend` attribute or 'unknown'.
    input_shape: the model input's [H, W, C] from `model_config` when recorded (None entries for
      free dimensions), else None.
    has_model_config: whether the file carries the model's architecture.
  """

  path: str
  layers: Tuple[KerasLayer, ...]
  keras_version: str
  backend: str
  input_shape: Optional[Tuple[Optional[int], ...]]
  has_model_config: bool

  def layer(self, name: str) -> Optional[KerasLayer]:
    for layer in self.layers:
      if layer.name == name:
        return layer
    return None


@dataclasses.dataclass(frozen=True)
class LayerSlot:
  """One dunet module that one Keras layer fills.

  Attributes:
    kind: CONV2D, BATCH_NORM or DENSE.
    dunet_path: where the module sits in DoubleUNet, e.g. 'aspp1.atrous_convs[1]'.
    module: the Conv2D, BatchNorm or Dense module.
    variables: (role, variable) in Keras' array order; a conv without bias has no 'bias'.
    what: a short description for messages ('ASPP 1 image-pooling conv').
  """

  kind: str
  dunet_path: str
  module: tf.Module
  variables: Tuple[Tuple[str, tf.Variable], ...]
  what: str


@dataclasses.dataclass(frozen=True)
class Assignment:
  """One Keras array and the dunet variable it is assigned to."""

  keras_layer: str
  role: str
  dunet_path: str
  variable: tf.Variable
  value: np.ndarray


# ---------------------------------------------------------------------------------------------
# dunet side: the explicit walk.


def _conv_slot(conv: Conv2D, path: str, what: str) -> LayerSlot:
  variables = [("kernel", conv.kernel)]
  if conv.bias is not None:
    variables.append(("bias", conv.bias))
  return LayerSlot(CONV2D, path, conv, tuple(variables), what)


def _batch_norm_slot(bn: BatchNorm, path: str, what: str) -> LayerSlot:
  return LayerSlot(
    BATCH_NORM,
    path,
    bn,
    (
      ("gamma", bn.gamma),
      ("beta", bn.beta),
      ("moving_mean", bn.moving_mean),
      ("moving_variance", bn.moving_variance),
    ),
    what,
  )


def _dense_slot(dense: Dense, path: str, what: str) -> LayerSlot:
  variables = [("kernel", dense.kernel)]
  if dense.bias is not None:
    variables.append(("bias", dense.bias))
  return LayerSlot(DENSE, path, dense, tuple(variables), what)


def _aspp_slots(aspp: ASPP, path: str, what: str) -> Iterator[LayerSlot]:
  """The reference ASPP creates: pooling conv+BN, 1x1 conv+BN, each dilated conv+BN, project+BN."""
  yield _conv_slot(aspp.pool_conv, f"{path}.pool_conv", f"{what} image-pooling conv")
  yield _batch_norm_slot(aspp.pool_bn, f"{path}.pool_bn", f"{what} image-pooling BN")
  yield _conv_slot(aspp.conv_1x1, f"{path}.conv_1x1", f"{what} 1x1 conv")
  yield _batch_norm_slot(aspp.bn_1x1, f"{path}.bn_1x1", f"{what} 1x1 BN")
  for index, (conv, bn) in enumerate(zip(aspp.atrous_convs, aspp.atrous_bns)):
    rate = conv.dilation_rate
    yield _conv_slot(conv, f"{path}.atrous_convs[{index}]", f"{what} rate-{rate} conv")
    yield _batch_norm_slot(bn, f"{path}.atrous_bns[{index}]", f"{what} rate-{rate} BN")
  yield _conv_slot(aspp.project, f"{path}.project", f"{what} projection conv")
  yield _batch_norm_slot(aspp.project_bn, f"{path}.project_bn", f"{what} projection BN")


def _conv_block_slots(block: ConvBlock, path: str, what: str) -> Iterator[LayerSlot]:
  """The reference conv_block creates: conv, BN, conv, BN, SE dense (squeeze), SE dense (excite)."""
  yield _conv_slot(block.conv1, f"{path}.conv1", f"{what} conv 1")
  yield _batch_norm_slot(block.bn1, f"{path}.bn1", f"{what} BN 1")
  yield _conv_slot(block.conv2, f"{path}.conv2", f"{what} conv 2")
  yield _batch_norm_slot(block.bn2, f"{path}.bn2", f"{what} BN 2")
  yield _dense_slot(block.se.squeeze, f"{path}.se.squeeze", f"{what} SE squeeze dense")
  yield _dense_slot(block.se.excite, f"{path}.se.excite", f"{what} SE excite dense")


def reference_creation_order(model: DoubleUNet) -> Tuple[LayerSlot, ...]:
  """Every non-VGG layer slot of `model` in the order the reference `model.py` creates them.

  build_model: encoder1 (VGG19, named layers, not listed here) -> ASPP -> decoder1 (4 conv_blocks,
  256, 128, 64, 32) -> output_block (1x1 conv) -> encoder2 (4 conv_blocks, 32 ... 256) -> ASPP ->
  decoder2 (4 conv_blocks) -> output_block.

  Args:
    model: the dunet model whose modules are listed.

  Returns:
    98 slots: 38 convolutions, 36 BatchNorms and 24 dense layers (12 conv_blocks), interleaved in
    creation order (the order that matters is the one within each kind).
  """
  slots: List[LayerSlot] = []
  slots.extend(_aspp_slots(model.aspp1, "aspp1", "ASPP 1"))
  for index, block in enumerate(model.decoder1.blocks):
    slots.extend(
      _conv_block_slots(block, f"decoder1.blocks[{index}]", f"decoder 1 stage {index + 1}")
    )
  slots.append(_conv_slot(model.head1, "head1", "output 1 conv"))
  for index, block in enumerate(model.encoder2.blocks):
    slots.extend(
      _conv_block_slots(block, f"encoder2.blocks[{index}]", f"encoder 2 stage {index + 1}")
    )
  slots.extend(_aspp_slots(model.aspp2, "aspp2", "ASPP 2"))
  for index, block in enumerate(model.decoder2.blocks):
    slots.extend(
      _conv_block_slots(block, f"decoder2.blocks[{index}]", f"decoder 2 stage {index + 1}")
    )
  slots.append(_conv_slot(model.head2, "head2", "output 2 conv"))
  return tuple(slots)


def vgg_slots(model: DoubleUNet) -> Tuple[Tuple[str, LayerSlot], ...]:
  """(Keras layer name, slot) for the 16 VGG19 convolutions, which keep their Keras names."""
  return tuple(
    (name, _conv_slot(model.vgg19.layer(name), f"vgg19.{name}", f"VGG19 {name}"))
    for name in VGG19_LAYER_NAMES
  )


# ---------------------------------------------------------------------------------------------
# Keras side: reading the file.


def _decode(value: Any) -> str:
  return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _weight_role(weight_name: str) -> str:
  """'conv2d_3/kernel:0' (Keras 2) or 'conv2d_3/kernel' (Keras 3) -> 'kernel'."""
  last = weight_name.rsplit("/", 1)[-1]
  return last.split(":", 1)[0]


def _model_config_layers(
  h5_file, path: str
) -> Tuple[Dict[str, Tuple[str, Dict[str, Any]]], Optional[Tuple[Optional[int], ...]]]:
  """{layer name: (class name, config)} and the input shape from the `model_config` attribute."""
  raw = h5_file.attrs.get("model_config")
  if raw is None:
    return {}, None
  try:
    model_config = json.loads(_decode(raw))
    layer_configs = model_config["config"]["layers"]
  except (ValueError, KeyError, TypeError) as error:
    raise KerasH5Error(
      f"{path}: the model_config attribute is not a Keras functional model "
      f"config ({error}); is this the DoubleU-Net file?"
    ) from error
  layers: Dict[str, Tuple[str, Dict[str, Any]]] = {}
  input_shape = None
  for entry in layer_configs:
    config = entry.get("config", {})
    name = entry.get("name", config.get("name"))
    layers[name] = (entry.get("class_name"), config)
    if entry.get("class_name") == "InputLayer" and input_shape is None:
      # Keras 3 writes batch_shape, Keras 2 batch_input_shape; both lead with the batch axis.
      batch_shape = config.get("batch_shape", config.get("batch_input_shape"))
      if batch_shape:
        input_shape = tuple(batch_shape[1:])
  return layers, input_shape


def read_keras_h5(path: str) -> KerasH5File:
  """Reads every layer with weights from a Keras legacy HDF5 model or weights file.

  Args:
    path: a full-model file (`model.save("m.h5")`, Keras' ModelCheckpoint) or a weights file
      (`model.save_weights("w.h5")`), written by Keras 2 or Keras 3.

  Returns:
    A KerasH5File; arrays are float32.

  Raises:
    KerasH5Error: missing file, not HDF5, or not Keras' legacy layout (for example Keras 3's
      `.keras` zip or `.weights.h5` files).
  """
  import h5py  # Only conversion needs it.

  if not os.path.isfile(path):
    raise KerasH5Error(f"Keras weight file not found: {path!r}")
  try:
    h5_file = h5py.File(path, "r")
  except OSError as error:
    raise KerasH5Error(
      f"{path} is not an HDF5 file ({error}). A Keras 3 '.keras' file is a zip: "
      "load it in Keras and save it with model.save('model.h5')."
    ) from error
  with h5_file:
    root = h5_file["model_weights"] if "model_weights" in h5_file else h5_file
    if "layer_names" not in root.attrs:
      raise KerasH5Error(
        f"{path} is HDF5 but not a Keras legacy model or weights file (no 'layer_names' "
        f"attribute on {root.name!r}; top-level keys: {sorted(h5_file.keys())[:10]}). Keras 3's "
        "'.weights.h5' layout is not read: load the model in Keras and save it with "
        "model.save('model.h5')."
      )
    config_layers, input_shape = _model_config_layers(h5_file, path)
    layers: List[KerasLayer] = []
    for position, raw_name in enumerate(root.attrs["layer_names"]):
      name = _decode(raw_name)
      if name not in root:
        raise KerasH5Error(f"{path}: layer {name!r} is listed in layer_names but has no group")
      group = root[name]
      weight_names = [_decode(weight) for weight in group.attrs.get("weight_names", [])]
      if not weight_names:
        continue  # Pooling, activation, concatenation ... layers hold nothing.
      weights: Dict[str, np.ndarray] = {}
      for weight_name in weight_names:
        if weight_name not in group:
          raise KerasH5Error(
            f"{path}: layer {name!r} lists weight {weight_name!r} but the dataset is missing"
          )
        role = _weight_role(weight_name)
        if role in weights:
          raise KerasH5Error(f"{path}: layer {name!r} holds two weights named {role!r}")
        weights[role] = np.asarray(group[weight_name], dtype=np.float32)
      class_name, config = config_layers.get(name, (None, {}))
      layers.append(KerasLayer(name, position, class_name, config, weights))
    return KerasH5File(
      path=path,
      layers=tuple(layers),
      keras_version=_decode(
        h5_file.attrs.get("keras_version", root.attrs.get("keras_version", "unknown"))
      ),
      backend=_decode(h5_file.attrs.get("backend", root.attrs.get("backend", "unknown"))),
      input_shape=input_shape,
      has_model_config=bool(config_layers),
    )


# ---------------------------------------------------------------------------------------------
# Matching the two.


def _auto_name_index(name: str, kind: str) -> Optional[int]:
  """The session counter in a Keras auto-generated name ('conv2d' -> 0, 'conv2d_17' -> 17)."""
  match = re.fullmatch(rf"{KERAS_AUTO_NAME_BASE[kind]}(?:_(\d+))?", name)
  if match is None:
    return None
  return int(match.group(1)) if match.group(1) else 0


def _layer_kind(layer: KerasLayer) -> Optional[str]:
  """CONV2D, BATCH_NORM, DENSE or None, from the config's class or else the layer name."""
  if layer.class_name is not None:
    return layer.class_name if layer.class_name in KERAS_AUTO_NAME_BASE else None
  for kind in KERAS_AUTO_NAME_BASE:
    if _auto_name_index(layer.name, kind) is not None:
      return kind
  return None


def _in_creation_order(layers: Sequence[KerasLayer], kind: str) -> List[KerasLayer]:
  """Sorts one kind's layers by creation: the auto-name counter, or the file's order without it.

  The numeric sort matters: 'conv2d_10' was created after 'conv2d_9'.
  """
  indices = [_auto_name_index(layer.name, kind) for layer in layers]
  if all(index is not None for index in indices):
    return [layer for _, layer in sorted(zip(indices, layers), key=lambda pair: pair[0])]
  # Renamed layers: the file's layer order is the model's topological order, which the reference
  # model builds in creation order within each kind, branch by branch.
  return sorted(layers, key=lambda layer: layer.position)


def _pair_value(value: Any) -> Tuple[int, ...]:
  """Config values such as kernel_size 3, [3, 3] or (3, 3) -> (3, 3)."""
  if isinstance(value, (list, tuple)):
    return tuple(int(item) for item in value)
  return (int(value), int(value))


def _config_mismatches(layer: KerasLayer, slot: LayerSlot) -> List[str]:
  """What in the Keras layer's config contradicts the dunet slot (empty without a config)."""
  config = layer.config
  if not config:
    return []
  problems = []

  def check(key: str, actual: Any, expected: Any) -> None:
    if key in config and actual != expected:
      problems.append(
        f"{key}={config[key]!r} where dunet's {slot.dunet_path} ({slot.what}) has {expected!r}"
      )

  module = slot.module
  if slot.kind == CONV2D:
    check("kernel_size", _pair_value(config.get("kernel_size", 0)), (module.kernel_size,) * 2)
    check("dilation_rate", _pair_value(config.get("dilation_rate", 1)), (module.dilation_rate,) * 2)
    check("strides", _pair_value(config.get("strides", 1)), (1, 1))
    check("padding", config.get("padding"), "same")
    check("use_bias", config.get("use_bias"), module.bias is not None)
  elif slot.kind == BATCH_NORM:
    check("epsilon", config.get("epsilon"), module.epsilon)
    check("center", config.get("center"), True)
    check("scale", config.get("scale"), True)
  elif slot.kind == DENSE:
    check("use_bias", config.get("use_bias"), module.bias is not None)
  return problems


def _slot_assignments(layer: KerasLayer, slot: LayerSlot, path: str) -> List[Assignment]:
  """Pairs a Keras layer's arrays with a slot's variables, checking names and shapes."""
  where = f"{path}: Keras layer {layer.name!r} -> dunet {slot.dunet_path} ({slot.what})"
  problems = _config_mismatches(layer, slot)
  if problems:
    raise KerasH5Error(f"{where}: the layer's config does not match: {'; '.join(problems)}")
  expected_roles = [role for role, _ in slot.variables]
  if sorted(layer.weights) != sorted(expected_roles):
    raise KerasH5Error(
      f"{where}: the layer holds {sorted(layer.weights)}, dunet needs {expected_roles}"
    )
  assignments = []
  for role, variable in slot.variables:
    value = layer.weights[role]
    if tuple(value.shape) != tuple(variable.shape):
      raise KerasH5Error(
        f"{where}: {role} has shape {tuple(value.shape)} but dunet variable {variable.name} "
        f"({slot.dunet_path}.{role}) has shape {tuple(variable.shape)}"
      )
    assignments.append(Assignment(layer.name, role, slot.dunet_path, variable, value))
  return assignments


def match_doubleunet(keras_file: KerasH5File, model: DoubleUNet) -> List[Assignment]:
  """Pairs every array of the file with a variable of `model`, checking everything on the way.

  Args:
    keras_file: what `read_keras_h5` returned.
    model: a DoubleUNet built with the reference widths (aspp_filters=64).

  Returns:
    One Assignment per dunet variable (VGG first, then creation order), nothing assigned yet.

  Raises:
    KerasH5Error: the file is not the reference DoubleU-Net: missing or extra layers (listed), a
      config that contradicts the slot, a missing/extra array or a wrong shape (naming the Keras
      layer and the dunet variable).
  """
  path = keras_file.path
  vgg_names = set(VGG19_LAYER_NAMES)
  by_kind: Dict[str, List[KerasLayer]] = {kind: [] for kind in EXPECTED_LAYER_COUNTS}
  unknown: List[str] = []
  for layer in keras_file.layers:
    if layer.name in vgg_names:
      continue
    kind = _layer_kind(layer)
    if kind is None:
      unknown.append(f"{layer.name} ({layer.class_name or 'unknown type'})")
    else:
      by_kind[kind].append(layer)

  problems = []
  missing_vgg = [name for name in VGG19_LAYER_NAMES if keras_file.layer(name) is None]
  if missing_vgg:
    problems.append(f"VGG19 layers missing: {', '.join(missing_vgg)}")
  for kind, expected in EXPECTED_LAYER_COUNTS.items():
    found = len(by_kind[kind])
    if found != expected:
      names = ", ".join(layer.name for layer in by_kind[kind][:8])
      problems.append(
        f"{found} {kind} layers where DoubleU-Net has {expected}"
        + (f" (found: {names}{', ...' if found > 8 else ''})" if found else "")
      )
  if unknown:
    problems.append(
      f"layers DoubleU-Net does not have: {', '.join(unknown[:10])}"
      + (", ..." if len(unknown) > 10 else "")
    )
  if problems:
    raise KerasH5Error(
      f"{path} is not the reference DoubleU-Net (model.py of "
      f"DebeshJha/2020-CBMS-DoubleU-Net): {'; '.join(problems)}"
    )

  assignments: List[Assignment] = []
  for name, slot in vgg_slots(model):
    assignments.extend(_slot_assignments(keras_file.layer(name), slot, path))
  slots = reference_creation_order(model)
  for kind in EXPECTED_LAYER_COUNTS:
    kind_slots = [slot for slot in slots if slot.kind == kind]
    for layer, slot in zip(_in_creation_order(by_kind[kind], kind), kind_slots):
      assignments.extend(_slot_assignments(layer, slot, path))
  assigned = {id(assignment.variable) for assignment in assignments}
  unassigned = [variable.name for variable in model.variables if id(variable) not in assigned]
  if unassigned:  # Only if DoubleUNet grew variables this walk does not know about.
    raise KerasH5Error(f"{path}: dunet variables with no Keras counterpart: {unassigned[:10]}")
  return assignments


def load_keras_h5(model: DoubleUNet, path: str) -> List[Assignment]:
  """Reads, checks and assigns the reference Keras weights to `model` (all or nothing).

  Args:
    model: a DoubleUNet (aspp_filters=64).
    path: the Keras HDF5 file.

  Returns:
    The assignments made.

  Raises:
    KerasH5Error: see `read_keras_h5` and `match_doubleunet`; nothing is assigned then.
  """
  assignments = match_doubleunet(read_keras_h5(path), model)
  for assignment in assignments:
    assignment.variable.assign(assignment.value)
  return assignments


# ---------------------------------------------------------------------------------------------
# Writing a dunet workdir.

# Recorded in config.json: the reference code read images with cv2 (BGR) and divided by 255.
REFERENCE_PREPROCESSING = "reference"


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
  """What `convert_keras_h5` did.

  Attributes:
    out_dir: the workdir written.
    checkpoint_prefix: the checkpoint inside it (`<out_dir>/best/ckpt-1`).
    keras_layers: Keras layers mapped (114: 16 VGG19 + 38 conv + 36 BN + 24 dense).
    variables: dunet variables assigned.
    scalars: numbers copied (29,297,570 for the reference model).
    trainable_scalars: of which trainable (29,290,274; the rest are BN moving statistics).
    config: what was written to config.json.
  """

  out_dir: str
  checkpoint_prefix: str
  keras_layers: int
  variables: int
  scalars: int
  trainable_scalars: int
  config: Mapping[str, Any]


def _verify_checkpoint(workdir: str, assignments: Sequence[Assignment]) -> str:
  """Restores `workdir` into a fresh DoubleUNet and checks every variable equals what was assigned.

  Returns:
    The checkpoint prefix restored.
  """
  from dunet import checkpoint as checkpoint_lib  # Local: checkpoint code is not needed to read.

  reloaded = DoubleUNet()
  prefix = checkpoint_lib.restore_model(reloaded, workdir)
  # Variables are created in the same order in every DoubleUNet, so the paths name them.
  by_path = {
    (slot_path, role): variable for slot_path, role, variable in _variables_by_path(reloaded)
  }
  for assignment in assignments:
    variable = by_path[(assignment.dunet_path, assignment.role)]
    if not np.array_equal(variable.numpy(), assignment.value):
      raise RuntimeError(
        f"verification failed: {assignment.dunet_path}.{assignment.role} "
        f"(from Keras layer {assignment.keras_layer}) differs after reloading "
        f"{prefix}"
      )
  return prefix


def _variables_by_path(model: DoubleUNet) -> Iterator[Tuple[str, str, tf.Variable]]:
  """(dunet path, role, variable) for every slot of `model`, VGG included."""
  for _, slot in vgg_slots(model):
    for role, variable in slot.variables:
      yield slot.dunet_path, role, variable
  for slot in reference_creation_order(model):
    for role, variable in slot.variables:
      yield slot.dunet_path, role, variable


def convert_keras_h5(
  keras_h5_path: str,
  out_dir: str,
  overwrite: bool = False,
  preprocessing: str = REFERENCE_PREPROCESSING,
) -> ConversionSummary:
  """Converts the authors' Keras DoubleU-Net file into a dunet workdir, atomically.

  The workdir holds `best/ckpt-1` (written by a CheckpointManager, so `best/checkpoint` exists and
  `dunet.checkpoint.restore_model(model, out_dir)` finds it) and `config.json` recording the
  reference preprocessing and the source file. Everything is written to a temporary sibling
  folder, verified by reloading, then renamed to `out_dir`: a failure leaves nothing behind.

  Args:
    keras_h5_path: the Keras HDF5 model or weights file.
    out_dir: the workdir to create (a local path).
    overwrite: replace `out_dir` if it exists; otherwise an existing non-empty `out_dir` is an
      error.
    preprocessing: what the Keras model was trained on (recorded in config.json, applied by
      evaluate/predict/export): the reference code's "reference" unless it was changed.

  Returns:
    A ConversionSummary.

  Raises:
    KerasH5Error: the file cannot be read or is not the reference DoubleU-Net.
    FileExistsError: `out_dir` exists, is not empty, and `overwrite` is False.
  """
  from dunet import checkpoint as checkpoint_lib
  from dunet import fileio

  from dunet.data import preprocess

  if preprocessing not in preprocess.PREPROCESSING:
    raise ValueError(
      f"unknown preprocessing {preprocessing!r}; expected one of {preprocess.PREPROCESSING}"
    )
  out_dir = os.path.abspath(out_dir)
  fileio.check_out_dir(out_dir, overwrite)  # before reading a large file
  keras_file = read_keras_h5(keras_h5_path)
  model = DoubleUNet()
  assignments = match_doubleunet(keras_file, model)
  for assignment in assignments:
    assignment.variable.assign(assignment.value)

  config: Dict[str, Any] = {
    "preprocessing": preprocessing,
    "source": {
      "format": "keras_h5",
      "path": os.path.abspath(keras_h5_path),
      "keras_version": keras_file.keras_version,
      "backend": keras_file.backend,
    },
  }
  if keras_file.input_shape and all(keras_file.input_shape[:2]):
    # The size the Keras model was built (and so trained) at; the network itself takes any
    # multiple of 16.
    config["height"], config["width"] = (int(size) for size in keras_file.input_shape[:2])

  with fileio.staged_directory(out_dir, overwrite, purpose="converting") as staging:
    manager = tf.train.CheckpointManager(
      tf.train.Checkpoint(model=model),
      os.path.join(staging, checkpoint_lib.BEST_SUBDIR),
      max_to_keep=1,
    )
    manager.save(checkpoint_number=1)
    checkpoint_lib.write_config(staging, config)
    _verify_checkpoint(staging, assignments)
  prefix = checkpoint_lib.resolve_checkpoint(out_dir)

  trainable_ids = {id(variable) for variable in model.trainable_variables}
  return ConversionSummary(
    out_dir=out_dir,
    checkpoint_prefix=prefix,
    keras_layers=len({assignment.keras_layer for assignment in assignments}),
    variables=len(assignments),
    scalars=sum(assignment.value.size for assignment in assignments),
    trainable_scalars=sum(
      assignment.value.size
      for assignment in assignments
      if id(assignment.variable) in trainable_ids
    ),
    config=config,
  )
