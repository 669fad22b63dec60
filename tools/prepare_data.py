"""Alias of `dunet-prepare` (`python -m dunet.prepare_data`): prepares a raw data set.

Kept so that `python tools/prepare_data.py ...` works as documented; run from a checkout after
`pip install -e .` (or anywhere after `pip install .`).
"""

import sys

try:
  from dunet import cli
except ImportError:  # not installed: say how, instead of a traceback
  sys.exit(
    "tools/prepare_data.py: error: the dunet package is not installed; run `pip install -e .` "
    "in the checkout first"
  )

if __name__ == "__main__":
  cli.silence_startup()  # before TensorFlow is imported
  from dunet import prepare_data  # pylint: disable=g-import-not-at-top

  prepare_data.run()
