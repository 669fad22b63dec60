"""Segmentation losses from logits, and the two ways of combining both heads over a batch.

Two reductions (`make_heads_loss(name, reduction)`):

  per_image  (dunet's default) every loss is computed per example from logits, in float32
             whatever the model's compute dtype (shape [B]); each head's per-example losses are
             averaged over the GLOBAL batch (`tf.nn.compute_average_loss`: each replica divides
             its sum by the global batch size, so the replicas' shares add up to the mean), and
             the heads are summed with their weights: w1·L(head 1) + w2·L(head 2).
  reference  exactly what the authors' train.py computes: ONE loss over both heads
             concatenated and the whole batch (Keras `model.fit` on `concat([out1, out2])`
             against `concat([y, y])`). BCE is Keras' probability-space cross-entropy
             (sigmoid, clipped to [1e-7, 1 - 1e-7]) averaged over every pixel of both heads;
             Dice is one ratio 1 - (2·Σp·y + s)/(Σp + Σy + s) over every pixel of both heads
             and images, with the reference's s = 1e-15; bce_dice is their sum. A batch-level
             Dice is not a sum of per-example terms, so across replicas the sums are
             all-reduced before the ratio (gradients flow through the all-reduce): the value,
             and the gradients, do not change with the number of replicas.

`head_weights` (1, 1) reproduce the reference; other weights make the reference reduction a
weighted mean of the heads' cross-entropies and a Dice over the heads' weighted sums.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import tensorflow as tf

from dunet import registry

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
BatchSize = Optional[Union[int, tf.Tensor]]
PER_IMAGE, REFERENCE = "per_image", "reference"
REDUCTIONS = (PER_IMAGE, REFERENCE)
# Keras' epsilon(): the reference's probabilities are clipped to [EPSILON, 1 - EPSILON].
KERAS_EPSILON = 1e-7
# The reference train.py's Dice smoothing (its metrics.py; predict.py scores with 1.0).
REFERENCE_DICE_SMOOTH = 1e-15


def _as_float32(logits: tf.Tensor, masks: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  logits = tf.cast(logits, tf.float32)
  masks = tf.cast(masks, tf.float32)
  return logits, masks


def _sum_per_example(values: tf.Tensor) -> tf.Tensor:
  """Sums all axes but the first: [B, ...] -> [B]."""
  return tf.reduce_sum(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


def binary_cross_entropy(logits: tf.Tensor, masks: tf.Tensor) -> tf.Tensor:
  """Pixel-wise binary cross-entropy from logits, averaged over each example's pixels.

  Uses the stable form max(x, 0) - x·y + log(1 + exp(-|x|)), so large logits neither overflow nor
  give log(0). (The reference Keras code applied BCE to sigmoid probabilities, which Keras clips to
  [1e-7, 1 - 1e-7]; the two agree except for confidently wrong pixels, where this one keeps the
  gradient instead of saturating.)

  Args:
    logits: [B, H, W, 1] (or any [B, ...]) logits of any float dtype.
    masks: binary masks of the same shape (0 background, 1 foreground).

  Returns:
    [B] float32 mean cross-entropy of each example.
  """
  logits, masks = _as_float32(logits, masks)
  per_pixel = tf.nn.sigmoid_cross_entropy_with_logits(labels=masks, logits=logits)
  pixels = tf.cast(tf.reduce_prod(tf.shape(per_pixel)[1:]), tf.float32)
  return _sum_per_example(per_pixel) / pixels


def dice_loss(logits: tf.Tensor, masks: tf.Tensor, smooth: float = 1.0) -> tf.Tensor:
  """Soft Dice loss of each image: 1 - (2·Σ p·y + s) / (Σ p + Σ y + s), with p = sigmoid(logits).

  Computed per image (the reference code computes one Dice over the whole batch and both heads:
  `ReferenceLoss`). Per image, an empty mask with an empty prediction scores a loss near 0
  thanks to `smooth`.

  Args:
    logits: [B, H, W, 1] (or any [B, ...]) logits of any float dtype.
    masks: binary masks of the same shape.
    smooth: added to numerator and denominator (1.0 keeps a per-image Dice of an empty mask
      finite and smooth; the reference's batch-level Dice uses 1e-15).

  Returns:
    [B] float32 Dice loss of each image, in [0, 1].
  """
  logits, masks = _as_float32(logits, masks)
  probabilities = tf.sigmoid(logits)
  intersection = _sum_per_example(probabilities * masks)
  total = _sum_per_example(probabilities) + _sum_per_example(masks)
  return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def bce_dice(logits: tf.Tensor, masks: tf.Tensor) -> tf.Tensor:
  """Binary cross-entropy plus soft Dice loss (smooth 1), per example: [B] float32."""
  return binary_cross_entropy(logits, masks) + dice_loss(logits, masks)


LOSSES: Dict[str, LossFn] = {
  "bce": binary_cross_entropy,
  "dice": dice_loss,
  "bce_dice": bce_dice,
}


def get_loss(name: str) -> LossFn:
  """Returns the per-example loss function called `name` (one of LOSSES).

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  return registry.lookup(LOSSES, name, "loss")


def deep_supervision_loss(
  logits_per_head: Sequence[tf.Tensor],
  masks: tf.Tensor,
  loss_fn: LossFn,
  head_weights: Sequence[float],
  global_batch_size: Optional[Union[int, tf.Tensor]],
) -> Tuple[tf.Tensor, List[tf.Tensor]]:
  """Weighted sum of one loss applied to every head, as this replica's share of the global mean.

  Each head's per-example losses are summed and divided by `global_batch_size`
  (`tf.nn.compute_average_loss`): with one replica that is the batch mean; with several, the sum of
  the replicas' values is the mean over the global batch.

  Args:
    logits_per_head: logits of each head ([B, H, W, 1] each; cast to float32 here).
    masks: binary masks [B, H, W, 1], shared by all heads.
    loss_fn: per-example loss (logits, masks) -> [B], e.g. one of LOSSES.
    head_weights: one weight per head.
    global_batch_size: batch size summed over replicas (int or scalar integer tensor); None
      lets TensorFlow use the local batch size times the number of replicas.

  Returns:
    (total, per_head): the weighted sum Σ w_i·L_i (float32 scalar) and each unweighted L_i.

  Raises:
    ValueError: if the number of weights differs from the number of heads.
  """
  logits_per_head = list(logits_per_head)
  if len(logits_per_head) != len(head_weights):
    raise ValueError(f"{len(head_weights)} head weights for {len(logits_per_head)} heads")
  per_head = []
  for logits in logits_per_head:
    per_example = loss_fn(tf.cast(logits, tf.float32), masks)
    per_head.append(tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size))
  total = tf.add_n([float(weight) * loss for weight, loss in zip(head_weights, per_head)])
  return total, per_head


