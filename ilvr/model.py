"""A loaded diffusion model: the network plus how it was trained, on a device, ready to sample."""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .runtime import SamplingRun
from .runtime.cuda_graphs import GraphedPredict
from .network import UNet, count_parameters
from .runtime.cpu_choice import cpu_runtime_for
from .schedule import DiffusionConfig, Schedule


def file_digest(path: str | os.PathLike, length: int = 12) -> str | None:
    """Leading hex digits of a file's SHA-256 (None if it cannot be read)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()[:length]


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
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


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
    failed_captures: int = field(default=0, repr=False)  # in a row; see ilvr.runtime.cuda_graphs.GraphedPredict
    cpu_runtime: Any = field(default=None, repr=False)  # runs predict on CPU in fp32: ilvr.runtime.onnx_cpu.OnnxUNet,
    # or cpu_choice.MeasuredBackend (per batch size); exported again by denoiser() when the UNet's weights changed

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
        if self.cpu_runtime is not None and not torch.is_grad_enabled() and x.device.type == "cpu":
            return self.cpu_runtime(x, t)
        with self._autocast():
            return self.unet(x, t).float()

    def denoiser(self) -> Denoiser:
        """``predict`` for one sampling run: on a GPU, captured as a CUDA graph at the first call.

        The graph (and its memory) belongs to the run, so concurrent runs never share buffers; see
        ``ilvr.runtime.cuda_graphs`` for why and how runs on one GPU stay out of each other's captures.
        """
        if self.device.type == "cuda" and self.cuda_graphs:
            return GraphedPredict(self)
        if self.cpu_runtime is not None and self.cpu_runtime.is_stale(self.unet):
            # The onnxruntime session holds a copy of the weights it was exported with; a UNet changed
            # since (load_state_dict, training) must not sample with the old ones.
            self.cpu_runtime = cpu_runtime_for(self.unet, self.device, self.dtype, self.cpu_runtime.backend,
                                               cache=False)
        return self.predict

    def sampling_run(self, seeds) -> SamplingRun:
        """The runtime of one sampling run for these seeds (``ilvr.runtime``): noise, denoiser, GPU gate."""
        denoise = self.denoiser()
        onnxruntime = self.cpu_runtime is not None and self.cpu_runtime.uses_onnxruntime(len(seeds))
        return SamplingRun(denoise, seeds, (self.config.in_channels, self.image_size, self.image_size),
                           self.device, onnxruntime=onnxruntime)

    def compile(self, mode: str | None = None) -> "DiffusionModel":
        """torch.compile the UNet in place: fused kernels, 2-3x faster per step on an H100 at batch 8.

        Each batch size is compiled at its first use (about a minute for a 256 px ADM), so this pays
        off for long runs such as folder translation, not for a single sample. On CPU it replaces the
        onnxruntime copy (``cpu_runtime``): the compiled PyTorch UNet runs instead. `mode` is Inductor's
        (COMPILE_MODES); "max-autotune-no-cudagraphs" benchmarks kernel choices per shape (minutes more).
        """
        if mode not in (None, *COMPILE_MODES):
            raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        self.cpu_runtime = None
        # dynamic=False: one graph per batch size, specialised (a shape change would otherwise switch to a
        # dynamic-shape graph, which is slower)
        self.unet.compile(dynamic=False, mode=None if mode in (None, "default") else mode)
        if mode in ("reduce-overhead", "max-autotune"):  # they capture CUDA graphs of their own: ours would nest
            self.cuda_graphs = False
        return self

    @property
    def weights_digest(self) -> str | None:
        """The first 12 hex digits of the weights file's SHA-256, recorded in every PNG's settings so an
        image names the exact weights that made it (None for weights that did not come from a file)."""
        if "weights_digest" not in self.info:
            path = self.info.get("weights")
            self.info["weights_digest"] = file_digest(path) if path else None
        return self.info["weights_digest"]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "image_size": self.image_size,
                "channels": self.config.in_channels, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""),
                "runtime": "pytorch" if self.cpu_runtime is None else self.cpu_runtime.label,
                "format": self.info.get("family"), "options": self.info.get("options", {}),
                "unet": self.unet.config.to_dict(), "diffusion": self.diffusion.to_dict(),
                **({"training": self.info["training"]} if self.info.get("training") else {})}

    def __repr__(self) -> str:  # a summary; the module tree is ``model.unet``
        params = count_parameters(self.unet) / 1e6
        d = self.describe()
        return (f"DiffusionModel({self.name!r}: {d['image_size']} px, {d['channels']} channel(s), {params:.1f} M "
                f"parameters, {d['format'] or 'unknown'} format, {d['device']} {d['dtype']} on {d['runtime']}, "
                f"{self.diffusion.num_train_timesteps} steps {self.diffusion.beta_schedule} "
                f"{self.diffusion.prediction_type})")

