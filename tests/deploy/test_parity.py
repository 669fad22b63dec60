"""dunet/deploy/parity.py: per-output differences, mask disagreement, and the tolerance check."""

import numpy as np
import pytest

from dunet.deploy import parity
from dunet.errors import ExportError


def test_parity_stats_and_tolerance():
  expected = {"probability": np.array([0.1, 0.6, 0.9]), "probability_head1": np.zeros(3)}
  got = {"probability": np.array([0.1, 0.4, 0.95]), "probability_head1": np.zeros(3)}
  stats = parity.parity_stats(expected, got)
  assert stats["probability"] == pytest.approx(
    {"max_abs": 0.2, "mean_abs": 0.25 / 3, "mask_disagreement": 1 / 3}
  )
  assert parity.check_parity("x", stats, 0.2) == pytest.approx(0.2)
  with pytest.raises(ExportError, match="x: largest difference .* 0.2 exceeds"):
    parity.check_parity("x", stats, 0.1)
  got["probability"][0] = np.nan
  with pytest.raises(ExportError):
    parity.check_parity("x", parity.parity_stats(expected, got), 1.0)
