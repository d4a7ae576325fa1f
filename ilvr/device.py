"""Where a model runs and in which precision: one device resolver and one default dtype per device,
for the CLI, the app, training and Python alike."""
from __future__ import annotations

from pathlib import Path

import torch

DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
               "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class DeviceError(ValueError):
    """A device or dtype that cannot be used here, with a message meant for the user."""


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device | None) -> torch.device:
    """auto (CUDA, else Apple's MPS, else the CPU), cpu, cuda, cuda:N or mps; anything else is a clear
    error, not torch's."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {device!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was asked for but torch sees no GPU; use the CPU "
                              "(--device cpu, or device='cpu' in Python)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"{device} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    if resolved.type == "mps" and not _mps_available():
        raise DeviceError("MPS (Apple silicon) was asked for but torch cannot use it here; use the CPU")
    return resolved


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU and MPS; float16 on CUDA, the precision every GPU speed figure and CUDA test of ours
    was measured in (docs/speed.md), and the one the published ADM checkpoints were trained with.
    bf16 stays one option away (--dtype bf16)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A compute dtype from a name ('fp16', 'bfloat16', ...) or a torch dtype; None: default_dtype(device)."""
    if dtype is None:
        return default_dtype(device)
    resolved = DTYPE_NAMES.get(dtype.strip().lower().removeprefix("torch.")) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise DeviceError(f"dtype must be fp32, fp16 or bf16 (or torch.float32/float16/bfloat16), got {dtype!r}")
    return resolved


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (x86 AVX512-BF16 or AMX; Arm's bf16 extension), read from
    the kernel's CPU flags; False where unknown, since emulated bf16 runs 10x+ slower than fp32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
