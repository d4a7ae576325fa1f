"""Result files: the folder they go to (checked once at startup), one run folder per job with every
sample and the grid as PNGs carrying their settings, and pruning of the app's old run folders."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from PIL import Image

from ilvr.images import save_png
from ilvr.model import DiffusionModel

from .jobs import JobResult, build_grid
from .status import summary_markdown

OUTPUTS_ENV = "ILVR_APP_OUTPUTS"
RUN_MARKER = ".ilvr-studio-run"  # written in every result folder: only those are ever pruned
RUN_NAME = re.compile(r"\d{8}-\d{6}-[0-9a-f]{8}")  # the result folders' names (see save_result)


def output_root(env: Mapping[str, str] = os.environ) -> Path:
    """Where result PNGs go: $ILVR_APP_OUTPUTS, else a folder in the system temp dir (served by Gradio)."""
    return Path(env.get(OUTPUTS_ENV) or Path(tempfile.gettempdir()) / "ilvr-studio").expanduser().absolute()


def can_write_into(folder: Path) -> bool:
    """Whether folder exists (or can be made) and takes a new file. Never raises; the test file is
    removed again (the folder, when made here, stays)."""
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
    if can_write_into(configured):
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
            seed = settings.get("seed")  # DDIB has none
            stem = f"{job.task}_N{row.n_factor}_stop{row.stop_at}_seed{seed}" if seed is not None \
                else f"{job.task}_ddib"
            path = save_png(img, folder / f"{stem}.png", settings)
            caption = f"seed {seed} · {row.label}" if seed is not None else row.label  # seed first: thumbnails cut
            gallery.append((str(path), caption))
            files.append(str(path))
    grid = build_grid(job, [(row.label, images) for row, images in result.rows], model.image_size)
    grid_settings = {"task": job.task, "model": model.name, "rows": [r.label for r in job.rows],
                     "N": [r.n_factor for r in job.rows], "stop_at": [r.stop_at for r in job.rows],
                     "seeds": job.seeds, "filter": job.kernel, "steps": job.steps, "sampler": job.sampler,
                     "image_size": model.image_size}
    if job.source is not None:
        grid_settings.update(method="ddib", source_model=job.source.name, sampler="ddim", seeds=[])
    grid_path = save_png(grid, folder / f"{job.task}_grid.png", grid_settings)
    files.append(str(grid_path))
    return SavedResult(grid=grid, grid_path=grid_path, gallery=gallery, files=files,
                       summary=summary_markdown(result, model))
