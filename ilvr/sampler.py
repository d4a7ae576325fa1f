"""ILVR sampling (Choi et al., ICCV 2021, Algorithm 1) on a respaced DDPM, plus a DDIM option.

At every reverse step the unconditional proposal x' keeps its high frequencies and takes the low
frequencies of the reference noised to the *same* level:

    x_{t-1} = phi_N(y_{t-1}) + x' - phi_N(x') = x' + phi_N(y_{t-1} - x')      (phi_N is linear)

so phi_N runs once per step. Where this differs from the official code (jychoi118/ilvr_adm):
  * the official code noises y to x_t's level (q_sample(y, t)) while correcting x_{t-1}; we follow
    the paper and noise it to x_{t-1}'s level (the maintainer agreed in their issue 13);
  * the official code never conditions the last step (i = 0); we do, with the clean y (abar_prev = 1),
    so N=1 returns the reference exactly, as the paper's Table 2 implies;
  * the conditioning range is given on the 1000-step training scale (paper Fig. 5 "1000 -> 200"),
    not in respaced steps, so it means the same whatever the number of steps.
"""
from __future__ import annotations

import math
import operator
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .cuda_graphs import gpu_work
from .filters import LowPass, check_factor, check_kernel
from .model import DiffusionModel
from .onnx_cpu import torch_ops_single_threaded
from .schedule import ddim_step, parse_steps, predict_step

SAMPLERS = ("ddpm", "ddim")


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


