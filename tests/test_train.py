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
    (["--channels", "16", "--channel-mult", "1,2"], "--channels 16 with --channel-mult 1,2 gives channel counts "
     "[16, 32]; they must be multiples of 32 (GroupNorm's 32 groups): use --channels 32, 64, ..."),
])
def test_unusable_architectures_are_refused_before_training(tmp_path, capsys, flags, message):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--minutes", "--save-every-minutes", "--lr", "--cooldown-minutes"])
def test_times_and_rates_must_be_above_zero(tmp_path, capsys, flag):
    for value in ("0", "-1", "nan"):
        with pytest.raises(SystemExit):
            main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), flag, value])
        assert "expected a number above 0" in capsys.readouterr().err


def tiny_args(data, out, steps: int = 1, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), *TINY_TRAIN_FLAGS, "--batch-size", "2",
            "--steps", str(steps), "--sample-every", "0", *extra]


def test_ctrl_c_saves_the_state_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import signal

    data = noise_images(tmp_path / "data", [(20, 20)] * 2)
    out = tmp_path / "m"
    original, calls = torch.optim.AdamW.step, []

    def step_then_ctrl_c(self, *args, **kwargs):  # Ctrl-C lands mid-update: the update still completes
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_ctrl_c)
    # a background shell (nohup, &) starts Python with SIGINT ignored: give it Python's usual handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(tiny_args(data, out, 50)) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert "interrupted at step 3; saved, run the same command to resume" in err
    assert "\ninterrupted\n" not in "\n" + err  # said once, by train
    assert torch.load(out / "train_state.ckpt.pt", weights_only=True)["step"] == 3
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == 3
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    assert main(tiny_args(data, out, 4)) == 0
    assert "resumed from step 3" in capsys.readouterr().out


def test_sigterm_saves_like_ctrl_c(tmp_path):
    """kill, timeout and batch schedulers end a job with SIGTERM. In a child process: before the fix
    SIGTERM killed it with nothing saved (and would kill pytest itself if raised here)."""
    import subprocess
    import sys
    from pathlib import Path

    data = noise_images(tmp_path / "data", [(20, 20)] * 2)
    out = tmp_path / "m"
    child = """
import signal, sys, torch
from ilvr.cli import main
from ilvr.network import UNet
original, calls = UNet.forward, []
def forward_then_sigterm(*args, **kwargs):  # the third step's forward pass: outside the held update
    calls.append(1)
    if len(calls) == 3:
        signal.raise_signal(signal.SIGTERM)
    return original(*args, **kwargs)
UNet.forward = forward_then_sigterm
sys.exit(main(sys.argv[1:]))
"""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", child, *tiny_args(data, out, 50)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 130, done.stderr[-2000:]
    assert "interrupted at step 2; saved, run the same command to resume" in done.stderr
    assert torch.load(out / "train_state.ckpt.pt", weights_only=True)["step"] == 2


