"""Helpers shared by the losses/metrics/optim/precision/distribute tests."""

import tensorflow as tf

from dunet import distribute

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
