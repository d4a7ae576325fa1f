"""Images in and out: any PIL-readable reference becomes a model-sized tensor; samples become PNGs
that carry their sampling settings."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # bigger than any real photo; guards against decompression bombs
SETTINGS_KEY = "ilvr"
# what training and `sample --ref-dir` take as images (other files in those folders are ignored)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
IMAGE_SUFFIX_TEXT = ", ".join(sorted(IMAGE_SUFFIXES))  # for messages: "images are .bmp, .gif, ..."


def _hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def special_kind(path: str | os.PathLike) -> str | None:
    """What path is when it is no regular file (or link to one): 'a FIFO' (named pipe), 'a character
    device', 'a folder', ...; None for a regular file. Asked with stat before anything opens it: opening a
    FIFO waits for a writer forever, and /dev/zero never ends. A missing path raises FileNotFoundError."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "an unknown kind of file"


def _strerror(e: OSError) -> str:
    return e.strerror or type(e).__name__


def list_files(root: str | os.PathLike, exclude: str | os.PathLike | None = None,
               what: str = "reference folder", unreadable: dict[str, str] | None = None) -> list[str]:
    """Relative POSIX paths of every non-hidden entry under root that is not a folder, sorted (regular
    files, and also FIFOs, devices and broken links, so that the caller reports them instead of losing
    them silently); files under `exclude` (the output folder, when it lies inside root) are left out.

    A subfolder that cannot be listed (no permission) is never skipped silently: with `unreadable` (a
    dict) it is recorded there as 'sub/folder/' -> reason and the listing goes on; without, ValueError
    names it. A root that cannot be listed is always an error."""
    root = Path(root)
    if not root.is_dir():
        if root.exists():
            raise ValueError(f"{what} {root} is not a folder ({special_kind(root) or 'a file'})")
        raise FileNotFoundError(f"{what} not found: {root}")
    skip = Path(exclude).resolve() if exclude is not None else None
    found = []
    errors: dict[str, str] = {}

    def failed(e: OSError) -> None:
        rel = Path(os.path.relpath(e.filename, root)).as_posix() if e.filename is not None else "?"
        errors[rel] = _strerror(e)

    for dirpath, dirnames, filenames in os.walk(root, onerror=failed):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not _hidden(d) and (skip is None or (here / d).resolve() != skip)]
        found.extend((here / name).relative_to(root).as_posix() for name in filenames if not _hidden(name))
    if "." in errors:
        raise ValueError(f"cannot read {what} {root} ({errors['.']})")
    if errors and unreadable is None:
        shown = [f"{rel}/ ({why})" for rel, why in sorted(errors.items())[:3]]
        more = f" and {len(errors) - 3} more" if len(errors) > 3 else ""
        it, its, s = ("them", "their", "s") if len(errors) > 1 else ("it", "its", "")
        raise ValueError(f"cannot read folder{s} {', '.join(shown)}{more} under the {what} {root}: refusing to go "
                         f"on without {its} images; make {it} readable, or move {it} out (or give {it} a name "
                         f"starting with '.') to leave {it} out")
    if unreadable is not None:
        unreadable.update({f"{rel}/": why for rel, why in errors.items()})
    return sorted(found)


def plural(n: int, noun: str) -> str:
    """'1 image', '2 images': counts in messages."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


class ImageError(ValueError):
    """A reference image that cannot be used, with a message meant for the user."""


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB whatever the mode: alpha is composited on white, 16-bit and CMYK are converted."""
    if img.mode in ("La", "RGBa"):  # premultiplied alpha: Pillow converts it only to its straight form
        return to_rgb(img.convert("LA" if img.mode == "La" else "RGBA"))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "I":  # a 16-bit file: a dark one stays dark
            top = 65535.0
        else:  # 32-bit integers: the file does not say its range; take the smallest usual one that holds it
            top = next(t for t in (255.0, 65535.0, 2.0 ** 31 - 1) if arr.max() <= t)
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":  # float pixels: [0, 1] as most tools write them, else stretched to the range found
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if not (lo >= 0 and hi <= 1):
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return Image.fromarray((arr * 255 + 0.5).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def square_resize(img: Image.Image, size: int) -> Image.Image:
    """Center-crop to a square, then an antialiased resize to size x size."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img if side == size else img.resize((size, size), Image.Resampling.LANCZOS if side > size else Image.Resampling.BICUBIC)


def open_image(source: str | os.PathLike | Image.Image) -> Image.Image:
    """Open a file (or take a PIL image), apply its EXIF orientation and return it as RGB."""
    if isinstance(source, Image.Image):
        img = source
    else:
        path = Path(source).expanduser()
        try:
            kind = special_kind(path)  # before any open(): a FIFO would block it
        except (FileNotFoundError, NotADirectoryError):
            if "://" in str(source):
                raise ImageError(f"references are local files; download {source} first") from None
            raise ImageError(f"reference image not found: {path}") from None
        except OSError as e:
            raise ImageError(f"{path} cannot be read ({_strerror(e)})") from None
        if kind == "a folder":
            raise ImageError(f"expected an image file, got a folder: {path}")
        if kind:
            raise ImageError(f"{path} is not a regular file ({kind})")
        try:
            img = Image.open(path)
            if img.size[0] * img.size[1] > MAX_PIXELS:
                raise ImageError(f"{path.name} is {img.size[0]}x{img.size[1]}: larger than {MAX_PIXELS // 1_000_000} megapixels")
            img.load()
        except Image.DecompressionBombError as e:  # Pillow refuses to open it at all: far over our limit
            raise ImageError(f"{path.name} is larger than {MAX_PIXELS // 1_000_000} megapixels") from e
        except UnidentifiedImageError as e:
            raise ImageError(f"{path.name} is not an image Pillow can read ({e.__class__.__name__})") from e
        except OSError as e:
            raise ImageError(f"{path.name} could not be read as an image: {e}") from e
    if img.size[0] < 1 or img.size[1] < 1:
        raise ImageError("the image is empty (0 pixels)")
    if img.size[0] * img.size[1] > MAX_PIXELS:
        raise ImageError(f"image is {img.size[0]}x{img.size[1]}: larger than {MAX_PIXELS // 1_000_000} megapixels")
    return to_rgb(ImageOps.exif_transpose(img))


def load_reference(source: str | os.PathLike | Image.Image | np.ndarray, size: int, channels: int = 3) -> torch.Tensor:
    """A reference as a (channels, size, size) float tensor in [-1, 1]: RGB, or its luma for the
    1-channel (grayscale) models some users train (pass ``channels=model.config.in_channels``).

    source: a file path, a PIL image, or a numpy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4):
    uint8 0..255, uint16 0..65535, bool, or float in [0, 1] (the usual skimage/matplotlib range).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a whole number of pixels above 0, got {size!r}")
    if isinstance(source, np.ndarray):
        source = array_to_pil(source)
    img = square_resize(open_image(source), size)
    return pil_to_tensor(img, channels)


