"""Runs a few training steps of a config under the profiler and prints the trace summary.

  python -m profiling.capture_trace --config=demo --logdir=runs/profile \
      --skip_steps=3 --trace_steps=3

Trains `skip_steps + trace_steps` steps into `--logdir` (a fresh workdir) with dunet.train,
tracing the last `trace_steps` (after tracing and compilation are done), then summarises the trace
(profiling/summarize_trace.py). `tensorboard --logdir=<logdir>` shows it in the Profile tab. On a
GPU machine the trace holds the GPU kernels; here, host ops. Every dunet-train flag can be given,
and `--config=NAME` / `--flagfile=FILE` as dunet-train reads them.
"""

from __future__ import annotations

from absl import app
from absl import flags

from dunet import checkpoint as checkpoint_lib
from dunet import cli
from dunet import train  # (defines the training flags)
from profiling import summarize_trace

FLAGS = flags.FLAGS
flags.DEFINE_integer("skip_steps", 3, "Untraced steps first (tracing, compilation, warm-up).")
flags.DEFINE_integer("trace_steps", 3, "Steps traced.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.logdir:
    raise app.UsageError(
      "--logdir is required (a fresh folder: the trace and a short run go there)"
    )
  if checkpoint_lib.latest_checkpoint(FLAGS.logdir):
    raise app.UsageError(f"{FLAGS.logdir} already holds a run; use a fresh --logdir")
  first, last = FLAGS.skip_steps + 1, FLAGS.skip_steps + FLAGS.trace_steps
  config = train.config_from_flags(FLAGS).updated(
    max_steps=last, profile_steps=f"{first},{last}", epochs=max(FLAGS.epochs, 1)
  )
  train.train(config, FLAGS.logdir)
  paths = summarize_trace.find_trace_files(FLAGS.logdir)
  print(f"trace of steps {first}-{last}: {', '.join(paths)}")
  tool = "hlo_stats" if FLAGS.jit_compile else "framework_op_stats"
  print(
    summarize_trace.format_summary(
      summarize_trace.summarize(summarize_trace.op_table(paths, tool), FLAGS.top)
    )
  )


if __name__ == "__main__":
  cli.run(
    main,
    program="python -m profiling.capture_trace",
    configs=True,
    help_groups=(("Trace", ("logdir", "skip_steps", "trace_steps", "top")), *train.HELP_GROUPS),
    summary=cli.docstring_summary(__doc__),
  )
