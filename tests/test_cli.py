"""The command line as a user runs it."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ilvr.cli import main
from ilvr.commands import PROCESS_FRAMES, process_frames
from ilvr.batch import derive_seed
from ilvr.images import read_settings

ROOT = Path(__file__).resolve().parent.parent



def test_sample_writes_pngs_with_settings(tiny_checkpoint, ref_png, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sample", "--model", str(tiny_checkpoint), "--ref", str(ref_png), "--N", "4", "--steps", "5",
                 "--num", "3", "--batch-size", "2", "--seed", "1", "--out", str(out)]) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["ref_0.png", "ref_1.png", "ref_2.png"]
    assert Image.open(files[0]).size == (32, 32)
    s = read_settings(files[0])
    assert s["N"] == 4 and s["steps"] == "5" and s["filter"] == "cubic" and s["reference"].endswith("ref.png")
    capsys.readouterr()
    assert main(["sample", "--model", str(tiny_checkpoint), "--ref", str(ref_png), "--N", "4", "--steps", "2",
                 "--num", "1", "--out", str(out)]) == 0
    assert f"wrote 1 image to {out} (1 replaced files of an earlier run)" in capsys.readouterr().out
    assert s["global_seed"] == 1 and s["seed"] == derive_seed(1, "ref.png", 0)  # --seed 1 reproduces it
    # the weights that made it, even if the model's name later means others
    assert s["weights_sha256"] == hashlib.sha256((tiny_checkpoint / "model.safetensors").read_bytes()).hexdigest()[:12]


def test_save_process_writes_an_animation_per_sample(tiny_checkpoint, ref_png, tmp_path):
    out = tmp_path / "out"
    assert main(["sample", "--model", str(tiny_checkpoint), "--ref", str(ref_png), "--steps", "5", "--num", "2",
                 "--batch-size", "2", "--save-process", "--out", str(out)]) == 0
    gif = Image.open(out / "ref_1_process.gif")
    assert gif.n_frames == 6  # predicted x0 after each of the 5 steps, then the sample itself
    gif.seek(gif.n_frames - 1)
    final = Image.open(out / "ref_1.png").convert("RGB")
    assert gif.size == final.size == (32, 32)
    last = np.asarray(gif.convert("RGB"), np.float32)
    assert np.abs(last - np.asarray(final, np.float32)).mean() < 8  # the sample, up to GIF's 256 colours
    assert main(["sample", "--model", str(tiny_checkpoint), "--ref-dir", str(tmp_path), "--save-process",
                 "--out", str(out)]) == 2


def test_process_animation_frames_are_evenly_spaced():
    assert process_frames(10) == set(range(1, 11))
    long = process_frames(120)
    assert len(long) == PROCESS_FRAMES and max(long) == 120 and min(long) >= 1


def test_references_with_the_same_name_do_not_overwrite_each_other(tiny_checkpoint, ref_png, tmp_path):
    other = tmp_path / "other" / "ref.png"
    other.parent.mkdir()
    Image.new("RGB", (32, 32), (20, 200, 20)).save(other)
    out = tmp_path / "out"
    assert main(["sample", "--model", str(tiny_checkpoint), "--ref", str(ref_png), "--ref", str(other), "--N", "2",
                 "--steps", "3", "--num", "1", "--out", str(out)]) == 0
    assert sorted(f.name for f in out.glob("*.png")) == ["ref-2_0.png", "ref_0.png"]
    assert read_settings(out / "ref-2_0.png")["reference"] == str(other)


def test_sample_with_mask(tiny_checkpoint, ref_png, tmp_path):
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask_path = tmp_path / "mask.png"
    mask.save(mask_path)
    out = tmp_path / "out"
    assert main(["sample", "--model", str(tiny_checkpoint), "--ref", str(ref_png), "--mask", str(mask_path),
                 "--keep-outside", "--steps", "5", "--num", "1", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 1
    s = read_settings(out / "ref_0.png")
    assert s["mask"] == str(mask_path) and s["keep_outside"] is True


def test_info_prints_the_architecture(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["unet"]["model_channels"] == 32 and d["diffusion"]["variance_type"] == "fixed_small"


def test_info_shows_how_a_trained_model_was_trained(capsys):
    assert main(["info", "emoji64"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("training"))
    assert "steps " in line and "images 3786" in line


def test_model_options_fill_in_what_a_guided_diffusion_file_does_not_record(ref_png, tmp_path, capsys):
    import torch
    from conftest import tiny_unet

    weights = tmp_path / "ema_0.9999_050000.pt"  # trained with 32-channel heads and a cosine schedule
    torch.save(tiny_unet().state_dict(), weights)
    assert main(["info", str(weights)]) == 0
    assumed = capsys.readouterr().out.splitlines()[-1]
    assert "num_head_channels=64" in assumed and "beta_schedule=linear" in assumed and "--model-option" in assumed

    options = ["--model-option", "num_head_channels=32", "--model-option", "beta_schedule=cosine"]
    assert main(["info", str(weights), "--json", *options]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["unet"]["num_head_channels"] == 32 and d["diffusion"]["beta_schedule"] == "cosine"
    assert d["options"] == {"num_head_channels": 32, "beta_schedule": "cosine"}
    assert d["assumed"]["num_train_timesteps"] == 1000 and "beta_schedule" not in d["assumed"]

    out = tmp_path / "out"
    assert main(["sample", "--model", str(weights), *options, "--ref", str(ref_png), "--steps", "3", "--num", "1",
                 "--out", str(out)]) == 0
    assert read_settings(out / "ref_0.png")["model_options"] == {"num_head_channels": 32, "beta_schedule": "cosine"}

    assert main(["info", str(weights), "--model-option", "schedule=cosine"]) == 2
    assert "unknown load options ['schedule']; known: image_size" in capsys.readouterr().err


def test_convert_bakes_the_options_into_a_folder_that_needs_none(tmp_path, capsys):
    import torch
    from conftest import tiny_unet

    from ilvr.loading import load_model

    weights = tmp_path / "ema_0.9999_050000.pt"
    torch.save(tiny_unet(seed=3).state_dict(), weights)
    options = {"num_head_channels": 32, "beta_schedule": "cosine"}
    out = tmp_path / "converted"
    flags = [f"--model-option={k}={v}" for k, v in options.items()]
    assert main(["convert", str(weights), "--out", str(out), "--fp32", *flags]) == 0
    original, converted = (load_model(p, device="cpu", cpu_backend="torch", **o)
                           for p, o in ((weights, options), (out, {})))
    assert converted.unet.config == original.unet.config and converted.diffusion == original.diffusion
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([100])
    with torch.no_grad():
        assert torch.allclose(converted.unet(x, t), original.unet(x, t), atol=1e-5)
    assert json.loads((out / "config.json").read_text())["training"]["options"] == options
    assert main(["convert", str(weights), "--out", str(out), *flags]) == 2  # never overwrites a model
    assert "already holds a model" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--N", "3"], "does not divide the image size 32"),
    (["--steps", "lots"], "steps must be"),
    (["--filter", "gauss"], "invalid choice"),
    (["--num", "0"], "expected a number >= 1"),
    (["--stop-at", "-1"], "expected a number >= 0"),
    (["--model", "does/not-exist-anywhere-xyz", "--device", "cpu"], "cannot download|no model|offline"),
])
def test_bad_arguments_are_explained(tiny_checkpoint, ref_png, tmp_path, args, message):
    cmd = [sys.executable, "-m", "ilvr", "sample", "--model", str(tiny_checkpoint), "--ref", str(ref_png),
           "--out", str(tmp_path / "o"), "--steps", "5", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ILVR_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    import re
    assert re.search(message, proc.stderr), proc.stderr


def test_missing_reference_is_explained(tiny_checkpoint, tmp_path, capsys):
    assert main(["sample", "--model", str(tiny_checkpoint), "--ref", str(tmp_path / "nope.png"), "--steps", "5",
                 "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["sample", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o")]) == 2
    assert "give --ref" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--unconditional"], "--unconditional samples without a reference"),
    (["--keep-outside"], "--keep-outside needs --mask"),
    (["--device", "foo"], "unknown device 'foo'"),
    (["--device", "meta"], "device 'meta' is not supported"),
    (["--model-option", "num_train_timesteps=0"], "num_train_timesteps must be a number above 0"),
    (["--model-option", "image_size=0"], "image_size must be a number above 0"),
    (["--model-option", "num_train_timesteps=-5"], "num_train_timesteps must be a number above 0"),
    (["--stop-at", "2000"], "--stop-at must be between 0 and 1000"),
    (["--model-option", "attention_order=bogus"], "attention_order must be 'legacy' or 'new'"),
])
def test_misuse_is_a_one_line_error(tiny_checkpoint, ref_png, tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    assert main(["sample", "--model", str(tiny_checkpoint), "--ref", str(ref_png), "--steps", "2",
                 "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(out.glob("*.png"))


def test_unusable_out_folder_fails_before_any_work(tiny_checkpoint, ref_png, tmp_path, capsys, monkeypatch):
    import ilvr.loading
    import ilvr.train

    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded or trained before checking --out")

    monkeypatch.setattr(ilvr.loading, "load_model", must_not_run)
    monkeypatch.setattr(ilvr.train, "train", must_not_run)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out, message in ((a_file, "is a file, not a folder"), (a_file / "sub", "cannot write to --out")):
        assert main(["sample", "--model", str(tiny_checkpoint), "--ref", str(ref_png), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert main(["convert", str(tiny_checkpoint), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert main(["train", "--data", str(tmp_path), "--out", str(out)]) == 2
        assert message in capsys.readouterr().err


def test_a_wrong_reference_is_reported_before_the_model_loads(ref_png, tmp_path, capsys, monkeypatch):
    """Online, a typo in --ref used to show only after a 256 px model had downloaded."""
    import ilvr.loading

    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded the model before checking the references")

    monkeypatch.setattr(ilvr.loading, "load_model", must_not_run)
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    for ref, mask, message in ((tmp_path / "typo.png", None, "reference image not found"),
                               (junk, None, "notes.png is not an image"),
                               (ref_png, tmp_path / "no-mask.png", "no-mask.png")):
        args = ["sample", "--model", "google/ddpm-ema-cat-256", "--ref", str(ref), "--out", str(tmp_path / "o")]
        assert main(args + (["--mask", str(mask)] if mask else [])) == 2
        assert message in capsys.readouterr().err


def test_a_missing_gpu_is_explained_for_the_command_line_and_python(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "torch sees no GPU; use the CPU (--device cpu, or device='cpu' in Python)" in err, err


def test_failed_commands_remove_the_empty_out_folder_they_made(tiny_checkpoint, ref_png, tmp_path, capsys):
    from conftest import TINY_TRAIN_FLAGS

    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["train", "--data", str(empty), "--out", str(tmp_path / "m_empty"), *TINY_TRAIN_FLAGS], "no readable images"),
        (["train", "--data", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "m_none")], "not found"),
        (["sample", "--model", str(tiny_checkpoint), "--ref", str(ref_png), "--N", "3", "--out",
          str(tmp_path / "e9" / "deeper")], "does not divide"),
    ]
    for args, message in cases:
        assert main(args) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "ref.png", "tiny"]  # e9 went too
    kept = tmp_path / "kept"  # a folder that was there before the command stays
    kept.mkdir()
    assert main(["train", "--data", str(empty), "--out", str(kept), *TINY_TRAIN_FLAGS]) == 2
    assert kept.is_dir() and not list(kept.iterdir())  # and train's lock file is gone
