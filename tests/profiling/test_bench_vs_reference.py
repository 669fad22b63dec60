"""profiling/bench_vs_reference.py: its JSON line, the output agreement, --record, and the order
of its timed windows.

Everything runs in subprocesses: the module defines profiling.bench's flags, whose names
(--height, --batch, ...) other command-line modules imported by tests define too.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE = "profiling.bench_vs_reference"


def _run(args, timeout=900):
  return subprocess.run(
    [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
  )


@pytest.mark.slow
def test_smoke_run_reports_agreeing_outputs_positive_ratios_and_records(tmp_path):
  # Training is left out: tracing both training graphs takes minutes on 2 cores.
  result = _run(
    [
      "-m",
      MODULE,
      "--height=32",
      "--width=32",
      "--batch=1",
      "--windows=2",
      "--seconds=0",
      "--steps=1",
      "--warmup=1",
      "--precisions=float32,mixed_bfloat16",
      "--measures=inference,latency",
      "--record",
      f"--results_dir={tmp_path}",
      "--note=test run",
    ]
  )
  assert result.returncode == 0, result.stderr[-3000:]
  measured = json.loads(result.stdout.strip().splitlines()[-1])
  for key in ("rows", "ratios", "max_abs_difference", "machine", "onednn", "tensorflow", "keras"):
    assert key in measured, key
  expected_ratios = {
    f"{precision}/{row}"
    for precision in ("float32", "mixed_bfloat16")
    for row in (
      "inference_folded_vs_predict",
      "inference_folded_vs_plain",
      "inference_unfolded_vs_plain",
      "latency_folded_vs_plain",
    )
  }
  assert set(measured["ratios"]) == expected_ratios
  assert all(ratio > 0 for ratio in measured["ratios"].values())
  for row in measured["rows"]:
    assert row["dunet_value"] > 0 and row["keras_value"] > 0, row
    assert row["dunet_warmup_s"] > 0 and row["keras_warmup_s"] > 0, row
  # Same weights, same images: float32 agrees to rounding (1e-6 seen), bfloat16 to its 8-bit
  # mantissa through ~60 layers (2e-2 seen); a mapping or folding error moves it by ~0.1-1.
  differences = measured["max_abs_difference"]
  assert {key.split("/")[0] for key in differences} == {"float32", "mixed_bfloat16"}
  for key, difference in differences.items():
    assert difference < (1e-4 if key.startswith("float32/") else 0.1), key
  inference_rows = [row for row in measured["rows"] if row["key"].startswith("inference")]
  assert all(row["max_abs_difference"] is not None for row in inference_rows)

  text = (tmp_path / "bench_vs_reference.md").read_text()
  assert text.startswith("# profiling/bench_vs_reference.py results")
  assert "## " in text and "32x32, batch 1, float32, mixed_bfloat16" in text
  assert "--height=32" in text and "note: test run" in text
  assert f"oneDNN {'on' if measured['onednn'] else 'off'}" in text
  assert f"Keras {measured['keras']}" in text
  table_rows = [line for line in text.splitlines() if line.startswith("| inference b1 |")]
  assert len(table_rows) == 6  # three comparisons x two precisions
  assert "| latency b1 | mixed_bfloat16 | folded |" in text


def test_windows_alternate_after_warm_up_and_record_appends_a_section(tmp_path):
  """The timing and recording helpers, on stand-in contenders (no network is built)."""
  script = textwrap.dedent(
    f"""
    import json
    from profiling import bench_vs_reference as b

    calls = []
    settings = b.Settings(windows=3, seconds=0, steps=2, warmup=1)
    timings = b.alternate(
      {{"dunet": lambda: calls.append("d"), "keras": lambda: calls.append("k")}}, settings
    )
    # One warm-up call each, then three rounds: a window of 2 calls of each, in turn.
    assert "".join(calls) == "dk" + "ddkk" * 3, calls
    assert [len(w) for w in timings.windows["dunet"]] == [2, 2, 2]
    assert b.images_per_second([[0.5, 0.5], [1.0, 1.0], [0.25, 0.25]], batch=4) == 8.0
    assert b.median_milliseconds([[0.001, 0.003], [0.002]]) == 2.0
    timed = b.window_durations(lambda: None, b.Settings(seconds=0.05))
    assert len(timed) > 1

    row = b.Row("training", "training b4", "float32", "train function", 2.0, "train_on_batch",
                1.0, "img/s", 2.0)
    result = dict(height=64, width=64, batch=4, precisions=["float32"], date="D",
                  command="python -m x --a", machine="M", onednn=False, load_average_1min=1.0,
                  tensorflow="T", keras="K", jit_compile=False, keras_training="train_on_batch",
                  windows=3, seconds=0, steps=2, warmup=1, peak_rss_mb=1.0,
                  rows=[b.dataclasses.asdict(row)])
    path = b.record(result, {str(tmp_path)!r})
    b.record(result, {str(tmp_path)!r}, note="again")
    print(json.dumps(open(path).read()))
    """
  )
  result = _run(["-c", script], timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  text = json.loads(result.stdout.strip().splitlines()[-1])
  assert text.count("# profiling/bench_vs_reference.py results") == 1
  assert text.count("## D: 64x64, batch 4, float32") == 2  # appended, not replaced
  assert "oneDNN off" in text and "`python -m x --a`" in text and "note: again" in text
  assert (
    "| training b4 | float32 | train function | 2 img/s | train_on_batch | 1 img/s | 2.00 |"
    in (text)
  )


def test_rejects_profiling_bench_precision_flag():
  result = _run(["-m", MODULE, "--precision=float32"], timeout=300)
  assert result.returncode != 0
  assert "use --precisions" in result.stderr


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="a GPU takes float16")
def test_refuses_mixed_float16_without_a_gpu():
  result = _run(["-m", MODULE, "--precisions=float32,mixed_float16"], timeout=300)
  assert result.returncode != 0
  assert "mixed_float16 is a GPU precision: no GPU is visible" in result.stderr
