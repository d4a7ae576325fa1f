"""The speed runtime of one sampling run, behind the one seam the sampler calls.

The sampler's maths does not change with the hardware; what does is gathered here: the UNet call
(replayed as a CUDA graph on a GPU, onnxruntime on CPU: ``ilvr.cuda_graphs``, ``ilvr.onnx_cpu``), the
run's noise (drawn ahead on a GPU: ``ilvr.noise``), inference mode, PyTorch's own threads while
onnxruntime runs, and the gate that keeps other runs' GPU work out of a CUDA graph capture.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .cuda_graphs import gpu_work
from .model import DiffusionModel
from .noise import NoiseSource
from .onnx_cpu import torch_ops_single_threaded


class SamplingRun:
    """Use as ``with SamplingRun(model, seeds) as run:``; then ``run.noise()``, ``run.denoise(x, t)`` and
    ``with run.gpu():`` around the step's own tensor maths (short blocks that never wait for another
    thread, see ``ilvr.cuda_graphs``). ``run.output(x)`` after the block hands the result over."""

    def __init__(self, model: DiffusionModel, seeds: Sequence[int]):
        self.device = model.device
        self.batch = len(seeds)
        shape = (model.config.in_channels, model.image_size, model.image_size)
        self.noise = NoiseSource(seeds, shape, self.device)
        self._denoise = model.denoiser()
        self._single_threaded_torch = model.cpu_runtime is not None and self.device.type == "cpu"
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "SamplingRun":
        self._stack.callback(self.noise.close)
        self._stack.enter_context(torch.inference_mode())
        if self._single_threaded_torch:
            self._stack.enter_context(torch_ops_single_threaded())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def denoise(self, x: torch.Tensor, timestep: int) -> torch.Tensor:
        """The network's output for x at training timestep `timestep` (every sample), as float32."""
        with gpu_work(self.device):
            t = torch.full((self.batch,), int(timestep), device=self.device, dtype=torch.long)
        return self._denoise(x, t)

    def gpu(self) -> contextlib.AbstractContextManager:
        return gpu_work(self.device)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """x as an ordinary tensor (not an inference-mode one), free to modify or use with autograd."""
        with gpu_work(self.device):
            return x.clone()