def array_to_pil(arr: np.ndarray) -> Image.Image:
    """An image array in one of the usual layouts and ranges as a PIL image (see load_reference)."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        hint = " (channels first? use arr.transpose(1, 2, 0))" if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) else ""
        raise ImageError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {arr.shape}{hint}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = (arr.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ImageError(f"a float image array must hold values in [0, 1], got {np.nanmin(arr):.3g}.."
                             f"{np.nanmax(arr):.3g} (for 0..255 values use arr.astype(np.uint8))")
        arr = (arr * 255.0 + 0.5).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageError(f"an image array must be uint8, uint16, bool or float in [0, 1], got {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr))


def image_mode(channels: int) -> str:
    """PIL's mode for a model's channel count."""
    if channels not in (1, 3):
        raise ImageError(f"images have 1 (grayscale) or 3 (RGB) channels; this model works on {channels}")
    return "L" if channels == 1 else "RGB"


def pil_to_tensor(img: Image.Image, channels: int = 3) -> torch.Tensor:
    arr = np.asarray(img.convert(image_mode(channels)), dtype=np.float32).reshape(img.size[1], img.size[0], channels)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, H, W) in [-1, 1] to an 8-bit RGB or grayscale PIL image (rounded, clipped).
    A batch of one is taken as its image; for a batch, use ``to_pils`` or ``x[k]``."""
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ImageError(f"expected one image (C, H, W) with 1 or 3 channels, got shape {tuple(x.shape)}"
                         + ("; for a batch use to_pils(x) or x[k]" if x.dim() == 4 else ""))
    mode = image_mode(x.shape[0])
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr[0].numpy() if mode == "L" else arr.permute(1, 2, 0).numpy(), mode)


def to_pils(batch: torch.Tensor) -> list[Image.Image]:
    return [tensor_to_pil(x) for x in batch]


def _plain(value: Any) -> Any:
    """JSON for the numpy and torch scalars a caller's settings may hold (a seed from np.arange, ...)."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"settings value {value!r} ({type(value).__name__}) cannot be written as JSON")


def png_info(settings: dict[str, Any]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(SETTINGS_KEY, json.dumps(settings, sort_keys=True, default=_plain))
    return info


def save_png(img: Image.Image, path: str | os.PathLike, settings: dict[str, Any]) -> Path:
    """Write atomically (temp file, then rename) so a half-written PNG never looks finished."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path.name}: the settings are stored as PNG text, so the name must end in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    img.save(tmp, format="PNG", pnginfo=png_info(settings))
    os.replace(tmp, path)
    return path


def save_animation(frames: list[Image.Image], path: str | os.PathLike, frame_ms: int = 60, hold_ms: int = 1500) -> Path:
    """An endlessly looping GIF of the frames, the last held a while; written atomically like save_png."""
    if not frames:
        raise ValueError("no frames to animate")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=[frame_ms] * (len(frames) - 1) + [hold_ms], disposal=1)
    os.replace(tmp, path)
    return path


def read_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The sampling settings embedded in one of our PNGs."""
    with Image.open(path) as img:
        text = img.info.get(SETTINGS_KEY) or getattr(img, "text", {}).get(SETTINGS_KEY)
    if text is None:
        raise ValueError(f"{path} carries no ILVR settings")
    return json.loads(text)
