"""Training and inference throughput, memory and MFU of DoubleU-Net on this machine.

  python -m profiling.bench --height=128 --width=128 --batch=4 --steps=10 \
      --precision=float32 --jit_compile=false

Times the exact training function dunet.train runs (built by dunet.builder: dunet.runner over
dunet.step.train_step) on a fixed synthetic batch, so the input pipeline is not measured
(profiling/bench_input.py does that); with --steps_per_loop=N, the loop function
dunet-train --steps_per_loop=N runs (N steps per call on the same batch repeated). Inference
is timed as dunet serves it, with the BatchNorms folded into the convolutions
(--nofold_batch_norm: the unfolded model).
After warm-up, `--windows` windows of `--steps` steps are timed and the median reported.
MFU = analytic training FLOPs per image (3 x the forward FLOPs of the traced convolutions) x
images/s, over the peak convolution throughput measured in the same run with one large
tf.nn.conv2d in the same precision.

The last line printed is one JSON object (other tools parse it) with at least train_images_per_s,
infer_images_per_s, peak_rss_mb and mfu. --record appends a row to
profiling/results/bench.md and writes the JSON next to it.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from typing import Callable, Dict, Optional

from absl import app
from absl import flags
import tensorflow as tf

from dunet import builder
from dunet import flops
from dunet import folding
from dunet import losses
from dunet import precision

from profiling.machine import machine_description

FLAGS = flags.FLAGS
# The optimizer the timed training step applies (its cost is in the step).
OPTIMIZER, LEARNING_RATE = "nadam", 1e-5
flags.DEFINE_integer("height", 128, "Input height (divisible by 16).")
flags.DEFINE_integer("width", 128, "Input width (divisible by 16).")
flags.DEFINE_integer(
  "batch", 4, "Training batch size (inference uses the same, plus batch 1 for latency)."
)
flags.DEFINE_integer("steps", 10, "Steps per timed window.")
flags.DEFINE_integer("windows", 3, "Timed windows; the median is reported.")
flags.DEFINE_integer("warmup", 2, "Untimed steps first (tracing, compilation).")
flags.DEFINE_enum(
  "precision",
  "float32",
  [precision.AUTO, *precision.POLICY_NAMES],
  "Compute precision (auto: what dunet.train's --precision=auto picks here).",
)
flags.DEFINE_bool("jit_compile", False, "Compile the training step (and inference) with XLA.")
flags.DEFINE_integer(
  "steps_per_loop",
  1,
  "Training steps per tf.function call, as dunet-train --steps_per_loop: a window of --steps "
  "steps is --steps / N calls of the loop function (N must divide --steps).",
  lower_bound=1,
)
flags.DEFINE_bool(
  "fold_batch_norm",
  True,
  "Time inference as dunet serves it, with the BatchNorms folded into the convolutions "
  "(dunet/folding.py); --nofold_batch_norm times the unfolded model.",
)
flags.DEFINE_bool(
  "record",
  False,
  "Append the result to profiling/results/bench.md and save its JSON under profiling/results/.",
)
flags.DEFINE_string("note", "", "Free text stored with a recorded result (what changed).")
flags.DEFINE_string(
  "results_dir",
  os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
  "Where --record writes bench.md and the JSON files.",
)


def timed_windows(function: Callable[[], object], steps: int, windows: int) -> list:
  """Seconds per window of `steps` calls; each window ends when its last result is ready."""
  durations = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(steps):
      result = function()
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, result)
    durations.append(time.perf_counter() - start)
  return durations


def peak_conv_flops_per_second(dtype: tf.DType, jit_compile: bool) -> float:
  """Throughput of one large 3x3 convolution (256 -> 256 channels, 8 x 64 x 64), FLOP/s."""
  images = tf.random.normal([8, 64, 64, 256], dtype=tf.float32)
  kernel = tf.random.normal([3, 3, 256, 256], dtype=tf.float32)
  images, kernel = tf.cast(images, dtype), tf.cast(kernel, dtype)
  conv = tf.function(lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"), jit_compile=jit_compile)
  conv(images, kernel).numpy()
  count = 5
  seconds = statistics.median(timed_windows(lambda: conv(images, kernel), count, 3))
  conv_flops = 2 * 8 * 64 * 64 * 256 * 3 * 3 * 256
  return conv_flops * count / seconds


def make_bench_train_function(
  parts: builder.TrainingParts,
  batch_size: int,
  jit_compile: bool,
  strategy: Optional[tf.distribute.Strategy] = None,
) -> Callable[[Dict[str, tf.Tensor]], Dict[str, tf.Tensor]]:
  """The training function this benchmark times: dunet.train's, with BCE on both heads.

  Also used by profiling/bench_vs_reference.py, so both time the same step.

  Args:
    parts: from builder.build_training_parts.
    batch_size: images per step (the loss divisor).
    jit_compile: compile the step with XLA.
    strategy: the strategy `parts` were built under (default: the current one).

  Returns:
    tf.function(batch) -> measurements ("loss/total", ...).
  """
  return builder.make_train_function(
    parts,
    loss_fn=losses.binary_cross_entropy,
    head_weights=(1.0, 1.0),
    global_batch_size=batch_size,
    strategy=strategy,
    jit_compile=jit_compile,
  )


def loop_train_function(
  parts: builder.TrainingParts,
  batch: Dict[str, tf.Tensor],
  steps_per_loop: int,
  strategy: tf.distribute.Strategy,
) -> Callable[[Dict[str, tf.Tensor]], Dict[str, tf.Tensor]]:
  """A stand-in for the training function that runs `steps_per_loop` steps per call on `batch`
  repeated: dunet-train --steps_per_loop's loop function (dunet.builder), same step."""
  loop = builder.make_train_loop_function(
    parts,
    loss_fn=losses.binary_cross_entropy,
    head_weights=(1.0, 1.0),
    global_batch_size=FLAGS.batch,
    strategy=strategy,
    jit_compile=FLAGS.jit_compile,
  )
  batches = iter(
    strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat())
  )
  rates = tf.fill([steps_per_loop], float(parts.optimizer.learning_rate.numpy()))
  count = tf.constant(steps_per_loop, tf.int32)
  return lambda unused_batch: loop(batches, rates, count)[0]


