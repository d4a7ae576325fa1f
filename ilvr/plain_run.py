"""One whole ILVR run with the plain loop, as a process of its own: load, ``ilvr.algorithm1``, save.

    python -m ilvr.plain_run --model M --ref IMAGE --N 8 --steps 50 --batch 4 --out FOLDER

The whole-run benchmark (``ilvr.whole_runs``) times it as the stand-in for the official sampler when
no checkout of jychoi118/ilvr_adm is given: the same fp32 network in the default layout on PyTorch, the
same loop (resize-right down and up twice per step), one batch, one PNG per sample.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .algorithm1 import algorithm1
from .images import load_reference, tensor_to_pil
from .loading import load_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ilvr.plain_run", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="bundled name, weights file or folder")
    p.add_argument("--ref", required=True, help="reference image")
    p.add_argument("--N", dest="n_factor", type=int, required=True, help="low-pass factor")
    p.add_argument("--steps", required=True, help="respaced steps, as sample --steps")
    p.add_argument("--batch", type=int, required=True, help="samples, all in one batch (seeds 0 .. batch-1)")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    args = p.parse_args(argv)
    model = load_model(args.model, device="cpu", dtype=torch.float32, channels_last=False, cpu_backend="torch")
    reference = load_reference(args.ref, model.image_size, model.config.in_channels)
    samples = algorithm1(model, reference, seeds=list(range(args.batch)), n_factor=args.n_factor, steps=args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(samples):
        tensor_to_pil(image).save(out / f"{k:05d}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
