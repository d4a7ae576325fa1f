"""Which models the app may load, what it checks before loading one, and the cache that keeps them
loaded between runs."""
from __future__ import annotations

import json
import math
import re
import struct
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ilvr.device import default_dtype, resolve_device
from ilvr.loading import LOADABLE_WEIGHT_SUFFIXES, ModelLoadError, infer_adm_config, load_model, unwrap_state_dict
from ilvr.model import DiffusionModel
from ilvr.network import count_parameters
from ilvr.registry import BUNDLED, BY_NAME, DEFAULT_MODEL

from .public import (MAX_IMAGE_SIZE_ENV, MAX_PARAMETERS_ENV, MODEL_PATHS_ENV, ModelLimits, model_paths_allowed,
                     upload_folders)

__all__ = ["MODEL_PATHS_ENV", "Inspection", "ModelCache", "check_limits", "device_label", "inspect_checkpoint",
           "model_paths_allowed", "model_source", "shown_error", "source_key", "weights_stamp"]

CONFIG_BYTES = 1 << 20  # config.json and scheduler_config.json: a real one is a few kB
HEADER_BYTES = 16 << 20  # a safetensors header: about 100 bytes per tensor (the format allows 100 MB)


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


def source_key(source: str) -> str:
    """One name per model: registry names as they are, an existing local path resolved (every spelling
    of a file, symlinks included, is one key), anything else (a Hub id, a missing path) as typed."""
    source = source.strip()
    if source in BY_NAME or source in BUNDLED:
        return source
    path = Path(source).expanduser()
    try:
        return str(path.resolve()) if path.exists() else source
    except (OSError, RuntimeError):  # a symlink loop, a name too long
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
    """For example 'CPU, float32, onnxruntime or PyTorch, measured per batch size' or 'CUDA (NVIDIA H100
    80GB HBM3), float16'."""
    dtype = str(model.dtype).replace("torch.", "")
    if model.device.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(model.device)}), {dtype}"
    runtime = f", {model.cpu_runtime.label}" if model.cpu_runtime is not None else ""
    return f"{model.device.type.upper()}, {dtype}{runtime}"


# ----------------------------------------------------------------------------- before a model is built

@dataclass
class Inspection:
    """What a local checkpoint says about itself without being loaded (None: it does not say)."""

    image_size: int | None = None
    parameters: int | None = None
    train_timesteps: int | None = None
    weights_bytes: int = 0


