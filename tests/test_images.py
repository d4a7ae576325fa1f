"""Reference loading accepts what users upload and explains what it cannot use."""
from __future__ import annotations

import numpy as np
import pytest
import torch
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


def test_references_must_be_regular_files(tmp_path):
    """A device or a broken link is named as such, before anything opens it (a FIFO would block the open;
    tests/test_security_cli.py runs that case in a child process with a time limit)."""
    from ilvr.images import list_files

    zero = tmp_path / "zero.png"
    zero.symlink_to("/dev/zero")
    with pytest.raises(ImageError, match=r"zero.png is not a regular file \(a character device\)"):
        load_reference(zero, 8)
    gone = tmp_path / "gone.png"
    gone.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ImageError, match="reference image not found"):
        load_reference(gone, 8)
    assert list_files(tmp_path) == ["gone.png", "zero.png"]  # listed, so the caller reports them
    with pytest.raises(ValueError, match="reference folder .*zero.png is not a folder \\(a character device\\)"):
        list_files(zero)


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
    with pytest.raises(ValueError, match="must end in .png"):
        save_png(img, tmp_path / "out" / "a.jpg", {"N": 8})
    assert not (tmp_path / "out" / "a.jpg").exists()


def test_grayscale_references_and_outputs():
    img = Image.new("RGB", (16, 16), (200, 40, 40))
    ref = load_reference(img, 8, channels=1)
    assert ref.shape == (1, 8, 8)
    out = tensor_to_pil(ref)
    assert out.mode == "L" and abs(out.getpixel((3, 3)) - img.convert("L").getpixel((3, 3))) <= 1
    with pytest.raises(ImageError, match="4"):
        load_reference(img, 8, channels=4)


@pytest.mark.parametrize("array,mean", [
    (np.full((8, 8, 3), 0.5), 0.0039),              # float in [0, 1], the skimage/matplotlib range
    (np.full((8, 8), True), 1.0),                    # bool
    (np.full((8, 8, 1), 255, np.uint8), 1.0),        # (H, W, 1)
    (np.full((8, 8, 3), 65535, np.uint16), 1.0),     # 16-bit
])
def test_image_arrays_in_the_usual_layouts_and_ranges(array, mean):
    assert abs(load_reference(array, 8).mean().item() - mean) < 1e-3


@pytest.mark.parametrize("array,message", [
    (np.zeros((3, 8, 8), np.uint8), "channels first"),
    (np.full((8, 8, 3), 2.0), "float image array must hold values in"),
    (np.zeros((8, 8, 3), np.int64), "must be uint8"),
])
def test_image_arrays_that_are_ambiguous_are_explained(array, message):
    with pytest.raises(ImageError, match=message):
        load_reference(array, 8)


def test_tensor_to_pil_takes_one_image_and_explains_batches():
    assert tensor_to_pil(torch.zeros(1, 3, 8, 8)).size == (8, 8)
    with pytest.raises(ImageError, match="for a batch use to_pils"):
        tensor_to_pil(torch.zeros(2, 3, 8, 8))


def test_premultiplied_and_float_modes(tmp_path):
    assert load_reference(Image.new("La", (8, 8)), 8).shape == (3, 8, 8)
    white = Image.fromarray(np.ones((8, 8), np.float32), mode="F")  # float pixels in [0, 1]: white stays white
    assert load_reference(white, 8).min().item() == 1.0


def test_reference_paths_expand_home_and_urls_are_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    assert load_reference("~/red.png", 8)[0].mean().item() == 1.0
    with pytest.raises(ImageError, match="references are local files"):
        load_reference("https://example.com/a.png", 8)
    with pytest.raises(ValueError, match="size must be"):
        load_reference(tmp_path / "red.png", 0)


def test_settings_with_numpy_values_are_written(tmp_path):
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png", {"seed": np.int64(3), "n": torch.tensor(2)})
    assert read_settings(path) == {"seed": 3, "n": 2}
