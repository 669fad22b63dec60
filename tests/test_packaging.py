"""The package as a pip user gets it: a wheel installed non-editable into a fresh virtual
environment, every console script run from a folder outside the checkout."""

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

REPO = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPTS = (
  "dunet-train",
  "dunet-evaluate",
  "dunet-predict",
  "dunet-export",
  "dunet-export-trt",
  "dunet-prepare",
  "dunet-convert-keras",
  "dunet-results",
)
# Start-up lines that must not reach a user (dunet/cli.py silences them).
NOISE = ("absl::InitializeLog", "oneDNN", "cuInit", "cpu_feature_guard", "DeprecationWarning")


def _console_scripts_in_setup_cfg():
  text = (REPO / "setup.cfg").read_text()
  block = text.split("console_scripts =", 1)[1].split("\n[", 1)[0]
  return sorted(line.split("=")[0].strip() for line in block.strip().splitlines())


def test_every_console_script_is_tested_here():
  assert _console_scripts_in_setup_cfg() == sorted(CONSOLE_SCRIPTS)


def _check(completed, what):
  assert completed.returncode == 0, f"{what}: exit {completed.returncode}\n{completed.stderr}"
  for marker in NOISE:
    assert marker not in completed.stderr + completed.stdout, f"{what} printed {marker!r}"


# What the fresh venv must not take from the test environment: dunet itself (its editable
# install) and the packaging tools the venv has its own copies of.
_NOT_SHARED = (
  "dunet",
  "__editable__",
  "_distutils_hack",
  "pip",
  "setuptools",
  "wheel",
  "_virtualenv",
)


def _see_dependencies_of_this_environment(venv_root: Path, link_folder: Path) -> None:
  """Makes the test environment's installed packages, except dunet, visible to a venv.

  A second TensorFlow install costs about 2 GB of disk in every CI run (a CI machine once ran out
  of space in the middle of the suite), so the venv reads the dependencies through a folder of
  symbolic links named in a .pth file: the site-packages' own .pth files (the editable dunet's
  among them) are not run, and dunet's metadata is not linked, so pip sees no dunet installed.
  """
  link_folder.mkdir()
  for site_packages in {
    Path(p) for p in (sysconfig.get_path("purelib"), sysconfig.get_path("platlib"))
  }:
    for entry in site_packages.iterdir():
      name = entry.name.lower()
      if name.endswith(".pth") or name == "__pycache__" or name.startswith(_NOT_SHARED):
        continue
      if not (link_folder / entry.name).exists():
        (link_folder / entry.name).symlink_to(entry)
  (venv_site,) = (venv_root / "lib").glob("python*/site-packages")
  (venv_site / "test_environment_dependencies.pth").write_text(f"{link_folder}\n")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(bin folder, a folder outside the checkout) of a fresh venv holding only the wheel."""
  root = tmp_path_factory.mktemp("packaging")
  source = root / "source"  # a copy: building writes build/ and *.egg-info next to the sources
  local_only = {".git", ".venv", "build", "dist", "runs", "data", ".pytest_cache"}

  def ignore(folder, names):
    top = Path(folder) == REPO  # only the checkout's own data/, runs/...: dunet/data/ is code
    return [
      name
      for name in names
      if name == "__pycache__"
      or name.endswith(".egg-info")
      or (top and (name in local_only or name.startswith("workdir")))
    ]

  shutil.copytree(REPO, source, ignore=ignore)
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "--no-deps",
      "--no-build-isolation",
      "-q",
      "-w",
      str(root / "dist"),
      str(source),
    ],
    check=True,
    timeout=600,
  )
  (wheel,) = (root / "dist").glob("dunet-*.whl")
  venv.create(root / "venv", with_pip=True)
  bin_dir = root / "venv" / "bin"
  _see_dependencies_of_this_environment(root / "venv", root / "dependencies")
  # pip resolves the wheel's requirements against what the venv sees (an unmet or wrong
  # requirement fails here) and installs only dunet itself.
  subprocess.run(
    [str(bin_dir / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
    check=True,
    timeout=1200,
  )
  listed = subprocess.run(
    [str(bin_dir / "pip"), "list", "--disable-pip-version-check", "--format=json"],
    check=True,
    capture_output=True,
    text=True,
  ).stdout
  assert "tensorflow" in {entry["name"] for entry in json.loads(listed)}
  elsewhere = root / "elsewhere"
  elsewhere.mkdir()
  return bin_dir, elsewhere


def _run(installed, script, *args, timeout=600):
  bin_dir, elsewhere = installed
  env = {
    k: v
    for k, v in os.environ.items()
    if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONPATH", "VIRTUAL_ENV")
  }
  env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
  return subprocess.run(
    [str(bin_dir / script), *args],
    cwd=elsewhere,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


@pytest.mark.slow
def test_the_wheel_holds_the_package_and_its_configs_only(installed):
  bin_dir, elsewhere = installed
  site = subprocess.run(
    [str(bin_dir / "python"), "-c", "import dunet, os; print(os.path.dirname(dunet.__file__))"],
    cwd=elsewhere,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  assert not site.startswith(str(REPO)), site  # the installed copy, not the checkout
  shipped = sorted(path.name for path in Path(site, "configs").glob("*.flags"))
  assert shipped == sorted(path.name for path in (REPO / "configs").glob("*.flags"))


@pytest.mark.slow
@pytest.mark.parametrize("script", CONSOLE_SCRIPTS)
def test_every_console_script_shows_grouped_help(installed, script):
  completed = _run(installed, script, "--help", timeout=300)
  _check(completed, f"{script} --help")
  assert completed.stdout.startswith(f"usage: {script} ")
  assert f"{script} --helpfull" in completed.stdout
  assert len(completed.stdout.splitlines()) < 150  # the essentials, not every flag (--helpfull)
  assert ":\n  --" in completed.stdout  # a group title, then its flags


@pytest.mark.slow
def test_the_readme_first_command_trains_from_any_folder(installed):
  bin_dir, elsewhere = installed
  completed = _run(
    installed,
    "dunet-train",
    "--config=demo",
    "--max_steps=2",
    "--workdir=run",
    "--data_dir=data/demo",
  )
  _check(completed, "dunet-train --config=demo")
  workdir = elsewhere / "run"
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["step"] == 2
  # A short human summary, not the metrics' JSON.
  assert not completed.stdout.lstrip().startswith("{") and len(completed.stdout) < 1200
  recorded = (workdir / "flags.txt").read_text().splitlines()
  assert "--demo" in recorded and "--max_steps=2" in recorded
  assert not any("logtostderr" in line or "test_tmpdir" in line for line in recorded)
  # A usage error from the installed script: one line, exit status 2, no workdir.
  completed = _run(installed, "dunet-train", "--config=demo", "--batch_size=abc", "--workdir=never")
  assert completed.returncode == 2 and completed.stderr.count("\n") == 1, completed.stderr
  assert completed.stderr.startswith("dunet-train: error: flag --batch_size=abc")
  assert not (elsewhere / "never").exists()
