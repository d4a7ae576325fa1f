"""The same engine on a CUDA GPU: same seeds give the CPU's images, fp16 stays close, torchrun uses nccl.

Skipped where torch sees no GPU (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ilvr import bench
from ilvr.loading import load_model
from ilvr.model import DiffusionModel
from ilvr.network import UNetConfig
from ilvr.algorithm1 import algorithm1
from ilvr.sampler import sample
from ilvr.schedule import DiffusionConfig
from conftest import TINY_TRAIN_FLAGS, noise_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[1]
TINY = UNetConfig(image_size=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                  num_head_channels=32)


@pytest.fixture
def exact_fp32():
    """Plain fp32 convolutions and matmuls (PyTorch lets cuDNN use TF32 by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def on(model: DiffusionModel, device: str, dtype: torch.dtype = torch.float32) -> DiffusionModel:
    return DiffusionModel(unet=model.unet.to(device), diffusion=model.diffusion, name=model.name, device=device,
                          dtype=dtype)


def test_cuda_samples_match_cpu_samples_in_fp32(exact_fp32):
    model = bench.random_model(TINY, DiffusionConfig(), seed=1)
    ref = bench.synthetic_reference(32, 3, seed=2)
    cpu = sample(model, ref, seeds=[3, 4], n_factor=4, steps=10)
    gpu = sample(on(model, "cuda"), ref, seeds=[3, 4], n_factor=4, steps=10)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)


def test_fast_path_matches_plain_loop_on_cuda(exact_fp32):
    model = on(bench.random_model(TINY, DiffusionConfig(), seed=5), "cuda")
    ref = bench.synthetic_reference(32, 3, seed=6)
    ours = sample(model, ref, seeds=[1, 2, 3], n_factor=8, steps=12, stop_at=300)
    plain = algorithm1(model, ref, seeds=[1, 2, 3], n_factor=8, steps=12, stop_at=300)
    torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_autocast_stays_close_to_fp32(dtype):
    model = bench.random_model(TINY, DiffusionConfig(), seed=7)
    ref = bench.synthetic_reference(32, 3, seed=8)
    full = sample(on(model, "cuda"), ref, seeds=[9], n_factor=4, steps=20)
    half = sample(on(model, "cuda", dtype), ref, seeds=[9], n_factor=4, steps=20)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert (half - full).abs().mean() < 0.02


def test_bundled_model_loads_on_cuda_in_fp16_and_follows_the_reference():
    model = load_model("emoji64", device="cuda")
    assert model.device.type == "cuda" and model.dtype == torch.float16
    ref = bench.synthetic_reference(model.image_size, 3, seed=0)
    out = sample(model, ref, seeds=[0, 1], n_factor=1, steps=25)
    torch.testing.assert_close(out.cpu(), ref.expand(2, -1, -1, -1), atol=1e-5, rtol=0)  # N=1: the reference
    free = sample(model, None, seeds=[0], steps=25)
    assert torch.isfinite(free).all() and free.abs().max() < 3


def test_learned_range_adm_layout_runs_with_channels_last_and_fp16():
    cfg = UNetConfig(image_size=32, out_channels=6, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_levels=(1,), num_head_channels=16, resblock_updown=True)
    model = bench.random_model(cfg, DiffusionConfig(variance_type="learned_range"), device="cuda", seed=3)
    plain = sample(model, bench.synthetic_reference(32), seeds=[0], n_factor=2, steps=8)
    fast = sample(bench.make_fast(model, dtype=torch.float16, channels_last=True), bench.synthetic_reference(32),
                  seeds=[0], n_factor=2, steps=8)
    assert (fast - plain).abs().mean() < 0.02


def test_train_on_cuda_few_steps(tmp_path):
    from ilvr.cli import main

    data = noise_images(tmp_path / "data", [(24, 24)] * 4)
    out = tmp_path / "model"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY_TRAIN_FLAGS, "--batch-size", "4",
                 "--steps", "3", "--sample-every", "0", "--device", "cuda"]) == 0
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == 3
    assert torch.isfinite(sample(load_model(out, device="cuda"), None, seeds=[0], steps="3")).all()
    # a second run resumes the saved state on the GPU (the CPU generator's state must come back to the CPU)
    assert main(["train", "--data", str(data), "--out", str(out), *TINY_TRAIN_FLAGS, "--batch-size", "4",
                 "--steps", "5", "--sample-every", "0", "--device", "cuda"]) == 0
    assert json.loads((out / "config.json").read_text())["training"]["steps"] == 5


