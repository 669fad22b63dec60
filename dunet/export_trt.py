r"""Deployment export: SavedModel -> ONNX (float32, float16) -> TensorRT engine, each checked.

`dunet-export-trt` (also `python -m dunet.export_trt`, or `python tools/export_trt.py` from a
checkout after `pip install -e .`); the library is dunet/deploy/ (pipeline.py runs the steps).

Current TensorFlow wheels are built without TF-TRT (this program asks TensorFlow, through
`tf.sysconfig.get_build_info()`, and says what it reports), so the route to TensorRT is ONNX:

  1. SavedModel: --saved_model (written by `python -m dunet.export`), or exported first from
     --checkpoint into <out_dir>/saved_model (verified by reloading, see dunet/export.py).
  2. ONNX, converted with tf2onnx from the SavedModel's "model_size" signature:
       dunet_fp32.onnx  float32 arithmetic.
       dunet_fp16.onnx  float16 arithmetic: the same weights in a DoubleUNet built with
                        compute_dtype=float16 (TensorFlow's own mixed precision: float16
                        convolutions, squeeze-excite averages in float32, logits cast to
                        float32), converted the same way. Inputs and outputs keep their
                        types (uint8 in, float32 out).
     Both hold the network with its BatchNorms folded into the convolutions (dunet/folding.py,
     as every dunet SavedModel does): one convolution with its bias per layer, no BatchNorm.
     Both graphs are checked with the ONNX checker and must contain no control flow and no
     data-dependent shapes (If, Loop, Scan, Unique, Compress, NonZero): their node types are
     listed in the report. Then onnxruntime runs each on deterministic pictures and is compared
     with the SavedModel's serving signature: the run fails when the largest difference of a
     probability exceeds --fp32_tolerance / --fp16_tolerance.
  3. TensorRT, where the `tensorrt` package imports and an NVIDIA driver reports a GPU: the ONNX
     file is parsed with TensorRT's OnnxParser into a strongly typed network (the precision comes
     from the ONNX types), built with one optimization profile over the batch dimension
     (--min_batch/--opt_batch/--max_batch), serialized to dunet_fp16.plan (and/or
     dunet_fp32.plan, --engines), then run on the same pictures and compared with TensorFlow
     (--engine_tolerance); device buffers come from the NVIDIA driver library through ctypes, so
     nothing beyond `tensorrt` is needed. Elsewhere the program says exactly what is missing and
     prints the `trtexec` command that builds the same engine on a GPU machine.
  4. A latency table: median milliseconds per image, batch 1 and --latency_batch, for every
     format produced (TensorFlow SavedModel, ONNX fp32 and fp16 in onnxruntime, TensorRT).

Every stage prints one line as it ends, "[stage NAME] what it did: S s (peak RSS so far P MiB,
R MiB now)", and the report ends with their table (also in export_trt.json, "stages"). The
stages run one after another and free what they made before the next starts: besides the loaded
SavedModel, one TensorFlow graph, ONNX proto, onnxruntime session or engine at a time (each
format is timed while its session exists). At 128x128 on a CPU the whole export peaks at about
2.6 GB resident, set by the conversions (profiling/results/export_trt.md).

Why the "model_size" signature and not "serving_default": serving_default accepts any picture
size and resizes inside, with `tf.cond` (ONNX `If`) around the resizes; tf2onnx also maps
TensorFlow's area resize to ONNX nearest-neighbour, which silently changes results for
pictures larger than the model. model_size takes uint8 pictures at exactly the model size
(dynamic batch only) and has no control flow, which is what TensorRT builds best. Resize
pictures to the model size before calling the ONNX model or engine, as
dunet.data.prepare.resize_image does (OpenCV area when shrinking, bilinear otherwise), and
resize the probabilities back (bilinear).

The settings, --out_dir, TensorRT (with --tensorrt=require) and the source are checked before
anything is converted. Everything is written into a hidden folder next to --out_dir and renamed
at the end; a failed check leaves no --out_dir behind. Exit status: 0 when everything asked for
was written and passed its checks; 2 for a usage error; 1 when the source is missing or a step
or check failed. Errors are one line on stderr.

  <out_dir>/saved_model/      (with --checkpoint) the verified SavedModel
  <out_dir>/dunet_fp32.onnx, dunet_fp16.onnx
  <out_dir>/dunet_fp16.plan   where TensorRT built it
  <out_dir>/export_trt.json   inputs, node types, parity, latency, TensorRT status, trtexec line,
                              stage timings and memory

Examples:
  dunet-export-trt --checkpoint=runs/cvc --out_dir=exports/cvc_trt
  python tools/export_trt.py --saved_model=exports/cvc --out_dir=exports/cvc_trt --max_batch=32
"""

