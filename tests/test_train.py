"""The training command runs a few steps on a tiny folder and writes a loadable, resumable checkpoint."""
from __future__ import annotations

import json
import os
import stat

import torch
import pytest
from PIL import Image

from ilvr.cli import main
from ilvr.loading import load_model
from ilvr.sampler import sample
from conftest import TINY_TRAIN_FLAGS, noise_images


def test_train_few_steps_then_resume(tmp_path, capsys):
    data = noise_images(tmp_path / "data" / "nested", [(40 + i, 48) for i in range(6)])
    (data / "broken.png").write_bytes(b"nope")
    out = tmp_path / "model"
    args = ["train", "--data", str(tmp_path / "data"), "--out", str(out), *TINY_TRAIN_FLAGS, "--batch-size", "4",
            "--steps", "3", "--sample-every", "0"]
    assert main(args) == 0
    assert "skipped 1 file(s) that could not be used: broken.png" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["steps"] == 3 and cfg["unet"]["image_size"] == 16
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask  # not safetensors' 0600
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
    data = noise_images(tmp_path / "digits", [(20, 20)] * 4, seed=1)
    out = tmp_path / "gray"
    assert main(["train", "--data", str(data), "--out", str(out), "--grayscale", *TINY_TRAIN_FLAGS,
                 "--batch-size", "2", "--steps", "2", "--sample-every", "2"]) == 0
    model = load_model(out, device="cpu")
    assert model.config.in_channels == model.config.out_channels == 1
    assert sample(model, torch.zeros(1, 16, 16), seeds=[0], steps="3").shape == (1, 1, 16, 16)
    assert Image.open(out / "samples" / "step_0000002.png").mode == "RGB"


@pytest.mark.parametrize("flags,message", [
    (["--channel-mult", "1,0"], "channel_mult must be a non-empty list of numbers above 0"),
    (["--channel-mult", ""], "channel_mult must be a non-empty list"),
    (["--channels", "8", "--channel-mult", "1,-2"], "channel_mult must be"),
])
def test_unusable_architectures_are_refused_before_training(tmp_path, capsys, flags, message):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--minutes", "--save-every-minutes", "--lr"])
def test_times_and_rates_must_be_above_zero(tmp_path, capsys, flag):
    for value in ("0", "-1", "nan"):
        with pytest.raises(SystemExit):
            main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), flag, value])
        assert "expected a number above 0" in capsys.readouterr().err
