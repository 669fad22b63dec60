"""What every dunet command line shares: start-up, flagfiles and configs, help, errors.

Each CLI module keeps a `main(argv)` that reads its flags and calls the library, and a `run()`
that hands it to `run(main, program=..., help_groups=...)` here. That gives every command:

- quiet start-up: TensorFlow's C++ start-up lines (oneDNN, CUDA probing, CPU features) and known
  third-party deprecation chatter are silenced unless the user passed `--verbose` or set
  `TF_CPP_MIN_LOG_LEVEL` themselves (`silence_startup`, called before TensorFlow is imported);
- `--flagfile=FILE` whose nested `--flagfile=` lines resolve relative to the file that holds
  them, and (for training) `--config=NAME`, a config shipped with the package;
- `--help` that lists the essential flags grouped by concern (`--helpfull`: every flag);
- usage errors (a bad flag, `app.UsageError`, `errors.ConfigError`) as one line naming the flag
  and "see --help", exit status 2; other `errors.DunetError`s as one line, exit status 1; any
  other exception is a bug and keeps its traceback.

This module imports TensorFlow only inside `silence_startup`, which the command modules and the
console-script entry points (dunet/console.py) call before anything else imports it.
"""

from __future__ import annotations

import logging as std_logging
import os
from pathlib import Path
import sys
import tempfile
import textwrap
from typing import Callable, Iterable, List, Optional, Sequence, Set, Tuple
import warnings

from dunet import errors

HelpGroups = Sequence[Tuple[str, Sequence[str]]]

VERBOSE_FLAG = "verbose"
CONFIG_FLAG = "config"
HELP_ARGS = frozenset({"--help", "-h", "-?", "--helpshort", "-help"})
# TensorFlow's C++ logging: 3 hides INFO, WARNING and ERROR lines (the start-up lines, among them
# "failed call to cuInit" on every machine without a GPU). Errors that matter reach Python as
# exceptions, which are always shown.
QUIET_TF_CPP_MIN_LOG_LEVEL = "3"
# Deprecation chatter of third-party packages that dunet cannot act on (tf2onnx, onnx, keras,
# numpy via TensorFlow), by the module that warns.
_QUIET_WARNING_MODULES = (
  "tf2onnx",
  "onnx",
  "onnxruntime",
  "keras",
  "tensorflow",
  "google",
  "absl",
  "numpy",
  "h5py",
)
# What TensorFlow's C++ libraries print while they load (before absl::InitializeLog, so
# TF_CPP_MIN_LOG_LEVEL does not reach them), by the source file or text of each line.
_STARTUP_NOISE = (
  "absl::InitializeLog()",
  "port.cc:",
  "cudart_stub.cc:",
  "cpu_feature_guard.cc:",
  "To enable the following instructions:",
  "cuda_platform.cc:",
  "cuda_dnn.cc:",
  "cuda_fft.cc:",
  "cuda_blas.cc:",
  "computation_placer.cc:",
)
USAGE_EXIT = 2
ERROR_EXIT = 1


# ================================================================================================
# Start-up noise
# ================================================================================================
def is_verbose(argv: Optional[Sequence[str]] = None) -> bool:
  """Whether the command line asks for --verbose (read before flags are parsed)."""
  argv = sys.argv if argv is None else argv
  for arg in argv[1:]:
    if arg in ("--verbose", "-verbose", "--verbose=true", "--verbose=1", "--verbose=True"):
      return True
  return False


def _is_startup_noise(line: str) -> bool:
  return any(marker in line for marker in _STARTUP_NOISE)


