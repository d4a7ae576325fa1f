"""bench --whole-runs: the child processes it starts, what it measures of them, and the official
sampler's flags and plumbing (against a stand-in checkout: the real one is not in the repository).
No timing is asserted: speed is the benchmarks' business."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ilvr.cli import main
from ilvr.network import UNetConfig
from ilvr.official_sampler import SHIM_DIR, official_environment, official_flags, saving_notes
from ilvr.schedule import DiffusionConfig
from ilvr.whole_runs import ADM64, Launcher, Setup, variants_for


def flag_dict(flags: list[str]) -> dict[str, str]:
    return dict(zip(flags[::2], flags[1::2]))


def test_the_adm64_model_gets_the_official_readmes_flags():
    flags, notes = official_flags(UNetConfig(**ADM64), DiffusionConfig(variance_type="learned_range"))
    documented = ("--attention_resolutions 16 --class_cond False --diffusion_steps 1000 --dropout 0.0 --image_size 64 "
                  "--learn_sigma True --noise_schedule linear --num_channels 64 --num_head_channels 64 "
                  "--num_res_blocks 1 --resblock_updown True --use_fp16 False --use_scale_shift_norm True").split()
    assert flag_dict(documented).items() <= flag_dict(flags).items()
    assert flag_dict(flags)["--channel_mult"] == "1,2,3,4" and notes == []


def test_models_the_official_sampler_cannot_run_the_same_way_are_explained():
    small = UNetConfig(image_size=64, out_channels=3, model_channels=32, channel_mult=(1, 2, 2, 4),
                       attention_levels=(3,), num_head_channels=32)
    flags, notes = official_flags(small, DiffusionConfig(variance_type="fixed_small"))
    assert flag_dict(flags)["--attention_resolutions"] == "8" and "sigma_small" in notes[0]
    with pytest.raises(ValueError, match="downsample_padding"):
        official_flags(UNetConfig(downsample_padding="asymmetric"), DiffusionConfig())
    with pytest.raises(ValueError, match="prediction_type"):
        official_flags(UNetConfig(), DiffusionConfig(prediction_type="sample"))


def test_a_childs_peak_memory_is_its_own_not_the_benchmarks(tmp_path):
    """Started straight from this process (torch loaded), a child would report this process's RSS."""
    with Launcher() as launcher:
        idle = launcher.run([sys.executable, "-c", "pass"], {}, tmp_path / "idle.log")
        big = launcher.run([sys.executable, "-c", "b = bytearray(120 * 2**20); b[::4096] = b'x' * len(b[::4096])"],
                           {}, tmp_path / "big.log")
        failed = launcher.run([sys.executable, "-c", "raise SystemExit(3)"], {}, tmp_path / "failed.log")
    assert idle.returncode == 0 and idle.peak_rss_mib < 60 and idle.wall_s > 0
    assert big.peak_rss_mib >= 120 and big.cpu_s > 0
    assert failed.returncode == 3


def test_check_plain_times_the_plain_loop_against_the_official_sampler(tmp_path):
    setup = Setup(model="adm64", source="m.pt", label="m", weights_pt=tmp_path / "m.pt", parameters=1, image_size=64,
                  steps="50", batch=4, n_factor=8)
    ref, refs = tmp_path / "ref.png", tmp_path / "refs"
    names = lambda *a: [v.name for v in variants_for(setup, ["--x", "1"], *a, ref, refs, {})]  # noqa: E731
    assert names(tmp_path, False) == ["ours", "ours-torch", "official"]
    assert names(None, False) == ["ours", "ours-torch", "plain"]
    assert names(tmp_path, True) == ["plain", "official"]
    with_bf16 = variants_for(setup, ["--x", "1"], tmp_path, False, ref, refs, {}, bf16=True)
    assert [v.name for v in with_bf16] == ["ours", "ours-torch", "ours-bf16", "official"]
    assert with_bf16[2].command(tmp_path / "o")[-2:] == ["--dtype", "bf16"] and "--dtype" not in with_bf16[0].command(tmp_path)
    (plain, official) = variants_for(setup, ["--x", "1"], tmp_path, True, ref, refs, {"PYTHONPATH": "/elsewhere"})
    assert plain.env["ILVR_KEEP_FREED_HEAP"] == "0"  # as the official code, which leaves glibc's heap alone
    assert official.env["PYTHONPATH"].split(":") == [str(SHIM_DIR), str(tmp_path), "/elsewhere"]
    command = official.command(tmp_path / "out")
    assert command[1].endswith("run_ilvr_sample.py") and command[2] == str(tmp_path)
    assert flag_dict(command[3:])["--range_t"] == "0" and flag_dict(command[3:])["--num_samples"] == "4"


