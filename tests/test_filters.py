import pytest
import torch

from ilvr.filters import KERNELS, LowPass, mirror_pad, resize_right_lowpass, valid_factors

CASES = [(32, n) for n in (2, 4, 8, 16, 32)] + [(45, 3), (45, 9), (63, 7), (64, 64), (65, 13)]


@pytest.mark.parametrize("size,n", CASES)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_a_flat_image_stays_flat(size, n, kernel):
    """Mirrored borders, as the official resizer: zero padding darkened a band N pixels deep at each edge."""
    flat = torch.full((1, 3, size, size), 0.7, dtype=torch.float64)
    assert (LowPass(size, size, n, kernel, dtype=torch.float64)(flat) - 0.7).abs().max() < 1e-12
    # resize-right on the tensor adds float32 epsilons to kernel positions: ~3e-7 (zero padding: 0.3)
    assert (resize_right_lowpass(flat, n, kernel) - 0.7).abs().max() < 1e-6


@pytest.mark.parametrize("size,n", CASES)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_matrix_filter_equals_resize_right(size, n, kernel):
    """The precomputed matrices against resize-right run on the tensor (mirror-padded by hand): the
    two build the border differently, so this checks both."""
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    fast = LowPass(size, size, n, kernel, dtype=torch.float64)(x)
    assert (fast - resize_right_lowpass(x, n, kernel)).abs().max() < 1e-5


def test_n_equal_to_the_size_keeps_only_the_mean():
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    out = LowPass(16, 16, 16, dtype=torch.float64)(x)
    assert torch.allclose(out, x.mean(dim=(2, 3), keepdim=True).expand_as(x), atol=1e-12)


def test_n1_is_the_identity_and_rectangles_work():
    x = torch.randn(1, 3, 24, 40)
    assert LowPass(24, 40, 1)(x) is x
    assert LowPass(24, 40, 8)(x).shape == x.shape
    assert valid_factors(24) == [1, 2, 3, 4, 6, 8, 12, 24]


def test_mirror_pad_repeats_the_edge_and_wraps_for_wide_pads():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert mirror_pad(x, 2, 0).tolist() == [2, 1, 1, 2, 3, 3, 2]
    assert mirror_pad(x, 5, 0).tolist() == [2, 3, 3, 2, 1, 1, 2, 3, 3, 2, 1, 1, 2]


@pytest.mark.parametrize("kwargs,message", [
    (dict(factor=3), "does not divide the image size 32"),
    (dict(factor=0), "positive whole number"),
    (dict(kernel="gauss"), "unknown filter 'gauss'"),
])
def test_bad_factor_or_kernel_is_explained(kwargs, message):
    args = dict(height=32, width=32, factor=4) | kwargs
    with pytest.raises(ValueError, match=message):
        LowPass(**args)
