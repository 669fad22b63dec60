r"""Segments new pictures: `python -m dunet.predict --checkpoint=RUN --input=FOLDER --out_dir=OUT`.

Pictures in (a folder, or a comma-separated list of files, folders and glob patterns), and for each
picture `<stem>` written into --out_dir, at the picture's own size:

  masks/<stem>.png          the predicted mask of head 2 (the final output), values 0 and 255
  overlays/<stem>.png       the picture with the mask blended in green and outlined (--overlays)
  probabilities/<stem>.png  head 2's probability x 255, rounded (--probabilities)
  summary.json              the model, the settings, one line per picture written, and the
                            pictures skipped, each with the reason

Every file appears complete or not at all (written next to itself and renamed). Pictures are read
with dunet's checked reader (8- and 16-bit, grayscale, RGBA, PNG/JPEG/TIFF/BMP); a picture that
cannot be read (missing, empty, truncated, corrupt, unsupported) is reported by name on stderr and
in summary.json and skipped, and the others are still segmented. Pictures of the same size are
batched together (the model resizes every batch to its input size and the masks back).

Output names come from the file stems, so two inputs with the same stem (`a/1.png` and `b/1.png`,
or `1.png` and `1.tif`) would overwrite each other: that is refused before anything runs, naming
the files (pass a narrower glob, or run once per folder with its own --out_dir).

The pictures and the model's path are checked first, then the model is loaded, and only then is
anything written: a mistake on the command line creates no output folder.

Exit status: 0 when every picture was segmented; 3 when some were skipped (the others are written,
summary.json lists the skipped ones); 1 when nothing could be segmented (no checkpoint there, or
every picture unreadable); 2 for a usage error (a bad or missing flag, --input naming no picture,
duplicate stems). Errors are one line on stderr.

Examples:
  python -m dunet.predict --checkpoint=runs/cvc --input=new_frames/ --out_dir=runs/cvc/predict
  python -m dunet.predict --checkpoint=exported/cvc --input='a.tif,b/*.png' --out_dir=out --tta
"""

from __future__ import annotations

if __name__ == "__main__":
  from dunet import cli

  cli.silence_startup()  # before TensorFlow is imported

import datetime  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dunet import cli  # noqa: E402
from dunet import fileio  # noqa: E402
from dunet import inference  # noqa: E402
from dunet import metrics  # noqa: E402
from dunet import model_flags  # noqa: E402
from dunet import serving  # noqa: E402
from dunet import summaries  # noqa: E402
from dunet.data import layouts  # noqa: E402
from dunet.data import readers  # noqa: E402
from dunet.errors import ConfigError  # noqa: E402
from dunet.errors import DataError  # noqa: E402

PathLike = Union[str, "os.PathLike[str]"]

EXIT_OK, EXIT_ERROR, EXIT_SKIPPED = 0, 1, 3
SUMMARY_FILE = "summary.json"
MASKS_DIR, OVERLAYS_DIR, PROBABILITIES_DIR = "masks", "overlays", "probabilities"
SUMMARY_FORMAT = "dunet-predict"
# Overlay colours (RGB): the mask blended in green, its outline in a brighter green.
_FILL, _OUTLINE = (0, 255, 0), (160, 255, 160)


# ================================================================================================
# Outputs
# ================================================================================================