# ==================================================================================================
# Combining both heads over a batch: the two reductions
# ==================================================================================================
class HeadsLoss:
  """A loss over all heads and a (replica's share of a) batch.

  Called as `loss(logits_per_head, masks, head_weights, global_batch_size)`; returns
  `(total, per_head)`: this replica's shares (summing them over the replicas gives the value
  over the global batch) of the weighted total and of each head's own loss.
  """

  reduction: str = ""

  def __call__(
    self,
    logits_per_head: Sequence[tf.Tensor],
    masks: tf.Tensor,
    head_weights: Sequence[float],
    global_batch_size: BatchSize,
  ) -> Tuple[tf.Tensor, List[tf.Tensor]]:
    raise NotImplementedError


class PerImageLoss(HeadsLoss):
  """dunet's default: a per-example loss averaged over the global batch, heads summed."""

  reduction = PER_IMAGE

  def __init__(self, loss_fn: LossFn):
    self.loss_fn = loss_fn

  def __call__(self, logits_per_head, masks, head_weights, global_batch_size):
    return deep_supervision_loss(
      logits_per_head, masks, self.loss_fn, head_weights, global_batch_size
    )


class ReferenceLoss(HeadsLoss):
  """The authors' train.py loss: one BCE, Dice or BCE + Dice over both heads and the batch.

  Each replica sums, per head, the cross-entropy of its pixels and the Dice sums Σp·y, Σp, Σy,
  and counts its pixels; one all-reduce gives every replica the global sums, from which it
  computes the global value and returns 1/replicas of it (the step's convention). The
  all-reduce's gradient is an all-reduce too, so the gradients summed over replicas are those
  of the global value: one device and several give the same loss and the same update.
  """

  reduction = REFERENCE
  NAMES = ("bce", "dice", "bce_dice")

  def __init__(self, name: str, smooth: float = REFERENCE_DICE_SMOOTH):
    if name not in self.NAMES:
      raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(self.NAMES)}")
    self.name = name
    self.smooth = smooth

  def __call__(self, logits_per_head, masks, head_weights, global_batch_size):
    del global_batch_size  # the pixel count is all-reduced: exact for partial batches too
    logits_per_head = list(logits_per_head)
    if len(logits_per_head) != len(head_weights):
      raise ValueError(f"{len(head_weights)} head weights for {len(logits_per_head)} heads")
    masks = tf.cast(masks, tf.float32)
    # [heads, 5]: cross-entropy sum, Σp·y, Σp, Σy, pixels.
    local = tf.stack([self._sums(logits, masks) for logits in logits_per_head])
    replicas = 1
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
      replicas = context.num_replicas_in_sync
      local = context.all_reduce(tf.distribute.ReduceOp.SUM, local)
    cross_entropy_sum, overlap, predicted, truth, pixels = tf.unstack(local, axis=1)
    weights = tf.constant([float(w) for w in head_weights], tf.float32)
    cross_entropy = cross_entropy_sum / pixels
    dice = 1.0 - (2.0 * overlap + self.smooth) / (predicted + truth + self.smooth)
    total_cross_entropy = tf.reduce_sum(weights * cross_entropy) / tf.reduce_sum(weights)
    total_dice = 1.0 - (2.0 * tf.reduce_sum(weights * overlap) + self.smooth) / (
      tf.reduce_sum(weights * (predicted + truth)) + self.smooth
    )
    if self.name == "bce":
      total, per_head = total_cross_entropy, cross_entropy
    elif self.name == "dice":
      total, per_head = total_dice, dice
    else:
      total, per_head = total_cross_entropy + total_dice, cross_entropy + dice
    share = 1.0 / replicas
    return total * share, [value * share for value in tf.unstack(per_head)]

  @staticmethod
  def _sums(logits: tf.Tensor, masks: tf.Tensor) -> tf.Tensor:
    """[5] float32: Keras-BCE sum, Σp·y, Σp, Σy and the pixel count of one head."""
    probabilities = tf.sigmoid(tf.cast(logits, tf.float32))
    clipped = tf.clip_by_value(probabilities, KERAS_EPSILON, 1.0 - KERAS_EPSILON)
    cross_entropy = -(masks * tf.math.log(clipped) + (1.0 - masks) * tf.math.log(1.0 - clipped))
    pixels = tf.cast(tf.size(masks), tf.float32)
    return tf.stack(
      [
        tf.reduce_sum(cross_entropy),
        tf.reduce_sum(probabilities * masks),
        tf.reduce_sum(probabilities),
        tf.reduce_sum(masks),
        pixels,
      ]
    )


def make_heads_loss(name: str, reduction: str = PER_IMAGE) -> HeadsLoss:
  """The loss called `name` (bce, dice, bce_dice) with the given reduction (REDUCTIONS).

  Raises:
    ValueError: an unknown name or reduction, listing the valid ones.
  """
  if reduction == PER_IMAGE:
    return PerImageLoss(get_loss(name))
  if reduction == REFERENCE:
    return ReferenceLoss(name)
  raise ValueError(f"unknown loss reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")


def as_heads_loss(loss: Union[HeadsLoss, LossFn]) -> HeadsLoss:
  """`loss` itself if it is a HeadsLoss; a per-example function becomes a PerImageLoss."""
  return loss if isinstance(loss, HeadsLoss) else PerImageLoss(loss)
