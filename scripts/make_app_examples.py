"""Make the app's example images in examples/ (small, license-clean, committed).

  * a few Noto emoji (Apache-2.0) and Twemoji (CC-BY-4.0) from data/ (scripts/build_emoji_dataset.py);
  * paintings and scribbles drawn here with Pillow (ours, same license as the project).

    python scripts/make_app_examples.py            # reads data/noto, data/twemoji; writes examples/
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent

COPIES = {  # example file -> (style, code point file)
    "noto_grinning_face.png": ("noto", "1f600"),
    "noto_fox.png": ("noto", "1f98a"),
    "noto_red_apple.png": ("noto", "1f34e"),
    "twemoji_cat_face.png": ("twemoji", "1f431"),
    "twemoji_frog.png": ("twemoji", "1f438"),
    "twemoji_sun_with_face.png": ("twemoji", "1f31e"),
}
EDIT_SIZE = 256  # scribble backgrounds are enlarged so there is room to draw


def paint_smiley(size: int = 256) -> Image.Image:
    """A flat clip-art smiley: yellow disc, two eyes, a smile."""
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    s = size / 256
    d.ellipse([28 * s, 28 * s, 228 * s, 228 * s], fill=(255, 204, 51), outline=(230, 160, 20), width=int(6 * s))
    d.ellipse([88 * s, 80 * s, 112 * s, 124 * s], fill=(80, 50, 20))
    d.ellipse([144 * s, 80 * s, 168 * s, 124 * s], fill=(80, 50, 20))
    d.arc([72 * s, 100 * s, 184 * s, 196 * s], 20, 160, fill=(80, 50, 20), width=int(10 * s))
    return img


def paint_heart(size: int = 256) -> Image.Image:
    """A red heart from two discs and a triangle, with a white highlight stroke."""
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    s = size / 256
    red = (225, 40, 60)
    d.ellipse([36 * s, 48 * s, 136 * s, 148 * s], fill=red)
    d.ellipse([120 * s, 48 * s, 220 * s, 148 * s], fill=red)
    d.polygon([(42 * s, 118 * s), (214 * s, 118 * s), (128 * s, 214 * s)], fill=red)
    d.line([(70 * s, 80 * s), (90 * s, 70 * s)], fill=(255, 170, 180), width=int(10 * s))
    return img


def paint_cat(size: int = 256) -> Image.Image:
    """A child-like orange cat face: disc, two ear triangles, eyes, nose."""
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    s = size / 256
    orange = (245, 160, 50)
    d.polygon([(50 * s, 110 * s), (70 * s, 30 * s), (120 * s, 80 * s)], fill=orange)
    d.polygon([(206 * s, 110 * s), (186 * s, 30 * s), (136 * s, 80 * s)], fill=orange)
    d.ellipse([40 * s, 60 * s, 216 * s, 224 * s], fill=orange)
    d.ellipse([90 * s, 115 * s, 108 * s, 140 * s], fill=(40, 30, 20))
    d.ellipse([148 * s, 115 * s, 166 * s, 140 * s], fill=(40, 30, 20))
    d.polygon([(118 * s, 160 * s), (138 * s, 160 * s), (128 * s, 172 * s)], fill=(230, 90, 120))
    return img


Stroke = tuple[tuple[int, int, int], list[tuple[float, float]], int]


def scribble_layer(size: int, strokes: list[Stroke]) -> Image.Image:
    """A transparent layer with brush strokes (colour, points in 0..1, width in px at 256)."""
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    for color, points, width in strokes:
        pts = [(x * size, y * size) for x, y in points]
        w = int(width * size / 256)
        d.line(pts, fill=color + (255,), width=w, joint="curve")
        for p in (pts[0], pts[-1]):
            d.ellipse([p[0] - w / 2, p[1] - w / 2, p[0] + w / 2, p[1] + w / 2], fill=color + (255,))
    return layer


SCRIBBLES = {  # name -> (background example, strokes)
    "scribble_sunglasses": ("noto_grinning_face.png",
                            [((25, 25, 30), [(0.22, 0.36), (0.45, 0.36), (0.55, 0.36), (0.78, 0.36)], 34)]),
    "scribble_green_apple": ("noto_red_apple.png",
                             [((90, 190, 60), [(0.3, 0.45), (0.5, 0.4), (0.7, 0.45), (0.7, 0.65), (0.5, 0.75),
                                               (0.3, 0.65), (0.32, 0.5), (0.5, 0.55), (0.62, 0.58)], 46)]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data"))
    parser.add_argument("--out", default=str(ROOT / "examples"))
    args = parser.parse_args()
    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    for name, (style, code) in COPIES.items():
        shutil.copyfile(data / style / f"{code}.png", out / name)
    paint_smiley().save(out / "paint_smiley.png")
    paint_heart().save(out / "paint_heart.png")
    paint_cat().save(out / "paint_cat.png")
    for name, (background, strokes) in SCRIBBLES.items():
        bg = Image.open(out / background).convert("RGB").resize((EDIT_SIZE, EDIT_SIZE), Image.Resampling.BICUBIC)
        layer = scribble_layer(EDIT_SIZE, strokes)
        composite = Image.alpha_composite(bg.convert("RGBA"), layer).convert("RGB")
        bg.save(out / f"{name}_background.png")
        layer.save(out / f"{name}_layer.png")
        composite.save(out / f"{name}_composite.png")
    print(f"wrote {len(list(out.glob('*.png')))} images to {out}")


if __name__ == "__main__":
    main()
