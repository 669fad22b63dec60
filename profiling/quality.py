r"""Quality side by side with the reference Keras code: profiling/results/quality.md.

  python -m profiling.quality --data=demo --steps=100,200,400 \
      [--recipes=keras,reference,paper,improved]
      [--seeds=42] [--record] [--note=...] [--reference_model_py=PATH/model.py]

Run from the repository root with the test extras (Keras: the oracle) and, for --data=nuclei,
the quality extra (`pip install -e ".[test,quality]"`; profiling/quality_data.py says what the
data sets are). For each data set, budget (optimisation steps) and seed it trains:

  keras      the authors' network in Keras (tests/keras_reference.py, or their model.py with
             --reference_model_py) compiled and fitted as their train.py does: one loss over
             both heads and the batch, Keras Nadam/Adam at a constant learning rate, validation
             every epoch, the last weights kept;
  reference  dunet with the same recipe (`--loss_reduction=reference --lr_schedule=constant
             --noaugment --batch_norm_statistics=moving`, float32) from the SAME initial weights
             (the Keras model's, converted) on the SAME batches (both read dunet's input
             pipeline with the same seed);
  paper      the reference recipe with dunet's precise BatchNorm statistics (what the paper
             configs, configs/base.flags, run): the same weights step for step as `reference`
             (the statistics pass only reads training batches), evaluated with statistics
             recomputed before each validation and kept in the checkpoints;
  improved   dunet's improved recipe (configs/improved.flags) from its own initialisation.

The shared settings are the paper's DSB 2018 recipe: Dice, Nadam, learning rate 1e-4, the
reference preprocessing, batch 8. Every model is scored the same way: `python -m dunet.evaluate`
on the test split (per-image DSC of each head at the original resolution, threshold 0.5; for
dunet runs also the best-validation checkpoint). One row per run; --record appends them to
profiling/results/quality.md with the command and the machine. The training wall time includes
each framework's per-epoch validation. Runs are subprocesses; their logs stay in --work_dir.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from absl import app
from absl import flags

from profiling import machine
from profiling import quality_data

RECIPES = ("keras", "reference", "paper", "improved")

FLAGS = flags.FLAGS
flags.DEFINE_enum("data", "demo", sorted(quality_data.BUILDERS), "The data set.")
flags.DEFINE_list("steps", ["100", "200", "400"], "Budgets: optimisation steps per run.")
flags.DEFINE_list("recipes", list(RECIPES), f"Which trainings to run ({', '.join(RECIPES)}).")
flags.DEFINE_list("seeds", ["42"], "Seeds (initialisation and data order) to run each with.")
flags.DEFINE_integer("batch_size", 8, "Global batch size of every run.")
flags.DEFINE_string("optimizer", "nadam", "The shared recipe's optimizer (adam or nadam).")
flags.DEFINE_float("learning_rate", 1e-4, "The shared recipe's constant learning rate.")
flags.DEFINE_string("loss", "dice", "The shared recipe's loss (bce, dice, bce_dice).")
flags.DEFINE_string("preprocessing", "reference", "The shared recipe's preprocessing.")
flags.DEFINE_string(
  "improved_flagfile", os.path.join("configs", "improved.flags"), "dunet's improved recipe."
)
flags.DEFINE_list(
  "improved_extra",
  [],
  "Flags added to the improved recipe (an ablation, e.g. "
  "--improved_extra=--augment); the rows name them.",
)
flags.DEFINE_string(
  "reference_model_py",
  None,
  "The authors' model.py: build their network "
  "with its build_model(shape) instead of the oracle (it asks Keras for the "
  "ImageNet VGG19 weights, which must then be in ~/.keras/models).",
)
flags.DEFINE_string("work_dir", "/tmp/dunet-quality", "Data, runs and logs.")
flags.DEFINE_bool(
  "reuse_keras",
  False,
  "Keep a finished Keras run of the same data, budget and "
  "seed found in --work_dir (its weights, initial weights and time) instead of "
  "training it again: for adding dunet recipes beside a recorded Keras row.",
)
flags.DEFINE_bool("record", False, "Append the rows to --results_dir/quality.md.")
flags.DEFINE_string("note", "", "Free text stored with recorded rows.")
flags.DEFINE_string(
  "results_dir", os.path.join("profiling", "results"), "Where --record writes quality.md."
)
flags.DEFINE_integer("timeout_s", 4 * 3600, "Give up on one training after this long.")
# The Keras worker (run by this program in a subprocess).
flags.DEFINE_string("keras_worker", None, "Internal: train the Keras model into this folder.")
flags.DEFINE_string("data_dir", None, "Internal: the prepared data (--keras_worker).")
flags.DEFINE_integer("max_steps", 0, "Internal: steps (--keras_worker).")
flags.DEFINE_integer("seed", 42, "Internal: seed (--keras_worker).")

RESULTS_FILE = "quality.md"
_HEADER = """# Quality side by side with the reference Keras code

