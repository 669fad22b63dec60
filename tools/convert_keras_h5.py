"""Alias of `dunet-convert-keras` (`python -m dunet.convert_keras`): the authors' Keras weights.

Kept so that `python tools/convert_keras_h5.py ...` works as documented; run from a checkout after
`pip install -e .` (or anywhere after `pip install .`).
"""

import sys

try:
  from dunet import cli
except ImportError:  # not installed: say how, instead of a traceback
  sys.exit(
    "tools/convert_keras_h5.py: error: the dunet package is not installed; run `pip install -e .` "
    "in the checkout first"
  )

if __name__ == "__main__":
  cli.silence_startup()  # before TensorFlow is imported
  from dunet import convert_keras  # pylint: disable=g-import-not-at-top

  convert_keras.run()
