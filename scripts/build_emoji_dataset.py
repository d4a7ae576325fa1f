"""Rebuild the bundled models' training data (and the translation tab's second domain) offline.

Sources, all from the npm registry, no Node code run:
  emoji-datasource-google@16.0.0        Noto Color Emoji, 64 px PNGs (images Apache-2.0, package MIT)
  emoji-datasource-twitter@16.0.0       Twemoji, 64 px PNGs (images CC-BY-4.0: attribution required)
  @iconify-json/fluent-emoji-flat@1.2.6 Microsoft's Fluent Emoji, flat style, as SVG (MIT); rendered at
                                        64 px with resvg (`pip install resvg-py`, for this set only)
Each image is composited on white and written as RGB.

    python scripts/build_emoji_dataset.py --out data   # -> data/noto/, data/twemoji/, data/noto-faces-animals/,
                                                       #    data/emoji-faces-animals/

data/noto-faces-animals/ is the bundled emoji-faces-animals64 model's training set: the Noto emoji of
one domain (faces, animals, plants, fruit and vegetables; default skin tone only, as emoji.json lists
skin-tone variants apart), chosen from the package's emoji.json by category. data/noto/ is every Noto
image (the older emoji64 model's training set). data/emoji-faces-animals/ is the larger candidate's set:
noto/ (the same Noto images) and fluent/ (the Fluent Flat emoji of the Animals & Nature category).
--fluent-whole-domain writes data/emoji-faces-animals-full/ instead, whose fluent/ covers the whole domain
(a larger variant; the model card says how it compared).
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

from PIL import Image

PACKAGES = {"noto": ("emoji-datasource-google", "google"), "twemoji": ("emoji-datasource-twitter", "twitter")}
VERSION = "16.0.0"
FLUENT_PACKAGE, FLUENT_VERSION = "@iconify-json/fluent-emoji-flat", "1.2.6"
# emoji.json (category, subcategory) pairs of the faces-and-animals domain; None takes a whole category
FACES_ANIMALS = {("Smileys & Emotion", None), ("Animals & Nature", None),
                 ("Food & Drink", "food-fruit"), ("Food & Drink", "food-vegetable")}
FLUENT_PART = {("Animals & Nature", None)}


def fetch_tarball(package: str, cache: Path, version: str = VERSION) -> Path:
    tarball = cache / f"{package.lstrip('@').replace('/', '-')}-{version}.tgz"  # npm pack's own file name
    if not tarball.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", f"{package}@{version}", "--silent"], cwd=cache, check=True,
                       stdout=subprocess.DEVNULL)
    return tarball


def domain_images(entries: list[dict], style: str, domain: set[tuple[str, str | None]]) -> set[str]:
    """PNG names of the emoji in the domain, default skin tone only, from the package's emoji.json."""
    return {e["image"] for e in entries if e.get(f"has_img_{style}") and in_domain(e, domain)}


def emoji_entries(tarball: Path) -> list[dict]:
    with tarfile.open(tarball) as tar:
        return json.load(tar.extractfile("package/emoji.json"))


def in_domain(entry: dict, domain: set[tuple[str, str | None]]) -> bool:
    return (entry["category"], None) in domain or (entry["category"], entry["subcategory"]) in domain


def on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def extract(tarball: Path, style: str, targets: dict[Path, set[str] | None]) -> dict[Path, int]:
    """Unpack the style's 64 px PNGs onto white in one pass over the tarball: each target folder gets
    the images its set names (every image for None). Returns the count written to each folder."""
    for out in targets:
        out.mkdir(parents=True, exist_ok=True)
    prefix = f"package/img/{style}/64/"
    counts = dict.fromkeys(targets, 0)
    with tarfile.open(tarball) as tar:
        for member in tar:
            if not (member.isfile() and member.name.startswith(prefix) and member.name.endswith(".png")):
                continue
            name = Path(member.name).name
            outs = [out for out, only in targets.items() if only is None or name in only]
            if not outs:
                continue
            with tar.extractfile(member) as f:
                image = on_white(Image.open(f).convert("RGBA"))
            for out in outs:
                image.save(out / name)
                counts[out] += 1
    return counts


def extract_fluent(tarball: Path, entries: list[dict], domain: set[tuple[str, str | None]], out: Path,
                   size: int = 64) -> int:
    """Render the Fluent Flat SVGs of the emoji in the domain, named like the Noto PNGs (1f436.png)."""
    try:
        import resvg_py
    except ImportError:
        raise SystemExit("the Fluent emoji are SVGs: pip install resvg-py to render them") from None
    with tarfile.open(tarball) as tar:
        icons = json.load(tar.extractfile("package/icons.json"))
        chars = json.load(tar.extractfile("package/chars.json"))  # code points -> icon name
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for entry in entries:
        if not in_domain(entry, domain):
            continue
        codes = [entry["unified"].lower()] + ([entry["non_qualified"].lower()] if entry.get("non_qualified") else [])
        name = next((chars[c] for c in codes if c in chars), None)
        if name is None:  # the Fluent set lacks a few of the newest emoji
            continue
        icon = icons["icons"][name]
        width, height = icon.get("width", icons.get("width", 16)), icon.get("height", icons.get("height", 16))
        svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
               f'viewBox="0 0 {width} {height}">{icon["body"]}</svg>')
        png = bytes(resvg_py.svg_to_bytes(svg_string=svg))
        on_white(Image.open(io.BytesIO(png)).convert("RGBA")).save(out / entry["image"])
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data", help="folder for noto/, twemoji/ and noto-faces-animals/")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "ilvr-emoji-npm"),
                        help="where the npm tarballs are kept")
    parser.add_argument("--only", choices=sorted(PACKAGES) + ["noto-faces-animals", "emoji-faces-animals"],
                        help="build one folder only")
    parser.add_argument("--fluent-whole-domain", action="store_true",
                        help="Fluent Flat images of every FACES_ANIMALS category, not Animals & Nature only; "
                             "the mixed set goes to emoji-faces-animals-full/")
    args = parser.parse_args()
    out = Path(args.out)
    # the mixed set: Noto's domain plus Fluent Flat's Animals & Nature, or Fluent's whole domain too
    mixed, fluent_part = ((out / "emoji-faces-animals-full", FACES_ANIMALS) if args.fluent_whole_domain
                          else (out / "emoji-faces-animals", FLUENT_PART))
    for name, (package, style) in PACKAGES.items():
        if args.only not in (None, name) and not (name == "noto" and args.only.endswith("faces-animals")):
            continue
        tarball = fetch_tarball(package, Path(args.cache))
        targets: dict[Path, set[str] | None] = {out / name: None} if args.only in (None, name) else {}
        if name == "noto":
            entries = emoji_entries(tarball)
            domain = domain_images(entries, style, FACES_ANIMALS)
            if args.only in (None, "noto-faces-animals"):
                targets[out / "noto-faces-animals"] = domain
            if args.only in (None, "emoji-faces-animals"):
                targets[mixed / "noto"] = domain
        for folder, count in extract(tarball, style, targets).items():
            print(f"{count} images in {folder}")
        if mixed / "noto" in targets:
            fluent = fetch_tarball(FLUENT_PACKAGE, Path(args.cache), FLUENT_VERSION)
            count = extract_fluent(fluent, entries, fluent_part, mixed / "fluent")
            print(f"{count} Fluent Flat images in {mixed / 'fluent'}")


if __name__ == "__main__":
    main()
