"""The deployment export end to end: SavedModel -> ONNX fp32/fp16 -> TensorRT engines, each
checked against TensorFlow, a latency table, and export_trt.json, written atomically.

`export_trt(Settings(...))` is what `dunet-export-trt` (dunet/export_trt.py) runs; the steps are
in dunet/deploy/saved_model.py, onnx.py, tensorrt.py, parity.py and latency.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from dunet import checkpoint as checkpoint_lib
from dunet import fileio
from dunet import serving
from dunet.deploy import latency
from dunet.deploy import onnx
from dunet.deploy import parity
from dunet.deploy import saved_model
from dunet.deploy import tensorrt
from dunet.errors import ConfigError
from dunet.errors import ExportError

SAVED_MODEL_SUBDIR = "saved_model"
ONNX_FILES = {"fp32": "dunet_fp32.onnx", "fp16": "dunet_fp16.onnx"}
ENGINE_FILES = {"fp32": "dunet_fp32.plan", "fp16": "dunet_fp16.plan"}
REPORT_FILENAME = "export_trt.json"
# ONNX parity against TensorFlow, as the largest difference of a probability. float32: the same
# arithmetic in another runtime (measured ~2e-7). float16: measured against float32 TensorFlow on
# random-weight models at 64x64 and 128x128, with logits from ~0.1 up to ~90 in magnitude: at
# most 1.2e-3 in onnxruntime (TensorFlow's own float16 run: 2.2e-3), no mask changed; 2e-2
# leaves a 10x margin for larger pictures and trained weights.
DEFAULT_FP32_TOLERANCE = 1e-4
DEFAULT_FP16_TOLERANCE = 2e-2
# TensorRT chooses its own kernels and accumulation orders, and nothing could be measured on a GPU
# here: a wider bound for engines, to be tightened with measurements (the report has them).
DEFAULT_ENGINE_TOLERANCE = 5e-2
PARITY_PICTURES = 4
# Engines take batches of 1 to 16, tuned for 8 (outside Settings: its `tensorrt` field would hide
# the module there).
DEFAULT_PROFILE = tensorrt.BatchProfile(1, 8, 16)
TF_LATENCY_NAME = "TF SavedModel (serving_default)"


@dataclasses.dataclass
class Settings:
  """What `export_trt` does (the command-line flags)."""

  out_dir: str
  saved_model: Optional[str] = None
  checkpoint: Optional[str] = None
  prefer: str = "best"
  height: Optional[int] = None
  width: Optional[int] = None
  preprocessing: Optional[str] = None
  overwrite: bool = False
  opset: int = onnx.DEFAULT_OPSET
  fp16: bool = True
  fp32_tolerance: float = DEFAULT_FP32_TOLERANCE
  fp16_tolerance: float = DEFAULT_FP16_TOLERANCE
  engine_tolerance: float = DEFAULT_ENGINE_TOLERANCE
  parity_pictures: int = PARITY_PICTURES
  tensorrt: str = "auto"
  engines: Tuple[str, ...] = ("fp16",)
  profile: tensorrt.BatchProfile = DEFAULT_PROFILE
  workspace_mib: int = 4096
  latency_batch: int = 8
  latency_runs: int = 5
  onnxruntime_providers: Tuple[str, ...] = ("CPUExecutionProvider",)


def validate(settings: Settings) -> None:
  """Checks of the settings alone (no files), so that mistakes surface before the slow steps.

  Raises:
    ConfigError: not exactly one source, an unknown engine precision, or an fp16 engine without
      the fp16 graph.
  """
  if bool(settings.saved_model) == bool(settings.checkpoint):
    raise ConfigError("pass exactly one of --saved_model and --checkpoint")
  for precision in settings.engines:
    if precision not in ENGINE_FILES:
      raise ConfigError(f"--engines: unknown engine precision {precision!r}; expected fp16 or fp32")
    if precision == "fp16" and not settings.fp16:
      raise ConfigError(
        "an fp16 engine needs the fp16 ONNX graph: drop --nofp16 or use --engines=fp32"
      )


def check_source(settings: Settings) -> None:
  """Checks that the SavedModel or checkpoint to export exists, without loading it.

  Raises:
    ExportError: --saved_model is not a SavedModel folder.
    dunet.errors.CheckpointNotFoundError: no checkpoint at --checkpoint.
  """
  if settings.saved_model and not serving.is_saved_model(settings.saved_model):
    raise ExportError(
      f"{settings.saved_model} is not a SavedModel folder (no saved_model.pb); "
      "export one with `python -m dunet.export` or pass --checkpoint"
    )
  if settings.checkpoint:
    checkpoint_lib.resolve_checkpoint(settings.checkpoint, settings.prefer)


@dataclasses.dataclass
class StageTime:
  """How long one stage of the export took, and the memory it left.

  Attributes:
    name: the stage, e.g. "onnx_fp32_convert".
    seconds: its wall-clock time (including freeing its objects afterwards).
    peak_rss_mb: the process's peak resident memory so far (MiB), whichever stage set it.
    rss_mb: the resident memory once the stage's objects were freed (MiB; None where the
      system does not say).
  """

  name: str
  seconds: float
  peak_rss_mb: float
  rss_mb: Optional[float] = None


def peak_rss_mb() -> float:
  """The process's peak resident set size so far, in MiB (getrusage's ru_maxrss)."""
  import resource  # pylint: disable=g-import-not-at-top  (POSIX only)

  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes there, KiB here


def rss_mb() -> Optional[float]:
  """The process's resident set size now, in MiB (from /proc; None where there is none)."""
  try:
    with open("/proc/self/statm") as handle:
      pages = int(handle.read().split()[1])
  except (OSError, IndexError, ValueError):
    return None
  return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class StageClock:
  """Times the stages of the export and frees each stage's objects when it ends.

  Each stage ends with `onnx.release_memory()` (garbage collection, freed heap handed back), so a
  stage's peak does not stack on what the previous stages dropped, then logs one line: what it
  did, its seconds, the peak resident memory so far and what is resident now.
  """

  def __init__(
    self,
    log: Callable[[str], None],
    clock: Callable[[], float] = time.perf_counter,
    release: Callable[[], None] = onnx.release_memory,
  ):
    self._log, self._clock, self._release = log, clock, release
    self._started = clock()
    self.stages: List[StageTime] = []

  @contextlib.contextmanager
  def stage(self, name: str, what: str) -> Iterator[None]:
    """Runs the body as stage `name`; `what` is the line's description. A stage that raises
    is not recorded (the error is what the user sees)."""
    started = self._clock()
    yield
    self._release()
    entry = StageTime(name, max(0.0, self._clock() - started), peak_rss_mb(), rss_mb())
    self.stages.append(entry)
    now = "" if entry.rss_mb is None else f", {entry.rss_mb:.0f} MiB now"
    self._log(
      f"[stage {name}] {what}: {entry.seconds:.1f} s (peak RSS so far {entry.peak_rss_mb:.0f} "
      f"MiB{now})"
    )

  def total_seconds(self) -> float:
    """Seconds since the clock was made (the whole export)."""
    return max(0.0, self._clock() - self._started)


