"""Command line: ``python -m ilvr {sample,info,convert,train,eval,bench}``."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

import torch

from .batch import derive_seed, run_folder
from .bench import add_arguments as add_bench_arguments
from .bench import run as run_bench
from . import validate
from .ddib import ddib_translate
from .ddib import settings_extra as ddib_settings
from .evaluate import evaluate, reference_files, samples_grid
from .export import export_model
from .filters import KERNELS, check_factor
from .images import ImageError, load_reference, open_image, plural, save_animation, save_png, tensor_to_pil
from .loading import ModelLoadError, assumed_settings, load_model
from .model import COMPILE_MODES
from .network import UNetConfig, count_parameters
from .registry import DEFAULT_MODEL, generation_factors, scaled_factor
from .runtime.cpu_memory import keep_freed_heap
from .sampler import check_unconditional, sample, settings_dict, validate_steps, validate_stop_at
from .schedule import LOSS_WEIGHTINGS
from .train import TrainConfig, train


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


def _positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


_created: list[tuple[Path, Path]] = []  # (folder, topmost folder made for it) by writable_folder in this command


def writable_folder(path: str | Path) -> Path:
    """Create the output folder if needed and prove it takes files, before any loading or sampling:
    otherwise a bad --out only fails after the whole run, with its work lost. A folder made here is
    removed again if the command fails and leaves it empty (see main)."""
    out = Path(path)
    top = None
    parent = out.absolute()
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        top, parent = parent, parent.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        if top is not None:
            _created.append((out.absolute(), top))
        with tempfile.NamedTemporaryFile(dir=out, prefix=".ilvr-write-test-"):
            pass
    except FileExistsError:
        raise ValueError(f"--out {out} is a file, not a folder") from None
    except OSError as e:
        raise ValueError(f"cannot write to --out {out}: {e.strerror or e}") from None
    return out


def _remove_created_if_empty() -> None:
    """Undo writable_folder for a failed command: the folders it made go again while they are empty."""
    for folder, top in reversed(_created):
        while True:
            try:
                folder.rmdir()  # only ever removes an empty folder
            except OSError:
                break
            if folder == top:
                break
            folder = folder.parent
    _created.clear()


def _model_option(text: str) -> tuple[str, object]:
    """KEY=VALUE for load_model; VALUE is read as JSON when it can be (32, 1e-4, true), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. beta_schedule=cosine), got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


PROCESS_FRAMES = 50


def process_frames(total: int) -> set[int]:
    """The step indices (1..total) whose predicted x0 go into a --save-process GIF: PROCESS_FRAMES of
    them evenly spaced (every step for shorter runs), the last one included."""
    count = min(total, PROCESS_FRAMES)
    return {round(total * (i + 1) / count) for i in range(count)}


MODEL_OPTION_HELP = ("a loading setting the weights file does not record, as KEY=VALUE (repeatable): "
                     "beta_schedule=cosine, num_train_timesteps=4000, prediction_type=sample, num_heads=4, num_head_channels=32, "
                     "attention_order=new, image_size=128, ... (`python -m ilvr info MODEL` shows what is assumed)")


def model_options(args) -> dict[str, object]:
    return dict(getattr(args, "model_option", None) or [])


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
                        f"at {PROCESS_FRAMES} evenly spaced steps, from noise to the sample")
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
    t.add_argument("--steps", type=_positive_int, default=100_000, help="stop after this many optimizer steps")
    t.add_argument("--minutes", type=_positive_float, default=None,
                   help="stop after this much training time in all (resumed runs count their earlier time)")
    t.add_argument("--save-every-minutes", type=_positive_float, default=5.0)
    t.add_argument("--sample-every", type=_non_negative_int, default=500, help="write a sample grid every N steps (0 = never)")
    t.add_argument("--device", default="auto")
    t.add_argument("--cpu-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on CPU (default: on where the CPU has native bf16, AVX512-BF16/AMX)")
    t.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS, default="p2",
                   help="per-timestep weight of the loss: p2 (default; less weight on nearly clean steps), "
                        "min-snr (gamma 5) or uniform (Ho et al.)")
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


