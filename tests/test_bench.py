"""The benchmark's straightforward loop and our fast path draw the same samples; `bench` runs end to end.

CPU only, tiny random model, no timing assertions.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ilvr import bench, network
from ilvr.cli import main
from ilvr.network import UNetConfig
from ilvr.algorithm1 import algorithm1
from ilvr.sampler import sample
from ilvr.schedule import DiffusionConfig

TINY = UNetConfig(image_size=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                  num_head_channels=32)


@pytest.fixture(scope="module")
def tiny_model():
    return bench.random_model(TINY, DiffusionConfig(), name="tiny", seed=0)


def _reference(seed: int = 3) -> torch.Tensor:
    return bench.synthetic_reference(32, 3, seed)


@pytest.mark.parametrize("n_factor,kernel,stop_at", [(4, "cubic", 0), (8, "lanczos3", 0), (2, "cubic", 600)])
def test_fast_path_matches_plain_loop(tiny_model, n_factor, kernel, stop_at):
    ref = _reference()
    seeds = [11, 12]
    ours = sample(tiny_model, ref, seeds=seeds, n_factor=n_factor, kernel=kernel, steps=8, stop_at=stop_at)
    plain = algorithm1(tiny_model, ref, seeds=seeds, n_factor=n_factor, kernel=kernel, steps=8, stop_at=stop_at)
    assert ours.dtype == plain.dtype == torch.float32
    assert ours.shape == plain.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-4)


def test_fast_path_matches_plain_loop_per_sample_references(tiny_model):
    refs = torch.stack([_reference(1), _reference(2)])
    ours = sample(tiny_model, refs, seeds=[5, 6], n_factor=4, steps=6)
    plain = algorithm1(tiny_model, refs, seeds=[5, 6], n_factor=4, steps=6)
    torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-4)


def test_channels_last_fast_model_matches_plain_loop(tiny_model):
    fast = bench.make_fast(tiny_model, channels_last=True)
    assert fast.unet is not tiny_model.unet  # the plain model keeps its own contiguous fp32 UNet
    assert next(tiny_model.unet.parameters()).is_contiguous()
    ref = _reference()
    ours = sample(fast, ref, seeds=[7], n_factor=4, steps=6)
    plain = algorithm1(tiny_model, ref, seeds=[7], n_factor=4, steps=6)
    torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode, ours_kept", [("default", True), ("max-autotune-no-cudagraphs", True),
                                              ("max-autotune", False), ("reduce-overhead", False)])
def test_compile_modes_that_capture_cuda_graphs_turn_ours_off(tiny_model, mode, ours_kept):
    # Two captures of one call would nest; modes without their own graphs keep our replay.
    fast = bench.make_fast(tiny_model, compile=True, compile_mode=mode)  # compiles lazily: nothing runs here
    assert fast.cuda_graphs is ours_kept
    with pytest.raises(ValueError, match="compile mode must be one of"):
        fast.compile("fastest")


def test_plain_loop_is_seeded_and_uses_the_reference(tiny_model):
    ref = _reference()
    a = algorithm1(tiny_model, ref, seeds=[1], n_factor=4, steps=4)
    b = algorithm1(tiny_model, ref, seeds=[1], n_factor=4, steps=4)
    c = algorithm1(tiny_model, ref, seeds=[2], n_factor=4, steps=4)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-3
    # the last step is conditioned on the clean reference: with N=1 (no filtering) it comes back exactly
    same = algorithm1(tiny_model, ref, seeds=[1], n_factor=1, steps=4)
    torch.testing.assert_close(same, ref[None], atol=1e-5, rtol=0)


def test_bench_command_prints_the_table(tiny_model, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "bundled_model", lambda source, device: (tiny_model, "random weights (test)"))
    out_json = tmp_path / "bench.json"
    rc = main(["bench", "--device", "cpu", "--steps", "2", "--repeats", "2", "--full-steps", "3", "--N", "4",
               "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    for needle in ("unconditional", "ILVR, ours (fast path)", "ILVR, plain loop (official style)", "s/sample",
                   "steps/s", "peak MiB", "vs uncond", "vs plain", "ILVR overhead over unconditional",
                   "real 3-step ILVR run", "extrapolated"):
        assert needle in text, needle
    data = json.loads(out_json.read_text())
    (res,) = data["results"]
    assert res["batch"] == 1 and res["steps"] == 2 and res["device"] == "cpu"
    assert [r["variant"] for r in res["rows"]] == ["unconditional", "ILVR, ours (fast path)", "ILVR, ours on PyTorch",
                                                    "ILVR, plain loop (official style)"]
    assert res["cpu_backend"] == "onnxruntime" and "UNet on onnxruntime" in text
    for row in res["rows"]:
        assert len(row["wall_s"]) == len(row["cpu_s"]) == 2 and row["s_per_sample"] > 0 and row["steps_per_s"] > 0
        assert row["peak_mib"] is None or row["peak_mib"] > 0
    assert res["max_abs_diff_ours_vs_plain"] < 1e-3
    assert res["full"]["steps"] == 3


def test_bench_rejects_unknown_setup(capsys):
    assert main(["bench", "--models", "bogus", "--steps", "2"]) == 2
    assert "unknown --models" in capsys.readouterr().err


def test_profile_step_script_shows_the_ops_ilvr_adds(tmp_path):
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "scripts/profile_step.py", "--skip", "0", "--active", "1", "--rows", "3",
                          "--out", str(tmp_path)], cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    added = run.stdout.split("ops ILVR calls more often")[1].split("\n== ")[0]
    assert "aten::matmul" in added  # phi_N as two matrices: the profile sees ILVR's own work
    assert (tmp_path / "ilvr.json").is_file() and (tmp_path / "unconditional.json").is_file()


def test_timed_steps_are_full_runs_only_for_brief_cuda_runs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench.timed_steps(None, cpu, 1) == bench.TIMED_STEPS == 50
    assert bench.timed_steps(None, cuda, 8) == bench.TIMED_STEPS
    assert bench.timed_steps(None, cuda, 1) == bench.FULL_STEPS == 250
    assert bench.timed_steps(12, cuda, 1) == 12


def test_step_breakdown_group_norm_variants_are_the_same_norm():
    """The GPU A/B script's two GroupNorms must compute what the shipped one does, or its timing says nothing."""
    spec = importlib.util.spec_from_file_location("gpu_step_breakdown",
                                                  Path(__file__).resolve().parents[1] / "scripts/gpu_step_breakdown.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    norm = network.GroupNorm32(8, 32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 32, 9, 7, generator=torch.Generator().manual_seed(0)) * 3 + 2
    for layout in (torch.contiguous_format, torch.channels_last):
        for variant in (script.group_norm_by_channel, script.f_group_norm):
            got = variant(norm, x.to(memory_format=layout))
            torch.testing.assert_close(got, script.SHIPPED_GROUP_NORM(norm, x), atol=1e-5, rtol=1e-5)
