"""Which models the app may load, and the cache that keeps them loaded between runs."""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping

import torch

from ilvr.device import default_dtype, resolve_device
from ilvr.loading import LOADABLE_WEIGHT_SUFFIXES, ModelLoadError, load_model
from ilvr.model import DiffusionModel
from ilvr.registry import BUNDLED, BY_NAME, DEFAULT_MODEL

MODEL_PATHS_ENV = "ILVR_ALLOW_MODEL_PATHS"


def model_paths_allowed(env: Mapping[str, str] = os.environ) -> bool:
    """Whether visitors may load any local path or hub repo (``ILVR_ALLOW_MODEL_PATHS=1``/``0``).

    Unset: yes locally, no on Hugging Face Spaces (``SYSTEM=spaces``), where a typed path lets any
    visitor probe the server's files and a repo id makes it download anything.
    """
    value = env.get(MODEL_PATHS_ENV, "").strip().lower()
    if value:
        return value in ("1", "true", "yes", "on")  # anything else (a typo too) keeps the box closed
    return env.get("SYSTEM") != "spaces"


def model_source(choice: str | None, local_path: str | None, allow_paths: bool = True) -> str:
    """The source to load: the local path when one is typed, else the picked registry name.

    With ``allow_paths=False`` only the registry's models load, and the refusal says nothing about
    whether the typed path exists.
    """
    path = (local_path or "").strip().strip('"').strip("'")
    source = path or (choice or DEFAULT_MODEL).strip()
    if not allow_paths and (path or source not in BY_NAME):
        raise ModelLoadError(f"this server only loads the models in the list ({MODEL_PATHS_ENV} is off)")
    return source


def weights_stamp(source: str) -> int | None:
    """mtime of a local model's files, so a re-exported checkpoint is reloaded; None for hub models."""
    path = BUNDLED[source].path if source in BUNDLED else Path(source).expanduser()
    try:
        if path.is_file():
            return path.stat().st_mtime_ns
        if path.is_dir():
            files = (".json", *LOADABLE_WEIGHT_SUFFIXES)
            return max((p.stat().st_mtime_ns for p in path.iterdir()
                        if p.suffix in files and not p.name.endswith(".ckpt.pt")), default=0)
    except OSError:
        return None
    return None


def device_label(model: DiffusionModel) -> str:
    """For example 'CPU, float32, onnxruntime' or 'CUDA (NVIDIA H100 80GB HBM3), float16'."""
    dtype = str(model.dtype).replace("torch.", "")
    if model.device.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(model.device)}), {dtype}"
    runtime = ", onnxruntime" if model.cpu_runtime is not None else ""
    return f"{model.device.type.upper()}, {dtype}{runtime}"


class ModelCache:
    """Loaded models by source, most recently used last, at most ``max_models`` of them.

    Each source has its own lock, so loading (or downloading) one model never blocks users of
    another one that is already loaded. Local models are reloaded when their files change.
    Models load on ``ilvr.device.resolve_device(device)`` in that device's default dtype.
    It also keeps a running estimate of seconds per image-step for each model, for ETAs.
    """

    def __init__(self, max_models: int = 2, device: str = "auto",
                 loader: Callable[..., DiffusionModel] = load_model, retry_after_s: float = 30.0):
        self.max_models = max_models
        self.retry_after_s = retry_after_s  # a failed load is answered from memory for this long
        self.device = device
        self.loader = loader
        self._models: OrderedDict[str, tuple[int | None, DiffusionModel]] = OrderedDict()
        self._source_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._speed: dict[int, float] = {}  # id(model) -> seconds per image-step
        self._failures: dict[str, tuple[float, ModelLoadError]] = {}  # source -> (when, error)

    def cached(self, source: str) -> DiffusionModel | None:
        """The loaded model for source if it is cached and still current, else None."""
        with self._lock:
            entry = self._models.get(source)
        if entry is None or entry[0] != weights_stamp(source):
            return None
        return entry[1]

    def get(self, source: str) -> DiffusionModel:
        """Load (or reuse) the model for source; raises ModelLoadError with a user-facing message."""
        source = source.strip()
        if not source:
            raise ModelLoadError("pick a model or type the path of a local checkpoint")
        with self._lock:
            lock = self._source_locks.setdefault(source, threading.Lock())
        with lock:
            model = self.cached(source)
            if model is not None:
                with self._lock:
                    self._models.move_to_end(source)
                return model
            return self._load(source)

    def _load(self, source: str) -> DiffusionModel:
        """Load source (its lock held), remember a failure for a while, and cache the model."""
        stamp = weights_stamp(source)
        failed = self._failures.get(source)
        if failed and time.monotonic() - failed[0] < self.retry_after_s and stamp is None:
            raise failed[1]  # e.g. offline: do not wait for the hub's retries again
        device = resolve_device(self.device)
        try:
            model = self.loader(source, device=device, dtype=default_dtype(device))
        except ModelLoadError as e:
            self._failures[source] = (time.monotonic(), e)
            raise
        except (OSError, ValueError, RuntimeError, KeyError) as e:  # never let a bad file crash the app
            raise ModelLoadError(f"could not load {source!r}: {type(e).__name__}: {e}") from e
        self._failures.pop(source, None)
        if source in BY_NAME:
            model.name = source
        with self._lock:
            self._models.pop(source, None)
            self._models[source] = (stamp, model)
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        return model

    def seconds_per_image_step(self, model: DiffusionModel) -> float:
        """Measured on earlier runs, else timed now with one small forward pass."""
        if id(model) not in self._speed:
            x = torch.zeros(1, model.config.in_channels, model.image_size, model.image_size, device=model.device)
            t = torch.zeros(1, dtype=torch.long, device=model.device)
            with torch.inference_mode():
                model.predict(x, t)  # warm-up
                start = time.perf_counter()
                model.predict(x, t)
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                elif model.device.type == "mps":
                    torch.mps.synchronize()
            self._speed[id(model)] = time.perf_counter() - start
        return self._speed[id(model)]

    def record_speed(self, model: DiffusionModel, seconds: float, image_steps: int) -> None:
        """Fold a finished run into the estimate (exponential moving average)."""
        if image_steps <= 0 or seconds <= 0:
            return
        measured = seconds / image_steps
        old = self._speed.get(id(model))
        self._speed[id(model)] = measured if old is None else 0.5 * old + 0.5 * measured
