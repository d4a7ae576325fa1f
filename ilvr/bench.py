"""Speed benchmark (``python -m ilvr bench``): the ILVR fast path against the straightforward loop.

Three ways to draw samples, timed side by side in one run on the same weights, reference and seeds:

  unconditional   ``ilvr.sampler.sample(model, None, ...)``: the UNet alone, the floor ILVR is measured
                  against (ILVR overhead = ours / unconditional - 1).
  ILVR, ours      ``ilvr.sampler.sample(model, reference, ...)``: phi_N once per step as two small
                  precomputed matmuls (x = x' + phi(y_{t-1} - x')), torch.inference_mode, the model's compute
                  dtype (on CUDA fp16 weights with fp32 norms by default), on CPU the channels_last layout,
                  and on CUDA the UNet call replayed as a CUDA graph and the noise drawn ahead by a worker
                  thread; optionally torch.compile. These are the defaults of load_model and the sampler,
                  i.e. what the app and the CLI run.
  ILVR, plain     ``ilvr.algorithm1``, written the way the official implementation (jychoi118/ilvr_adm)
                  writes its loop: fp32 network, torch.no_grad, and per step
                  x = x' - up(down(x')) + up(down(y_noisy)), i.e. down+up run twice per step. The resizing is
                  resize-right's ``resize`` (``ilvr.filters.resize_right_lowpass``, on a mirror-padded
                  copy: the official resizer mirrors borders), which derives its kernel weights on every call; the official repo uses the same author's earlier PyTorch-Resizer,
                  whose weights are built once, so the plain loop's phi_N time is an upper bound on the
                  official one. The table prints phi_N's own time per step so its share can be read off.

The plain loop draws the same noise in the same order as ``ilvr.sampler.sample`` (one CPU generator per
sample: the start noise, then per step z and then eps) and uses the same diffusion maths
(``ilvr.schedule.predict_step``) and the same conditioning conventions (y noised to x_{t-1}'s level, last
step conditioned on the clean y, stop step on the 1000-step scale), so in fp32 both give the same samples
to float tolerance and the timings differ only by how ILVR and the network are run.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .algorithm1 import algorithm1
from .device import resolve_device, resolve_dtype
from .loading import ModelLoadError, load_model
from .model import COMPILE_MODES, DiffusionModel, inference_unet
from .network import UNet, UNetConfig, count_parameters
from .registry import CHECKPOINTS_DIR, DEFAULT_MODEL, scaled_factor
from .runtime.onnx_cpu import cpu_backend as cpu_backend_choice
from .runtime.cpu_choice import cpu_runtime_for
from .sampler import sample
from .schedule import DiffusionConfig
from .timing import (FULL_STEPS, STATS, TIMED_STEPS, CpuPeakRss, Variant, environment, format_environment,
                     param_bytes, run_sequential, sync, synthetic_reference, time_ilvr_work)
from .whole_runs import add_arguments as add_whole_run_arguments
from .whole_runs import run as run_whole_runs


# ----------------------------------------------------------------------------- models

def ffhq_p2_configs() -> tuple[UNetConfig, DiffusionConfig]:
    """The ILVR authors' FFHQ 256 px ADM network (P2 weighting release), 6 output channels (learned sigma)."""
    unet = UNetConfig(image_size=256, out_channels=6, model_channels=128, channel_mult=(1, 1, 2, 2, 4, 4),
                      num_res_blocks=1, attention_levels=(4,), num_head_channels=64, resblock_updown=True)
    return unet, DiffusionConfig(variance_type="learned_range")


def random_model(unet_cfg: UNetConfig, diffusion: DiffusionConfig | None = None, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, name: str = "random") -> DiffusionModel:
    """A UNet of the given architecture with (seeded) random weights: for timings and tests."""
    with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's global RNG
        torch.manual_seed(seed)
        unet = UNet(unet_cfg).eval()
    return DiffusionModel(unet=unet.to(device), diffusion=diffusion or DiffusionConfig(), name=name, device=device,
                          dtype=dtype, source=name, info={"family": "random"})


def bundled_model(source: str = DEFAULT_MODEL, device: str | torch.device = "cpu") -> tuple[DiffusionModel, str]:
    """The bundled model in fp32; if its weights are missing or unreadable (e.g. mid-export), a random
    model of the same architecture. Returns (model, a note saying which)."""
    try:
        # the plain loop's network: fp32 in the default layout (make_fast makes the fast path's copy)
        return (load_model(source, device=device, dtype=torch.float32, channels_last=False, cpu_backend="torch"),
                "trained weights")
    except (ModelLoadError, OSError) as e:
        config_path = CHECKPOINTS_DIR / source / "config.json"
        if not config_path.is_file():
            raise
        config = json.loads(config_path.read_text())
        model = random_model(UNetConfig.from_dict(config["unet"]), DiffusionConfig.from_dict(config.get("diffusion", {})),
                             device=device, name=source)
        return model, f"random weights ({str(e).splitlines()[0][:80]})"


