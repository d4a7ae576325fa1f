"""Coloured digits at 32x32, rendered offline from freely licensed fonts: the data of the coloured-digits
task (a coloured digit in, a *seven* in the source's colours out, with ILVR and with DDIB).

    apt-get install -y fonts-dejavu-core fonts-liberation2 fonts-noto-core fonts-urw-base35 fonts-freefont-ttf
    python scripts/build_digits_dataset.py --out data/digits

writes (data/ is git-ignored; nothing here is committed but this script)

    data/digits/all/<digit>_<index>.png       training fonts, every digit 0-9 (the source model's data)
    data/digits/sevens/7_<index>.png          training fonts, sevens only (the target model's data)
    data/digits/heldout/<digit>_<index>.png   held-out fonts, every digit (classifier test, translation inputs)
    data/digits/<set>.csv                     per image: digit, font, size, angle, stroke, position, colours, delta E
    data/digits/build.json                    the arguments, the Pillow and FreeType versions, the font split

one folder per model, as ``python -m ilvr train --data data/digits/all --image-size 32`` (and
``.../sevens``) take it; by default 10,000 + 5,000 + 3,000 images, about 40 s on one core.
``--sets`` picks which folders to write, ``--digits`` the digits of ``all`` and ``heldout``, and
``--per-digit`` / ``--sevens`` / ``--heldout-per-digit`` their sizes. Every image has its own random stream,
seeded by (``--seed``, set, digit, index), so an image never depends on how many others were asked for;
the same fonts, Pillow and FreeType give the same bytes (build.json records the versions).

Each image, drawn from its stream:
  font     uniformly from the set's fonts (TRAIN_FONTS for all/ and sevens/, HELDOUT_FONTS for heldout/)
  colours  background and digit uniformly in sRGB, drawn again until their CIELAB delta E (CIE76, D65)
           is at least MIN_DELTA_E = 40, a clearly visible difference in any hue. Delta E rather than
           luminance contrast, so red on an equally light green counts as contrast, as it does to the
           eye; both colours are flat (no texture), composited in sRGB by the glyph's coverage.
  size     the ink's height 14-28 px of 32 (width at most 30 px: a wide glyph is scaled down to fit)
  angle    -15 to 15 degrees
  stroke   Pillow's stroke_width in the digit's colour on a 96 px glyph (thicker strokes): 0-4 px, or
           0-2 px for a bold face (Bold, Demi, Bd in the file name); more closes the apertures of bold
           3s and 5s until they read as 8s at 32 px
  place    anywhere the ink fits with a 1 px margin
The glyph is drawn at 4x (a 96 px font), rotated, scaled to its size and placed on a 128 px coverage
mask, which is box-filtered to 32 px: edges are anti-aliased as a photo of a printed digit would be.

Fonts. The held-out fonts are four families whose designs no training font shares (a geometric sans,
Bookman, Century Schoolbook and Palatino, all from fonts-urw-base35), so a classifier measured on them
meets unseen letterforms, not just unseen files. The training fonts (62 files, 17 families) include
Helvetica/Arial-, Times- and Courier-like designs from three sources each (Nimbus, Liberation, FreeFont),
plus DejaVu and Noto. Licenses, as /usr/share/doc/<package>/copyright states them (Debian 12 versions
in FONT_PACKAGES), to name in a model card or with published data:
  fonts-dejavu-core    Bitstream Vera Fonts license (DejaVu's changes in the public domain)
  fonts-liberation2    SIL Open Font License 1.1
  fonts-noto-core      SIL Open Font License 1.1
  fonts-urw-base35     GNU AGPL 3 with a font exception (held-out fonts; Nimbus fonts for training)
  fonts-freefont-ttf   GNU GPL 3 or later with a font exception
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

# package -> (license as its Debian copyright file states it, the Debian 12 version these images were made with)
FONT_PACKAGES = {
    "fonts-dejavu-core": ("Bitstream Vera Fonts license (DejaVu changes in the public domain)", "2.37-6"),
    "fonts-liberation2": ("SIL Open Font License 1.1", "2.1.5-1"),
    "fonts-noto-core": ("SIL Open Font License 1.1", "20201225-1"),
    "fonts-urw-base35": ("GNU AGPL 3 with a font exception (embedding in documents)", "20200910-7"),
    "fonts-freefont-ttf": ("GNU GPL 3 or later with a font exception (embedding in documents)", "20120503-10"),
}
LICENSE_FILES = {pkg: f"/usr/share/doc/{pkg}/copyright" for pkg in FONT_PACKAGES}

_DEJAVU = "/usr/share/fonts/truetype/dejavu/"
_LIB = "/usr/share/fonts/truetype/liberation2/"
_NOTO = "/usr/share/fonts/truetype/noto/"
_URW = "/usr/share/fonts/opentype/urw-base35/"
_FREE = "/usr/share/fonts/truetype/freefont/"
_FOUR = ("Regular", "Bold", "Italic", "BoldItalic")


def _family(package: str, folder: str, family: str, files: list[str]) -> list[tuple[str, str, str]]:
    return [(package, family, folder + f) for f in files]


# (package, family, file) of the fonts whose images train the models and the classifier
TRAIN_FONTS = [
    *_family("fonts-dejavu-core", _DEJAVU, "DejaVu Sans", ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf"]),
    *_family("fonts-dejavu-core", _DEJAVU, "DejaVu Serif", ["DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf"]),
    *_family("fonts-dejavu-core", _DEJAVU, "DejaVu Sans Mono", ["DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf"]),
    *_family("fonts-liberation2", _LIB, "Liberation Sans", [f"LiberationSans-{s}.ttf" for s in _FOUR]),
    *_family("fonts-liberation2", _LIB, "Liberation Serif", [f"LiberationSerif-{s}.ttf" for s in _FOUR]),
    *_family("fonts-liberation2", _LIB, "Liberation Mono", [f"LiberationMono-{s}.ttf" for s in _FOUR]),
    *_family("fonts-noto-core", _NOTO, "Noto Sans", [f"NotoSans-{s}.ttf" for s in _FOUR]),
    *_family("fonts-noto-core", _NOTO, "Noto Serif", [f"NotoSerif-{s}.ttf" for s in _FOUR]),
    *_family("fonts-noto-core", _NOTO, "Noto Sans Display", [f"NotoSansDisplay-{s}.ttf" for s in _FOUR]),
    *_family("fonts-noto-core", _NOTO, "Noto Serif Display", [f"NotoSerifDisplay-{s}.ttf" for s in _FOUR]),
    *_family("fonts-urw-base35", _URW, "Nimbus Sans", [f"NimbusSans-{s}.otf" for s in _FOUR]),
    *_family("fonts-urw-base35", _URW, "Nimbus Sans Narrow",
             [f"NimbusSansNarrow-{s}.otf" for s in ("Regular", "Bold", "Oblique", "BoldOblique")]),
    *_family("fonts-urw-base35", _URW, "Nimbus Roman", [f"NimbusRoman-{s}.otf" for s in _FOUR]),
    *_family("fonts-urw-base35", _URW, "Nimbus Mono PS", [f"NimbusMonoPS-{s}.otf" for s in _FOUR]),
    *_family("fonts-freefont-ttf", _FREE, "FreeSans",
             [f"FreeSans{s}.ttf" for s in ("", "Bold", "Oblique", "BoldOblique")]),
    *_family("fonts-freefont-ttf", _FREE, "FreeSerif",
             [f"FreeSerif{s}.ttf" for s in ("", "Bold", "Italic", "BoldItalic")]),
    *_family("fonts-freefont-ttf", _FREE, "FreeMono",
             [f"FreeMono{s}.ttf" for s in ("", "Bold", "Oblique", "BoldOblique")]),
]
# never rendered for training: a classifier is measured on them (and translations can start from them)
HELDOUT_FONTS = [
    *_family("fonts-urw-base35", _URW, "URW Gothic",
             [f"URWGothic-{s}.otf" for s in ("Book", "Demi", "BookOblique", "DemiOblique")]),
    *_family("fonts-urw-base35", _URW, "URW Bookman",
             [f"URWBookman-{s}.otf" for s in ("Light", "Demi", "LightItalic", "DemiItalic")]),
    *_family("fonts-urw-base35", _URW, "C059", [f"C059-{s}.otf" for s in ("Roman", "Bold", "Italic", "BdIta")]),
    *_family("fonts-urw-base35", _URW, "P052", [f"P052-{s}.otf" for s in ("Roman", "Bold", "Italic", "BoldItalic")]),
]
FONT_SPLITS = {"train": TRAIN_FONTS, "heldout": HELDOUT_FONTS}

SIZE = 32
SCALE = 4  # drawn at 4x, box-filtered down
FONT_PX = 96
MIN_DELTA_E = 40.0
HEIGHT_RANGE = (14, 28)  # the ink's height in px of SIZE
MAX_WIDTH = 30
ANGLE_RANGE = (-15.0, 15.0)
STROKE_MAX = {"regular": 4, "bold": 2}  # Pillow stroke_width on the FONT_PX glyph
BOLD_WORDS = ("Bold", "Demi", "Bd")
MARGIN = 1

# set name -> (fonts, stream id, folder); stream ids keep the sets' random streams apart
SETS = {"all": ("train", 0), "sevens": ("train", 1), "heldout": ("heldout", 2)}


def srgb_to_lab(rgb) -> np.ndarray:
    """CIELAB (D65) of sRGB colours given as 0-255 values, shape (..., 3)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    d = 6 / 29
    f = np.where(xyz > d ** 3, np.cbrt(xyz), xyz / (3 * d * d) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def delta_e(rgb1, rgb2) -> np.ndarray:
    """CIE76 colour difference: Euclidean distance in CIELAB."""
    return np.linalg.norm(srgb_to_lab(rgb1) - srgb_to_lab(rgb2), axis=-1)


def contrasting_colours(rng: np.random.Generator, min_delta_e: float = MIN_DELTA_E
                        ) -> tuple[tuple[int, int, int], tuple[int, int, int], float]:
    """(background, digit, delta E): both uniform in sRGB, drawn again until delta E >= min_delta_e."""
    while True:
        bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        de = float(delta_e(bg, fg))
        if de >= min_delta_e:
            return tuple(int(v) for v in bg), tuple(int(v) for v in fg), de


@dataclass
class Render:
    """Everything one image is made from (a row of the set's CSV)."""

    digit: int
    font: str  # file path
    family: str
    package: str
    height: int  # the ink's height in px of SIZE (before a wide glyph is scaled to fit)
    angle: float
    stroke: int
    x: int  # top-left of the ink on the SCALE x SIZE canvas
    y: int
    background: tuple[int, int, int]
    colour: tuple[int, int, int]
    delta_e: float


_font_cache: dict[str, ImageFont.FreeTypeFont] = {}


def _font(path: str) -> ImageFont.FreeTypeFont:
    if path not in _font_cache:
        _font_cache[path] = ImageFont.truetype(path, FONT_PX)
    return _font_cache[path]


def glyph_mask(digit: int, font: str, stroke: int, angle: float, height: int) -> Image.Image:
    """The digit's coverage (mode L) at SCALE x, rotated and scaled to `height` px of SIZE, cropped to its ink."""
    f = _font(font)
    text = str(digit)
    left, top, right, bottom = f.getbbox(text, stroke_width=stroke)
    pad = 8
    img = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=f, fill=255, stroke_width=stroke, stroke_fill=255)
    img = img.rotate(angle, resample=Image.BICUBIC, expand=True)
    img = img.crop(img.getbbox())
    scale = height * SCALE / img.height
    if img.width * scale > MAX_WIDTH * SCALE:
        scale = MAX_WIDTH * SCALE / img.width
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)


