"""Precise BatchNorm statistics: population mean and variance recomputed over training batches.

Training moves each BatchNorm's statistics towards the batch moments by an exponential moving
average (momentum 0.99 in the reference). After n steps those still hold 0.99^n of their initial
values (13 % after 200 steps) and average moments of weights that have since changed, so a
short run evaluated in inference mode can predict nonsense while the same weights with batch
statistics are good. Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", section 3)
recomputes, for the current weights, the true population statistics of every BatchNorm's input:

  the model runs in training mode (each layer normalised by its batch's moments, as during
  training) over N batches; every BatchNorm's batch mean m_b and biased variance v_b are
  recorded (nothing moves); the population statistics are the pooled ones,
      mean = E_b[m_b],   variance = E_b[v_b] + E_b[(m_b - mean)^2]
  (the variance of all the pixels seen, within and between batches), written into the moving
  statistics, which inference reads and checkpoints keep.

Under a distribution strategy each replica normalises its own share of the global batch
(dunet's BatchNorm is not synchronised, as Keras'), so every replica's share is one of the
pooled batches: the replicas' means and variances are averaged and the spread of their means
is added, all-reduced inside the step so that multi-worker runs pool over every worker.
Moments are pooled on the host in float64, so no precision is lost to the subtraction.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from dunet.nn.batch_norm import BatchNorm, recording_moments

MOVING, PRECISE = "moving", "precise"
STATISTICS_CHOICES = (MOVING, PRECISE)


def batch_norms(model: tf.Module) -> List[BatchNorm]:
  """Every BatchNorm inside `model`, in tf.Module's (deterministic) traversal order."""
  found = [module for module in model.submodules if isinstance(module, BatchNorm)]
  if isinstance(model, BatchNorm):
    found.insert(0, model)
  return found


@dataclasses.dataclass(frozen=True)
class RecomputeSummary:
  """What `recompute_statistics` did: batches and images pooled, layers set, seconds taken."""

  batches: int
  images: int
  layers: int
  seconds: float


def make_moments_function(
  model: tf.Module, strategy: Optional[tf.distribute.Strategy] = None
) -> Callable[[object], Dict[str, List[tf.Tensor]]]:
  """A tf.function(batch) -> each BatchNorm's pooled moments over the batch's replicas.

  Args:
    model: called as model(images, is_training=True); a batch is an image tensor or a dict
      with "image" (per replica, or a distributed value of `strategy`).
    strategy: where the model's variables live (default: the current strategy).

  Returns:
    The function; it returns {"mean": [...], "variance": [...], "images": scalar}: per
    BatchNorm (order of `batch_norms`) the mean over replicas of the batch means, and of the
    batch variances plus the squared deviation of each replica's mean from that mean; "images"
    is the number of images over all replicas.
  """
  strategy = strategy or tf.distribute.get_strategy()
  norms = batch_norms(model)
  if not norms:
    raise ValueError(f"{type(model).__name__} has no BatchNorm layers")
  position = {id(norm): index for index, norm in enumerate(norms)}

  def replica_moments(batch):
    images = batch["image"] if isinstance(batch, dict) else batch
    with recording_moments() as recorder:
      model(images, is_training=True)
    means: List[Optional[tf.Tensor]] = [None] * len(norms)
    variances: List[Optional[tf.Tensor]] = [None] * len(norms)
    for norm, mean, variance in recorder.records:
      index = position.get(id(norm))
      if index is None or means[index] is not None:
        raise ValueError(
          f"BatchNorm {norm.name} is not a layer of the model or was called "
          "twice in one forward pass: its population statistics are undefined"
        )
      means[index], variances[index] = mean, variance
    unused = [norms[i].name for i, mean in enumerate(means) if mean is None]
    if unused:
      raise ValueError(f"BatchNorm layers not called in training mode: {unused[:5]}")
    # One flat vector for all layers: one collective, whatever the strategy.
    own_means = tf.concat(means, axis=0)
    variances = tf.concat(variances, axis=0)
    common_means = own_means
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
      # The replicas' common mean, so each can add its own mean's squared deviation from it.
      common_means = context.all_reduce(tf.distribute.ReduceOp.MEAN, own_means)
    spread = variances + tf.square(own_means - common_means)
    images_here = tf.cast(tf.shape(images)[0], tf.float32)
    return {"mean": common_means, "variance": spread, "images": images_here}

  sizes = [norm.num_channels for norm in norms]

  @tf.function
  def moments(batch):
    per_replica = strategy.run(replica_moments, args=(batch,))
    pooled = {
      name: tf.split(
        strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica[name], axis=None), sizes
      )
      for name in ("mean", "variance")
    }
    pooled["images"] = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica["images"], axis=None)
    return pooled

  return moments


def pool_moments(
  means: List[np.ndarray], variances: List[np.ndarray]
) -> Tuple[np.ndarray, np.ndarray]:
  """Pools equally weighted batches' moments: (mean of means, mean of variances + spread of means).

  Args:
    means: per batch, [C] float batch means.
    variances: per batch, [C] biased batch variances.

  Returns:
    (mean, variance) float64 [C].
  """
  stacked_means = np.asarray(means, np.float64)
  mean = stacked_means.mean(axis=0)
  variance = np.asarray(variances, np.float64).mean(axis=0) + np.square(stacked_means - mean).mean(
    axis=0
  )
  return mean, variance


def recompute_statistics(
  model: tf.Module,
  batches: Iterable[object],
  *,
  strategy: Optional[tf.distribute.Strategy] = None,
  moments_function: Optional[Callable] = None,
) -> RecomputeSummary:
  """Sets every BatchNorm's moving statistics to its population statistics over `batches`.

  Args:
    model: the model (its weights are not changed; only the BatchNorm statistics are).
    batches: full batches of preprocessed images (tensors [B, H, W, 3] or dicts with "image";
      distributed values under `strategy`), all of the same size, each weighing the same.
    strategy: where the model's variables live (default: the current strategy).
    moments_function: from `make_moments_function(model, strategy)`, to reuse its trace.

  Returns:
    A RecomputeSummary.

  Raises:
    ValueError: `batches` is empty, or the model's BatchNorms are not all used once.
  """
  started = time.monotonic()
  strategy = strategy or tf.distribute.get_strategy()
  moments = moments_function or make_moments_function(model, strategy)
  norms = batch_norms(model)
  per_layer_means: List[List[np.ndarray]] = [[] for _ in norms]
  per_layer_variances: List[List[np.ndarray]] = [[] for _ in norms]
  images = 0
  for batch in batches:
    result = moments(batch)
    images += int(result["images"].numpy())
    for index, (mean, variance) in enumerate(zip(result["mean"], result["variance"])):
      per_layer_means[index].append(mean.numpy())
      per_layer_variances[index].append(variance.numpy())
  count = len(per_layer_means[0])
  if count == 0:
    raise ValueError("no batches to recompute the BatchNorm statistics from")
  for norm, means, variances in zip(norms, per_layer_means, per_layer_variances):
    mean, variance = pool_moments(means, variances)
    norm.moving_mean.assign(mean.astype(np.float32))
    norm.moving_variance.assign(variance.astype(np.float32))
  return RecomputeSummary(
    batches=count, images=images, layers=len(norms), seconds=time.monotonic() - started
  )