def format_stage_table(stages: Sequence[StageTime], total_seconds: float) -> str:
  """A fixed-width table: stage, seconds, peak RSS so far and resident MiB after it; a total."""
  header = f"{'stage':<24} {'seconds':>8} {'peak RSS MiB':>13} {'RSS after':>10}"
  lines = [header, "-" * len(header)]
  for entry in stages:
    after = "" if entry.rss_mb is None else f"{entry.rss_mb:.0f}"
    lines.append(f"{entry.name:<24} {entry.seconds:>8.1f} {entry.peak_rss_mb:>13.0f} {after:>10}")
  peak = max((entry.peak_rss_mb for entry in stages), default=peak_rss_mb())
  lines.append(f"{'total':<24} {total_seconds:>8.1f} {peak:>13.0f} {'':>10}")
  return "\n".join(lines)


@dataclasses.dataclass
class _Run:
  """What the steps of one export share."""

  settings: Settings
  staging: str
  out_dir: str
  log: Callable[[str], None]
  clock: StageClock
  loaded: Optional[serving.LoadedSegmenter] = None
  pictures: Optional[np.ndarray] = None
  expected: Optional[Dict[str, np.ndarray]] = None
  # batch -> pictures the latency table is measured on (none when latency_runs is 0).
  latency_images: Dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
  latency_rows: List[latency.LatencyRow] = dataclasses.field(default_factory=list)


