"""Guard a refactor: write a fixed set of samples, or compare the current code's samples with such a set.

The set covers the sampler's paths (unconditional, ILVR at several N and filters, a stop step, DDIM, a
mask with and without keep_outside, one reference per sample) on both CPU backends, one thread each,
so a change that should not alter images can be checked bit for bit.

    OMP_NUM_THREADS=1 python scripts/parity_snapshot.py write /tmp/before.pt --model emoji64
    OMP_NUM_THREADS=1 python scripts/parity_snapshot.py compare /tmp/before.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ilvr import load_model, load_reference, sample  # noqa: E402

CASES = {  # name -> sample() keyword arguments (reference/mask names resolved below)
    "uncond": dict(reference=None, seeds=[0, 1], steps="20"),
    "n4_cubic": dict(reference="noto_grinning_face.png", seeds=[3, 4], n_factor=4, steps="25"),
    "n16_box": dict(reference="paint_smiley.png", seeds=[5], n_factor=16, kernel="box", steps="20"),
    "n8_stop500": dict(reference="twemoji_frog.png", seeds=[6, 7], n_factor=8, steps="30", stop_at=500),
    "n1": dict(reference="paint_cat.png", seeds=[8], n_factor=1, steps="10"),
    "ddim": dict(reference="noto_fox.png", seeds=[9], n_factor=8, steps="ddim15", sampler="ddim", eta=0.5),
    "mask_keep": dict(reference="noto_red_apple.png", seeds=[10, 11], n_factor=8, steps="20", mask="box",
                      keep_outside=True, stop_at=200),
    "mask": dict(reference="noto_red_apple.png", seeds=[12], n_factor=4, steps="20", mask="box"),
    "per_sample_refs": dict(reference=["paint_heart.png", "noto_fox.png"], seeds=[13, 14], n_factor=8, steps="15"),
}


def run_cases(model_name: str) -> dict[str, torch.Tensor]:
    out = {}
    for backend in ("onnxruntime", "torch"):
        model = load_model(model_name, device="cpu", cpu_backend=backend)
        size = model.image_size
        for name, kwargs in CASES.items():
            kw = dict(kwargs)
            ref = kw.pop("reference")
            if isinstance(ref, list):
                ref = torch.stack([load_reference(ROOT / "examples" / r, size) for r in ref])
            elif ref is not None:
                ref = load_reference(ROOT / "examples" / ref, size)
            if kw.get("mask") == "box":
                mask = torch.zeros(size, size)
                mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
                kw["mask"] = mask
            out[f"{backend}/{name}"] = sample(model, ref, **kw).cpu()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["write", "compare"])
    parser.add_argument("file")
    parser.add_argument("--model", default="emoji64")
    args = parser.parse_args()
    if torch.get_num_threads() != 1:
        print("warning: run with OMP_NUM_THREADS=1 for results that compare bit for bit", file=sys.stderr)
    if args.action == "write":
        torch.save({"model": args.model, "samples": run_cases(args.model)}, args.file)
        print(f"wrote {len(CASES) * 2} cases to {args.file}")
        return 0
    before = torch.load(args.file, weights_only=True)
    now = run_cases(before["model"])
    bad = 0
    for key, x in before["samples"].items():
        y = now.get(key)
        same = y is not None and y.shape == x.shape and torch.equal(x, y)
        diff = "missing" if y is None else f"max |diff| {(x - y).abs().max().item():.3g}"
        print(f"{'same' if same else 'DIFFERS'}  {key}" + ("" if same else f"  ({diff})"))
        bad += not same
    print(f"{len(before['samples']) - bad} of {len(before['samples'])} cases identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
