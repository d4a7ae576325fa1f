"""Rebuild the bundled model's training data (and the translation tab's second domain) offline.

Sources, both from the npm registry, no Node code run:
  emoji-datasource-google@16.0.0   Noto Color Emoji, 64 px PNGs (images Apache-2.0, package MIT)
  emoji-datasource-twitter@16.0.0  Twemoji, 64 px PNGs (images CC-BY-4.0: attribution required)
Each PNG is composited on white and written as RGB.

    python scripts/build_emoji_dataset.py --out data        # -> data/noto/, data/twemoji/
"""
from __future__ import annotations

import argparse
import subprocess
import tarfile
import tempfile
from pathlib import Path

from PIL import Image

PACKAGES = {"noto": ("emoji-datasource-google", "google"), "twemoji": ("emoji-datasource-twitter", "twitter")}
VERSION = "16.0.0"


def fetch_tarball(package: str, cache: Path) -> Path:
    tarball = cache / f"{package}-{VERSION}.tgz"
    if not tarball.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", f"{package}@{VERSION}", "--silent"], cwd=cache, check=True,
                       stdout=subprocess.DEVNULL)
    return tarball


def extract(tarball: Path, style: str, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"package/img/{style}/64/"
    count = 0
    with tarfile.open(tarball) as tar:
        for member in tar:
            if not (member.isfile() and member.name.startswith(prefix) and member.name.endswith(".png")):
                continue
            with tar.extractfile(member) as f:
                rgba = Image.open(f).convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            Image.alpha_composite(white, rgba).convert("RGB").save(out / Path(member.name).name)
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data", help="folder for noto/ and twemoji/")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "ilvr-emoji-npm"),
                        help="where the npm tarballs are kept")
    parser.add_argument("--only", choices=sorted(PACKAGES), help="build one style only")
    args = parser.parse_args()
    for name, (package, style) in PACKAGES.items():
        if args.only and name != args.only:
            continue
        n = extract(fetch_tarball(package, Path(args.cache)), style, Path(args.out) / name)
        print(f"{name}: {n} images in {Path(args.out) / name}")


if __name__ == "__main__":
    main()