def _saved_model_step(run: _Run, report: Dict[str, Any]) -> str:
  """The SavedModel to convert: the given one, or a fresh verified export; returns its folder."""
  settings = run.settings
  if settings.saved_model:
    report["saved_model"] = os.path.abspath(settings.saved_model)
    return report["saved_model"]
  with run.clock.stage("saved_model", "checkpoint -> SavedModel, reloaded and compared"):
    summary = saved_model.export_saved_model(
      settings.checkpoint,
      os.path.join(run.staging, SAVED_MODEL_SUBDIR),
      prefer=settings.prefer,
      height=settings.height,
      width=settings.width,
      preprocessing=settings.preprocessing,
    )
  report["saved_model"] = os.path.join(run.out_dir, SAVED_MODEL_SUBDIR)
  report["source_checkpoint"] = summary.source
  run.log(
    f"SavedModel: {summary.source} -> {report['saved_model']} (reloaded, max |diff| "
    f"{max(summary.parity.values()):.1e})"
  )
  return summary.out_dir


def _measure_latency(run: _Run, name: str, function: Callable) -> None:
  """Adds `function`'s latency rows (batch 1 and --latency_batch) to the run's table."""
  for batch, images in run.latency_images.items():
    seconds = latency.measure_latency(function, images, run.settings.latency_runs)
    run.latency_rows.append(
      latency.LatencyRow(name, batch, 1000 * seconds, run.settings.latency_runs)
    )


def _convert(run: _Run, precision: str, saved_model_dir: str):
  """The ONNX proto of one precision, from the loaded SavedModel's model-size signature (float32)
  or a float16 DoubleUNet with its weights."""
  loaded, opset = run.loaded, run.settings.opset
  if precision == "fp32":
    return onnx.concrete_function_to_onnx(
      loaded.module.signatures[serving.MODEL_SIZE_SIGNATURE],
      opset,
      name=f"dunet {serving.MODEL_SIZE_SIGNATURE}",
    )
  segmenter = onnx.float16_segmenter(
    saved_model_dir, loaded.height, loaded.width, loaded.preprocessing
  )
  input_spec = tf.TensorSpec([None, loaded.height, loaded.width, 3], tf.uint8, name=serving.IMAGES)
  return onnx.function_to_onnx(segmenter.serve_model_size, input_spec, opset=opset)


