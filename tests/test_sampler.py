"""ILVR invariants (paper Algorithm 1) on a random tiny network: they hold whatever the network does."""
from __future__ import annotations

import math

import pytest
import torch

from ilvr.filters import LowPass
from ilvr.model import DiffusionModel
from ilvr.sampler import Cancelled, conditioned_steps, sample
from ilvr.schedule import DiffusionConfig
from conftest import tiny_unet


@pytest.fixture(scope="module")
def model() -> DiffusionModel:
    return DiffusionModel(unet=tiny_unet(), diffusion=DiffusionConfig(), name="tiny")


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    """A smooth image with some structure: a colour gradient with a disc."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    disc = ((xx - 0.2) ** 2 + (yy + 0.1) ** 2 < 0.25).float()
    return torch.stack([xx * 0.8, yy * 0.6, disc * 1.4 - 0.7]).clamp(-1, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) ** 2).mean().item()  # images in [-1, 1]: peak-to-peak 2
    return float("inf") if mse == 0 else 10 * math.log10(4 / mse)


def test_n1_returns_the_reference(model, reference):
    x = sample(model, reference, seeds=[0, 1], n_factor=1, steps="10")
    assert (x - reference).abs().max().item() <= 1 / 255


def test_box_filter_low_frequencies_match_exactly(model, reference):
    x = sample(model, reference, seeds=[0], n_factor=8, kernel="box", steps="10")
    phi = LowPass(32, 32, 8, "box")
    assert (phi(x) - phi(reference[None])).abs().max().item() < 1e-5


def test_cubic_low_frequencies_match_closely(model, reference):
    x = sample(model, reference, seeds=[0, 1], n_factor=4, kernel="cubic", steps="10")
    phi = LowPass(32, 32, 4, "cubic")
    assert psnr(phi(x), phi(reference[None]).expand_as(x)) >= 35


def test_same_seed_same_image_and_different_seeds_differ(model, reference):
    a = sample(model, reference, seeds=[5, 6], n_factor=4, steps="10")
    b = sample(model, reference, seeds=[5, 6], n_factor=4, steps="10")
    assert torch.equal(a, b)
    assert (a[0] - a[1]).abs().mean() > 1e-2


def test_batch_composition_does_not_change_a_sample(model, reference):
    alone = sample(model, reference, seeds=[7], n_factor=4, steps="10")
    in_batch = sample(model, reference, seeds=[3, 7], n_factor=4, steps="10")
    assert (alone[0] - in_batch[1]).abs().max() < 1e-4


def test_stop_at_1000_ignores_the_reference(model, reference):
    a = sample(model, reference, seeds=[2], n_factor=4, steps="10", stop_at=1000)
    b = sample(model, -reference, seeds=[2], n_factor=4, steps="10", stop_at=1000)
    assert torch.equal(a, b)
    c = sample(model, reference, seeds=[2], n_factor=4, steps="10", stop_at=500)
    d = sample(model, -reference, seeds=[2], n_factor=4, steps="10", stop_at=500)
    assert not torch.allclose(c, d)


def test_conditioning_range_is_on_the_1000_step_scale():
    assert conditioned_steps([0, 199, 200, 500], 200) == [False, False, True, True]
    assert all(conditioned_steps([0, 999], 0))


def test_mask_keep_outside_preserves_reference_outside(model, reference):
    mask = torch.zeros(32, 32)
    mask[8:24, 8:24] = 1
    x = sample(model, reference, seeds=[0], n_factor=4, steps="10", stop_at=200, mask=mask, keep_outside=True)
    outside = mask == 0
    assert (x[0][:, outside] - reference[:, outside]).abs().max() <= 1 / 255
    assert (x[0][:, ~outside] - reference[:, ~outside]).abs().max() > 0.05  # the inside was regenerated


def test_ddim_runs_and_progress_reports_every_step(model, reference):
    seen = []
    x = sample(model, reference, seeds=[0], n_factor=4, steps="ddim5", sampler="ddim", progress=lambda s: seen.append(s.index))
    assert seen == [1, 2, 3, 4, 5] and torch.isfinite(x).all()


def test_cancel_from_progress(model, reference):
    def stop(info):
        if info.index == 2:
            raise Cancelled("user pressed cancel")
    with pytest.raises(Cancelled):
        sample(model, reference, seeds=[0], steps="10", progress=stop)


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_factor=3), "does not divide the image size 32"),
    (dict(n_factor=0), "positive whole number"),
    (dict(kernel="gauss"), "unknown filter"),
    (dict(steps="abc"), "steps must be"),
    (dict(stop_at=5000), "stop step must be between"),
    (dict(sampler="euler"), "sampler must be"),
])
def test_bad_settings_are_explained(model, reference, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(model, reference, seeds=[0], **{"steps": "5", **kwargs})


MASK = torch.zeros(32, 32)
MASK[8:24, 8:24] = 1


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(mask=MASK.expand(5, 1, 32, 32)), ValueError, "B = 1 samples"),  # five masks for one seed
    (dict(mask=MASK[None, None, None]), ValueError, "mask must be"),
    (dict(mask=MASK * 255), ValueError, "divide a 0..255 mask by 255"),
    (dict(mask=MASK * 2 - 1), ValueError, "mask values must be in"),
    (dict(keep_outside=True), ValueError, "keep_outside needs a mask"),
    (dict(reference=torch.full((3, 32, 32), 200, dtype=torch.uint8)), TypeError, "uint8 tensor"),
    (dict(reference=torch.full((3, 32, 32), 200.0)), ValueError, "reference values must be in"),
    (dict(reference=torch.full((3, 32, 32), float("nan"))), ValueError, "NaN"),
    (dict(reference=torch.zeros(1, 1, 3, 32, 32)), ValueError, "got 5 dimensions"),
    (dict(reference=MASK.numpy()), TypeError, "ilvr.load_reference"),
    (dict(seeds=4), TypeError, "seeds must be a list of integers"),
    (dict(seeds="12"), TypeError, "seeds must be a list"),
    (dict(seeds=[0.2, 0.9]), TypeError, "seed must be a whole number"),
    (dict(seeds=[-1]), ValueError, "between 0 and 2"),
    (dict(seeds=[]), ValueError, "at least one sample"),
    (dict(sampler="ddim", eta=-1.0), ValueError, "eta must be between 0 and 1"),
    (dict(progress=5), TypeError, "progress must be a function"),
])
def test_api_misuse_is_explained_before_sampling(model, reference, kwargs, error, message):
    args = {"reference": reference, "seeds": [0], "steps": "2", **kwargs}
    with pytest.raises(error, match=message):
        sample(model, args.pop("reference"), **args)


def test_numpy_and_torch_integers_are_seeds_and_factors(model, reference):
    import numpy as np
    a = sample(model, reference, seeds=np.arange(2), n_factor=np.int64(4), steps="2")
    b = sample(model, reference, seeds=[0, 1], n_factor=4, steps="2")
    assert torch.equal(a, b)
    a.clamp_(-1, 1)  # an ordinary tensor, not an inference-mode one
    assert not a.is_inference()


def test_wrong_reference_shape_is_explained(model):
    with pytest.raises(ValueError, match="reference must be 3x32x32"):
        sample(model, torch.zeros(3, 64, 64), seeds=[0], steps="5")


def test_class_conditional_models_are_explained(reference):
    """guided-diffusion's class-conditional ImageNet models load (``ilvr info`` describes them) but need
    a class label per sample, which ILVR has no use for: say so instead of failing inside the UNet."""
    conditional = DiffusionModel(unet=tiny_unet(num_classes=10), diffusion=DiffusionConfig(), name="imagenet")
    with pytest.raises(ValueError, match="class-conditional.*unconditional variant"):
        sample(conditional, reference, seeds=[0], steps="5")


def test_reference_is_noised_to_x_t_minus_1s_level_at_every_conditioned_step(model, reference):
    """Algorithm 1 noises y to x_{t-1}'s level, y_{t-1} = sqrt(abar_{t-1}) y + sqrt(1 - abar_{t-1}) eps, and
    corrects every step, not only the last. At N=1 phi is the identity, so x_{t-1} is y_{t-1} itself:
    the network's input at each next step must be exactly that (the official code's x_t level, or a
    skipped step, would differ)."""
    seeds, steps, shape = [11, 12], "8", (3, 32, 32)
    inputs = []
    model.predict = lambda x, t: (inputs.append(x.clone()), DiffusionModel.predict(model, x, t))[1]
    try:
        sample(model, reference, seeds=seeds, n_factor=1, steps=steps)
    finally:
        del model.predict
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def draw():
        return torch.stack([torch.randn(shape, generator=g) for g in generators])

    schedule = model.schedule.respace(steps)
    assert torch.equal(inputs[0], draw())  # x_T
    for k, i in enumerate(reversed(range(1, schedule.num_steps))):  # steps whose result feeds the network again
        draw()  # z of step i
        eps = draw()
        abar_prev = float(schedule.alphas_cumprod_prev[i])
        expected = math.sqrt(abar_prev) * reference + math.sqrt(1 - abar_prev) * eps
        assert (inputs[k + 1] - expected).abs().max().item() < 1e-5, f"step {i}"
        x_t_level = math.sqrt(float(schedule.alphas_cumprod[i])) * reference + math.sqrt(1 - float(schedule.alphas_cumprod[i])) * eps
        assert (inputs[k + 1] - x_t_level).abs().max().item() > 1e-3  # the official code's level is told apart


def test_sampler_and_algorithm1_agree_at_every_step(model, reference):
    """The fast sampler (phi once, as matrices) against the paper's loop written plainly (resize-right twice)."""
    from ilvr.algorithm1 import algorithm1

    for n, kernel, stop_at in [(4, "cubic", 0), (8, "box", 0), (2, "cubic", 500)]:
        ours = sample(model, reference, seeds=[3, 4], n_factor=n, kernel=kernel, steps="6", stop_at=stop_at)
        plain = algorithm1(model, reference, seeds=[3, 4], n_factor=n, kernel=kernel, steps="6", stop_at=stop_at)
        assert (ours - plain).abs().max().item() < 1e-4, (n, kernel, stop_at)


