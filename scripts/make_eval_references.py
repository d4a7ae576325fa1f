"""Draw the evaluation references in eval/references/: painted subjects of the bundled model's domain
(a face, an animal, a plant) that it never saw in training, as a user would paint them.

    python scripts/make_eval_references.py            # writes eval/references/*.png (256 px)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
SIZE = 256


def canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (SIZE, SIZE), "white")
    return img, ImageDraw.Draw(img)


def paint_surprised_face() -> Image.Image:
    """An orange-yellow face with round eyes, raised brows and an open mouth."""
    img, d = canvas()
    d.ellipse([24, 24, 232, 232], fill=(250, 190, 40))
    for x in (84, 150):
        d.ellipse([x, 82, x + 26, 122], fill=(60, 40, 20))
        d.arc([x - 8, 56, x + 34, 84], 200, 340, fill=(60, 40, 20), width=7)
    d.ellipse([106, 150, 150, 198], fill=(110, 40, 30))
    return img


def paint_dog_face() -> Image.Image:
    """A brown dog's face from the front: floppy dark ears, a lighter muzzle, black nose."""
    img, d = canvas()
    brown, dark, light = (170, 110, 60), (100, 60, 30), (235, 205, 160)
    d.ellipse([56, 40, 200, 200], fill=brown)
    d.ellipse([20, 50, 86, 170], fill=dark)
    d.ellipse([170, 50, 236, 170], fill=dark)
    d.ellipse([86, 120, 170, 206], fill=light)
    d.ellipse([94, 92, 112, 112], fill=(30, 20, 15))
    d.ellipse([144, 92, 162, 112], fill=(30, 20, 15))
    d.ellipse([112, 128, 144, 152], fill=(20, 15, 10))
    d.line([(128, 152), (128, 176)], fill=(20, 15, 10), width=4)
    return img


def paint_tree() -> Image.Image:
    """A round green tree crown on a brown trunk, standing on a strip of grass."""
    img, d = canvas()
    d.rectangle([0, 204, SIZE, SIZE], fill=(110, 180, 70))
    d.rectangle([112, 130, 144, 214], fill=(120, 80, 40))
    d.ellipse([50, 30, 206, 160], fill=(50, 150, 60))
    d.ellipse([80, 50, 130, 95], fill=(80, 180, 80))
    return img


REFERENCES = {"painted_face.png": paint_surprised_face, "painted_dog.png": paint_dog_face,
              "painted_tree.png": paint_tree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "eval" / "references"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    for name, paint in REFERENCES.items():
        paint().save(out / name)
    print(f"wrote {len(REFERENCES)} references to {out}")


if __name__ == "__main__":
    main()
