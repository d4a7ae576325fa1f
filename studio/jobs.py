"""A job is a batch of ILVR runs shown as a labelled grid: one row per setting, one column per seed (or
one DDIB translation, which has no seeds). ``run_job`` samples it in a worker thread and streams
previews, so the page stays live and Cancel works.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Generator, Sequence

import torch
from PIL import Image

from ilvr import validate
from ilvr.ddib import ddib_translate, result_settings
from ilvr.grid import labelled_rows
from ilvr.images import tensor_to_pil
from ilvr.model import DiffusionModel
from ilvr.sampler import Cancelled, StepInfo, sample, settings_dict

from .models import device_label


@dataclass
class Row:
    """One row of a result grid: a conditioning setting shared by all its samples."""

    label: str
    n_factor: int | None
    stop_at: int = 0


@dataclass
class Job:
    """A batch of ILVR runs: every row is sampled with every seed (seed k is column k). With a source
    model it is one DDIB translation instead (from the source's domain into the job's model's; one row,
    one image)."""

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
    source: DiffusionModel | None = None  # DDIB's source model; None: ILVR

    def steps_per_row(self, model: DiffusionModel) -> int:
        """Sampler steps of one row (the respaced count of ``steps``; DDIB's inversion adds its own)."""
        steps = validate.steps(self.steps, model.diffusion.num_train_timesteps)
        if self.source is not None:
            steps += validate.steps(self.steps, self.source.diffusion.num_train_timesteps)
        return steps

    def total_steps(self, model: DiffusionModel) -> int:
        """Sampler steps over all rows (each step handles the row's whole batch)."""
        return len(self.rows) * self.steps_per_row(model)

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


class ActiveRuns:
    """Browser sessions with a run in progress, counted, so a public server can refuse a session's
    second run (app.py also looks at the queue for runs still waiting)."""

    def __init__(self) -> None:
        self._runs: dict[str, int] = {}
        self._lock = threading.Lock()

    def start(self, session: str | None) -> None:
        if session:
            with self._lock:
                self._runs[session] = self._runs.get(session, 0) + 1

    def finish(self, session: str | None) -> None:
        if session:
            with self._lock:
                left = self._runs.get(session, 0) - 1
                if left > 0:
                    self._runs[session] = left
                else:
                    self._runs.pop(session, None)

    def busy(self, session: str | None) -> bool:
        with self._lock:
            return bool(session) and session in self._runs

    def __len__(self) -> int:
        return len(self._runs)


def run_job(model: DiffusionModel, job: Job, stop: threading.Event | None = None,
            poll_s: float = 0.5) -> Generator[Update, None, JobResult]:
    """Sample a job in a worker thread; yield an Update (with a preview grid of the predicted x0)
    about every ``poll_s`` seconds; return the JobResult (use ``result = yield from run_job(...)``).

    Setting ``stop`` (or closing this generator) makes the worker raise ``Cancelled`` at its next
    step; the same exception is raised here. Errors in the worker are re-raised here.
    """
    stop = stop or threading.Event()
    per_row = job.steps_per_row(model)
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
                if job.source is not None:
                    x = ddib_translate(job.source, model, job.reference, steps=job.steps, progress=report)
                else:
                    x = sample(model, job.reference, seeds=job.seeds, n_factor=row.n_factor or 1,
                               kernel=job.kernel, steps=job.steps, stop_at=row.stop_at, sampler=job.sampler,
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
    if job.source is not None:
        settings = [[result_settings(job.source, model, job.steps, task=job.task)]]
    else:
        settings = [[settings_dict(model, n_factor=row.n_factor if job.reference is not None else None,
                                   kernel=job.kernel, steps=job.steps, stop_at=row.stop_at, sampler=job.sampler,
                                   seed=seed, task=job.task, keep_outside=keep)
                     for seed in job.seeds] for row in job.rows]
    return JobResult(job=job, rows=list(zip(job.rows, finished)), settings=settings, elapsed_s=elapsed,
                     device=device_label(model))