def _onnx_step(run: _Run, precision: str, saved_model_dir: str) -> Dict[str, Any]:
  """Converts, checks, writes and compares one ONNX graph, times it, then frees it all (the
  graph before its session is made, the session once timed); returns its report entry."""
  settings, log = run.settings, run.log
  label = "float32" if precision == "fp32" else "float16"
  with run.clock.stage(f"onnx_{precision}_convert", f"tf2onnx: model_size -> ONNX {label}"):
    proto = _convert(run, precision, saved_model_dir)
  convert_seconds = run.clock.stages[-1].seconds
  path = os.path.join(run.staging, ONNX_FILES[precision])
  with run.clock.stage(
    f"onnx_{precision}_check", "ONNX checker, no control flow, input and outputs; written"
  ):
    onnx.name_batch_dimension(proto)
    info = onnx.check_deployable(proto, run.loaded.height, run.loaded.width, f"ONNX {precision}")
    onnx.save_onnx(proto, path)
    del proto
  final_path = os.path.join(run.out_dir, ONNX_FILES[precision])
  log(
    f"ONNX {precision}: {final_path} ({os.path.getsize(path) / 2**20:.1f} MiB, converted in "
    f"{convert_seconds:.0f} s); input {info.input_name} {info.input_type} "
    f"{info.input_shape}; {sum(info.op_counts.values())} nodes; weights {info.weight_types}"
  )
  log(f"  node types: {', '.join(f'{op} {n}' for op, n in info.op_counts.items())}")
  tolerance = settings.fp32_tolerance if precision == "fp32" else settings.fp16_tolerance
  with run.clock.stage(
    f"onnx_{precision}_parity",
    f"onnxruntime session; {len(run.pictures)} pictures compared with TensorFlow",
  ):
    session = onnx.onnxruntime_session(path, settings.onnxruntime_providers)
    stats = parity.parity_stats(run.expected, onnx.run_onnx(session, run.pictures))
  log(parity.format_parity(f"ONNX {precision}", stats, tolerance))
  worst = parity.check_parity(f"ONNX {precision} (onnxruntime)", stats, tolerance)
  if run.latency_images:
    provider = settings.onnxruntime_providers[0].replace("ExecutionProvider", "")
    with run.clock.stage(f"onnx_{precision}_latency", f"onnxruntime latency ({provider})"):
      _measure_latency(
        run,
        f"ONNX {precision} (onnxruntime {provider})",
        functools.partial(onnx.run_onnx, session),
      )
  del session
  return {
    "file": final_path,
    "input": info.input_name,
    "input_type": info.input_type,
    "input_shape": info.input_shape,
    "outputs": info.outputs,
    "op_counts": info.op_counts,
    "weight_types": info.weight_types,
    "parity": stats,
    "max_abs_difference": worst,
    "tolerance": tolerance,
    "onnxruntime_providers": list(settings.onnxruntime_providers),
  }


def _tensorrt_step(
  run: _Run, trt: Optional[Any], missing: List[str], input_name: str
) -> Dict[str, Any]:
  """Builds, runs, compares and times the engines where TensorRT can (each runner closed once
  timed); else says what is missing and prints the trtexec commands. Returns the report entry."""
  settings, log = run.settings, run.log
  height, width = run.loaded.height, run.loaded.width
  commands = {
    precision: tensorrt.trtexec_command(
      os.path.join(run.out_dir, ONNX_FILES[precision]),
      os.path.join(run.out_dir, ENGINE_FILES[precision]),
      input_name,
      height,
      width,
      settings.profile,
      settings.workspace_mib,
    )
    for precision in settings.engines
  }
  entry: Dict[str, Any] = {
    "engines": {},
    "trtexec": commands,
    "built": False,
    "profile": dataclasses.asdict(settings.profile),
    "missing": missing,
  }
  if settings.tensorrt == "skip" or not settings.engines:
    entry["missing"] = ["skipped (--tensorrt=skip or no --engines)"]
    log("TensorRT: skipped. To build on a GPU machine:")
  elif missing:
    log("TensorRT engine not built; missing: " + "; ".join(missing))
    log("Build the same engine on a GPU machine (TensorRT's trtexec, strongly typed):")
  if trt is None or settings.tensorrt == "skip":
    for command in commands.values():
      log(f"  {command}")
    return entry
  entry["version"] = getattr(trt, "__version__", "unknown")
  for precision in settings.engines:
    path = os.path.join(run.staging, ENGINE_FILES[precision])
    with run.clock.stage(f"tensorrt_{precision}_build", f"TensorRT {precision} engine built"):
      size = tensorrt.build_engine(
        trt,
        os.path.join(run.staging, ONNX_FILES[precision]),
        path,
        input_name,
        height,
        width,
        settings.profile,
        settings.workspace_mib,
      )
    build_seconds = run.clock.stages[-1].seconds
    runner = tensorrt.EngineRunner(trt, path)
    try:
      with run.clock.stage(
        f"tensorrt_{precision}_parity",
        f"TensorRT {precision}: {len(run.pictures)} pictures compared with TensorFlow",
      ):
        stats = parity.parity_stats(run.expected, runner(run.pictures))
      log(
        f"TensorRT {entry['version']} {precision}: "
        f"{os.path.join(run.out_dir, ENGINE_FILES[precision])} ({size / 2**20:.1f} MiB, built "
        f"in {build_seconds:.0f} s, batch {settings.profile.min_batch}.."
        f"{settings.profile.max_batch})"
      )
      log(parity.format_parity(f"TensorRT {precision}", stats, settings.engine_tolerance))
      worst = parity.check_parity(f"TensorRT {precision}", stats, settings.engine_tolerance)
      if run.latency_images:
        with run.clock.stage(f"tensorrt_{precision}_latency", f"TensorRT {precision} latency"):
          _measure_latency(run, f"TensorRT {precision}", runner)
    finally:
      runner.close()
    entry["engines"][precision] = {
      "file": os.path.join(run.out_dir, ENGINE_FILES[precision]),
      "bytes": size,
      "parity": stats,
      "max_abs_difference": worst,
      "tolerance": settings.engine_tolerance,
    }
  entry["built"] = True
  return entry


