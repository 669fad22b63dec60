"""configs/*.flags: every experiment config parses, composes with base.flags (a nested flagfile,
relative to the including file), has the paper's settings, can be overridden on the command line,
and its header gives the commands to prepare and run it."""

import os
import re

from absl import flags
from absl.testing import flagsaver
import pytest

from dunet import cli
from dunet import train  # noqa: F401  (defines the flags the configs set)

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

# The paper's settings per data set (Jha et al. 2020, section IV; ../shared/DESIGN.md).
PAPER = {
  "cvc": dict(loss="bce", optimizer="nadam", learning_rate=1e-5),
  "etis": dict(loss="bce", optimizer="nadam", learning_rate=1e-5),
  "kvasir": dict(loss="bce", optimizer="nadam", learning_rate=1e-5),
  "isic2018": dict(loss="dice", optimizer="adam", learning_rate=1e-4),
  "dsb2018": dict(loss="dice", optimizer="nadam", learning_rate=1e-4),
}


def _parse(*argv):
  """The flag values dunet-train would see (its flagfile and --config expansion, then absl)."""
  FLAGS.unparse_flags()
  FLAGS(cli.expand_argv(["dunet-train", *argv], configs=True))
  return {name: FLAGS[name].value for name in FLAGS}


@pytest.fixture(autouse=True)
def _elsewhere(monkeypatch, tmp_path):
  # Nested flagfiles resolve relative to the including file, so configs work from any folder;
  # the tests run from an unrelated one (only the first argument's path is relative to it).
  monkeypatch.chdir(tmp_path)
  with flagsaver.flagsaver():
    yield
  FLAGS.unparse_flags()


def test_a_config_by_name_and_by_path_from_any_folder_are_the_same():
  by_path = _parse(f"--flagfile={CONFIGS}/cvc.flags")
  assert by_path["loss"] == "bce" and by_path["batch_size"] == 16  # base.flags was included
  assert _parse("--config=cvc") == by_path
  assert _parse("--config", "cvc") == by_path


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_compose_with_base_and_hold_the_paper_settings(name):
  values = _parse(f"--config={name}")
  assert values["batch_size"] == 16 and values["epochs"] == 300  # from base.flags
  # The reference's callbacks: plateau on the validation loss (patience 20), early stop after 50.
  assert (
    values["lr_schedule"],
    values["monitor"],
    values["plateau_patience"],
    values["early_stopping_patience"],
  ) == ("plateau", "loss", 20, 50)
  for flag, expected in PAPER[name].items():
    assert values[flag] == expected, flag
  assert values["workdir"] == f"runs/{name}"
  assert values["data_dir"].startswith("data/")
  assert values["height"] == 0  # the size comes from the prepared data


def test_command_line_overrides_a_config():
  values = _parse("--config=cvc", "--batch_size=4", "--learning_rate=3e-4")
  assert (values["batch_size"], values["learning_rate"]) == (4, 3e-4)
  assert values["loss"] == "bce"


def test_demo_config_is_small():
  values = _parse("--config=demo")
  assert values["demo"] and values["height"] == values["width"] == 64
  assert values["epochs"] * values["demo_count"] <= 20000


@pytest.mark.parametrize("name", sorted(PAPER))
def test_each_paper_config_has_an_improved_sibling(name):
  paper = _parse(f"--config={name}")
  improved = _parse(f"--config={name}_improved")
  recipe = _parse("--config=improved")
  # The same data and schedule length, its own workdir.
  assert improved["data_dir"] == paper["data_dir"]
  assert (improved["batch_size"], improved["epochs"]) == (paper["batch_size"], paper["epochs"])
  assert improved["workdir"] == f"runs/{name}_improved" != paper["workdir"]
  for flag in (
    "optimizer",
    "learning_rate",
    "lr_schedule",
    "loss",
    "loss_reduction",
    "batch_norm_statistics",
    "vgg19_init",
    "preprocessing",
  ):
    assert improved[flag] == recipe[flag], flag
  assert improved["augment"]  # long runs keep the augmentation
  # The paper configs keep the reference's training recipe (loss reduction, initialisers,
  # BatchNorm momentum), evaluated with precise statistics (which change no weight).
  assert (paper["loss_reduction"], paper["vgg19_init"], paper["batch_norm_momentum"]) == (
    "reference",
    "glorot_uniform",
    0.99,
  )
  assert paper["batch_norm_statistics"] == "precise"
  text = open(os.path.join(CONFIGS, f"{name}_improved.flags")).read()
  assert f"configs/{name}.flags keeps the paper's" in text


def test_the_demo_uses_the_improved_recipe():
  demo = _parse("--config=demo")
  recipe = _parse("--config=improved")
  for flag in (
    "optimizer",
    "learning_rate",
    "loss",
    "batch_norm_statistics",
    "vgg19_init",
    "preprocessing",
    "augment",
  ):
    assert demo[flag] == recipe[flag], flag


@pytest.mark.parametrize("path", sorted(os.listdir(CONFIGS)))
def test_every_header_gives_its_command_and_expected_result(path):
  text = open(os.path.join(CONFIGS, path)).read()
  if path == "base.flags":
    assert "Included by the data set configs with --flagfile=base.flags" in text
    return
  if path == "improved.flags":
    assert "--flagfile=improved.flags" in text and "profiling/results/quality.md" in text
    return
  name = path[: -len(".flags")]
  assert f"dunet-train --config={name} " in text, path
  assert re.search(rf"python -m dunet\.train --flagfile=configs/{name}\.flags", text), path
  assert "Expected" in text, path
  if name != "demo":
    assert "dunet-prepare --raw_dir=" in text, path


def test_every_config_is_a_shipped_name():
  assert set(cli.config_names()) == {path[: -len(".flags")] for path in os.listdir(CONFIGS)}
