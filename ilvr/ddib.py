"""DDIB, Dual Diffusion Implicit Bridges (Su et al., ICLR 2023): image-to-image translation with two
unconditional models, as the second method next to ILVR.

The reference is encoded by the *source* model's deterministic DDIM ODE (eta = 0) run forwards, from the
clean image to x_T ("inversion"), and x_T is decoded by the *target* model's DDIM ODE run backwards.
Nothing is random: the same reference, models and steps give the same image every time, so there are no
seeds to pass (a second sample of one reference would be the same picture). What DDIB keeps of the
reference is whatever survives in x_T (mostly colours and coarse layout), with no knob such as ILVR's N
to say how much; ILVR (``ilvr.sampler.sample``) is the method with that control.

Inversion, step i (respaced index, abar_i = ``schedule.alphas_cumprod[i]``, abar_{-1} = 1): the network
sees x_{i-1} labelled as timestep t_i (the usual DDIM-inversion approximation, as in DDIB's code) and

    x_i = sqrt(abar_i) * (x_{i-1} - sqrt(1 - abar_{i-1}) eps) / sqrt(abar_{i-1}) + sqrt(1 - abar_i) eps,

the exact inverse of the eta = 0 update ``ilvr.schedule.ddim_step`` makes with the same eps, so the
only error of inversion followed by sampling with one model is eps changing between neighbouring steps.
x0 is never clipped in either direction by default: clipping leaves the ODE that inversion followed.
Measured on the bundled emoji64 with examples/noto_fox.png at 250 steps, the round trip through one
model comes back at 31.4 dB PSNR unclipped and at 17.1 dB when the sampling pass clips x0 to [-1, 1]
(the fox changes visibly). DDIB's own scripts clip the decoding (``clip_denoised=True``); pass
``clip=True`` for that. DDIB's code (guided-diffusion's ``ddim_reverse_sample``) also reads x_{i-1} as
if at level abar_i and ends at abar = 0; the form above starts from x0 exactly and ends at abar_{S-1},
where sampling starts.
"""
from __future__ import annotations

import math
import time

import torch

from .model import DiffusionModel
from .runtime.cuda_graphs import gpu_work
from .sampler import ProgressFn, StepInfo, check_unconditional, settings_dict
from .schedule import Schedule, ddim_step, predict_step

__all__ = ["check_pair", "ddib_translate", "ddim_invert", "ddim_decode", "result_settings", "settings_extra"]


