"""The low-pass filter phi_N of ILVR: downsample by N, upsample back (resize-right, as the paper).

resize-right is linear and separable, so phi_N along one axis is a fixed matrix. We build that matrix
once by pushing the identity through resize-right (float64), then apply phi_N to a batch as two small
matmuls: the same operator to float precision, without re-deriving kernel weights every step.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from resize_right import interp_methods, resize

KERNELS = {
    "cubic": interp_methods.cubic,
    "lanczos2": interp_methods.lanczos2,
    "lanczos3": interp_methods.lanczos3,
    "linear": interp_methods.linear,
    "box": interp_methods.box,
}


def check_factor(size: int, factor: int) -> None:
    """N must be a positive integer dividing the image size (1 = no filtering)."""
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"N must be a positive whole number, got {factor!r}")
    if size % factor:
        valid = ", ".join(str(n) for n in valid_factors(size))
        raise ValueError(f"N={factor} does not divide the image size {size}; valid N: {valid}")


def valid_factors(size: int) -> list[int]:
    return [n for n in range(1, size + 1) if size % n == 0]


def check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown filter {kernel!r}; choose one of {', '.join(KERNELS)}")


def resize_right_lowpass(x: torch.Tensor, factor: int, kernel: str = "cubic") -> torch.Tensor:
    """phi_N straight from resize-right: the way the official implementation calls it."""
    if factor == 1:
        return x
    method = KERNELS[kernel]
    down = resize(x, scale_factors=1 / factor, interp_method=method, antialiasing=True)
    return resize(down, scale_factors=float(factor), interp_method=method, antialiasing=True)


@lru_cache(maxsize=64)
def _axis_matrix(size: int, factor: int, kernel: str) -> torch.Tensor:
    """M (size x size) with phi_N(v) = M v along one axis, computed in float64."""
    eye = torch.eye(size, dtype=torch.float64)[:, None, None, :]  # resize-right wants image-shaped input
    method = KERNELS[kernel]
    down = resize(eye, scale_factors=[1, 1, 1, 1 / factor], interp_method=method, antialiasing=True)
    up = resize(down, scale_factors=[1, 1, 1, factor], interp_method=method, antialiasing=True)
    return up[:, 0, 0, :].T.contiguous()  # row i of `up` is M e_i, i.e. column i of M


class LowPass:
    """phi_N for images of a given size, applied as M_h @ x @ M_w^T on the input's device."""

    def __init__(self, height: int, width: int, factor: int, kernel: str = "cubic",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        check_kernel(kernel)
        check_factor(height, factor)
        check_factor(width, factor)
        self.factor, self.kernel = factor, kernel
        self.identity = factor == 1
        if not self.identity:
            self.mh = _axis_matrix(height, factor, kernel).to(device=device, dtype=dtype)
            self.mw_t = _axis_matrix(width, factor, kernel).T.contiguous().to(device=device, dtype=dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        return torch.matmul(torch.matmul(self.mh, x), self.mw_t)
