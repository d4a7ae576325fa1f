"""The paper's Algorithm 1, written plainly: the yardstick for ``ilvr.sampler.sample``.

    x_T ~ N(0, I)
    for t = T, ..., 1:
        z ~ N(0, I)
        x'_{t-1} ~ p(x'_{t-1} | x_t)                    (the unconditional DDPM step)
        y_{t-1} ~ q(y_{t-1} | y)                        (the reference, noised to x_{t-1}'s level)
        x_{t-1} = phi_N(y_{t-1}) + x'_{t-1} - phi_N(x'_{t-1})
    return x_0

As the official implementation (jychoi118/ilvr_adm) runs it: an fp32 network called directly,
torch.no_grad, and phi_N = up(down(.)) from resize-right applied twice per step, to x' and to the
noised reference apart. It shares the sampler's noise (one CPU generator per seed: x_T, then z and eps
each step), maths (``ilvr.schedule.predict_step``) and conventions (the last step conditioned on the
clean y, the stop step on the training scale), so both give the same samples to float tolerance. The
benchmark times it against the sampler; the tests compare the two.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .filters import resize_right_lowpass
from .guide import conditioned_steps
from .model import DiffusionModel
from .schedule import predict_step


def algorithm1(model: DiffusionModel, reference: torch.Tensor, *, seeds: Sequence[int], n_factor: int = 4,
               kernel: str = "cubic", steps: str | int = "250", stop_at: int = 0,
               on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """ILVR samples (B, C, H, W), float32, for a reference (C, H, W) or (B, C, H, W) in [-1, 1].
    on_step() is called after every step (the benchmark's per-step clock)."""
    device = model.device
    schedule = model.schedule.respace(steps)
    batch = len(seeds)
    shape = (model.config.in_channels, model.image_size, model.image_size)
    y = reference.float()
    if y.dim() == 3:
        y = y[None]
    y = y.expand(batch, -1, -1, -1).to(device)
    conditioned = conditioned_steps(schedule.timestep_map, int(stop_at))
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def randn() -> torch.Tensor:  # one slice per sample from its own CPU generator
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)

    def phi(v: torch.Tensor) -> torch.Tensor:
        return resize_right_lowpass(v, n_factor, kernel)

    x = randn()
    with torch.no_grad():
        for i in reversed(range(schedule.num_steps)):
            t = torch.full((batch,), int(schedule.timestep_map[i]), device=device, dtype=torch.long)
            out = predict_step(schedule, model.diffusion, model.unet(x, t).float(), x, i)
            z = randn()
            eps = randn()
            x = out.mean + (torch.exp(0.5 * out.log_variance) * z if i > 0 else 0.0)  # x'_{t-1}
            if conditioned[i]:
                abar_prev = float(schedule.alphas_cumprod_prev[i])
                y_prev = math.sqrt(abar_prev) * y + math.sqrt(1 - abar_prev) * eps  # y_{t-1}
                x = phi(y_prev) + x - phi(x)
            if on_step is not None:
                on_step()
    return x
