"""Whole-process benchmark (``python -m ilvr bench --whole-runs``): the time a user waits, start to exit.

Every timed run is a fresh child process: Python starts, imports, loads the model, samples one batch
of ILVR samples and saves them as PNGs to a temporary folder. Variants:

  ours          ``python -m ilvr sample``, as users run it (the CPU backend measured per batch size)
  ours-torch    the same with ``ILVR_CPU_BACKEND=torch``
  ours-bf16     the same with ``--dtype bf16`` (opt-in, other numbers than fp32's): where the CPU has native bf16
  official      jychoi118/ilvr_adm's ``scripts/ilvr_sample.py``, given ``--official CHECKOUT``
                (``ilvr.official_sampler``); the yardstick when given
  plain         ``python -m ilvr.plain_run``: the plain loop (``ilvr.algorithm1``); the yardstick otherwise

Models: ``bundled`` (the default bundled model or ``--model``, 250 steps) and ``adm64``: a raw
guided-diffusion ``.pt`` written here with random weights in ADM's key layout (64 px, 64 channels,
one res block, attention at 16 px, learned sigma: 17.1 M parameters; 50 steps). Batch sizes 1, 4, 8.

Per model and batch size, one untimed run of each variant comes first: it fills the ONNX cache and the
backend verdict (both in a fresh folder, so this first run is what a new user pays) and the page cache;
it is reported as "first". Then ``--repeats`` rounds of one run per variant, the order rotated every
round (ABC, BCA, CAB) so that slow drifts of the machine spread over all variants. Reported per variant:
min, median and max wall seconds, the median CPU seconds (user + system, the child and the processes it
waited for), the largest peak resident set (``ru_maxrss`` from ``os.wait4``: the child or any process it
waited for; children are started by ``ilvr/process_launcher.py``, whose docstring says why) and the
ratio of medians to the yardstick, and the UNet work the run did per second of it (GFLOP/s: the UNet's
multiply-adds per image, counted by ``torch.utils.flop_counter``, times images and steps, over the median
wall time) beside this machine's fp32 matrix-product rate, so a row near the CPU's limit shows as one.
``--check-plain`` times the plain loop against the
official sampler alone: the plain loop stands in for it only while their whole runs agree closely.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .device import cpu_has_native_bf16
from .images import tensor_to_pil
from .loading import load_model
from .network import UNet, UNetConfig
from .official_sampler import check_checkout, official_command, official_environment, official_flags, saving_notes
from .registry import scaled_factor
from .runtime.cpu_choice import cpu_identity
from .timing import synthetic_reference
from .timing import environment, format_environment

ADM64 = dict(image_size=64, out_channels=6, model_channels=64, channel_mult=(1, 2, 3, 4), num_res_blocks=1,
             attention_levels=(2,), num_head_channels=64, resblock_updown=True, use_scale_shift_norm=True)
MODEL_STEPS = {"bundled": "250", "adm64": "50"}
DEFAULT_BATCHES = [1, 4, 8]
CHILD_TIMEOUT_S = 3600


@dataclass
class Child:
    """One finished child process."""

    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    returncode: int

    def to_dict(self) -> dict[str, float]:
        return {"wall_s": round(self.wall_s, 3), "cpu_s": round(self.cpu_s, 3),
                "peak_rss_mib": round(self.peak_rss_mib, 1)}


class Launcher:
    """Runs child processes through ``ilvr/process_launcher.py`` (see there why) and returns each one's
    wall time from start to exit and its ``os.wait4`` resource usage. Use as a context manager."""

    def __enter__(self) -> "Launcher":
        script = Path(__file__).with_name("process_launcher.py")
        self.proc = subprocess.Popen([sys.executable, "-I", str(script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        return self

    def run(self, command: list[str], env: dict[str, str], log: Path, timeout_s: float = CHILD_TIMEOUT_S) -> Child:
        job = {"command": command, "env": env, "log": str(log), "timeout_s": timeout_s}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError("the process launcher (ilvr/process_launcher.py) ended unexpectedly")
        done = json.loads(answer)
        return Child(done["wall_s"], done["cpu_s"], done["maxrss_kib"] / 1024, done["returncode"])

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        self.proc.wait()


@dataclass
class Variant:
    name: str
    command: Callable[[Path], list[str]]  # output folder -> command line
    env: dict[str, str]
    first: Child | None = None
    runs: list[Child] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        walls = [c.wall_s for c in self.runs]
        return {"first": self.first.to_dict() if self.first else None, "runs": [c.to_dict() for c in self.runs],
                "wall_s": {"min": min(walls), "median": statistics.median(walls), "max": max(walls)},
                "cpu_s_median": statistics.median(c.cpu_s for c in self.runs),
                "peak_rss_mib_max": max(c.peak_rss_mib for c in self.runs), "command": self.command(Path("OUT"))}


@dataclass
class Setup:
    """One model at one batch size, with what each variant needs to load it."""

    model: str  # bundled or adm64
    source: str  # what ours and the plain loop load
    label: str  # the source, as the report names it
    weights_pt: Path | None  # a guided-diffusion .pt for the official sampler
    parameters: int
    image_size: int
    steps: str
    batch: int
    n_factor: int
    unet_gflop: float | None = None  # one UNet call on one image
    notes: list[str] = field(default_factory=list)

    def unet_work_gflop(self) -> float | None:
        """The UNet's work in one run: per image and call, times images and steps (None: steps not a count)."""
        return self.unet_gflop * self.batch * int(self.steps) if self.unet_gflop and self.steps.isdigit() else None


