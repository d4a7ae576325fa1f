"""The UNet on CPU through onnxruntime: the same fp32 maths, faster steps than eager PyTorch.

Why: on 2 AVX2 cores a UNet call took 1.4-1.6x less time on onnxruntime than on our tuned eager
PyTorch (channels_last, in-place ops) for the bundled model, 1.1-1.5x less for a 256 px ADM, with
outputs within 1e-5 (``scripts/time_unet_call.py``). Its CPU kernels fuse what eager PyTorch runs op by
op. README, Speed, has the sampling figures.

How: the UNet is exported to ONNX (PyTorch's TorchScript-based exporter, batch size left free: about
2 s for the bundled model, 12-13 s for a 256 px ADM) and an onnxruntime session runs it. A model loaded
from files keeps its export on disk (``ilvr.runtime.onnx_cache``), so later processes skip it. The
session holds its own copy of the weights; when the UNet's weights change after loading
(``load_state_dict``, an optimizer step), the next sampling run notices and exports again. Where
onnxruntime is missing or the export fails, sampling runs on PyTorch with a warning.

Which backend: by default (``auto``) each batch size gets the one that measured faster on this machine
(``ilvr.runtime.cpu_choice``, which also makes a model's CPU runtime: ``cpu_runtime_for``);
``ILVR_CPU_BACKEND=onnxruntime`` or ``torch`` (or ``load_model(..., cpu_backend=...)``) forces one.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import os
import threading
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..network import UNet
from .onnx_cache import EXPORT_SETTINGS, ONNX_OPSET, atomic_path, export_key, runtime_cache_dir

BACKENDS = ("auto", "onnxruntime", "torch")
BACKEND_ENV = "ILVR_CPU_BACKEND"


def cpu_backend(requested: str | None = None) -> str:
    """The CPU backend to use: `requested`, else $ILVR_CPU_BACKEND, else auto (measured per batch size)."""
    choice = (requested or os.environ.get(BACKEND_ENV) or "auto").strip().lower()
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


def is_channels_last(unet: UNet) -> bool:
    return any(p.dim() == 4 and not p.is_contiguous() for p in unet.parameters())


def export_unet(unet: UNet, destination: str | os.PathLike | io.BytesIO) -> None:
    """Write `unet` (in eval mode, float32, CPU) as ONNX with a free batch size to a path or buffer."""
    size = unet.config.image_size
    x = torch.zeros(1, unet.config.in_channels, size, size)
    t = torch.zeros(1, dtype=torch.long)
    was_training = unet.training
    unet.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
            torch.onnx.export(_Forward(unet), (x, t), destination, input_names=EXPORT_SETTINGS["inputs"],
                              output_names=EXPORT_SETTINGS["outputs"], opset_version=ONNX_OPSET,
                              dynamic_axes={"x": {0: "batch"}, "t": {0: "batch"}, "out": {0: "batch"}},
                              dynamo=False)
    finally:
        unet.train(was_training)


class OnnxUNet:
    """``unet(x, t)`` for CPU float32 inputs, run by an onnxruntime session; returns a float32 tensor.

    With `cache` the export is read from (or written to) the disk cache of ``ilvr.runtime.onnx_cache``;
    ``cache_path`` then names the file the session was made from."""

    backend = "onnxruntime"  # what ``cpu_runtime_for`` makes again when the weights change
    label = "onnxruntime"

    def __init__(self, unet: UNet, threads: int | None = None, cache: bool = False):
        import onnxruntime as ort

        self.fingerprint = weights_fingerprint(unet)  # the weights this session was made from
        self._ort = ort
        self.options = ort.SessionOptions()
        self.options.intra_op_num_threads = threads or torch.get_num_threads()
        self.options.inter_op_num_threads = 1
        self.threads = self.options.intra_op_num_threads
        self.cache_path: Path | None = None
        self.session = self._cached_session(unet) if cache else None
        if self.session is None:
            buffer = io.BytesIO()
            export_unet(unet, buffer)
            self.session = self._open(buffer.getvalue(), unet)

    def _open(self, model: str | bytes, unet: UNet):
        """A session for an ONNX file or bytes; raises when it is not this UNet's export."""
        session = self._ort.InferenceSession(model, self.options, providers=["CPUExecutionProvider"])
        inputs = session.get_inputs()
        size, channels = unet.config.image_size, unet.config.in_channels
        if ([i.name for i in inputs] != EXPORT_SETTINGS["inputs"] or inputs[0].shape[1:] != [channels, size, size]
                or [o.name for o in session.get_outputs()] != EXPORT_SETTINGS["outputs"]):
            raise ValueError("the ONNX file does not hold this UNet's export")
        return session

    def _cached_session(self, unet: UNet):
        """The session from the disk cache, exporting into it first when the entry is missing or
        damaged; None when there is no cache folder or it cannot be written."""
        folder = runtime_cache_dir()
        if folder is None:
            return None
        size = unet.config.image_size
        path = folder / f"unet-{export_key(unet, (unet.config.in_channels, size, size), is_channels_last(unet))}.onnx"
        if path.is_file():
            try:
                session = self._open(str(path), unet)
                self.cache_path = path
                return session
            except Exception:  # noqa: BLE001 - a truncated, corrupt or foreign entry: export again and replace it
                pass
        try:
            with atomic_path(path) as tmp:
                export_unet(unet, tmp)
        except OSError:  # a read-only or full disk: export in memory as without a cache
            return None
        self.cache_path = path
        return self._open(str(path), unet)

    def is_stale(self, unet: UNet) -> bool:
        """True when `unet`'s weights changed since this session was exported from it."""
        return self.fingerprint is not None and weights_fingerprint(unet) != self.fingerprint

    def uses_onnxruntime(self, batch: int) -> bool:
        """Whether a run of `batch` samples calls this session (always: onnxruntime was asked for)."""
        return True

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feed = {"x": x.detach().contiguous().numpy(), "t": t.detach().to(torch.long).numpy()}
        return torch.from_numpy(np.asarray(self.session.run(None, feed)[0]))


def onnx_unet_or_warn(unet: UNet, cache: bool) -> OnnxUNet | None:
    """An OnnxUNet, or None with a warning where onnxruntime cannot run the UNet."""
    try:
        return OnnxUNet(unet, cache=cache)
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
