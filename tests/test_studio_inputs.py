"""studio.inputs and the app's use of ilvr.validate: typed values under the app's limits, uploaded
images, the sketch pad and scribble masks."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ilvr import validate  # noqa: E402
from ilvr.images import ImageError  # noqa: E402
from studio import inputs as I  # noqa: E402
from studio.inputs import MAX_ROWS, MAX_SAMPLES, MAX_SEED  # noqa: E402

# ----------------------------------------------------------------------------- typed values


def test_parse_factors_and_errors():
    assert validate.n_factors("2, 4 8;16", 64, MAX_ROWS) == [2, 4, 8, 16]
    assert validate.n_factors([4, "4", 8.0], 64, MAX_ROWS) == [4, 8]
    with pytest.raises(ValueError, match="valid N: 1, 2, 4, 8, 16, 32, 64"):
        validate.n_factors("3", 64, MAX_ROWS)
    with pytest.raises(ValueError, match="whole number"):
        validate.n_factors("two", 64, MAX_ROWS)
    with pytest.raises(ValueError, match="at least one"):
        validate.n_factors(" , ", 64, MAX_ROWS)
    with pytest.raises(ValueError, match="at most 8"):
        validate.n_factors("1,2,4,8,16,32,64,1024,2048", 4096, MAX_ROWS)


def test_parse_single_values():
    assert validate.n_factor("8", 64, from_text=True) == 8 and validate.n_factor(8.0, 64, from_text=True) == 8
    for bad in (True, 2.5, "", None, "8px"):
        with pytest.raises(ValueError):
            validate.n_factor(bad, 64, from_text=True)
    assert validate.stop_step(None, 1000, from_text=True) == 0
    assert validate.stop_step(200.0, 1000, from_text=True) == 200
    with pytest.raises(ValueError, match="between 0 and 1000"):
        validate.stop_step(1001, 1000, from_text=True)
    assert validate.stop_steps("0, 500 1000", 1000, MAX_ROWS) == [0, 500, 1000]
    assert validate.sample_count(3.0, MAX_SAMPLES) == 3
    for bad in (0, 9, "x"):
        with pytest.raises(ValueError):
            validate.sample_count(bad, MAX_SAMPLES)


def test_seeds():
    assert validate.seed_range(5, 3, max_seed=MAX_SEED) == [5, 6, 7]
    random = validate.seed_range(-1, 2, max_seed=MAX_SEED)
    assert random[1] == random[0] + 1 and random[0] >= 0
    with pytest.raises(ValueError):
        validate.seed_range(MAX_SEED, 2, max_seed=MAX_SEED)


# ----------------------------------------------------------------------------- images and masks

def test_reference_image_errors(tmp_path):
    with pytest.raises(ImageError, match="upload a reference image first"):
        I.reference_image(None)
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(ImageError):
        I.reference_image(str(tmp_path / "x.png"))
    rgba = np.zeros((8, 8, 4), np.uint8)
    assert I.reference_image(rgba).mode == "RGB"


def test_sketch_image_empty_and_painted():
    blank = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert I.sketch_image(None) is None
    assert I.sketch_image({"background": None, "layers": [blank], "composite": blank}) is None
    painted = blank.copy()
    painted.paste((255, 0, 0, 255), (8, 8, 24, 24))
    img = I.sketch_image({"background": None, "layers": [painted], "composite": painted})
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((16, 16)) == (255, 0, 0)


def test_scribble_mask_from_layers_and_from_difference():
    bg = Image.new("RGB", (128, 96), (200, 180, 40))  # not square: cropped like the reference
    layer = Image.new("RGBA", (128, 96), (0, 0, 0, 0))
    layer.paste((0, 0, 0, 255), (60, 40, 70, 50))
    comp = Image.alpha_composite(bg.convert("RGBA"), layer)
    mask, cov = I.scribble_mask({"background": bg, "layers": [layer], "composite": comp}, 32, dilate=0)
    assert mask.shape == (32, 32) and 0 < cov < 0.1
    ys, xs = torch.nonzero(mask, as_tuple=True)
    # the square crop keeps x in [16, 112); the stroke at x 60..70, y 40..50 lands near the centre
    assert 12 <= xs.min() and xs.max() <= 19 and 12 <= ys.min() and ys.max() <= 18
    # without layers, the difference between composite and background finds the same strokes
    mask2, _ = I.scribble_mask({"background": bg, "layers": [], "composite": comp}, 32, dilate=0)
    assert torch.equal(mask, mask2)
    grown, cov2 = I.scribble_mask({"background": bg, "layers": [layer], "composite": comp}, 32, dilate=2)
    assert cov2 > cov and bool((grown >= mask).all())
    none, zero = I.scribble_mask({"background": bg, "layers": [], "composite": bg}, 32)
    assert none is None and zero == 0.0