def _noise(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One slice of noise per sample, each from its own generator, drawn on the CPU.

    Drawing on the CPU makes a seed give the same image on any device and in any batch. For a GPU the
    noise goes through pinned memory with an asynchronous copy, so the host never waits for the GPU
    (PyTorch's pinned-memory cache keeps the buffer until the copy is done).
    """
    return _to_device(_draw(generators, shape, pinned=device.type == "cuda"), device)


def _draw(generators: Sequence[torch.Generator], shape: tuple[int, ...], pinned: bool,
          fanout: ThreadPoolExecutor | None = None) -> torch.Tensor:
    """One draw for every sample; with `fanout`, the samples' generators run in parallel threads."""
    if pinned:
        with gpu_work(torch.device("cuda")):  # a pinned allocation may synchronise the GPU: not during a capture
            noise = torch.empty((len(generators), *shape), pin_memory=True)
    else:
        noise = torch.empty((len(generators), *shape))

    def one(k: int) -> None:
        torch.randn(shape, generator=generators[k], out=noise[k])

    if fanout is None:
        for k in range(len(generators)):
            one(k)
    else:
        list(fanout.map(one, range(len(generators))))
    return noise


def _to_device(noise: torch.Tensor, device: torch.device) -> torch.Tensor:
    with gpu_work(device):
        return noise.to(device, non_blocking=noise.is_pinned())


class NoiseSource:
    """The run's successive noise draws (x_T, then z and eps per step), as ``_noise`` makes them.

    On a GPU a worker thread draws the next ones while the GPU runs the current step, with the samples'
    generators spread over a few more threads: a 256 px draw takes the CPU about 1.3 ms per sample, so
    a step's two draws for a batch of 8 (about 20 ms on one thread) would be as long as the whole
    compiled UNet step on an H100. Draws are made in order, one at a time, so every sample's sequence
    is the same as when drawn inline.
    """

    AHEAD = 2
    MAX_FANOUT = 4

    def __init__(self, generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device):
        self.generators, self.shape, self.device = list(generators), tuple(shape), device
        self.pool = self.fanout = None
        if device.type == "cuda":
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ilvr-noise")
            workers = min(len(self.generators), self.MAX_FANOUT, os.cpu_count() or 1)
            if workers > 1:
                self.fanout = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ilvr-noise-sample")
        self.pending: deque[Future] = deque()

    def __call__(self) -> torch.Tensor:
        if self.pool is None:
            return _noise(self.generators, self.shape, self.device)
        while len(self.pending) <= self.AHEAD:
            self.pending.append(self.pool.submit(_draw, self.generators, self.shape, True, self.fanout))
        return _to_device(self.pending.popleft().result(), self.device)

    def close(self) -> None:
        for pool in (self.pool, self.fanout):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)


def conditioned_steps(timestep_map: Sequence[int], stop_at: int) -> list[bool]:
    """For each respaced index i: is the transition from training step t = timestep_map[i] + 1 refined?

    stop_at is on the training scale (num_train_timesteps, 1000 for nearly every model): refine while
    t > stop_at (0 = every step, num_train_timesteps = none).
    """
    return [int(t) + 1 > stop_at for t in timestep_map]


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
    mask: (H, W), (1, H, W), (1, 1, H, W) or (B, 1, H, W) in [0, 1]; ILVR acts only where it is 1.
      With keep_outside, the rest is pinned to the reference noised to each level (so it comes back
      unchanged at the end), for local edits such as scribbles. Values between 0 and 1 blend; with
      keep_outside a blend of two independently noised images is slightly less noisy than its level
      (half the variance at 0.5), so keep feathered edges narrow.
    eta: DDIM's noise scale (0 = deterministic DDIM, 1 = DDPM-like), for sampler="ddim".
    Returns float32 samples (B, C, H, W) on the model's device, not clipped, so callers can measure
    before quantising; an ordinary tensor (not an inference-mode one), free to modify.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    seeds = check_seeds(seeds)
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be between 0 and 1, got {eta}")
    if keep_outside and mask is None:
        raise ValueError("keep_outside needs a mask (it keeps the reference outside the mask)")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a function of one StepInfo, got {type(progress).__name__}")
    check_unconditional(model)
    device = model.device
    size = model.image_size
    channels = model.config.in_channels
    check_kernel(kernel)
    schedule = model.schedule.respace(steps)
    total = schedule.num_steps
    validate_stop_at(model, stop_at)
    batch = len(seeds)

    y = None
    if reference is not None:
        n_factor = _whole(n_factor, "N")
        check_factor(size, n_factor)
        with gpu_work(device):  # the caller's tensor may already be on the GPU
            y = _checked_tensor(reference, "reference", "a float tensor in [-1, 1] (ilvr.load_reference makes one)")
            lo, hi = y.min().item(), y.max().item()
        if lo < -1.001 or hi > 1.001:  # quantisation and resampling may overshoot a hair
            raise ValueError(f"reference values must be in [-1, 1], got {lo:.3g}..{hi:.3g} "
                             "(ilvr.load_reference maps an image to that range)")
        if y.dim() == 3:
            y = y[None]
        if y.dim() != 4:
            raise ValueError(f"reference must be (C, H, W) or (B, C, H, W), got {y.dim()} dimensions {tuple(y.shape)}")
        if y.shape[1:] != (channels, size, size):
            raise ValueError(f"reference must be {channels}x{size}x{size} for this model, got {tuple(y.shape[1:])}")
        if y.shape[0] not in (1, batch):
            raise ValueError(f"got {y.shape[0]} references for {batch} samples")
        with gpu_work(device):
            y = y.expand(batch, -1, -1, -1).to(device)
            lowpass = LowPass(size, size, n_factor, kernel, device=device)
    else:
        lowpass = None
    if mask is not None:
        if y is None:
            raise ValueError("a mask needs a reference")
        with gpu_work(device):
            mask = _checked_tensor(mask, "mask", "a tensor in [0, 1] (1 where ILVR acts)")
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
            mask = mask.to(device)
    refine = conditioned_steps(schedule.timestep_map, int(stop_at))

    noise = NoiseSource([torch.Generator().manual_seed(int(s)) for s in seeds], (channels, size, size), device)
    denoise = model.denoiser()
    own_ops = torch_ops_single_threaded() if model.cpu_runtime is not None and device.type == "cpu" else nullcontext()
    start = time.time()
    try:
        with torch.inference_mode(), own_ops:
            x = noise()
            for i in reversed(range(total)):
                # GPU work goes through the gate (ilvr.cuda_graphs) in short blocks that never wait for
                # another thread; denoise and noise() pass it themselves
                t_model = int(schedule.timestep_map[i])
                with gpu_work(device):
                    t = torch.full((batch,), t_model, device=device, dtype=torch.long)
                model_output = denoise(x, t)
                with gpu_work(device):
                    out = predict_step(schedule, model.diffusion, model_output, x, i)
                z = noise()
                eps = noise() if y is not None else None
                with gpu_work(device):
                    if sampler == "ddim":
                        x = ddim_step(schedule, out, i, eta, z)
                    else:
                        x = out.mean + (torch.exp(0.5 * out.log_variance) * z if i > 0 else 0.0)
                    if y is not None:
                        abar_prev = float(schedule.alphas_cumprod_prev[i])  # 1.0 at i = 0: the clean reference
                        y_prev = math.sqrt(abar_prev) * y + math.sqrt(1 - abar_prev) * eps
                        if refine[i]:
                            correction = lowpass(y_prev - x)
                            x = x + (correction if mask is None else mask * correction)
                        if keep_outside and mask is not None:
                            x = mask * x + (1 - mask) * y_prev
                if progress is not None:
                    progress(StepInfo(index=total - i, total=total, timestep=t_model, pred_x0=out.pred_x0,
                                      elapsed_s=time.time() - start))
    finally:
        noise.close()
    with gpu_work(device):  # outside inference_mode: an ordinary tensor the caller may change or use with autograd
        return x.clone()


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """The seeds as Python ints: any sequence of integers (numpy and torch ones too), each 0 <= s < 2**63."""
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise TypeError(f"seeds must be a list of integers, one per sample (e.g. [0, 1, 2]), got {seeds!r}")
    out = [_whole(s, "seed") for s in seeds]
    if not out:
        raise ValueError("ask for at least one sample (seeds is empty)")
    bad = [s for s in out if not 0 <= s < 2 ** 63]
    if bad:
        raise ValueError(f"seeds must be between 0 and 2**63 - 1, got {bad[0]}")
    return out


def _whole(value, what: str) -> int:
    """An integer from an int, a numpy integer or a one-element integer tensor; not from a float or bool."""
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError(f"{what} must be a whole number, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be a whole number, got {value!r}") from None


def _checked_tensor(value, what: str, expected: str) -> torch.Tensor:
    """A finite float tensor, or a clear error for an image, an array or an integer tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be {expected}, got {type(value).__name__}")
    if not (value.is_floating_point() or value.dtype == torch.bool):
        raise TypeError(f"{what} must be {expected}, got a {str(value.dtype).replace('torch.', '')} tensor")
    value = value.float()
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} holds NaN or infinite values")
    return value


def settings_dict(model: DiffusionModel, *, n_factor: int | None, kernel: str, steps: str | int, stop_at: int,
                  sampler: str, seed: int, **extra) -> dict:
    """The settings to show next to a result and to embed in its PNG."""
    d = {"model": model.name, "N": n_factor, "filter": kernel, "steps": str(steps), "stop_at": int(stop_at),
         "sampler": sampler, "seed": int(seed), "image_size": model.image_size}
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


def validate_stop_at(model: DiffusionModel, stop_at: int, what: str = "stop step") -> int:
    """The end of the conditioning range, on the model's training scale (0 .. num_train_timesteps)."""
    total = model.diffusion.num_train_timesteps
    if not 0 <= int(stop_at) <= total:
        raise ValueError(f"{what} must be between 0 and {total}, got {stop_at}")
    return int(stop_at)


def validate_steps(model: DiffusionModel, steps: str | int) -> int:
    return len(parse_steps(steps, model.diffusion.num_train_timesteps))
