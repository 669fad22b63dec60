"""Direct dilated convolution vs its space-to-batch form, on the ASPP shapes, forward + backward.

  python -m profiling.bench_dilated_conv [--record]

dunet.nn.conv runs dilated convolutions as space-to-batch + ordinary convolution when no GPU is
visible, because some CPU kernels (TF_ENABLE_ONEDNN_OPTS=0, or float16 without AVX-512) have no
dilated-convolution gradient. This measures what that costs or saves on this machine: both forms
of the ASPP's 3x3 convolutions (rates 6, 12, 18; 512 -> 64 channels, as network 1 uses them)
at the bottleneck sizes of 128x128, 256x256 and 384x512 inputs, batch 4.
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app
from absl import flags
import tensorflow as tf

FLAGS = flags.FLAGS
flags.DEFINE_integer("channels_in", 512, "Input channels (network 1's ASPP sees 512).")
flags.DEFINE_integer("channels_out", 64, "Output channels (the ASPP's filters).")
flags.DEFINE_integer("batch", 4, "Batch size.")
flags.DEFINE_integer("repeats", 10, "Timed calls per measurement (median reported).")
flags.DEFINE_bool("record", False, "Append the table to profiling/results/dilated_conv.md.")


def _direct(x, kernel, rate):
  return tf.nn.conv2d(x, kernel, 1, "SAME", dilations=rate)


def _space_to_batch(x, kernel, rate):
  return tf.nn.with_space_to_batch(
    x,
    [rate, rate],
    "SAME",
    lambda inputs, num_spatial_dims, padding: tf.nn.conv2d(inputs, kernel, 1, padding),
    filter_shape=kernel.shape[:2],
  )


def _median_ms(form, x, kernel, rate) -> float:
  @tf.function
  def step(x, kernel):
    with tf.GradientTape() as tape:
      tape.watch([x, kernel])
      loss = tf.reduce_sum(form(x, kernel, rate))
    return tape.gradient(loss, [x, kernel])

  tf.nest.map_structure(lambda t: t.numpy(), step(x, kernel))
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    tf.nest.map_structure(lambda t: t.numpy(), step(x, kernel))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main(argv):
  del argv
  rows = [
    "| input | bottleneck | rate | direct ms | space-to-batch ms |",
    "| --- | --- | --- | --- | --- |",
  ]
  kernel = tf.random.normal([3, 3, FLAGS.channels_in, FLAGS.channels_out])
  for height, width in ((128, 128), (256, 256), (384, 512)):
    x = tf.random.normal([FLAGS.batch, height // 16, width // 16, FLAGS.channels_in])
    for rate in (6, 12, 18):
      if rate >= min(height, width) // 16:
        continue  # dunet drops taps that only read padding: a 1x1 convolution, no dilation
      direct = _median_ms(_direct, x, kernel, rate)
      converted = _median_ms(_space_to_batch, x, kernel, rate)
      rows.append(
        f"| {height}x{width} | {height // 16}x{width // 16} | {rate} | {direct:.2f} | "
        f"{converted:.2f} |"
      )
  table = "\n".join(rows)
  print(table)
  if FLAGS.record:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dilated_conv.md")
    new = not os.path.exists(path)
    with open(path, "a") as handle:
      if new:
        handle.write("# Dilated convolution: direct vs space-to-batch (forward + backward)\n\n")
      handle.write(
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, TensorFlow "
        f"{tf.__version__}, load {os.getloadavg()[0]:.2f}\n"
        f"`python -m profiling.bench_dilated_conv --record`\n\n{table}\n\n"
      )


if __name__ == "__main__":
  app.run(main)
