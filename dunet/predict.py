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

Exit status: 0 when every picture was segmented; 3 when some were skipped (the others are written,
summary.json lists the skipped ones); 1 when nothing could be segmented (no checkpoint, no
pictures found, duplicate stems, bad flags, or every picture unreadable).

Examples:
  python -m dunet.predict --checkpoint=runs/cvc --input=new_frames/ --out_dir=runs/cvc/predict
  python -m dunet.predict --checkpoint=exported/cvc --input='a.tif,b/*.png' --out_dir=out --tta
"""

from __future__ import annotations

import collections
import datetime
import glob
import os
import sys
from pathlib import Path
from typing import (Callable, Dict, Hashable, Iterable, Iterator, List, Optional, Sequence,
                    Tuple, TypeVar, Union)

import cv2
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from dunet import checkpoint as checkpoint_lib
from dunet import fileio
from dunet import metrics
from dunet import serving
from dunet import summaries
from dunet.data import layouts
from dunet.data import readers
from dunet.errors import DataError
from dunet.progress import ProgressLine

PathLike = Union[str, "os.PathLike[str]"]
T = TypeVar("T")

EXIT_OK, EXIT_ERROR, EXIT_SKIPPED = 0, 1, 3
SUMMARY_FILE = "summary.json"
MASKS_DIR, OVERLAYS_DIR, PROBABILITIES_DIR = "masks", "overlays", "probabilities"
SUMMARY_FORMAT = "dunet-predict"
_GLOB_CHARACTERS = "*?["
# Overlay colours (RGB): the mask blended in green, its outline in a brighter green.
_FILL, _OUTLINE = (0, 255, 0), (160, 255, 160)


# ================================================================================================
# Shared with dunet.evaluate: the serve call, batching by size, atomic files
# ================================================================================================


def make_segment_fn(loaded: serving.LoadedSegmenter, tta: bool = False,
                    flips: Sequence[str] = tuple(serving.FLIPS)
                    ) -> Callable[[np.ndarray], Dict[str, np.ndarray]]:
  """uint8 [B, h, w, 3] -> {"probability", "probability_head1"}: float32 [B, h, w, 1] numpy.

  Args:
    loaded: from `dunet.serving.load_segmenter`.
    tta: average over flipped copies (`dunet.serving.flip_tta`).
    flips: the flips averaged with `tta` (names from `dunet.serving.FLIPS`).
  """
  if tta:
    for flip in flips:
      if flip not in serving.FLIPS:
        raise ValueError(f"unknown flip {flip!r}; expected some of {sorted(serving.FLIPS)}")
    if not flips:
      raise ValueError("--tta needs at least one flip")

  def segment(images: np.ndarray) -> Dict[str, np.ndarray]:
    pixels = tf.convert_to_tensor(images, tf.uint8)
    outputs = (serving.flip_tta(loaded.serve, pixels, tuple(flips)) if tta
               else loaded.serve(pixels))
    return {key: value.numpy() for key, value in outputs.items()}

  return segment


def batches_by_size(items: Iterable[T], size_of: Callable[[T], Hashable], batch_size: int,
                    max_waiting: Optional[int] = None) -> Iterator[List[T]]:
  """Groups items into batches whose items share one size (a serve call takes one size).

  Items wait in one queue per size; a full queue is yielded at once. When more than
  `max_waiting` items wait (many different sizes, as in Kvasir-SEG), the longest queue is
  yielded early, so memory stays bounded. The rest are yielded at the end, oldest size first.

  Args:
    items: anything; consumed lazily.
    size_of: an item's size key, e.g. (height, width).
    batch_size: the most items per batch.
    max_waiting: the most items held back (default 4 x batch_size).

  Yields:
    Non-empty lists of items of one size, in arrival order within each list.
  """
  if batch_size <= 0:
    raise ValueError(f"batch size must be positive, got {batch_size}")
  max_waiting = max(batch_size, max_waiting or 4 * batch_size)
  waiting: "collections.OrderedDict[Hashable, List[T]]" = collections.OrderedDict()
  held = 0
  for item in items:
    queue = waiting.setdefault(size_of(item), [])
    queue.append(item)
    held += 1
    if len(queue) == batch_size:
      held -= len(queue)
      yield waiting.pop(size_of(item))
    elif held > max_waiting:
      longest = max(waiting, key=lambda key: len(waiting[key]))
      held -= len(waiting[longest])
      yield waiting.pop(longest)
  for queue in waiting.values():
    yield queue


class ImageProgress:
  """A progress line counted in images and updated once per batch, so that its throughput is
  measured over whole batches; at most about `reports` lines when stderr is not a terminal."""

  def __init__(self, total: int, enabled: bool = True, reports: int = 20):
    self.total, self.done = total, 0
    self.every = max(1, total // reports)
    self.bar = ProgressLine(total, 1, every=1, unit="img") if enabled and total > 0 else None

  def advance(self, count: int = 1) -> None:
    """Counts `count` more images done (or skipped)."""
    before, self.done = self.done, self.done + count
    if self.bar is None or count <= 0:
      return
    if (self.bar.is_terminal or self.done // self.every > before // self.every
        or self.done >= self.total):
      self.bar.update(min(self.done, self.total), {})

  def message(self, text: str) -> None:
    """Prints `text` on stderr on a line of its own (not after a half-written progress line)."""
    if self.bar is not None and self.bar.is_terminal:
      self.bar.stream.write("\r\x1b[2K")
    print(text, file=sys.stderr, flush=True)

  def close(self) -> None:
    """Ends the line if the total was not reached."""
    if self.bar is not None and self.done < self.total:
      self.bar.close()


def encode_png(pixels: np.ndarray) -> bytes:
  """PNG bytes of uint8 [H, W] or RGB [H, W, 3]."""
  if pixels.ndim == 3:
    pixels = pixels[:, :, ::-1]  # OpenCV writes BGR
  ok, buffer = cv2.imencode(".png", np.ascontiguousarray(pixels))
  if not ok:
    raise RuntimeError(f"PNG encoding failed for an array of shape {pixels.shape}")
  return buffer.tobytes()


# ================================================================================================
# Inputs
# ================================================================================================


def _is_image_file(path: Path) -> bool:
  return (path.is_file() and not path.name.startswith(".")
          and path.suffix.lower() in layouts.IMAGE_EXTENSIONS)


def find_inputs(entries: Union[str, Sequence[str]], recursive: bool = False,
                exclude: Optional[PathLike] = None) -> Tuple[List[Path], List[Dict[str, str]]]:
  """The picture files named by `entries`, and the entries that named nothing.

  Args:
    entries: folders (their image files: extensions in `dunet.data.layouts.IMAGE_EXTENSIONS`,
      case-insensitive, hidden files ignored), glob patterns (the image files they match), or
      files (taken whatever their extension; a missing one is read, fails and is reported like
      any unreadable picture). A string is split at commas.
    recursive: also scan the sub-folders of folders (and let `**` in patterns cross folders).
    exclude: a folder whose files are never taken (the output folder, when it is inside an input
      folder).

  Returns:
    (files in the order given, each folder's and pattern's sorted, the same file only once;
     [{"file": entry, "reason": ...}] for patterns that matched no image file).
  """
  if isinstance(entries, str):
    entries = [entry for entry in entries.split(",")]
  entries = [entry.strip() for entry in entries if entry.strip()]
  excluded = os.path.realpath(exclude) if exclude else None
  found: List[Path] = []
  problems: List[Dict[str, str]] = []
  seen = set()

  def add(path: Path) -> None:
    real = os.path.realpath(path)
    if excluded and (real == excluded or real.startswith(excluded + os.sep)):
      return
    if real not in seen:
      seen.add(real)
      found.append(path)

  for entry in entries:
    path = Path(entry)
    if path.is_dir():
      candidates = path.rglob("*") if recursive else path.iterdir()
      files = sorted(p for p in candidates if _is_image_file(p)
                     and not any(part.startswith(".") for part in p.relative_to(path).parts))
      if not files:
        logging.warning("%s: no image files (extensions %s)", path, layouts.IMAGE_EXTENSIONS)
      for file in files:
        add(file)
    elif any(character in entry for character in _GLOB_CHARACTERS):
      files = sorted(Path(p) for p in glob.glob(entry, recursive=recursive))
      files = [p for p in files if _is_image_file(p)]
      if not files:
        problems.append({"file": entry, "reason": "no image file matches this pattern"})
      for file in files:
        add(file)
    else:
      add(path)
  return found, problems


def check_unique_stems(paths: Sequence[Path]) -> None:
  """Raises ValueError naming the files when two would write the same output name."""
  by_stem: Dict[str, List[Path]] = collections.defaultdict(list)
  for path in paths:
    by_stem[path.stem].append(path)
  clashes = {stem: files for stem, files in by_stem.items() if len(files) > 1}
  if clashes:
    listed = "; ".join(f"{stem!r}: " + ", ".join(str(p) for p in files)
                       for stem, files in sorted(clashes.items())[:10])
    raise ValueError(f"{len(clashes)} output name(s) would be written by several inputs (outputs "
                     f"are named by file stem): {listed}. Pass a narrower --input (e.g. a glob "
                     "like 'folder/*.png') or run once per folder with its own --out_dir")


# ================================================================================================
# Outputs
# ================================================================================================


def overlay_picture(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The picture with `mask` blended in green and its outline drawn: uint8 RGB [H, W, 3]."""
  blended = summaries.overlay(image[None], mask[None].astype(np.float32), color=_FILL,
                              alpha=0.35)[0]
  contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                 cv2.CHAIN_APPROX_SIMPLE)
  thickness = max(1, round(min(image.shape[:2]) / 250))
  blended = np.ascontiguousarray(blended)
  cv2.drawContours(blended, contours, -1, _OUTLINE, thickness)
  return blended


