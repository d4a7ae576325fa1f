"""Checks shared by the config dataclasses (UNetConfig, DiffusionConfig): a value from a hand-edited
config.json or a --model-option must fail when the config is made, with its name, not deep inside
a forward pass or a schedule with a raw TypeError or ZeroDivisionError."""
from __future__ import annotations

from dataclasses import fields
from typing import Any


def check_field_types(config: Any) -> None:
    """Raise TypeError for a field whose value is not of its declared kind (int, float, bool, str, a tuple
    of numbers; None where allowed)."""
    for f in fields(config):
        value, kind = getattr(config, f.name), str(f.type)
        if value is None and "None" in kind:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {"int": isinstance(value, int) and not isinstance(value, bool), "float": number,
              "bool": isinstance(value, bool), "str": isinstance(value, str),
              "tuple": isinstance(value, tuple) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        for v in value)}.get(kind.split("[")[0].split(" ")[0], True)
        if not ok:
            raise TypeError(f"{f.name} must be {kind}, got {value!r}")


def check_positive(config: Any, *names: str) -> None:
    """Raise ValueError for a count or size that is not at least 1 (for a tuple: any of its entries)."""
    for name in names:
        value = getattr(config, name)
        values = value if isinstance(value, tuple) else (value,)
        if not values or any(v <= 0 for v in values):
            raise ValueError(f"{name} must be {'a non-empty list of numbers' if isinstance(value, tuple) else 'a number'}"
                             f" above 0, got {value!r}")