def cmd_info(args) -> int:
    model = load_model(args.model, device="cpu", cpu_backend="torch",  # only looked at: no onnxruntime export
                       **model_options(args))
    d = model.describe()
    d["parameters"] = count_parameters(model.unet)
    d["format"] = model.info.get("family")
    d["options"] = model.info.get("options", {})
    d["assumed"] = assumed_settings(model)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"model       {d['name']}  ({d['format']} format, {d['parameters'] / 1e6:.2f} M parameters)")
    print(f"image size  {d['image_size']}")
    if d.get("training"):
        print("training    " + ", ".join(f"{k} {v}" for k, v in d["training"].items()))
    for section in ("unet", "diffusion"):
        print(f"{section}:")
        for k, v in d[section].items():
            print(f"  {k:22s} {v}")
    if d["assumed"]:
        print("not recorded in a guided-diffusion .pt, so assumed as in the published ADM/ILVR/P2 models: "
              + ", ".join(f"{k}={v}" for k, v in d["assumed"].items())
              + ". A model trained otherwise needs --model-option KEY=VALUE (guided-diffusion trains with "
              "num_heads=4 unless given --num_head_channels).")
    return 0


def cmd_convert(args) -> int:
    """A guided-diffusion pickle plus the --model-option values it needs becomes a folder that loads
    everywhere (the app's path field, the CLI, Python) with nothing to pass, and holds no pickle."""


    out = Path(args.out)
    if (out / "model.safetensors").exists() or (out / "config.json").exists():  # before a load or download
        raise ValueError(f"{out} already holds a model; pick a new --out")
    writable_folder(out)
    model = load_model(args.model, device="cpu", cpu_backend="torch", **model_options(args))
    info = {"converted_from": str(args.model), "family": model.info.get("family"), **(
        {"options": model.info["options"]} if model.info.get("options") else {})}
    path = export_model(model.unet, model.diffusion, out, info, torch.float32 if args.fp32 else torch.float16)
    print(f"wrote {path} and {out / 'config.json'}: python -m ilvr sample --model {out} ...")
    return 0


def cmd_sample(args) -> int:
    if args.method == "ddib" or args.source_model:
        return cmd_sample_ddib(args)
    if args.mask and not args.ref:
        raise ValueError("--mask needs --ref")
    if args.keep_outside and not args.mask:
        raise ValueError("--keep-outside needs --mask (it keeps the reference outside the mask)")
    if args.unconditional and (args.ref or args.ref_dir):
        raise ValueError("--unconditional samples without a reference: drop it, or drop --ref/--ref-dir")
    if not args.ref and not args.ref_dir and not args.unconditional:
        raise ValueError("give --ref IMAGE (repeatable), --ref-dir FOLDER or --unconditional")
    if args.compile_mode and not args.compile:
        args.compile = True  # asking for a mode means asking for the compile
    if args.ref_dir:
        if args.save_process:
            raise ValueError("--save-process is for --ref and --unconditional runs, not --ref-dir")
        if not os.environ.get("WORLD_SIZE"):  # under torchrun, rank 0 creates it (and reports for all ranks)
            writable_folder(args.out)

        return run_folder(args, model_options(args))
    for path in [*(args.ref or []), *([args.mask] if args.mask else [])]:
        open_image(path)  # a wrong or unreadable file (or a FIFO) is reported before --out is made or a model loads
    out = writable_folder(args.out)
    model = load_model(args.model, device=args.device, dtype=args.dtype, **model_options(args))
    if args.compile:
        model.compile(args.compile_mode)
    check_unconditional(model)
    validate_steps(model, args.steps)
    n = args.n_factor or scaled_factor("translation", model.image_size)
    check_factor(model.image_size, n)  # before any progress bar appears
    validate_stop_at(model, args.stop_at, "--stop-at")
    if args.stop_at == model.diffusion.num_train_timesteps and args.ref:
        print(f"warning: --stop-at {args.stop_at} conditions no step: the samples ignore the reference", file=sys.stderr)
    mask = None
    if args.mask:
        mask = (load_reference(args.mask, model.image_size).mean(0) > 0).float()
    jobs = [(Path(r), load_reference(r, model.image_size, model.config.in_channels)) for r in args.ref] if args.ref else [(Path("unconditional"), None)]
    total = len(jobs) * args.num
    steps_per_sample = len(model.schedule.respace(args.steps).timestep_map)
    kept_frames = process_frames(steps_per_sample) if args.save_process else set()
    bar = tqdm(total=total * steps_per_sample, desc="sampling", unit="img-step")
    used: dict[str, int] = {}
    replaced = 0  # outputs of an earlier run with the same names (--ref-dir skips those instead)
    for path, ref in jobs:
        key = path.name
        stem = path.stem.casefold()  # a/cat.png and b/Cat.jpg must not overwrite each other's outputs
        used[stem] = used.get(stem, 0) + 1
        name = path.stem if used[stem] == 1 else f"{path.stem}-{used[stem]}"
        seeds = [derive_seed(args.seed, key, k) for k in range(args.num)]
        for start in range(0, args.num, args.batch_size):
            chunk = seeds[start:start + args.batch_size]
            frames: list[list] = [[] for _ in chunk]  # per sample, predicted x0 at evenly spaced steps

            def on_step(info, count=len(chunk), frames=frames):
                bar.update(count)
                if info.index in kept_frames:
                    for j, guess in enumerate(info.pred_x0):
                        frames[j].append(tensor_to_pil(guess))

            x = sample(model, ref, seeds=chunk, n_factor=n, kernel=args.filter, steps=args.steps, stop_at=args.stop_at,
                       sampler=args.sampler, mask=mask, keep_outside=args.keep_outside, progress=on_step)
            for j, img in enumerate(x):
                k = start + j
                settings = settings_dict(model, n_factor=None if ref is None else n, kernel=args.filter,
                                         steps=args.steps, stop_at=args.stop_at, sampler=args.sampler,
                                         seed=chunk[j], reference=str(path) if ref is not None else None, index=k,
                                         global_seed=args.seed)  # seed = derive_seed(global_seed, file name, index)
                if mask is not None:
                    settings.update(mask=str(args.mask), keep_outside=bool(args.keep_outside))
                target = out / f"{name}_{k}.png"
                replaced += target.exists()
                save_png(tensor_to_pil(img), target, settings)
                if args.save_process:
                    save_animation(frames[j] + [tensor_to_pil(img)], out / f"{name}_{k}_process.gif")
    bar.close()
    print(f"wrote {plural(total, 'image')} to {out}"
          + (f" ({replaced} replaced files of an earlier run)" if replaced else ""))
    return 0


