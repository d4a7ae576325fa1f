"""DDIB (ilvr.ddib): DDIM inversion and sampling, and `sample --method ddib` on the command line."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ilvr import load_model, load_reference
from ilvr.cli import main
from ilvr.ddib import ddib_translate, ddim_decode, ddim_invert
from ilvr.export import export_model
from ilvr.images import read_settings
from ilvr.schedule import DiffusionConfig

from conftest import tiny_unet

ROOT = Path(__file__).resolve().parent.parent


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean().item()
    return 10 * math.log10(4 / mse)


@pytest.fixture(scope="module")
def emoji64():
    return load_model("emoji64", device="cpu")


def test_inversion_then_sampling_with_one_model_gives_the_input_back(emoji64):
    """The DDIM ODE run forwards then backwards through the bundled emoji model: 31.4 dB measured (the
    approximation is only eps at x_{t-1} standing in for eps at x_t); clipping x0 would leave the ODE."""
    ref = load_reference(ROOT / "examples" / "noto_fox.png", emoji64.image_size, 3)
    x_T = ddim_invert(emoji64, ref, "250")
    assert 0.9 < x_T.std().item() < 1.1 and abs(x_T.mean().item()) < 0.05  # close to N(0, I): noise, not the fox
    assert psnr(x_T[0], ref) < 10
    back = ddim_decode(emoji64, x_T, "250")
    assert back.shape == (1, 3, 64, 64)
    assert psnr(back[0], ref) >= 25


def test_ddib_is_deterministic_and_checks_its_inputs(tiny_checkpoint):
    model = load_model(tiny_checkpoint, device="cpu", cpu_backend="torch")
    torch.manual_seed(0)
    ref = torch.rand(2, 3, 32, 32) * 2 - 1
    seen = []
    a = ddib_translate(model, model, ref, steps="ddim5", progress=lambda info: seen.append((info.index, info.total)))
    assert seen == [(k, 10) for k in range(1, 11)]  # 5 steps of inversion, then 5 of sampling
    b = ddib_translate(model, model, ref[1], steps="ddim5")  # one (C, H, W) reference, alone in its batch
    assert a.shape == (2, 3, 32, 32) and b.shape == (1, 3, 32, 32)
    assert torch.equal(a, ddib_translate(model, model, ref, steps="ddim5"))  # no randomness
    # the same output in any batch, up to float rounding (a random network's ODE makes values up to ~40)
    assert torch.allclose(a[1], b[0], rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match=r"\(C, H, W\) = \(3, 32, 32\)"):
        ddim_invert(model, torch.zeros(3, 64, 64), "ddim5")
    with pytest.raises(ValueError, match="in \\[-1, 1\\]"):
        ddim_invert(model, torch.full((3, 32, 32), 3.0), "ddim5")
    with pytest.raises(ValueError, match="steps must be"):
        ddim_invert(model, ref, "lots")


def test_ddib_needs_two_models_of_one_size(tiny_checkpoint, tmp_path):
    small = tmp_path / "small"
    export_model(tiny_unet(image_size=16), DiffusionConfig(), small)
    a = load_model(tiny_checkpoint, device="cpu", cpu_backend="torch")
    b = load_model(small, device="cpu", cpu_backend="torch")
    with pytest.raises(ValueError, match="one image size and channel count"):
        ddib_translate(a, b, torch.zeros(3, 32, 32), steps="ddim5")



@pytest.fixture
def other_checkpoint(tmp_path) -> Path:
    folder = tmp_path / "other"
    export_model(tiny_unet(seed=1), DiffusionConfig(), folder)
    return folder


def test_cli_ddib_writes_one_image_per_reference_with_its_settings(tiny_checkpoint, other_checkpoint, ref_png,
                                                                   tmp_path, capsys):
    out = tmp_path / "out"
    args = ["sample", "--method", "ddib", "--source-model", str(other_checkpoint), "--model", str(tiny_checkpoint),
            "--ref", str(ref_png), "--steps", "4", "--out", str(out), "--device", "cpu"]
    assert main(args + ["--save-process"]) == 0
    captured = capsys.readouterr()
    assert "wrote 1 image to" in captured.out and "DDIB is deterministic" in captured.err
    assert sorted(f.name for f in out.iterdir()) == ["ref_0.png", "ref_0_process.gif"]
    s = read_settings(out / "ref_0.png")
    assert s["method"] == "ddib" and s["source_model"].endswith("other") and s["model"].endswith("tiny")
    assert s["sampler"] == "ddim" and s["steps"] == "4" and s["reference"] == str(ref_png)
    assert s["source_weights_sha256"] and s["weights_sha256"] and s["source_weights_sha256"] != s["weights_sha256"]
    assert not {"N", "seed", "stop_at", "filter"} & set(s)  # ILVR's settings: DDIB has none of them
    first = (out / "ref_0.png").read_bytes()
    assert main(args + ["--num", "1", "--seed", "7"]) == 0  # deterministic: a seed changes nothing
    assert (out / "ref_0.png").read_bytes() == first
    assert "DDIB is deterministic" not in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--method", "ddib"], "--method ddib needs --source-model MODEL"),
    (["--source-model", "SRC"], "--source-model is for --method ddib"),
    (["--method", "ddib", "--source-model", "SRC", "--N", "4"], "--N cannot be used with --method ddib"),
    (["--method", "ddib", "--source-model", "SRC", "--stop-at", "200"], "--stop-at cannot be used with --method ddib"),
    (["--method", "ddib", "--source-model", "SRC", "--mask", "REF", "--keep-outside"],
     "--mask, --keep-outside cannot be used with --method ddib"),
])
def test_cli_ddib_misuse_is_a_one_line_error(tiny_checkpoint, ref_png, tmp_path, capsys, monkeypatch, extra,
                                             message):
    import ilvr.commands

    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded a model before refusing the arguments")

    monkeypatch.setattr(ilvr.commands, "load_model", must_not_run)
    extra = [str(tiny_checkpoint) if a == "SRC" else str(ref_png) if a == "REF" else a for a in extra]
    out = tmp_path / "o"
    assert main(["sample", "--model", str(tiny_checkpoint), "--ref", str(ref_png), "--steps", "2",
                 "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_cli_ddib_refuses_models_of_different_sizes(tiny_checkpoint, ref_png, tmp_path, capsys):
    small = tmp_path / "small"
    export_model(tiny_unet(image_size=16), DiffusionConfig(), small)
    assert main(["sample", "--method", "ddib", "--source-model", str(small), "--model", str(tiny_checkpoint),
                 "--ref", str(ref_png), "--steps", "2", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "DDIB needs both alike" in capsys.readouterr().err
