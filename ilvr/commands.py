"""What each ``python -m ilvr`` command does, given its parsed arguments (``ilvr.cli`` parses them).
`sample --ref-dir` is ``ilvr.batch``, `bench` is ``ilvr.bench``, `eval`'s measures are ``ilvr.evaluate``."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from . import validate
from .batch import derive_seed, run_folder
from .bench import run as run_bench
from .ddib import ddib_translate
from .ddib import result_settings as ddib_settings
from .evaluate import evaluate, reference_files, samples_grid
from .export import export_model
from .filters import check_factor
from .images import load_reference, open_image, plural, save_animation, save_png, tensor_to_pil
from .loading import assumed_settings, load_model
from .network import UNetConfig, count_parameters
from .registry import generation_factors, scaled_factor
from .sampler import StepInfo, check_unconditional, sample, settings_dict
from .train import TrainConfig, train

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


def forget_created() -> None:
    """A new command starts: folders an earlier one made (in the same process, e.g. tests) are not its own."""
    _created.clear()


def remove_created_if_empty() -> None:
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


PROCESS_FRAMES = 50


def process_frames(total: int) -> set[int]:
    """The step indices (1..total) whose predicted x0 go into a --save-process GIF: PROCESS_FRAMES of
    them evenly spaced (every step for shorter runs), the last one included."""
    count = min(total, PROCESS_FRAMES)
    return {round(total * (i + 1) / count) for i in range(count)}


def frame_recorder(bar: tqdm, count: int, kept: set[int]) -> tuple[Callable[[StepInfo], None], list[list]]:
    """A progress callback for one batch of `count` samples, and the frames it collects: each step
    advances `bar` by the batch, and at the steps in `kept` (``process_frames``) each sample's predicted
    x0 is kept for its --save-process GIF."""
    frames: list[list] = [[] for _ in range(count)]

    def on_step(info: StepInfo) -> None:
        bar.update(count)
        if info.index in kept:
            for j, guess in enumerate(info.pred_x0):
                frames[j].append(tensor_to_pil(guess))
    return on_step, frames


def model_options(args) -> dict[str, object]:
    return dict(getattr(args, "model_option", None) or [])


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


def output_stems(paths: list[Path]) -> list[str]:
    """One output name per reference: a/cat.png and b/Cat.jpg must not overwrite each other's outputs."""
    used: dict[str, int] = {}
    names = []
    for path in paths:
        stem = path.stem.casefold()
        used[stem] = used.get(stem, 0) + 1
        names.append(path.stem if used[stem] == 1 else f"{path.stem}-{used[stem]}")
    return names


def save_output(img: torch.Tensor, target: Path, settings: dict, frames: list | None) -> bool:
    """Write one result PNG (settings embedded) and, with frames, its --save-process GIF beside it;
    True when it replaced an earlier run's file."""
    replaced = target.exists()
    save_png(tensor_to_pil(img), target, settings)
    if frames is not None:
        save_animation(frames + [tensor_to_pil(img)], target.with_name(f"{target.stem}_process.gif"))
    return replaced


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
    validate.steps(args.steps, model.diffusion.num_train_timesteps)
    n = args.n_factor or scaled_factor("translation", model.image_size)
    check_factor(model.image_size, n)  # before any progress bar appears
    validate.stop_step(args.stop_at, model.diffusion.num_train_timesteps, "--stop-at")
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
    replaced = 0  # outputs of an earlier run with the same names (--ref-dir skips those instead)
    for (path, ref), name in zip(jobs, output_stems([path for path, _ in jobs])):
        key = path.name
        seeds = [derive_seed(args.seed, key, k) for k in range(args.num)]
        for start in range(0, args.num, args.batch_size):
            chunk = seeds[start:start + args.batch_size]
            on_step, frames = frame_recorder(bar, len(chunk), kept_frames)
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
                replaced += save_output(img, out / f"{name}_{k}.png", settings,
                                        frames[j] if args.save_process else None)
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
        validate.steps(args.steps, m.diffusion.num_train_timesteps)
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
    names = output_stems([Path(r) for r in args.ref])
    replaced = 0
    for start in range(0, len(args.ref), args.batch_size):
        chunk = args.ref[start:start + args.batch_size]
        refs = torch.stack([load_reference(r, source.image_size, source.config.in_channels) for r in chunk])
        on_step, frames = frame_recorder(bar, len(chunk), kept_frames)
        x = ddib_translate(source, model, refs, steps=args.steps, progress=on_step)
        for j, img in enumerate(x):
            settings = ddib_settings(source, model, args.steps, reference=str(chunk[j]), index=0)
            replaced += save_output(img, out / f"{names[start + j]}_0.png", settings,
                                    frames[j] if args.save_process else None)
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
    for cooldown_flag, cooldown, limit_flag, limit in (("--cooldown-steps", args.cooldown_steps, "--steps", args.steps),
                                                       ("--cooldown-minutes", args.cooldown_minutes, "--minutes",
                                                        args.minutes)):
        if cooldown and limit is None:
            raise ValueError(f"{cooldown_flag} needs {limit_flag}: the learning rate reaches zero when {limit_flag} "
                             "is reached")
    cfg = TrainConfig(data=args.data, out=args.out, image_size=args.image_size, model_channels=args.channels,
                      channel_mult=mult, num_res_blocks=args.res_blocks,
                      attention_levels=ints(args.attention_levels, "--attention-levels"),
                      channels=1 if args.grayscale else 3, batch_size=args.batch_size,
                      lr=args.lr, max_steps=args.steps or TrainConfig.max_steps, max_minutes=args.minutes,
                      cooldown_steps=args.cooldown_steps or 0, cooldown_minutes=args.cooldown_minutes or 0.0,
                      save_every_minutes=args.save_every_minutes, sample_every=args.sample_every, device=args.device,
                      cpu_bf16=args.cpu_bf16, loss_weighting=args.loss_weighting, hflip=args.hflip,
                      random_zoom=args.random_zoom, random_shift=args.random_shift, seed=args.seed)
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
