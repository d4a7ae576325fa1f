"""Make the app's example images in examples/ (small, license-clean, committed).

  * a few Noto emoji (Apache-2.0) and Twemoji (CC-BY-4.0) from data/ (scripts/build_emoji_dataset.py);
  * paintings and scribbles drawn here with Pillow (ours, same license as the project);
  * coloured digits for the 32 px digit models, rendered as scripts/build_digits_dataset.py renders its
    data but with fonts the models never saw (its held-out families) and colours picked here.

    python scripts/make_app_examples.py            # reads data/noto, data/twemoji; writes examples/
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import build_digits_dataset as digits_data  # noqa: E402

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


URW = "/usr/share/fonts/opentype/urw-base35/"
DIGIT_SCALE = 4  # 32 px digits are saved enlarged (nearest neighbour) so the example rows show them
DIGITS = {  # example file -> (digit, colour, background, held-out font file, height px, angle)
    "digit_red3_on_blue.png": (3, (225, 45, 45), (40, 70, 190), "URWGothic-Demi.otf", 24, 0.0),
    "digit_yellow5_on_green.png": (5, (250, 210, 40), (25, 110, 60), "C059-Bold.otf", 24, -6.0),
    "digit_white2_on_purple.png": (2, (245, 245, 245), (110, 50, 150), "URWBookman-Demi.otf", 22, 5.0),
    "digit_orange7_on_teal.png": (7, (250, 140, 30), (20, 120, 130), "P052-Bold.otf", 24, 0.0),
    "digit_one_on_red.png": (1, (255, 255, 255), (200, 30, 40), "URWGothic-Demi.otf", 24, 0.0),
}
# the scribble example: a stroke across the top of the "1" asks the sevens model for a 7
DIGIT_SCRIBBLES = {"scribble_digit_one": ("digit_one_on_red.png",
                                          [((255, 255, 255), [(0.3, 0.2), (0.62, 0.2)], 22)])}


def digit_example(digit: int, colour, background, font: str, height: int, angle: float) -> Image.Image:
    """A coloured digit drawn like the training data (scripts/build_digits_dataset.py), centred."""
    mask = digits_data.glyph_mask(digit, URW + font, 0, angle, height)
    canvas = digits_data.SIZE * digits_data.SCALE
    p = digits_data.Render(digit, URW + font, font, "fonts-urw-base35", height, angle, 0,
                           (canvas - mask.width) // 2, (canvas - mask.height) // 2, background, colour,
                           float(digits_data.delta_e(background, colour)))
    img = digits_data.render(p)
    return img.resize((img.width * DIGIT_SCALE, img.height * DIGIT_SCALE), Image.Resampling.NEAREST)


def paint_digit_seven(size: int = 256) -> Image.Image:
    """A seven painted with two thick yellow brush strokes on a dark blue ground."""
    img = Image.new("RGB", (size, size), (30, 40, 110))
    d = ImageDraw.Draw(img)
    s = size / 256
    yellow = (255, 205, 40)
    d.line([(58 * s, 56 * s), (196 * s, 60 * s)], fill=yellow, width=int(34 * s), joint="curve")
    d.line([(192 * s, 62 * s), (150 * s, 140 * s), (112 * s, 214 * s)], fill=yellow, width=int(34 * s),
           joint="curve")
    return img


def save_scribble(out: Path, name: str, bg: Image.Image, strokes: list[Stroke]) -> None:
    """The editor's three files: background, stroke layer, and the two composited."""
    bg = bg.convert("RGB").resize((EDIT_SIZE, EDIT_SIZE), Image.Resampling.BICUBIC)
    layer = scribble_layer(EDIT_SIZE, strokes)
    composite = Image.alpha_composite(bg.convert("RGBA"), layer).convert("RGB")
    bg.save(out / f"{name}_background.png")
    layer.save(out / f"{name}_layer.png")
    composite.save(out / f"{name}_composite.png")


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
        save_scribble(out, name, Image.open(out / background), strokes)
    for name, spec in DIGITS.items():
        digit_example(*spec).save(out / name)
    paint_digit_seven().save(out / "paint_digit_seven.png")
    for name, (background, strokes) in DIGIT_SCRIBBLES.items():
        save_scribble(out, name, Image.open(out / background), strokes)
    print(f"wrote {len(list(out.glob('*.png')))} images to {out}")


if __name__ == "__main__":
    main()