def test_another_models_folder_is_refused_before_loading_data(tmp_path, capsys, monkeypatch):
    import ilvr.train

    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded the data before checking --out")

    monkeypatch.setattr(ilvr.train, "load_dataset", must_not_run)
    data = noise_images(tmp_path / "data", [(20, 20)] * 2)
    diffusers = tmp_path / "ddpm"
    diffusers.mkdir()
    config = '{"_class_name": "UNet2DModel", "sample_size": 32}'
    (diffusers / "config.json").write_text(config)
    (diffusers / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    assert main(tiny_args(data, diffusers)) == 2
    err = capsys.readouterr().err
    assert f"{diffusers} holds another model (config.json of a UNet2DModel); pick a new --out" in err, err
    assert (diffusers / "config.json").read_text() == config
    assert sorted(p.name for p in diffusers.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    guided = tmp_path / "guided"
    guided.mkdir()
    (guided / "ema_0.9999_050000.pt").write_bytes(b"weights")
    assert main(tiny_args(data, guided)) == 2
    assert "holds another model (ema_0.9999_050000.pt)" in capsys.readouterr().err


def test_torchrun_and_a_second_run_into_the_same_out_are_refused(tmp_path, capsys, monkeypatch):
    import fcntl

    data = noise_images(tmp_path / "data", [(20, 20)] * 2)
    out = tmp_path / "m"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(tiny_args(data, out)) == 2
    assert "train runs in one process; run it without torchrun" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    out.mkdir()
    with open(out / ".train.lock", "a") as held:  # what a running train holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(tiny_args(data, out)) == 2
        assert f"another train run is using {out}" in capsys.readouterr().err
    assert main(tiny_args(data, out)) == 0  # released: trains
    assert not (out / ".train.lock").exists()  # removed on the way out


def test_out_inside_data_and_hidden_files_are_not_training_images(tmp_path, capsys):
    from ilvr.train import find_images

    data = noise_images(tmp_path / "data", [(20, 20)] * 3)
    (data / ".thumb.png").write_bytes((data / "0.png").read_bytes())
    (data / ".cache").mkdir()
    (data / ".cache" / "x.png").write_bytes((data / "0.png").read_bytes())
    (data / "notes.txt").write_text("x")
    out = data / "model"
    assert main(tiny_args(data, out, 1, "--sample-every", "1")) == 0
    assert (out / "samples" / "step_0000001.png").is_file()
    assert "3 training images from" in capsys.readouterr().out
    assert [p.name for p in find_images(data, exclude=out)] == ["0.png", "1.png", "2.png"]
    assert main(tiny_args(data, out, 2)) == 0  # its sample grid is not picked up
    assert "3 training images from" in capsys.readouterr().out
    assert main(tiny_args(data, data)) == 2
    assert "--out must not be the --data folder itself" in capsys.readouterr().err


def test_another_architecture_is_named_before_loading_data(tmp_path, capsys, monkeypatch):
    import ilvr.train

    data = noise_images(tmp_path / "data", [(20, 20)] * 2)
    out = tmp_path / "m"
    assert main(tiny_args(data, out, 1)) == 0
    capsys.readouterr()

    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded the data before checking the architecture")

    with monkeypatch.context() as m:
        m.setattr(ilvr.train, "load_dataset", must_not_run)
        wider = tiny_args(data, out, 2)
        wider[wider.index("--channels") + 1] = "64"
        assert main(wider) == 2
        err = capsys.readouterr().err
        assert "train_state.ckpt.pt was trained with another architecture (model_channels: 32 in the state, " \
               "64 asked)" in err, err
        (out / "train_state.ckpt.pt").unlink()
        assert main(wider) == 2
        err = capsys.readouterr().err
        assert "holds a model with another architecture (model_channels: 32 in the exported model, 64 asked)" in err
    assert main(tiny_args(data, out, 2, "--lr", "0.0005")) == 0
    log = capsys.readouterr().out
    assert "this run will replace" in log and "lr 0.0005, batch size 2" in log
    assert main(tiny_args(data, out, 3, "--batch-size", "1")) == 0
    assert "resumed from step 2 (" in (log := capsys.readouterr().out)
    assert "lr 0.001, batch size 1 (before: lr 0.0005, batch size 2)" in log, log


def test_limits_already_reached_do_nothing_and_messages_follow_the_bar(tmp_path, monkeypatch):
    import ilvr.train
    from tqdm import tqdm

    from ilvr.train import TrainConfig, train

    data = noise_images(tmp_path / "data", [(20, 20)])
    out = tmp_path / "m"
    bars, messages = [], []

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    def log(text: str) -> None:
        messages.append((text, bool(bars) and not bars[-1].disable))  # and whether a bar was open

    monkeypatch.setattr(ilvr.train, "tqdm", Bar)
    cfg = TrainConfig(data=str(data), out=str(out), image_size=16, model_channels=32, channel_mult=(1, 2),
                      attention_levels=(1,), batch_size=2, max_steps=10, max_minutes=0.0001, sample_every=0,
                      device="cpu")
    train(cfg, log=log)
    budget = [open_bar for text, open_bar in messages if "time budget of 0.0001 min reached at step 1" in text]
    assert budget == [False]  # logged once the bar was closed: not in the middle of it
    assert any(text.startswith("1 training image from") for text, _ in messages)
    state = out / "train_state.ckpt.pt"
    before = state.stat().st_mtime_ns
    messages.clear()
    train(cfg, log=log)
    assert any("already trained 1 step / 0.0 min (--minutes 0.0001); nothing to do" in t for t, _ in messages)
    cfg.max_minutes, cfg.max_steps = None, 1
    train(cfg, log=log)
    assert any("already trained 1 step / 0.0 min (--steps 1); nothing to do" in t for t, _ in messages), messages
    assert state.stat().st_mtime_ns == before and torch.load(state, weights_only=True)["step"] == 1


def test_loss_weightings_follow_their_papers():
    from ilvr.schedule import Schedule, DiffusionConfig, loss_weights

    abar = torch.tensor(Schedule.from_config(DiffusionConfig()).alphas_cumprod, dtype=torch.float64)
    snr = abar / (1 - abar)
    p2, min_snr, uniform = (loss_weights(abar, k) for k in ("p2", "min-snr", "uniform"))
    assert torch.allclose(p2, 1 / (1 + snr)) and torch.equal(uniform, torch.ones_like(abar))
    # min-SNR-5: 5/SNR while SNR > 5 (nearly clean steps), 1 once SNR <= 5
    assert torch.allclose(min_snr[snr > 5], 5 / snr[snr > 5]) and torch.all(min_snr[snr <= 5] == 1)
    # both shrink the nearly clean steps' weight and keep the noisy ones' near 1
    for w in (p2, min_snr):
        assert w[0] < 1e-3 and w[-1] > 0.99 and torch.all(w[1:] >= w[:-1])
    with pytest.raises(ValueError, match="loss weighting must be one of p2, min-snr, uniform"):
        loss_weights(abar, "snr")


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    from ilvr import device as device_module

    def with_cpuinfo(text):
        fake = tmp_path / "cpuinfo"
        fake.write_text(text)
        real_path = device_module.Path
        monkeypatch.setattr(device_module, "Path", lambda p: real_path(fake) if p == "/proc/cpuinfo" else real_path(p))
        return device_module.cpu_has_native_bf16()

    assert with_cpuinfo("processor : 0\nflags : fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert with_cpuinfo("flags : fpu avx2 amx_bf16 amx_tile\n")
    assert not with_cpuinfo("processor : 0\nflags : fpu sse avx2 fma\n")  # AVX2 only: bf16 would be emulated
    assert with_cpuinfo("Features : fp asimd bf16 i8mm\n")  # Arm


def test_train_logs_its_weighting_and_bf16_choice(tmp_path, capsys, monkeypatch):
    from ilvr import train as train_module

    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: False)
    data = noise_images(tmp_path / "data", [(16, 16)] * 4)
    out = tmp_path / "m"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY_TRAIN_FLAGS, "--batch-size", "2",
                 "--steps", "1", "--sample-every", "0", "--loss-weighting", "min-snr"]) == 0
    log = capsys.readouterr().out
    assert "loss weighting min-snr; bf16 autocast off (no native bf16 on this CPU)" in log
    assert json.loads((out / "config.json").read_text())["training"]["loss_weighting"] == "min-snr"