def draw_params(rng: np.random.Generator, digit: int, fonts: list[tuple[str, str, str]],
                stroke_max: dict[str, int] | None = None) -> Render:
    """One image's parameters; stroke_max overrides STROKE_MAX (the classifier trains on thicker strokes)."""
    package, family, font = fonts[int(rng.integers(len(fonts)))]
    bg, fg, de = contrasting_colours(rng)
    height = int(rng.integers(HEIGHT_RANGE[0], HEIGHT_RANGE[1] + 1))
    angle = round(float(rng.uniform(*ANGLE_RANGE)), 2)
    weight = "bold" if any(w in Path(font).name for w in BOLD_WORDS) else "regular"
    stroke = int(rng.integers(0, (stroke_max or STROKE_MAX)[weight] + 1))
    mask = glyph_mask(digit, font, stroke, angle, height)
    room_x = SIZE * SCALE - 2 * MARGIN * SCALE - mask.width
    room_y = SIZE * SCALE - 2 * MARGIN * SCALE - mask.height
    x = MARGIN * SCALE + int(rng.integers(0, max(room_x, 0) + 1))
    y = MARGIN * SCALE + int(rng.integers(0, max(room_y, 0) + 1))
    return Render(digit, font, family, package, height, angle, stroke, x, y, bg, fg, de)


