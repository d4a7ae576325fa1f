"""ILVR sampling (Choi et al., ICCV 2021, Algorithm 1) on a respaced DDPM, plus a DDIM option.

At every reverse step the unconditional proposal x' keeps its high frequencies and takes the low
frequencies of the reference noised to the *same* level:

    x_{t-1} = phi_N(y_{t-1}) + x' - phi_N(x') = x' + phi_N(y_{t-1} - x')      (phi_N is linear)

so phi_N runs once per step. Where this differs from the official code (jychoi118/ilvr_adm):
  * the official code noises y to x_t's level (q_sample(y, t)) while correcting x_{t-1}; we follow
    the paper and noise it to x_{t-1}'s level (the maintainer agreed in their issue 13);
  * the official code never conditions the last step (i = 0); we do, with the clean y (abar_prev = 1),
    as Algorithm 1 does at t = 1, so N=1 returns the reference exactly;
  * the conditioning range is given on the 1000-step training scale, as the paper writes it (Fig. 5:
    1000 -> 125, 1000 -> 250, ...; Sec. 4.4's scribbles: 1000 -> 200), not in respaced steps, so it means
    the same whatever the number of steps. The official ``--range_t R`` with respaced steps S is our
    stop step timestep_map[R] + 1 (203 for S = 100, R = 20).
The loop below is the paper's; the checks live in ``_prepare`` and ``ilvr.guide``, the hardware in
``ilvr.runtime``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import validate
from .guide import conditioned_steps, make_guide
from .model import DiffusionModel
from .schedule import ddim_step, predict_step

SAMPLERS = validate.SAMPLERS
__all__ = ["Cancelled", "StepInfo", "check_unconditional", "conditioned_steps", "sample", "settings_dict"]


@dataclass
class StepInfo:
    """Handed to the progress callback after every step."""

    index: int  # steps done so far (1..total)
    total: int
    timestep: int  # training-scale timestep just denoised
    pred_x0: torch.Tensor  # (B, C, H, W) current prediction of the clean image, float32
    elapsed_s: float


ProgressFn = Callable[[StepInfo], None]


class Cancelled(RuntimeError):
    """Raised from a progress callback to stop sampling early."""


def sample(
    model: DiffusionModel,
    reference: torch.Tensor | None,
    *,
    seeds: Sequence[int],
    n_factor: int = 4,
    kernel: str = "cubic",
    steps: str | int = "250",
    stop_at: int = 0,
    sampler: str = "ddpm",
    eta: float = 0.0,
    mask: torch.Tensor | None = None,
    keep_outside: bool = False,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Draw len(seeds) samples guided by `reference` (None = unconditional).

    reference: (C, H, W) shared by all samples, or (B, C, H, W) one per sample, a float tensor in
      [-1, 1] with C the model's channels (``ilvr.load_reference(path, size, channels)`` makes one).
    seeds: one integer per sample (0 <= seed < 2**63); a seed gives the same image in any batch.
    n_factor: N of phi_N, a divisor of the image size; larger N keeps less of the reference.
    steps: respaced steps (250, 'ddim50', '100,50'); stop_at: condition only while t > stop_at, on the
      model's training scale (0 = every step; the paper's scribble setting 1000 -> 200 is stop_at=200).
    mask: (H, W), (1, H, W), (1, 1, H, W) or (B, 1, H, W) in [0, 1]; ILVR acts only where it is 1.
      With keep_outside, the rest is pinned to the reference noised to each level (so it comes back
      unchanged at the end), for local edits such as scribbles. Values between 0 and 1 blend; with
      keep_outside a blend of two independently noised images is slightly less noisy than its level
      (half the variance at 0.5), so keep feathered edges narrow.
    eta: DDIM's noise scale (0 = deterministic DDIM, 1 = DDPM-like), for sampler="ddim".
    Returns float32 samples (B, C, H, W) on the model's device, not clipped, so callers can measure
    before quantising; an ordinary tensor (not an inference-mode one), free to modify.
    """
    schedule, guide = _prepare(model, reference, seeds, n_factor, kernel, steps, stop_at, sampler, eta, mask,
                               keep_outside, progress)
    start = time.time()
    with model.sampling_run(seeds) as run:
        x = run.noise()  # x_T ~ N(0, I)
        for i in reversed(range(schedule.num_steps)):  # i: respaced index of the step t -> t-1
            model_output = run.denoise(x, schedule.timestep_map[i])
            z = run.noise()
            eps = run.noise() if guide is not None else None
            with run.gpu():
                out = predict_step(schedule, model.diffusion, model_output, x, i)
                if sampler == "ddim":
                    x = ddim_step(schedule, out, i, eta, z)
                else:  # x'_{t-1} ~ p(x_{t-1} | x_t)
                    x = out.mean + (torch.exp(0.5 * out.log_variance) * z if i > 0 else 0.0)
                if guide is not None:
                    y_prev = guide.noised_reference(i, eps)  # y_{t-1} ~ q(y_{t-1} | y)
                    if guide.conditioned[i]:  # x_{t-1} = phi_N(y_{t-1}) + x' - phi_N(x'), phi_N being linear
                        x = x + guide.inside(guide.lowpass(y_prev - x))
                    x = guide.outside(x, y_prev)
            if progress is not None:
                progress(StepInfo(index=schedule.num_steps - i, total=schedule.num_steps,
                                  timestep=int(schedule.timestep_map[i]), pred_x0=out.pred_x0,
                                  elapsed_s=time.time() - start))
    return run.output(x)


