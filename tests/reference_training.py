"""Measures how closely dunet trains like the authors' Keras code (shared by the parity test and
`python -m profiling.parity`, which records the numbers).

dunet with the reference loss reduction is compared with the Keras oracle
(tests/keras_reference.py) trained as the reference train.py trains it: `fit` steps
(`train_on_batch`), ONE loss over both heads and the batch, Keras Adam/Nadam. Both start from
the same weights (random everywhere, BatchNorm statistics included, mapped by dunet's Keras
converter) and see the same batches.

A 29 M-parameter network trained with Adam is chaotic in float32: Adam's first steps move every
weight by about +-lr whatever the size of its gradient, so rounding flips the sign of tiny
gradients, and two runs drift apart within a few steps. Hence two measurements:

  teacher forcing   before each Keras step dunet gets Keras' weights, BatchNorm statistics and
                    optimizer state; both take one step on the same batch; the losses, the
                    updates and the new statistics are compared. Only rounding separates them.
  free running      N steps each from the same start; the gap is compared with the float32
                    noise floor of the problem: dunet against itself when only the order of the
                    images inside each batch changes (same data, same maths).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from dunet import builder
from dunet import keras_h5
from dunet import losses
from dunet import optim
from dunet import precision
from dunet.models import DoubleUNet
from tests import keras_reference

SIZE = 64
BATCH = 4
LEARNING_RATE = 1e-4
COMBINATIONS = (("adam", "bce"), ("adam", "dice"), ("nadam", "bce"), ("nadam", "dice"))
Batches = List[Tuple[np.ndarray, np.ndarray]]


def make_batches(count: int, seed: int = 1) -> Batches:
  """Pictures with one or two lighter discs on a noisy background; masks are the discs."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[0:SIZE, 0:SIZE]
  batches = []
  for _ in range(count):
    images = np.empty((BATCH, SIZE, SIZE, 3), np.float32)
    masks = np.zeros((BATCH, SIZE, SIZE, 1), np.float32)
    for index in range(BATCH):
      image = np.broadcast_to(rng.uniform(0.2, 0.5, 3), (SIZE, SIZE, 3)).copy()
      for _ in range(rng.integers(1, 3)):
        centre, radius = rng.uniform(10, SIZE - 10, 2), rng.uniform(5, 14)
        disc = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius**2
        masks[index, disc, 0] = 1.0
        image[disc] += rng.uniform(0.2, 0.4, 3)
      images[index] = np.clip(image + rng.normal(0.0, 0.05, image.shape), 0.0, 1.0)
    batches.append((images, masks))
  return batches


class Pair:
  """The Keras oracle, a dunet copy of its weights, and their variables paired."""

  def __init__(self, h5_path: str, steps: int):
    """Builds both models (random weights, seed 0) and `steps` batches; writes `h5_path`."""
    keras.utils.clear_session()
    keras.utils.set_random_seed(0)
    self.keras_model = keras_reference.build_reference_model(SIZE, SIZE)
    keras_reference.randomize_weights(self.keras_model, seed=0, head_gain=1.0)
    self.initial_keras_weights = self.keras_model.get_weights()
    self.keras_model.save(h5_path)
    self.model = DoubleUNet()
    self.assignments = keras_h5.load_keras_h5(self.model, h5_path)
    self.keras_variables = [
      keras_reference.layer_weights_by_role(self.keras_model, a.keras_layer)[a.role]
      for a in self.assignments
    ]
    self.batches = make_batches(steps)
    # Biases right before a training-mode BatchNorm have a gradient of exactly zero in exact
    # arithmetic: theirs is rounding noise, which Adam turns into full-size steps.
    self.noise_only = {id(conv.bias) for conv in convs_before_batch_norm(self.model)}

  def reset(self) -> None:
    self.keras_model.set_weights(self.initial_keras_weights)
    for assignment in self.assignments:
      assignment.variable.assign(assignment.value)

  def initial_values(self) -> List[np.ndarray]:
    return [assignment.value for assignment in self.assignments]

  def dunet_values(self) -> List[np.ndarray]:
    return [assignment.variable.numpy() for assignment in self.assignments]

  def keras_values(self) -> List[np.ndarray]:
    return [variable.numpy() for variable in self.keras_variables]

  def split(self, arrays: Sequence[np.ndarray]) -> Dict[str, List[np.ndarray]]:
    """The arrays of all trainable variables, of those with an informative gradient (all but
    the biases before a BatchNorm), and of the BatchNorm statistics."""
    parts: Dict[str, List[np.ndarray]] = {"trainable": [], "informative": [], "statistics": []}
    for assignment, value in zip(self.assignments, arrays):
      if not assignment.variable.trainable:
        parts["statistics"].append(value)
        continue
      parts["trainable"].append(value)
      if id(assignment.variable) not in self.noise_only:
        parts["informative"].append(value)
    return parts