def test_phi_n_matrix_matches_numbers_from_resize_right():
    """phi_2 (cubic) and phi_4 (box) on 8 pixels, computed once with resize-right 0.0.2 (antialiasing,
    symmetric padding as the official resizer mirrors borders) and written down here: a change to the
    filter's maths cannot pass unnoticed."""
    from ilvr.filters import _axis_matrix

    cubic_2 = torch.tensor([
        [0.602539, 0.425171, 0.070435, -0.079102, -0.023438, 0.003296, 0.001099, 0.0],
        [0.425171, 0.343445, 0.179993, 0.067566, 0.006165, -0.018127, -0.00531, 0.001099],
        [0.070435, 0.179993, 0.399109, 0.360901, 0.065369, -0.060974, -0.018127, 0.003296],
        [-0.079102, 0.067566, 0.360901, 0.404419, 0.19812, 0.065369, 0.006165, -0.023438],
        [-0.023438, 0.006165, 0.065369, 0.19812, 0.404419, 0.360901, 0.067566, -0.079102],
        [0.003296, -0.018127, -0.060974, 0.065369, 0.360901, 0.399109, 0.179993, 0.070435],
        [0.001099, -0.00531, -0.018127, 0.006165, 0.067566, 0.179993, 0.343445, 0.425171],
        [0.0, 0.001099, 0.003296, -0.023438, -0.079102, 0.070435, 0.425171, 0.602539]], dtype=torch.float64)
    assert torch.allclose(_axis_matrix(8, 2, "cubic"), cubic_2, atol=1e-6)
    box_4 = torch.kron(torch.eye(2, dtype=torch.float64), torch.full((4, 4), 0.25, dtype=torch.float64))
    assert torch.allclose(_axis_matrix(8, 4, "box"), box_4, atol=1e-12)