def make_fast(model: DiffusionModel, *, dtype: torch.dtype | None = None, channels_last: bool = False,
              compile: bool = False, compile_mode: str | None = None, cuda_graphs: bool = True,
              cpu_backend: str | None = "torch") -> DiffusionModel:
    """The same weights set up for speed: compute dtype, channels_last, torch.compile, CUDA graphs, and
    on CPU in fp32 onnxruntime where cpu_backend asks for it (None: as load_model chooses).

    On CUDA a half-precision dtype stores the weights in it (as ``load_model`` does); on CPU it runs
    under autocast. Any change works on a copy of the UNet, so ``model`` itself stays a plain fp32
    module (the straightforward loop keeps using it).
    """
    dtype = dtype or model.dtype
    unet = model.unet
    half = dtype != torch.float32 and model.device.type == "cuda"
    if channels_last or compile or half:
        unet = inference_unet(copy.deepcopy(unet), model.device, dtype, channels_last)
    fast = DiffusionModel(unet=unet, diffusion=model.diffusion, name=model.name, device=model.device,
                          dtype=dtype, source=model.source, info=dict(model.info), cuda_graphs=cuda_graphs,
                          cpu_runtime=None if compile else cpu_runtime_for(unet, model.device, dtype, cpu_backend))
    return fast.compile(compile_mode) if compile else fast


# ----------------------------------------------------------------------------- the straightforward loop

