"""Measuring for ``python -m ilvr bench``: the environment a result was taken in, wall or CPU clocks per
step, peak memory on CPU (the process RSS sampled in a thread) and on CUDA, and the micro-benchmark of
ILVR's own work per step.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed runs, minus what was allocated
before the run, plus the weights of the network that variant uses (so a second copy kept for another
variant is not counted). On CPU there is no allocator counter, so a separate short untimed pass (after
``malloc_trim`` so freed heap pages are returned) samples the process RSS from /proc/self/statm every 2 ms
and reports its growth over the start of the pass, plus the weights (``ru_maxrss`` only ever grows, so a
delta of it is 0 for every run after the biggest one; we do not use it where /proc is available).
"""
from __future__ import annotations

import gc
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .filters import LowPass, resize_right_lowpass
from .runtime.cpu_memory import keep_freed_heap, release_freed_heap
from .runtime.noise import draw, to_device

FULL_STEPS = 250  # the app's and CLI's default number of respaced steps
TIMED_STEPS = 50  # steps per timed run; per-step figures are extrapolated to FULL_STEPS


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class CpuPeakRss:
    """Peak RSS growth of this process while the block runs, sampled by a thread every `interval` s."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_bytes: int | None = None
        self.method = "RSS growth (/proc/self/statm, 2 ms samples, after malloc_trim)"

    def __enter__(self) -> "CpuPeakRss":
        gc.collect()
        release_freed_heap()
        self._start = rss_bytes()
        if self._start is None:  # no /proc: fall back on ru_maxrss (only meaningful for a new high)
            import resource

            self.method = "ru_maxrss delta (a high-water mark: 0 unless this run set a new peak)"
            self._ru_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return self
        self._max = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            rss = rss_bytes()
            if rss is not None and rss > self._max:
                self._max = rss
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self._start is None:
            import resource
            import sys

            unit = 1 if sys.platform == "darwin" else 1024
            self.peak_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._ru_start) * unit
            return
        self._stop.set()
        self._thread.join()
        rss = rss_bytes()
        self.peak_bytes = max(self._max, rss or 0) - self._start


STATS = ("step-median", "median", "min")


def stat_of(times: Sequence[float], stat: str) -> float:
    return min(times) if stat == "min" else statistics.median(times)


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass
class Variant:
    label: str
    run: Callable[[int, Callable[[], None] | None], torch.Tensor]  # (steps, on_step) -> samples
    weights_bytes: int
    dtype: str
    wall_s: list[float] = field(default_factory=list)  # wall-clock seconds per timed run
    cpu_s: list[float] = field(default_factory=list)  # CPU seconds of this process per timed run
    step_wall_s: list[float] = field(default_factory=list)  # every single step of every timed run
    step_cpu_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    output: torch.Tensor | None = None

    def seconds_per_run(self, steps: int, stat: str, clock: str) -> float:
        """One run of `steps` steps: a statistic of the timed runs, or the median step times `steps`
        (steady against bursts of other load, as every step does the same work)."""
        if stat == "step-median":
            return statistics.median(self.step_cpu_s if clock == "cpu" else self.step_wall_s) * steps
        return stat_of(self.cpu_s if clock == "cpu" else self.wall_s, stat)

    def row(self, batch: int, steps: int, stat: str = "median", clock: str = "wall") -> dict[str, Any]:
        t = self.seconds_per_run(steps, stat, clock)
        return {"variant": self.label, "dtype": self.dtype, "wall_s": [round(v, 4) for v in self.wall_s],
                "cpu_s": [round(v, 4) for v in self.cpu_s],
                "step_ms": {f"{clock}_{name}": 1000 * fn(steps_) for clock, steps_ in
                            (("wall", self.step_wall_s), ("cpu", self.step_cpu_s)) if steps_
                            for name, fn in (("median", statistics.median), ("min", min))},
                "s_per_run": t, "s_per_sample": t / batch, "steps_per_s": steps / t,
                "ms_per_step_per_sample": 1000 * t / steps / batch,
                f"s_per_sample_{FULL_STEPS}_extrapolated": t / batch * FULL_STEPS / steps,
                "peak_mib": None if self.peak_bytes is None else self.peak_bytes / 2 ** 20}


def time_ilvr_work(size: int, batch: int, n_factor: int, kernel: str, device: torch.device, iters: int = 20,
                    rounds: int = 5) -> dict[str, float]:
    """Milliseconds per step of ILVR's own work (everything a step adds to the unconditional one), best of
    `rounds` rounds of `iters`: a micro-benchmark, far steadier than the difference of two whole runs.

    ours:  draw eps, y_{t-1} = a y + b eps, x + phi(y_{t-1} - x)      (phi once, as two matmuls)
    plain: draw eps, y_noisy = a y + b eps, x - phi(x) + phi(y_noisy)  (resize-right down+up twice)
    The *_phi entries time the low-pass part alone.
    """

    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randn(batch, 3, size, size, device=device)
    gens = [torch.Generator().manual_seed(k) for k in range(batch)]
    lowpass = LowPass(size, size, n_factor, kernel, device=device)
    a, b = math.sqrt(0.5), math.sqrt(0.5)
    fns = {
        "ours": lambda: x + lowpass(a * y + b * to_device(draw(gens, x.shape[1:], pinned=device.type == "cuda"), device) - x),
        "plain": lambda: (x - resize_right_lowpass(x, n_factor, kernel)
                          + resize_right_lowpass(a * y + b * to_device(draw(gens, x.shape[1:], pinned=device.type == "cuda"), device), n_factor, kernel)),
        "ours_phi": lambda: x + lowpass(y - x),
        "plain_phi": lambda: x - resize_right_lowpass(x, n_factor, kernel) + resize_right_lowpass(y, n_factor, kernel),
    }
    out = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            fn()
            best = float("inf")
            for _ in range(rounds):
                sync(device)
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                sync(device)
                best = min(best, (time.perf_counter() - t0) / iters)
            out[name] = 1000 * best
    return out


def run_sequential(variants: list[Variant], steps: int, device: torch.device, first: int = 0) -> None:
    """One timed run of each variant after the other (rotated by `first`, to spread slow drifts)."""
    for v in variants[first:] + variants[:first]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        marks = []  # (wall, cpu) at the start and after every step; only meaningful where the work is
        # synchronous, i.e. not on CUDA
        mark = (lambda: marks.append((time.perf_counter(), time.process_time()))) if device.type != "cuda" else None
        sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        marks.append((t0, c0))
        v.output = v.run(steps, mark)
        sync(device)
        v.wall_s.append(time.perf_counter() - t0)
        v.cpu_s.append(time.process_time() - c0)
        v.step_wall_s += [b[0] - a[0] for a, b in zip(marks, marks[1:])]
        v.step_cpu_s += [b[1] - a[1] for a, b in zip(marks, marks[1:])]
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - before + v.weights_bytes
            v.peak_bytes = max(v.peak_bytes or 0, peak)


def environment() -> dict[str, Any]:
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
           # applied here as load_model would (the plain loop runs in this process too, so it shares the setting)
           "glibc_heap_kept": keep_freed_heap()}
    try:
        env["load_average_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    try:
        import onnxruntime
        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return env


def format_environment(env: dict[str, Any]) -> str:
    s = (f"ILVR Studio speed benchmark -- torch {env['torch']}, {env['threads']} CPU thread(s) "
         f"(OMP_NUM_THREADS={env['OMP_NUM_THREADS']}), {env['cpu_count']} CPU(s)")
    s += ", freed heap kept (ilvr.runtime.cpu_memory)" if env.get("glibc_heap_kept") else ", allocator defaults"
    if "load_average_1min" in env:
        s += f", load average {env['load_average_1min']:.1f} at start"
    if "onnxruntime" in env:
        s += f", onnxruntime {env['onnxruntime']}"
    if "cuda_device" in env:
        s += f", GPU: {env['cuda_device']}"
    return s


def synthetic_reference(size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """A smooth deterministic image in [-1, 1] (timings do not depend on the content)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