def _write_outputs(out_dir: Path, stem: str, image: np.ndarray, probability: np.ndarray,
                   threshold: float, overlays: bool, probabilities: bool) -> Dict[str, object]:
  mask = metrics.binarize(probability, threshold).astype(np.uint8)
  record: Dict[str, object] = {"mask": f"{MASKS_DIR}/{stem}.png"}
  fileio.write_bytes_atomic(out_dir / MASKS_DIR / f"{stem}.png", encode_png(mask * 255))
  if overlays:
    record["overlay"] = f"{OVERLAYS_DIR}/{stem}.png"
    fileio.write_bytes_atomic(out_dir / OVERLAYS_DIR / f"{stem}.png",
                              encode_png(overlay_picture(image, mask)))
  if probabilities:
    record["probability"] = f"{PROBABILITIES_DIR}/{stem}.png"
    scaled = np.round(np.clip(probability, 0.0, 1.0) * 255.0).astype(np.uint8)
    fileio.write_bytes_atomic(out_dir / PROBABILITIES_DIR / f"{stem}.png", encode_png(scaled))
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
      return (f"{number} of {count} masks are {what} (a sign of a degenerate model: one that "
              "predicts one class everywhere, e.g. from BatchNorm statistics that do not match "
              "its weights; try `python -m dunet.evaluate --recompute_bn=8` on the run, and "
              "check its validation DSC). Ignore this if most pictures really show "
              + ("only the object." if what.endswith("foreground") else "no object."))
  return None


