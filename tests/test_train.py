"""The training command runs a few steps on a tiny folder and writes a loadable, resumable checkpoint."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from ilvr.cli import main
from ilvr.loading import load_model
from ilvr.sampler import sample


def test_train_few_steps_then_resume(tmp_path, capsys):
    data = tmp_path / "data" / "nested"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)).save(data / f"{i}.png")
    (data / "broken.png").write_bytes(b"nope")
    out = tmp_path / "model"
    args = ["train", "--data", str(tmp_path / "data"), "--out", str(out), "--image-size", "16", "--channels", "32",
            "--channel-mult", "1,2", "--attention-levels", "1", "--batch-size", "4", "--steps", "3",
            "--sample-every", "0"]
    assert main(args) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["steps"] == 3 and cfg["unet"]["image_size"] == 16
    model = load_model(out, device="cpu")
    assert sample(model, None, seeds=[0], steps="3").shape == (1, 3, 16, 16)
    args[args.index("--steps") + 1] = "5"
    assert main(args) == 0
    assert "resumed from step 3" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == 5
    state_path = out / "train_state.ckpt.pt"  # a state written before UNetConfig gained norm_groups still resumes
    state = torch.load(state_path, weights_only=True)
    del state["unet"]["norm_groups"]
    torch.save(state, state_path)
    args[args.index("--steps") + 1] = "6"
    assert main(args) == 0
    assert "resumed from step 5" in capsys.readouterr().out
    state_path.unlink()  # a fresh machine has only the committed export
    args[args.index("--steps") + 1] = "7"
    assert main(args) == 0
    assert "continuing from its exported EMA weights at step 6" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == 7


def test_train_a_grayscale_model(tmp_path):
    data = tmp_path / "digits"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "gray"
    assert main(["train", "--data", str(data), "--out", str(out), "--grayscale", "--image-size", "16", "--channels",
                 "32", "--channel-mult", "1,2", "--attention-levels", "1", "--batch-size", "2", "--steps", "2",
                 "--sample-every", "2"]) == 0
    model = load_model(out, device="cpu")
    assert model.config.in_channels == model.config.out_channels == 1
    assert sample(model, torch.zeros(1, 16, 16), seeds=[0], steps="3").shape == (1, 1, 16, 16)
    assert Image.open(out / "samples" / "step_0000002.png").mode == "RGB"
