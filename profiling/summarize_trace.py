"""Summarises a captured TensorBoard profiler trace in the terminal.

  python -m profiling.summarize_trace --logdir=runs/profile [--top=20] [--by_type]

Reads the newest `<logdir>/plugins/profile/<run>/*.xplane.pb` with xprof's own converters (the
tables TensorBoard's Profile tab shows; `pip install -e ".[profile]"`), then prints the top ops by
self-time and the share of time in convolutions versus everything else, so a change to the step
can be judged without opening TensorBoard. IDLE time is left out of the shares.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Dict, List

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("logdir", None, "TensorBoard logdir holding plugins/profile/<run>/.")
flags.DEFINE_string("run", "", "Which run folder under plugins/profile (default: the newest).")
flags.DEFINE_integer("top", 15, "How many ops to list.")
flags.DEFINE_bool(
  "by_type",
  False,
  "Rank op types (all ops of a type summed) instead of single ops: where the time goes.",
)
flags.DEFINE_enum(
  "tool",
  "framework_op_stats",
  ["framework_op_stats", "hlo_stats"],
  "framework_op_stats for TF ops; hlo_stats for XLA-compiled (--jit_compile) steps.",
)

# Op types (TF or HLO) counted as convolution, forward and backward.
CONVOLUTION_MARKERS = ("conv2d", "convolution", "conv2dbackprop", "depthwiseconv")


def find_trace_files(logdir: str, run: str = "") -> List[str]:
  """The .xplane.pb files of the chosen (default: newest) run under logdir/plugins/profile."""
  root = os.path.join(logdir, "plugins", "profile")
  runs = sorted(d for d in glob.glob(os.path.join(root, "*")) if os.path.isdir(d))
  if run:
    runs = [d for d in runs if os.path.basename(d) == run]
  if not runs:
    raise FileNotFoundError(
      f"no profiler runs under {root}: capture one with "
      "`python -m dunet.train ... --profile_steps=START,STOP` or "
      "profiling/capture_trace.py"
    )
  files = sorted(glob.glob(os.path.join(runs[-1], "*.xplane.pb")))
  if not files:
    raise FileNotFoundError(f"{runs[-1]} holds no .xplane.pb file")
  return files


def op_table(paths: List[str], tool: str = "framework_op_stats") -> List[Dict[str, object]]:
  """Rows of the tool's first table as dicts keyed by column id."""
  try:
    from xprof.convert import raw_to_tool_data
  except ImportError as error:
    raise ImportError('reading traces needs xprof: pip install -e ".[profile]"') from error
  data, _ = raw_to_tool_data.xspace_to_tool_data(paths, tool, {})
  tables = json.loads(data)
  table = tables[0] if isinstance(tables, list) else tables
  columns = [column["id"] for column in table["cols"]]
  return [
    {column: cell.get("v") for column, cell in zip(columns, row["c"])} for row in table["rows"]
  ]


def summarize(rows: List[Dict[str, object]], top: int, by_type: bool = False) -> Dict[str, object]:
  """Top ops (or, by_type, op types, each type's ops summed) by self-time and the convolution
  share (IDLE excluded)."""
  type_key = "type" if rows and "type" in rows[0] else "category"
  name_key = "operation" if rows and "operation" in rows[0] else "hlo_op_name"
  self_key = "total_self_time" if rows and "total_self_time" in rows[0] else "total_self_time_us"
  busy = [r for r in rows if str(r.get(type_key, "")).upper() != "IDLE"]
  if by_type:
    grouped: Dict[str, List[Dict[str, object]]] = {}
    for row in busy:
      grouped.setdefault(str(row.get(type_key)), []).append(row)
    busy = [
      {
        type_key: name,
        name_key: f"({len(group)} ops)",
        self_key: sum(float(r.get(self_key) or 0) for r in group),
      }
      for name, group in grouped.items()
    ]
  total = sum(float(r.get(self_key) or 0) for r in busy)
  conv = sum(
    float(r.get(self_key) or 0)
    for r in busy
    if any(m in str(r.get(type_key, "")).lower() for m in CONVOLUTION_MARKERS)
  )
  ranked = sorted(busy, key=lambda r: -float(r.get(self_key) or 0))[:top]
  return {
    "total_self_time_us": total,
    "convolution_share": conv / total if total else 0.0,
    "top": [
      {
        "type": r.get(type_key),
        "name": r.get(name_key),
        "self_time_us": float(r.get(self_key) or 0),
        "share": float(r.get(self_key) or 0) / total if total else 0.0,
      }
      for r in ranked
    ],
  }


def format_summary(summary: Dict[str, object]) -> str:
  lines = [
    f"busy self-time: {summary['total_self_time_us'] / 1e3:.1f} ms; convolutions "
    f"{summary['convolution_share']:.1%}, everything else "
    f"{1 - summary['convolution_share']:.1%}",
    "",
    f"{'share':>7}  {'self ms':>9}  {'type':<32} name",
  ]
  for row in summary["top"]:
    lines.append(
      f"{row['share']:>7.1%}  {row['self_time_us'] / 1e3:>9.2f}  "
      f"{str(row['type'])[:32]:<32} {row['name']}"
    )
  return "\n".join(lines)


def main(argv):
  del argv
  if not FLAGS.logdir:
    raise app.UsageError("--logdir is required")
  paths = find_trace_files(FLAGS.logdir, FLAGS.run)
  print(f"trace: {', '.join(paths)}")
  print(format_summary(summarize(op_table(paths, FLAGS.tool), FLAGS.top, FLAGS.by_type)))


if __name__ == "__main__":
  app.run(main)
