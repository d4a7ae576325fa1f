"""The evaluation command's measures: each one checked on images whose answer is known."""
from __future__ import annotations

import json

import pytest
import torch

from ilvr.cli import main
from ilvr.evaluate import mean_pairwise_rms, nearest_distances, real_nearest_distances
from conftest import noise_images


def test_pairwise_rms_of_known_images():
    x = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4), torch.full((3, 4, 4), 0.5)])
    assert mean_pairwise_rms(x) == pytest.approx((1 + 0.5 + 0.5) / 3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        mean_pairwise_rms(x[:1])


def test_nearest_distances_find_the_closest_training_image():
    data = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    x = torch.stack([torch.full((1, 2, 2), 0.9), torch.full((1, 2, 2), 0.2)])
    assert torch.allclose(nearest_distances(x, data), torch.tensor([0.1, 0.2]))


def test_real_baseline_leaves_each_image_and_its_mirror_out():
    a = torch.zeros(1, 2, 2)
    a[..., 0] = 1  # its mirror image is a different picture
    data = torch.stack([a, torch.full((1, 2, 2), 0.25)])
    d = real_nearest_distances(data)
    # image 0's own mirror does not count; the other image (flat 0.25) is 0.25 or 0.75 away per pixel
    assert torch.allclose(d, torch.tensor([((0.75 ** 2 + 0.25 ** 2) / 2) ** 0.5] * 2))


def test_eval_command_prints_a_row_per_n(tiny_checkpoint, tmp_path, capsys):
    refs = noise_images(tmp_path / "refs", [(32, 32)] * 2, seed=3)
    data = noise_images(tmp_path / "data", [(32, 32)] * 5, seed=4)
    out = tmp_path / "eval.json"
    grid = tmp_path / "grid.png"
    assert main(["eval", "--model", str(tiny_checkpoint), "--refs", str(refs), "--data", str(data), "--N", "1,8",
                 "--num", "3", "--steps", "4", "--device", "cpu", "--json", str(out), "--grid", str(grid)]) == 0
    table = capsys.readouterr().out
    assert "N=1" in table and "N=8" in table and "uncond" in table
    report = json.loads(out.read_text())
    rows = {r["label"]: r for r in report["rows"]}
    # N=1 returns each reference exactly (Algorithm 1 at t=1): no diversity, no coarse-scale distance
    assert rows["N=1"]["diversity"] < 1e-6 and rows["N=1"]["fidelity"] < 1e-6
    assert rows["N=8"]["diversity"] > rows["N=1"]["diversity"]
    assert rows["uncond"]["diversity"] is None and 0 <= rows["uncond"]["near_copies"] <= 1
    assert grid.is_file()


def test_eval_refuses_a_missing_data_folder(tiny_checkpoint, tmp_path, capsys):
    refs = noise_images(tmp_path / "refs", [(32, 32)])
    assert main(["eval", "--model", str(tiny_checkpoint), "--refs", str(refs), "--data", str(tmp_path / "nope")]) == 2
    assert "is not a folder of training images" in capsys.readouterr().err
