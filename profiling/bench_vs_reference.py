r"""dunet against the authors' Keras network, timed side by side in one process.

  python -m profiling.bench_vs_reference --height=128 --width=128 --batch=4 --windows=3 \
      --seconds=3 --warmup=1 --precisions=float32,mixed_bfloat16 --record

(those are the defaults). Smoke test, about 2 minutes:
  python -m profiling.bench_vs_reference --height=32 --width=32 --batch=1 --windows=2 \
      --seconds=0 --steps=1 --measures=inference,latency

Run from the repository root (the Keras oracle lives in tests/keras_reference.py, so the test
extras must be installed). The Keras reference model gets random weights everywhere (BatchNorm
statistics included), is saved as HDF5 and converted into dunet with dunet.keras_h5: both
networks hold the SAME weights and see the SAME synthetic batch (profiling.bench's). Before any
timing, the head-2 probabilities of every dunet form are compared with Keras' (max |difference|
in the table; over the tolerance the run fails).

Timed windows alternate: dunet, Keras, dunet, Keras, ... (every contender of a row group in turn),
so that noise from other work on the machine falls on both. Each window runs calls for --seconds
(at least one call; --seconds=0: --steps calls), every call waiting for its result; --warmup
untimed calls of each contender come first (tracing). A row reports images/s (or milliseconds)
as the median over --windows windows, and dunet/Keras as the ratio of speeds (> 1: dunet faster).

Rows, per precision (--precisions; each Keras model is built under
keras.mixed_precision.set_global_policy(precision), each dunet model with that compute dtype):
  inference bB      dunet folded (dunet.folding.fold_batch_norms, the form dunet.serving
                    serves; inference mode, one tf.function returning both heads' probabilities)
                    against Keras `model.predict(x, batch_size=B)`, and against a plain
                    `tf.function(lambda x: model(x, training=False))`; dunet unfolded (same
                    tf.function, BatchNorms kept) against the plain call: the folding gain.
  latency b1        one image: the median milliseconds per call of dunet folded and the Keras
                    plain call; the ratio is Keras ms / dunet ms.
  training bB       dunet's exact training function (profiling.bench's: dunet.builder over
                    dunet.step, Nadam, BCE on both heads) against Keras `train_on_batch` in a
                    loop (fit's own train function, compiled as the reference train.py does:
                    Nadam, BCE on both sigmoid heads at once).

--measures picks row groups (inference, latency, training; the outputs are always compared).
On a GPU machine, float32, mixed_float16 and XLA side by side:
  python -m profiling.bench_vs_reference --precisions=float32,mixed_float16 --record
  python -m profiling.bench_vs_reference --precisions=float32,mixed_float16 --jit_compile --record
(mixed_float16 is refused where TensorFlow sees no GPU: on a CPU it would time an emulation.)
The XLA setting (--jit_compile) is applied to both sides (Keras' own default on a CPU is off).
On a CPU without bfloat16 instructions (AVX2 only) mixed_bfloat16 is emulated and slow for both:
its rows measure that emulation. Cost on the 2-core AVX2 EPYC, measured under a load average of
5 with one-call windows: float32 ~6 minutes, mixed_bfloat16 ~19 (its training steps took ~150 s
each at 128x128 batch 4, and tracing each training graph 1-3 minutes), 14 CPU-minutes in all:
on a quiet machine the default run should take roughly 8-14 minutes, more than the 5-8 aimed
at, because emulated bfloat16 training is that slow; --precisions=float32 takes about a third.

The last line printed is one JSON object (rows, ratios by "precision/row", output agreement);
--record appends a section (command, date, machine, oneDNN, versions, table) to
--results_dir/bench_vs_reference.md. The flags shared with profiling/bench.py (--height,
--width, --batch, --steps, --windows, --warmup, --jit_compile, --note, --results_dir) mean the
same here; its --precision is replaced by --precisions.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import keras
import numpy as np
import tensorflow as tf

from dunet import builder
from dunet import folding
from dunet import keras_h5
from dunet import precision
from dunet.models import DoubleUNet
from dunet.nn import conv as conv_lib
from profiling import bench
from profiling.machine import machine_description
from tests import keras_reference

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(bench)
flags.DEFINE_list(
  "precisions",
  ["float32", "mixed_bfloat16"],
  f"Precisions to compare, in order (from {', '.join(precision.POLICY_NAMES)}).",
)
flags.DEFINE_list(
  "measures",
  ["inference", "latency", "training"],
  "Row groups to measure, from inference, latency, training (outputs are always compared).",
)
# One untimed call (it traces) is enough here: windows alternate and the median drops a slow
# first window, and each emulated-bfloat16 training step costs about a minute on 2 AVX2 cores.
FLAGS.set_default("warmup", 1)
flags.DEFINE_float(
  "seconds",
  3.0,
  "Seconds per timed window (each window makes at least one call); 0: --steps calls per window.",
  lower_bound=0.0,
)

RESULTS_FILE = "bench_vs_reference.md"
# Largest max |dunet - Keras| of the head-2 probabilities accepted (same weights, same images).
# float32: two implementations of the same maths round differently (~1e-6 seen, converter tests
# hold 1e-5). bfloat16 keeps 8 bits of mantissa, and the two networks round at different places.
AGREEMENT_TOLERANCE = {"float32": 1e-3, "mixed_float16": 5e-2, "mixed_bfloat16": 1e-1}
KERAS_TRAINING = "train_on_batch"
MEASURES = ("inference", "latency", "training")


class DisagreementError(RuntimeError):
  """dunet and Keras, holding the same weights, compute different outputs: nothing to time."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a run measures (built from the flags in `main`)."""

  height: int = 128
  width: int = 128
  batch: int = 4
  windows: int = 3
  seconds: float = 3.0
  steps: int = 10  # calls per window when seconds == 0
  warmup: int = 1
  precisions: Tuple[str, ...] = ("float32", "mixed_bfloat16")
  jit_compile: bool = False
  measures: Tuple[str, ...] = MEASURES


