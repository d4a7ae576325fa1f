"""The low-pass filter phi_N of ILVR: downsample by N, upsample back (resize-right, as the paper).

Borders are mirrored with the edge sample repeated (... b a | a b c | c b ...), as in the resizer the
official ILVR code uses. resize-right's default pads with zeros, which darkens a band up to N pixels
deep at every edge: phi_N of a flat image would not be flat, and samples would drift from the
reference's colour near the borders (a pale rim at large N).

phi_N is linear and separable, so along one axis it is a fixed matrix. We build that matrix once by
pushing the identity through resize-right (float64, numpy's symmetric padding), then apply phi_N to
a batch as two small matmuls: the same operator to float precision, without re-deriving kernel
weights every step.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
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


def mirror_pad(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """x extended by `pad` samples at both ends of `dim`, mirrored with the edge repeated (period 2n)."""
    n = x.shape[dim]
    period = torch.cat([torch.arange(n), torch.arange(n - 1, -1, -1)])
    index = period[torch.arange(-pad, n + pad) % (2 * n)]
    return x.index_select(dim, index.to(x.device))


def resize_right_lowpass(x: torch.Tensor, factor: int, kernel: str = "cubic") -> torch.Tensor:
    """phi_N straight from resize-right on the tensor, twice per call: the plain path the benchmark times.

    The image is mirror-padded by whole low-resolution pixels first (downsampling commutes with that
    mirror), wide enough that resize-right's own zero padding never reaches the kept centre.
    """
    if factor == 1:
        return x
    method = KERNELS[kernel]
    margin = method.support_sz * factor  # both passes' kernel reach, in full-resolution pixels
    height, width = x.shape[-2:]
    padded = mirror_pad(mirror_pad(x, margin, -2), margin, -1)
    down = resize(padded, scale_factors=1 / factor, interp_method=method, antialiasing=True)
    up = resize(down, scale_factors=float(factor), interp_method=method, antialiasing=True)
    return up[..., margin:margin + height, margin:margin + width]


@lru_cache(maxsize=64)
def _axis_matrix(size: int, factor: int, kernel: str) -> torch.Tensor:
    """M (size x size) with phi_N(v) = M v along one axis, computed in float64."""
    eye = np.eye(size)[:, None, None, :]  # resize-right wants image-shaped input
    method = KERNELS[kernel]
    down = resize(eye, scale_factors=[1, 1, 1, 1 / factor], interp_method=method, antialiasing=True,
                  pad_mode="symmetric")
    up = resize(down, scale_factors=[1, 1, 1, factor], interp_method=method, antialiasing=True,
                pad_mode="symmetric")
    return torch.from_numpy(up[:, 0, 0, :].T.copy())  # row i of `up` is M e_i, i.e. column i of M


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
