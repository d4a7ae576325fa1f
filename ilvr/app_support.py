"""What the Gradio app (app.py) needs beyond wiring: a model cache, input parsing, scribble masks,
sampling jobs that stream previews from a worker thread, and result files with settings embedded.

Nothing here imports gradio. Bad input raises ``ValueError`` (``ImageError`` is one) or
``ModelLoadError`` with a message meant for the user; app.py shows those as ``gr.Error``.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .filters import check_factor, check_kernel
from .grid import labelled_rows
from .images import MAX_PIXELS, ImageError, load_reference, open_image, save_png, square_resize, tensor_to_pil, to_rgb
from .loading import WEIGHT_SUFFIXES, ModelLoadError, assumed_settings, load_model
from .model import DiffusionModel
from .network import count_parameters
from .registry import BUNDLED, BY_NAME, DEFAULT_MODEL
from .sampler import SAMPLERS, Cancelled, StepInfo, check_unconditional, sample, settings_dict, validate_steps

MAX_ROWS = 8  # rows of a sweep grid
MAX_SAMPLES = 8  # samples per row
MAX_SEED = 2**31 - 1


# ----------------------------------------------------------------------------- models

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


def _weights_stamp(source: str) -> int | None:
    """mtime of a local model's files, so a re-exported checkpoint is reloaded; None for hub models."""
    path = BUNDLED[source].path if source in BUNDLED else Path(source).expanduser()
    try:
        if path.is_file():
            return path.stat().st_mtime_ns
        if path.is_dir():
            return max((p.stat().st_mtime_ns for p in path.iterdir()
                        if p.suffix in WEIGHT_SUFFIXES + (".json",) and not p.name.endswith(".ckpt.pt")), default=0)
    except OSError:
        return None
    return None


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU; bfloat16 on GPUs that support it (no fp16 overflow), float16 otherwise."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class ModelCache:
    """Loaded models by source, most recently used last, at most ``max_models`` of them.

    Each source has its own lock, so loading (or downloading) one model never blocks users of
    another one that is already loaded. Local models are reloaded when their files change.
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
        if entry is None or entry[0] != _weights_stamp(source):
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
            stamp = _weights_stamp(source)
            failed = self._failures.get(source)
            if failed and time.monotonic() - failed[0] < self.retry_after_s and stamp is None:
                raise failed[1]  # e.g. offline: do not wait for the hub's retries again
            device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available()
                                  else ("cpu" if self.device == "auto" else self.device))
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
            self._speed[id(model)] = time.perf_counter() - start
        return self._speed[id(model)]

    def record_speed(self, model: DiffusionModel, seconds: float, image_steps: int) -> None:
        """Fold a finished run into the estimate (exponential moving average)."""
        if image_steps <= 0 or seconds <= 0:
            return
        measured = seconds / image_steps
        old = self._speed.get(id(model))
        self._speed[id(model)] = measured if old is None else 0.5 * old + 0.5 * measured


def device_label(model: DiffusionModel) -> str:
    """For example 'CPU, float32, onnxruntime' or 'CUDA (NVIDIA H100 80GB HBM3), bfloat16'."""
    dtype = str(model.dtype).replace("torch.", "")
    if model.device.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(model.device)}), {dtype}"
    runtime = ", onnxruntime" if model.cpu_runtime is not None else ""
    return f"{model.device.type.upper()}, {dtype}{runtime}"


# ----------------------------------------------------------------------------- parsing user input

def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{what} must be a whole number, got {value}")
        return int(value)
    text = str(value if value is not None else "").strip()
    if not re.fullmatch(r"[+-]?\d+(\.0*)?", text):
        raise ValueError(f"{what} must be a whole number, got {text!r}")
    return int(float(text))


def parse_factor(value: Any, image_size: int) -> int:
    """One N, checked against the model's size (it must divide it)."""
    n = _as_int(value, "N")
    check_factor(image_size, n)
    return n


