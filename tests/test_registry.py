"""The paper's presets scaled to any model size are always valid N (divisors of the size)."""
from __future__ import annotations

import pytest

from ilvr.registry import PAPER_PRESETS, generation_factors, scaled_factor


def test_paper_sizes_keep_the_paper_presets():
    assert {t: scaled_factor(t, 256) for t in PAPER_PRESETS} == PAPER_PRESETS
    assert {t: scaled_factor(t, 64) for t in PAPER_PRESETS} == {"generation": 4, "translation": 8, "paint": 16,
                                                                 "scribble": 2}
    assert generation_factors(256) == [2, 4, 8, 16, 32, 64, 128]
    assert generation_factors(64) == [2, 4, 8, 16, 32]


@pytest.mark.parametrize("size", [16, 28, 32, 40, 48, 64, 96, 100, 128, 192, 256, 512])
def test_presets_and_sweeps_divide_any_size(size):
    for task in PAPER_PRESETS:
        assert size % scaled_factor(task, size) == 0
    sweep = generation_factors(size)
    assert sweep and all(size % n == 0 for n in sweep)
    assert sweep == sorted(set(sweep)) and sweep[0] == 2 and sweep[-1] <= size // 2


def test_odd_sizes_get_the_nearest_divisor():
    assert scaled_factor("translation", 28) == 4  # 32 * 28 / 256 = 3.5
    assert generation_factors(28) == [2, 4, 7, 14]