def write_adm64(path: Path, seed: int = 0) -> None:
    """A raw guided-diffusion checkpoint (an ADM UNetModel's state dict) with seeded random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet(UNetConfig(**ADM64))
    torch.save(unet.state_dict(), path)


def unet_gflop_per_image(unet: UNet) -> float:
    """GFLOP of one UNet call on one image (convolutions, matrix products and attention; 2 per multiply-add)."""
    size, channels = unet.config.image_size, unet.config.in_channels
    # the counter has no formula for the CPU's fused attention kernel: the math kernel's products it counts
    with torch.inference_mode(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        unet(torch.zeros(1, channels, size, size), torch.tensor([500]))
    return counter.get_total_flops() / 1e9


def matmul_gflops(threads: int, n: int = 2048, calls: int = 5) -> float:
    """This machine's fp32 matrix-product rate on `threads` threads (best of `calls`): the ceiling to compare with."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = float("inf")
        for _ in range(calls):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return 2 * n ** 3 / best / 1e9


def prepare_model(name: str, bundled: str, work: Path, checkout: Path | None) -> tuple[dict[str, Any], list[str]]:
    """Write what `name` needs into `work`; returns (fields of its Setup, official flags or [])."""
    if name == "adm64":
        source = work / "adm64.pt"
        write_adm64(source)
    else:
        source = bundled
    model = load_model(source, device="cpu", dtype=torch.float32, channels_last=False, cpu_backend="torch")
    label = "a raw guided-diffusion .pt, random weights" if name == "adm64" else str(source)
    fields = {"model": name, "source": str(source), "label": label, "weights_pt": None, "image_size": model.image_size,
              "parameters": sum(p.numel() for p in model.unet.parameters()),
              "unet_gflop": unet_gflop_per_image(model.unet), "notes": []}
    flags: list[str] = []
    if checkout is not None:
        try:
            flags, fields["notes"] = official_flags(model.unet.config, model.diffusion)
        except ValueError as e:
            fields["notes"] = [f"{e}; the plain loop is the yardstick instead"]
        else:
            fields["notes"] += saving_notes(checkout)
            fields["weights_pt"] = source if name == "adm64" else work / f"{name}.pt"
            if name != "adm64":
                weights = {k: v.float().contiguous() for k, v in model.unet.state_dict().items()}
                torch.save(weights, fields["weights_pt"])
    return fields, flags


def write_references(work: Path, size: int, count: int) -> tuple[Path, Path]:
    """One smooth synthetic reference for ours and the plain loop, and a folder with `count` copies of
    it for the official sampler (one reference per sample)."""

    image = tensor_to_pil(synthetic_reference(size))
    single = work / f"reference{size}.png"
    image.save(single)
    folder = work / f"references{size}"
    folder.mkdir(exist_ok=True)
    for k in range(count):
        image.save(folder / f"{k:05d}.png")
    return single, folder


