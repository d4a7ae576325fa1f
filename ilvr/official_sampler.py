"""Driving the official ILVR sampler (jychoi118/ilvr_adm, ``scripts/ilvr_sample.py``) for the whole-run
benchmark: the guided-diffusion flags that build a given architecture, and its command and environment.

The checkout is the user's (``git clone https://github.com/jychoi118/ilvr_adm``, commit 9b84f26, or an
exported tree of it); it needs torch, blobfile and pillow, and torchvision where a build exists for the
installed torch. ``benchmarks/ilvr_adm_shim`` stands in for mpi4py (one process; process-group setup
only) and, where torchvision is not installed, for the one torchvision call the script makes
(``save_image`` of one image), and starts the script unchanged.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from importlib.machinery import PathFinder
from pathlib import Path

from .network import UNetConfig
from .registry import CHECKPOINTS_DIR
from .schedule import DiffusionConfig

SHIM_DIR = CHECKPOINTS_DIR.parent / "benchmarks" / "ilvr_adm_shim"
ADM_DEFAULTS = {"downsample_padding": "symmetric", "norm_eps": 1e-5, "norm_groups": 32, "flip_sin_to_cos": True,
                "freq_shift": 0.0, "num_classes": None}  # what guided-diffusion's UNetModel always has


def official_flags(unet: UNetConfig, diffusion: DiffusionConfig) -> tuple[list[str], list[str]]:
    """guided-diffusion's flags for this architecture and schedule, and notes on what the official
    sampler runs differently (same work per step, other maths). Raises ValueError for a model it cannot
    build at all."""
    problems = [f"{key}={getattr(unet, key)!r}" for key, value in ADM_DEFAULTS.items() if getattr(unet, key) != value]
    if unet.in_channels != 3:
        problems.append(f"in_channels={unet.in_channels}")
    if any(float(m) != int(m) for m in unet.channel_mult):
        problems.append(f"channel_mult={unet.channel_mult}")
    if diffusion.prediction_type != "epsilon":
        problems.append(f"prediction_type={diffusion.prediction_type!r}")
    learned = diffusion.variance_type == "learned_range"
    if learned != (unet.out_channels == 2 * unet.in_channels):
        problems.append(f"variance_type={diffusion.variance_type!r} with {unet.out_channels} output channels")
    if diffusion.beta_schedule == "linear" and (diffusion.beta_start, diffusion.beta_end) != (1e-4, 0.02):
        problems.append(f"linear betas from {diffusion.beta_start} to {diffusion.beta_end}")
    if problems:
        raise ValueError("the official sampler cannot build this model: " + ", ".join(problems))
    notes = []
    if diffusion.variance_type == "fixed_small":
        notes.append("the official sampler has no --sigma_small flag: it samples this fixed_small model with "
                     "fixed_large variances (the same work per step, other samples)")
    flags = {"image_size": unet.image_size, "num_channels": unet.model_channels, "num_res_blocks": unet.num_res_blocks,
             "channel_mult": ",".join(str(int(m)) for m in unet.channel_mult),
             "attention_resolutions": ",".join(str(unet.image_size // 2 ** level) for level in unet.attention_levels),
             "num_head_channels": unet.num_head_channels, "num_heads": unet.num_heads,
             "resblock_updown": unet.resblock_updown, "use_scale_shift_norm": unet.use_scale_shift_norm,
             "learn_sigma": learned, "noise_schedule": diffusion.beta_schedule,
             "diffusion_steps": diffusion.num_train_timesteps, "class_cond": False, "dropout": 0.0, "use_fp16": False}
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))], notes


def official_command(checkout: Path, flags: list[str], *, weights: Path, references: Path, n_factor: int, steps: str,
                     batch: int, out: Path) -> list[str]:
    """One ILVR batch of `batch` samples (one per reference image; `references` must hold at least
    `batch` of them, as its data loader drops a short last batch), conditioned at every step."""
    return [sys.executable, str(SHIM_DIR / "run_ilvr_sample.py"), str(checkout), *flags,
            "--timestep_respacing", str(steps), "--model_path", str(weights), "--base_samples", str(references),
            "--down_N", str(n_factor), "--range_t", "0", "--save_dir", str(out),
            "--batch_size", str(batch), "--num_samples", str(batch)]


def official_environment(checkout: Path, base: dict[str, str]) -> dict[str, str]:
    """`base` with the mpi4py stand-in and the checkout (guided_diffusion, resizer.py) on PYTHONPATH."""
    paths = [str(SHIM_DIR), str(checkout), *filter(None, [base.get("PYTHONPATH")])]
    return {**base, "PYTHONPATH": os.pathsep.join(paths)}


def saving_notes(checkout: Path) -> list[str]:
    """A note when the official sampler's process will find no torchvision (it shares this process's
    environment, with the shim and the checkout first on its path) and saves with the shim's stand-in."""
    if importlib.util.find_spec("torchvision") or PathFinder.find_spec("torchvision", [str(SHIM_DIR), str(checkout)]):
        return []
    return ["the official sampler saved its PNGs with the shim's stand-in save_image (no torchvision installed)"]


def check_checkout(checkout: Path) -> None:
    for needed in ("scripts/ilvr_sample.py", "guided_diffusion/gaussian_diffusion.py", "resizer.py"):
        if not (checkout / needed).is_file():
            raise ValueError(f"--official {checkout}: no {needed}; give a checkout of "
                             "https://github.com/jychoi118/ilvr_adm")
