r"""Input-pipeline throughput: images/s from TFRecords to augmented, preprocessed batches.

Draws demo pictures at the asked size, prepares them (outside the timing), then iterates the
training dataset for --seconds after a warm-up and reports images per second, for the default
augmentation and for every augmentation at probability 1 (the worst case). With --record the
result is appended to profiling/results/input_pipeline.md with the command and the machine.

Example:
  python -m profiling.bench_input --height=384 --width=512 --batch=16 --seconds=20 --record
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shlex
import sys
import tempfile
import time

from absl import app
from absl import flags

from dunet.data import demo, pipeline, prepare
from dunet.data.augment import AugmentConfig
from profiling.machine import machine_description

FLAGS = flags.FLAGS
flags.DEFINE_integer("height", 384, "Image height.")
flags.DEFINE_integer("width", 512, "Image width.")
flags.DEFINE_integer("batch", 16, "Global batch size.")
flags.DEFINE_float("seconds", 20.0, "Measured time per configuration (after warm-up).")
flags.DEFINE_integer("images", 64, "Demo pictures to prepare (the dataset repeats them).")
flags.DEFINE_string("preprocessing", "reference", "Preprocessing mode.")
flags.DEFINE_bool("deterministic", True, "Deterministic order of parallel map results.")
flags.DEFINE_bool("record", False, "Append the result to profiling/results/input_pipeline.md.")

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "input_pipeline.md")


def full_augmentation() -> AugmentConfig:
  """Every augmentation, every time."""
  return dataclasses.replace(
    AugmentConfig(),
    **{
      field.name: 1.0 for field in dataclasses.fields(AugmentConfig) if field.name.startswith("p_")
    },
  )


def measure(data_dir: str, config: AugmentConfig) -> float:
  dataset = pipeline.make_train_dataset(
    data_dir,
    global_batch_size=FLAGS.batch,
    preprocessing=FLAGS.preprocessing,
    augment_config=config,
    seed=0,
    deterministic=FLAGS.deterministic,
  )
  iterator = iter(dataset)
  warm_up_until = time.perf_counter() + min(5.0, FLAGS.seconds / 2)
  while time.perf_counter() < warm_up_until:
    next(iterator)
  images, start = 0, time.perf_counter()
  while time.perf_counter() - start < FLAGS.seconds:
    images += int(next(iterator)["image"].shape[0])
  return images / (time.perf_counter() - start)


def main(argv) -> None:
  del argv
  with tempfile.TemporaryDirectory() as scratch:
    raw = demo.generate_demo_dataset(
      os.path.join(scratch, "raw"),
      count=FLAGS.images,
      height=FLAGS.height,
      width=FLAGS.width,
      seed=0,
    )
    data_dir = os.path.join(scratch, "prepared")
    prepare.prepare_dataset(
      raw,
      data_dir,
      height=FLAGS.height,
      width=FLAGS.width,
      valid_fraction=0.0,
      test_fraction=0.0,
      progress=False,
    )
    results = {
      name: measure(data_dir, config)
      for name, config in (
        ("none", AugmentConfig.none()),
        ("default", AugmentConfig()),
        ("full", full_augmentation()),
      )
    }
  machine = machine_description()
  line = (
    f"| {FLAGS.height}x{FLAGS.width} | {FLAGS.batch} | {FLAGS.preprocessing} | "
    f"{results['none']:.1f} | {results['default']:.1f} | {results['full']:.1f} |"
  )
  print(
    f"{machine}\nimages/s at {FLAGS.height}x{FLAGS.width}, batch {FLAGS.batch}: "
    + ", ".join(f"{name} augmentation {value:.1f}" for name, value in results.items())
  )
  if FLAGS.record:
    command = "python -m profiling.bench_input " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    new_file = not os.path.exists(RESULTS)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "a") as handle:
      if new_file:
        handle.write("# Input pipeline throughput\n\n")
      handle.write(
        f"\n{datetime.date.today().isoformat()}, {machine}\n`{command}`\n\n"
        "| size | batch | preprocessing | images/s, no augmentation | "
        "default augmentation | every augmentation (p=1) |\n"
        "| --- | --- | --- | --- | --- | --- |\n" + line + "\n"
      )


if __name__ == "__main__":
  app.run(main)
