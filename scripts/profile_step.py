"""Where a sampling step's time goes: torch.profiler over a few steady steps of unconditional and of
ILVR sampling, run exactly as the app and CLI run them (``ilvr.sampler.sample`` on the fast path).

Prints the ops with the most self time per step (device time on CUDA, CPU time otherwise) for both,
then the ops that ILVR adds or makes slower, and writes Chrome traces (chrome://tracing, Perfetto).
It is the next step when `python -m ilvr bench` shows an ILVR overhead worth chasing.

    python scripts/profile_step.py                                  # bundled model on this machine
    python scripts/profile_step.py --model adm256 --compile         # on a GPU: 256 px ADM, compiled
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ilvr.bench import bundled_model, ffhq_p2_configs, make_fast, random_model, synthetic_reference  # noqa: E402
from ilvr.device import resolve_device, resolve_dtype  # noqa: E402
from ilvr.registry import scaled_factor  # noqa: E402
from ilvr.sampler import sample  # noqa: E402


def profile_run(model, reference, args, cuda: bool, trace: Path):
    """Profile `args.active` steps after `args.skip` unprofiled ones; returns {op: (self us/step, calls/step)}."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    plan = schedule(wait=args.skip, warmup=1, active=args.active, repeat=1)
    with profile(activities=activities, schedule=plan) as prof:
        sample(model, reference, seeds=list(range(args.batch)), n_factor=args.N, steps=args.skip + 1 + args.active + 1,
               progress=lambda info: prof.step())
    prof.export_chrome_trace(str(trace))
    per_step = {}
    for e in prof.key_averages():
        us = (e.self_device_time_total if cuda else e.self_cpu_time_total) / args.active
        per_step[e.key] = (us, e.count / args.active)
    return per_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["bundled", "adm256"], default="bundled")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--N", type=int, default=None, help="low-pass factor (default: the translation preset)")
    p.add_argument("--skip", type=int, default=3, help="steps before profiling (CUDA graph capture, compile)")
    p.add_argument("--active", type=int, default=5, help="profiled steps")
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--out", default="test-artifacts/profile", help="folder for the Chrome traces")
    args = p.parse_args()

    device = resolve_device(args.device)
    if args.model == "bundled":
        model, _ = bundled_model(device=device)
    else:
        unet_cfg, diffusion = ffhq_p2_configs()
        model = random_model(unet_cfg, diffusion, device=device, name="adm256-ffhq-p2")
    fast = make_fast(model, dtype=resolve_dtype(None, device), channels_last=device.type == "cpu",
                     compile=args.compile)
    args.N = args.N or scaled_factor("translation", model.image_size)
    cuda = device.type == "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference = synthetic_reference(model.image_size, model.config.in_channels)
    clock = "device" if cuda else "CPU"
    print(f"{model.name} on {device}, batch {args.batch}, N={args.N}, compile={args.compile}; self {clock} time "
          f"per step, {args.active} profiled steps after {args.skip + 1}")

    results = {}
    for label, ref in (("unconditional", None), ("ilvr", reference)):
        sample(fast, ref, seeds=list(range(args.batch)), n_factor=args.N, steps=3)  # compile / capture first
        per_step = profile_run(fast, ref, args, cuda, out / f"{label}.json")
        results[label] = per_step
        total = sum(us for us, _ in per_step.values())
        print(f"\n== {label}: {total / 1000:.3f} ms of self {clock} time per step (trace: {out / (label + '.json')})")
        for key, (us, calls) in sorted(per_step.items(), key=lambda kv: -kv[1][0])[:args.rows]:
            print(f"  {us / 1000:9.3f} ms  {calls:6.1f} calls  {key[:90]}")

    base = results["unconditional"]
    # per op: (self time in the ILVR run, extra self time, extra calls) against the unconditional run
    diff = {key: (us, us - base.get(key, (0.0, 0.0))[0], calls - base.get(key, (0.0, 0.0))[1])
            for key, (us, calls) in results["ilvr"].items()}
    print(f"\n== ops ILVR calls more often per step (exact), with their self {clock} time in the ILVR run")
    for key, (us, _, more) in sorted(diff.items(), key=lambda kv: -kv[1][0]):
        if more > 0.5:
            print(f"  {us / 1000:9.3f} ms  +{more:4.1f} calls  {key[:90]}")
    print(f"\n== self {clock} time ILVR adds per op (ILVR - unconditional; on CPU mostly run-to-run noise)")
    for key, (_, added, _) in sorted(diff.items(), key=lambda kv: -kv[1][1])[:args.rows]:
        if added > 0:
            print(f"  {added / 1000:9.3f} ms  {key[:90]}")


if __name__ == "__main__":
    main()