Each row: one training run by `python -m profiling.quality` (the command is in the row), scored
by `python -m dunet.evaluate` on the test split: per-image DSC at the original resolution,
threshold 0.5, of head 2 (the final mask) and head 1. "last" = the weights after the last step
(what the reference code keeps); "best" = dunet's best-validation-DSC checkpoint. keras = the
authors' network and train.py recipe in Keras; reference = dunet with the same recipe, from the
same initial weights, on the same batches; paper = the same with precise BatchNorm statistics
(configs/base.flags: the same weights, statistics recomputed); improved = dunet's improved recipe
(configs/improved.flags). Shared recipe unless the row says otherwise: Dice, Nadam 1e-4
constant, reference preprocessing, no augmentation. Train s = training wall time, per-epoch
validation included (load = 1-minute load average at the end: other work slows a run).

| date | data | steps | batch | seed | recipe | test DSC head 2 (last) | head 2 (best) | head 1 (last) | train s | load | note | command | machine |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
"""


@dataclasses.dataclass
class Row:
  data: str
  steps: int
  batch: int
  seed: int
  recipe: str
  head2_last: float
  head2_best: Optional[float]
  head1_last: float
  train_seconds: float
  first_loss: Optional[float] = None  # the loss of step 1: the same for keras and reference


def first_step_loss(workdir: str) -> Optional[float]:
  """The training loss dunet.train logged at step 1 (TensorBoard events)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  folder = os.path.join(workdir, "train")
  for name in sorted(os.listdir(folder)):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
      for value in event.summary.value:
        if event.step == 1 and value.tag == "loss/total":
          return float(tf.make_ndarray(value.tensor))
  return None


def _run(command: Sequence[str], log_path: str, timeout_s: int) -> float:
  """Runs a command with its output in `log_path`; returns its wall time; raises on failure."""
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  started = time.perf_counter()
  with open(log_path, "w") as log:
    completed = subprocess.run(
      list(command), stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False
    )
  seconds = time.perf_counter() - started
  if completed.returncode:
    with open(log_path) as log:
      tail = log.read()[-3000:]
    raise RuntimeError(
      f"{' '.join(command)} failed (exit {completed.returncode}); log {log_path}:\n{tail}"
    )
  return seconds


def evaluate(
  checkpoint: str, data_dir: str, out_dir: str, prefer: str = "latest"
) -> Dict[str, float]:
  """Test-split per-image DSC of head 2 and head 1 by dunet.evaluate."""
  _run(
    [
      sys.executable,
      "-m",
      "dunet.evaluate",
      f"--checkpoint={checkpoint}",
      f"--data_dir={data_dir}",
      "--split=test",
      f"--out_dir={out_dir}",
      f"--prefer={prefer}",
      "--noprogress",
    ],
    out_dir + ".log",
    FLAGS.timeout_s,
  )
  with open(os.path.join(out_dir, "metrics.json")) as handle:
    report = json.load(handle)
  return {head: report["metrics"][head]["per_image"]["dsc"] for head in ("head1", "head2")}


def shared_training_flags() -> List[str]:
  return [
    f"--batch_size={FLAGS.batch_size}",
    f"--optimizer={FLAGS.optimizer}",
    f"--learning_rate={FLAGS.learning_rate}",
    f"--loss={FLAGS.loss}",
    f"--preprocessing={FLAGS.preprocessing}",
  ]


def train_keras(data_dir: str, run_dir: str, steps: int, seed: int) -> Row:
  command = [
    sys.executable,
    "-m",
    "profiling.quality",
    f"--keras_worker={run_dir}",
    f"--data_dir={data_dir}",
    f"--max_steps={steps}",
    f"--seed={seed}",
    *shared_training_flags(),
  ]
  if FLAGS.reference_model_py:
    command.append(f"--reference_model_py={FLAGS.reference_model_py}")
  finished = os.path.join(run_dir, "result.json")
  if FLAGS.reuse_keras and os.path.exists(finished):
    print(f"Reusing the Keras run in {run_dir} (--reuse_keras)", flush=True)
  else:
    _run(command, run_dir + ".log", FLAGS.timeout_s)
  with open(finished) as handle:
    result = json.load(handle)
  scores = evaluate(
    os.path.join(run_dir, "final"), data_dir, os.path.join(run_dir, "eval"), prefer="best"
  )
  return Row(
    FLAGS.data,
    steps,
    FLAGS.batch_size,
    seed,
    "keras",
    scores["head2"],
    None,
    scores["head1"],
    result["train_seconds"],
    result["first_loss"],
  )


