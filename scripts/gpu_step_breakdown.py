"""Where a compiled batch-8 UNet call of the 256 px ADM spends its GPU time, and layout/GroupNorm A/Bs.

Prints the kernel time per category (convolutions, Triton reductions = the norms, Triton pointwise,
layout copies) and the top kernels of one compiled fp16 FFHQ-P2 UNet call, the plain ILVR loop's
step for scale, then times the UNet call (with our CUDA graph) for:
  * Inductor's default NHWC layout optimisation against plain NCHW, and
  * GroupNorm from per-channel statistics (what ``GroupNorm32`` does when compiled on CUDA) against
    F.group_norm, whose group reductions are strided in NHWC (patched here for the A/B only).
On an H100 (benchmarks/2026-11-26/h100_s12_breakdown.log): 16.1 ms with F.group_norm, 12.3 ms with
per-channel statistics. Inductor's coordinate-descent tuning did not finish compiling in 4 minutes.

    python scripts/gpu_step_breakdown.py                      # on a GPU, about 3 minutes
    python scripts/gpu_step_breakdown.py --device cpu --smoke --no-compile   # checks the script itself
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ilvr.network as network  # noqa: E402
from ilvr.algorithm1 import algorithm1  # noqa: E402
from ilvr.bench import ffhq_p2_configs, make_fast, random_model, synthetic_reference  # noqa: E402

SHIPPED_GROUP_NORM = network.GroupNorm32.forward
group_norm_by_channel = network.GroupNorm32._by_channel  # what the shipped one does when compiled on CUDA
f_group_norm = network.GroupNorm32._fused  # F.group_norm everywhere, compiled or not (before the change)


def kernel_kind(name: str) -> str:
    n = name.lower()
    if n.startswith(("triton_red", "triton_per")):
        return "Triton reductions (norms)"
    if n.startswith("triton_poi"):
        return "Triton pointwise"
    if n.startswith("triton_") and ("conv" in n or "mm" in n or "tem" in n):
        return "Triton templates (conv, mm)"
    if any(k in n for k in ("conv", "xmma", "cutlass", "implicit", "sm90", "sm80", "cudnn", "gemm", "dgrad")):
        return "cuDNN / cuBLAS (conv, gemm)"
    if any(k in n for k in ("copy", "transpose", "nchw", "nhwc", "elementwise")):
        return "copies, layout changes"
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--smoke", action="store_true", help="a 32 px two-level UNet instead of the 256 px ADM")
    p.add_argument("--deadline", type=float, default=float("inf"), help="seconds after which A/B rows are skipped")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--plain-steps", type=int, default=10, help="steps of the plain loop to time (0: skip)")
    args = p.parse_args()

    start = time.perf_counter()
    device = torch.device(args.device)
    unet_cfg, diffusion = ffhq_p2_configs()
    if args.smoke:
        unet_cfg = dataclasses.replace(unet_cfg, image_size=32, model_channels=32, channel_mult=(1, 2),
                                       attention_levels=(1,))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base = random_model(unet_cfg, diffusion, device=device, name="adm256-ffhq-p2")
    size = unet_cfg.image_size
    x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    t = torch.full((args.batch,), 500, device=device)

    def build(group_norm, layout_optimization: bool, cuda_graphs: bool = True):
        import torch._inductor.config as inductor_config
        torch._dynamo.reset()
        inductor_config.layout_optimization = layout_optimization
        network.GroupNorm32.forward = group_norm
        model = make_fast(base, dtype=dtype, compile=args.compile)
        model.cuda_graphs = model.cuda_graphs and cuda_graphs
        return model

    def time_call(model, reps: int = 40, rounds: int = 3) -> tuple[float, torch.Tensor]:
        denoise = model.denoiser()
        with torch.inference_mode():
            for _ in range(3):
                out = denoise(x, t)
            sync()
            best = float("inf")
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(reps):
                    denoise(x, t)
                sync()
                best = min(best, (time.perf_counter() - t0) / reps)
        return best * 1000, out.float().clone()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f} s] {msg}", flush=True)

    try:
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile
            model = build(SHIPPED_GROUP_NORM, True, cuda_graphs=False)  # kernels one by one, as compiled
            time_call(model, reps=3, rounds=1)
            denoise, calls = model.denoiser(), 5
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    denoise(x, t)
                sync()
            per_kernel, per_kind, counts = collections.Counter(), collections.Counter(), collections.Counter()
            for event in prof.key_averages():
                us = event.self_device_time_total / calls
                if us > 0:
                    per_kernel[event.key] += us
                    counts[event.key] += event.count / calls
                    per_kind[kernel_kind(event.key)] += us
            total = sum(per_kernel.values())
            say(f"kernels of one compiled batch-{args.batch} UNet call (no CUDA graph): {total / 1000:.2f} ms")
            for kind, us in per_kind.most_common():
                print(f"  {us / 1000:8.3f} ms {us / total:6.1%}  {kind}")
            for key, us in per_kernel.most_common(args.rows):
                print(f"  {us / 1000:8.3f} ms {counts[key]:5.1f}x  {key[:110]}")

        if args.plain_steps:  # the benchmark's baseline, to turn call times into ratios
            ref = synthetic_reference(size)
            seeds = list(range(args.batch))
            algorithm1(base, ref, seeds=seeds, n_factor=4, steps=2)
            sync()
            t0 = time.perf_counter()
            algorithm1(base, ref, seeds=seeds, n_factor=4, steps=args.plain_steps)
            sync()
            plain_ms = (time.perf_counter() - t0) / args.plain_steps * 1000
            say(f"plain ILVR loop (fp32, resize-right): {plain_ms:.2f} ms per batch-{args.batch} step")
        else:
            plain_ms = float("nan")

        reference = None
        rows = (("NHWC layout optimisation, GroupNorm by channel (as shipped)", group_norm_by_channel, True),
                ("NHWC layout optimisation, F.group_norm", f_group_norm, True),
                ("NCHW (layout optimisation off), F.group_norm", f_group_norm, False),
                ("NCHW, GroupNorm by channel", group_norm_by_channel, False))
        for label, group_norm, layout in rows:
            if time.perf_counter() - start > args.deadline:
                say(f"skipped (deadline): {label}")
                continue
            t0 = time.perf_counter()
            ms, out = time_call(build(group_norm, layout))
            reference = out if reference is None else reference
            say(f"{label}: {ms:.3f} ms per batch-{args.batch} UNet call = {ms / plain_ms:.3f}x the plain step "
                f"(setup {time.perf_counter() - t0:.0f} s), max |out - first row| {(out - reference).abs().max().item():.2e}")
    finally:
        network.GroupNorm32.forward = SHIPPED_GROUP_NORM


if __name__ == "__main__":
    main()
