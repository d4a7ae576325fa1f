"""The bundled model (checkpoints/emoji64) loads offline and shows ILVR's behaviour: N sets the freedom."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from ilvr.filters import LowPass
from ilvr.images import pil_to_tensor
from ilvr.loading import load_model
from ilvr.registry import BUNDLED, DEFAULT_MODEL
from ilvr.sampler import sample

pytestmark = pytest.mark.skipif(not (BUNDLED[DEFAULT_MODEL].path / "model.safetensors").exists(),
                                reason="bundled model not present")


def smiley(size: int = 64) -> torch.Tensor:
    """A drawn yellow smiley on white: the kind of reference the emoji model knows."""
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    s = size / 64
    d.ellipse([6 * s, 6 * s, 58 * s, 58 * s], fill=(255, 200, 40), outline=(200, 120, 0), width=max(1, int(2 * s)))
    d.ellipse([20 * s, 20 * s, 27 * s, 30 * s], fill=(60, 40, 20))
    d.ellipse([37 * s, 20 * s, 44 * s, 30 * s], fill=(60, 40, 20))
    d.arc([18 * s, 26 * s, 46 * s, 48 * s], 20, 160, fill=(60, 40, 20), width=max(1, int(3 * s)))
    return pil_to_tensor(img)


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_MODEL, device="cpu")


def test_bundled_model_loads_and_samples(model):
    assert model.image_size == 64
    x = sample(model, None, seeds=[0, 1], steps="10")
    assert x.shape == (2, 3, 64, 64) and torch.isfinite(x).all()


def test_n_controls_diversity_and_fidelity(model):
    ref = smiley()
    phi4 = LowPass(64, 64, 4)
    diversity, distance = [], []
    for n in (2, 8, 32):
        x = sample(model, ref, seeds=[10, 11, 12, 13], n_factor=n, steps="25").clamp(-1, 1)
        pairs = list(itertools.combinations(range(len(x)), 2))
        diversity.append(sum(((x[i] - x[j]) ** 2).mean().sqrt().item() for i, j in pairs) / len(pairs))
        distance.append(((phi4(x) - phi4(ref[None])) ** 2).mean().sqrt().item())
    assert diversity[0] < diversity[1] < diversity[2], diversity
    assert distance[0] < distance[1] < distance[2], distance


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_every_bundled_model_loads_samples_and_has_a_card(name):
    entry = BUNDLED[name]
    if not (entry.path / "model.safetensors").exists():
        pytest.skip(f"{name} not present")
    m = load_model(name, device="cpu")
    assert m.image_size == entry.image_size
    assert (entry.path / "README.md").is_file()  # the model card: data, licenses, recipe, figures
    x = sample(m, None, seeds=[0], steps="5")
    assert x.shape == (1, 3, entry.image_size, entry.image_size) and torch.isfinite(x).all()


@pytest.mark.skipif(not (BUNDLED["digits-sevens32"].path / "model.safetensors").exists(),
                    reason="digit model not present")
def test_digit_models_are_small_and_keep_the_ilvr_properties():
    m = load_model("digits-sevens32", device="cpu")
    assert (BUNDLED["digits-sevens32"].path / "model.safetensors").stat().st_size < 5e6
    ref = pil_to_tensor(Image.open(Path(__file__).resolve().parent.parent / "examples" / "digit_red3_on_blue.png").convert("RGB").resize((32, 32)))
    assert (sample(m, ref, seeds=[0], n_factor=1, steps="10")[0] - ref).abs().max().item() <= 1 / 255  # N=1: the ref
    phi2 = LowPass(32, 32, 2)
    distance = [((phi2(sample(m, ref, seeds=[0, 1, 2], n_factor=n, steps="25").clamp(-1, 1)) - phi2(ref[None])) ** 2)
                .mean().sqrt().item() for n in (2, 8, 16)]
    assert distance[0] < distance[1] < distance[2], distance