def _json_file(path: Path | None) -> dict | None:
    """A small JSON file's object, or None (missing, not a regular file, unreadable: the loader says why)."""
    try:
        if path is None or not path.is_file() or path.stat().st_size > CONFIG_BYTES:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _first_file(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _files_of(path: Path) -> tuple[Path | None, dict | None, dict | None]:
    """(weights file, model config, scheduler config) as ilvr.loading picks them for a file or folder."""
    if path.is_dir():
        folder = path / "unet" if (path / "unet" / "config.json").is_file() and not (path / "config.json").is_file() \
            else path
        weights = _first_file(folder, ["model.safetensors", "diffusion_pytorch_model.safetensors",
                                       "diffusion_pytorch_model.bin", "model.pt"])
        if weights is None:
            try:
                found = [p for p in folder.iterdir() if p.suffix in LOADABLE_WEIGHT_SUFFIXES and p.is_file()]
            except OSError:
                found = []
            weights = found[0] if len(found) == 1 else None
        config = _json_file(folder / "config.json")
        scheduler = _json_file(_first_file(path, ["scheduler_config.json", "scheduler/scheduler_config.json",
                                                  "../scheduler/scheduler_config.json"]))
        return weights, config, scheduler
    config = _json_file(path.parent / "config.json")
    if config is not None and config.get("format") != "ilvr" and "_class_name" not in config \
            and "block_out_channels" not in config:
        config = None  # an unrelated config.json beside a .pt
    scheduler = _json_file(_first_file(path.parent, ["scheduler_config.json", "../scheduler/scheduler_config.json"]))
    return (path if path.is_file() else None), config, scheduler


def _config_sizes(config: Mapping | None, scheduler: Mapping | None) -> tuple[Any, Any]:
    """(image size, schedule length) recorded in our config or a diffusers one."""
    size = steps = None
    if isinstance(config, Mapping):
        if config.get("format") == "ilvr":
            size = (config.get("unet") or {}).get("image_size")
            steps = (config.get("diffusion") or {}).get("num_train_timesteps")
        elif "block_out_channels" in config or "_class_name" in config:
            size = config.get("sample_size") or 64
            if isinstance(size, (list, tuple)):
                size = max(size, default=None)
    if isinstance(scheduler, Mapping) and steps is None:
        steps = scheduler.get("num_train_timesteps")
    return size, steps


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return {}
        (n,) = struct.unpack("<Q", raw)
        if n > HEADER_BYTES:
            raise ModelLoadError("the model's safetensors header is larger than this server reads")
        header = json.loads(f.read(n))
    return header if isinstance(header, dict) else {}


def _adm_size(shapes: Mapping[str, Sequence[int]]) -> int | None:
    """The image size ilvr.loading would infer for a guided-diffusion state dict, from its shapes alone."""
    if "input_blocks.0.0.weight" not in shapes:
        return None
    try:
        sd = {k: torch.empty(tuple(s), device="meta") for k, s in shapes.items()}
        return infer_adm_config(sd).image_size
    except (ModelLoadError, ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, RuntimeError):
        return None  # the loader reports what is wrong


def inspect_checkpoint(path: Path, limits: ModelLimits) -> Inspection:
    """Read a local checkpoint's config, safetensors header or pickle index (memory-mapped, nothing
    loaded) for its image size, parameter count and schedule length. A weights file too large to hold
    a model within the limits is not opened at all."""
    weights, config, scheduler = _files_of(path)
    found = Inspection()
    found.image_size, found.train_timesteps = _config_sizes(config, scheduler)
    if weights is None:
        return found
    try:
        found.weights_bytes = weights.stat().st_size
    except OSError:
        return found
    if found.weights_bytes > limits.max_weights_bytes:
        return found  # check_limits refuses it
    shapes: dict[str, Sequence[int]] = {}
    try:
        if weights.suffix == ".safetensors":
            header = _safetensors_header(weights)
            meta = header.pop("__metadata__", None) or {}
            shapes = {k: v.get("shape", []) for k, v in header.items() if isinstance(v, Mapping)}
            if config is None and isinstance(meta, Mapping) and "ilvr_config" in meta:
                size, steps = _config_sizes(json.loads(meta["ilvr_config"]), None)
                found.image_size, found.train_timesteps = size, found.train_timesteps or steps
        elif weights.suffix in LOADABLE_WEIGHT_SUFFIXES:
            obj = torch.load(weights, map_location="cpu", mmap=True, weights_only=True)  # an index: no data read
            if isinstance(obj, Mapping) and isinstance(obj.get("unet"), Mapping) and "step" in obj:  # a training state
                found.image_size = found.image_size or obj["unet"].get("image_size")
            try:
                sd = unwrap_state_dict(obj, weights.name)
            except ModelLoadError:  # not a state dict of tensors: nothing to count here, the loader says why
                sd = {}
            shapes = {k: tuple(v.shape) for k, v in sd.items()}
            del obj, sd
    except ModelLoadError:
        raise
    except Exception:  # noqa: BLE001 - unreadable here (e.g. an old pickle that cannot be mapped): the loader says why
        return found
    if shapes:
        found.parameters = sum(math.prod(int(d) for d in s) for s in shapes.values())
        if found.image_size is None:
            found.image_size = _adm_size(shapes)
    return found


def check_limits(found: Inspection, limits: ModelLimits, detailed: bool = True) -> None:
    """Refuse a model over the app's limits, naming the setting that raises each one. ``detailed``
    also gives the model's own value (a public server echoes nothing from a visitor's file)."""
    def over(what: str, value: Any, limit: int, env: str | None) -> None:
        got = f" ({value:,})" if detailed else ""
        how = f"; the server's operator can raise it with {env}" if env else ""
        raise ModelLoadError(f"the model's {what}{got} is above this server's limit of {limit:,}{how}")

    if found.weights_bytes > limits.max_weights_bytes:
        over("weights file size in bytes", found.weights_bytes, limits.max_weights_bytes, MAX_PARAMETERS_ENV)
    for what, value, limit, env in (("image size", found.image_size, limits.max_image_size, MAX_IMAGE_SIZE_ENV),
                                    ("parameter count", found.parameters, limits.max_parameters, MAX_PARAMETERS_ENV),
                                    ("number of diffusion steps", found.train_timesteps, limits.max_train_timesteps,
                                     None)):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit:
            over(what, value, limit, env)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])(?:~|/)[^\s'\"(),;:]*")


def shown_error(message: str, source: str, detailed: bool) -> str:
    """A load error as the visitor may see it. Detailed (a loopback server with paths allowed): as is.
    Otherwise no file names or config values: the app's own refusals stay, a registry model's error
    loses the server's paths, and any other failure becomes one sentence about the typed source."""
    if detailed or message.startswith(("the model's ", "this server ")):
        return message
    if source in BY_NAME or source in BUNDLED:
        return _ABSOLUTE_PATH.sub("…", message)
    return ("the checkpoint could not be loaded: it is missing, unreadable or not a model this app can read "
            "(a .safetensors or .pt file, or a model folder, in a known layout)")


# ----------------------------------------------------------------------------- the cache

class ModelCache:
    """Loaded models by source, most recently used last, at most ``max_models`` of them.

    Sources are keyed by ``source_key``: every spelling of a local path is one entry. Each key has its
    own lock while it loads, so loading (or downloading) one model never blocks users of another one
    that is already loaded. Local models are reloaded when their files change. Models load on
    ``ilvr.device.resolve_device(device)`` in that device's default dtype, after ``limits`` are
    checked (from the files first, see ``inspect_checkpoint``, and on the built model). Paths under
    ``refuse_under`` (default: Gradio's upload folders) never load.

    Failed loads are remembered as their messages only (never the exception, whose traceback would
    keep the tensors read): at most ``max_failures``, least recently used dropped first. A local
    file's failure stands until the file changes; any other (a Hub download) for ``retry_after_s``.
    It also keeps a running estimate of seconds per image-step for each model, for ETAs.
    """

    def __init__(self, max_models: int = 2, device: str = "auto",
                 loader: Callable[..., DiffusionModel] = load_model, retry_after_s: float = 30.0,
                 limits: ModelLimits | None = None, refuse_under: Sequence[Path] | None = None,
                 max_failures: int = 64, detailed_errors: bool = True):
        self.max_models = max_models
        self.retry_after_s = retry_after_s
        self.device = device
        self.loader = loader
        self.limits = limits or ModelLimits()
        self.refuse_under = list(upload_folders() if refuse_under is None else refuse_under)
        self.max_failures = max_failures
        self.detailed_errors = detailed_errors  # limit refusals give the model's own value
        self._models: OrderedDict[str, tuple[int | None, DiffusionModel]] = OrderedDict()
        self._source_locks: dict[str, list] = {}  # key -> [lock, users]
        self._lock = threading.Lock()
        self._speed: dict[int, float] = {}  # id(model) -> seconds per image-step
        self._failures: OrderedDict[str, tuple[float, int | None, str]] = OrderedDict()  # key -> (when, stamp, message)

    def cached(self, source: str) -> DiffusionModel | None:
        """The loaded model for source if it is cached and still current, else None."""
        key = source_key(source)
        with self._lock:
            entry = self._models.get(key)
        if entry is None or entry[0] != weights_stamp(key):
            return None
        return entry[1]

    def failures(self) -> dict[str, str]:
        """The remembered failures: key -> message (strings only)."""
        with self._lock:
            return {key: entry[2] for key, entry in self._failures.items()}

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """The key's own lock; the entry goes away with its last user (a stream of distinct paths leaves
        nothing behind)."""
        with self._lock:
            entry = self._source_locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    self._source_locks.pop(key, None)

    def get(self, source: str) -> DiffusionModel:
        """Load (or reuse) the model for source; raises ModelLoadError with a user-facing message."""
        source = source.strip()
        if not source:
            raise ModelLoadError("pick a model or type the path of a local checkpoint")
        key = source_key(source)
        self._refuse_upload_folder(source, key)
        with self._locked(key):
            model = self.cached(key)
            if model is not None:
                with self._lock:
                    self._models.move_to_end(key)
                return model
            return self._load(source, key)

    def _refuse_upload_folder(self, source: str, key: str) -> None:
        if source in BY_NAME or source in BUNDLED:
            return
        try:
            path = Path(key).expanduser().resolve()
        except (OSError, RuntimeError):
            return
        if any(path == folder or folder in path.parents for folder in self.refuse_under):
            raise ModelLoadError("this server never loads models from its upload folder")

    def _load(self, source: str, key: str) -> DiffusionModel:
        """Load key (its lock held), remember a failure, and cache the model."""
        stamp = weights_stamp(key)
        with self._lock:
            failed = self._failures.get(key)
            if failed is not None:
                self._failures.move_to_end(key)
        if failed is not None and failed[1] == stamp and (stamp is not None
                                                          or time.monotonic() - failed[0] < self.retry_after_s):
            raise ModelLoadError(failed[2])  # the same file, or offline: do not read or wait again
        message = None
        try:
            model = self._build(key)
        except ModelLoadError as e:
            message = str(e)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, MemoryError) as e:  # never crash the app
            message = f"could not load {source!r}: {type(e).__name__}: {e}"
        if message is not None:  # raised out here: the exception and its frames (the tensors read) are gone
            self._remember_failure(key, stamp, message)
            raise ModelLoadError(message)
        with self._lock:
            self._failures.pop(key, None)
        if source in BY_NAME:
            model.name = source
        elif key != source:
            model.name = source  # shown as typed
        with self._lock:
            self._models.pop(key, None)
            self._models[key] = (stamp, model)
            while len(self._models) > self.max_models:
                _, (_, dropped) = self._models.popitem(last=False)
                self._speed.pop(id(dropped), None)
        return model

    def _build(self, key: str) -> DiffusionModel:
        local = BUNDLED[key].path if key in BUNDLED else Path(key).expanduser()
        if key not in BY_NAME and local.exists():
            check_limits(inspect_checkpoint(local, self.limits), self.limits, self.detailed_errors)
        device = resolve_device(self.device)
        model = self.loader(key, device=device, dtype=default_dtype(device), check=self._within_limits)
        check_limits(Inspection(image_size=model.image_size, parameters=count_parameters(model.unet),
                                train_timesteps=model.diffusion.num_train_timesteps), self.limits,
                     self.detailed_errors)  # a loader that did not call the check (tests pass their own)
        return model

    def _within_limits(self, unet_config, diffusion, parameters: int) -> None:
        """ilvr.loading's hook: refuse a model over the limits before its weights are placed or exported
        (Hub downloads and pickles that inspect_checkpoint cannot read ahead are caught here)."""
        check_limits(Inspection(image_size=unet_config.image_size, parameters=parameters,
                                train_timesteps=diffusion.num_train_timesteps), self.limits, self.detailed_errors)

    def _remember_failure(self, key: str, stamp: int | None, message: str) -> None:
        with self._lock:
            self._failures.pop(key, None)
            self._failures[key] = (time.monotonic(), stamp, message)
            while len(self._failures) > self.max_failures:
                self._failures.popitem(last=False)

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