def coverage(p: Render) -> np.ndarray:
    """The glyph's coverage at SIZE px, floats in [0, 1]."""
    canvas = Image.new("L", (SIZE * SCALE, SIZE * SCALE), 0)
    canvas.paste(glyph_mask(p.digit, p.font, p.stroke, p.angle, p.height), (p.x, p.y))
    return np.asarray(canvas.resize((SIZE, SIZE), Image.BOX), dtype=np.float64) / 255.0


def composite(alpha: np.ndarray, background, colour) -> Image.Image:
    """Flat colour over a flat background by coverage, in sRGB, as an RGB image."""
    a = alpha[..., None]
    rgb = (1 - a) * np.asarray(background, np.float64) + a * np.asarray(colour, np.float64)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


def render(p: Render) -> Image.Image:
    return composite(coverage(p), p.background, p.colour)


def image_rng(seed: int, stream: int, digit: int, index: int) -> np.random.Generator:
    """The random stream of one image: it never depends on how many other images are made."""
    return np.random.default_rng([seed, stream, digit, index])


def make_digit(seed: int, stream: int, digit: int, index: int, fonts: list[tuple[str, str, str]]
               ) -> tuple[Image.Image, Render]:
    p = draw_params(image_rng(seed, stream, digit, index), digit, fonts)
    return render(p), p