def check_before_export(settings: Settings) -> Tuple[Optional[Any], List[str]]:
  """Everything checked before anything is converted or written: the settings, the output
  folder, TensorRT (with --tensorrt=require), and that the source exists.

  Returns:
    (the `tensorrt` module or None, what TensorRT lacks here), as `tensorrt_requirements`.

  Raises:
    ConfigError: bad settings, or an out_dir that exists (without overwrite).
    ExportError: --tensorrt=require where TensorRT cannot build, or no SavedModel there.
    dunet.errors.CheckpointNotFoundError: no checkpoint at --checkpoint.
  """
  validate(settings)
  fileio.check_out_dir(os.path.abspath(settings.out_dir), settings.overwrite)
  trt, missing = None, []
  if settings.tensorrt != "skip" and settings.engines:
    trt, missing = tensorrt.tensorrt_requirements()
    if missing and settings.tensorrt == "require":
      raise ExportError(
        "--tensorrt=require, but TensorRT cannot build here; missing: " + "; ".join(missing)
      )
  check_source(settings)
  return trt, missing


def _load_model_size(
  saved_model_dir: str, settings: Settings, report: Dict[str, Any], log: Callable[[str], None]
) -> serving.LoadedSegmenter:
  """The SavedModel, loaded and checked to have the model-size signature ONNX is made from."""
  loaded = serving.load_segmenter(
    saved_model_dir,
    height=settings.height,
    width=settings.width,
    preprocessing=settings.preprocessing,
  )
  if serving.MODEL_SIZE_SIGNATURE not in loaded.module.signatures:
    raise ExportError(
      f"{saved_model_dir} has no {serving.MODEL_SIZE_SIGNATURE!r} signature "
      "(an older export): export it again with python -m dunet.export"
    )
  report.update(height=loaded.height, width=loaded.width, preprocessing=loaded.preprocessing)
  supported, reason = tensorrt.tftrt_status()
  report["tf_trt"] = {"supported": supported, "reason": reason}
  log(
    f"Model: {loaded.height}x{loaded.width}, preprocessing {loaded.preprocessing}. TF-TRT "
    f"{'available' if supported else 'not available'} ({reason}): exporting through ONNX"
  )
  return loaded


def serving_function(
  loaded: serving.LoadedSegmenter,
) -> Callable[[np.ndarray], Dict[str, np.ndarray]]:
  """The reference every deployed format is compared with: the SavedModel's serving signature,
  looked up by key as evaluate, predict and serving systems call it."""
  serving_default = loaded.module.signatures[serving.SERVING_SIGNATURE]

  def run_tf(images: np.ndarray) -> Dict[str, np.ndarray]:
    outputs = serving_default(**{serving.IMAGES: tf.constant(images)})
    return {name: value.numpy() for name, value in outputs.items()}

  return run_tf


