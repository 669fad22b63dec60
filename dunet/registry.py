"""Lookup by name in the small tables behind flags (losses, initialisers, optimizers)."""

from typing import Mapping, TypeVar

Value = TypeVar("Value")


def lookup(table: Mapping[str, Value], name: str, kind: str) -> Value:
  """Returns `table[name]`.

  Args:
    table: the names a flag accepts and what each stands for.
    name: the name asked for.
    kind: what the table holds, for the error message ("loss", "optimizer").

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  try:
    return table[name]
  except KeyError:
    raise ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(table))}") from None