def overlay_picture(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The picture with `mask` blended in green and its outline drawn: uint8 RGB [H, W, 3]."""
  blended = summaries.overlay(image[None], mask[None].astype(np.float32), color=_FILL, alpha=0.35)[
    0
  ]
  contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  thickness = max(1, round(min(image.shape[:2]) / 250))
  blended = np.ascontiguousarray(blended)
  cv2.drawContours(blended, contours, -1, _OUTLINE, thickness)
  return blended


def _write_outputs(
  out_dir: Path,
  stem: str,
  image: np.ndarray,
  probability: np.ndarray,
  threshold: float,
  overlays: bool,
  probabilities: bool,
) -> Dict[str, object]:
  mask = metrics.binarize(probability, threshold).astype(np.uint8)
  record: Dict[str, object] = {"mask": f"{MASKS_DIR}/{stem}.png"}
  fileio.write_bytes_atomic(out_dir / MASKS_DIR / f"{stem}.png", inference.encode_png(mask * 255))
  if overlays:
    record["overlay"] = f"{OVERLAYS_DIR}/{stem}.png"
    fileio.write_bytes_atomic(
      out_dir / OVERLAYS_DIR / f"{stem}.png", inference.encode_png(overlay_picture(image, mask))
    )
  if probabilities:
    record["probability"] = f"{PROBABILITIES_DIR}/{stem}.png"
    scaled = np.round(np.clip(probability, 0.0, 1.0) * 255.0).astype(np.uint8)
    fileio.write_bytes_atomic(
      out_dir / PROBABILITIES_DIR / f"{stem}.png", inference.encode_png(scaled)
    )
  record["foreground_fraction"] = round(float(mask.mean()), 6)
  return record


# A mask at least this full (or this empty) is "nearly all foreground (background)"; when more
# than half of the masks are, predict warns: a model whose BatchNorm statistics or training went
# wrong predicts one class everywhere (a real data set rarely gives most pictures either mask).
NEARLY_ALL = 0.98
NEARLY_NONE = 0.0005


def degenerate_masks_warning(foreground_fractions: Sequence[float]) -> Optional[str]:
  """A warning when most masks are nearly all foreground or nearly all background; else None."""
  count = len(foreground_fractions)
  if count < 2:
    return None
  full = sum(fraction >= NEARLY_ALL for fraction in foreground_fractions)
  empty = sum(fraction <= NEARLY_NONE for fraction in foreground_fractions)
  for number, what in ((full, "nearly all foreground"), (empty, "nearly all background")):
    if number * 2 > count:
      return (
        f"{number} of {count} masks are {what} (a sign of a degenerate model: one that "
        "predicts one class everywhere, e.g. from BatchNorm statistics that do not match "
        "its weights; try `python -m dunet.evaluate --recompute_bn=8` on the run, and "
        "check its validation DSC). Ignore this if most pictures really show "
        + ("only the object." if what.endswith("foreground") else "no object.")
      )
  return None


class _ReadablePictures:
  """The pictures that can be read, in order, read by a few threads; the others are named on
  stderr at once and collected in `skipped`."""

  def __init__(self, paths: Sequence[Path], workers: int, bar: inference.ImageProgress):
    self.paths, self.workers, self.bar = paths, workers, bar
    self.skipped: List[Dict[str, str]] = []
    self._unreported = 0  # skipped pictures not yet counted by the progress line

  @staticmethod
  def _read(path: Path):
    try:
      image, notes = readers.read_image(path)
    except DataError as error:
      return path, error, []
    return path, image, notes

  def take_unreported(self) -> int:
    """Skipped pictures since the last call: counted with the next batch, since a progress
    report between two reads would measure a throughput over microseconds."""
    count, self._unreported = self._unreported, 0
    return count

  def __iter__(self) -> Iterator[Tuple[Path, np.ndarray]]:
    for path, image, notes in readers.ordered_map(self._read, self.paths, self.workers):
      if isinstance(image, DataError):
        # Named at once on stderr, so a long run shows the problem before it ends.
        self.bar.message(f"skipped {image}")
        self.skipped.append({"file": str(path), "reason": image.problem})
        self._unreported += 1
        continue
      for note in notes:
        logging.info("%s", note)
      yield path, image


# ================================================================================================
# Library entry point
# ================================================================================================


def predict(
  loaded: serving.LoadedSegmenter,
  inputs: Sequence[PathLike],
  out_dir: PathLike,
  *,
  threshold: float = 0.5,
  tta: bool = False,
  flips: Sequence[str] = tuple(serving.FLIPS),
  batch_size: int = 4,
  overlays: bool = True,
  probabilities: bool = False,
  progress: bool = True,
  input_problems: Sequence[Dict[str, str]] = (),
  workers: Optional[int] = None,
) -> dict:
  """Segments pictures and writes masks (and overlays, probabilities) at their own sizes.

  Args:
    loaded: the model, from `dunet.serving.load_segmenter`.
    inputs: picture files (see `dunet.inference.find_inputs`); their stems must be unique.
    out_dir: the output folder (created; files of the same names are replaced).
    threshold: foreground where head 2's probability >= threshold.
    tta: flip test-time augmentation (`dunet.serving.flip_tta`).
    flips: the flips averaged with `tta`.
    batch_size: pictures per model call (pictures of one size share a batch).
    overlays: write overlays/.
    probabilities: write probabilities/.
    progress: show a progress line on stderr.
    input_problems: entries that named no picture (from `dunet.inference.find_inputs`),
      listed as skipped.
    workers: threads reading pictures (default: min(4, CPUs)).

  Returns:
    The summary also written to `out_dir/summary.json`: "written" (count), "skipped" ([{"file",
    "reason"}]), "images" (one record per picture written), "warnings" (e.g.
    `degenerate_masks_warning`, also logged) and the settings.

  Raises:
    ConfigError: duplicate stems, a bad batch size or threshold.
  """
  if batch_size <= 0:
    raise ConfigError(f"batch size must be positive, got {batch_size}")
  if not 0.0 <= threshold <= 1.0:
    raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
  paths = [Path(p) for p in inputs]
  inference.check_unique_stems(paths)
  out_dir = Path(out_dir)
  for folder in [MASKS_DIR] + [OVERLAYS_DIR] * overlays + [PROBABILITIES_DIR] * probabilities:
    tf.io.gfile.makedirs(str(out_dir / folder))
  segment = inference.make_segment_fn(loaded, tta, flips)
  bar = inference.ImageProgress(len(paths), progress)
  pictures = _ReadablePictures(paths, workers or min(4, os.cpu_count() or 1), bar)
  records: List[Dict[str, object]] = []
  for batch in inference.batches_by_size(pictures, lambda item: item[1].shape[:2], batch_size):
    result = segment(np.stack([image for _, image in batch]))
    for index, (path, image) in enumerate(batch):
      record = {"file": str(path), "height": image.shape[0], "width": image.shape[1]}
      record.update(
        _write_outputs(
          out_dir,
          path.stem,
          image,
          result[serving.PROBABILITY][index, :, :, 0],
          threshold,
          overlays,
          probabilities,
        )
      )
      records.append(record)
    bar.advance(len(batch) + pictures.take_unreported())
  bar.advance(pictures.take_unreported())
  bar.close()
  warnings = [
    text
    for text in [degenerate_masks_warning([record["foreground_fraction"] for record in records])]
    if text
  ]
  for text in warnings:
    logging.warning("%s", text)
  summary = {
    "format": SUMMARY_FORMAT,
    "model": inference.describe_model(loaded),
    "threshold": threshold,
    "tta": list(flips) if tta else (loaded.settings.get("flips") or None),
    "output": "head 2 (the final output)",
    "written": len(records),
    "skipped": list(input_problems) + pictures.skipped,
    "warnings": warnings,
    "images": sorted(records, key=lambda record: record["file"]),
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": " ".join(sys.argv),
  }
  fileio.write_json_atomic(out_dir / SUMMARY_FILE, summary, indent=1, sort_keys=False)
  return summary


# ================================================================================================
# Command line
# ================================================================================================

FLAGS = flags.FLAGS
PROGRAM = "dunet-predict"
HELP_GROUPS = (
  ("Model", model_flags.MODEL_FLAGS),
  ("Pictures", ("input", "recursive", "batch_size")),
  ("Outputs", ("out_dir", "threshold", "overlays", "probabilities")),
  ("Inference", model_flags.INFERENCE_FLAGS),
)


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines the command-line flags (only when run as a program: dunet.evaluate defines flags of
  the same names, and tests import both modules)."""
  fv = dict(flag_values=flag_values)
  model_flags.define_model_flags(flag_values)
  flags.DEFINE_list(
    "input",
    None,
    "The pictures (required): a folder (its image files: "
    f"{', '.join(layouts.IMAGE_EXTENSIONS)}, any case), glob patterns (quote "
    "them) or files, comma-separated. Listed files are read whatever their "
    "extension.",
    **fv,
  )
  flags.DEFINE_bool(
    "recursive",
    False,
    "Also take pictures from the sub-folders of --input "
    "folders (and let ** cross folders in patterns).",
    **fv,
  )
  flags.DEFINE_string(
    "out_dir",
    None,
    "Output folder (required): masks/, overlays/, "
    "probabilities/ and summary.json; files of the same names are replaced.",
    **fv,
  )
  flags.DEFINE_integer(
    "batch_size",
    4,
    "Pictures per model call; pictures of one size are "
    "batched together, so mixed sizes give smaller batches. Lower it for very "
    "large pictures (they are processed at their own size before and after "
    "the model).",
    lower_bound=1,
    **fv,
  )
  flags.DEFINE_float(
    "threshold",
    0.5,
    "A pixel is foreground where head 2's probability is >= this.",
    lower_bound=0.0,
    upper_bound=1.0,
    **fv,
  )
  flags.DEFINE_bool(
    "overlays",
    True,
    "Write overlays/<stem>.png: the picture with the mask blended in and outlined.",
    **fv,
  )
  flags.DEFINE_bool(
    "probabilities",
    False,
    "Write probabilities/<stem>.png: head 2's probability x 255 as an 8-bit picture.",
    **fv,
  )


def find_pictures(
  entries: Sequence[str], recursive: bool, out_dir: str
) -> Tuple[List[Path], List[Dict[str, str]]]:
  """The pictures --input names, checked before anything is loaded or written.

  Returns:
    (picture files, entries that named none), as `dunet.inference.find_inputs`.

  Raises:
    app.UsageError: --input names no picture at all (nothing matches, or no listed file
      exists), naming the flag.
    ConfigError: two pictures would write the same output name.
  """
  paths, problems = inference.find_inputs(entries, recursive=recursive, exclude=out_dir)
  spelled = ",".join(entries)
  if not paths:
    reasons = "; ".join(f"{problem['file']}: {problem['reason']}" for problem in problems)
    raise app.UsageError(
      f"--input={spelled}: no pictures found (image extensions "
      f"{', '.join(layouts.IMAGE_EXTENSIONS)})" + (f"; {reasons}" if reasons else "")
    )
  if not any(path.exists() for path in paths):
    raise app.UsageError(f"--input={spelled}: no such file or folder")
  inference.check_unique_stems(paths)
  return paths, problems


def main(argv: Sequence[str]) -> int:
  """Checks the pictures and the model's path, loads the model, then writes the outputs."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  missing = [name for name in ("checkpoint", "input", "out_dir") if not getattr(FLAGS, name)]
  if missing:
    raise app.UsageError("required: " + ", ".join(f"--{name}" for name in missing))
  paths, problems = find_pictures(FLAGS.input, FLAGS.recursive, FLAGS.out_dir)
  serving.resolve_model_source(FLAGS.checkpoint, FLAGS.prefer)  # names a missing model
  for problem in problems:
    print(f"skipped {problem['file']}: {problem['reason']}", file=sys.stderr)
  # Flips, tiling and post-processing happen inside the serve call (in that order of work:
  # each flipped copy tiled, the copies averaged, then head 2 post-processed).
  loaded = serving.load_segmenter(
    FLAGS.checkpoint, threshold=FLAGS.threshold, **model_flags.load_arguments(FLAGS)
  )
  summary = predict(
    loaded,
    paths,
    FLAGS.out_dir,
    threshold=FLAGS.threshold,
    batch_size=FLAGS.batch_size,
    overlays=FLAGS.overlays,
    probabilities=FLAGS.probabilities,
    progress=FLAGS.progress,
    input_problems=problems,
  )
  skipped = summary["skipped"]
  print(
    f"wrote {summary['written']} mask(s) to {os.path.join(FLAGS.out_dir, MASKS_DIR)}"
    + (
      f"; skipped {len(skipped)}, listed in {os.path.join(FLAGS.out_dir, SUMMARY_FILE)}:"
      if skipped
      else ""
    )
  )
  for item in skipped:
    print(f"  {item['file']}: {item['reason']}")
  if not summary["written"]:
    return EXIT_ERROR
  return EXIT_SKIPPED if skipped else EXIT_OK


def run() -> None:
  """The program: defines the flags and runs `main` (console-script entry point)."""
  define_flags()
  cli.run(main, program=PROGRAM, help_groups=HELP_GROUPS, summary=cli.docstring_summary(__doc__))


if __name__ == "__main__":
  run()