def cmd_sample_ddib(args) -> int:
    """`sample --method ddib`: each --ref DDIM-inverted through --source-model, then DDIM-sampled through
    --model (ilvr.ddib); every misuse refused before --out is made or a model loads."""
    if args.method != "ddib":
        raise ValueError("--source-model is for --method ddib (ILVR samples one model: drop --source-model)")
    if not args.source_model:
        raise ValueError("--method ddib needs --source-model MODEL: the references' domain (--model is the target)")
    refused = [flag for flag, used in (("--N", args.n_factor is not None), ("--stop-at", args.stop_at != 0),
                                       ("--mask", bool(args.mask)), ("--keep-outside", args.keep_outside),
                                       ("--unconditional", args.unconditional), ("--ref-dir", bool(args.ref_dir)))
               if used]
    if refused:
        raise ValueError(f"{', '.join(refused)} cannot be used with --method ddib (DDIB has no low-pass filter, "
                         "conditioning range or mask, and takes --ref images); use --method ilvr for them")
    if not args.ref:
        raise ValueError("--method ddib needs --ref IMAGE (repeatable)")
    if args.compile_mode and not args.compile:
        args.compile = True
    for path in args.ref:
        open_image(path)
    out = writable_folder(args.out)
    source = load_model(args.source_model, device=args.device, dtype=args.dtype)
    model = load_model(args.model, device=args.device, dtype=args.dtype, **model_options(args))
    for m in (source, model):
        check_unconditional(m)
        validate_steps(m, args.steps)
        if args.compile:
            m.compile(args.compile_mode)
    if (source.image_size, source.config.in_channels) != (model.image_size, model.config.in_channels):
        raise ValueError(f"--source-model is {source.image_size} px with {source.config.in_channels} channel(s) and "
                         f"--model {model.image_size} px with {model.config.in_channels}: DDIB needs both alike")
    if args.num > 1:
        print(f"note: DDIB is deterministic: one image per reference (--num {args.num} would repeat it)",
              file=sys.stderr)
    steps_per_ref = (len(source.schedule.respace(args.steps).timestep_map)
                     + len(model.schedule.respace(args.steps).timestep_map))
    kept_frames = process_frames(steps_per_ref) if args.save_process else set()
    bar = tqdm(total=len(args.ref) * steps_per_ref, desc="ddib", unit="img-step")
    used: dict[str, int] = {}
    names = []
    for r in args.ref:
        path = Path(r)
        stem = path.stem.casefold()
        used[stem] = used.get(stem, 0) + 1
        names.append(path.stem if used[stem] == 1 else f"{path.stem}-{used[stem]}")
    replaced = 0
    for start in range(0, len(args.ref), args.batch_size):
        chunk = args.ref[start:start + args.batch_size]
        refs = torch.stack([load_reference(r, source.image_size, source.config.in_channels) for r in chunk])
        frames: list[list] = [[] for _ in chunk]

        def on_step(info, count=len(chunk), frames=frames):
            bar.update(count)
            if info.index in kept_frames:
                for j, guess in enumerate(info.pred_x0):
                    frames[j].append(tensor_to_pil(guess))

        x = ddib_translate(source, model, refs, steps=args.steps, progress=on_step)
        for j, img in enumerate(x):
            settings = settings_dict(model, n_factor=None, kernel=args.filter, steps=args.steps, stop_at=0,
                                     sampler="ddim", seed=0, reference=str(chunk[j]), index=0,
                                     **ddib_settings(source))
            for key in ("N", "filter", "stop_at", "seed"):  # ILVR's; DDIB has none of them
                settings.pop(key, None)
            target = out / f"{names[start + j]}_0.png"
            replaced += target.exists()
            save_png(tensor_to_pil(img), target, settings)
            if args.save_process:
                save_animation(frames[j] + [tensor_to_pil(img)], out / f"{names[start + j]}_0_process.gif")
    bar.close()
    print(f"wrote {plural(len(args.ref), 'image')} to {out} (DDIB: {args.source_model} -> {args.model})"
          + (f" ({replaced} replaced files of an earlier run)" if replaced else ""))
    return 0