def parse_int_list(text: Any, what: str) -> list[int]:
    """'4, 8 16' or [4, 8, 16] -> [4, 8, 16], duplicates dropped, order kept."""
    parts = list(text) if isinstance(text, (list, tuple)) else re.split(r"[,\s;]+", str(text or "").strip())
    values = [_as_int(p, what) for p in parts if str(p).strip()]
    if not values:
        raise ValueError(f"give at least one {what}")
    return list(dict.fromkeys(values))


def parse_factors(text: Any, image_size: int) -> list[int]:
    """A list of N values for a sweep, each dividing the image size."""
    values = parse_int_list(text, "N value")
    if len(values) > MAX_ROWS:
        raise ValueError(f"at most {MAX_ROWS} N values per grid, got {len(values)}")
    for n in values:
        check_factor(image_size, n)
    return values


def parse_stop(value: Any, num_train_timesteps: int = 1000) -> int:
    stop = _as_int(value if value not in (None, "") else 0, "stop step")
    if not 0 <= stop <= num_train_timesteps:
        raise ValueError(f"stop step must be between 0 and {num_train_timesteps}, got {stop}")
    return stop


def parse_stops(text: Any, num_train_timesteps: int = 1000) -> list[int]:
    values = parse_int_list(text, "stop step")
    if len(values) > MAX_ROWS:
        raise ValueError(f"at most {MAX_ROWS} stop steps per grid, got {len(values)}")
    return [parse_stop(v, num_train_timesteps) for v in values]


def parse_samples(value: Any, limit: int = MAX_SAMPLES) -> int:
    k = _as_int(value, "number of samples")
    if not 1 <= k <= limit:
        raise ValueError(f"number of samples must be between 1 and {limit}, got {k}")
    return k


def make_seeds(seed: Any, count: int) -> list[int]:
    """count consecutive seeds from seed; a negative seed picks a random start."""
    base = _as_int(seed if seed not in (None, "") else -1, "seed")
    if base < 0:
        base = secrets.randbelow(1_000_000)
    if base + count - 1 > MAX_SEED:
        raise ValueError(f"seed must be at most {MAX_SEED - count + 1}")
    return [base + k for k in range(count)]


def check_common(model: DiffusionModel, steps: Any, kernel: Any, sampler: Any) -> str:
    """Validate the model, steps / filter / sampler; return the steps spec as a string."""
    check_unconditional(model)
    steps = str(steps or "").strip()
    validate_steps(model, steps)
    check_kernel(str(kernel))
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    return steps


# ----------------------------------------------------------------------------- references