@dataclasses.dataclass
class Row:
  """One comparison: a dunet form against a Keras form."""

  key: str  # stable name in the JSON ratios: "<precision>/<key>"
  measure: str  # "inference b4", "latency b1", "training b4"
  precision: str
  dunet: str
  dunet_value: float
  keras: str
  keras_value: float
  unit: str  # "img/s" or "ms"
  ratio: float  # dunet speed / Keras speed (> 1: dunet faster)
  max_abs_difference: Optional[float] = None  # of the head-2 probabilities
  dunet_warmup_s: float = 0.0  # the untimed first calls (tracing)
  keras_warmup_s: float = 0.0


# ---------------------------------------------------------------------------------------------
# Timing.


def window_durations(function: Callable[[], object], settings: Settings) -> List[float]:
  """Seconds of each call in one window (`function` returns once its result is ready).

  The window lasts `settings.seconds` (at least one call), or `settings.steps` calls when that
  is 0.
  """
  durations: List[float] = []
  start = time.perf_counter()
  while True:
    call_start = time.perf_counter()
    function()
    end = time.perf_counter()
    durations.append(end - call_start)
    if settings.seconds > 0:
      if end - start >= settings.seconds:
        return durations
    elif len(durations) >= settings.steps:
      return durations


@dataclasses.dataclass
class Timings:
  """What `alternate` measured, by contender name."""

  warmup_seconds: Dict[str, float]  # all untimed calls together (tracing included)
  windows: Dict[str, List[List[float]]]  # per-call seconds of each timed window


def alternate(contenders: Dict[str, Callable[[], object]], settings: Settings) -> Timings:
  """Warms every contender up, then times `settings.windows` rounds of one window each.

  Args:
    contenders: {name: function making one call and waiting for its result}.
    settings: windows, their length (seconds or steps) and the warm-up calls (at least one).

  Returns:
    The timings; windows ran in the order A, B, ..., A, B, ... (dict order).
  """
  warmup_seconds = {}
  for name, function in contenders.items():
    start = time.perf_counter()
    for _ in range(max(settings.warmup, 1)):
      function()
    warmup_seconds[name] = time.perf_counter() - start
    logging.info("warm-up of %s: %.1f s", name, warmup_seconds[name])
  windows: Dict[str, List[List[float]]] = {name: [] for name in contenders}
  for _ in range(settings.windows):
    for name, function in contenders.items():
      windows[name].append(window_durations(function, settings))
  return Timings(warmup_seconds, windows)