def variants_for(setup: Setup, flags: list[str], checkout: Path | None, check_plain: bool, reference: Path,
                 references: Path, base_env: dict[str, str], bf16: bool = False) -> list[Variant]:
    """The variants timed for `setup`, the yardstick last; `bf16` adds ours with ``--dtype bf16``."""
    common = ["--model", setup.source, "--ref", str(reference), "--N", str(setup.n_factor), "--steps", setup.steps]

    def ours(out: Path) -> list[str]:
        return [sys.executable, "-m", "ilvr", "sample", *common, "--num", str(setup.batch),
                "--batch-size", str(setup.batch), "--seed", "0", "--device", "cpu", "--out", str(out)]

    def ours_bf16(out: Path) -> list[str]:
        return [*ours(out), "--dtype", "bf16"]

    def plain_loop(out: Path) -> list[str]:
        return [sys.executable, "-m", "ilvr.plain_run", *common, "--batch", str(setup.batch), "--out", str(out)]

    def official_sampler(out: Path) -> list[str]:
        return official_command(checkout, flags, weights=setup.weights_pt, references=references,
                                n_factor=setup.n_factor, steps=setup.steps, batch=setup.batch, out=out)

    # the plain loop stands in for the official code, which leaves glibc's heap settings alone
    plain = Variant("plain", plain_loop, {**base_env, "ILVR_KEEP_FREED_HEAP": "0"})
    official = None
    if checkout is not None and setup.weights_pt is not None:
        official = Variant("official", official_sampler, official_environment(checkout, base_env))
    if check_plain:
        if official is None:
            raise ValueError(f"--check-plain: the official sampler cannot run {setup.model} ({'; '.join(setup.notes)})")
        return [plain, official]
    extra = [Variant("ours-bf16", ours_bf16, base_env)] if bf16 else []
    return [Variant("ours", ours, base_env), Variant("ours-torch", ours, {**base_env, "ILVR_CPU_BACKEND": "torch"}),
            *extra, official or plain]


def one_run(launcher: Launcher, variant: Variant, setup: Setup, work: Path, index: int) -> Child:
    out = work / f"out-{variant.name}-{index}"
    log = work / f"{variant.name}-{setup.model}-b{setup.batch}-{index}.log"
    child = launcher.run(variant.command(out), variant.env, log)
    pngs = list(out.rglob("*.png")) if out.is_dir() else []
    if child.returncode != 0 or len(pngs) != setup.batch:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{variant.name} ({setup.model}, batch {setup.batch}) exited {child.returncode} with "
                           f"{len(pngs)} of {setup.batch} PNGs; its output ends:\n{tail}")
    shutil.rmtree(out)
    log.unlink()
    return child


def time_setup(launcher: Launcher, setup: Setup, variants: list[Variant], repeats: int, work: Path,
               log: Callable[[str], None]) -> dict[str, Any]:
    for v in variants:
        v.first = one_run(launcher, v, setup, work, 0)
        log(f"  first run of {v.name}: {v.first.wall_s:.2f} s")
    for r in range(repeats):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            v.runs.append(one_run(launcher, v, setup, work, r + 1))
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{v.name} {v.runs[-1].wall_s:.2f} s" for v in variants))
    yardstick = variants[-1]
    base = statistics.median(c.wall_s for c in yardstick.runs)
    work = setup.unet_work_gflop()
    summaries = {}
    for v in variants:
        median = statistics.median(c.wall_s for c in v.runs)
        summaries[v.name] = {**v.summary(), "vs_yardstick": median / base,
                             "unet_gflops_per_s": work / median if work else None}
    return {"model": setup.model, "source": setup.label, "parameters": setup.parameters,
            "image_size": setup.image_size, "steps": setup.steps, "batch": setup.batch, "N": setup.n_factor,
            "unet_gflop_per_image": setup.unet_gflop, "unet_work_gflop": work,
            "repeats": repeats, "yardstick": yardstick.name, "notes": setup.notes, "variants": summaries}


def format_setup(res: dict[str, Any], matmul_rate: float | None = None) -> str:
    work = res.get("unet_work_gflop")
    lines = [f"== {res['model']} ({res['source']}, {res['parameters'] / 1e6:.1f} M parameters, "
             f"{res['image_size']} px), {res['steps']} steps, batch {res['batch']}, N={res['N']}: "
             f"{res['repeats']} timed whole runs each"
             + (f"; UNet work {work:.0f} GFLOP per run" if work else ""),
             f"{'variant':12s} {'first s':>8s} {'min s':>8s} {'median s':>9s} {'max s':>8s} {'CPU s':>8s} "
             f"{'peak MiB':>9s} {'vs ' + res['yardstick']:>12s} {'GFLOP/s':>8s}"]
    for name, v in res["variants"].items():
        wall = v["wall_s"]
        first = f"{v['first']['wall_s']:.2f}" if v["first"] else "n/a"
        rate = f"{v['unet_gflops_per_s']:.0f}" if v.get("unet_gflops_per_s") else "n/a"
        lines.append(f"{name:12s} {first:>8s} {wall['min']:8.2f} {wall['median']:9.2f} {wall['max']:8.2f} "
                     f"{v['cpu_s_median']:8.2f} {v['peak_rss_mib_max']:9.0f} {v['vs_yardstick']:11.2f}x {rate:>8s}")
    if work and matmul_rate:
        lines.append(f"GFLOP/s: the UNet's work over the median whole run (start-up included); this machine's fp32 "
                     f"matrix product runs at {matmul_rate:.0f}")
    lines += [f"note: {n}" for n in res["notes"]]
    return "\n".join(lines)