def bench_setup(model: DiffusionModel, *, label: str, weights_note: str, batch: int, steps: int, repeats: int,
                n_factor: int, kernel: str, fast_dtype: torch.dtype, channels_last: bool, compile: bool,
                compile_mode: str | None, seed: int = 0, full_steps: int = 0, fp32_variant: bool = True,
                cuda_graphs: bool = True, stat: str = "median", clock: str = "wall", cpu_backend: str | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time unconditional / ours / plain for one model, device and batch size. Returns a result dict."""
    device = model.device
    # the bench times both CPU backends itself, so auto (measured per batch size) means onnxruntime here
    backend = cpu_backend_choice(cpu_backend)
    backend = "onnxruntime" if backend == "auto" else backend
    fast = make_fast(model, dtype=fast_dtype, channels_last=channels_last, compile=compile, compile_mode=compile_mode,
                     cuda_graphs=cuda_graphs, cpu_backend=backend)
    fp32 = torch.float32
    reference = synthetic_reference(model.image_size, model.config.in_channels, seed)
    seeds = [seed + k for k in range(batch)]
    dname = lambda d: str(d).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16")  # noqa: E731
    wbytes = param_bytes(model.unet)

    def hook(on_step):
        return None if on_step is None else (lambda info: on_step())

    def ours(m):
        return lambda s, on_step=None: sample(m, reference, seeds=seeds, n_factor=n_factor, kernel=kernel, steps=s,
                                              progress=hook(on_step))

    def uncond(s, on_step=None):
        return sample(fast, None, seeds=seeds, steps=s, progress=hook(on_step))

    fast_bytes = param_bytes(fast.unet)
    # with onnxruntime the process holds the weights twice: the PyTorch UNet and the session's copy
    ours_bytes = fast_bytes * (2 if fast.cpu_runtime is not None else 1)
    variants = [Variant("unconditional", uncond, ours_bytes, dname(fast_dtype)),
                Variant("ILVR, ours (fast path)", ours(fast), ours_bytes, dname(fast_dtype))]
    if fast.cpu_runtime is not None:  # what onnxruntime buys over our PyTorch path
        variants.append(Variant("ILVR, ours on PyTorch", ours(make_fast(model, dtype=fast_dtype,
                                                                       channels_last=channels_last)),
                                fast_bytes, dname(fast_dtype)))
    if fast_dtype != fp32 and fp32_variant:  # separate what the dtype buys from what the rest buys
        variants.append(Variant("ILVR, ours in fp32", ours(make_fast(model, dtype=fp32, channels_last=channels_last,
                                                                    compile=compile, compile_mode=compile_mode,
                                                                    cuda_graphs=cuda_graphs)),
                                wbytes, "fp32"))
    variants.append(Variant("ILVR, plain loop (official style)",
                            lambda s, on_step=None: algorithm1(model, reference, seeds=seeds, n_factor=n_factor,
                                                               kernel=kernel, steps=s, on_step=on_step),
                            wbytes, "fp32"))

    # warm-up: allocator, oneDNN/cuDNN algorithm choice, and torch.compile's compilation
    t0 = time.perf_counter()
    for v in variants:
        v.run(2, None)
    sync(device)
    warmup_s = time.perf_counter() - t0
    log(f"  warm-up {warmup_s:.1f} s")

    for r in range(repeats):
        run_sequential(variants, steps, device, first=r % len(variants))
        log(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{v.label} {v.wall_s[-1]:.2f} s (cpu {v.cpu_s[-1]:.2f} s)"
                                                       for v in variants))

    mem_method = "torch.cuda.max_memory_allocated during the run - allocated before + weights"
    if device.type != "cuda":
        mem_steps = min(steps, 4)
        for v in variants:
            with CpuPeakRss() as meter:
                v.run(mem_steps, None)
            v.peak_bytes = None if meter.peak_bytes is None else meter.peak_bytes + v.weights_bytes
            mem_method = f"{meter.method} + weights, separate {mem_steps}-step pass"

    rows = [v.row(batch, steps, stat, clock) for v in variants]
    by = {v.label: v for v in variants}
    t = {v.label: v.seconds_per_run(steps, stat, clock) for v in variants}
    uncond, ours_t = t["unconditional"], t["ILVR, ours (fast path)"]
    plain_t = t["ILVR, plain loop (official style)"]
    diff = (by["ILVR, ours (fast path)"].output - by["ILVR, plain loop (official style)"].output).abs().max().item()
    result = {
        "setup": label, "model": model.name, "weights": weights_note, "parameters": count_parameters(model.unet),
        "image_size": model.image_size, "device": str(device), "batch": batch, "steps": steps, "repeats": repeats,
        "stat": stat, "clock": clock,
        "N": n_factor, "filter": kernel, "fast_dtype": dname(fast_dtype), "channels_last": channels_last,
        "compile": compile_mode or "default" if compile else False,
        "cuda_graphs": fast.cuda_graphs and device.type == "cuda",
        "cpu_backend": None if device.type != "cpu" else "onnxruntime" if fast.cpu_runtime is not None else "torch",
        "warmup_s": warmup_s, "memory": mem_method,
        "rows": rows, "ilvr_overhead": ours_t / uncond - 1, "ours_vs_plain": ours_t / plain_t,
        "max_abs_diff_ours_vs_plain": diff,
        "ilvr_work_ms_per_step": time_ilvr_work(model.image_size, batch, n_factor, kernel, device),
    }
    if full_steps:
        sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        sample(fast, reference, seeds=seeds, n_factor=n_factor, kernel=kernel, steps=full_steps)
        sync(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        result["full"] = {"steps": full_steps, "batch": batch, "variant": "ILVR, ours (fast path)", "wall_s": wall,
                          "cpu_s": cpu, "seconds": cpu if clock == "cpu" else wall}
        log(f"  real {full_steps}-step ILVR run at batch {batch}: {wall:.2f} s wall, {cpu:.2f} s CPU")
    try:
        result["load_average_1min_after"] = os.getloadavg()[0]
    except OSError:
        pass
    return result


# ----------------------------------------------------------------------------- report

def format_result(res: dict[str, Any]) -> str:
    b, steps = res["batch"], res["steps"]
    extras = ["channels_last" if res["channels_last"] else "", f"compile={res['compile']}" if res["compile"] else "",
              "CUDA graphs" if res.get("cuda_graphs") else "",
              "UNet on onnxruntime" if res.get("cpu_backend") == "onnxruntime" else ""]
    extras = ", ".join(e for e in extras if e)
    lines = [
        f"== {res['setup']}: {res['model']} ({res['weights']}, {res['parameters'] / 1e6:.1f} M params, "
        f"{res['image_size']} px) on {res['device']}, batch {b}, {steps} steps, N={res['N']} {res['filter']}, "
        f"{res['repeats']} timed runs each, {res['stat']}, {res['clock']} clock" + (f", {extras}" if extras else ""),
        f"{'variant':34s} {'dtype':5s} {'s/sample':>9s} {'steps/s':>8s} {'ms/step/img':>11s} "
        f"{'s/sample@' + str(FULL_STEPS) + '*':>14s} {'peak MiB':>9s} {'vs uncond':>9s} {'vs plain':>8s}",
    ]
    rows = {r["variant"]: r for r in res["rows"]}
    uncond = rows["unconditional"]["s_per_run"]
    plain = rows["ILVR, plain loop (official style)"]["s_per_run"]
    for r in res["rows"]:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"{r['variant']:34s} {r['dtype']:5s} {r['s_per_sample']:9.3f} {r['steps_per_s']:8.2f} "
                     f"{r['ms_per_step_per_sample']:11.1f} {r[f's_per_sample_{FULL_STEPS}_extrapolated']:14.2f} "
                     f"{peak:>9s} {r['s_per_run'] / uncond:9.3f} {r['s_per_run'] / plain:7.2f}x")
    work = res["ilvr_work_ms_per_step"]
    step_ms = 1000 * uncond / steps  # one unconditional step of the whole batch
    lines += [
        f"ILVR overhead over unconditional: {100 * res['ilvr_overhead']:+.1f}%   "
        f"ours vs plain loop: {res['ours_vs_plain']:.2f}x   max |ours - plain| = {res['max_abs_diff_ours_vs_plain']:.2e}",
        f"ILVR's own work per step (micro-benchmark, batch {b}): ours {work['ours']:.3f} ms "
        f"(= {100 * work['ours'] / step_ms:.2f}% of an unconditional step), plain {work['plain']:.3f} ms "
        f"(= {100 * work['plain'] / step_ms:.1f}%); phi_N part: ours {work['ours_phi']:.3f} ms once as matrices, "
        f"plain {work['plain_phi']:.3f} ms as resize-right down+up twice",
        f"steps/s = sampler steps per second for the whole batch; * = extrapolated from {steps} steps; "
        f"peak memory: {res['memory']}; warm-up {res['warmup_s']:.1f} s"
        + (f"; load average {res['load_average_1min_after']:.1f} after" if "load_average_1min_after" in res else ""),
    ]
    if "full" in res:
        f = res["full"]
        per = f"{f['seconds'] / f['batch']:.2f} s/sample, " if f["batch"] > 1 else ""
        lines.append(f"real {f['steps']}-step ILVR run (ours), batch {f['batch']}: {f['seconds']:.2f} s {res['clock']} "
                     f"({per}{f['steps'] / f['seconds']:.1f} steps/s; wall {f['wall_s']:.2f} s, CPU {f['cpu_s']:.2f} s)"
                     " -- measured, not extrapolated")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def timed_steps(requested: int | None, device: torch.device, batch: int) -> int:
    """Steps per timed run: `requested`, else a full run where a shorter one is too brief to time well."""
    if requested:
        return requested
    return FULL_STEPS if device.type == "cuda" and batch == 1 else TIMED_STEPS


def _batch_sizes(text: str) -> list[int]:
    """An argparse type: comma-separated batch sizes, each at least 1."""
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes of at least 1, got {text!r}")
    return sizes


def add_arguments(p) -> None:
    p.add_argument("--models", default="auto",
                   help="comma list of 'bundled' (the default bundled model or --model) and 'adm256' (the ILVR authors' FFHQ-P2 "
                        "architecture, random weights). auto: bundled, plus adm256 when CUDA is present")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"source of the 'bundled' setup (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto",
                   help="auto: bundled on CPU, adm256 on CUDA; or cpu / cuda / cuda:1 for every setup")
    p.add_argument("--steps", type=int, default=None,
                   help=f"timed steps per run (default {TIMED_STEPS}, figures extrapolated to {FULL_STEPS}; but "
                        f"{FULL_STEPS} at batch 1 on CUDA, where a {TIMED_STEPS}-step run of a compiled UNet lasts "
                        f"0.2 s and its ILVR overhead swung from 4%% to 11%% between runs)")
    p.add_argument("--full-steps", type=int, default=FULL_STEPS,
                   help=f"also time one real run of this many steps of our fast path at each batch size "
                        f"(0 = skip; default {FULL_STEPS})")
    p.add_argument("--batch", default=None, type=_batch_sizes,
                   help="comma list of batch sizes (default: 1 for bundled, 1,8 for adm256)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (default 3)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall (default) or cpu: this process's CPU time (time.process_time), which on a shared "
                        "machine leaves out the time other processes held the core; only meaningful with 1 thread "
                        "(with more it sums the threads) and on CPU")
    p.add_argument("--stat", default="auto", choices=["auto", *STATS],
                   help="how a run's time is taken from the repeats: step-median (the median single step of all "
                        "timed runs, times the steps: steady against bursts of other load), median or min of the "
                        "whole runs. auto (default): step-median on CPU, median on CUDA (steps are asynchronous there)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="compute dtype of our fast path (default fp16 on CUDA, fp32 on CPU); the plain loop is always fp32")
    p.add_argument("--N", dest="n_factor", type=int, default=None, help="low-pass factor (default: the translation preset for the size)")
    p.add_argument("--filter", default="cubic", help="resize-right kernel")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="fast path: UNet in channels_last memory format (default: on CPU, as load_model does)")
    p.add_argument("--compile", action="store_true", help="fast path: torch.compile the UNet (compile time reported as warm-up)")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode; reduce-overhead and max-autotune capture their own CUDA graphs "
                        "(ours is then off), max-autotune-no-cudagraphs autotunes kernels and keeps ours")
    p.add_argument("--cpu-backend", default=None, choices=["onnxruntime", "torch"],
                   help="CPU fast path in fp32: the UNet on onnxruntime (default, also for $ILVR_CPU_BACKEND=auto: "
                        "the bench times both) or on PyTorch ($ILVR_CPU_BACKEND); with onnxruntime a row 'ours on "
                        "PyTorch' is added. --compile always uses PyTorch")
    p.add_argument("--fp32-variant", action=argparse.BooleanOptionalAction, default=True,
                   help="when the fast path runs in fp16/bf16, also time it in fp32 (default on; "
                        "--no-fp32-variant saves a second torch.compile)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, replay our fast path's UNet call as a CUDA graph (default on, as the app and CLI do)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, i.e. OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON here")
    add_whole_run_arguments(p)


def run(args, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The ``bench`` command: run every setup, print the tables, return (and optionally save) the results."""
    if args.whole_runs:
        return run_whole_runs(args, log)
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.steps is not None and args.steps < 2) or args.repeats < 1:
        raise ValueError("--steps must be >= 2 and --repeats >= 1")
    cuda = torch.cuda.is_available()
    models = ["bundled", "adm256"] if args.models == "auto" and cuda else (
        ["bundled"] if args.models == "auto" else [m.strip() for m in args.models.split(",") if m.strip()])
    unknown = set(models) - {"bundled", "adm256"}
    if unknown:
        raise ValueError(f"unknown --models entries {sorted(unknown)}; use bundled and/or adm256")
    env = environment()
    log(format_environment(env))
    results = []
    for name in models:
        if args.device == "auto":
            device = torch.device("cuda" if name == "adm256" and cuda else "cpu")
        else:
            device = resolve_device(args.device)
        if name == "bundled":
            model, note = bundled_model(args.model, device)
            label, batches = ("bundled model" if args.model == DEFAULT_MODEL else f"model {model.name}"), [1]
        else:
            unet_cfg, diffusion = ffhq_p2_configs()
            model, note = random_model(unet_cfg, diffusion, device=device, name="adm256-ffhq-p2"), "random weights"
            label, batches = "256x256 ADM (FFHQ-P2 architecture)", [1, 8]
        if args.batch:
            batches = args.batch
        n_factor = args.n_factor or scaled_factor("translation", model.image_size)
        clock = args.clock
        if clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
            log("  --clock cpu needs a CPU device and 1 thread; using the wall clock for this setup")
            clock = "wall"
        stat = args.stat
        if stat == "auto" or (stat == "step-median" and device.type == "cuda"):
            stat = "median" if device.type == "cuda" else "step-median"
        for batch in batches:
            log(f"{label}, batch {batch} on {device} ...")
            res = bench_setup(model, label=label, weights_note=note, batch=batch,
                              steps=timed_steps(args.steps, device, batch), repeats=args.repeats,
                              n_factor=n_factor, kernel=args.filter, fast_dtype=resolve_dtype(args.dtype, device),
                              channels_last=device.type == "cpu" if args.channels_last is None else args.channels_last,
                              compile=args.compile, compile_mode=args.compile_mode,
                              seed=args.seed, full_steps=args.full_steps,
                              fp32_variant=args.fp32_variant, cuda_graphs=args.cuda_graphs, stat=stat, clock=clock,
                              cpu_backend=args.cpu_backend,
                              log=log)
            results.append(res)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    log("")
    for res in results:
        log(format_result(res))
        log("")
    if not cuda:
        log("no CUDA device here: the 256x256 ADM figures need a GPU (run `python -m ilvr bench` on one).")
    out = {"environment": env, "results": results}
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2))
        log(f"wrote {args.json_out}")
    return out
