"""Exported ONNX UNets kept on disk, so the export is paid once per weights and settings, not per process.

Why: the export takes about 2 s for a 64 px model and 12-13 s for a 256 px ADM, and every CLI run,
app worker and torchrun rank paid it again.

Where: ``$ILVR_ONNX_CACHE`` (a folder; ``0`` or ``off`` turns the cache off), else ``onnx/`` in
``$ILVR_CACHE``, else ``ilvr/onnx`` in ``$XDG_CACHE_HOME`` (``~/.cache``). The backend choices of
``ilvr.runtime.cpu_choice`` live beside it, in ``cpu-backend/``.

Key: a SHA-256 over the UNet's tensors as loaded (names, dtypes, shapes, bytes: what the export
writes, whichever loader or load options produced them), the source of the modules whose forward is
traced, the export settings and the torch, onnx and onnxruntime versions. Anything that changes the
file changes its name, so an entry is never updated, only written.

Files are written to a temporary name in the same folder and renamed into place (atomic on POSIX), so
concurrent processes never read half a file. An entry onnxruntime cannot open is exported again and
replaced; a folder that cannot be written only costs the export, as before the cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch

CACHE_ENV = "ILVR_ONNX_CACHE"
# the exporter's own default for this torch (20 in torch 2.13), passed explicitly so the cache key records it
ONNX_OPSET = getattr(getattr(torch.onnx, "_constants", None), "ONNX_DEFAULT_OPSET", 17)
EXPORT_SETTINGS = {"exporter": "torchscript", "opset": ONNX_OPSET, "inputs": ["x", "t"], "outputs": ["out"],
                   "dynamic_axes": "batch", "dtype": "float32", "format": 1}  # format: this module's file layout


def runtime_cache_dir() -> Path | None:
    """The folder of the CPU runtime's caches, or None when ``$ILVR_ONNX_CACHE`` turns them off."""
    chosen = os.environ.get(CACHE_ENV, "").strip()
    if chosen.lower() in ("0", "off", "false", "no"):
        return None
    if chosen:
        return Path(chosen).expanduser()
    if os.environ.get("ILVR_CACHE"):  # the folder the user already gave ilvr for downloads
        return Path(os.environ["ILVR_CACHE"]).expanduser() / "onnx"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ilvr" / "onnx"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """The libraries whose versions change an exported file or its speed."""
    return {"torch": torch.__version__, "onnx": package_version("onnx"),
            "onnxruntime": package_version("onnxruntime")}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().reshape(-1)  # logical order: a channels_last copy hashes like a contiguous one
    return memoryview(flat.contiguous().view(torch.uint8).numpy())


def tensors_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer: names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def source_digest(module: torch.nn.Module) -> str:
    """SHA-256 of the source files that define the module and its submodules (their forward is what
    the exporter traces, so an edited network must not reuse an old file)."""
    files = set()
    for m in module.modules():
        with contextlib.suppress(TypeError, OSError):
            files.add(inspect.getsourcefile(type(m)))
    digest = hashlib.sha256()
    for path in sorted(f for f in files if f):
        digest.update(Path(path).name.encode())
        with contextlib.suppress(OSError):
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def export_key(unet: torch.nn.Module, sample_shape: tuple[int, ...], channels_last: bool) -> str:
    """The cache name of `unet`'s export: changes with anything that changes the exported file."""
    description = {"weights": tensors_digest(unet), "source": source_digest(unet), "settings": EXPORT_SETTINGS,
                   "sample_shape": list(sample_shape), "channels_last": channels_last, "versions": versions()}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` to write; renamed onto `target` when the block succeeds,
    removed when it fails, so readers see the old file, no file, or the whole new file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_json_atomically(target: Path, data: dict) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