def _import_tensorflow_quietly() -> None:
  """Imports TensorFlow with the process's stderr captured, and passes on all but the noise.

  TensorFlow's C++ libraries log while they load, before absl::InitializeLog, and those lines
  ignore TF_CPP_MIN_LOG_LEVEL; only the file descriptor can catch them. Lines that are not
  known start-up noise are written back, and so is everything when the import fails.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as captured:
    os.dup2(captured.fileno(), 2)
    failed = True
    try:
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

      failed = False
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      text = captured.read().decode("utf-8", errors="replace")
      kept = [
        line for line in text.splitlines(keepends=True) if failed or not _is_startup_noise(line)
      ]
      sys.stderr.write("".join(kept))


def silence_startup(argv: Optional[Sequence[str]] = None) -> None:
  """Silences TensorFlow's C++ start-up lines and known deprecation warnings.

  Must run before TensorFlow is imported. Does nothing with --verbose, nor where the user set
  TF_CPP_MIN_LOG_LEVEL themselves (they chose what to see).
  """
  if is_verbose(argv) or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
    return
  os.environ["TF_CPP_MIN_LOG_LEVEL"] = QUIET_TF_CPP_MIN_LOG_LEVEL
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
  # Filters first, so that they also cover what TensorFlow's own import warns and logs.
  for module in _QUIET_WARNING_MODULES:
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
      warnings.filterwarnings("ignore", category=category, module=rf"{module}(\.|$)")
  # TensorFlow's Python logger: deprecation notices and internal INFO lines.
  for name in ("tensorflow", "tf2onnx", "h5py"):
    std_logging.getLogger(name).setLevel(std_logging.ERROR)
  # TensorFlow modules that log through absl, as dunet does (checkpoint sharding timings, renamed
  # SavedModel captures, fingerprints): their INFO lines go, dunet's own stay.
  std_logging.getLogger("absl").addFilter(_drop_third_party_info)
  _import_tensorflow_quietly()


def _drop_third_party_info(record: std_logging.LogRecord) -> bool:
  """False (drop) for an INFO/DEBUG line logged from TensorFlow's or tf2onnx's own files."""
  if record.levelno >= std_logging.WARNING:
    return True
  path = record.pathname.replace(os.sep, "/")
  return not any(part in path for part in ("/tensorflow/", "/tf2onnx/", "/tf_keras/", "/keras/"))


# ================================================================================================
# Flagfiles and shipped configs
# ================================================================================================
def config_dirs() -> List[Path]:
  """Where shipped configs live: in the installed package, or in the checkout (editable)."""
  package = Path(__file__).resolve().parent
  found = [package / "configs"]
  checkout = package.parent
  if (checkout / "setup.cfg").is_file():  # a source checkout, not site-packages
    found.append(checkout / "configs")
  return [path for path in found if path.is_dir()]


def config_names() -> List[str]:
  """The names `--config=NAME` accepts (configs/NAME.flags)."""
  names: Set[str] = set()
  for folder in config_dirs():
    names.update(path.stem for path in folder.glob("*.flags"))
  return sorted(names)


def config_path(name: str) -> Path:
  """The file of shipped config `name` (`cvc`, `cvc.flags` and `configs/cvc.flags` all work).

  Raises:
    errors.ConfigError: no such config; the message lists those that exist.
  """
  stem = Path(name).name
  if stem.endswith(".flags"):
    stem = stem[: -len(".flags")]
  for folder in config_dirs():
    candidate = folder / f"{stem}.flags"
    if candidate.is_file():
      return candidate
  raise errors.ConfigError(
    f"--config={name}: no such config; shipped configs: "
    f"{', '.join(config_names()) or 'none found'} (or pass "
    "--flagfile=PATH for a file of your own)"
  )


def _flag_value(arg: str, name: str) -> Optional[str]:
  """The value of `--name=value` / `-name=value`, else None."""
  for prefix in (f"--{name}=", f"-{name}="):
    if arg.startswith(prefix):
      return arg[len(prefix) :]
  return None


def _read_flagfile(path: Path, including: Optional[Path], stack: Tuple[Path, ...]) -> List[str]:
  """The flags of one flagfile, nested flagfiles expanded in place."""
  where = f" (included from {including})" if including else ""
  if path in stack:
    chain = " -> ".join(str(p) for p in (*stack, path))
    raise errors.ConfigError(f"--flagfile={path}: includes itself ({chain})")
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except OSError as error:
    raise errors.ConfigError(
      f"--flagfile={path}: cannot be read{where}: {error.strerror or error}"
    ) from error
  args: List[str] = []
  for number, raw in enumerate(lines, start=1):
    line = raw.strip()
    if not line or line.startswith("#") or line.startswith("//"):
      continue
    if not line.startswith("-"):
      raise errors.ConfigError(f"--flagfile={path}: line {number} is not a flag: {line!r}")
    args.extend(_expand_arg(line, base=path.parent, including=path, stack=(*stack, path)))
  return args


def _resolve_flagfile(value: str, base: Optional[Path]) -> Path:
  """A nested flagfile is relative to the file that includes it; the command line's to the
  current folder. (A nested path that exists only from the current folder still works: the
  form older configs used.)"""
  path = Path(os.path.expanduser(value))
  if path.is_absolute() or base is None:
    return path.absolute()
  relative = base / path
  if relative.exists() or not path.exists():
    return relative
  return path.absolute()


def _expand_arg(
  arg: str,
  base: Optional[Path],
  including: Optional[Path],
  stack: Tuple[Path, ...],
  configs: bool = True,
) -> List[str]:
  flagfile = _flag_value(arg, "flagfile")
  if flagfile is not None:
    return _read_flagfile(_resolve_flagfile(flagfile, base), including, stack)
  config = _flag_value(arg, CONFIG_FLAG) if configs else None
  if config is not None:
    return _read_flagfile(config_path(config), including, stack)
  return [arg]


def expand_argv(argv: Sequence[str], configs: bool = False) -> List[str]:
  """argv with every `--flagfile=FILE` (and, with `configs`, `--config=NAME`) replaced by the
  flags it holds, in place, so later flags override earlier ones as absl does.

  `--flagfile FILE` (two arguments) is accepted too. Nested flagfiles resolve relative to the
  file that includes them.

  Raises:
    errors.ConfigError: a file that cannot be read, a line that is not a flag, a cycle, an
      unknown config name.
  """
  expanded = [argv[0]] if argv else []
  args = list(argv[1:])
  index = 0
  while index < len(args):
    arg = args[index]
    if arg == "--":
      expanded.extend(args[index:])
      break
    if arg in ("--flagfile", "-flagfile") or (configs and arg in ("--config", "-config")):
      if index + 1 == len(args):
        raise errors.ConfigError(f"{arg} needs a value")
      arg = f"{arg}={args[index + 1]}"
      index += 1
    expanded.extend(_expand_arg(arg, base=None, including=None, stack=(), configs=configs))
    index += 1
  return expanded


# ================================================================================================
# Help
# ================================================================================================
def _flag_line(flag) -> str:
  name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
  help_text = " ".join((flag.help or "").split())
  default = flag.default
  if isinstance(default, (list, tuple)):
    default = ",".join(str(item) for item in default)
  if default not in (None, "", []):
    help_text += f" (default: {default})"
  body = textwrap.fill(help_text, width=96, initial_indent="      ", subsequent_indent="      ")
  return f"  {name}\n{body}"


def format_help(
  flag_values, program: str, summary: str, help_groups: HelpGroups, configs: bool
) -> str:
  """The `--help` text: the essential flags by concern, then where the rest are."""
  parts = [f"usage: {program} [--flag=value ...]"]
  if configs:
    parts[0] = f"usage: {program} [--config=NAME | --flagfile=FILE] [--flag=value ...]"
  if summary:
    parts.append(summary.strip())
  shown = 0
  for title, names in help_groups:
    lines = [_flag_line(flag_values[name]) for name in names if name in flag_values]
    shown += len(lines)
    if lines:
      parts.append(f"{title}:\n" + "\n".join(lines))
  if configs:
    parts.append("Shipped configs (--config=NAME): " + ", ".join(config_names()))
  total = len({flag_values[name].name for name in _dunet_flag_names(flag_values)})
  parts.append(f"{shown} of {program}'s {total} flags shown; all of them: {program} --helpfull")
  return "\n\n".join(parts) + "\n"


# ================================================================================================
# The workdir's record of a run's flags
# ================================================================================================
def _is_dunet_module(module_name: str) -> bool:
  if module_name == "dunet" or module_name.startswith("dunet."):
    return True
  # Under `python -m dunet.train` the defining module is named by its file.
  path = Path(module_name)
  return path.suffix == ".py" and path.resolve().parent.is_relative_to(
    Path(__file__).resolve().parent
  )


def _dunet_flag_names(flag_values) -> List[str]:
  names = []
  for module, module_flags in flag_values.flags_by_module_dict().items():
    if _is_dunet_module(module):
      names.extend(flag.name for flag in module_flags)
  return sorted(set(names))


def dunet_flags_string(flag_values) -> str:
  """dunet's flags (not absl's or TensorFlow's) as flagfile lines that replay the run.

  Every dunet flag with a value is written, defaults included, so the file keeps meaning the
  same run if a default changes later. `--config` is left out: its flags are written out.
  """
  lines = []
  for name in _dunet_flag_names(flag_values):
    flag = flag_values[name]
    if name == CONFIG_FLAG or flag.value is None:
      continue
    lines.append(flag.serialize())
  return "\n".join(lines) + "\n"


# ================================================================================================
# Running a main
# ================================================================================================
def _fail(program: str, message: str, code: int, usage: bool) -> None:
  message = " ".join(str(message).split()) or "failed"
  suffix = " (see --help)" if usage and "--help" not in message else ""
  print(f"{program}: error: {message}{suffix}", file=sys.stderr)
  sys.exit(code)


def _define_common_flags(flag_values, configs: bool) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  if VERBOSE_FLAG not in flag_values:
    flags.DEFINE_bool(
      VERBOSE_FLAG,
      False,
      "Show TensorFlow's start-up and deprecation messages "
      "(also shown when TF_CPP_MIN_LOG_LEVEL is set).",
      flag_values=flag_values,
    )
  if configs and CONFIG_FLAG not in flag_values:
    flags.DEFINE_string(
      CONFIG_FLAG,
      None,
      "A shipped config by name (configs/NAME.flags, e.g. "
      "cvc, demo; see the list below); later flags override its values.",
      flag_values=flag_values,
    )


def make_flags_parser(
  flag_values, program: str, summary: str, help_groups: HelpGroups, configs: bool
) -> Callable[[List[str]], List[str]]:
  """An absl `flags_parser`: expands flagfiles/configs, prints grouped help, one-line errors."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  def parse(argv: List[str]) -> List[str]:
    if any(arg in HELP_ARGS for arg in argv[1:]):
      print(format_help(flag_values, program, summary, help_groups, configs), end="")
      sys.exit(0)
    try:
      expanded = expand_argv(argv, configs=configs)
      return flag_values(expanded)
    except errors.ConfigError as error:
      _fail(program, str(error), USAGE_EXIT, usage=True)
    except flags.Error as error:
      _fail(program, str(error), USAGE_EXIT, usage=True)
    return []  # not reached

  return parse


