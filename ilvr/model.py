"""A loaded diffusion model: the network plus how it was trained, on a device, ready to sample."""
from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .network import UNet
from .schedule import DiffusionConfig, Schedule

_CAPTURE_LOCK = threading.Lock()


def inference_unet(unet: UNet, device: torch.device, dtype: torch.dtype, channels_last: bool) -> UNet:
    """Move a UNet (in place) to the layout it samples fastest in on `device`.

    channels_last is oneDNN's preferred layout on CPU. On CUDA a half-precision dtype stores the
    weights in it (``UNet.to_compute_dtype``); on CPU fp16/bf16 run under autocast instead, see
    ``DiffusionModel.predict``.
    """
    unet = unet.to(device)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    if torch.device(device).type == "cuda" and dtype != torch.float32:
        unet.to_compute_dtype(dtype)
    return unet


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DiffusionModel:
    """What ``ilvr.load_model`` returns.

    ``unet(x, t)`` is the raw network (t on the training scale); ``predict`` runs it in the model's
    compute dtype and always hands back float32. For fp16/bf16 the UNet's weights are best stored in
    that dtype (``UNet.to_compute_dtype``, as ``load_model`` does on CUDA); a UNet kept in fp32 runs
    under autocast instead.
    """

    unet: UNet
    diffusion: DiffusionConfig
    name: str = "model"
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32  # compute dtype of the network
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    cuda_graphs: bool = True  # on a GPU, replay each sampling run's UNet call as one CUDA graph

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
        if (self.dtype in (torch.float16, torch.bfloat16) and self.unet.dtype != self.dtype
                and self.device.type in ("cuda", "cpu")):
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.unet(x, t).float()

    def denoiser(self) -> Denoiser:
        """``predict`` for one sampling run: on a GPU, captured as a CUDA graph at the first call.

        A UNet step at small batch sizes is hundreds of small kernels whose launches cost more host time
        than the GPU needs to run them; replaying a graph launches them all at once. The graph (and its
        memory) belongs to the run, so concurrent runs never share buffers.
        """
        if self.device.type == "cuda" and self.cuda_graphs:
            return GraphedPredict(self)
        return self.predict

    def compile(self) -> "DiffusionModel":
        """torch.compile the UNet in place: fused kernels, about 2x faster per step on an H100 at batch 8.

        Each batch size is compiled at its first use (about a minute for a 256 px ADM), so this pays
        off for long runs such as folder translation, not for a single sample.
        """
        self.unet.compile(dynamic=False)
        return self

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "image_size": self.image_size,
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "unet": self.unet.config.to_dict(), "diffusion": self.diffusion.to_dict()}


class GraphedPredict:
    """``model.predict`` replayed from a CUDA graph; captured at the first call, for that input shape.

    A call with another shape, or with autograd on, runs ``model.predict`` directly.
    """

    WARMUP_CALLS = 2  # cuDNN picks its algorithms and workspaces before capture, as PyTorch advises

    def __init__(self, model: DiffusionModel):
        self.model = model
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None

    def _capture(self, x: torch.Tensor, t: torch.Tensor) -> None:
        self.static_x, self.static_t = x.clone(), t.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_CALLS):
                self.model.predict(self.static_x, self.static_t)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # one capture at a time in this process; thread_local: another run's work on this GPU (the app
        # serves several users at once) does not invalidate this capture
        with _CAPTURE_LOCK, torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.static_out = self.model.predict(self.static_x, self.static_t)
        self.graph, self.key = graph, (x.shape, x.dtype, t.shape, x.device)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        key = (x.shape, x.dtype, t.shape, x.device)
        if torch.is_grad_enabled() or not self.model.cuda_graphs or (self.graph is not None and key != self.key):
            return self.model.predict(x, t)
        if self.graph is None:
            try:
                self._capture(x, t)
            except RuntimeError as e:  # e.g. a GPU runtime that forbids capture: run eagerly from now on
                warnings.warn(f"CUDA graph capture failed, running the UNet eagerly: {e}", RuntimeWarning)
                self.model.cuda_graphs = False
                self.graph, self.key = None, None
                return self.model.predict(x, t)
        self.static_x.copy_(x)
        self.static_t.copy_(t)
        self.graph.replay()
        return self.static_out.clone()  # the next replay overwrites static_out