def images_per_second(windows: Sequence[Sequence[float]], batch: int) -> float:
  """The median over windows of batch x calls / seconds."""
  return statistics.median(batch * len(calls) / sum(calls) for calls in windows)


def median_milliseconds(windows: Sequence[Sequence[float]]) -> float:
  """The median duration of all calls of all windows, in milliseconds."""
  return 1e3 * statistics.median(d for calls in windows for d in calls)


# ---------------------------------------------------------------------------------------------
# The two networks with the same weights.


@dataclasses.dataclass
class Reference:
  """The Keras reference's weights, as an HDF5 file (for dunet) and as arrays (for Keras)."""

  h5_path: str
  weights: List[np.ndarray]


def make_reference(settings: Settings, directory: str) -> Reference:
  """Builds the float32 Keras reference with random weights (seed 0) and saves it as HDF5."""
  keras.utils.clear_session()  # layer names from conv2d, batch_normalization...: the converter
  model = keras_reference.build_reference_model(settings.height, settings.width)
  keras_reference.randomize_weights(model, seed=0)
  path = os.path.join(directory, "reference.h5")
  model.save(path)
  return Reference(path, model.get_weights())


def keras_model_in(policy_name: str, reference: Reference, settings: Settings) -> keras.Model:
  """The reference network built under the Keras dtype policy `policy_name`, same weights."""
  keras.utils.clear_session()
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(policy_name)
  try:
    model = keras_reference.build_reference_model(settings.height, settings.width)
  finally:
    keras.mixed_precision.set_global_policy(previous)
  model.set_weights(reference.weights)
  model.jit_compile = settings.jit_compile
  return model


def dunet_model_in(policy: precision.Policy, reference: Reference) -> DoubleUNet:
  """A DoubleUNet computing in the policy's dtype, holding the reference's weights."""
  model = DoubleUNet(compute_dtype=policy.compute_dtype)
  keras_h5.load_keras_h5(model, reference.h5_path)
  return model


def _max_difference(dunet_head2: np.ndarray, keras_output: np.ndarray) -> float:
  keras_head2 = np.asarray(keras_output, np.float32)[..., 1]
  return float(np.max(np.abs(np.asarray(dunet_head2, np.float32)[..., 0] - keras_head2)))


# ---------------------------------------------------------------------------------------------
# The measurements of one precision.


def _row(key: str, measure: str, policy_name: str, timings: Timings, pair, **values) -> Row:
  """A Row for the contenders `pair` = (dunet name, Keras name) of `timings`."""
  dunet_name, keras_name = pair
  return Row(
    key=key,
    measure=measure,
    precision=policy_name,
    dunet_warmup_s=timings.warmup_seconds[dunet_name],
    keras_warmup_s=timings.warmup_seconds[keras_name],
    **values,
  )


