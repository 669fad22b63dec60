"""Segmentation losses from logits, per example, and the deep-supervision weighting of both heads.

Every loss here takes logits (not probabilities) and binary masks, computes in float32 whatever the
model's compute dtype, and returns one value per example (shape [B]). Per-example losses are what
distributed training needs: each replica divides the sum of its examples' losses by the GLOBAL batch
size (`tf.nn.compute_average_loss`), so summing the replicas' shares gives the mean over the global
batch, whatever the number of replicas.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import tensorflow as tf

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


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

  Computed per image. The reference code summed over the whole batch (one Dice for the batch);
  a batch-level Dice is not a sum of per-example terms, so it cannot be split across replicas and
  would change with the number of devices. Per image, an empty mask with an empty prediction
  scores a loss near 0 thanks to `smooth`.

  Args:
    logits: [B, H, W, 1] (or any [B, ...]) logits of any float dtype.
    masks: binary masks of the same shape.
    smooth: added to numerator and denominator (the reference: 1.0).

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
  try:
    return LOSSES[name]
  except KeyError:
    raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}") from None


def deep_supervision_loss(
    logits_per_head: Sequence[tf.Tensor], masks: tf.Tensor, loss_fn: LossFn,
    head_weights: Sequence[float],
    global_batch_size: Optional[Union[int, tf.Tensor]]) -> Tuple[tf.Tensor, List[tf.Tensor]]:
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
