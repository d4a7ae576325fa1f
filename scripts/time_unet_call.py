"""Time one UNet call on CPU: our eager PyTorch path against the onnxruntime session (ilvr.onnx_cpu).

    OMP_NUM_THREADS=2 python scripts/time_unet_call.py                 # bundled model and 256 px ADM
    OMP_NUM_THREADS=2 python scripts/time_unet_call.py --models bundled --calls 40
    OMP_NUM_THREADS=2 python scripts/time_unet_call.py --models bundled --batch 8

Alternates the two backends, round after round, on the same input, and prints the median call of each
round, the export and session times and the largest output difference.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ilvr.bench import ffhq_p2_configs, random_model  # noqa: E402
from ilvr.loading import load_model  # noqa: E402
from ilvr.model import inference_unet  # noqa: E402
from ilvr.runtime.onnx_cpu import OnnxUNet  # noqa: E402


def median_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bundled,adm256")
    p.add_argument("--calls", type=int, default=None, help="calls per round (default 20 bundled, 2 adm256)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="images per call (the app's grids run 5-30 at once)")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}")
    for name in args.models.split(","):
        if name == "bundled":
            model = load_model("emoji64", device="cpu", cpu_backend="torch")
        else:
            unet_cfg, diffusion = ffhq_p2_configs()
            model = random_model(unet_cfg, diffusion, name="adm256-ffhq-p2")
            model.unet = inference_unet(model.unet, torch.device("cpu"), torch.float32, channels_last=True)
        t0 = time.perf_counter()
        runtime = OnnxUNet(model.unet)
        setup_s = time.perf_counter() - t0
        size = model.image_size
        x, t = torch.randn(args.batch, 3, size, size), torch.full((args.batch,), 500)
        calls = args.calls or (20 if name == "bundled" else 2)
        with torch.inference_mode():
            diff = (runtime(x, t) - model.predict(x, t)).abs().max().item()
            print(f"{name}: export + session {setup_s:.1f} s, max |onnxruntime - pytorch| = {diff:.1e}")
            for r in range(args.rounds):
                eager = median_ms(lambda: model.predict(x, t), calls)
                ort = median_ms(lambda: runtime(x, t), calls)
                print(f"  round {r + 1}: pytorch {eager:.1f} ms, onnxruntime {ort:.1f} ms ({eager / ort:.2f}x)",
                      flush=True)


if __name__ == "__main__":
    main()
