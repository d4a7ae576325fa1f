"""Command line: ``python -m ilvr {sample,info,convert,train,eval,bench}``: the arguments of each command and
its exit status; ``ilvr.commands`` does the work."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from . import commands
from .bench import add_arguments as add_bench_arguments
from .filters import KERNELS
from .images import ImageError
from .loading import ModelLoadError
from .model import COMPILE_MODES
from .registry import DEFAULT_MODEL
from .runtime.cpu_memory import keep_freed_heap
from .schedule import LOSS_WEIGHTINGS


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= minimum, with a message that says so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    value = _number(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def _fraction(text: str) -> float:
    """An argparse type: a number from 0 up to (not including) 1."""
    value = _number(text)
    if not 0 <= value < 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to below 1, got {text}")
    return value


def _model_option(text: str) -> tuple[str, object]:
    """KEY=VALUE for load_model; VALUE is read as JSON when it can be (32, 1e-4, true), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. beta_schedule=cosine), got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


MODEL_OPTION_HELP = ("a loading setting the weights file does not record, as KEY=VALUE (repeatable): "
                     "beta_schedule=cosine, num_train_timesteps=4000, prediction_type=sample, num_heads=4, num_head_channels=32, "
                     "attention_order=new, image_size=128, ... (`python -m ilvr info MODEL` shows what is assumed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ilvr", description="ILVR: reference-guided sampling with unconditional DDPMs")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="generate images guided by reference images (ILVR)")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"bundled name, local file/folder or Hub repo id[:file] (default: {DEFAULT_MODEL})")
    s.add_argument("--model-option", type=_model_option, action="append", metavar="KEY=VALUE", help=MODEL_OPTION_HELP)
    src = s.add_mutually_exclusive_group()
    src.add_argument("--ref", action="append", default=[], help="reference image (repeatable)")
    src.add_argument("--ref-dir", help="translate every image in this folder (recursively)")
    s.add_argument("--N", dest="n_factor", type=_positive_int, default=None,
                   help="low-pass factor: larger N keeps less of the reference (default: the paper's translation "
                        "preset scaled to the model, 8 for a 64 px model)")
    s.add_argument("--steps", default="250", help="respaced steps: 250, 100, 'ddim50', ... (default 250)")
    s.add_argument("--stop-at", type=_non_negative_int, default=0,
                   help="condition only while t > this step, on the model's training scale (1000 steps for "
                        "nearly every model; 0 = all steps; paper Fig. 5)")
    s.add_argument("--filter", default="cubic", choices=list(KERNELS), help="resize-right kernel for phi_N")
    s.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"],
                   help="ddpm (default). ddim is faster per step but ILVR with DDIM tends to blur/noise")
    s.add_argument("--num", "--num-samples", type=_positive_int, default=4,
                   help="samples per reference (under torchrun write --num-samples: torchrun rejects --num)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=_positive_int, default=8, help="samples per forward pass")
    s.add_argument("--out", default="outputs", help="output folder")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    s.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="compute dtype (default fp16 on CUDA, fp32 on CPU)")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: faster steps on a GPU after a one-off compile per batch size "
                        "(about a minute; later runs reuse Inductor's on-disk cache and start in seconds); for many "
                        "samples. On CPU it replaces the default onnxruntime UNet, which was as fast or faster")
    s.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="Inductor's mode (implies --compile; default: default); max-autotune-no-cudagraphs benchmarks kernel choices per "
                        "shape on a GPU (minutes more compile); reduce-overhead and max-autotune use their own CUDA "
                        "graphs instead of ours")
    s.add_argument("--mask", help="PNG whose white pixels mark where ILVR applies (scribble editing)")
    s.add_argument("--keep-outside", action="store_true", help="with --mask: keep the reference outside the mask")
    s.add_argument("--unconditional", action="store_true", help="ignore references: plain DDPM samples")
    s.add_argument("--save-process", action="store_true",
                   help="also write <name>_<k>_process.gif: the model's guess of the final image (predicted x0) "
                        f"at {commands.PROCESS_FRAMES} evenly spaced steps, from noise to the sample")
    s.add_argument("--method", default="ilvr", choices=["ilvr", "ddib"],
                   help="ilvr (default): one model guided by the reference's low frequencies (--N). ddib: DDIB "
                        "(Su et al., ICLR 2023), the reference DDIM-inverted through --source-model to noise, then "
                        "DDIM-sampled through --model; deterministic (one image per reference; --num, --seed, "
                        "--sampler and --filter do not apply), no --N, --stop-at or --mask")
    s.add_argument("--source-model", default=None,
                   help="with --method ddib: the model of the references' domain (bundled name, file/folder or Hub "
                        "repo id); --model is the target domain's, and --model-option applies to --model only")

    i = sub.add_parser("info", help="print the inferred architecture and diffusion settings of a model")
    i.add_argument("model")
    i.add_argument("--model-option", type=_model_option, action="append", metavar="KEY=VALUE", help=MODEL_OPTION_HELP)
    i.add_argument("--json", action="store_true")

    c = sub.add_parser("convert", help="write any loadable model as our .safetensors folder, settings included")
    c.add_argument("model", help="bundled name, local file/folder or Hub repo id[:file]")
    c.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    c.add_argument("--model-option", type=_model_option, action="append", metavar="KEY=VALUE", help=MODEL_OPTION_HELP)
    c.add_argument("--fp32", action="store_true", help="keep float32 weights (default: float16, half the size)")

    t = sub.add_parser("train", help="train an unconditional DDPM on a folder of images")
    t.add_argument("--data", required=True, help="folder of images (any size; center-cropped and resized)")
    t.add_argument("--out", required=True, help="output folder (resumes if it holds a training state)")
    t.add_argument("--image-size", type=_positive_int, default=64)
    t.add_argument("--channels", type=_positive_int, default=32, help="base channel count")
    t.add_argument("--channel-mult", default="1,2,2,4")
    t.add_argument("--res-blocks", type=_positive_int, default=1)
    t.add_argument("--attention-levels", default="3", help="comma-separated level indices with attention")
    t.add_argument("--grayscale", action="store_true", help="train a 1-channel model on the images' luma (MNIST-like data)")
    t.add_argument("--batch-size", type=_positive_int, default=16)
    t.add_argument("--lr", type=_positive_float, default=1e-3)
    t.add_argument("--steps", type=_positive_int, default=None,
                   help="stop after this many optimizer steps in all (default 100000)")
    t.add_argument("--minutes", type=_positive_float, default=None,
                   help="stop after this much training time in all (resumed runs count their earlier time)")
    t.add_argument("--cooldown-steps", type=_positive_int, default=None,
                   help="let the learning rate fall linearly to zero over the last this many of --steps")
    t.add_argument("--cooldown-minutes", type=_positive_float, default=None,
                   help="let the learning rate fall linearly to zero over the last this many of --minutes")
    t.add_argument("--save-every-minutes", type=_positive_float, default=5.0)
    t.add_argument("--sample-every", type=_non_negative_int, default=500, help="write a sample grid every N steps (0 = never)")
    t.add_argument("--device", default="auto")
    t.add_argument("--cpu-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on CPU (default: on where the CPU has native bf16, AVX512-BF16/AMX)")
    t.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS, default="p2",
                   help="per-timestep weight of the loss: p2 (default; less weight on nearly clean steps), "
                        "min-snr (gamma 5) or uniform (Ho et al.)")
    t.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips of the training images (default on; --no-hflip for data with a "
                        "handedness: digits, letters, text)")
    t.add_argument("--random-zoom", type=_fraction, default=0.0, metavar="FRACTION",
                   help="zoom half of each batch in or out by up to this fraction, e.g. 0.15 (default 0: off), "
                        "against a small data set being learnt by heart; measure it on your data")
    t.add_argument("--random-shift", type=_fraction, default=0.0, metavar="FRACTION",
                   help="shift half of each batch by up to this fraction of the image size, e.g. 0.08 (default 0)")
    t.add_argument("--seed", type=int, default=0)

    e = sub.add_parser("eval", help="measure diversity, fidelity, realism and near-copies per N (paper Table 2)")
    e.add_argument("--model", default=DEFAULT_MODEL, help=f"bundled name, local file/folder or Hub repo id (default: {DEFAULT_MODEL})")
    e.add_argument("--model-option", type=_model_option, action="append", metavar="KEY=VALUE", help=MODEL_OPTION_HELP)
    e.add_argument("--refs", required=True, help="folder of evaluation references (e.g. eval/references)")
    e.add_argument("--data", required=True, help="the model's training images (realism and near-copies are measured "
                                                 "against them)")
    e.add_argument("--N", dest="factors", default=None,
                   help="comma-separated N values (default: 2, 4, ... up to half the image size)")
    e.add_argument("--num", type=_positive_int, default=10, help="samples per reference and N (default 10: 45 pairs)")
    e.add_argument("--steps", default="100", help="respaced steps (default 100)")
    e.add_argument("--seed", type=int, default=0, help="samples use seeds SEED .. SEED+num-1 for every reference")
    e.add_argument("--fidelity-scale", type=_positive_int, default=None,
                   help="M of the fidelity column, the same for every row (default: image size / 16, 4 at 64 px)")
    e.add_argument("--no-unconditional", action="store_true", help="skip the unconditional row")
    e.add_argument("--batch-size", type=_positive_int, default=10)
    e.add_argument("--device", default="auto")
    e.add_argument("--json", help="also write the table as JSON to this file")
    e.add_argument("--grid", help="also write the samples as a PNG grid (one row per N and reference)")


    b = sub.add_parser("bench", help="time ILVR (ours) against unconditional sampling and the straightforward loop")
    add_bench_arguments(b)
    return parser


COMMANDS = {"sample": commands.cmd_sample, "info": commands.cmd_info, "convert": commands.cmd_convert,
            "train": commands.cmd_train, "eval": commands.cmd_eval, "bench": commands.cmd_bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    keep_freed_heap()  # every command runs UNet calls (train and bench on CPU too); see ilvr.runtime.cpu_memory
    commands.forget_created()
    rc = 1  # unless the command returns: an unexpected exception fails it too
    try:
        rc = COMMANDS[args.command](args)
    except (ModelLoadError, ImageError, ValueError, OSError) as e:
        if isinstance(e, BrokenPipeError):  # `python -m ilvr info --json | head`: the reader left, not an error
            sys.stdout = open(os.devnull, "w")  # so the interpreter's final flush does not fail again
            rc = 0
        else:
            print(f"error: {e}", file=sys.stderr)
            rc = 2
    except KeyboardInterrupt as e:
        if not getattr(e, "reported", False):  # train says itself where it stopped and what it saved
            print("interrupted", file=sys.stderr)
        rc = 130
    finally:
        if rc != 0:
            commands.remove_created_if_empty()
    return rc


if __name__ == "__main__":
    sys.exit(main())