def test_torchrun_on_cuda_uses_nccl_and_matches_one_process(tmp_path):
    """One process per GPU (cuda:LOCAL_RANK, nccl): the same images as a plain single-process run."""
    from ilvr.export import export_model

    export_model(bench.random_model(TINY, DiffusionConfig(), seed=11).unet, DiffusionConfig(), tmp_path / "model")
    refs = tmp_path / "refs"
    refs.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(refs / f"r{i}.png")
    args = ["-m", "ilvr", "sample", "--model", str(tmp_path / "model"), "--ref-dir", str(refs), "--num-samples", "2",
            "--steps", "6", "--N", "4", "--dtype", "fp32", "--device", "cuda"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    single = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", str(port), *args,
                               "--out", str(tmp_path / "dist")], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
    log = launched.stdout + launched.stderr
    assert launched.returncode == 0, log
    assert "nccl" in log
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert len(names) == 6 and names == sorted(p.name for p in (tmp_path / "dist").glob("*.png"))
    for name in names:
        a = np.asarray(Image.open(tmp_path / "one" / name), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "dist" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name


def test_cuda_graph_replay_equals_eager_calls(exact_fp32):
    model = on(bench.random_model(TINY, DiffusionConfig(), seed=12), "cuda")
    ref = bench.synthetic_reference(32, 3, seed=13)
    model.cuda_graphs = True
    graphed = sample(model, ref, seeds=[1, 2], n_factor=4, steps=15)
    model.cuda_graphs = False
    eager = sample(model, ref, seeds=[1, 2], n_factor=4, steps=15)
    torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=1e-5)


def test_concurrent_runs_on_one_model_do_not_mix_and_keep_their_graphs(exact_fp32):
    """The app samples for several users at once on a GPU: each run has its own graph and buffers, and
    no run's capture is broken by the others' work (ilvr.cuda_graphs.GPU_GATE). Like the app, another
    thread copies the runs' x0 previews to the CPU while they sample."""
    import threading
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    model = on(bench.random_model(TINY, DiffusionConfig(), seed=14), "cuda")
    refs = [bench.synthetic_reference(32, 3, seed=s) for s in (1, 2, 3, 4)]
    jobs = [(refs[k], [k, 10 + k][: 1 + k % 2]) for k in range(4)]
    serial = [sample(model, r, seeds=s, n_factor=4, steps=20) for r, s in jobs]
    previews: list[torch.Tensor] = []
    stop = threading.Event()

    def poll() -> None:  # the app's progress thread
        while not stop.is_set():
            if previews:
                previews[-1].cpu()
            stop.wait(0.001)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    run = lambda job: sample(model, job[0], seeds=job[1], n_factor=4, steps=20,  # noqa: E731
                             progress=lambda info: previews.append(info.pred_x0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with ThreadPoolExecutor(max_workers=4) as pool:
                parallel = list(pool.map(run, jobs))
            for a, b in zip(serial, parallel):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    stop.set()
    poller.join(2)
    failures = [str(w.message) for w in caught if "capture failed" in str(w.message)]
    assert not failures, failures
    assert model.cuda_graphs and model.failed_captures == 0


def test_fast_copy_leaves_the_plain_model_in_fp32():
    model = bench.random_model(TINY, DiffusionConfig(), device="cuda", seed=15)
    fast = bench.make_fast(model, dtype=torch.float16)
    assert fast.unet.dtype == torch.float16 and fast.unet.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32
    assert model.unet.dtype == torch.float32


def test_cli_compile_on_cuda(tmp_path):
    """`sample --compile`: torch.compile'd UNet inside the per-run CUDA graph, same images as without."""
    from ilvr.cli import main
    from ilvr.export import export_model

    export_model(bench.random_model(TINY, DiffusionConfig(), seed=16).unet, DiffusionConfig(), tmp_path / "model")
    ref = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(ref)
    common = ["sample", "--model", str(tmp_path / "model"), "--ref", str(ref), "--num", "3", "--steps", "8",
              "--dtype", "fp32"]
    assert main(common + ["--out", str(tmp_path / "eager")]) == 0
    assert main(common + ["--out", str(tmp_path / "compiled"), "--compile"]) == 0
    for k in range(3):
        a = np.asarray(Image.open(tmp_path / "eager" / f"ref_{k}.png"), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "compiled" / f"ref_{k}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 2


def test_failed_graph_capture_falls_back_to_eager(monkeypatch, exact_fp32):
    """Some GPU runtimes forbid capture: the run goes on eagerly with a warning, same samples."""
    model = on(bench.random_model(TINY, DiffusionConfig(), seed=17), "cuda")
    ref = bench.synthetic_reference(32, 3, seed=18)
    model.cuda_graphs = False
    eager = sample(model, ref, seeds=[5], n_factor=4, steps=6)

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph", refuse)
    model.cuda_graphs = True
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        out = sample(model, ref, seeds=[5], n_factor=4, steps=6)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    assert model.failed_captures == 1 and model.cuda_graphs  # the next run tries again