def commit_label() -> str | None:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def command_line(args, models: list[str], batches: list[int]) -> str:
    """The bench command that makes these results, spelled out."""
    parts = ["python -m ilvr bench --whole-runs", f"--models {','.join(models)}",
             f"--batch {','.join(map(str, batches))}", f"--repeats {args.repeats}"]
    for flag, value in (("--steps", args.steps), ("--N", args.n_factor), ("--threads", args.threads),
                        ("--official", args.official)):
        if value:
            parts.append(f"{flag} {value}")
    parts += ["--check-plain"] if args.check_plain else []
    parts += ["--no-bf16"] if getattr(args, "no_bf16", False) else []
    return " ".join(parts)


def add_arguments(p) -> None:
    p.add_argument("--whole-runs", action="store_true",
                   help="time whole processes instead (start, load, sample one batch, save): ours, ours with "
                        "ILVR_CPU_BACKEND=torch, and the official sampler (--official) or the plain loop; --models "
                        "bundled,adm64 (default both), --batch (default 1,4,8), --repeats runs each, --steps "
                        "overrides 250 (bundled) and 50 (adm64)")
    p.add_argument("--official", type=Path, default=None, metavar="CHECKOUT",
                   help="with --whole-runs: a checkout of github.com/jychoi118/ilvr_adm (commit 9b84f26), timed as "
                        "the yardstick (needs blobfile and pillow; mpi4py is stood in for, and so is torchvision's "
                        "save_image where torchvision is not installed)")
    p.add_argument("--no-bf16", action="store_true",
                   help="with --whole-runs: leave out the ours-bf16 row (timed only where the CPU has native bf16)")
    p.add_argument("--check-plain", action="store_true",
                   help="with --whole-runs --official: time only the plain loop against the official sampler")


def run(args, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The ``bench --whole-runs`` command: time every setup, print the tables, return (and save) the results."""
    models = ["bundled", "adm64"] if args.models == "auto" else [m.strip() for m in args.models.split(",") if m.strip()]
    if set(models) - set(MODEL_STEPS):
        raise ValueError(f"--whole-runs takes --models bundled and/or adm64, got {args.models!r}")
    if args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    if args.check_plain and args.official is None:
        raise ValueError("--check-plain compares the plain loop with the official sampler: give --official CHECKOUT")
    checkout = args.official.expanduser().resolve() if args.official else None
    if checkout is not None:
        check_checkout(checkout)
    batches = args.batch or DEFAULT_BATCHES
    env = environment()
    log(format_environment(env) + " -- whole runs")
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or torch.get_num_threads()
    matmul_rate = matmul_gflops(threads)
    native_bf16 = cpu_has_native_bf16() and not args.no_bf16
    log(f"fp32 matrix product (2048 x 2048, {threads} thread(s)): {matmul_rate:.0f} GFLOP/s")
    results = []
    with tempfile.TemporaryDirectory(prefix="ilvr-whole-runs-") as tmp, Launcher() as launcher:
        work = Path(tmp)
        base_env = {k: v for k, v in os.environ.items() if k != "ILVR_CPU_BACKEND"}
        if args.threads:
            base_env["OMP_NUM_THREADS"] = str(args.threads)
        for name in models:
            fields, flags = prepare_model(name, args.model, work, checkout)
            reference, references = write_references(work, fields["image_size"], max(batches))
            for batch in batches:
                setup = Setup(**fields, steps=str(args.steps) if args.steps else MODEL_STEPS[name], batch=batch,
                              n_factor=args.n_factor or scaled_factor("translation", fields["image_size"]))
                # a fresh runtime cache per setup: its first run of ours pays the export and the measurement
                env_of_setup = {**base_env, "ILVR_ONNX_CACHE": str(work / f"cache-{name}-b{batch}" / "onnx")}
                variants = variants_for(setup, flags, checkout, args.check_plain, reference, references, env_of_setup,
                                        bf16=native_bf16)
                log(f"{name}, batch {batch}: " + ", ".join(v.name for v in variants) + " ...")
                results.append(time_setup(launcher, setup, variants, args.repeats, work, log))
    log("")
    for res in results:
        log(format_setup(res, matmul_rate) + "\n")
    out = {"kind": "whole runs", "machine": cpu_identity(), "device": f"CPU, {env['threads']} threads",
           "torch": env["torch"], "onnxruntime": env.get("onnxruntime"), "commit": commit_label(),
           "command": command_line(args, models, batches),
           "official": str(checkout) if checkout else None, "environment": env,
           "matmul_fp32_gflops": matmul_rate, "matmul_threads": threads, "results": results}
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2))
        log(f"wrote {args.json_out}")
    return out
