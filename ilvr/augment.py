"""Random augmentations of training batches: mirror images, and zoom and shift them a little.

A small data set (hundreds of images) trained for hundreds of passes is learnt by heart: every training
image becomes an attractor, and a reference that lies between them (a painting, under ILVR) is pulled to
none of them and comes out as mush. Zooming and shifting each image a little is meant to fill the
space between its copies (the bundled model's card has what it did there), at the price that samples
may also come out a little zoomed or shifted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENT_SHARE = 0.5  # zoom/shift only half the images of a batch: the exact images keep their weight


def random_flips(x0: torch.Tensor, gen: torch.Generator, enabled: bool = True) -> torch.Tensor:
    """Mirror each image of the batch with probability 1/2 when enabled. The coin is tossed either way,
    so switching flips off leaves every later random draw of a run unchanged."""
    flip = (torch.rand(x0.shape[0], generator=gen) < 0.5) & enabled
    return torch.where(flip[:, None, None, None], x0.flip(-1), x0)


def random_zoom_shift(x0: torch.Tensor, gen: torch.Generator, zoom: float = 0.0, shift: float = 0.0) -> torch.Tensor:
    """Zoom half the images of the batch by a factor drawn log-uniformly from [1/(1+zoom), 1+zoom] about
    their centre and shift them by up to ``shift`` of the image size along each axis; the other half is
    left as it is. Pixels brought in from outside repeat the border (the white of emoji and icons, the
    edge of a photo). Resampled bicubically, clamped to [-1, 1]. With zoom and shift 0 nothing is drawn
    from ``gen``, so runs without it keep their random stream."""
    if zoom < 0 or shift < 0:
        raise ValueError(f"zoom and shift must be >= 0, got {zoom} and {shift}")
    if not zoom and not shift:
        return x0
    n = x0.shape[0]
    chosen = torch.rand(n, generator=gen) < AUGMENT_SHARE
    log_scale = (torch.rand(n, generator=gen) * 2 - 1) * torch.log1p(torch.tensor(zoom))
    offset = (torch.rand(n, 2, generator=gen) * 2 - 1) * shift * 2  # grid coordinates span 2 per image side
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = torch.exp(-log_scale)  # the grid shrinks as the image grows
    theta[:, :, 2] = offset
    theta = theta[chosen]  # only the chosen images are resampled
    if not len(theta):
        return x0
    picked = chosen.to(x0.device)
    grid = F.affine_grid(theta.to(x0.dtype), [len(theta), *x0.shape[1:]], align_corners=False)
    out = x0.clone()
    out[picked] = F.grid_sample(x0[picked], grid.to(x0.device), mode="bicubic", padding_mode="border",
                                align_corners=False).clamp(-1, 1)
    return out
