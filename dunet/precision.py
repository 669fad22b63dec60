"""Mixed precision: the dtype policy and explicit dynamic loss scaling.

Variables always stay float32; a policy only chooses the dtype of the arithmetic. float16 has a
narrow exponent range, so small gradients underflow to zero: the loss is multiplied by a large
scale before differentiation and the gradients divided by it afterwards. The scale is dynamic, as
in Keras 2: it starts at 2**15, doubles after `growth_interval` consecutive steps with finite
gradients, and halves (never below `min_scale`) on a step whose gradients overflowed; that step is
skipped (the caller gates the optimizer with `all_finite`).

The order that keeps replicas in agreement (dunet/step.py):
  scaled = loss_scale.scale_loss(loss); grads = d scaled / d weights;
  grads = all_reduce(grads); grads = loss_scale.unscale(grads);
  finite = loss_scale.all_finite(grads)   # same on every replica: the grads were reduced first
  optimizer.apply(grads, weights, should_apply=finite); loss_scale.update(finite)

bfloat16 has float32's exponent range and float32 needs no scaling; both use NoOpLossScale, which
has the same interface so the step has a single code path. It still reports non-finite gradients,
so a NaN step is skipped in every precision.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import tensorflow as tf

_COMPUTE_DTYPES: Dict[str, tf.DType] = {
  "float32": tf.float32,
  "mixed_float16": tf.float16,
  "mixed_bfloat16": tf.bfloat16,
}
POLICY_NAMES = tuple(_COMPUTE_DTYPES)
# What --precision=auto resolves to on this machine (default_policy_name).
AUTO = "auto"
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

Gradients = Sequence[Optional[tf.Tensor]]


def default_policy_name(
  gpus: Optional[Sequence[object]] = None, cpu_flags: Optional[Sequence[str]] = None
) -> str:
  """The precision `--precision=auto` picks, from measurements (profiling/results/bench.md).

  CPU with bfloat16 instructions (avx512_bf16 or amx_bf16): "mixed_bfloat16", which trained
  DoubleU-Net 1.7x faster than float32 at 128x128 on the 2-core AVX512_BF16 machine the numbers
  come from. Any other CPU: "float32" (no bfloat16 hardware, and float16 CPU kernels are slow).
  GPUs: "float32" as well, because nothing was measured on a GPU here; on tensor-core GPUs
  measure "mixed_float16" with profiling/bench.py and pass it explicitly.

  Args:
    gpus: the visible GPUs (default: tf.config.list_physical_devices("GPU")).
    cpu_flags: the CPU's feature flags (default: read from /proc/cpuinfo; empty elsewhere).

  Returns:
    One of POLICY_NAMES.
  """
  if gpus is None:
    gpus = tf.config.list_physical_devices("GPU")
  if gpus:
    return "float32"
  if cpu_flags is None:
    cpu_flags = _read_cpu_flags()
  return "mixed_bfloat16" if any(f in cpu_flags for f in _CPU_BF16_FLAGS) else "float32"


def resolve_policy_name(name: str) -> str:
  """`name`, or for "auto" the machine's default_policy_name()."""
  return default_policy_name() if name == AUTO else name


def _read_cpu_flags() -> List[str]:
  try:
    with open("/proc/cpuinfo") as handle:
      for line in handle:
        if line.startswith("flags"):
          return line.split(":", 1)[1].split()
  except OSError:
    pass
  return []


class Policy:
  """Which dtype the model computes in; variables are always float32."""

  def __init__(self, name: str):
    """Args:
      name: "float32", "mixed_float16" or "mixed_bfloat16".

    Raises:
      ValueError: for an unknown name, listing the valid ones.
    """
    if name not in _COMPUTE_DTYPES:
      raise ValueError(f"unknown precision policy {name!r}; valid names: {', '.join(POLICY_NAMES)}")
    self.name = name

  @property
  def compute_dtype(self) -> tf.DType:
    return _COMPUTE_DTYPES[self.name]

  @property
  def variable_dtype(self) -> tf.DType:
    return tf.float32

  @property
  def needs_loss_scaling(self) -> bool:
    """True for float16 only (bfloat16 has float32's exponent range)."""
    return self.compute_dtype == tf.float16

  def __repr__(self) -> str:
    return f"Policy({self.name!r})"


