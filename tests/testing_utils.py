"""Helpers shared by several test files."""

import contextlib
import os
import socket
from typing import Dict, Iterator, List

import numpy as np
import tensorflow as tf

from dunet import distribute
from dunet.config import TrainConfig
from dunet.data.augment import AugmentConfig
from dunet.data import preprocess
from dunet.models import DoubleUNet

# TensorFlow's own tests space collective keys this far apart (strategy_combinations.py).
_COLLECTIVE_KEY_STRIDE = 100_000


def mirrored_strategy_without_merge_call(monkeypatch) -> tf.distribute.MirroredStrategy:
  """A 2-CPU MirroredStrategy that behaves as it does in an XLA-compiled step on GPUs.

  There `strategy.extended._use_merge_call()` is False: synchronised updates run directly in
  replica context, and all-reduces always use collective ops. Collective keys restart at the same
  number in every strategy, so each strategy made here gets its own key range (as TensorFlow's
  tests do); otherwise two tests' all-reduces of different shapes clash in the runtime.
  """
  tf.distribute.MirroredStrategy._collective_key_base += _COLLECTIVE_KEY_STRIDE
  strategy = distribute.make_strategy("mirrored")
  # Strategies created later (elsewhere, with the class default) must not share this range.
  tf.distribute.MirroredStrategy._collective_key_base += _COLLECTIVE_KEY_STRIDE
  monkeypatch.setattr(strategy.extended, "_use_merge_call", lambda: False)
  return strategy


def calibrated_model(pictures: np.ndarray, seed: int) -> DoubleUNet:
  """A random DoubleU-Net whose masks of `pictures`-like inputs are about half foreground, with
  few probabilities near 0.5.

  Both heads' kernels are scaled up (sharper probabilities) and their biases centred on the
  median logit of `pictures` (uint8 RGB at the model size, "unit" preprocessing), head 1 first
  since it feeds network 2. Evaluation and prediction tests need such masks: an untrained net's
  are all one value.
  """
  tf.random.set_seed(seed)
  model = DoubleUNet()
  inputs = preprocess.preprocess(pictures, "unit")
  for head in (model.head1, model.head2):
    head.kernel.assign(head.kernel * 400.0)
  for name, head in (("logits1", model.head1), ("logits2", model.head2)):
    logits = getattr(model(inputs, is_training=False), name).numpy()
    head.bias.assign(head.bias - float(np.median(logits)))
  return model


def event_scalars(event_dir, tag: str) -> Dict[int, float]:
  """{step: value} of one scalar written to the TensorBoard event files in `event_dir`."""
  values = {}
  for name in sorted(os.listdir(event_dir)):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(event_dir, name)):
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


@contextlib.contextmanager
def reserved_ports(count: int) -> Iterator[List[int]]:
  """Yields `count` free localhost TCP ports that stay reserved until the block ends.

  Each port is held by a bound (not listening) socket with SO_REUSEADDR and SO_REUSEPORT set, so
  no other process's bind(port 0) is handed it, while a gRPC server (which sets SO_REUSEPORT
  itself, as TensorFlow's multi-worker servers do) can still bind it. Binding, closing and
  reusing a port instead leaves a window in which another test or process can take it. The
  sockets do not listen: a listening one would share the server's incoming connections.

  Args:
    count: how many ports.

  Yields:
    The port numbers, all different.
  """
  sockets = []
  try:
    for _ in range(count):
      reserving = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      sockets.append(reserving)
      reserving.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      reserving.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
      reserving.bind(("localhost", 0))
    yield [reserving.getsockname()[1] for reserving in sockets]
  finally:
    for reserving in sockets:
      reserving.close()


def small_train_config(data_dir, **overrides) -> TrainConfig:
  """A TrainConfig with test-sized settings (batch 4, 2 epochs, float32, no augmentation),
  changed by setting name (`epochs=3`; `augment=True` for the default augmentation)."""
  settings = dict(
    data_dir=str(data_dir),
    batch_size=4,
    epochs=2,
    learning_rate=1e-3,
    optimizer="adam",
    lr_schedule="constant",
    batch_norm_momentum=0.9,
    seed=7,
    log_every_steps=1,
    summary_images=2,
    augment=AugmentConfig.none(),
    preprocessing="unit",
    precision="float32",
  )
  settings.update(overrides)
  if settings["augment"] is True:
    settings["augment"] = AugmentConfig()
  return TrainConfig().updated(**settings)
