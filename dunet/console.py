"""Console-script entry points (setup.cfg): silence start-up noise, then run the command.

Each entry imports its command's module only after `cli.silence_startup()`, because
TensorFlow's C++ start-up lines are printed when TensorFlow is imported, which every command
module does at its top.
"""

import importlib

from dunet import cli


def _launch(module_name: str) -> None:
  cli.silence_startup()
  importlib.import_module(f"dunet.{module_name}").run()


def train() -> None:
  """dunet-train."""
  _launch("train")


def evaluate() -> None:
  """dunet-evaluate."""
  _launch("evaluate")


def predict() -> None:
  """dunet-predict."""
  _launch("predict")


def export() -> None:
  """dunet-export."""
  _launch("export")


def export_trt() -> None:
  """dunet-export-trt."""
  _launch("export_trt")


def prepare() -> None:
  """dunet-prepare."""
  _launch("prepare_data")


def convert_keras() -> None:
  """dunet-convert-keras."""
  _launch("convert_keras")


def results() -> None:
  """dunet-results."""
  _launch("results_table")
