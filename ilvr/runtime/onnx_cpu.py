"""The UNet on CPU through onnxruntime: the same fp32 maths, faster steps than eager PyTorch.

Why: on 2 AVX2 cores a UNet call took 1.4-1.6x less time on onnxruntime than on our tuned eager
PyTorch (channels_last, in-place ops) for the bundled model, 1.1-1.5x less for a 256 px ADM, with
outputs within 1e-5 (``scripts/time_unet_call.py``). Its CPU kernels fuse what eager PyTorch runs op by
op. README, Speed, has the sampling figures.

How: at load the UNet is exported once to ONNX in memory (PyTorch's TorchScript-based exporter, batch
size left free: about 2 s for the bundled model, 12-13 s for a 256 px ADM) and an onnxruntime session
runs it. The session holds its own copy of the weights; when the UNet's weights change after loading
(``load_state_dict``, an optimizer step), the next sampling run notices and exports again. Where
onnxruntime is missing or the export fails, sampling runs on PyTorch with a warning.
``ILVR_CPU_BACKEND=torch`` (or ``load_model(..., cpu_backend="torch")``) keeps PyTorch.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import os
import threading
import warnings
from typing import Iterator

import numpy as np
import torch

from ..network import UNet

BACKENDS = ("onnxruntime", "torch")
BACKEND_ENV = "ILVR_CPU_BACKEND"


def cpu_backend(requested: str | None = None) -> str:
    """The CPU backend to use: `requested`, else $ILVR_CPU_BACKEND, else onnxruntime."""
    choice = (requested or os.environ.get(BACKEND_ENV) or "onnxruntime").strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"CPU backend must be one of {', '.join(BACKENDS)}, got {choice!r}")
    return choice


class _Forward(torch.nn.Module):
    """The UNet with positional (x, t) only, as the exporter wants it."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t)


def weights_fingerprint(unet: UNet) -> tuple | None:
    """Changes when any parameter or buffer is modified in place or replaced (PyTorch's version
    counters and storage addresses); None for inference tensors, which keep no version counter."""
    try:
        return tuple((w.data_ptr(), w._version) for w in itertools.chain(unet.parameters(), unet.buffers()))
    except RuntimeError:
        return None


class OnnxUNet:
    """``unet(x, t)`` for CPU float32 inputs, run by an onnxruntime session; returns a float32 tensor."""

    def __init__(self, unet: UNet, threads: int | None = None):
        import onnxruntime as ort

        self.fingerprint = weights_fingerprint(unet)  # the weights this session was made from

        size = unet.config.image_size
        x = torch.zeros(1, unet.config.in_channels, size, size)
        t = torch.zeros(1, dtype=torch.long)
        buffer = io.BytesIO()
        was_training = unet.training
        unet.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
                torch.onnx.export(_Forward(unet), (x, t), buffer, input_names=["x", "t"], output_names=["out"],
                                  dynamic_axes={"x": {0: "batch"}, "t": {0: "batch"}, "out": {0: "batch"}},
                                  dynamo=False)
        finally:
            unet.train(was_training)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        self.threads = options.intra_op_num_threads

    def is_stale(self, unet: UNet) -> bool:
        """True when `unet`'s weights changed since this session was exported from it."""
        return self.fingerprint is not None and weights_fingerprint(unet) != self.fingerprint

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feed = {"x": x.detach().contiguous().numpy(), "t": t.detach().to(torch.long).numpy()}
        return torch.from_numpy(np.asarray(self.session.run(None, feed)[0]))


def cpu_runtime_for(unet: UNet, device: torch.device | str, dtype: torch.dtype,
                    backend: str | None = None) -> OnnxUNet | None:
    """The onnxruntime twin a model samples with: on CPU, in float32, with the onnxruntime backend
    (`backend`, else as ``cpu_backend`` chooses). None elsewhere, or (with a warning) where onnxruntime
    cannot run the UNet."""
    if torch.device(device).type != "cpu" or dtype != torch.float32 or cpu_backend(backend) != "onnxruntime":
        return None
    if unet.config.num_classes is not None:  # the sampler refuses class-conditional models with its own message
        return None
    try:
        return OnnxUNet(unet)
    except Exception as e:  # noqa: BLE001 - any failure here only costs speed: sample on PyTorch instead
        warnings.warn(f"onnxruntime cannot run this UNet ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                      f"sampling on PyTorch instead (set {BACKEND_ENV}=torch to skip the attempt)", RuntimeWarning)
        return None


_threads_lock = threading.Lock()
_threads_users = 0
_threads_before = 1


@contextlib.contextmanager
def torch_ops_single_threaded() -> Iterator[None]:
    """Run this thread's PyTorch ops on one thread while the UNet runs on onnxruntime.

    Why: the rest of a step (the DDPM update, ILVR's two small matmuls) is tiny, but a multi-threaded
    op wakes PyTorch's OpenMP threads, which then busy-wait and take the cores from the next
    onnxruntime call: ILVR steps of the bundled model cost 6-13% more than unconditional ones on 2
    threads, about 0% more with this. ``torch.set_num_threads`` acts on the calling thread (and on the
    default for new threads), so concurrent runs each set their own; the default is put back when the
    last one leaves.
    """
    global _threads_users, _threads_before
    with _threads_lock:
        if _threads_users == 0:
            _threads_before = torch.get_num_threads()
        _threads_users += 1
        before = _threads_before
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        with _threads_lock:
            _threads_users -= 1
