"""glibc heap settings for CPU sampling: keep the memory a UNet call frees for the next call.

Why: with glibc's default, dynamic thresholds the heap top that one UNet call frees is handed back to
the kernel and taken again by the next call, so every call page-faults its activations afresh. For the
bundled 64x64 model on 2 cores that was 850-1150 minor page faults and 3-4 ms of kernel CPU time per
step; with the fixed thresholds below it is about 0 faults and 0.2 ms. The gain in time is largest for
code that allocates a new tensor per op (the benchmark's plain loop); README, Speed, has the figures.
A process keeps up to TRIM_THRESHOLD (128 MiB) of freed memory at its heap top in exchange.

The settings are process-wide, so they are applied once, only on glibc, and never over a user's own
``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` (or the same in ``GLIBC_TUNABLES``): glibc's
documented tunables. ``ILVR_KEEP_FREED_HEAP=0`` leaves glibc's defaults in place (to compare:
``ILVR_KEEP_FREED_HEAP=0 python -m ilvr bench``).
"""
from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 128 * 2 ** 20  # freed heap top kept for reuse (glibc default: dynamic, from 128 KiB)
MMAP_THRESHOLD = 32 * 2 ** 20  # blocks above this get their own mapping (glibc's own dynamic maximum)

_applied: bool | None = None  # None: not tried yet


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _user_set_thresholds() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return (any(os.environ.get(name) for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"))
            or "trim_threshold" in tunables or "mmap_threshold" in tunables)


def keep_freed_heap() -> bool:
    """Set fixed glibc trim/mmap thresholds once per process; True when they are in effect.

    A no-op (False) off glibc, with ILVR_KEEP_FREED_HEAP=0, or when the user set glibc's malloc
    thresholds in the environment.
    """
    global _applied
    if _applied is None:
        libc = _glibc()
        if libc is None or os.environ.get("ILVR_KEEP_FREED_HEAP", "1") == "0" or _user_set_thresholds():
            _applied = False
        else:
            # mallopt returns 1 on success; setting either threshold turns off glibc's dynamic adjustment
            _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def release_freed_heap() -> None:
    """Hand freed heap memory back to the kernel now (glibc's malloc_trim), e.g. before measuring RSS."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