def test_learning_rate_warms_up_holds_and_cools_down_to_zero_at_the_end():
    from ilvr.train import TrainConfig, learning_rate
    cfg = TrainConfig(data="d", out="o", lr=1e-3, warmup_steps=10, max_steps=1000)
    assert learning_rate(cfg, 0, 0.0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 9, 0.0) == learning_rate(cfg, 999, 1e6) == pytest.approx(1e-3)  # no cooldown asked
    by_steps = TrainConfig(data="d", out="o", lr=1e-3, warmup_steps=10, max_steps=1000, cooldown_steps=100)
    assert learning_rate(by_steps, 899, 0.0) == pytest.approx(1e-3)
    assert learning_rate(by_steps, 950, 0.0) == pytest.approx(0.5e-3)
    assert learning_rate(by_steps, 999, 0.0) == pytest.approx(1e-5)  # the last update; the next would be at zero
    by_time = TrainConfig(data="d", out="o", lr=1e-3, warmup_steps=10, max_minutes=100, cooldown_minutes=20)
    assert learning_rate(by_time, 500, 79 * 60) == pytest.approx(1e-3)
    assert learning_rate(by_time, 500, 90 * 60) == pytest.approx(0.5e-3)
    assert learning_rate(by_time, 500, 101 * 60) == 0.0


def test_cooldown_sets_the_optimizer_and_is_recorded(tmp_path, capsys):
    data = noise_images(tmp_path / "data", [(16, 16)] * 4)
    out = tmp_path / "m"
    assert main(tiny_args(data, out, 3, "--cooldown-steps", "3", "--lr", "0.002")) == 0
    assert "the learning rate falls linearly to zero over the last 3 steps" in capsys.readouterr().out
    state = torch.load(out / "train_state.ckpt.pt", weights_only=True)
    assert state["opt"]["param_groups"][0]["lr"] == pytest.approx(0.002 * 3 / 200 * 1 / 3)  # warm-up x cooldown
    assert json.loads((out / "config.json").read_text())["training"]["cooldown_steps"] == 3


@pytest.mark.parametrize("flags,message", [
    (["--cooldown-minutes", "5"], "--cooldown-minutes needs --minutes"),
    (["--cooldown-steps", "50"], "--cooldown-steps needs --steps"),
])
def test_a_cooldown_needs_the_end_it_counts_back_from(tmp_path, capsys, flags, message):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), *flags]) == 2
    assert message in capsys.readouterr().err
