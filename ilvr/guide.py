"""What guides an ILVR run: the reference y, phi_N, the steps it conditions and an optional mask,
checked and placed on the model's device once, before the loop (``ilvr.sampler``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from . import validate
from .runtime.cuda_graphs import gpu_work
from .filters import LowPass
from .schedule import Schedule


def conditioned_steps(timestep_map: Sequence[int], stop_at: int) -> list[bool]:
    """For each respaced index i: is the transition from training step t = timestep_map[i] + 1 refined?

    stop_at is on the training scale (num_train_timesteps, 1000 for nearly every model): refine while
    t > stop_at (0 = every step, num_train_timesteps = none).
    """
    return [int(t) + 1 > stop_at for t in timestep_map]


@dataclass
class Guide:
    """The reference side of Algorithm 1 for one run, on the model's device."""

    y: torch.Tensor  # (B, C, H, W) in [-1, 1]
    lowpass: LowPass  # phi_N
    conditioned: list[bool]  # per respaced index i, whether step i is refined (the conditioning range)
    alphas_cumprod_prev: Sequence[float]  # abar_{t-1} per respaced index (1.0 at i = 0: the clean y)
    mask: torch.Tensor | None = None  # (1 or B, 1, H, W): ILVR acts where it is 1
    keep_outside: bool = False  # outside the mask, pin x to the noised reference

    def noised_reference(self, i: int, eps: torch.Tensor) -> torch.Tensor:
        """y_{t-1} ~ q(y_{t-1} | y): the reference at x_{t-1}'s noise level."""
        abar_prev = float(self.alphas_cumprod_prev[i])
        return math.sqrt(abar_prev) * self.y + math.sqrt(1 - abar_prev) * eps

    def inside(self, correction: torch.Tensor) -> torch.Tensor:
        """The correction where the mask allows it (everywhere without a mask)."""
        return correction if self.mask is None else self.mask * correction

    def outside(self, x: torch.Tensor, y_prev: torch.Tensor) -> torch.Tensor:
        """With keep_outside: the noised reference outside the mask, so it comes back unchanged at the end."""
        return self.mask * x + (1 - self.mask) * y_prev if self.keep_outside else x


def make_guide(reference: torch.Tensor, schedule: Schedule, *, image_size: int, channels: int, batch: int,
               n_factor: int, kernel: str, stop_at: int, mask: torch.Tensor | None, keep_outside: bool,
               device: torch.device) -> Guide:
    """Check the reference and mask (shapes, ranges, types) and build the run's Guide."""
    n_factor = validate.n_factor(n_factor, image_size)
    with gpu_work(device):  # the caller's tensor may already be on the GPU
        y = checked_tensor(reference, "reference", "a float tensor in [-1, 1] (ilvr.load_reference makes one)")
        lo, hi = y.min().item(), y.max().item()
    if lo < -1.001 or hi > 1.001:  # quantisation and resampling may overshoot a hair
        raise ValueError(f"reference values must be in [-1, 1], got {lo:.3g}..{hi:.3g} "
                         "(ilvr.load_reference maps an image to that range)")
    if y.dim() == 3:
        y = y[None]
    if y.dim() != 4:
        raise ValueError(f"reference must be (C, H, W) or (B, C, H, W), got {y.dim()} dimensions {tuple(y.shape)}")
    if y.shape[1:] != (channels, image_size, image_size):
        raise ValueError(f"reference must be {channels}x{image_size}x{image_size} for this model, got {tuple(y.shape[1:])}")
    if y.shape[0] not in (1, batch):
        raise ValueError(f"got {y.shape[0]} references for {batch} samples")
    with gpu_work(device):
        y = y.expand(batch, -1, -1, -1).to(device)
        lowpass = LowPass(image_size, image_size, n_factor, kernel, device=device)
    if mask is not None:
        mask = checked_mask(mask, image_size, batch, device)
    return Guide(y=y, lowpass=lowpass, conditioned=conditioned_steps(schedule.timestep_map, int(stop_at)),
                 alphas_cumprod_prev=schedule.alphas_cumprod_prev, mask=mask, keep_outside=keep_outside)


def checked_mask(mask: torch.Tensor, size: int, batch: int, device: torch.device) -> torch.Tensor:
    with gpu_work(device):
        mask = checked_tensor(mask, "mask", "a tensor in [0, 1] (1 where ILVR acts)")
        lo, hi = mask.min().item(), mask.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(f"mask values must be in [0, 1] (1 where ILVR acts), got {lo:.3g}..{hi:.3g}; "
                         "divide a 0..255 mask by 255")
    if mask.dim() > 4:
        raise ValueError(f"mask must be (H, W), (1, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    while mask.dim() < 4:
        mask = mask[None]
    if mask.shape[-2:] != (size, size):
        raise ValueError(f"mask must be {size}x{size}, got {tuple(mask.shape[-2:])}")
    if mask.shape[1] != 1 or mask.shape[0] not in (1, batch):
        raise ValueError(f"mask must be (H, W), (1, H, W) or (B, 1, H, W) with B = {batch} samples, "
                         f"got {tuple(mask.shape)}")
    with gpu_work(device):
        return mask.to(device)


def checked_tensor(value, what: str, expected: str) -> torch.Tensor:
    """A finite float tensor, or a clear error for an image, an array or an integer tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be {expected}, got {type(value).__name__}")
    if not (value.is_floating_point() or value.dtype == torch.bool):
        raise TypeError(f"{what} must be {expected}, got a {str(value.dtype).replace('torch.', '')} tensor")
    value = value.float()
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} holds NaN or infinite values")
    return value
