"""The paper's presets scaled to any model size are always valid N (divisors of the size); every listed
model's example set and DDIB source exist."""
from __future__ import annotations

from pathlib import Path

import pytest

from ilvr.registry import BY_NAME, MODELS, PAPER_PRESETS, generation_factors, scaled_factor


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


def test_every_model_names_an_example_set_that_every_tab_has():
    from studio.ui import EXAMPLE_SETS, TABS

    assert {m.examples for m in MODELS} <= set(EXAMPLE_SETS)
    for spec in TABS:
        assert set(spec.examples) == set(EXAMPLE_SETS), spec.name
        for examples in spec.examples.values():
            for value in examples.values:
                for path in (value.values() if isinstance(value, dict) else [value]):
                    for one in (path if isinstance(path, list) else [path]):
                        assert Path(one).is_file(), one


def test_ddib_sources_are_listed_models_of_the_same_size():
    for m in MODELS:
        if m.ddib_source is not None:
            assert BY_NAME[m.ddib_source].image_size == m.image_size and m.ddib_source != m.name


def test_a_model_may_set_its_own_preset():
    from ilvr.registry import task_presets

    assert task_presets(32) == {"generation": 2, "translation": 4, "paint": 8, "scribble": 2}
    assert task_presets(32, BY_NAME["digits-sevens32"])["translation"] == 8
    assert task_presets(64, BY_NAME["emoji-faces-animals64"]) == task_presets(64)