def train_dunet(
  data_dir: str, run_dir: str, steps: int, seed: int, recipe: str, keras_initial: Optional[str]
) -> Row:
  command = [
    sys.executable,
    "-m",
    "dunet.train",
    f"--data_dir={data_dir}",
    f"--workdir={run_dir}",
    f"--max_steps={steps}",
    "--epochs=100000",
    f"--seed={seed}",
    "--keep_checkpoints=1",
    "--log_every_steps=1",
  ]
  if recipe in ("reference", "paper"):
    statistics = "moving" if recipe == "reference" else "precise"
    command += shared_training_flags() + [
      "--loss_reduction=reference",
      "--lr_schedule=constant",
      "--noaugment",
      f"--batch_norm_statistics={statistics}",
      "--precise_bn_batches=4",
      "--batch_norm_momentum=0.99",
      "--precision=float32",
      "--head_weights=1,1",
      "--vgg19_init=glorot_uniform",
      f"--init_checkpoint={keras_initial}",
    ]
  else:
    command += [
      f"--flagfile={FLAGS.improved_flagfile}",
      f"--batch_size={FLAGS.batch_size}",
      *FLAGS.improved_extra,
    ]
  seconds = _run(command, run_dir + ".log", FLAGS.timeout_s)
  last = evaluate(run_dir, data_dir, os.path.join(run_dir, "eval-last"), prefer="latest")
  best = evaluate(run_dir, data_dir, os.path.join(run_dir, "eval-best"), prefer="best")
  if recipe == "improved" and FLAGS.improved_extra:
    recipe = f"improved {' '.join(FLAGS.improved_extra)}"
  return Row(
    FLAGS.data,
    steps,
    FLAGS.batch_size,
    seed,
    recipe,
    last["head2"],
    best["head2"],
    last["head1"],
    seconds,
    first_step_loss(run_dir),
  )


def format_row(row: Row, note: str) -> str:
  best = "" if row.head2_best is None else f"{row.head2_best:.4f}"
  if row.first_loss is not None and row.recipe in ("keras", "reference", "paper"):
    note = "; ".join(part for part in (note, f"step-1 loss {row.first_loss:.6f}") if part)
  command = "python -m profiling.quality " + " ".join(sys.argv[1:])
  return (
    f"| {time.strftime('%Y-%m-%d')} | {row.data} | {row.steps} | {row.batch} | {row.seed} "
    f"| {row.recipe} | {row.head2_last:.4f} | {best} | {row.head1_last:.4f} "
    f"| {row.train_seconds:.0f} | {os.getloadavg()[0]:.2f} | {note} | `{command.strip()}` "
    f"| {machine.machine_description()} |"
  )


def record(lines: Sequence[str]) -> str:
  os.makedirs(FLAGS.results_dir, exist_ok=True)
  path = os.path.join(FLAGS.results_dir, RESULTS_FILE)
  if not os.path.exists(path):
    with open(path, "w") as handle:
      handle.write(_HEADER)
  with open(path, "a") as handle:
    handle.write("".join(line + "\n" for line in lines))
  return path


def benchmark() -> None:
  data_dir = quality_data.BUILDERS[FLAGS.data](os.path.join(FLAGS.work_dir, "data", FLAGS.data))
  for seed in (int(s) for s in FLAGS.seeds):
    for steps in (int(s) for s in FLAGS.steps):
      base = os.path.join(FLAGS.work_dir, "runs", f"{FLAGS.data}-s{seed}-{steps}")
      keras_run = base + "-keras"
      rows = []
      if {"keras", "reference", "paper"} & set(FLAGS.recipes):
        rows.append(train_keras(data_dir, keras_run, steps, seed))
      for recipe in ("reference", "paper"):
        if recipe in FLAGS.recipes:
          rows.append(
            train_dunet(
              data_dir, f"{base}-{recipe}", steps, seed, recipe, os.path.join(keras_run, "initial")
            )
          )
      if "improved" in FLAGS.recipes:
        suffix = "".join(flag.strip("-").replace("=", "_") for flag in FLAGS.improved_extra)
        rows.append(
          train_dunet(data_dir, f"{base}-improved{suffix}", steps, seed, "improved", None)
        )
      lines = [
        format_row(row, FLAGS.note) for row in rows if row.recipe.split()[0] in FLAGS.recipes
      ]
      print("\n".join(lines), flush=True)
      if FLAGS.record:
        record(lines)


