"""Diffusion maths: beta schedules, IDDPM respacing and the reverse-step quantities.

Follows openai/guided-diffusion: schedules are computed in float64 numpy (precision matters near t=0
and t=T) and only cast to tensors at use. A respaced schedule is just another ``Schedule`` whose
``timestep_map`` tells which training timestep to show the network.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from .config_checks import check_field_types, check_positive

PREDICTIONS = ("epsilon", "sample", "v_prediction")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


@dataclass
class DiffusionConfig:
    """How a model was trained; named like diffusers' scheduler_config.json so users recognise it."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # "linear" | "cosine"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"  # what the network predicts: "epsilon" | "sample" (x0) | "v_prediction"
    variance_type: str = "fixed_small"  # "fixed_small" | "fixed_large" | "learned_range"
    clip_sample: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)
        check_positive(self, "num_train_timesteps")
        if self.prediction_type not in PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {PREDICTIONS}, got {self.prediction_type!r}")
        if self.variance_type not in VARIANCES:
            raise ValueError(f"variance_type must be one of {VARIANCES}, got {self.variance_type!r}")
        if self.beta_schedule not in ("linear", "cosine"):
            raise ValueError(f"beta_schedule must be 'linear' or 'cosine', got {self.beta_schedule!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiffusionConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def training_diffusion() -> DiffusionConfig:
    """The diffusion every model of ours is trained with (1000 linear betas, epsilon, fixed-small
    variance); a training state written before it recorded this is read with it (ilvr.loading)."""
    return DiffusionConfig(variance_type="fixed_small")


def make_betas(cfg: DiffusionConfig) -> np.ndarray:
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":  # the endpoints as given, as diffusers uses them (see guided_diffusion_betas)
        return np.linspace(cfg.beta_start, cfg.beta_end, T, dtype=np.float64)
    steps = np.arange(T + 1, dtype=np.float64) / T
    abar = np.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.minimum(1 - abar[1:] / abar[:-1], 0.999)


def guided_diffusion_betas(cfg: DiffusionConfig) -> DiffusionConfig:
    """guided-diffusion's linear schedule for T steps: the 1000-step endpoints (1e-4, 0.02) scaled by
    1000 / T, so other T keep the same total noise. diffusers takes beta_start/beta_end literally, so
    only guided-diffusion models get this (their files record no schedule)."""
    if cfg.beta_schedule != "linear":
        return cfg
    scale = 1000 / cfg.num_train_timesteps
    return replace(cfg, beta_start=1e-4 * scale, beta_end=0.02 * scale)


def space_timesteps(num_timesteps: int, spec: str | int) -> list[int]:
    """Which training timesteps to keep, with IDDPM semantics.

    "250" (or 250) keeps 250 evenly strided steps including 0 and T-1; "ddim50" uses the integer
    stride that yields exactly 50 steps; "a,b,c" splits the range into equal sections taking a, b, c.
    """
    spec = str(spec).strip()
    if spec.startswith("ddim"):
        want = int(spec[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == want:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot make exactly {want} DDIM steps from {num_timesteps}")
    counts = [int(c) for c in spec.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        if count < 1:
            raise ValueError("every section needs at least one step")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        cur = 0.0
        for _ in range(count):
            kept.add(start + round(cur))
            cur += stride
        start += size
    return sorted(kept)


def parse_steps(steps: str | int, num_timesteps: int) -> list[int]:
    """Validate a user's step spec and return the kept timesteps, with a readable error."""
    s = str(steps).strip().lower()
    body = s[4:] if s.startswith("ddim") else s
    if not body or not all(part.strip().isdigit() for part in body.split(",")):
        raise ValueError(f"steps must be a number like 250, 'ddim50' or '100,50', got {steps!r}")
    total = sum(int(p) for p in body.split(","))
    if total < 1 or total > num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps!r}")
    return space_timesteps(num_timesteps, s)


class Schedule:
    """A (possibly respaced) noise schedule and the reverse-step coefficients derived from it."""

    def __init__(self, betas: np.ndarray, timestep_map: list[int] | None = None):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.num_steps = len(self.betas)
        self.timestep_map = np.asarray(timestep_map if timestep_map is not None else range(self.num_steps))
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the first posterior variance is 0; ADM replaces it so its log stays finite
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]) if self.num_steps > 1
            else np.maximum(self.posterior_variance, 1e-20))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "Schedule":
        return cls(make_betas(cfg))

    def respace(self, steps: str | int) -> "Schedule":
        """IDDPM respacing: new betas from alphas_cumprod at the kept steps."""
        kept = parse_steps(steps, self.num_steps)
        new_betas, last = [], 1.0
        for i in kept:
            new_betas.append(1 - self.alphas_cumprod[i] / last)
            last = self.alphas_cumprod[i]
        return Schedule(np.array(new_betas), [int(self.timestep_map[i]) for i in kept])


