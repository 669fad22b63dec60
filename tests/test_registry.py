"""dunet/registry.py: lookup by name, with errors that list the valid names."""

import pytest

from dunet import registry


def test_returns_the_entry():
  assert registry.lookup({"a": 1, "b": 2}, "b", "thing") == 2


def test_unknown_name_lists_the_valid_ones_sorted():
  with pytest.raises(ValueError, match=r"unknown thing 'c'; valid names: a, b$"):
    registry.lookup({"b": 2, "a": 1}, "c", "thing")
