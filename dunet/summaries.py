"""TensorBoard summaries: scalars and image overlays of predictions on inputs."""

from __future__ import annotations

from typing import Dict, Mapping

import numpy as np
import tensorflow as tf


def write_scalars(writer: tf.summary.SummaryWriter, step: int, values: Mapping[str, float]) -> None:
  """Writes each value as a scalar summary named by its key at `step`."""
  with writer.as_default(step=step):
    for name, value in values.items():
      tf.summary.scalar(name, float(value))


def overlay(
  images_uint8: np.ndarray, masks: np.ndarray, color=(0, 255, 0), alpha: float = 0.45
) -> np.ndarray:
  """Blends a binary mask onto RGB images in a colour, and draws nothing where the mask is 0.

  Args:
    images_uint8: [B, H, W, 3] uint8 RGB.
    masks: [B, H, W] or [B, H, W, 1], values in [0, 1] (thresholded at 0.5).
    color: RGB colour of the mask.
    alpha: opacity of the colour.

  Returns:
    [B, H, W, 3] uint8.
  """
  masks = np.asarray(masks)
  if masks.ndim == 4:
    masks = masks[..., 0]
  binary = (masks >= 0.5)[..., None]
  blended = (1 - alpha) * images_uint8.astype(np.float32) + alpha * np.asarray(color, np.float32)
  return np.where(binary, blended, images_uint8).astype(np.uint8)


def prediction_panel(
  images_uint8: np.ndarray, true_masks: np.ndarray, head1: np.ndarray, head2: np.ndarray
) -> np.ndarray:
  """One row per image: input | ground truth | head 1 | head 2 (overlays), [B, H, 4W, 3] uint8."""
  columns = [
    images_uint8,
    overlay(images_uint8, true_masks, (0, 255, 0)),
    overlay(images_uint8, head1, (255, 160, 0)),
    overlay(images_uint8, head2, (255, 0, 0)),
  ]
  return np.concatenate(columns, axis=2)


def write_images(
  writer: tf.summary.SummaryWriter, step: int, name: str, images: np.ndarray, max_outputs: int = 4
) -> None:
  """Writes uint8 [B, H, W, 3] images."""
  with writer.as_default(step=step):
    tf.summary.image(name, images, max_outputs=max_outputs)


def flatten_for_log(values: Dict[str, float]) -> str:
  return " ".join(f"{key}={value:.4f}" for key, value in sorted(values.items()))