def _at(arr: np.ndarray, i: int, like: torch.Tensor) -> torch.Tensor:
    """One schedule entry as a 0-dim tensor in x's dtype, kept on the CPU.

    PyTorch reads a 0-dim CPU tensor as a scalar in ops with GPU tensors, so a step makes no
    host-to-GPU copy of its coefficients; such a copy would block the host until the GPU caught up
    and stop it queueing the next step's work.
    """
    return torch.tensor(float(arr[i]), dtype=like.dtype)


@dataclass
class StepOutput:
    mean: torch.Tensor
    log_variance: torch.Tensor  # broadcastable to mean
    pred_x0: torch.Tensor
    pred_eps: torch.Tensor


def predict_step(schedule: Schedule, cfg: DiffusionConfig, model_output: torch.Tensor, x: torch.Tensor,
                 i: int, clip: bool | None = None) -> StepOutput:
    """Turn the network's output at respaced index i into the posterior p(x_{i-1} | x_i)."""
    channels = x.shape[1]
    abar = _at(schedule.alphas_cumprod, i, x)
    if cfg.variance_type == "learned_range":
        model_output, var_values = model_output[:, :channels], model_output[:, channels:]
        min_log = _at(schedule.posterior_log_variance_clipped, i, x)
        max_log = torch.log(_at(schedule.betas, i, x))
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
    elif cfg.variance_type == "fixed_large":
        large = np.append(schedule.posterior_variance[1], schedule.betas[1:]) if schedule.num_steps > 1 else schedule.betas
        log_variance = torch.log(_at(large, i, x))
    else:
        log_variance = _at(schedule.posterior_log_variance_clipped, i, x)

    if cfg.prediction_type == "epsilon":
        pred_x0 = (x - torch.sqrt(1 - abar) * model_output) / torch.sqrt(abar)
    elif cfg.prediction_type == "sample":
        pred_x0 = model_output
    else:  # v = sqrt(abar) eps - sqrt(1-abar) x0
        pred_x0 = torch.sqrt(abar) * x - torch.sqrt(1 - abar) * model_output
    if cfg.clip_sample if clip is None else clip:
        pred_x0 = pred_x0.clamp(-1, 1)
    pred_eps = (x - torch.sqrt(abar) * pred_x0) / torch.sqrt(1 - abar)
    mean = _at(schedule.posterior_mean_coef1, i, x) * pred_x0 + _at(schedule.posterior_mean_coef2, i, x) * x
    return StepOutput(mean=mean, log_variance=log_variance, pred_x0=pred_x0, pred_eps=pred_eps)


def ddim_step(schedule: Schedule, out: StepOutput, i: int, eta: float, noise: torch.Tensor | None) -> torch.Tensor:
    """DDIM update from the (clipped) x0 prediction; eta=0 is deterministic."""
    x0, eps = out.pred_x0, out.pred_eps
    abar = float(schedule.alphas_cumprod[i])
    abar_prev = float(schedule.alphas_cumprod_prev[i])
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar)) * math.sqrt(1 - abar / abar_prev)
    x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma ** 2, 0.0)) * eps
    if sigma > 0 and noise is not None and i > 0:
        x = x + sigma * noise
    return x


LOSS_WEIGHTINGS = ("p2", "min-snr", "uniform")


def loss_weights(alphas_cumprod: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-timestep weights of the epsilon MSE, from SNR(t) = abar_t / (1 - abar_t).

    p2: 1 / (1 + SNR)  (Choi et al., CVPR 2022, k=1, gamma=1), which the ILVR authors' own models use;
    min-snr: min(SNR, 5) / SNR  (Hang et al., ICCV 2023, gamma=5, for epsilon prediction);
    uniform: 1 (Ho et al.'s simple loss). Both non-uniform ones shrink the weight of the nearly clean steps.
    """
    snr = alphas_cumprod / (1 - alphas_cumprod)
    if kind == "p2":
        return 1 / (1 + snr)
    if kind == "min-snr":
        return snr.clamp(max=5.0) / snr
    if kind == "uniform":
        return torch.ones_like(snr)
    raise ValueError(f"loss weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {kind!r}")