from __future__ import annotations

if __name__ == "__main__":
  from dunet import cli

  cli.silence_startup()  # before TensorFlow is imported

from typing import Sequence  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from dunet import cli  # noqa: E402
from dunet.data import preprocess  # noqa: E402
from dunet.deploy import onnx  # noqa: E402
from dunet.deploy import pipeline  # noqa: E402
from dunet.deploy import tensorrt  # noqa: E402

FLAGS = flags.FLAGS
PROGRAM = "dunet-export-trt"
HELP_GROUPS = (
  ("Source", ("saved_model", "checkpoint", "prefer", "height", "width", "preprocessing")),
  ("Output", ("out_dir", "overwrite", "fp16", "opset")),
  ("TensorRT", ("tensorrt", "engines", "min_batch", "opt_batch", "max_batch", "workspace_mib")),
  (
    "Checks",
    (
      "fp32_tolerance",
      "fp16_tolerance",
      "engine_tolerance",
      "parity_pictures",
      "latency_batch",
      "latency_runs",
      "onnxruntime_providers",
    ),
  ),
)


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program: importing the module defines
  none)."""
  flags.DEFINE_string(
    "saved_model",
    None,
    "A SavedModel written by `python -m dunet.export` "
    "(one of --saved_model and --checkpoint is required).",
  )
  flags.DEFINE_string(
    "checkpoint",
    None,
    "Export from a training workdir, a converted Keras "
    "workdir or a checkpoint prefix instead: the verified SavedModel is written "
    "to <out_dir>/saved_model first.",
  )
  flags.DEFINE_string(
    "out_dir",
    None,
    "The folder to create (required); it must not exist (or be empty) unless --overwrite.",
  )
  flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace an existing --out_dir (only once everything new passed its checks).",
  )
  flags.DEFINE_enum(
    "prefer",
    "best",
    ["best", "latest"],
    "With --checkpoint: the best or the latest checkpoint of a workdir.",
  )
  flags.DEFINE_integer(
    "height",
    None,
    "With --checkpoint: model input height when the run's "
    "config.json records none (a multiple of 16).",
  )
  flags.DEFINE_integer("width", None, "With --checkpoint: model input width, as --height.")
  flags.DEFINE_enum(
    "preprocessing",
    None,
    list(preprocess.PREPROCESSING),
    "With --checkpoint: override the run's preprocessing.",
  )
  flags.DEFINE_integer("opset", onnx.DEFAULT_OPSET, "ONNX opset for tf2onnx.", lower_bound=13)
  flags.DEFINE_bool(
    "fp16", True, "Also write the float16 ONNX graph (float16 arithmetic, uint8 in, float32 out)."
  )
  flags.DEFINE_float(
    "fp32_tolerance",
    pipeline.DEFAULT_FP32_TOLERANCE,
    "Largest allowed difference of a probability between onnxruntime (fp32 graph) and TensorFlow.",
    lower_bound=0,
  )
  flags.DEFINE_float(
    "fp16_tolerance",
    pipeline.DEFAULT_FP16_TOLERANCE,
    "Largest allowed "
    "difference of a probability between onnxruntime (fp16 graph) and "
    "TensorFlow (float32).",
    lower_bound=0,
  )
  flags.DEFINE_float(
    "engine_tolerance",
    pipeline.DEFAULT_ENGINE_TOLERANCE,
    "Largest allowed "
    "difference of a probability between a TensorRT engine and TensorFlow "
    "(float32).",
    lower_bound=0,
  )
  flags.DEFINE_integer(
    "parity_pictures",
    pipeline.PARITY_PICTURES,
    "Deterministic pictures (one "
    "batch) the ONNX graphs and engines are compared with TensorFlow on.",
    lower_bound=1,
  )
  flags.DEFINE_enum(
    "tensorrt",
    "auto",
    ["auto", "require", "skip"],
    "auto: build engines where "
    "the tensorrt package and a CUDA GPU are present, else say what is missing "
    "and print the trtexec command; require: fail (before any conversion) when "
    "they are missing; skip: never build (the trtexec command is still printed).",
  )
  flags.DEFINE_list(
    "engines",
    ["fp16"],
    "TensorRT engines to build, from the ONNX graph of each listed precision (fp16, fp32).",
  )
  flags.DEFINE_integer(
    "min_batch", 1, "Smallest batch of the engine's optimization profile.", lower_bound=1
  )
  flags.DEFINE_integer("opt_batch", 8, "Batch TensorRT tunes its kernels for.", lower_bound=1)
  flags.DEFINE_integer("max_batch", 16, "Largest batch the engine accepts.", lower_bound=1)
  flags.DEFINE_integer(
    "workspace_mib", 4096, "TensorRT builder workspace limit in MiB.", lower_bound=1
  )
  flags.DEFINE_integer(
    "latency_batch", 8, "The larger batch of the latency table (besides 1).", lower_bound=1
  )
  flags.DEFINE_integer(
    "latency_runs",
    5,
    "Timed runs per format and batch (after one warm-up); 0 skips the latency table.",
    lower_bound=0,
  )
  flags.DEFINE_list(
    "onnxruntime_providers",
    ["CPUExecutionProvider"],
    "onnxruntime execution "
    "providers for the parity checks and the latency table, in order of "
    "preference.",
  )


def settings_from_flags() -> pipeline.Settings:
  """The export's settings, from the parsed flags.

  Raises:
    dunet.errors.ConfigError: a batch profile out of order.
  """
  return pipeline.Settings(
    out_dir=FLAGS.out_dir,
    saved_model=FLAGS.saved_model,
    checkpoint=FLAGS.checkpoint,
    prefer=FLAGS.prefer,
    height=FLAGS.height,
    width=FLAGS.width,
    preprocessing=FLAGS.preprocessing,
    overwrite=FLAGS.overwrite,
    opset=FLAGS.opset,
    fp16=FLAGS.fp16,
    fp32_tolerance=FLAGS.fp32_tolerance,
    fp16_tolerance=FLAGS.fp16_tolerance,
    engine_tolerance=FLAGS.engine_tolerance,
    parity_pictures=FLAGS.parity_pictures,
    tensorrt=FLAGS.tensorrt,
    engines=tuple(FLAGS.engines),
    profile=tensorrt.BatchProfile(FLAGS.min_batch, FLAGS.opt_batch, FLAGS.max_batch),
    workspace_mib=FLAGS.workspace_mib,
    latency_batch=FLAGS.latency_batch,
    latency_runs=FLAGS.latency_runs,
    onnxruntime_providers=tuple(FLAGS.onnxruntime_providers),
  )


def main(argv: Sequence[str]) -> int:
  """Checks the flags and runs the whole export (dunet.deploy.pipeline.export_trt)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.out_dir:
    raise app.UsageError("--out_dir is required")
  if bool(FLAGS.saved_model) == bool(FLAGS.checkpoint):
    raise app.UsageError("pass exactly one of --saved_model and --checkpoint")
  pipeline.export_trt(settings_from_flags())
  return 0


def run() -> None:
  """The program: defines the flags and runs `main` (console-script entry point)."""
  define_flags()
  cli.run(main, program=PROGRAM, help_groups=HELP_GROUPS, summary=cli.docstring_summary(__doc__))


if __name__ == "__main__":
  run()
