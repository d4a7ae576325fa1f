"""Which CPU backend runs the UNet, chosen by timing both at the run's batch size on this machine.

Why: onnxruntime is not faster everywhere. On the bundled 64 px model an ILVR step took 1.4-1.8x
less time than on PyTorch at batch 1, but on a 17 M parameter 64 px ADM at batch 4 whole runs on
PyTorch took 0.84x the time of onnxruntime's, and its lead shrinks as the batch grows. It also holds
a second copy of the weights and costs an export. A fixed default is wrong somewhere.

Rule: the first run at a batch size (per architecture, thread count, CPU and library versions)
times UNet calls of both backends on random inputs, in turns by block after warm-up calls, and keeps
onnxruntime only when its best call took at most (1 - MARGIN) of PyTorch's best: it never picks a
backend slower than PyTorch by its own measurement, and a near tie goes to PyTorch (one copy of the
weights, no export). The verdict and its timings are written beside the ONNX cache
(``cpu-backend/``, see ``ilvr.runtime.onnx_cache``), so later processes use it without measuring;
delete that folder to measure again. The architecture, not the weights, is the key: speed depends on
the shapes, not on the values. ``ILVR_CPU_BACKEND=onnxruntime`` or ``torch`` skips all this.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import threading
import time
from pathlib import Path
import torch

from ..network import UNet
from .onnx_cache import read_json, runtime_cache_dir, versions, write_json_atomically
from .onnx_cpu import OnnxUNet, cpu_backend, is_channels_last, onnx_unet_or_warn

MARGIN = 0.05  # onnxruntime must be at least this much faster to be used
TIMED_CALLS = 3  # per backend, after WARMUP_CALLS each
WARMUP_CALLS = 2  # per backend: the first calls at a new batch size set up kernels and memory

Timings = dict[str, float]  # backend -> seconds of its best UNet call


def pick_backend(seconds: Timings, margin: float = MARGIN) -> str:
    """onnxruntime only when it measured at least `margin` faster than PyTorch; otherwise torch."""
    return "onnxruntime" if seconds["onnxruntime"] <= (1 - margin) * seconds["torch"] else "torch"


def time_unet_calls(unet: UNet, onnx: OnnxUNet, batch: int, calls: int = TIMED_CALLS, rounds: int = 2) -> Timings:
    """Best wall time of a UNet call per backend at `batch`: WARMUP_CALLS each first (first calls at a new
    shape set up kernels and memory), then `rounds` blocks of `calls` calls per backend, the backends
    taking turns by block, not by call: onnxruntime's threads keep spinning for a while after a call and
    would slow a PyTorch call made right after it."""
    config = unet.config
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size, generator=generator)
    t = torch.full((batch,), 500, dtype=torch.long)
    runners = {"onnxruntime": lambda: onnx(x, t), "torch": lambda: unet(x, t)}
    best = {name: float("inf") for name in runners}
    with torch.inference_mode():
        for run in runners.values():
            for _ in range(WARMUP_CALLS):
                run()
        for _ in range(rounds):
            for name, run in runners.items():
                for _ in range(calls):
                    start = time.perf_counter()
                    run()
                    best[name] = min(best[name], time.perf_counter() - start)
    return best


def cpu_identity() -> str:
    """The CPU's model name and count: a verdict measured on one machine is not used on another that
    shares the cache folder."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} x{os.cpu_count()}"


def choice_key(unet: UNet, batch: int, threads: int) -> dict:
    return {"unet": unet.config.to_dict(), "channels_last": is_channels_last(unet), "batch": batch,
            "threads": threads, "cpu": cpu_identity(), "versions": versions(), "margin": MARGIN}


def choice_path(key: dict) -> Path | None:
    folder = runtime_cache_dir()
    if folder is None:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return folder.parent / "cpu-backend" / f"{digest}.json"


class MeasuredBackend:
    """Stands where an OnnxUNet would (``DiffusionModel.cpu_runtime``): ``uses_onnxruntime(batch)``
    decides a run's backend (measuring at most once per batch size and thread count), and
    ``runtime(x, t)`` runs the UNet on the backend chosen for x's batch size. The onnxruntime session
    is made only when a decision needs it."""

    backend = "auto"
    label = "onnxruntime or PyTorch, measured per batch size"

    def __init__(self, unet: UNet, cache: bool = True):
        self.unet = unet
        self.cache = cache  # keep the export on disk (weights from files)
        self.onnx: OnnxUNet | None = None
        self.onnx_failed = False  # the export or session failed once (with a warning): PyTorch from then on
        self.decisions: dict[tuple[int, int], str] = {}  # (batch, threads) -> backend
        self.current: dict[int, str] = {}  # batch -> backend of the latest decision, used by __call__
        self._lock = threading.Lock()  # concurrent runs (the app) measure and export once

    def is_stale(self, unet: UNet) -> bool:
        return self.onnx is not None and self.onnx.is_stale(unet)

    def uses_onnxruntime(self, batch: int) -> bool:
        return self.choose(batch) == "onnxruntime"

    def choose(self, batch: int) -> str:
        """The backend for runs of `batch` samples at this thread's current PyTorch thread count."""
        threads = torch.get_num_threads()
        with self._lock:
            if (batch, threads) not in self.decisions:
                self.decisions[batch, threads] = self._decide(batch, threads)
            self.current[batch] = self.decisions[batch, threads]
            return self.current[batch]

    def _decide(self, batch: int, threads: int) -> str:
        key = choice_key(self.unet, batch, threads)
        path = choice_path(key)
        known = read_json(path) if path is not None else None
        if known is not None and known.get("key") == key and known.get("backend") in ("onnxruntime", "torch"):
            if known["backend"] == "torch" or self._session() is not None:
                return known["backend"]
            return "torch"
        if self._session() is None:
            return "torch"
        seconds = time_unet_calls(self.unet, self.onnx, batch)
        backend = pick_backend(seconds)
        if path is not None:
            try:
                write_json_atomically(path, {"key": key, "backend": backend, "seconds_per_call": seconds})
            except OSError:
                pass  # an unwritable cache only means measuring again in the next process
        return backend

    def _session(self) -> OnnxUNet | None:
        if self.onnx is None and not self.onnx_failed:
            self.onnx = onnx_unet_or_warn(self.unet, self.cache)
            self.onnx_failed = self.onnx is None
        return self.onnx

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        backend = self.current.get(batch) or self.choose(batch)
        if backend == "onnxruntime" and self.onnx is not None:
            return self.onnx(x, t)
        return self.unet(x, t).float()


def cpu_runtime_for(unet: UNet, device: torch.device | str, dtype: torch.dtype, backend: str | None = None,
                    cache: bool = True):
    """What a model runs its UNet through on CPU in float32: an OnnxUNet where onnxruntime is forced
    (`backend`, else as ``cpu_backend`` chooses), a ``cpu_choice.MeasuredBackend`` for auto (it
    exports only for batch sizes where onnxruntime may win), None for PyTorch, for other devices and
    dtypes, or (with a warning) where onnxruntime cannot run the UNet. `cache`: keep the export on disk
    (for weights loaded from files; not for weights that change, such as a model being trained)."""
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return None
    choice = cpu_backend(backend)
    if choice == "torch" or unet.config.num_classes is not None:  # the sampler refuses class-conditional
        return None  # models with its own message
    if choice == "auto":
        if importlib.util.find_spec("onnxruntime") is None:
            return None
        return MeasuredBackend(unet, cache=cache)
    return onnx_unet_or_warn(unet, cache)
