"""Figures for a model card: an unconditional grid and an ILVR grid (rows N = 2, 4, 8, 16, 32).

    python scripts/make_model_card_figures.py --ref examples/paint_smiley.png --ref eval/references/painted_dog.png \
        --steps 100 --out checkpoints/emoji-faces-animals64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ilvr.grid import image_grid, labelled_rows  # noqa: E402
from ilvr.images import load_reference, tensor_to_pil, to_pils  # noqa: E402
from ilvr.loading import load_model  # noqa: E402
from ilvr.registry import DEFAULT_MODEL  # noqa: E402
from ilvr.sampler import sample  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--ref", action="append", required=True, help="reference image(s); one ILVR grid each")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", default="250")
    parser.add_argument("--num", type=int, default=6, help="samples per row")
    parser.add_argument("--factors", default="2,4,8,16,32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = load_model(args.model, device="auto")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x = sample(model, None, seeds=[args.seed + k for k in range(16)], steps=args.steps)
    image_grid(to_pils(x), cols=8).resize((8 * 66 * 2, 2 * 66 * 2), 0).save(out / "samples_unconditional.png")
    for ref_path in args.ref:
        ref = load_reference(ref_path, model.image_size)
        rows = [("reference", [tensor_to_pil(ref)])]
        for n in (int(v) for v in args.factors.split(",")):
            x = sample(model, ref, seeds=[args.seed + k for k in range(args.num)], n_factor=n, steps=args.steps)
            rows.append((f"N = {n}", to_pils(x)))
        name = f"ilvr_grid_{Path(ref_path).stem}.png"
        labelled_rows(rows, cell=128).save(out / name)
        print(f"wrote {out / name}")
    print(f"wrote {out / 'samples_unconditional.png'}")


if __name__ == "__main__":
    main()
