"""The speed runtime of one sampling run, behind the one seam the sampler calls.

The sampler's maths does not change with the hardware; what does is gathered here: the UNet call
(replayed as a CUDA graph on a GPU: ``cuda_graphs``; on CPU onnxruntime or PyTorch, whichever measured
faster at the run's batch size: ``onnx_cpu``, ``cpu_choice``, exports kept on disk by ``onnx_cache``),
the run's noise (drawn ahead on a GPU: ``noise``), inference mode, PyTorch's own threads while
onnxruntime runs, the gate that keeps other runs' GPU work out of a CUDA graph capture, and glibc's
heap settings (``cpu_memory``). A model opens a run with ``DiffusionModel.sampling_run(seeds)``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from .cuda_graphs import gpu_work
from .noise import NoiseSource
from .onnx_cpu import torch_ops_single_threaded


class SamplingRun:
    """Use as ``with model.sampling_run(seeds) as run:``; then ``run.noise()``, ``run.denoise(x, t)`` and
    ``with run.gpu():`` around the step's own tensor maths (short blocks that never wait for another
    thread, see ``ilvr.cuda_graphs``). ``run.output(x)`` after the block hands the result over."""

    def __init__(self, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], seeds: Sequence[int],
                 shape: tuple[int, ...], device: torch.device, onnxruntime: bool):
        self.device = device
        self.batch = len(seeds)
        self.noise = NoiseSource(seeds, shape, device)
        self._denoise = denoise
        self._single_threaded_torch = onnxruntime and device.type == "cpu"
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