def all_finite(grads: Gradients) -> tf.Tensor:
  """Scalar bool: every element of every gradient (None ignored) is finite."""
  checks = [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
  if not checks:
    return tf.constant(True)
  return tf.reduce_all(tf.stack(checks))


class NoOpLossScale(tf.Module):
  """Loss scale 1 (float32, bfloat16): same interface as DynamicLossScale, no state to update."""

  def __init__(self, name: str = "no_op_loss_scale"):
    super().__init__(name=name)
    self.scale = tf.constant(1.0, tf.float32)

  def scale_loss(self, loss: tf.Tensor) -> tf.Tensor:
    return loss

  def unscale(self, grads: Gradients) -> List[Optional[tf.Tensor]]:
    """Casts gradients to float32 (None stays None)."""
    return [None if g is None else tf.cast(g, tf.float32) for g in grads]

  def all_finite(self, grads: Gradients) -> tf.Tensor:
    """Scalar bool; call it on all-reduced gradients so every replica decides the same."""
    return all_finite(grads)

  def update(self, finite: tf.Tensor) -> None:
    del finite


class DynamicLossScale(tf.Module):
  """Keras-2-style dynamic loss scale with its state in tf.Variables (checkpointed)."""

  def __init__(
    self,
    initial_scale: float = 2.0**15,
    growth_interval: int = 2000,
    factor: float = 2.0,
    min_scale: float = 1.0,
    name: str = "dynamic_loss_scale",
  ):
    """Creates the state under the current distribution strategy.

    Args:
      initial_scale: starting scale.
      growth_interval: consecutive finite steps after which the scale is multiplied by factor.
      factor: growth and shrink factor (> 1; a power of two keeps scaling exact).
      min_scale: the scale never shrinks below this.
      name: module name.
    """
    super().__init__(name=name)
    if not 0 < min_scale <= initial_scale:
      raise ValueError(
        f"need 0 < min_scale <= initial_scale, got min_scale={min_scale}, "
        f"initial_scale={initial_scale}"
      )
    if growth_interval < 1:
      raise ValueError(f"growth_interval must be at least 1, got {growth_interval}")
    if factor <= 1:
      raise ValueError(f"factor must be greater than 1, got {factor}")
    self.growth_interval = int(growth_interval)
    self.factor = float(factor)
    self.min_scale = float(min_scale)
    with tf.distribute.get_strategy().scope():
      # ONLY_FIRST_REPLICA (synchronised on write): `update` assigns from replica context, where
      # every replica holds the same value; the first replica's is written to all copies.
      self.scale = tf.Variable(
        float(initial_scale),
        dtype=tf.float32,
        trainable=False,
        name="scale",
        synchronization=tf.VariableSynchronization.ON_WRITE,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
      )
      self.good_steps = tf.Variable(
        0,
        dtype=tf.int64,
        trainable=False,
        name="good_steps",
        synchronization=tf.VariableSynchronization.ON_WRITE,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
      )

  def scale_loss(self, loss: tf.Tensor) -> tf.Tensor:
    """loss × scale, in the loss's dtype."""
    return loss * tf.cast(self.scale, loss.dtype)

  def unscale(self, grads: Gradients) -> List[Optional[tf.Tensor]]:
    """Gradients of the scaled loss → float32 gradients of the loss (None stays None)."""
    inverse = 1.0 / tf.convert_to_tensor(self.scale)
    return [None if g is None else tf.cast(g, tf.float32) * inverse for g in grads]

  def all_finite(self, grads: Gradients) -> tf.Tensor:
    """Scalar bool; call it on all-reduced gradients so every replica decides the same."""
    return all_finite(grads)

  def update(self, finite: tf.Tensor) -> None:
    """Grows or shrinks the scale after a step.

    finite: good_steps + 1; when that reaches growth_interval the scale is multiplied by factor
    (unless the product would overflow float32) and good_steps restarts at 0.
    not finite: scale ← max(scale / factor, min_scale) and good_steps ← 0.

    Written with tf.where and unconditional assignments (no tf.cond) so it works in replica
    context under any strategy: a synchronised assignment inside a cond branch is not supported
    there.

    Args:
      finite: scalar bool, the same on every replica.
    """
    finite = tf.convert_to_tensor(finite, tf.bool)
    scale = tf.convert_to_tensor(self.scale)
    good_steps = tf.convert_to_tensor(self.good_steps) + 1
    grown = scale * self.factor
    grow = finite & (good_steps >= self.growth_interval)
    shrunk = tf.maximum(scale / self.factor, self.min_scale)
    new_scale = tf.where(finite, tf.where(grow & tf.math.is_finite(grown), grown, scale), shrunk)
    new_good_steps = tf.where(finite & ~grow, good_steps, tf.zeros_like(good_steps))
    self.scale.assign(new_scale)
    self.good_steps.assign(new_good_steps)


LossScale = Union[DynamicLossScale, NoOpLossScale]


def make_loss_scale(
  policy: Union[Policy, str], initial_scale: float = 2.0**15, growth_interval: int = 2000, **kwargs
) -> LossScale:
  """DynamicLossScale for mixed_float16, NoOpLossScale otherwise (create under the strategy scope).

  Args:
    policy: a Policy or its name.
    initial_scale, growth_interval, **kwargs: DynamicLossScale arguments (ignored without
      float16).
  """
  if isinstance(policy, str):
    policy = Policy(policy)
  if policy.needs_loss_scaling:
    return DynamicLossScale(initial_scale=initial_scale, growth_interval=growth_interval, **kwargs)
  return NoOpLossScale()
