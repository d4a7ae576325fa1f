"""Reference loading accepts what users upload and explains what it cannot use."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ilvr.images import ImageError, load_reference, read_settings, save_png, tensor_to_pil


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displayed
    path = _save(img, tmp_path / "r.jpg", exif=exif, quality=95)
    x = load_reference(path, 20)  # after rotation the image is 20x40; the center crop keeps a mix
    upright = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270))
    assert upright.shape[:2] == (40, 20)
    top = x[:, :5].mean(dim=(1, 2))
    assert top[2] > top[0]  # the blue half went to the top, as a viewer shows it


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P", "LA"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    base = Image.new("RGB", (30, 30), (10, 200, 30))
    if mode == "I;16":
        img = Image.fromarray((np.ones((30, 30)) * 40000).astype(np.uint16))
    else:
        img = base.convert(mode)
    ext = "jpg" if mode == "CMYK" else "png"
    path = _save(img, tmp_path / f"img.{ext}")
    x = load_reference(path, 16)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_a_dark_16_bit_image_stays_dark(tmp_path):
    path = _save(Image.fromarray(np.full((16, 16), 200, np.uint16)), tmp_path / "dark16.png")  # 200 of 65535
    assert Image.open(path).mode.startswith("I;16")
    assert load_reference(path, 16).max() < -0.98  # not read as 200 of 255 (mid-grey)


def test_transparency_is_composited_on_white(tmp_path):
    path = _save(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), tmp_path / "t.png")
    assert load_reference(path, 8).min() == 1.0


def test_center_crop_keeps_the_middle(tmp_path):
    img = Image.new("RGB", (90, 30), (255, 0, 0))
    img.paste((0, 255, 0), (30, 0, 60, 30))
    x = load_reference(_save(img, tmp_path / "wide.png"), 30)
    assert x[1].mean() > 0.99 and x[0].mean() < -0.99


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_reference(tmp_path / "missing.png", 32)
    with pytest.raises(ImageError, match="folder"):
        load_reference(tmp_path, 32)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(ImageError, match="junk.png"):
        load_reference(junk, 32)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ImageError, match="not an image"):
        load_reference(text, 32)


def test_huge_image_is_refused(tmp_path, monkeypatch):
    import ilvr.images as images
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    with pytest.raises(ImageError, match="larger than"):
        load_reference(path, 32)


def test_image_pillow_refuses_to_open_is_too_large_not_unreadable(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow raises DecompressionBombError at twice this
    with pytest.raises(ImageError, match="bomb.png is larger than 64 megapixels"):
        load_reference(path, 32)


def test_png_carries_settings(tmp_path):
    import torch
    img = tensor_to_pil(torch.zeros(3, 8, 8))
    path = save_png(img, tmp_path / "out" / "a.png", {"N": 8, "seed": 3})
    assert read_settings(path) == {"N": 8, "seed": 3}
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_grayscale_references_and_outputs():
    img = Image.new("RGB", (16, 16), (200, 40, 40))
    ref = load_reference(img, 8, channels=1)
    assert ref.shape == (1, 8, 8)
    out = tensor_to_pil(ref)
    assert out.mode == "L" and abs(out.getpixel((3, 3)) - img.convert("L").getpixel((3, 3))) <= 1
    with pytest.raises(ImageError, match="4"):
        load_reference(img, 8, channels=4)
