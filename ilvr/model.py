"""A loaded diffusion model: the network plus how it was trained, on a device, ready to sample."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from .network import UNet
from .schedule import DiffusionConfig, Schedule


@dataclass
class DiffusionModel:
    """What ``ilvr.load_model`` returns.

    ``unet(x, t)`` is the raw network (t on the training scale); ``predict`` runs it with the
    model's compute dtype (fp16/bf16 autocast on CUDA) and always hands back float32.
    """

    unet: UNet
    diffusion: DiffusionConfig
    name: str = "model"
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32  # compute dtype of the network
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.schedule = Schedule.from_config(self.diffusion)

    @property
    def image_size(self) -> int:
        return self.unet.config.image_size

    @property
    def config(self):
        return self.unet.config

    def _autocast(self):
        if self.dtype in (torch.float16, torch.bfloat16) and self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.unet(x, t).float()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "image_size": self.image_size,
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "unet": self.unet.config.to_dict(), "diffusion": self.diffusion.to_dict()}
