"""`python tools/export_trt.py ...`: the deployment export, as `dunet-export-trt` (see
dunet/export_trt.py, or run with --help). Needs dunet installed: `pip install -e .` in the
checkout."""

import sys

try:
  from dunet import cli
except ImportError:
  sys.exit(
    "tools/export_trt.py needs the dunet package: run `pip install -e .` in the checkout first"
  )

if __name__ == "__main__":
  cli.silence_startup()  # before TensorFlow is imported
  from dunet import export_trt  # pylint: disable=g-import-not-at-top

  export_trt.run()