def _latency_table(run: _Run, run_tf: Callable) -> List[Dict[str, Any]]:
  """TensorFlow's latency rows, then the whole table (each deployed format was timed while its
  session or engine existed), in the order batch, then TensorFlow, ONNX, TensorRT."""
  if not run.latency_images:
    return []
  with run.clock.stage("tf_latency", "TensorFlow SavedModel latency (serving_default)"):
    _measure_latency(run, TF_LATENCY_NAME, run_tf)
  formats = [TF_LATENCY_NAME] + [
    row.name for row in run.latency_rows if row.name != TF_LATENCY_NAME
  ]
  rows = sorted(run.latency_rows, key=lambda row: (row.batch, formats.index(row.name)))
  run.log("Latency (median per image; TensorRT includes the host<->device copies):")
  run.log(latency.format_latency_table(rows))
  return [dataclasses.asdict(row) for row in rows]


def export_trt(settings: Settings, log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Runs the whole deployment export into settings.out_dir, atomically; returns the report.

  The stages run one after another, each freeing its objects before the next (one TensorFlow
  graph, ONNX proto or onnxruntime session at a time besides the loaded SavedModel), and each
  logs one line when it ends; the report's "stages" lists them ({"name", "seconds",
  "peak_rss_mb", "rss_mb"}) and the printed report ends with their table.

  Args:
    settings: what to export and check (the command-line flags).
    log: receives each line of the progress and results.

  Returns:
    The report written to <out_dir>/export_trt.json.

  Raises:
    dunet.errors.DunetError: ConfigError (settings; an out_dir that exists without overwrite),
      CheckpointNotFoundError, ExportError (a step or a check failed), with a message naming
      what failed; nothing is left at out_dir then.
  """
  clock = StageClock(log)
  trt, missing = check_before_export(settings)
  out_dir = os.path.abspath(settings.out_dir)
  report: Dict[str, Any] = {"tensorflow_version": tf.__version__, "opset": settings.opset}
  with fileio.staged_directory(out_dir, settings.overwrite, purpose="export_trt") as staging:
    run = _Run(settings, staging, out_dir, log, clock)
    saved_model_dir = _saved_model_step(run, report)
    with clock.stage(
      "load", f"SavedModel loaded; TensorFlow outputs on {settings.parity_pictures} pictures"
    ):
      run.loaded = _load_model_size(saved_model_dir, settings, report, log)
      run_tf = serving_function(run.loaded)
      height, width = run.loaded.height, run.loaded.width
      run.pictures = saved_model.parity_pictures(settings.parity_pictures, height, width)
      run.expected = run_tf(run.pictures)
    if settings.latency_runs > 0:
      run.latency_images = {
        batch: saved_model.parity_pictures(batch, height, width, seed=saved_model.PARITY_SEED + 1)
        for batch in sorted({1, settings.latency_batch})
      }
    report["onnx"] = {}
    for precision in ["fp32"] + (["fp16"] if settings.fp16 else []):
      report["onnx"][precision] = _onnx_step(run, precision, saved_model_dir)
    report["tensorrt"] = _tensorrt_step(run, trt, missing, report["onnx"]["fp32"]["input"])
    report["latency"] = _latency_table(run, run_tf)
    report["stages"] = [dataclasses.asdict(entry) for entry in clock.stages]
    report["total_seconds"] = clock.total_seconds()
    report["peak_rss_mb"] = peak_rss_mb()
    log("Stages (seconds; peak resident memory so far and resident after each, MiB):")
    log(format_stage_table(clock.stages, report["total_seconds"]))
    with open(os.path.join(staging, REPORT_FILENAME), "w") as handle:
      json.dump(report, handle, indent=2, sort_keys=True)
  log(f"Wrote {out_dir} ({REPORT_FILENAME} has every number above)")
  return report