class Contenders:
  """Both networks of one precision with the same weights, and the calls that are timed."""

  def __init__(self, policy_name: str, reference: Reference, settings: Settings):
    self.policy_name = policy_name
    self.settings = settings
    self.policy = precision.Policy(policy_name)
    self.keras_model = keras_model_in(policy_name, reference, settings)
    tf.random.set_seed(0)
    self.model = dunet_model_in(self.policy, reference)
    self.folded = folding.fold_batch_norms(self.model)
    self.batch = bench.synthetic_batch(settings.batch, settings.height, settings.width)
    self.images = self.batch["image"]
    self.images_np = self.images.numpy()
    self.dunet_folded = self._probabilities(self.folded)
    self.dunet_unfolded = self._probabilities(self.model)
    self.keras_plain = tf.function(
      lambda x: self.keras_model(x, training=False), jit_compile=settings.jit_compile
    )

  def _probabilities(self, network: tf.Module) -> Callable[[tf.Tensor], object]:
    return tf.function(
      lambda x: network(x, is_training=False).probabilities(),
      jit_compile=self.settings.jit_compile,
    )

  def keras_predict(self, images: np.ndarray) -> np.ndarray:
    return self.keras_model.predict(images, batch_size=images.shape[0], verbose=0)

  def agreement(self) -> Dict[str, float]:
    """{"<dunet form>_vs_<Keras form>": max |head-2 probability difference|} on the batch.

    Raises:
      DisagreementError: over AGREEMENT_TOLERANCE.
    """
    images = self.images
    folded = self.dunet_folded(images).logits2.numpy()
    plain = self.keras_plain(images).numpy()
    differences = {
      "folded_vs_predict": _max_difference(folded, self.keras_predict(self.images_np)),
      "folded_vs_plain": _max_difference(folded, plain),
      "unfolded_vs_plain": _max_difference(self.dunet_unfolded(images).logits2.numpy(), plain),
    }
    tolerance = AGREEMENT_TOLERANCE[self.policy_name]
    if max(differences.values()) > tolerance:
      raise DisagreementError(
        f"{self.policy_name}: dunet's head-2 probabilities differ from the Keras reference's by "
        f"{differences} (tolerance {tolerance}) with the same weights and images: a conversion "
        "or folding bug; the timings would compare different computations"
      )
    return differences

  def inference_rows(self, differences: Dict[str, float]) -> List[Row]:
    images, images_np, batch = self.images, self.images_np, self.settings.batch
    timings = alternate(
      {
        "folded": lambda: _fetch(self.dunet_folded(images)),
        "predict": lambda: self.keras_predict(images_np),
        "unfolded": lambda: _fetch(self.dunet_unfolded(images)),
        "plain": lambda: self.keras_plain(images).numpy(),
      },
      self.settings,
    )
    speed = {name: images_per_second(w, batch) for name, w in timings.windows.items()}
    rows = []
    for dunet_form, keras_form, keras_label in (
      ("folded", "predict", f"predict(batch_size={batch})"),
      ("folded", "plain", "tf.function call"),
      ("unfolded", "plain", "tf.function call"),
    ):
      rows.append(
        _row(
          f"inference_{dunet_form}_vs_{keras_form}",
          f"inference b{batch}",
          self.policy_name,
          timings,
          (dunet_form, keras_form),
          dunet=dunet_form,
          dunet_value=speed[dunet_form],
          keras=keras_label,
          keras_value=speed[keras_form],
          unit="img/s",
          ratio=speed[dunet_form] / speed[keras_form],
          max_abs_difference=differences[f"{dunet_form}_vs_{keras_form}"],
        )
      )
    return rows

  def latency_row(self) -> Row:
    single = self.images[:1]
    timings = alternate(
      {
        "folded": lambda: _fetch(self.dunet_folded(single)),
        "plain": lambda: self.keras_plain(single).numpy(),
      },
      self.settings,
    )
    latency = {name: median_milliseconds(w) for name, w in timings.windows.items()}
    return _row(
      "latency_folded_vs_plain",
      "latency b1",
      self.policy_name,
      timings,
      ("folded", "plain"),
      dunet="folded",
      dunet_value=latency["folded"],
      keras="tf.function call",
      keras_value=latency["plain"],
      unit="ms",
      ratio=latency["plain"] / latency["folded"],
    )

  def training_row(self) -> Row:
    """Changes both models' weights: measure it last."""
    settings = self.settings
    parts = builder.build_training_parts(
      self.policy, bench.OPTIMIZER, bench.LEARNING_RATE, make_model=lambda **_: self.model
    )
    train_function = bench.make_bench_train_function(parts, settings.batch, settings.jit_compile)
    keras_model = self.keras_model
    keras_reference.compile_for_training(keras_model, bench.OPTIMIZER, bench.LEARNING_RATE, "bce")
    keras_model.jit_compile = settings.jit_compile
    targets = keras_reference.both_heads(self.batch["mask"].numpy())
    timings = alternate(
      {
        "dunet": lambda: train_function(self.batch)["loss/total"].numpy(),
        "keras": lambda: keras_model.train_on_batch(self.images_np, targets),
      },
      settings,
    )
    speed = {name: images_per_second(w, settings.batch) for name, w in timings.windows.items()}
    return _row(
      "training",
      f"training b{settings.batch}",
      self.policy_name,
      timings,
      ("dunet", "keras"),
      dunet="train function",
      dunet_value=speed["dunet"],
      keras=KERAS_TRAINING,
      keras_value=speed["keras"],
      unit="img/s",
      ratio=speed["dunet"] / speed["keras"],
    )