def synthetic_batch(batch_size: int, height: int, width: int) -> Dict[str, tf.Tensor]:
  """The fixed batch this benchmark trains on: uniform images, masks about 30% ones.

  Drawn from TensorFlow's global random generator (seed it first for a repeatable batch).

  Returns:
    {"image": [B, H, W, 3] float32, "mask": [B, H, W, 1] float32 of 0 and 1}.
  """
  shape = [batch_size, height, width]
  return {
    "image": tf.random.uniform(shape + [3]),
    "mask": tf.cast(tf.random.uniform(shape + [1]) > 0.7, tf.float32),
  }


def run_benchmark() -> Dict[str, object]:
  tf.random.set_seed(0)
  policy = precision.Policy(precision.resolve_policy_name(FLAGS.precision))
  strategy = tf.distribute.get_strategy()
  parts = builder.build_training_parts(policy, OPTIMIZER, LEARNING_RATE, strategy=strategy)
  model = parts.model
  train_function = make_bench_train_function(parts, FLAGS.batch, FLAGS.jit_compile, strategy)
  batch = synthetic_batch(FLAGS.batch, FLAGS.height, FLAGS.width)

  calls_per_window = FLAGS.steps // FLAGS.steps_per_loop
  if FLAGS.steps_per_loop > 1:
    train_function = loop_train_function(parts, batch, FLAGS.steps_per_loop, strategy)
  compile_start = time.perf_counter()
  for _ in range(FLAGS.warmup):
    train_function(batch)["loss/total"].numpy()
  warmup_seconds = time.perf_counter() - compile_start
  train_windows = timed_windows(lambda: train_function(batch), calls_per_window, FLAGS.windows)
  train_images_per_s = FLAGS.batch * FLAGS.steps / statistics.median(train_windows)

  served = folding.fold_batch_norms(model) if FLAGS.fold_batch_norm else model
  infer = tf.function(
    lambda images: served(images, is_training=False).logits2, jit_compile=FLAGS.jit_compile
  )
  infer(batch["image"]).numpy()
  infer_windows = timed_windows(lambda: infer(batch["image"]), FLAGS.steps, FLAGS.windows)
  infer_images_per_s = FLAGS.batch * FLAGS.steps / statistics.median(infer_windows)
  single = batch["image"][:1]
  infer(single).numpy()
  latency_ms = 1e3 * statistics.median(timed_windows(lambda: infer(single), 1, 2 * FLAGS.steps))

  peak = peak_conv_flops_per_second(policy.compute_dtype, FLAGS.jit_compile)
  training_flops = flops.training_flops_per_image(model, FLAGS.height, FLAGS.width)
  return {
    "height": FLAGS.height,
    "width": FLAGS.width,
    "batch": FLAGS.batch,
    "precision": policy.name,
    "jit_compile": FLAGS.jit_compile,
    "steps_per_loop": FLAGS.steps_per_loop,
    "batch_norm_folded_for_inference": FLAGS.fold_batch_norm,
    "train_images_per_s": round(train_images_per_s, 3),
    "train_windows_s": [round(w, 3) for w in train_windows],
    "warmup_s": round(warmup_seconds, 2),
    "infer_images_per_s": round(infer_images_per_s, 3),
    "infer_latency_ms_batch1": round(latency_ms, 2),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "training_gflop_per_image": round(training_flops / 1e9, 2),
    "peak_conv_gflop_per_s": round(peak / 1e9, 1),
    "mfu": round(training_flops * train_images_per_s / peak, 4),
    "machine": machine_description(),
    "load_average_1min": round(os.getloadavg()[0], 2),
    "command": " ".join(["python", "-m", "profiling.bench"] + sys.argv[1:]),
  }