# ================================================================================================
# The Keras worker: the reference recipe with Keras' own fit
# ================================================================================================
def _reference_model(height: int, width: int):
  if not FLAGS.reference_model_py:
    from tests import keras_reference  # pylint: disable=g-import-not-at-top

    return keras_reference.build_reference_model(height, width)
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location("reference_model", FLAGS.reference_model_py)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.build_model((height, width, 3))


def keras_worker(run_dir: str) -> None:
  """Trains the Keras model as train.py does, on dunet's batches; writes initial/ and final/
  (dunet workdirs converted from Keras' h5 files) and result.json."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from dunet import keras_h5  # pylint: disable=g-import-not-at-top
  from dunet.data import augment  # pylint: disable=g-import-not-at-top
  from dunet.data import pipeline  # pylint: disable=g-import-not-at-top
  from tests import keras_reference  # pylint: disable=g-import-not-at-top

  os.makedirs(run_dir, exist_ok=True)
  keras.utils.set_random_seed(FLAGS.seed)
  info = pipeline.read_data_info(FLAGS.data_dir)
  height, width = int(info["height"]), int(info["width"])
  model = _reference_model(height, width)
  model.save(os.path.join(run_dir, "initial.h5"))
  keras_h5.convert_keras_h5(
    os.path.join(run_dir, "initial.h5"),
    os.path.join(run_dir, "initial"),
    overwrite=True,
    preprocessing=FLAGS.preprocessing,
  )
  keras_reference.compile_for_training(model, FLAGS.optimizer, FLAGS.learning_rate, FLAGS.loss)

  def both_heads(batch):
    return batch["image"], tf.concat([batch["mask"], batch["mask"]], axis=-1)

  # The batches dunet.train draws with --noaugment and this seed, epoch after epoch.
  train = pipeline.make_train_dataset(
    FLAGS.data_dir,
    global_batch_size=FLAGS.batch_size,
    preprocessing=FLAGS.preprocessing,
    augment_config=augment.AugmentConfig.none(),
    seed=FLAGS.seed,
  ).map(both_heads)
  valid = pipeline.make_eval_dataset(
    FLAGS.data_dir, "valid", batch_size=FLAGS.batch_size, preprocessing=FLAGS.preprocessing
  ).map(lambda batch: both_heads({"image": batch["image"], "mask": batch["mask"]}))
  steps_per_epoch = pipeline.steps_per_epoch(FLAGS.data_dir, FLAGS.batch_size)
  epochs = math.ceil(FLAGS.max_steps / steps_per_epoch)

  class StopAfter(keras.callbacks.Callback):
    """Stops after exactly --max_steps steps (an epoch may end early, as dunet's does)."""

    def __init__(self):
      super().__init__()
      self.steps = 0
      self.first_loss = None

    def on_train_batch_end(self, batch, logs=None):
      if self.steps == 0:  # Keras' running mean of the epoch: after one batch, that batch's
        self.first_loss = float(logs["loss"])
      self.steps += 1
      if self.steps >= FLAGS.max_steps:
        self.model.stop_training = True

  stopper = StopAfter()
  started = time.perf_counter()
  model.fit(
    train,
    epochs=epochs,
    steps_per_epoch=steps_per_epoch,
    validation_data=valid,
    callbacks=[stopper],
    verbose=2,
  )
  seconds = time.perf_counter() - started
  model.save(os.path.join(run_dir, "final.h5"))
  keras_h5.convert_keras_h5(
    os.path.join(run_dir, "final.h5"),
    os.path.join(run_dir, "final"),
    overwrite=True,
    preprocessing=FLAGS.preprocessing,
  )
  with open(os.path.join(run_dir, "result.json"), "w") as handle:
    json.dump(
      {"train_seconds": seconds, "steps": stopper.steps, "first_loss": stopper.first_loss}, handle
    )


def main(argv: List[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.keras_worker:
    keras_worker(FLAGS.keras_worker)
    return
  unknown = set(FLAGS.recipes) - set(RECIPES)
  if unknown:
    raise app.UsageError(f"unknown recipes {sorted(unknown)}; valid: {', '.join(RECIPES)}")
  benchmark()


if __name__ == "__main__":
  app.run(main)
