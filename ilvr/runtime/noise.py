"""Per-seed noise: every sample draws from its own CPU generator, so a seed gives the same image on any
device, in any batch and in any process; on a GPU the draws are made ahead, in pinned memory."""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import torch

from .cuda_graphs import gpu_work


def draw(generators: Sequence[torch.Generator], shape: tuple[int, ...], pinned: bool = False,
         fanout: ThreadPoolExecutor | None = None) -> torch.Tensor:
    """One draw for every sample (B, *shape) on the CPU; with `fanout`, the samples' generators run in
    parallel threads; `pinned` puts it in page-locked memory for an asynchronous copy to a GPU."""
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


def to_device(noise: torch.Tensor, device: torch.device) -> torch.Tensor:
    with gpu_work(device):
        return noise.to(device, non_blocking=noise.is_pinned())


class NoiseSource:
    """A run's successive noise draws (x_T, then z and eps per step), one generator per seed.

    On a GPU a worker thread draws the next ones while the GPU runs the current step, with the samples'
    generators spread over a few more threads: a 256 px draw takes the CPU about 1.3 ms per sample, so
    a step's two draws for a batch of 8 (about 20 ms on one thread) would be as long as the whole
    compiled UNet step on an H100. Draws are made in order, one at a time, so every sample's sequence
    is the same as when drawn inline.
    """

    AHEAD = 2
    MAX_FANOUT = 4

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], device: torch.device):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device = tuple(shape), device
        self.pool = self.fanout = None
        if device.type == "cuda":
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ilvr-noise")
            workers = min(len(self.generators), self.MAX_FANOUT, os.cpu_count() or 1)
            if workers > 1:
                self.fanout = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ilvr-noise-sample")
        self.pending: deque[Future] = deque()

    def __call__(self) -> torch.Tensor:
        if self.pool is None:
            return to_device(draw(self.generators, self.shape, pinned=self.device.type == "cuda"), self.device)
        while len(self.pending) <= self.AHEAD:
            self.pending.append(self.pool.submit(draw, self.generators, self.shape, True, self.fanout))
        return to_device(self.pending.popleft().result(), self.device)

    def close(self) -> None:
        for pool in (self.pool, self.fanout):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
