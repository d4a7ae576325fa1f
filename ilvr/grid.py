"""Labelled image grids (the paper's Fig. 4 layout: one row per setting)."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def image_grid(images: list[Image.Image], cols: int, pad: int = 2, background=(255, 255, 255)) -> Image.Image:
    if not images:
        raise ValueError("no images to put in a grid")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), background)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def labelled_rows(rows: list[tuple[str, list[Image.Image]]], cell: int | None = None, pad: int = 2,
                  label_width: int | None = None) -> Image.Image:
    """Rows of images with a text label at the left of each row (label column sized to fit by default)."""
    if not rows or not rows[0][1]:
        raise ValueError("no images to put in a grid")
    size = cell or rows[0][1][0].size[0]
    cols = max(len(images) for _, images in rows)
    font = ImageFont.load_default(size=max(10, min(18, size // 4)))
    if label_width is None:
        label_width = int(max(font.getlength(label) for label, _ in rows)) + 16
    out = Image.new("RGB", (label_width + cols * (size + pad) + pad, len(rows) * (size + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (size + pad)
        draw.text((6, y + size // 2), label, fill=(0, 0, 0), font=font, anchor="lm")
        for c, im in enumerate(images):
            out.paste(im.convert("RGB").resize((size, size), Image.Resampling.NEAREST if im.size[0] < size else Image.Resampling.LANCZOS),
                      (label_width + pad + c * (size + pad), y))
    return out
