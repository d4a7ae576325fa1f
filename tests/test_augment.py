"""Training augmentations: flips, and zoom and shift of half a batch, with the random stream under control."""
from __future__ import annotations

import json

import pytest
import torch

from ilvr.augment import random_flips, random_zoom_shift
from ilvr.cli import main
from conftest import TINY_TRAIN_FLAGS, noise_images


def test_flips_can_be_switched_off_without_changing_later_draws():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4).repeat(8, 1, 1, 1)
    on, off = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    flipped = random_flips(x, on, True)
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    assert mirrored.any() and not mirrored.all()  # about half of the batch
    assert torch.equal(random_flips(x, off, False), x)
    assert torch.equal(torch.rand(3, generator=on), torch.rand(3, generator=off))  # the same stream afterwards


def dark_squares(n: int, size: int = 32, side: int = 12) -> torch.Tensor:
    """White images (1.0) with a black square in the middle, like an icon on a white background."""
    x = torch.ones(n, 3, size, size)
    lo = (size - side) // 2
    x[:, :, lo:lo + side, lo:lo + side] = -1.0
    return x


def test_zoom_and_shift_off_change_nothing_and_draw_nothing():
    x = dark_squares(4)
    gen, untouched = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert random_zoom_shift(x, gen, 0.0, 0.0) is x
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=untouched))


def test_zoom_and_shift_move_half_the_batch_within_their_bounds():
    size, side, zoom, shift = 32, 12, 0.2, 0.1
    x = dark_squares(64, size, side)
    out = random_zoom_shift(x, torch.Generator().manual_seed(0), zoom, shift)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    changed = (out - x).abs().flatten(1).amax(1) > 1e-3
    assert 16 < int(changed.sum()) < 48  # about half, the rest exactly as they were
    assert torch.equal(out[~changed], x[~changed])
    ink = (1 - out[:, 0]) / 2  # 1 inside the square, 0 on the white background
    area = ink.sum((1, 2))
    assert (area >= side ** 2 / (1 + zoom) ** 2 - side).all() and (area <= side ** 2 * (1 + zoom) ** 2 + side).all()
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    centre_x = (ink.sum(1) * coords).sum(1) / area
    centre_y = (ink.sum(2) * coords).sum(1) / area
    assert centre_x.abs().max() <= shift * size + 0.5 and centre_y.abs().max() <= shift * size + 0.5
    assert centre_x.abs().max() > 1 or centre_y.abs().max() > 1  # something did move
    assert (out[:, :, 0, 0] > 0.99).all()  # the border repeats the white background, no black comes in


def test_negative_amounts_are_refused():
    with pytest.raises(ValueError, match="zoom and shift must be >= 0"):
        random_zoom_shift(dark_squares(2), torch.Generator(), -0.1, 0.0)


def test_train_with_zoom_and_shift_logs_and_records_them(tmp_path, capsys):
    data = noise_images(tmp_path / "data", [(16, 16)] * 4)
    out = tmp_path / "m"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY_TRAIN_FLAGS, "--batch-size", "2",
                 "--steps", "2", "--sample-every", "0", "--random-zoom", "0.15", "--random-shift", "0.08"]) == 0
    assert "half of each batch zoomed by up to 0.15 and shifted by up to 0.08" in capsys.readouterr().out
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["random_zoom"] == 0.15 and training["random_shift"] == 0.08


@pytest.mark.parametrize("value", ["1", "-0.1", "nan", "lots"])
def test_train_refuses_amounts_that_are_not_fractions(tmp_path, capsys, value):
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--random-zoom", value])
    assert "argument --random-zoom: expected a" in capsys.readouterr().err
