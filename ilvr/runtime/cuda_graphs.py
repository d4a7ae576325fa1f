"""A sampling run's UNet call replayed as a CUDA graph, safe while other runs share the GPU.

Replaying a graph launches a whole UNet step at once; at small batch sizes that is about 2x faster than
launching its hundreds of kernels from Python. Capturing one is fragile, though: while a capture is under
way, a device-synchronising call from any thread of the process (a pinned-memory allocation, a cuDNN or
cuBLAS handle made for a new thread, ``cudaDeviceSynchronize``) breaks it. The app samples for several
users at once, and on an H200 two of four concurrent runs lost their graphs that way. So the sampler's
GPU work goes through ``GPU_GATE``: runs work side by side, and a capture waits until they step aside.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Iterator, Protocol

import torch


class GraphOwner(Protocol):
    """What GraphedPredict needs of a model (``ilvr.model.DiffusionModel`` is one)."""

    cuda_graphs: bool  # False: replay no graphs, run eagerly
    failed_captures: int  # failed captures in a row

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


class GpuGate:
    """A readers-writer lock: sampling work shares the GPU, a graph capture has it to itself.

    Inside ``work()`` never wait for another thread: a capture waits for every reader to leave, and new
    readers wait while a capture is waiting or under way.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._capturing = False

    @contextlib.contextmanager
    def work(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._capturing)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._capturing)
            self._capturing = True  # from here new readers wait
            self._cond.wait_for(lambda: not self._readers)
        try:
            yield
        finally:
            with self._cond:
                self._capturing = False
                self._cond.notify_all()


GPU_GATE = GpuGate()


def gpu_work(device: torch.device) -> contextlib.AbstractContextManager:
    """The gate's shared side for work on `device`; nothing to wait for on a CPU."""
    return GPU_GATE.work() if device.type == "cuda" else contextlib.nullcontext()


class GraphedPredict:
    """``model.predict`` replayed from a CUDA graph; captured at the first call, for that input shape.

    A call with another shape, or with autograd on, runs ``model.predict`` directly. If a capture fails,
    this run goes on eagerly; after ``GIVE_UP_AFTER`` failures in a row (a GPU runtime that forbids
    capture) the model stops trying (``model.cuda_graphs = False``).
    """

    WARMUP_CALLS = 2  # cuDNN picks its algorithms and workspaces before capture, as PyTorch advises
    GIVE_UP_AFTER = 3

    def __init__(self, model: GraphOwner):
        self.model = model
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.failed = False

    def _capture(self, x: torch.Tensor, t: torch.Tensor) -> None:
        with GPU_GATE.work():
            self.static_x, self.static_t = x.clone(), t.clone()
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP_CALLS):
                    self.model.predict(self.static_x, self.static_t)
            torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with GPU_GATE.capture(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.static_out = self.model.predict(self.static_x, self.static_t)
        self.graph, self.key = graph, (x.shape, x.dtype, t.shape, x.device)

    def _eager(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with GPU_GATE.work():
            return self.model.predict(x, t)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        key = (x.shape, x.dtype, t.shape, x.device)
        if (torch.is_grad_enabled() or not self.model.cuda_graphs or self.failed
                or (self.graph is not None and key != self.key)):
            return self._eager(x, t)
        if self.graph is None:
            try:
                self._capture(x, t)
                self.model.failed_captures = 0
            except RuntimeError as e:
                self.failed = True
                self.model.failed_captures += 1
                if self.model.failed_captures >= self.GIVE_UP_AFTER:
                    self.model.cuda_graphs = False
                warnings.warn(f"CUDA graph capture failed, this sampling run goes on eagerly "
                              f"({self.model.failed_captures} failure(s) in a row; the model stops trying after "
                              f"{self.GIVE_UP_AFTER}): {e}", RuntimeWarning)
                return self._eager(x, t)
        with GPU_GATE.work():
            self.static_x.copy_(x)
            self.static_t.copy_(t)
            self.graph.replay()
            return self.static_out.clone()  # the next replay overwrites static_out