def reference_image(value: Any, what: str = "a reference image") -> Image.Image:
    """An uploaded image (path, PIL or array) as RGB; a clear ImageError when missing or unreadable."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ImageError(f"upload {what} first (or click one of the examples)")
    if isinstance(value, dict):  # an ImageEditor value passed where an image was expected
        value = value.get("composite") or value.get("background")
        if value is None:
            raise ImageError(f"upload {what} first (or click one of the examples)")
    if isinstance(value, np.ndarray):
        arr = value if value.dtype == np.uint8 else np.clip(value, 0, 255).astype(np.uint8)
        value = Image.fromarray(arr)
    return open_image(value)


def _alpha(img: Image.Image) -> np.ndarray:
    """Opacity in [0, 1] of a drawn layer (a layer without alpha counts as fully drawn where not white)."""
    if "A" in img.getbands():
        return np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    return (rgb.min(axis=2) < 250).astype(np.float32)


def sketch_image(value: Any) -> Image.Image | None:
    """The painting in a Sketchpad value, flattened on white; None when nothing was painted."""
    if value is None:
        return None
    if not isinstance(value, dict):
        img = reference_image(value, "a painting")
        return None if np.asarray(img).min() >= 250 else img
    layers = [im for im in (value.get("layers") or []) if im is not None]
    composite = value.get("composite")
    if composite is None and not layers:
        return None
    if composite is None:
        composite = layers[0]
    img = to_rgb(_to_pil(composite))
    drawn = any(_alpha(_to_pil(layer)).max() > 0 for layer in layers)
    if not drawn and np.asarray(img).min() >= 250:
        return None
    return img


def _to_pil(x: Any) -> Image.Image:
    """A PIL image from a PIL image, an array or a file path, keeping its alpha."""
    if isinstance(x, Image.Image):
        return x
    if isinstance(x, np.ndarray):
        return Image.fromarray(x if x.dtype == np.uint8 else np.clip(x, 0, 255).astype(np.uint8))
    try:
        img = Image.open(x)
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"the image is larger than {MAX_PIXELS // 1_000_000} megapixels") from e
    except OSError as e:
        raise ImageError(f"could not read the image ({type(e).__name__})") from e
    return img


def scribble_mask(value: dict, size: int, dilate: int = 2) -> tuple[torch.Tensor | None, float]:
    """Where the user drew, as a (size, size) float mask in {0, 1}, grown by ``dilate`` pixels.

    Strokes come from the editor's layers (their alpha) and, for callers that only send a
    background and a composite, from where the composite differs from the background. The mask
    is cropped and resized like the reference. Returns (mask or None if nothing drawn, coverage).
    """
    composite = value.get("composite")
    background = value.get("background")
    base = _to_pil(composite if composite is not None else background)
    w, h = base.size
    drawn = np.zeros((h, w), dtype=np.float32)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer = _to_pil(layer)
        if layer.size != (w, h):
            layer = layer.resize((w, h), Image.Resampling.NEAREST)
        drawn = np.maximum(drawn, _alpha(layer))
    if composite is not None and background is not None:
        bg, comp = to_rgb(_to_pil(background)), to_rgb(_to_pil(composite))
        if bg.size == comp.size:
            diff = np.abs(np.asarray(comp, np.float32) - np.asarray(bg, np.float32)).max(axis=2)
            drawn = np.maximum(drawn, (diff > 24).astype(np.float32))
    if drawn.max() <= 0:
        return None, 0.0
    small = square_resize(Image.fromarray((drawn * 255).astype(np.uint8), "L"), size)
    mask = torch.from_numpy((np.asarray(small, np.float32) > 8).astype(np.float32))
    if dilate > 0:
        mask = torch.nn.functional.max_pool2d(mask[None, None], 2 * dilate + 1, stride=1, padding=dilate)[0, 0]
    coverage = float(mask.mean())
    return (mask if coverage > 0 else None), coverage


def scribble_reference(value: Any) -> Image.Image:
    """The edited image (background with strokes flattened on white) from an ImageEditor value."""
    if value is None or (isinstance(value, dict) and value.get("composite") is None
                         and value.get("background") is None):
        raise ImageError("upload an image to edit first, then draw scribbles on it (or click an example)")
    if not isinstance(value, dict):
        return reference_image(value, "an image to edit")
    return open_image(_to_pil(value["composite"] if value.get("composite") is not None else value["background"]))


def mask_overlay(reference: torch.Tensor, mask: torch.Tensor) -> Image.Image:
    """The reference faded towards white outside the mask: shows where ILVR may change the image."""
    arr = np.asarray(tensor_to_pil(reference).convert("RGB"), np.float32)
    m = mask.cpu().numpy()[..., None]
    faded = 0.35 * arr + 0.65 * 255.0
    return Image.fromarray((m * arr + (1 - m) * faded).clip(0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- jobs

@dataclass
class Row:
    """One row of a result grid: a conditioning setting shared by all its samples."""

    label: str
    n_factor: int | None
    stop_at: int = 0


@dataclass
class Job:
    """A batch of ILVR runs: every row is sampled with every seed (seed k is column k)."""

    task: str
    reference: torch.Tensor | None  # (3, S, S) in [-1, 1]
    rows: list[Row]
    seeds: list[int]
    kernel: str = "cubic"
    steps: str = "250"
    sampler: str = "ddpm"
    mask: torch.Tensor | None = None
    keep_outside: bool = False
    reference_row: list[tuple[str, Image.Image]] = field(default_factory=list)  # shown above the rows

    def total_steps(self, model: DiffusionModel) -> int:
        """Sampler steps over all rows (each step handles the row's whole batch)."""
        return len(self.rows) * validate_steps(model, self.steps)

    def image_steps(self, model: DiffusionModel) -> int:
        return self.total_steps(model) * len(self.seeds)


@dataclass
class Update:
    """Progress of a running job, as yielded by run_job."""

    done: int
    total: int
    desc: str
    preview: Image.Image | None
    elapsed_s: float

    @property
    def eta_s(self) -> float | None:
        return self.elapsed_s / self.done * (self.total - self.done) if self.done else None


@dataclass
class JobResult:
    job: Job
    rows: list[tuple[Row, list[Image.Image]]]
    settings: list[list[dict]]  # per row, per sample
    elapsed_s: float
    device: str


def display_cell(image_size: int) -> int:
    """Grid cell size: small models are shown enlarged (nearest neighbour), big ones at most 256 px."""
    return min(256, max(128, image_size))


def build_grid(job: Job, rows: Sequence[tuple[str, Sequence[Image.Image]]], image_size: int) -> Image.Image:
    """The labelled grid: the reference row first, then one row per setting (paper Fig. 4 / 5 layout)."""
    all_rows: list[tuple[str, list[Image.Image]]] = []
    if job.reference_row:
        all_rows.append((" | ".join(label for label, _ in job.reference_row), [im for _, im in job.reference_row]))
    all_rows += [(label, list(images)) for label, images in rows if images]
    cell = display_cell(image_size)
    return labelled_rows(all_rows, cell=cell)


def job_warnings(job: Job, model: DiffusionModel) -> list[str]:
    """Settings that are valid but probably not what the user meant."""
    total = model.diffusion.num_train_timesteps
    free = [row.label for row in job.rows if job.reference is not None and row.stop_at >= total]
    if not free:
        return []
    which = "every row" if len(free) == len(job.rows) else "row " + ", ".join(free)
    return [f"Stop step {total} conditions no step, so {which} ignores the reference (plain unconditional "
            f"samples). Use a stop step below {total}, e.g. 0 to condition every step."]


class StopFlags:
    """Cancel flags per browser session, so a Cancel click stops that session's running sampler."""

    def __init__(self) -> None:
        self._flags: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()

    def register(self, session: str | None) -> threading.Event:
        event = threading.Event()
        if session:
            with self._lock:
                self._flags.setdefault(session, set()).add(event)
        return event

    def release(self, session: str | None, event: threading.Event) -> None:
        if session:
            with self._lock:
                events = self._flags.get(session, set())
                events.discard(event)
                if not events:
                    self._flags.pop(session, None)

    def cancel(self, session: str | None) -> int:
        """Set every flag of the session; returns how many runs were told to stop."""
        with self._lock:
            events = list(self._flags.get(session or "", ()))
        for e in events:
            e.set()
        return len(events)


def run_job(model: DiffusionModel, job: Job, stop: threading.Event | None = None,
            poll_s: float = 0.5) -> Generator[Update, None, JobResult]:
    """Sample a job in a worker thread; yield an Update (with a preview grid of the predicted x0)
    about every ``poll_s`` seconds; return the JobResult (use ``result = yield from run_job(...)``).

    Setting ``stop`` (or closing this generator) makes the worker raise ``Cancelled`` at its next
    step; the same exception is raised here. Errors in the worker are re-raised here.
    """
    stop = stop or threading.Event()
    per_row = validate_steps(model, job.steps)
    total = per_row * len(job.rows)
    state: dict[str, Any] = {"row": 0, "info": None, "new": False}
    finished: list[list[Image.Image]] = []
    outcome: dict[str, Any] = {}
    done = threading.Event()
    lock = threading.Lock()

    def work() -> None:
        try:
            for r, row in enumerate(job.rows):
                def report(info: StepInfo, r=r) -> None:
                    if stop.is_set():
                        raise Cancelled("cancelled")
                    with lock:
                        state.update(row=r, info=info, new=True)
                x = sample(model, job.reference, seeds=job.seeds, n_factor=row.n_factor or 1, kernel=job.kernel,
                           steps=job.steps, stop_at=row.stop_at, sampler=job.sampler,
                           mask=job.mask, keep_outside=job.keep_outside, progress=report)
                images = [tensor_to_pil(s) for s in x.cpu()]
                with lock:
                    finished.append(images)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = e
        finally:
            done.set()

    start = time.time()
    worker = threading.Thread(target=work, name=f"ilvr-{job.task}", daemon=True)
    worker.start()
    try:
        while not done.wait(poll_s):
            with lock:
                info, r, fresh = state["info"], state["row"], state["new"]
                state["new"] = False
                rows_done = [list(images) for images in finished]
            if info is None or not fresh:
                continue
            current = [tensor_to_pil(x) for x in info.pred_x0.detach().float().cpu()]
            shown = [(row.label, images) for row, images in zip(job.rows, rows_done)]
            if len(rows_done) <= r:
                shown.append((f"{job.rows[r].label} …", current))
            step = r * per_row + info.index
            desc = (f"{job.rows[r].label}: step {info.index}/{info.total}" if len(job.rows) > 1
                    else f"step {info.index}/{info.total}")
            yield Update(done=step, total=total, desc=desc, preview=build_grid(job, shown, model.image_size),
                         elapsed_s=time.time() - start)
    finally:
        stop.set()  # no-op after success; stops the worker if this generator is closed early
    worker.join(timeout=0.1)
    if "error" in outcome:
        raise outcome["error"]
    elapsed = time.time() - start
    keep = job.keep_outside if job.mask is not None else None
    settings = [[settings_dict(model, n_factor=row.n_factor if job.reference is not None else None,
                               kernel=job.kernel, steps=job.steps, stop_at=row.stop_at, sampler=job.sampler,
                               seed=seed, task=job.task, keep_outside=keep)
                 for seed in job.seeds] for row in job.rows]
    return JobResult(job=job, rows=list(zip(job.rows, finished)), settings=settings, elapsed_s=elapsed,
                     device=device_label(model))


# ----------------------------------------------------------------------------- outputs

OUTPUTS_ENV = "ILVR_APP_OUTPUTS"
RUN_MARKER = ".ilvr-studio-run"  # written in every result folder: only those are ever pruned
RUN_NAME = re.compile(r"\d{8}-\d{6}-[0-9a-f]{8}")  # the result folders' names (see save_result)


def output_root(env: Mapping[str, str] = os.environ) -> Path:
    """Where result PNGs go: $ILVR_APP_OUTPUTS, else a folder in the system temp dir (served by Gradio)."""
    return Path(env.get(OUTPUTS_ENV) or Path(tempfile.gettempdir()) / "ilvr-studio").expanduser().absolute()


def writable_folder(folder: Path) -> bool:
    """Whether folder exists (or can be made) and takes a new file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ilvr-write-check-"):
            return True
    except OSError:
        return False


def resolve_output_root(env: Mapping[str, str] = os.environ) -> tuple[Path | None, str | None]:
    """The folder for result files, checked once at startup so that a read-only one is reported then,
    not as ``[Errno 30]`` after a whole run. An unwritable folder falls back to a fresh temp folder.

    Returns (folder, warning): folder is None when nothing is writable (runs must then be refused).
    """
    configured = output_root(env)
    if writable_folder(configured):
        return configured, None
    where = (f"{OUTPUTS_ENV}={configured}" if env.get(OUTPUTS_ENV)
             else f"{configured} (the system temp dir; set {OUTPUTS_ENV} or TMPDIR to a writable folder)")
    try:
        fallback = Path(tempfile.mkdtemp(prefix="ilvr-studio-"))
    except OSError:  # also FileNotFoundError from gettempdir(): no writable temp dir at all
        return None, (f"ILVR Studio: cannot write result files to {where}, nor to a temp folder: every run will "
                      f"fail until {OUTPUTS_ENV} names a writable folder.")
    return fallback, f"ILVR Studio: cannot write result files to {where}; using {fallback} instead."


def is_run_folder(path: Path) -> bool:
    """A result folder this app made: its name pattern and its marker file (never a symlink)."""
    return (RUN_NAME.fullmatch(path.name) is not None and not path.is_symlink() and path.is_dir()
            and (path / RUN_MARKER).is_file())


def foreign_entries(root: Path) -> list[Path]:
    """What else lives in the outputs folder: Gradio serves the whole folder, so these are blocked and
    named in a warning (anything but the app's marked run folders, whatever its name)."""
    try:
        return sorted(p for p in root.iterdir() if not is_run_folder(p))
    except OSError:
        return []


def prune_outputs(root: Path, max_age_s: float = 6 * 3600) -> None:
    """Delete this app's result folders older than max_age_s so a long-running server does not fill the
    disk. Anything else in root (the folder may be shared, e.g. a Space's /data) is left alone."""
    if not root.is_dir():
        return
    cutoff = time.time() - max_age_s
    for d in root.iterdir():
        try:
            if is_run_folder(d) and d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


@dataclass
class SavedResult:
    grid: Image.Image
    grid_path: Path
    gallery: list[tuple[str, str]]  # (png path, caption)
    files: list[str]
    summary: str


def _fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def text_bar(done: int, total: int, width: int = 24) -> str:
    """A progress bar in text, for status lines that are updated while sampling."""
    filled = round(width * done / total) if total else 0
    return f"`{'█' * filled}{'░' * (width - filled)}` {100 * done / total if total else 0:.0f} %"


def estimate_text(seconds: float) -> str:
    return f"about {_fmt_seconds(seconds)}" if seconds >= 1 else "a second or two"


def save_result(result: JobResult, model: DiffusionModel, root: Path | None = None) -> SavedResult:
    """Write every sample as a PNG carrying its settings, plus the grid; return paths and a summary."""
    root = root or output_root()
    prune_outputs(root)
    folder = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"  # RUN_NAME
    folder.mkdir(parents=True)
    (folder / RUN_MARKER).write_text("Made by ILVR Studio (app.py); deleted with its folder after 6 hours.\n")
    job = result.job
    gallery, files = [], []
    for (row, images), row_settings in zip(result.rows, result.settings):
        for img, settings in zip(images, row_settings):
            stem = f"{job.task}_N{row.n_factor}_stop{row.stop_at}_seed{settings['seed']}"
            path = save_png(img, folder / f"{stem}.png", settings)
            caption = f"seed {settings['seed']} · {row.label}"  # seed first: narrow thumbnails cut the end
            gallery.append((str(path), caption))
            files.append(str(path))
    grid = build_grid(job, [(row.label, images) for row, images in result.rows], model.image_size)
    grid_settings = {"task": job.task, "model": model.name, "rows": [r.label for r in job.rows],
                     "N": [r.n_factor for r in job.rows], "stop_at": [r.stop_at for r in job.rows],
                     "seeds": job.seeds, "filter": job.kernel, "steps": job.steps, "sampler": job.sampler,
                     "image_size": model.image_size}
    grid_path = save_png(grid, folder / f"{job.task}_grid.png", grid_settings)
    files.append(str(grid_path))
    return SavedResult(grid=grid, grid_path=grid_path, gallery=gallery, files=files,
                       summary=summary_markdown(result, model))


def summary_markdown(result: JobResult, model: DiffusionModel) -> str:
    """Seeds and settings of a finished job, as shown next to the results."""
    job = result.job
    seeds = ", ".join(str(s) for s in job.seeds)
    lines = [f"**Done in {_fmt_seconds(result.elapsed_s)}** on {result.device} · model `{model.name}` "
             f"({model.image_size} px)",
             "",
             f"seeds **{seeds}** (column k uses seed {job.seeds[0]} + k) · steps `{job.steps}` · "
             f"filter `{job.kernel}` · sampler `{job.sampler}`"
             + (f" · keep unedited region: {'yes' if job.keep_outside else 'no'}" if job.mask is not None else ""),
             "",
             "| row | N | conditioned steps |", "|---|---|---|"]
    for row in job.rows:
        span = "none" if row.stop_at >= model.diffusion.num_train_timesteps else \
            f"{model.diffusion.num_train_timesteps} → {row.stop_at}"
        lines.append(f"| {row.label} | {row.n_factor} | {span} |")
    lines += ["", "Each PNG below carries these settings in its `ilvr` text chunk "
                  "(`python -c \"from ilvr.images import read_settings; print(read_settings('file.png'))\"`)."]
    return "\n".join(lines)


def model_markdown(model: DiffusionModel, presets: dict[str, int]) -> str:
    """Status line for the model picker."""
    params = count_parameters(model.unet) / 1e6
    p = presets
    text = (f"**Loaded** `{model.name}`: {model.image_size} px, {params:.1f} M parameters, "
            f"{model.info.get('family', '?')} format · **device: {device_label(model)}** · "
            f"paper presets scaled to {model.image_size} px: translation N={p['translation']}, "
            f"paint N={p['paint']}, scribbles N={p['scribble']}")
    assumed = assumed_settings(model)
    if assumed:
        text += ("\n\nRead with the published ADM settings, which a guided-diffusion `.pt` does not record: "
                 + ", ".join(f"`{k}={v}`" for k, v in assumed.items()) + ". A model of your own trained otherwise: "
                 "`python -m ilvr convert model.pt --model-option KEY=VALUE --out folder`, then load the folder.")
    return text


def rows_for_factors(factors: Sequence[int]) -> list[Row]:
    """Rows of an N sweep (paper Fig. 4)."""
    return [Row(label=f"N={n}", n_factor=n) for n in factors]


def rows_for_stops(n: int, stops: Sequence[int], num_train_timesteps: int = 1000) -> list[Row]:
    """Rows of a conditioning-range sweep at a fixed N (paper Fig. 5): conditioned on T -> stop."""
    return [Row(label=f"{num_train_timesteps}->{s}", n_factor=n, stop_at=s) for s in stops]  # ASCII: grid font


# ----------------------------------------------------------------------------- the four tabs' jobs

GENERATION_MODES = ("N sweep (Fig. 4)", "conditioning-range sweep (Fig. 5)")
PAINT_SOURCES = ("uploaded image", "sketch pad")


def _common(model: DiffusionModel, samples: Any, steps: Any, kernel: Any, sampler: Any,
            seed: Any) -> tuple[str, list[int]]:
    steps = check_common(model, steps, kernel, sampler)
    return steps, make_seeds(seed, parse_samples(samples))


def _reference(img: Image.Image, model: DiffusionModel) -> tuple[torch.Tensor, Image.Image]:
    ref = load_reference(img, model.image_size, model.config.in_channels)
    return ref, tensor_to_pil(ref)


def generation_job(model: DiffusionModel, image: Any, mode: str, factors: Any, range_n: Any, stops: Any,
                   samples: Any, steps: Any, stop_at: Any, kernel: str, sampler: str, seed: Any) -> Job:
    """N-factor generation: rows of N values (Fig. 4), or rows of conditioning ranges at one N (Fig. 5)."""
    size = model.image_size
    img = reference_image(image)
    if mode not in GENERATION_MODES:
        raise ValueError(f"mode must be one of: {', '.join(GENERATION_MODES)}; got {mode!r}")
    if mode == GENERATION_MODES[0]:
        rows = rows_for_factors(parse_factors(factors, size))
        stop = parse_stop(stop_at, model.diffusion.num_train_timesteps)
        for row in rows:
            row.stop_at = stop
    else:
        rows = rows_for_stops(parse_factor(range_n, size), parse_stops(stops, model.diffusion.num_train_timesteps),
                              model.diffusion.num_train_timesteps)
    steps, seeds = _common(model, samples, steps, kernel, sampler, seed)
    ref, shown = _reference(img, model)
    return Job("generation", ref, rows, seeds, kernel, steps, sampler, reference_row=[("reference", shown)])


def translation_job(model: DiffusionModel, image: Any, n: Any, samples: Any, steps: Any, stop_at: Any,
                    kernel: str, sampler: str, seed: Any, task: str = "translation") -> Job:
    """One reference, one N, several samples: the model's own domain with the reference's layout and colours."""
    size = model.image_size
    img = reference_image(image)
    n = parse_factor(n, size)
    row = Row(label=f"N={n}", n_factor=n, stop_at=parse_stop(stop_at, model.diffusion.num_train_timesteps))
    steps, seeds = _common(model, samples, steps, kernel, sampler, seed)
    ref, shown = _reference(img, model)
    return Job(task, ref, [row], seeds, kernel, steps, sampler, reference_row=[("reference", shown)])


def paint_job(model: DiffusionModel, source: str, image: Any, sketch: Any, n: Any, samples: Any, steps: Any,
              stop_at: Any, kernel: str, sampler: str, seed: Any) -> Job:
    """Paint-to-image: translation from a painting, uploaded or drawn on the sketch pad."""
    if source not in PAINT_SOURCES:
        raise ValueError(f"source must be one of: {', '.join(PAINT_SOURCES)}; got {source!r}")
    if source == PAINT_SOURCES[1]:
        painted = sketch_image(sketch)
        if painted is None:
            raise ImageError("the sketch pad is empty: paint something first (or switch the source to the "
                             "uploaded image)")
        image = painted
    elif image is None:
        raise ImageError("upload a painting or clip-art first (or paint one on the sketch pad and pick "
                         "'sketch pad' as the source)")
    return translation_job(model, image, n, samples, steps, stop_at, kernel, sampler, seed, task="paint")


def scribble_job(model: DiffusionModel, editor: Any, n: Any, keep_unedited: bool, samples: Any, steps: Any,
                 stop_at: Any, kernel: str, sampler: str, seed: Any) -> tuple[Job, list[str]]:
    """Scribble editing: ILVR on the edited image over steps T -> stop (paper: N=8, 1000 -> 200 at 256 px).

    With keep_unedited, ILVR acts only around the strokes and the rest of the image is pinned to
    the input (the engine's mask + keep_outside). Returns the job and warnings for the user.
    """
    size = model.image_size
    img = scribble_reference(editor)
    n = parse_factor(n, size)
    stop = parse_stop(stop_at, model.diffusion.num_train_timesteps)
    steps, seeds = _common(model, samples, steps, kernel, sampler, seed)
    warnings: list[str] = []
    mask = None
    if isinstance(editor, dict):
        mask, _ = scribble_mask(editor, size, dilate=max(1, size // 32))
    if mask is None:
        warnings.append("No scribbles found on the image: the result re-imagines the whole image. "
                        "Draw with the brush on the image to edit it.")
    ref, shown = _reference(img, model)
    reference_row = [("edited input", shown)]
    use_mask = mask if (keep_unedited and mask is not None) else None
    if use_mask is not None:
        reference_row.append(("mask", mask_overlay(ref, use_mask)))
    row = Row(label=f"N={n}, {model.diffusion.num_train_timesteps}->{stop}", n_factor=n, stop_at=stop)
    return Job("scribble", ref, [row], seeds, kernel, steps, sampler, mask=use_mask,
               keep_outside=use_mask is not None, reference_row=reference_row), warnings
