"""The deployment export end to end: SavedModel -> ONNX fp32/fp16 -> TensorRT engines, each
checked against TensorFlow, a latency table, and export_trt.json, written atomically.

`export_trt(Settings(...))` is what `dunet-export-trt` (dunet/export_trt.py) runs; the steps are
in dunet/deploy/saved_model.py, onnx.py, tensorrt.py, parity.py and latency.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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


def _saved_model_step(
  settings: Settings, staging: str, out_dir: str, report: Dict[str, Any], log: Callable[[str], None]
) -> str:
  """The SavedModel to convert: the given one, or a fresh verified export; returns its folder."""
  if settings.saved_model:
    report["saved_model"] = os.path.abspath(settings.saved_model)
    return report["saved_model"]
  summary = saved_model.export_saved_model(
    settings.checkpoint,
    os.path.join(staging, SAVED_MODEL_SUBDIR),
    prefer=settings.prefer,
    height=settings.height,
    width=settings.width,
    preprocessing=settings.preprocessing,
  )
  report["saved_model"] = os.path.join(out_dir, SAVED_MODEL_SUBDIR)
  report["source_checkpoint"] = summary.source
  log(
    f"SavedModel: {summary.source} -> {report['saved_model']} (reloaded, max |diff| "
    f"{max(summary.parity.values()):.1e})"
  )
  return summary.out_dir


def _onnx_step(
  settings: Settings,
  saved_model_dir: str,
  loaded: serving.LoadedSegmenter,
  pictures: np.ndarray,
  expected: Dict[str, np.ndarray],
  staging: str,
  out_dir: str,
  log: Callable[[str], None],
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Converts, checks and compares the ONNX graphs; returns (report entries, sessions)."""
  height, width = loaded.height, loaded.width
  input_spec = tf.TensorSpec([None, height, width, 3], tf.uint8, name=serving.IMAGES)
  entries, sessions = {}, {}
  for precision in ["fp32"] + (["fp16"] if settings.fp16 else []):
    started = time.perf_counter()
    if precision == "fp32":
      proto = onnx.saved_model_to_onnx(saved_model_dir, opset=settings.opset)
    else:
      segmenter = onnx.float16_segmenter(saved_model_dir, height, width, loaded.preprocessing)
      proto = onnx.function_to_onnx(segmenter.serve_model_size, input_spec, opset=settings.opset)
    onnx.name_batch_dimension(proto)
    info = onnx.check_deployable(proto, height, width, f"ONNX {precision}")
    path = os.path.join(staging, ONNX_FILES[precision])
    onnx.save_onnx(proto, path)
    del proto
    sessions[precision] = onnx.onnxruntime_session(path, settings.onnxruntime_providers)
    stats = parity.parity_stats(expected, onnx.run_onnx(sessions[precision], pictures))
    tolerance = settings.fp32_tolerance if precision == "fp32" else settings.fp16_tolerance
    final_path = os.path.join(out_dir, ONNX_FILES[precision])
    log(
      f"ONNX {precision}: {final_path} ({os.path.getsize(path) / 2**20:.1f} MiB, converted in "
      f"{time.perf_counter() - started:.0f} s); input {info.input_name} {info.input_type} "
      f"{info.input_shape}; {sum(info.op_counts.values())} nodes; weights {info.weight_types}"
    )
    log(f"  node types: {', '.join(f'{op} {n}' for op, n in info.op_counts.items())}")
    log(parity.format_parity(f"ONNX {precision}", stats, tolerance))
    worst = parity.check_parity(f"ONNX {precision} (onnxruntime)", stats, tolerance)
    entries[precision] = {
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
  return entries, sessions


def _tensorrt_step(
  settings: Settings,
  trt: Optional[Any],
  missing: List[str],
  input_name: str,
  loaded: serving.LoadedSegmenter,
  pictures: np.ndarray,
  expected: Dict[str, np.ndarray],
  staging: str,
  out_dir: str,
  log: Callable[[str], None],
) -> Tuple[Dict[str, Any], Dict[str, tensorrt.EngineRunner]]:
  """Builds, runs and compares the engines where TensorRT can; else says what is missing and
  prints the trtexec commands. Returns (report entry, engine runners)."""
  height, width = loaded.height, loaded.width
  commands = {
    precision: tensorrt.trtexec_command(
      os.path.join(out_dir, ONNX_FILES[precision]),
      os.path.join(out_dir, ENGINE_FILES[precision]),
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
  runners: Dict[str, tensorrt.EngineRunner] = {}
  if settings.tensorrt == "skip" or not settings.engines:
    entry["missing"] = ["skipped (--tensorrt=skip or no --engines)"]
    log("TensorRT: skipped. To build on a GPU machine:")
  elif missing:
    log("TensorRT engine not built; missing: " + "; ".join(missing))
    log("Build the same engine on a GPU machine (TensorRT's trtexec, strongly typed):")
  if trt is None or settings.tensorrt == "skip":
    for command in commands.values():
      log(f"  {command}")
    return entry, runners
  entry["version"] = getattr(trt, "__version__", "unknown")
  for precision in settings.engines:
    path = os.path.join(staging, ENGINE_FILES[precision])
    started = time.perf_counter()
    size = tensorrt.build_engine(
      trt,
      os.path.join(staging, ONNX_FILES[precision]),
      path,
      input_name,
      height,
      width,
      settings.profile,
      settings.workspace_mib,
    )
    runners[precision] = tensorrt.EngineRunner(trt, path)
    stats = parity.parity_stats(expected, runners[precision](pictures))
    log(
      f"TensorRT {entry['version']} {precision}: "
      f"{os.path.join(out_dir, ENGINE_FILES[precision])} ({size / 2**20:.1f} MiB, built in "
      f"{time.perf_counter() - started:.0f} s, batch {settings.profile.min_batch}.."
      f"{settings.profile.max_batch})"
    )
    log(parity.format_parity(f"TensorRT {precision}", stats, settings.engine_tolerance))
    worst = parity.check_parity(f"TensorRT {precision}", stats, settings.engine_tolerance)
    entry["engines"][precision] = {
      "file": os.path.join(out_dir, ENGINE_FILES[precision]),
      "bytes": size,
      "parity": stats,
      "max_abs_difference": worst,
      "tolerance": settings.engine_tolerance,
    }
  entry["built"] = True
  return entry, runners


def _latency_step(
  settings: Settings,
  candidates: Sequence[Tuple[str, Callable]],
  height: int,
  width: int,
  log: Callable[[str], None],
) -> List[latency.LatencyRow]:
  """Times every format at batch 1 and --latency_batch."""
  rows: List[latency.LatencyRow] = []
  if settings.latency_runs <= 0:
    return rows
  for batch in sorted({1, settings.latency_batch}):
    images = saved_model.parity_pictures(batch, height, width, seed=saved_model.PARITY_SEED + 1)
    for name, function in candidates:
      seconds = latency.measure_latency(function, images, settings.latency_runs)
      rows.append(latency.LatencyRow(name, batch, 1000 * seconds, settings.latency_runs))
  log("Latency (median per image; TensorRT includes the host<->device copies):")
  log(latency.format_latency_table(rows))
  return rows


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


def _time_every_format(
  settings: Settings,
  run_tf: Callable,
  sessions: Dict[str, Any],
  runners: Dict[str, tensorrt.EngineRunner],
  height: int,
  width: int,
  log: Callable[[str], None],
) -> List[Dict[str, Any]]:
  """The latency rows of TensorFlow, each onnxruntime session and each engine (then freed)."""
  provider = settings.onnxruntime_providers[0].replace("ExecutionProvider", "")
  candidates: List[Tuple[str, Callable]] = [("TF SavedModel (serving_default)", run_tf)]
  candidates += [
    (
      f"ONNX {precision} (onnxruntime {provider})",
      lambda images, session=session: onnx.run_onnx(session, images),
    )
    for precision, session in sessions.items()
  ]
  candidates += [(f"TensorRT {precision}", runner) for precision, runner in runners.items()]
  try:
    rows = _latency_step(settings, candidates, height, width, log)
  finally:
    for runner in runners.values():
      runner.close()
  return [dataclasses.asdict(row) for row in rows]


def export_trt(settings: Settings, log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Runs the whole deployment export into settings.out_dir, atomically; returns the report.

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
  trt, missing = check_before_export(settings)
  out_dir = os.path.abspath(settings.out_dir)
  report: Dict[str, Any] = {"tensorflow_version": tf.__version__, "opset": settings.opset}
  with fileio.staged_directory(out_dir, settings.overwrite, purpose="export_trt") as staging:
    saved_model_dir = _saved_model_step(settings, staging, out_dir, report, log)
    loaded = _load_model_size(saved_model_dir, settings, report, log)
    run_tf = serving_function(loaded)
    pictures = saved_model.parity_pictures(settings.parity_pictures, loaded.height, loaded.width)
    expected = run_tf(pictures)
    report["onnx"], sessions = _onnx_step(
      settings, saved_model_dir, loaded, pictures, expected, staging, out_dir, log
    )
    report["tensorrt"], runners = _tensorrt_step(
      settings,
      trt,
      missing,
      report["onnx"]["fp32"]["input"],
      loaded,
      pictures,
      expected,
      staging,
      out_dir,
      log,
    )
    report["latency"] = _time_every_format(
      settings, run_tf, sessions, runners, loaded.height, loaded.width, log
    )
    with open(os.path.join(staging, REPORT_FILENAME), "w") as handle:
      json.dump(report, handle, indent=2, sort_keys=True)
  log(f"Wrote {out_dir} ({REPORT_FILENAME} has every number above)")
  return report
