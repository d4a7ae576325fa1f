"""What users hand the app: uploaded images, the sketch pad, scribbles on the image editor, and the
typed settings every tab shares. Values are checked by ``ilvr.validate`` under the app's own limits.

Gradio passes images as file paths, PIL images or arrays, and editor values as dicts of
``background``, ``layers`` and ``composite``; everything here takes any of those. Every image is held
to one pixel limit (``ilvr.images.MAX_PIXELS``), read from its header before anything is decoded:
``check_pixels``, which the app also runs on uploads before Gradio touches them.
"""
from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from ilvr import validate
from ilvr.images import MAX_PIXELS, ImageError, open_image, square_resize, tensor_to_pil, to_rgb
from ilvr.model import DiffusionModel
from ilvr.sampler import check_unconditional

MAX_ROWS = 8  # rows of a sweep grid
MAX_SAMPLES = 8  # samples per row
MAX_SEED = 2**31 - 1  # the app's seed box (gr.Number) holds 32-bit seeds; the engine takes up to 2**63 - 1


# ----------------------------------------------------------------------------- typed settings

def run_settings(model: DiffusionModel, samples: Any, steps: Any, kernel: Any, sampler: Any,
                 seed: Any) -> tuple[str, list[int]]:
    """The settings of the Advanced accordion, checked for this model (class-conditional ones are
    refused): (the steps spec as text, one seed per sample)."""
    check_unconditional(model)
    steps = str(steps or "").strip()
    validate.steps(steps, model.diffusion.num_train_timesteps)
    validate.kernel(str(kernel))
    validate.sampler(sampler)
    return steps, validate.seed_range(seed, validate.sample_count(samples, MAX_SAMPLES), max_seed=MAX_SEED)


# ----------------------------------------------------------------------------- images