# ================================================================================================
# Library entry point
# ================================================================================================


def predict(loaded: serving.LoadedSegmenter, inputs: Sequence[PathLike], out_dir: PathLike, *,
            threshold: float = 0.5, tta: bool = False,
            flips: Sequence[str] = tuple(serving.FLIPS), batch_size: int = 4,
            overlays: bool = True, probabilities: bool = False, progress: bool = True,
            input_problems: Sequence[Dict[str, str]] = (),
            workers: Optional[int] = None) -> dict:
  """Segments pictures and writes masks (and overlays, probabilities) at their own sizes.

  Args:
    loaded: the model, from `dunet.serving.load_segmenter`.
    inputs: picture files (see `find_inputs`); their stems must be unique.
    out_dir: the output folder (created; files of the same names are replaced).
    threshold: foreground where head 2's probability >= threshold.
    tta: flip test-time augmentation (`dunet.serving.flip_tta`).
    flips: the flips averaged with `tta`.
    batch_size: pictures per model call (pictures of one size share a batch).
    overlays: write overlays/.
    probabilities: write probabilities/.
    progress: show a progress line on stderr.
    input_problems: entries that named no picture (from `find_inputs`), listed as skipped.
    workers: threads reading pictures (default: min(4, CPUs)).

  Returns:
    The summary also written to `out_dir/summary.json`: "written" (count), "skipped" ([{"file",
    "reason"}]), "images" (one record per picture written), "warnings" (e.g.
    `degenerate_masks_warning`, also logged) and the settings.

  Raises:
    ValueError: duplicate stems, a bad batch size or threshold.
  """
  if batch_size <= 0:
    raise ValueError(f"batch size must be positive, got {batch_size}")
  if not 0.0 <= threshold <= 1.0:
    raise ValueError(f"threshold must be in [0, 1], got {threshold}")
  paths = [Path(p) for p in inputs]
  check_unique_stems(paths)
  out_dir = Path(out_dir)
  for folder in [MASKS_DIR] + [OVERLAYS_DIR] * overlays + [PROBABILITIES_DIR] * probabilities:
    tf.io.gfile.makedirs(str(out_dir / folder))
  segment = make_segment_fn(loaded, tta, flips)
  skipped: List[Dict[str, str]] = list(input_problems)
  records: List[Dict[str, object]] = []

  bar = ImageProgress(len(paths), progress)
  unreported = [0]  # skipped pictures not yet counted by the progress line

  def read(path: Path):
    try:
      image, notes = readers.read_image(path)
    except DataError as error:
      return path, error, []
    return path, image, notes

  def readable() -> Iterator[Tuple[Path, np.ndarray]]:
    workers_used = workers or min(4, os.cpu_count() or 1)
    for path, image, notes in readers.ordered_map(read, paths, workers_used):
      if isinstance(image, DataError):
        # Named at once on stderr, so a long run shows the problem before it ends.
        bar.message(f"skipped {image}")
        skipped.append({"file": str(path), "reason": image.problem})
        # Counted with the next batch: a progress report between two reads would measure a
        # throughput over microseconds.
        unreported[0] += 1
        continue
      for note in notes:
        logging.info("%s", note)
      yield path, image

  for batch in batches_by_size(readable(), lambda item: item[1].shape[:2], batch_size):
    result = segment(np.stack([image for _, image in batch]))
    for index, (path, image) in enumerate(batch):
      record = {"file": str(path), "height": image.shape[0], "width": image.shape[1]}
      record.update(_write_outputs(out_dir, path.stem, image,
                                   result[serving.PROBABILITY][index, :, :, 0], threshold,
                                   overlays, probabilities))
      records.append(record)
    bar.advance(len(batch) + unreported[0])
    unreported[0] = 0
  bar.advance(unreported[0])
  bar.close()
  warnings = [text for text in [degenerate_masks_warning(
      [record["foreground_fraction"] for record in records])] if text]
  for text in warnings:
    logging.warning("%s", text)

  summary = {
      "format": SUMMARY_FORMAT,
      "model": {"source": loaded.source, "kind": loaded.kind, "input_height": loaded.height,
                "input_width": loaded.width, "preprocessing": loaded.preprocessing},
      "threshold": threshold,
      "tta": list(flips) if tta else None,
      "output": "head 2 (the final output)",
      "written": len(records),
      "skipped": skipped,
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


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines the command-line flags (only when run as a program: dunet.evaluate defines flags of
  the same names, and both modules are imported by tests and by each other)."""
  fv = dict(flag_values=flag_values)
  model_flags = serving.define_model_flags(flag_values)
  flags.DEFINE_list("input", None, "The pictures (required): a folder (its image files: "
                    f"{', '.join(layouts.IMAGE_EXTENSIONS)}, any case), glob patterns (quote "
                    "them) or files, comma-separated. Listed files are read whatever their "
                    "extension.", **fv)
  flags.DEFINE_bool("recursive", False, "Also take pictures from the sub-folders of --input "
                    "folders (and let ** cross folders in patterns).", **fv)
  flags.DEFINE_string("out_dir", None, "Output folder (required): masks/, overlays/, "
                      "probabilities/ and summary.json; files of the same names are replaced.",
                      **fv)
  flags.DEFINE_integer("batch_size", 4, "Pictures per model call; pictures of one size are "
                       "batched together, so mixed sizes give smaller batches. Lower it for very "
                       "large pictures (they are processed at their own size before and after "
                       "the model).", lower_bound=1, **fv)
  flags.DEFINE_float("threshold", 0.5, "A pixel is foreground where head 2's probability is >= "
                     "this.", lower_bound=0.0, upper_bound=1.0, **fv)
  flags.DEFINE_bool("overlays", True, "Write overlays/<stem>.png: the picture with the mask "
                    "blended in and outlined.", **fv)
  flags.DEFINE_bool("probabilities", False, "Write probabilities/<stem>.png: head 2's "
                    "probability x 255 as an 8-bit picture.", **fv)
  serving.declare_key_flags(flag_values, model_flags + [
      "input", "recursive", "out_dir", "batch_size", "threshold", "overlays", "probabilities"])


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  missing = [name for name in ("checkpoint", "input", "out_dir") if not getattr(FLAGS, name)]
  if missing:
    raise app.UsageError("required: " + ", ".join(f"--{name}" for name in missing))
  try:
    paths, problems = find_inputs(FLAGS.input, recursive=FLAGS.recursive, exclude=FLAGS.out_dir)
    for problem in problems:
      print(f"skipped {problem['file']}: {problem['reason']}", file=sys.stderr)
    if not paths:
      raise ValueError(f"no pictures found in --input={','.join(FLAGS.input)} (image extensions "
                       f"{', '.join(layouts.IMAGE_EXTENSIONS)})")
    check_unique_stems(paths)
    loaded = serving.load_segmenter(FLAGS.checkpoint, prefer=FLAGS.prefer,
                                    height=FLAGS.height or None, width=FLAGS.width or None,
                                    precision_name=FLAGS.precision)
    summary = predict(loaded, paths, FLAGS.out_dir, threshold=FLAGS.threshold, tta=FLAGS.tta,
                      flips=FLAGS.tta_flips, batch_size=FLAGS.batch_size,
                      overlays=FLAGS.overlays, probabilities=FLAGS.probabilities,
                      progress=FLAGS.progress, input_problems=problems)
  except (checkpoint_lib.CheckpointNotFoundError, DataError, ValueError) as error:
    print(f"error: {error}", file=sys.stderr)
    return EXIT_ERROR
  skipped = summary["skipped"]
  print(f"wrote {summary['written']} mask(s) to {os.path.join(FLAGS.out_dir, MASKS_DIR)}"
        + (f"; skipped {len(skipped)}, listed in {os.path.join(FLAGS.out_dir, SUMMARY_FILE)}:"
           if skipped else ""))
  for item in skipped:
    print(f"  {item['file']}: {item['reason']}")
  if not summary["written"]:
    return EXIT_ERROR
  return EXIT_SKIPPED if skipped else EXIT_OK


def run() -> None:
  """The program: defines the flags and runs `main` (console-script entry point)."""
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