FAKE_SAMPLE_SCRIPT = '''
import argparse, json, os
from mpi4py import MPI  # the stand-in: one process
from torchvision import utils

p = argparse.ArgumentParser()
for flag in ("save_dir", "base_samples", "model_path", "timestep_respacing", "down_N", "range_t"):
    p.add_argument("--" + flag)
p.add_argument("--batch_size", type=int)
p.add_argument("--num_samples", type=int)
args, rest = p.parse_known_args()
assert MPI.COMM_WORLD.Get_size() == 1 and MPI.COMM_WORLD.bcast("x", root=0) == "x"
with open(os.environ["FAKE_OFFICIAL_LOG"], "a") as log:
    log.write(json.dumps({**vars(args), "refs": len(os.listdir(args.base_samples)), "rest": rest}) + "\\n")
os.makedirs(args.save_dir, exist_ok=True)
for i in range(args.num_samples):
    utils.save_image(None, os.path.join(args.save_dir, f"{i:05d}.png"), nrow=1, normalize=True, range=(-1, 1))
'''

FAKE_TORCHVISION_UTILS = '''
from PIL import Image

def save_image(tensor, fp, nrow=8, normalize=False, value_range=None):  # no `range`, as torchvision now
    assert value_range == (-1, 1)
    Image.new("RGB", (8, 8)).save(fp)
'''


def fake_checkout(root: Path) -> Path:
    """Files where jychoi118/ilvr_adm has them; its sampler replaced by a script that records its
    arguments and writes one PNG per sample through a torchvision without save_image's `range`."""
    files = {"scripts/ilvr_sample.py": FAKE_SAMPLE_SCRIPT, "guided_diffusion/gaussian_diffusion.py": "", "resizer.py": "",
             "torchvision/__init__.py": "", "torchvision/utils.py": FAKE_TORCHVISION_UTILS}
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(textwrap.dedent(text))
    return root


