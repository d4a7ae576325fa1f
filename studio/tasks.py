"""The four tabs' jobs, built from the tabs' widget values: N-factor generation (paper Fig. 4 and 5),
domain translation, paint-to-image and scribble editing. Each builder checks every value before any
sampling and raises ValueError (ImageError) with a message for the user.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from ilvr import validate
from ilvr.ddib import check_pair
from ilvr.images import ImageError, load_reference, tensor_to_pil
from ilvr.filters import valid_factors
from ilvr.model import DiffusionModel
from ilvr.registry import BY_NAME, MODELS, ModelEntry, task_presets
from ilvr.sampler import check_unconditional

from .inputs import MAX_ROWS, mask_overlay, reference_image, run_settings, scribble_mask, scribble_reference, \
    sketch_image
from .jobs import Job, Row

GENERATION_MODES = ("N sweep (Fig. 4)", "conditioning-range sweep (Fig. 5)")
PAINT_SOURCES = ("uploaded image", "sketch pad")
TRANSLATION_METHODS = ("ILVR", "DDIB")


def presets(image_size: int, name: str | None = None) -> dict[str, int]:
    """Each tab's starting N for a model of this size (and registry name, which may set its own)."""
    return task_presets(image_size, BY_NAME.get(name or ""))


def example_set(name: str) -> str:
    """The example rows the app shows for a model: its registry entry's set, else the default set."""
    entry = BY_NAME.get(name)
    return entry.examples if entry is not None else ModelEntry.examples


def ddib_source_for(name: str, image_size: int) -> str | None:
    """The DDIB source model offered for a model: its registry entry's, else the first other registry
    model of its size (None: there is none)."""
    entry = BY_NAME.get(name)
    if entry is not None and entry.ddib_source:
        return entry.ddib_source
    return next((m.name for m in MODELS if m.image_size == image_size and m.name != name), None)


def factor_choices(image_size: int) -> list[int]:
    """The N values the tabs' dropdowns offer: the divisors of the size up to half of it."""
    return [n for n in valid_factors(image_size) if n <= image_size // 2] or [1]


def rows_for_factors(factors: Sequence[int]) -> list[Row]:
    """Rows of an N sweep (paper Fig. 4)."""
    return [Row(label=f"N={n}", n_factor=n) for n in factors]


def rows_for_stops(n: int, stops: Sequence[int], num_train_timesteps: int = 1000) -> list[Row]:
    """Rows of a conditioning-range sweep at a fixed N (paper Fig. 5): conditioned on T -> stop."""
    return [Row(label=f"{num_train_timesteps}->{s}", n_factor=n, stop_at=s) for s in stops]  # ASCII: grid font


def _reference(img: Image.Image, model: DiffusionModel) -> tuple[torch.Tensor, Image.Image]:
    ref = load_reference(img, model.image_size, model.config.in_channels)
    return ref, tensor_to_pil(ref)


def generation_job(model: DiffusionModel, image: Any, mode: str, factors: Any, range_n: Any, stops: Any,
                   samples: Any, steps: Any, stop_at: Any, kernel: str, sampler: str, seed: Any) -> Job:
    """N-factor generation: rows of N values (Fig. 4), or rows of conditioning ranges at one N (Fig. 5)."""
    size, total = model.image_size, model.diffusion.num_train_timesteps
    img = reference_image(image)
    if mode not in GENERATION_MODES:
        raise ValueError(f"mode must be one of: {', '.join(GENERATION_MODES)}; got {mode!r}")
    if mode == GENERATION_MODES[0]:
        rows = rows_for_factors(validate.n_factors(factors, size, MAX_ROWS))
        stop = validate.stop_step(stop_at, total, from_text=True)
        for row in rows:
            row.stop_at = stop
    else:
        rows = rows_for_stops(validate.n_factor(range_n, size, from_text=True),
                              validate.stop_steps(stops, total, MAX_ROWS), total)
    steps, seeds = run_settings(model, samples, steps, kernel, sampler, seed)
    ref, shown = _reference(img, model)
    return Job("generation", ref, rows, seeds, kernel, steps, sampler, reference_row=[("reference", shown)])


def translation_job(model: DiffusionModel, image: Any, n: Any, samples: Any, steps: Any, stop_at: Any,
                    kernel: str, sampler: str, seed: Any, task: str = "translation") -> Job:
    """One reference, one N, several samples: the model's own domain with the reference's layout and colours."""
    img = reference_image(image)
    n = validate.n_factor(n, model.image_size, from_text=True)
    row = Row(label=f"N={n}", n_factor=n,
              stop_at=validate.stop_step(stop_at, model.diffusion.num_train_timesteps, from_text=True))
    steps, seeds = run_settings(model, samples, steps, kernel, sampler, seed)
    ref, shown = _reference(img, model)
    return Job(task, ref, [row], seeds, kernel, steps, sampler, reference_row=[("reference", shown)])


def ddib_job(model: DiffusionModel, source: DiffusionModel, image: Any, samples: Any, steps: Any, kernel: str,
             sampler: str, seed: Any) -> tuple[Job, list[str]]:
    """Domain translation by DDIB: the reference DDIM-inverted through `source`, then DDIM-sampled through
    `model`. Deterministic, so one image whatever the sample count; N, the stop step, the filter, the
    sampler and the seed do not apply. Returns the job and warnings for the user."""
    img = reference_image(image)
    check_unconditional(source)
    check_pair(source, model)
    steps, seeds = run_settings(model, samples, steps, kernel, sampler, seed)
    warnings = [f"DDIB is deterministic: one image instead of {len(seeds)} (a second would be the same picture)."
                ] if len(seeds) > 1 else []
    ref, shown = _reference(img, model)
    row = Row(label=f"DDIB from {source.name}", n_factor=None)
    return Job("translation", ref, [row], [0], kernel, steps, "ddim", reference_row=[("reference", shown)],
               source=source), warnings


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
    size, total = model.image_size, model.diffusion.num_train_timesteps
    img = scribble_reference(editor)
    n = validate.n_factor(n, size, from_text=True)
    stop = validate.stop_step(stop_at, total, from_text=True)
    steps, seeds = run_settings(model, samples, steps, kernel, sampler, seed)
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
    row = Row(label=f"N={n}, {total}->{stop}", n_factor=n, stop_at=stop)
    return Job("scribble", ref, [row], seeds, kernel, steps, sampler, mask=use_mask,
               keep_outside=use_mask is not None, reference_row=reference_row), warnings
