"""dunet/cli.py: flagfiles and configs, grouped help, one-line errors, quiet start-up."""

import os
import subprocess
import sys

from absl import app
from absl import flags
import pytest

from dunet import cli
from dunet import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


# ================================================================================================
# Flagfiles and configs
# ================================================================================================
def test_nested_flagfiles_resolve_relative_to_the_file_that_includes_them(tmp_path, monkeypatch):
  _write(tmp_path / "a" / "top.flags", "# a comment\n--flagfile=sub/mid.flags\n--x=top\n")
  _write(
    tmp_path / "a" / "sub" / "mid.flags",
    "// another comment\n\n--flagfile=../base.flags\n--y=mid\n",
  )
  _write(tmp_path / "a" / "base.flags", "--x=base\n--y=base\n--z=base\n")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  argv = cli.expand_argv(["prog", "--w=1", f"--flagfile={tmp_path}/a/top.flags", "--z=cli"])
  # In place, so that later values override earlier ones as absl applies them.
  assert argv == [
    "prog",
    "--w=1",
    "--x=base",
    "--y=base",
    "--z=base",
    "--y=mid",
    "--x=top",
    "--z=cli",
  ]
  monkeypatch.chdir(tmp_path)
  assert cli.expand_argv(["prog", "--flagfile", "a/top.flags"]) == argv[:1] + argv[2:-1]


def test_a_nested_path_that_exists_only_from_the_current_folder_still_works(tmp_path, monkeypatch):
  _write(tmp_path / "configs" / "base.flags", "--x=1\n")
  _write(tmp_path / "configs" / "old.flags", "--flagfile=configs/base.flags\n")
  monkeypatch.chdir(tmp_path)
  assert cli.expand_argv(["prog", "--flagfile=configs/old.flags"]) == ["prog", "--x=1"]


def test_flagfile_errors_name_the_file_and_line(tmp_path):
  _write(tmp_path / "loop.flags", f"--flagfile={tmp_path}/loop.flags\n")
  with pytest.raises(errors.ConfigError, match="includes itself"):
    cli.expand_argv(["prog", f"--flagfile={tmp_path}/loop.flags"])
  _write(tmp_path / "bad.flags", "--x=1\nbatch_size=3\n")
  with pytest.raises(errors.ConfigError, match=r"bad\.flags: line 2 is not a flag: 'batch_size=3'"):
    cli.expand_argv(["prog", f"--flagfile={tmp_path}/bad.flags"])
  with pytest.raises(errors.ConfigError, match=r"nope\.flags: cannot be read"):
    cli.expand_argv(["prog", f"--flagfile={tmp_path}/nope.flags"])
  with pytest.raises(errors.ConfigError, match="needs a value"):
    cli.expand_argv(["prog", "--flagfile"])


def test_config_names_are_the_shipped_files():
  assert {"cvc", "demo", "base", "improved"} <= set(cli.config_names())
  assert cli.config_path("cvc") == cli.config_path("configs/cvc.flags")
  assert cli.config_path("demo").read_text().startswith("# Synthetic")
  with pytest.raises(
    errors.ConfigError, match="--config=cvd: no such config; shipped configs: .*cvc"
  ):
    cli.config_path("cvd")
  # Only commands that take configs expand --config.
  assert cli.expand_argv(["prog", "--config=cvc"]) == ["prog", "--config=cvc"]
  assert "--loss=bce" in cli.expand_argv(["prog", "--config=cvc"], configs=True)


# ================================================================================================
# Help, errors
# ================================================================================================
def _flag_values():
  flag_values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "Where it goes.", flag_values=flag_values)
  flags.DEFINE_integer("batch_size", 16, "Images per step.", flag_values=flag_values)
  flags.DEFINE_bool("fast", False, "Go fast.", flag_values=flag_values)
  flags.DEFINE_integer("hidden", 1, "Not shown by --help.", flag_values=flag_values)
  return flag_values