def _fetch(outputs) -> None:
  tf.nest.map_structure(lambda t: t.numpy(), outputs)


def measure_precision(
  policy_name: str, reference: Reference, settings: Settings
) -> Tuple[List[Row], Dict[str, float]]:
  """The agreement check, then the rows of `settings.measures`, for one precision.

  Returns:
    (rows, {"<dunet form>_vs_<Keras form>": max |head-2 probability difference|}).

  Raises:
    DisagreementError: when a dunet form's head 2 is further than AGREEMENT_TOLERANCE from
      Keras'.
  """
  contenders = Contenders(policy_name, reference, settings)
  differences = contenders.agreement()
  logging.info("%s: outputs agree: %s", policy_name, differences)
  rows: List[Row] = []
  if "inference" in settings.measures:
    rows.extend(contenders.inference_rows(differences))
  if "latency" in settings.measures:
    rows.append(contenders.latency_row())
  if "training" in settings.measures:
    rows.append(contenders.training_row())
  return rows, differences


def run(settings: Settings, command: str) -> Dict[str, object]:
  """Measures every precision of `settings`; returns the result (the JSON line's object)."""
  rows: List[Row] = []
  agreement: Dict[str, float] = {}
  with tempfile.TemporaryDirectory() as directory:
    reference = make_reference(settings, directory)
    for policy_name in settings.precisions:
      precision_rows, differences = measure_precision(policy_name, reference, settings)
      rows.extend(precision_rows)
      agreement.update({f"{policy_name}/{k}": v for k, v in differences.items()})
  return {
    "height": settings.height,
    "width": settings.width,
    "batch": settings.batch,
    "windows": settings.windows,
    "seconds": settings.seconds,
    "steps": settings.steps,
    "warmup": settings.warmup,
    "precisions": list(settings.precisions),
    "jit_compile": settings.jit_compile,
    "measures": list(settings.measures),
    "keras_training": KERAS_TRAINING,
    "rows": [dataclasses.asdict(row) for row in rows],
    "ratios": {f"{row.precision}/{row.key}": round(row.ratio, 4) for row in rows},
    "max_abs_difference": agreement,
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "load_average_1min": round(os.getloadavg()[0], 2),
    "machine": machine_description(),
    "onednn": onednn_enabled(),
    "tensorflow": tf.__version__,
    "keras": keras.__version__,
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "command": command,
  }


def onednn_enabled() -> bool:
  """Whether TensorFlow runs its oneDNN CPU kernels in this process."""
  return conv_lib._onednn_enabled()  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------
# Output.


