"""User values checked in one place for the app, the CLI and the Python API: N, steps, the stop step,
seeds, sample counts, the filter and the sampler. Each check returns the clean value or raises a
ValueError (TypeError for a wrong Python type) whose message names the value and says what is allowed.

Python callers get strict types (an N of 8.0 is a mistake in code); the app and the CLI hand over text
and numbers from widgets, so `from_text=True` also takes "8", " 8 " and 8.0, but never 8.5.
"""
from __future__ import annotations

import operator
import re
import secrets
from typing import Any, Sequence

from .filters import check_factor, check_kernel
from .schedule import parse_steps

SAMPLERS = ("ddpm", "ddim")
MAX_SEED = 2 ** 63 - 1  # torch.Generator seeds are 64-bit; the API takes 0 .. 2**63 - 1
_WHOLE_TEXT = re.compile(r"[+-]?\d+(\.0*)?")


def whole_number(value: Any, what: str, *, from_text: bool = False) -> int:
    """An int from an int, a numpy integer or a one-element integer tensor (and with from_text, from
    text or a float that is a whole number); never from a bool or a fraction."""
    if isinstance(value, bool):
        raise (ValueError if from_text else TypeError)(f"{what} must be a whole number, got {value!r}")
    if from_text:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{what} must be a whole number, got {value}")
            return int(value)
        if not isinstance(value, (int, str)) and hasattr(value, "__index__"):
            return operator.index(value)
        text = str(value if value is not None else "").strip()
        if not _WHOLE_TEXT.fullmatch(text):
            raise ValueError(f"{what} must be a whole number, got {text!r}")
        return int(float(text))
    if isinstance(value, float):
        raise TypeError(f"{what} must be a whole number, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be a whole number, got {value!r}") from None


def whole_numbers(values: Any, what: str) -> list[int]:
    """'4, 8 16' or [4, 8, 16] -> [4, 8, 16], duplicates dropped, order kept (at least one value)."""
    parts = list(values) if isinstance(values, (list, tuple)) else re.split(r"[,\s;]+", str(values or "").strip())
    out = [whole_number(p, what, from_text=True) for p in parts if str(p).strip()]
    if not out:
        raise ValueError(f"give at least one {what}")
    return list(dict.fromkeys(out))


def n_factor(value: Any, image_size: int, *, from_text: bool = False) -> int:
    """N of phi_N: a whole number >= 1 dividing the image size (the message lists the valid ones)."""
    n = whole_number(value, "N", from_text=from_text)
    check_factor(image_size, n)
    return n


def n_factors(values: Any, image_size: int, limit: int | None = None) -> list[int]:
    """A list of N values for a sweep, each dividing the image size, at most `limit` of them."""
    out = whole_numbers(values, "N value")
    if limit is not None and len(out) > limit:
        raise ValueError(f"at most {limit} N values per grid, got {len(out)}")
    for n in out:
        check_factor(image_size, n)
    return out


def steps(spec: str | int, num_train_timesteps: int) -> int:
    """The number of respaced steps a spec (250, 'ddim50', '100,50') gives; raises for a bad spec."""
    return len(parse_steps(spec, num_train_timesteps))


def stop_step(value: Any, num_train_timesteps: int, what: str = "stop step", *, from_text: bool = False) -> int:
    """The end of the conditioning range on the training scale: 0 (every step) .. num_train_timesteps (none)."""
    if from_text and value in (None, ""):
        value = 0
    stop = whole_number(value, what, from_text=from_text)
    if not 0 <= stop <= num_train_timesteps:
        raise ValueError(f"{what} must be between 0 and {num_train_timesteps}, got {stop}")
    return stop


def stop_steps(values: Any, num_train_timesteps: int, limit: int | None = None) -> list[int]:
    out = whole_numbers(values, "stop step")
    if limit is not None and len(out) > limit:
        raise ValueError(f"at most {limit} stop steps per grid, got {len(out)}")
    return [stop_step(v, num_train_timesteps) for v in out]


def seeds(values: Sequence[int]) -> list[int]:
    """One seed per sample as Python ints (numpy and torch integers too), each 0 <= seed <= MAX_SEED."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"seeds must be a list of integers, one per sample (e.g. [0, 1, 2]), got {values!r}")
    out = [whole_number(s, "seed") for s in values]
    if not out:
        raise ValueError("ask for at least one sample (seeds is empty)")
    bad = [s for s in out if not 0 <= s <= MAX_SEED]
    if bad:
        raise ValueError(f"seeds must be between 0 and 2**63 - 1, got {bad[0]}")
    return out


def seed_range(seed: Any, count: int, max_seed: int = MAX_SEED) -> list[int]:
    """count consecutive seeds from a typed seed; empty or negative picks a random start."""
    base = whole_number(seed if seed not in (None, "") else -1, "seed", from_text=True)
    if base < 0:
        base = secrets.randbelow(1_000_000)
    if base + count - 1 > max_seed:
        raise ValueError(f"seed must be at most {max_seed - count + 1}")
    return [base + k for k in range(count)]


def sample_count(value: Any, limit: int) -> int:
    k = whole_number(value, "number of samples", from_text=True)
    if not 1 <= k <= limit:
        raise ValueError(f"number of samples must be between 1 and {limit}, got {k}")
    return k


def kernel(name: Any) -> str:
    check_kernel(name)
    return name


def sampler(name: Any) -> str:
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    return name


def eta(value: float) -> float:
    if not 0 <= value <= 1:
        raise ValueError(f"eta must be between 0 and 1, got {value}")
    return float(value)