def _prepare(model, reference, seeds, n_factor, kernel, steps, stop_at, sampler, eta, mask, keep_outside, progress):
    """Every argument checked before any work: the respaced schedule and the run's Guide (None without
    a reference)."""
    validate.sampler(sampler)
    seeds = validate.seeds(seeds)
    validate.eta(eta)
    if keep_outside and mask is None:
        raise ValueError("keep_outside needs a mask (it keeps the reference outside the mask)")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a function of one StepInfo, got {type(progress).__name__}")
    check_unconditional(model)
    validate.kernel(kernel)
    schedule = model.schedule.respace(steps)
    stop_at = validate.stop_step(stop_at, model.diffusion.num_train_timesteps, from_text=True)
    if reference is None:
        if mask is not None:
            raise ValueError("a mask needs a reference")
        return schedule, None
    guide = make_guide(reference, schedule, image_size=model.image_size, channels=model.config.in_channels,
                       batch=len(seeds), n_factor=n_factor, kernel=kernel, stop_at=stop_at, mask=mask,
                       keep_outside=keep_outside, device=model.device)
    return schedule, guide


def settings_dict(model: DiffusionModel, *, n_factor: int | None, kernel: str, steps: str | int, stop_at: int,
                  sampler: str, seed: int, **extra) -> dict:
    """The settings to show next to a result and to embed in its PNG."""
    d = {"model": model.name, "N": n_factor, "filter": kernel, "steps": str(steps), "stop_at": int(stop_at),
         "sampler": sampler, "seed": int(seed), "image_size": model.image_size}
    if model.weights_digest:  # the model's name may later mean other weights: the digest names these
        d["weights_sha256"] = model.weights_digest
    if model.info.get("options"):  # load options (e.g. beta_schedule) are part of what made the image
        d["model_options"] = model.info["options"]
    d.update(extra)
    return d


def check_unconditional(model: DiffusionModel) -> None:
    """Class-conditional checkpoints load (``ilvr info`` describes them) but need a class label per sample."""
    if model.config.num_classes is not None:
        raise ValueError(f"{model.name} is a class-conditional model ({model.config.num_classes} classes): ILVR "
                         "samples unconditional models; use its unconditional variant (for guided-diffusion's "
                         "ImageNet 256 px: 256x256_diffusion_uncond.pt)")