def record(result: Dict[str, object], results_dir: str) -> None:
  """Writes bench-<config>.json (this run) and appends a row to bench.md in `results_dir`."""
  os.makedirs(results_dir, exist_ok=True)
  tag = (
    f"{result['height']}x{result['width']}-b{result['batch']}-{result['precision']}-"
    f"jit{int(result['jit_compile'])}"
  ) + (f"-loop{result['steps_per_loop']}" if result["steps_per_loop"] > 1 else "")
  note = (
    f"{FLAGS.note} (steps_per_loop {result['steps_per_loop']}; inference "
    f"{'folded' if result['batch_norm_folded_for_inference'] else 'unfolded'})"
  ).strip()
  with open(os.path.join(results_dir, f"bench-{tag}.json"), "w") as handle:
    json.dump(dict(result, note=note), handle, indent=2)
  table = os.path.join(results_dir, "bench.md")
  if not os.path.exists(table):
    with open(table, "w") as handle:
      handle.write(
        "# profiling/bench.py results\n\nEach row: one run of the command shown, on the "
        "machine shown (load = 1-minute load average when it finished).\n\n"
        "| size | batch | precision | jit | train img/s | infer img/s | latency ms "
        "(b=1) | peak RSS MB | MFU | load | note | command | machine |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
      )
  with open(table, "a") as handle:
    handle.write(
      f"| {result['height']}x{result['width']} | {result['batch']} | "
      f"{result['precision']} | {result['jit_compile']} | "
      f"{result['train_images_per_s']} | {result['infer_images_per_s']} | "
      f"{result['infer_latency_ms_batch1']} | {result['peak_rss_mb']} | "
      f"{result['mfu']} | {result['load_average_1min']} | {note} | "
      f"`{result['command']}` | {result['machine']} |\n"
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.height % 16 or FLAGS.width % 16:
    raise app.UsageError("--height and --width must be divisible by 16")
  if FLAGS.steps % FLAGS.steps_per_loop:
    raise app.UsageError(
      f"--steps_per_loop={FLAGS.steps_per_loop} must divide --steps={FLAGS.steps}"
    )
  result = run_benchmark()
  if FLAGS.record:
    record(result, FLAGS.results_dir)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