def _checked_images(model: DiffusionModel, x: torch.Tensor, what: str, value_range: float | None) -> torch.Tensor:
    """(C, H, W) or (B, C, H, W) floats of the model's size and channels, as (B, C, H, W) on its device."""
    from .guide import checked_tensor  # the same type and finiteness checks as ILVR's reference

    with gpu_work(model.device):
        x = checked_tensor(x, what, "a float tensor (C, H, W) or (B, C, H, W)")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    want = (model.config.in_channels, model.image_size, model.image_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != want or x.shape[0] < 1:
        raise ValueError(f"{what} must be (C, H, W) or (B, C, H, W) with (C, H, W) = {want} for {model.name}, "
                         f"got {tuple(x.shape)}")
    if value_range is not None:
        with gpu_work(model.device):
            lo, hi = x.min().item(), x.max().item()
        if lo < -value_range - 1e-3 or hi > value_range + 1e-3:
            raise ValueError(f"{what} values must be in [-1, 1], got {lo:.3g}..{hi:.3g} "
                             "(ilvr.load_reference makes one)")
    with gpu_work(model.device):
        return x.to(model.device)


def _schedule(model: DiffusionModel, steps: str | int) -> Schedule:
    check_unconditional(model)
    return model.schedule.respace(steps)  # a readable ValueError for a bad spec


def ddim_invert(model: DiffusionModel, x0: torch.Tensor, steps: str | int = "250", *,
                progress: ProgressFn | None = None, _offset: int = 0, _total: int | None = None) -> torch.Tensor:
    """x_T of the clean images x0 ((C, H, W) or (B, C, H, W) in [-1, 1]) under `model`'s deterministic
    DDIM ODE with `steps` respaced steps; x0 is not clipped on the way. Returns float32 (B, C, H, W)."""
    schedule = _schedule(model, steps)
    x = _checked_images(model, x0, "x0", 1.0)
    abar = schedule.alphas_cumprod
    total = _total or schedule.num_steps
    start = time.time()
    with model.sampling_run(range(x.shape[0])) as run:  # no noise is drawn: the seeds only size the batch
        for i in range(schedule.num_steps):
            model_output = run.denoise(x, schedule.timestep_map[i])
            with run.gpu():
                out = predict_step(schedule, model.diffusion, model_output, x, i, clip=False)
                eps = out.pred_eps
                abar_from = 1.0 if i == 0 else float(abar[i - 1])
                x0_hat = (x - math.sqrt(1 - abar_from) * eps) / math.sqrt(abar_from)
                x = math.sqrt(float(abar[i])) * x0_hat + math.sqrt(1 - float(abar[i])) * eps
            if progress is not None:
                progress(StepInfo(index=_offset + i + 1, total=total, timestep=int(schedule.timestep_map[i]),
                                  pred_x0=x0_hat, elapsed_s=time.time() - start))
    return run.output(x)


def ddim_decode(model: DiffusionModel, x_T: torch.Tensor, steps: str | int = "250", *, clip: bool | None = False,
                progress: ProgressFn | None = None, _offset: int = 0, _total: int | None = None) -> torch.Tensor:
    """Deterministic DDIM sampling (eta = 0) from a given x_T ((C, H, W) or (B, C, H, W)), the inverse of
    ``ddim_invert``. clip: clip the x0 prediction to [-1, 1] at every step (default off, the ODE that
    ``ddim_invert`` followed; None: as the model samples, ``model.diffusion.clip_sample``). Returns float32
    (B, C, H, W), not clipped."""
    schedule = _schedule(model, steps)
    x = _checked_images(model, x_T, "x_T", None)
    total = _total or schedule.num_steps
    start = time.time()
    with model.sampling_run(range(x.shape[0])) as run:
        for i in reversed(range(schedule.num_steps)):
            model_output = run.denoise(x, schedule.timestep_map[i])
            with run.gpu():
                out = predict_step(schedule, model.diffusion, model_output, x, i, clip=clip)
                x = ddim_step(schedule, out, i, 0.0, None)
            if progress is not None:
                progress(StepInfo(index=_offset + schedule.num_steps - i, total=total,
                                  timestep=int(schedule.timestep_map[i]), pred_x0=out.pred_x0,
                                  elapsed_s=time.time() - start))
    return run.output(x)


def check_pair(source_model: DiffusionModel, target_model: DiffusionModel) -> None:
    """Refuse two models DDIB cannot bridge: x_T must have one shape for both (image size, channels)."""
    if (source_model.image_size, source_model.config.in_channels) != (target_model.image_size,
                                                                       target_model.config.in_channels):
        raise ValueError(f"DDIB needs two models of one image size and channel count: {source_model.name} is "
                         f"{source_model.image_size} px with {source_model.config.in_channels} channel(s), "
                         f"{target_model.name} {target_model.image_size} px with "
                         f"{target_model.config.in_channels}; pick a source model of {target_model.image_size} px")


def ddib_translate(source_model: DiffusionModel, target_model: DiffusionModel, reference: torch.Tensor, *,
                   steps: str | int = "250", clip: bool | None = False,
                   progress: ProgressFn | None = None) -> torch.Tensor:
    """Translate `reference` ((C, H, W) or (B, C, H, W) in [-1, 1], the source model's size and channels)
    from the source model's domain into the target model's: DDIM inversion through `source_model`, then
    DDIM sampling through `target_model`, both deterministic with `steps` respaced steps.

    Deterministic: there are no seeds, one output per reference. The two models must share image size
    and channels (their schedules may differ: x_T is close to N(0, I) for both). clip: as in
    ``ddim_decode`` (off by default; DDIB's scripts clip the decoding). `progress` sees the
    inversion's steps, then the sampling's (``StepInfo.index`` runs from 1 to twice the steps).
    Returns float32 (B, C, H, W) on the target model's device, not clipped.
    """
    check_pair(source_model, target_model)
    _schedule(target_model, steps)  # every argument checked before the first step
    n_source = _schedule(source_model, steps).num_steps
    n_target = target_model.schedule.respace(steps).num_steps
    total = n_source + n_target
    x_T = ddim_invert(source_model, reference, steps, progress=progress, _total=total)
    with gpu_work(target_model.device):
        x_T = x_T.to(target_model.device)
    return ddim_decode(target_model, x_T, steps, clip=clip, progress=progress, _offset=n_source, _total=total)


def settings_extra(source_model: DiffusionModel, clip: bool | None = False) -> dict:
    """What a DDIB result's PNG records next to ``ilvr.sampler.settings_dict``'s fields (the target model
    is settings_dict's model): the method, the source model and the weights that encoded the reference."""
    d = {"method": "ddib", "source_model": source_model.name, "eta": 0.0, "clip": clip}
    if source_model.weights_digest:
        d["source_weights_sha256"] = source_model.weights_digest
    if source_model.info.get("options"):
        d["source_model_options"] = source_model.info["options"]
    return d


def result_settings(source_model: DiffusionModel, target_model: DiffusionModel, steps: str | int, *,
                    clip: bool | None = False, **extra) -> dict:
    """A DDIB result's settings for its PNG: ``settings_dict``'s fields without ILVR's (N, filter, stop
    step, seed: DDIB has none of them), the sampler (DDIM), ``settings_extra`` and `extra`."""
    d = settings_dict(target_model, n_factor=None, kernel="", steps=steps, stop_at=0, sampler="ddim", seed=0,
                      **settings_extra(source_model, clip), **extra)
    for key in ("N", "filter", "stop_at", "seed"):
        d.pop(key)
    return d