def _number(value: float) -> str:
  return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def table(result: Dict[str, object]) -> str:
  """The rows as a Markdown table."""
  lines = [
    "| measure | precision | dunet form | dunet | Keras form | Keras | dunet/Keras (speed) "
    "| max \\|dunet - Keras\\| head-2 prob. | warm-up s dunet / Keras |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for row in result["rows"]:
    difference = row["max_abs_difference"]
    lines.append(
      f"| {row['measure']} | {row['precision']} | {row['dunet']} | "
      f"{_number(row['dunet_value'])} {row['unit']} | {row['keras']} | "
      f"{_number(row['keras_value'])} {row['unit']} | {row['ratio']:.2f} | "
      f"{'' if difference is None else f'{difference:.1e}'} | "
      f"{row['dunet_warmup_s']:.1f} / {row['keras_warmup_s']:.1f} |"
    )
  return "\n".join(lines)


def record(result: Dict[str, object], results_dir: str, note: str = "") -> str:
  """Appends a section for `result` to `results_dir`/bench_vs_reference.md; returns its path."""
  os.makedirs(results_dir, exist_ok=True)
  path = os.path.join(results_dir, RESULTS_FILE)
  if not os.path.exists(path):
    with open(path, "w") as handle:
      handle.write(
        "# profiling/bench_vs_reference.py results\n\n"
        "dunet against the authors' Keras network (tests/keras_reference.py), same weights and "
        "batch, timed in alternating windows in one process; what each row means is in the "
        "module docstring. dunet/Keras is a ratio of speeds: above 1, dunet is faster.\n"
      )
  window = f"{result['seconds']} s" if result["seconds"] else f"{result['steps']} call(s)"
  lines = [
    f"## {result['date']}: {result['height']}x{result['width']}, batch {result['batch']}, "
    f"{', '.join(result['precisions'])}",
    "",
    f"- command: `{result['command']}`",
    f"- machine: {result['machine']}; oneDNN {'on' if result['onednn'] else 'off'}; "
    f"1-minute load average at the end {result['load_average_1min']}",
    f"- TensorFlow {result['tensorflow']}, Keras {result['keras']}; XLA "
    f"{'on' if result['jit_compile'] else 'off'} on both sides; Keras training: "
    f"`{result['keras_training']}` in a loop",
    f"- {result['windows']} timed windows of {window} per contender, alternating, after "
    f"{result['warmup']} untimed call(s) each; peak RSS {result['peak_rss_mb']} MB",
  ]
  if note:
    lines.append(f"- note: {note}")
  with open(path, "a") as handle:
    handle.write("\n" + "\n".join(lines) + "\n\n" + table(result) + "\n")
  return path


def settings_from_flags() -> Settings:
  """Settings from the command line (call only in `main`, after flag parsing)."""
  return Settings(
    height=FLAGS.height,
    width=FLAGS.width,
    batch=FLAGS.batch,
    windows=FLAGS.windows,
    seconds=FLAGS.seconds,
    steps=FLAGS.steps,
    warmup=FLAGS.warmup,
    precisions=tuple(FLAGS.precisions),
    jit_compile=FLAGS.jit_compile,
    measures=tuple(FLAGS.measures),
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.height % 16 or FLAGS.width % 16:
    raise app.UsageError("--height and --width must be divisible by 16")
  if FLAGS["precision"].present:
    raise app.UsageError("use --precisions (a list) here; --precision is profiling.bench's")
  unknown = [name for name in FLAGS.precisions if name not in precision.POLICY_NAMES]
  if unknown or not FLAGS.precisions:
    raise app.UsageError(
      f"--precisions: unknown {unknown}; choose from {', '.join(precision.POLICY_NAMES)}"
    )
  if "mixed_float16" in FLAGS.precisions and not tf.config.list_physical_devices("GPU"):
    # TF's CPU kernels compute float16 convolutions through float32 conversions and have no
    # float16 dilated-convolution gradient: such a row would time an emulation, not the GPU path.
    raise app.UsageError(
      "mixed_float16 is a GPU precision: no GPU is visible to TensorFlow here. On a GPU "
      "machine: --precisions=float32,mixed_float16 (and once more with --jit_compile)"
    )
  if not set(FLAGS.measures) <= set(MEASURES):
    raise app.UsageError(f"--measures: choose from {', '.join(MEASURES)}")
  if FLAGS.windows < 1 or FLAGS.steps < 1:
    raise app.UsageError("--windows and --steps must be at least 1")
  command = " ".join(["python", "-m", "profiling.bench_vs_reference"] + sys.argv[1:])
  result = run(settings_from_flags(), command)
  print(table(result))
  if FLAGS.record:
    print(f"recorded in {record(result, FLAGS.results_dir, FLAGS.note)}")
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
