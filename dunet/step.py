"""One training step and one validation step: the file to read (and edit) for research.

Both functions run per replica (inside `strategy.run`, or directly with no strategy) and contain
only TensorFlow ops, so they can be traced by `tf.function` and compiled by XLA. Everything that
needs numpy or logging (metric accumulation, summaries, progress) happens in dunet/train.py,
outside the compiled step, on the measurements these functions return.

What a train step does, in order:
  1. forward both heads in training mode (BatchNorm uses batch statistics);
  2. deep supervision on both heads, in float32 from logits, as this replica's share of the
     global-batch value (summing the replicas' shares gives it): by default
     w1 * L(head 1) + w2 * L(head 2) with per-example losses divided by the GLOBAL batch size;
     with the reference reduction, one loss over both heads and the global batch
     (dunet/losses.py);
  3. scale the loss (float16 only), differentiate, all-reduce the gradients across replicas;
  4. unscale, decide "all finite" on the reduced gradients (so every replica agrees);
  5. apply the optimizer only if finite (else nothing moves), then grow/shrink the loss scale.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import tensorflow as tf

from dunet import losses
from dunet import metrics

Batch = Dict[str, tf.Tensor]


def compute_loss(
  model: tf.Module,
  batch: Batch,
  loss_fn: Callable,
  head_weights: Sequence[float],
  global_batch_size: int,
  is_training: bool,
):
  """Forward pass and deep-supervision loss.

  Returns:
    (outputs, total_loss, per_head_losses): model outputs (float32 logits), the weighted sum, and
    each head's loss; losses are this replica's share of the global mean.
  """
  outputs = model(batch["image"], is_training=is_training)
  total_loss, per_head_losses = losses.as_heads_loss(loss_fn)(
    outputs, batch["mask"], head_weights, global_batch_size
  )
  return outputs, total_loss, per_head_losses


def compute_gradients(
  model: tf.Module,
  loss_scale,
  batch: Batch,
  loss_fn: Callable,
  head_weights: Sequence[float],
  global_batch_size: int,
):
  """Forward and backward on this replica's batch (the part worth compiling with XLA).

  Returns:
    (scaled_gradients, total_loss, per_head_losses): gradients of the scaled loss, not yet reduced
    across replicas and not unscaled.
  """
  with tf.GradientTape() as tape:
    _, total_loss, per_head_losses = compute_loss(
      model, batch, loss_fn, head_weights, global_batch_size, is_training=True
    )
    scaled_loss = loss_scale.scale_loss(total_loss)
  scaled_gradients = tape.gradient(scaled_loss, model.trainable_variables)
  return scaled_gradients, total_loss, per_head_losses


def apply_gradients(model: tf.Module, optimizer, loss_scale, scaled_gradients):
  """All-reduce, unscale, check, update. Returns (gradients, all_finite)."""
  replica_context = tf.distribute.get_replica_context()
  # Sum over replicas: each replica's loss was already divided by the global batch size.
  scaled_gradients = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, scaled_gradients)
  gradients = loss_scale.unscale(scaled_gradients)
  all_finite = loss_scale.all_finite(gradients)
  optimizer.apply(gradients, model.trainable_variables, should_apply=all_finite)
  loss_scale.update(all_finite)
  return gradients, all_finite


def measurements(
  model: tf.Module, optimizer, loss_scale, total_loss, per_head_losses, gradients, all_finite
) -> Dict[str, tf.Tensor]:
  """What the step reports besides its new state (all scalars, float32).

  Losses are this replica's share (the runner sums them over replicas); norms, the loss scale
  and the learning rate are the same on every replica (the runner averages them).
  """
  result = {
    "loss/total": total_loss,
    # Inf/NaN on a skipped step, which is what happened (no masked copy of 29M gradients).
    "norm/gradients": tf.linalg.global_norm(gradients),
    "norm/parameters": tf.linalg.global_norm(model.trainable_variables),
    "loss_scale": tf.convert_to_tensor(loss_scale.scale, tf.float32),
    "update_applied": tf.cast(all_finite, tf.float32),
    "learning_rate": tf.convert_to_tensor(optimizer.learning_rate, tf.float32),
  }
  for head, head_loss in enumerate(per_head_losses, start=1):
    result[f"loss/head{head}"] = head_loss
  return result


def train_step(
  model: tf.Module,
  optimizer,
  loss_scale,
  batch: Batch,
  loss_fn: Callable,
  head_weights: Sequence[float],
  global_batch_size: int,
) -> Dict[str, tf.Tensor]:
  """One optimisation step on this replica's share of the global batch.

  Args:
    model: DoubleUNet (or any module returning a sequence of logits).
    optimizer: dunet.optim optimizer (applies already-reduced gradients).
    loss_scale: dunet.precision loss scale (a no-op one for float32/bfloat16).
    batch: {"image": [b, H, W, 3], "mask": [b, H, W, 1]}.
    loss_fn: a dunet.losses.HeadsLoss (`losses.make_heads_loss(name, reduction)`), or a
      per-example loss from logits (e.g. dunet.losses.binary_cross_entropy), which is reduced
      per image.
    head_weights: deep-supervision weight per head.
    global_batch_size: batch size summed over replicas.

  Returns:
    Measurements: losses, gradient and parameter norms, loss scale, whether the update was
    applied, learning rate.
  """
  scaled_gradients, total_loss, per_head_losses = compute_gradients(
    model, loss_scale, batch, loss_fn, head_weights, global_batch_size
  )
  gradients, all_finite = apply_gradients(model, optimizer, loss_scale, scaled_gradients)
  return measurements(
    model, optimizer, loss_scale, total_loss, per_head_losses, gradients, all_finite
  )


def eval_step(
  model: tf.Module,
  batch: Batch,
  loss_fn: Callable,
  head_weights: Sequence[float],
  threshold: float = 0.5,
) -> Dict[str, tf.Tensor]:
  """Inference-mode losses and per-image confusion counts for both heads.

  Runs on one device over the whole validation set (in cross-replica context a mirrored model reads
  its variables, and the replicas' BatchNorm statistics are averaged), so the losses are means over
  this batch; the runner weights them by the batch size.

  Returns:
    {"loss/total", "loss/head1", "loss/head2"}: batch means; {"counts/head1", "counts/head2"}:
    [b, 4] (tp, fp, fn, tn) per image at `threshold`, accumulated by the runner in numpy; and
    {"probability/head1", "probability/head2"}: [b, H, W, 1] for pictures.
  """
  batch_size = tf.shape(batch["image"])[0]
  outputs, total_loss, per_head_losses = compute_loss(
    model, batch, loss_fn, head_weights, batch_size, is_training=False
  )
  result = {"loss/total": total_loss}
  for head, (logits, head_loss) in enumerate(zip(outputs, per_head_losses), start=1):
    result[f"loss/head{head}"] = head_loss
    probabilities = tf.sigmoid(logits)
    result[f"probability/head{head}"] = probabilities
    result[f"counts/head{head}"] = metrics.confusion_counts(probabilities, batch["mask"], threshold)
  return result
