"""Rebuild the bundled models' training data (and the translation tab's second domain) offline.

Sources, both from the npm registry, no Node code run:
  emoji-datasource-google@16.0.0   Noto Color Emoji, 64 px PNGs (images Apache-2.0, package MIT)
  emoji-datasource-twitter@16.0.0  Twemoji, 64 px PNGs (images CC-BY-4.0: attribution required)
Each PNG is composited on white and written as RGB.

    python scripts/build_emoji_dataset.py --out data        # -> data/noto/, data/twemoji/, data/noto-faces-animals/

data/noto-faces-animals/ is the bundled emoji-faces-animals64 model's training set: the Noto emoji of
one domain (faces, animals, plants, fruit and vegetables; default skin tone only, as emoji.json lists
skin-tone variants apart), chosen from the package's emoji.json by category. data/noto/ is every Noto
image (the older emoji64 model's training set).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

from PIL import Image

PACKAGES = {"noto": ("emoji-datasource-google", "google"), "twemoji": ("emoji-datasource-twitter", "twitter")}
VERSION = "16.0.0"
# emoji.json (category, subcategory) pairs of the faces-and-animals domain; None takes a whole category
FACES_ANIMALS = {("Smileys & Emotion", None), ("Animals & Nature", None),
                 ("Food & Drink", "food-fruit"), ("Food & Drink", "food-vegetable")}


def fetch_tarball(package: str, cache: Path) -> Path:
    tarball = cache / f"{package}-{VERSION}.tgz"
    if not tarball.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", f"{package}@{VERSION}", "--silent"], cwd=cache, check=True,
                       stdout=subprocess.DEVNULL)
    return tarball


def domain_images(tarball: Path, style: str, domain: set[tuple[str, str | None]]) -> set[str]:
    """PNG names of the emoji in the domain, default skin tone only, from the package's emoji.json."""
    with tarfile.open(tarball) as tar:
        entries = json.load(tar.extractfile("package/emoji.json"))
    return {e["image"] for e in entries if e.get(f"has_img_{style}")
            and ((e["category"], None) in domain or (e["category"], e["subcategory"]) in domain)}


def extract(tarball: Path, style: str, out: Path, only: set[str] | None = None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"package/img/{style}/64/"
    count = 0
    with tarfile.open(tarball) as tar:
        for member in tar:
            if not (member.isfile() and member.name.startswith(prefix) and member.name.endswith(".png")):
                continue
            name = Path(member.name).name
            if only is not None and name not in only:
                continue
            with tar.extractfile(member) as f:
                rgba = Image.open(f).convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            Image.alpha_composite(white, rgba).convert("RGB").save(out / name)
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data", help="folder for noto/, twemoji/ and noto-faces-animals/")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "ilvr-emoji-npm"),
                        help="where the npm tarballs are kept")
    parser.add_argument("--only", choices=sorted(PACKAGES) + ["noto-faces-animals"], help="build one folder only")
    args = parser.parse_args()
    out = Path(args.out)
    for name, (package, style) in PACKAGES.items():
        if args.only and not args.only.startswith(name):
            continue
        tarball = fetch_tarball(package, Path(args.cache))
        if args.only in (None, name):
            print(f"{name}: {extract(tarball, style, out / name)} images in {out / name}")
        if name == "noto" and args.only in (None, "noto-faces-animals"):
            chosen = domain_images(tarball, style, FACES_ANIMALS)
            n = extract(tarball, style, out / "noto-faces-animals", chosen)
            print(f"noto-faces-animals: {n} images in {out / 'noto-faces-animals'}")


if __name__ == "__main__":
    main()
