"""Where a compiled batch-8 UNet call of the 256 px ADM spends its GPU time, and two layout A/Bs.

The compiled fp16 FFHQ-P2 UNet runs a batch-8 step in about 18 ms on an H100, yet its 3.1 TFLOP of
convolutions would take about 4.4 ms at the rate cuDNN reaches on its largest convolution. This
script prints the kernel time per category (convolutions, Triton reductions = the norms, Triton
pointwise, layout copies) and the top kernels, then times the UNet call (with our CUDA graph) for:
  * Inductor's default NHWC layout optimisation against plain NCHW, and
  * GroupNorm as F.group_norm against statistics taken per channel first, which are contiguous
    column reductions in NHWC (the variant is monkeypatched here; nothing in ilvr/ changes).

    python scripts/gpu_step_breakdown.py                      # on a GPU, about 4 minutes
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
from ilvr.bench import ffhq_p2_configs, make_fast, random_model  # noqa: E402

F_GROUP_NORM = network.GroupNorm32.forward


def group_norm_by_channel(self: network.GroupNorm32, x: torch.Tensor) -> torch.Tensor:
    """The same GroupNorm from per-channel mean and variance, combined per group."""
    n, c, groups = x.shape[0], x.shape[1], self.num_groups
    xf = x.float()
    var_c, mean_c = torch.var_mean(xf, dim=tuple(range(2, x.dim())), correction=0)
    mean_g = mean_c.view(n, groups, -1).mean(-1)
    var_g = (var_c + mean_c.square()).view(n, groups, -1).mean(-1) - mean_g.square()
    inv = torch.rsqrt(var_g.clamp_min(0) + self.eps).repeat_interleave(c // groups, 1)
    scale = inv * self.weight.float()
    shift = self.bias.float() - mean_g.repeat_interleave(c // groups, 1) * scale
    view = (n, c) + (1,) * (x.dim() - 2)
    return (xf * scale.view(view) + shift.view(view)).to(x.dtype)


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
            model = build(F_GROUP_NORM, True, cuda_graphs=False)  # kernels one by one, as compiled
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

        reference = None
        for label, group_norm, layout in (("NHWC layout optimisation, F.group_norm (as shipped)", F_GROUP_NORM, True),
                                          ("NCHW (layout optimisation off), F.group_norm", F_GROUP_NORM, False),
                                          ("NHWC layout optimisation, GroupNorm by channel", group_norm_by_channel, True),
                                          ("NCHW, GroupNorm by channel", group_norm_by_channel, False)):
            if time.perf_counter() - start > args.deadline:
                say(f"skipped (deadline): {label}")
                continue
            t0 = time.perf_counter()
            ms, out = time_call(build(group_norm, layout))
            reference = out if reference is None else reference
            say(f"{label}: {ms:.3f} ms per batch-{args.batch} UNet call (setup {time.perf_counter() - t0:.0f} s), "
                f"max |out - first row| {(out - reference).abs().max().item():.2e}")
    finally:
        network.GroupNorm32.forward = F_GROUP_NORM


if __name__ == "__main__":
    main()