def cmd_train(args) -> int:
    def ints(text: str, what: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"{what} must be comma-separated whole numbers, got {text!r}") from None

    mult = ints(args.channel_mult, "--channel-mult")
    groups = UNetConfig.norm_groups  # every GroupNorm's group count (32)
    widths = sorted({args.channels * m for m in mult})
    if mult and all(m > 0 for m in mult) and any(w % groups for w in widths):  # other mistakes: UNetConfig says
        raise ValueError(f"--channels {args.channels} with --channel-mult {args.channel_mult} gives channel counts "
                         f"{widths}; they must be multiples of {groups} (GroupNorm's {groups} groups): use --channels "
                         f"{groups}, {2 * groups}, ...")
    cfg = TrainConfig(data=args.data, out=args.out, image_size=args.image_size, model_channels=args.channels,
                      channel_mult=mult, num_res_blocks=args.res_blocks,
                      attention_levels=ints(args.attention_levels, "--attention-levels"),
                      channels=1 if args.grayscale else 3, batch_size=args.batch_size,
                      lr=args.lr, max_steps=args.steps, max_minutes=args.minutes,
                      save_every_minutes=args.save_every_minutes, sample_every=args.sample_every, device=args.device,
                      cpu_bf16=args.cpu_bf16, loss_weighting=args.loss_weighting, seed=args.seed)
    writable_folder(args.out)
    train(cfg)  # says what it wrote, or that there was nothing to do
    return 0


def cmd_eval(args) -> int:
    refs = reference_files(args.refs)
    if not Path(args.data).is_dir():
        raise ValueError(f"--data {args.data} is not a folder of training images")
    model = load_model(args.model, device=args.device, **model_options(args))
    factors = (validate.n_factors(args.factors, model.image_size) if args.factors
               else generation_factors(model.image_size))
    total = len(refs) * len(factors) * args.num + (0 if args.no_unconditional else args.num)
    bar = tqdm(total=total, desc="eval", unit="sample")
    kept: dict = {}
    report = evaluate(model, [str(r) for r in refs], args.data, factors=factors, samples=args.num, steps=args.steps,
                      seed=args.seed, batch_size=args.batch_size, fidelity_scale=args.fidelity_scale,
                      unconditional=not args.no_unconditional, on_batch=bar.update, keep=kept)
    bar.close()
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.grid:
        samples_grid(kept, refs).save(args.grid)
        print(f"wrote {args.grid}")
    return 0


def cmd_bench(args) -> int:
    run_bench(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    keep_freed_heap()  # every command runs UNet calls (train and bench on CPU too); see ilvr.runtime.cpu_memory
    _created.clear()
    rc = 1  # unless the command returns: an unexpected exception fails it too
    try:
        commands = {"sample": cmd_sample, "info": cmd_info, "convert": cmd_convert, "train": cmd_train, "eval": cmd_eval,
                    "bench": cmd_bench}
        rc = commands[args.command](args)
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
            _remove_created_if_empty()
    return rc


if __name__ == "__main__":
    sys.exit(main())