def missing_fonts(fonts: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    return [(pkg, path) for pkg, _, path in fonts if not Path(path).is_file()]


def write_set(out: Path, name: str, digits: list[int], per_digit: int, seed: int) -> tuple[int, Path]:
    split, stream = SETS[name]
    fonts = FONT_SPLITS[split]
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for d in digits:
        for k in range(per_digit):
            img, p = make_digit(seed, stream, d, k, fonts)
            file = folder / f"{d}_{k}.png"
            img.save(file)
            row = asdict(p)
            row.update(file=f"{name}/{file.name}", font=Path(p.font).name, background="#%02x%02x%02x" % p.background,
                       colour="#%02x%02x%02x" % p.colour, delta_e=round(p.delta_e, 2))
            rows.append(row)
    table = out / f"{name}.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", *(k for k in rows[0] if k != "file")])
        w.writeheader()
        w.writerows(rows)
    return len(rows), table


def parse_digits(text: str) -> list[int]:
    digits = sorted({int(c) for c in text.replace(",", "") if c.isdigit()})
    if not digits or any(c not in "0123456789, " for c in text):
        raise argparse.ArgumentTypeError(f"--digits takes digits such as 0123456789 or 7, got {text!r}")
    return digits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/digits", help="output folder (default data/digits)")
    ap.add_argument("--sets", default="all,sevens,heldout",
                    help="which folders to write, comma-separated from all, sevens, heldout (default all three)")
    ap.add_argument("--digits", type=parse_digits, default=list(range(10)),
                    help="the digits of all/ and heldout/ (default 0123456789)")
    ap.add_argument("--per-digit", type=int, default=1000, help="images per digit in all/ (default 1000)")
    ap.add_argument("--sevens", type=int, default=5000, help="images in sevens/ (default 5000)")
    ap.add_argument("--heldout-per-digit", type=int, default=300, help="images per digit in heldout/ (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in sets if s not in SETS]
    if unknown or not sets:
        ap.error(f"--sets takes all, sevens, heldout; got {args.sets!r}")
    needed = {split for s in sets for split in [SETS[s][0]]}
    missing = [m for split in needed for m in missing_fonts(FONT_SPLITS[split])]
    if missing:
        packages = sorted({pkg for pkg, _ in missing})
        print(f"error: {len(missing)} font files missing (first: {missing[0][1]}); install them with\n"
              f"    apt-get install -y {' '.join(packages)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"all": (args.digits, args.per_digit), "sevens": ([7], args.sevens),
             "heldout": (args.digits, args.heldout_per_digit)}
    for name in sets:
        digits, count = sizes[name]
        n, table = write_set(out, name, digits, count, args.seed)
        split = SETS[name][0]
        families = sorted({fam for _, fam, _ in FONT_SPLITS[split]})
        print(f"wrote {n} images to {out / name} (digits {''.join(map(str, digits))}, {len(FONT_SPLITS[split])} "
              f"{split} font files in {len(families)} families) and {table}")
    build = {"args": {k: v for k, v in vars(args).items()}, "pillow": Image.__version__,
             "freetype": features.version("freetype2"), "min_delta_e": MIN_DELTA_E, "size": SIZE,
             "fonts": {split: [{"package": p, "family": fam, "file": f} for p, fam, f in fonts]
                       for split, fonts in FONT_SPLITS.items()},
             "licenses": {pkg: lic for pkg, (lic, _) in FONT_PACKAGES.items()}}
    (out / "build.json").write_text(json.dumps(build, indent=2) + "\n")
    print(f"wrote {out / 'build.json'}")
    for name in ("all", "sevens"):
        if name in sets:
            print(f"train on {name}/ with: python -m ilvr train --data {out / name} --image-size {SIZE} --out ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