def reference_image(value: Any, what: str = "a reference image") -> Image.Image:
    """An uploaded image (path, PIL or array) as RGB; a clear ImageError when missing or unreadable."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ImageError(f"upload {what} first (or click one of the examples)")
    if isinstance(value, dict):  # an ImageEditor value passed where an image was expected
        value = value.get("composite") or value.get("background")
        if value is None:
            raise ImageError(f"upload {what} first (or click one of the examples)")
    if isinstance(value, (np.ndarray, bytes, bytearray, memoryview)):
        value = _to_pil(value)
    return open_image(value)


def _alpha(img: Image.Image) -> np.ndarray:
    """Opacity in [0, 1] of a drawn layer (a layer without alpha counts as fully drawn where not white)."""
    if "A" in img.getbands():
        return np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    return (rgb.min(axis=2) < 250).astype(np.float32)


def _too_large(size: tuple[int, int], name: str = "the image") -> ImageError | None:
    w, h = size
    if w * h > MAX_PIXELS:
        return ImageError(f"{name} is {w}x{h}: larger than {MAX_PIXELS // 1_000_000} megapixels")
    return None


def check_pixels(source: Any) -> tuple[int, int]:
    """An image's (width, height) read from its header (a file path, bytes or an image); raises
    ImageError when it is over the pixel limit or not an image. Nothing is decoded."""
    if isinstance(source, Image.Image):
        size = source.size
    elif isinstance(source, np.ndarray):
        size = (source.shape[1], source.shape[0]) if source.ndim >= 2 else (0, 0)
    else:
        data = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is checked below
                with Image.open(data) as img:
                    size = img.size
        except Image.DecompressionBombError as e:  # Pillow's own limit, above ours
            raise ImageError(f"the image is larger than {MAX_PIXELS // 1_000_000} megapixels") from e
        except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
            raise ImageError(f"the file is not an image this app can read ({type(e).__name__})") from e
    error = _too_large(size)
    if error is not None:
        raise error
    return size


def _to_pil(x: Any) -> Image.Image:
    """A PIL image from a PIL image, an array, bytes or a file path, keeping its alpha; the pixel limit
    is checked from the header before the file is decoded."""
    check_pixels(x)
    if isinstance(x, Image.Image):
        return x
    if isinstance(x, np.ndarray):
        return Image.fromarray(x if x.dtype == np.uint8 else np.clip(x, 0, 255).astype(np.uint8))
    try:
        img = Image.open(io.BytesIO(x) if isinstance(x, (bytes, bytearray, memoryview)) else x)
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"the image is larger than {MAX_PIXELS // 1_000_000} megapixels") from e
    except OSError as e:
        raise ImageError(f"could not read the image ({type(e).__name__})") from e
    return img


def sketch_image(value: Any) -> Image.Image | None:
    """The painting in a Sketchpad value, flattened on white; None when nothing was painted."""
    if value is None:
        return None
    if not isinstance(value, dict):
        img = reference_image(value, "a painting")
        return None if np.asarray(img).min() >= 250 else img
    layers = [im for im in (value.get("layers") or []) if im is not None]
    composite = value.get("composite")
    if composite is None and not layers:
        return None
    if composite is None:
        composite = layers[0]
    img = to_rgb(_to_pil(composite))
    drawn = any(_alpha(_to_pil(layer)).max() > 0 for layer in layers)
    if not drawn and np.asarray(img).min() >= 250:
        return None
    return img


# ----------------------------------------------------------------------------- scribbles

def scribble_mask(value: dict, size: int, dilate: int = 2) -> tuple[torch.Tensor | None, float]:
    """Where the user drew, as a (size, size) float mask in {0, 1}, grown by ``dilate`` pixels.

    Strokes come from the editor's layers (their alpha) and, for callers that only send a
    background and a composite, from where the composite differs from the background. The mask
    is cropped and resized like the reference. Returns (mask or None if nothing drawn, coverage).
    """
    composite = value.get("composite")
    background = value.get("background")
    base = _to_pil(composite if composite is not None else background)
    w, h = base.size
    drawn = np.zeros((h, w), dtype=np.float32)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer = _to_pil(layer)
        if layer.size != (w, h):
            layer = layer.resize((w, h), Image.Resampling.NEAREST)
        drawn = np.maximum(drawn, _alpha(layer))
    if composite is not None and background is not None:
        bg, comp = to_rgb(_to_pil(background)), to_rgb(_to_pil(composite))
        if bg.size == comp.size:
            diff = np.abs(np.asarray(comp, np.float32) - np.asarray(bg, np.float32)).max(axis=2)
            drawn = np.maximum(drawn, (diff > 24).astype(np.float32))
    if drawn.max() <= 0:
        return None, 0.0
    small = square_resize(Image.fromarray((drawn * 255).astype(np.uint8), "L"), size)
    mask = torch.from_numpy((np.asarray(small, np.float32) > 8).astype(np.float32))
    if dilate > 0:
        mask = torch.nn.functional.max_pool2d(mask[None, None], 2 * dilate + 1, stride=1, padding=dilate)[0, 0]
    coverage = float(mask.mean())
    return (mask if coverage > 0 else None), coverage


def scribble_reference(value: Any) -> Image.Image:
    """The edited image (background with strokes flattened on white) from an ImageEditor value."""
    if value is None or (isinstance(value, dict) and value.get("composite") is None
                         and value.get("background") is None):
        raise ImageError("upload an image to edit first, then draw scribbles on it (or click an example)")
    if not isinstance(value, dict):
        return reference_image(value, "an image to edit")
    return open_image(_to_pil(value["composite"] if value.get("composite") is not None else value["background"]))


def mask_overlay(reference: torch.Tensor, mask: torch.Tensor) -> Image.Image:
    """The reference faded towards white outside the mask: shows where ILVR may change the image."""
    arr = np.asarray(tensor_to_pil(reference).convert("RGB"), np.float32)
    m = mask.cpu().numpy()[..., None]
    faded = 0.35 * arr + 0.65 * 255.0
    return Image.fromarray((m * arr + (1 - m) * faded).clip(0, 255).astype(np.uint8))