def test_whole_runs_time_each_variant_in_its_own_process(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    checkout = fake_checkout(tmp_path / "ilvr_adm")
    monkeypatch.setenv("FAKE_OFFICIAL_LOG", str(tmp_path / "official.jsonl"))
    out_json = tmp_path / "whole.json"
    rc = main(["bench", "--whole-runs", "--models", "bundled", "--model", str(tiny_checkpoint), "--batch", "2",
               "--repeats", "1", "--steps", "2", "--N", "4", "--official", str(checkout), "--json", str(out_json),
               "--no-bf16"])  # the bf16 row exists only on some CPUs
    assert rc == 0
    text = capsys.readouterr().out
    for needle in ("first s", "median s", "peak MiB", "vs official", "ours-torch"):
        assert needle in text, needle
    data = json.loads(out_json.read_text())
    assert data["kind"] == "whole runs" and data["torch"] and data["machine"]
    assert "--whole-runs --models bundled --batch 2 --repeats 1 --steps 2 --N 4 --official" in data["command"]
    assert data["command"].endswith("--no-bf16")
    (res,) = data["results"]
    assert (res["batch"], res["steps"], res["N"], res["yardstick"]) == (2, "2", 4, "official")
    assert list(res["variants"]) == ["ours", "ours-torch", "official"]
    for v in res["variants"].values():
        assert len(v["runs"]) == 1 and v["first"]["wall_s"] > 0 and v["peak_rss_mib_max"] > 0
    assert res["variants"]["official"]["vs_yardstick"] == 1
    calls = [json.loads(line) for line in (tmp_path / "official.jsonl").read_text().splitlines()]
    assert len(calls) == 2  # the first run and one timed run
    assert calls[0]["num_samples"] == calls[0]["batch_size"] == 2 and calls[0]["refs"] >= 2
    assert (calls[0]["down_N"], calls[0]["range_t"], calls[0]["timestep_respacing"]) == ("4", "0", "2")
    assert calls[0]["model_path"].endswith("bundled.pt")
    assert "--image_size" in calls[0]["rest"] and "--learn_sigma" in calls[0]["rest"]
    assert not any("stand-in" in note for note in res["notes"])  # the fake checkout brings a torchvision
    # the UNet's work per run and each variant's rate: per image and call, times 2 images and 2 steps
    assert res["unet_work_gflop"] == pytest.approx(res["unet_gflop_per_image"] * 2 * 2)
    for v in res["variants"].values():
        assert v["unet_gflops_per_s"] == pytest.approx(res["unet_work_gflop"] / v["wall_s"]["median"])
    assert data["matmul_fp32_gflops"] > 0 and "GFLOP/s" in text and "matrix product runs at" in text


def test_the_unet_flop_count_matches_one_made_layer_by_layer():
    """Convolutions, linear layers and attention's two products, counted from the shapes each layer saw."""
    import torch
    from torch import nn
    from ilvr.network import AttentionBlock, UNet
    from ilvr.whole_runs import unet_gflop_per_image

    unet = UNet(UNetConfig(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_levels=(1,), num_head_channels=32)).eval()
    flops = []

    def count(module, inputs, output):
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            per_output = 2 * module.in_channels // module.groups * math.prod(module.kernel_size)
            flops.append(per_output * output.numel())
        elif isinstance(module, nn.Linear):
            flops.append(2 * module.in_features * output.numel())
        elif isinstance(module, AttentionBlock):
            b, c, *spatial = inputs[0].shape
            tokens = math.prod(spatial)
            flops.append(2 * 2 * b * tokens * tokens * c)  # q k^T and (attention) v, all heads together

    hooks = [m.register_forward_hook(count) for m in unet.modules()]
    with torch.inference_mode():
        unet(torch.zeros(1, 3, 16, 16), torch.tensor([500]))
    for h in hooks:
        h.remove()
    assert unet_gflop_per_image(unet) == pytest.approx(sum(flops) / 1e9, rel=1e-6)


STAND_IN_SCRIPT = '''
import sys
import torch
from torchvision import utils

x = torch.tensor([[-1.0, 0.0, 1.0], [-0.5, 0.5, 2.0]])
image = torch.stack([x, -x, torch.zeros_like(x)]).unsqueeze(0)  # 1 x 3 x 2 x 3, as the official script saves
utils.save_image(image, sys.argv[1], nrow=1, normalize=True, range=(-1, 1))
try:
    utils.save_image(image.repeat(2, 1, 1, 1), sys.argv[1] + ".grid.png", nrow=2, normalize=True, range=(-1, 1))
except NotImplementedError as e:
    print("refused:", e)
'''


def test_without_torchvision_the_shim_saves_the_png_with_its_stand_in(tmp_path):
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the shim would save with it")
    from PIL import Image

    checkout = tmp_path / "ilvr_adm"
    (checkout / "scripts").mkdir(parents=True)
    (checkout / "scripts" / "ilvr_sample.py").write_text(textwrap.dedent(STAND_IN_SCRIPT))
    env = official_environment(checkout, {k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    out = tmp_path / "00000.png"
    done = subprocess.run([sys.executable, str(SHIM_DIR / "run_ilvr_sample.py"), str(checkout), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "saving with the stand-in save_image" in done.stderr  # no torchvision was found in the child either
    image = Image.open(out)
    assert image.mode == "RGB" and image.size == (3, 2)
    # clamped to -1..1, then torchvision's (x + 1) / 2 * 255 + 0.5, truncated
    assert [[image.getpixel((x, y)) for x in range(3)] for y in range(2)] == [
        [(0, 255, 128), (128, 128, 128), (255, 0, 128)],
        [(64, 191, 128), (191, 64, 128), (255, 0, 128)]]
    assert "refused: the torchvision stand-in saves one 1 x 3 x H x W image only" in done.stdout
    assert not (tmp_path / "00000.png.grid.png").exists()
    assert saving_notes(checkout) == ["the official sampler saved its PNGs with the shim's stand-in save_image "
                                      "(no torchvision installed)"]
    assert saving_notes(fake_checkout(tmp_path / "with_torchvision")) == []


def test_whole_runs_refuse_what_they_cannot_time(tmp_path, capsys):
    assert main(["bench", "--whole-runs", "--models", "adm256"]) == 2
    assert main(["bench", "--whole-runs", "--check-plain"]) == 2
    assert main(["bench", "--whole-runs", "--official", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bundled and/or adm64" in err and "give --official" in err and "jychoi118/ilvr_adm" in err


def test_the_plain_loops_process_writes_one_png_per_sample(tiny_checkpoint, ref_png, tmp_path):
    from PIL import Image

    from ilvr import plain_run

    assert plain_run.main(["--model", str(tiny_checkpoint), "--ref", str(ref_png), "--N", "4", "--steps", "3",
                           "--batch", "3", "--out", str(tmp_path / "out")]) == 0
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in pngs] == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(pngs[0]).size == (32, 32)