def convs_before_batch_norm(model: DoubleUNet) -> Iterator[tf.Module]:
  """The convolutions whose output goes straight into a BatchNorm (bias gradient zero)."""
  for module in model.submodules:
    if hasattr(module, "conv1") and hasattr(module, "bn1"):  # a ConvBlock
      yield module.conv1
      yield module.conv2
  yield model.aspp1.pool_conv
  yield model.aspp2.pool_conv


def relative_difference(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
  """|a - b| / |a| over all the arrays together (Euclidean norms)."""
  difference = sum(float(np.sum(np.square(x - y))) for x, y in zip(a, b))
  size = sum(float(np.sum(np.square(x))) for x in a)
  return float(np.sqrt(difference / max(size, 1e-300)))


def dunet_train_function(pair: Pair, optimizer_name: str, loss_name: str):
  """(optimizer, tf.function(batch) -> measurements): dunet's own step, reference reduction."""
  optimizer = optim.make_optimizer(optimizer_name, LEARNING_RATE, pair.model.trainable_variables)
  # The model exists already (Keras' weights): only optimizer and loss scale are new here.
  parts = builder.TrainingParts(
    model=pair.model,
    optimizer=optimizer,
    loss_scale=precision.make_loss_scale(precision.Policy("float32")),
    policy=precision.Policy("float32"),
  )
  return optimizer, builder.make_train_function(
    parts,
    loss_fn=losses.make_heads_loss(loss_name, losses.REFERENCE),
    head_weights=(1.0, 1.0),
    global_batch_size=BATCH,
  )


def _as_batch(images: np.ndarray, masks: np.ndarray) -> Dict[str, tf.Tensor]:
  return {"image": tf.constant(images), "mask": tf.constant(masks)}


def copy_keras_state(pair: Pair, keras_optimizer, optimizer) -> None:
  """Keras' weights, BatchNorm statistics and optimizer state (moments, step count, Nadam's
  momentum product) into dunet's model and optimizer."""
  for assignment, keras_variable in zip(pair.assignments, pair.keras_variables):
    assignment.variable.assign(keras_variable.numpy())
  optimizer.iterations.assign(int(keras_optimizer.iterations.numpy()))
  if not keras_optimizer.built:  # before the first step both have zero moments
    return
  # pylint: disable=protected-access
  for assignment, keras_variable in zip(pair.assignments, pair.keras_variables):
    if assignment.variable.trainable:
      index = keras_optimizer._get_variable_index(keras_variable)
      slots = optimizer.slots_of(assignment.variable)
      slots["momentums"].assign(keras_optimizer._momentums[index].numpy())
      slots["velocities"].assign(keras_optimizer._velocities[index].numpy())
  if isinstance(optimizer, optim.Nadam):
    optimizer.momentum_product.assign(float(keras_optimizer._u_product.numpy()))
  # pylint: enable=protected-access


def reset_optimizer(optimizer) -> None:
  """Back to the state of a new optimizer: step 0, zero moments (Nadam: product 1)."""
  optimizer.iterations.assign(0)
  for slot_name in optimizer.SLOT_NAMES:
    for slot in getattr(optimizer, slot_name):
      slot.assign(tf.zeros_like(slot))
  if isinstance(optimizer, optim.Nadam):
    optimizer.momentum_product.assign(1.0)


@dataclasses.dataclass
class ForcedStep:
  """One teacher-forced step: both losses and the relative differences of what changed."""

  step: int
  keras_loss: float
  dunet_loss: float
  loss_difference: float  # |dunet - keras| / keras
  update_trainable: float  # relative difference of the weight updates (all trainable)
  update_informative: float  # the same without the biases before a BatchNorm
  update_statistics: float  # of the BatchNorm statistics' changes


@dataclasses.dataclass
class FreeRun:
  """N free-running steps of Keras, dunet, and dunet with each batch's images reversed."""

  keras_losses: np.ndarray
  dunet_losses: np.ndarray
  noise_losses: np.ndarray
  # {part: (|keras - dunet| / |keras|, |dunet - noise| / |dunet|)} of the weight changes.
  drift: Dict[str, Tuple[float, float]]


@dataclasses.dataclass
class Measurement:
  forced: List[ForcedStep]
  free: Optional[FreeRun]


def measure(
  pair: Pair, optimizer_name: str, loss_name: str, forced_steps: int, free_steps: int = 0
) -> Measurement:
  """Keras trains max(forced_steps, free_steps) steps from the common start. During its first
  `forced_steps` steps dunet takes Keras' state before each and steps once too (Keras' own
  trajectory is never touched). With `free_steps`, dunet then trains that many steps alone from
  the start, once as given and once with each batch's images reversed (the noise floor)."""
  pair.reset()
  keras_reference.compile_for_training(pair.keras_model, optimizer_name, LEARNING_RATE, loss_name)
  keras_optimizer = pair.keras_model.optimizer
  optimizer, train_function = dunet_train_function(pair, optimizer_name, loss_name)
  forced, keras_losses, keras_final = [], [], None
  for step, (images, masks) in enumerate(pair.batches[: max(forced_steps, free_steps)], start=1):
    if step <= forced_steps:
      copy_keras_state(pair, keras_optimizer, optimizer)
      before = pair.keras_values()
    keras_losses.append(
      float(pair.keras_model.train_on_batch(images, keras_reference.both_heads(masks)))
    )
    if step <= forced_steps:
      dunet_loss = float(train_function(_as_batch(images, masks))["loss/total"])
      keras_changes = pair.split([k - b for k, b in zip(pair.keras_values(), before)])
      dunet_changes = pair.split([d - b for d, b in zip(pair.dunet_values(), before)])
      forced.append(
        ForcedStep(
          step,
          keras_losses[-1],
          dunet_loss,
          abs(dunet_loss - keras_losses[-1]) / abs(keras_losses[-1]),
          *(
            relative_difference(keras_changes[part], dunet_changes[part])
            for part in ("trainable", "informative", "statistics")
          ),
        )
      )
    if step == free_steps:
      keras_final = pair.keras_values()
  if not free_steps:
    return Measurement(forced, None)

  def run_dunet(reverse_images: bool) -> Tuple[np.ndarray, List[np.ndarray]]:
    for assignment in pair.assignments:
      assignment.variable.assign(assignment.value)
    reset_optimizer(optimizer)
    step_losses = []
    for images, masks in pair.batches[:free_steps]:
      if reverse_images:
        images, masks = images[::-1], masks[::-1]
      step_losses.append(float(train_function(_as_batch(images, masks))["loss/total"]))
    return np.array(step_losses), pair.dunet_values()

  dunet_losses, dunet_final = run_dunet(reverse_images=False)
  noise_losses, noise_final = run_dunet(reverse_images=True)
  initial = pair.initial_values()
  changes = {
    name: pair.split([v - i for v, i in zip(values, initial)])
    for name, values in (("keras", keras_final), ("dunet", dunet_final), ("noise", noise_final))
  }
  drift = {
    part: (
      relative_difference(changes["keras"][part], changes["dunet"][part]),
      relative_difference(changes["dunet"][part], changes["noise"][part]),
    )
    for part in ("trainable", "informative", "statistics")
  }
  free = FreeRun(np.array(keras_losses[:free_steps]), dunet_losses, noise_losses, drift)
  return Measurement(forced, free)