def test_help_lists_the_groups_in_order_and_points_to_helpfull(capsys):
  parse = cli.make_flags_parser(
    _flag_values(),
    "prog",
    "Does a thing.",
    [("Run", ["workdir"]), ("Speed", ["batch_size", "fast"])],
    configs=False,
  )
  with pytest.raises(SystemExit) as exit_info:
    parse(["prog", "--batch_size=3", "--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  assert (
    text.index("Does a thing.")
    < text.index("Run:")
    < text.index("--workdir")
    < text.index("Speed:")
    < text.index("--batch_size")
    < text.index("--[no]fast")
  )
  assert "Images per step. (default: 16)" in text
  assert "--hidden" not in text and "prog --helpfull" in text


@pytest.mark.parametrize(
  "argv, expected",
  [
    (["prog", "--batch_size=x"], "prog: error: flag --batch_size=x: invalid literal"),
    (["prog", "--nosuch=1"], "prog: error: Unknown command line flag 'nosuch'"),
    (["prog", "--flagfile=/nope/x.flags"], "prog: error: --flagfile=/nope/x.flags: cannot be "),
  ],
)
def test_a_bad_command_line_is_one_line_and_exit_status_2(argv, expected, capsys):
  parse = cli.make_flags_parser(_flag_values(), "prog", "", [], configs=False)
  with pytest.raises(SystemExit) as exit_info:
    parse(argv)
  assert exit_info.value.code == cli.USAGE_EXIT
  err = capsys.readouterr().err
  assert err.startswith(expected) and err.endswith("(see --help)\n") and err.count("\n") == 1


def test_parsing_returns_the_remaining_arguments():
  flag_values = _flag_values()
  parse = cli.make_flags_parser(flag_values, "prog", "", [], configs=False)
  assert parse(["prog", "--batch_size=3", "extra"]) == ["prog", "extra"]
  assert flag_values.batch_size == 3


def _raises(error):
  def main(argv):
    del argv
    raise error

  return main


@pytest.mark.parametrize(
  "error, code, line",
  [
    (app.UsageError("--workdir is required"), 2, "prog: error: --workdir is required (see --help)"),
    (
      errors.ConfigError("--batch_size=3 is odd"),
      2,
      "prog: error: --batch_size=3 is odd (see --help)",
    ),
    (
      errors.DataError("/data/x.png", "truncated\nPNG"),
      1,
      "prog: error: /data/x.png: truncated PNG",
    ),
    (
      errors.CheckpointNotFoundError("no checkpoint in /runs/a"),
      1,
      "prog: error: no checkpoint in /runs/a",
    ),
  ],
)
def test_expected_errors_become_one_line(error, code, line, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.wrap_main(_raises(error), "prog")(["prog"])
  assert exit_info.value.code == code
  assert capsys.readouterr().err == line + "\n"


def test_any_other_exception_keeps_its_traceback():
  with pytest.raises(ValueError, match="a bug"):
    cli.wrap_main(_raises(ValueError("a bug")), "prog")(["prog"])
  assert cli.wrap_main(lambda argv: 3, "prog")(["prog"]) == 3


# ================================================================================================
# flags.txt
# ================================================================================================
def test_only_dunet_flags_are_recorded():
  # dunet.train's flags (other test files import it too; a second command module in this
  # process would define some of the same names again).
  from dunet import train  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

  flags.FLAGS.unparse_flags()
  flags.FLAGS(["prog", "--seed=7"])
  try:
    lines = cli.dunet_flags_string(flags.FLAGS).splitlines()
  finally:
    flags.FLAGS.unparse_flags()
  assert "--seed=7" in lines and "--batch_size=16" in lines and "--nodemo" in lines
  assert not any(line.startswith("--workdir") for line in lines)  # None: not set
  # absl's and TensorFlow's own flags stay out.
  assert not any(
    name in text
    for text in lines
    for name in ("logtostderr", "test_tmpdir", "alsologtostderr", "xla_")
  )
  assert cli._is_dunet_module(os.path.join(REPO, "dunet", "train.py"))
  assert not cli._is_dunet_module(os.path.join(os.path.dirname(flags.__file__), "_flag.py"))


# ================================================================================================
# A real command: quiet start-up, one line, nothing written
# ================================================================================================
def _run(args, env_extra=None):
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  env.update(env_extra or {})
  return subprocess.run(
    [sys.executable, "-m", "dunet.prepare_data", *args],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    check=False,
  )


def test_a_command_starts_quietly_and_fails_in_one_line_before_writing(tmp_path):
  out_dir = tmp_path / "out"
  completed = _run([f"--raw_dir={tmp_path}", f"--out_dir={out_dir}", "--height=60", "--width=64"])
  assert completed.returncode == 2
  assert completed.stderr == (
    "dunet-prepare: error: --height=60 is not divisible by 16, which "
    "DoubleU-Net's four 2x poolings need (e.g. 48) (see --help)\n"
  )
  assert not out_dir.exists()
  # An error found reading the data: exit status 1, still one line, still nothing written.
  (tmp_path / "raw").mkdir()
  completed = _run(
    [f"--raw_dir={tmp_path / 'raw'}", f"--out_dir={out_dir}", "--height=64", "--width=64"]
  )
  assert completed.returncode == 1
  assert completed.stderr.startswith(f"dunet-prepare: error: {tmp_path / 'raw'}: ")
  assert completed.stderr.count("\n") == 1 and not out_dir.exists()
  # --verbose lets TensorFlow's start-up lines through, before the same one-line error.
  verbose = _run(
    ["--verbose", f"--raw_dir={tmp_path}", f"--out_dir={out_dir}", "--height=60", "--width=64"]
  )
  assert verbose.returncode == 2 and len(verbose.stderr.splitlines()) > 1
  assert verbose.stderr.splitlines()[-1].startswith("dunet-prepare: error: --height=60 ")