def wrap_main(
  main: Callable[[List[str]], Optional[int]], program: str
) -> Callable[[List[str]], Optional[int]]:
  """main with dunet's error conventions (see the module docstring)."""
  from absl import app  # pylint: disable=g-import-not-at-top

  def wrapped(argv: List[str]) -> Optional[int]:
    try:
      return main(argv)
    except (app.UsageError, errors.ConfigError) as error:
      _fail(program, str(error), USAGE_EXIT, usage=True)
    except errors.DunetError as error:
      _fail(program, str(error), ERROR_EXIT, usage=False)
    return None  # not reached

  return wrapped


def run(
  main: Callable[[List[str]], Optional[int]],
  *,
  program: str,
  help_groups: HelpGroups = (),
  configs: bool = False,
  summary: str = "",
  argv: Optional[Sequence[str]] = None,
) -> None:
  """Runs `main` as absl's app.run does, with dunet's conventions (module docstring).

  Args:
    main: argv -> exit status; reads the parsed flags.
    program: the command's name in messages (`dunet-train`).
    help_groups: (title, flag names) of the essential flags `--help` shows.
    configs: accept `--config=NAME` (a shipped configs/NAME.flags).
    summary: a paragraph `--help` shows under the usage line (default: the module's docstring's
      first line is not known here, so pass it).
    argv: instead of sys.argv (tests).
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  flag_values = flags.FLAGS
  _define_common_flags(flag_values, configs)

  app.run(
    wrap_main(main, program),
    argv=list(argv) if argv is not None else None,
    flags_parser=make_flags_parser(flag_values, program, summary, help_groups, configs),
  )


def docstring_summary(module_doc: Optional[str]) -> str:
  """The first paragraph of a CLI module's docstring, for `--help`."""
  return (module_doc or "").strip().split("\n\n")[0]


def unknown_names(names: Iterable[str], flag_values) -> List[str]:
  """Names in a HELP_GROUPS list that are not flags (a test keeps every list true)."""
  return [name for name in names if name not in flag_values]
