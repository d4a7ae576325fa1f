"""Train an unconditional DDPM on a folder of images: the recipe the paper's own models follow,
compact enough to read in one sitting.

Epsilon loss weighted per timestep (P2 by default: capacity goes to the coarse and content steps that
ILVR's low-pass conditioning leaves to the model), AdamW with warm-up, gradient clipping, EMA weights,
mixed precision (bf16 autocast on CPUs with native bf16, fp16/bf16 on CUDA), periodic sample grids,
resumable state every few minutes.
The exported model is ``OUT/model.safetensors`` (EMA weights, fp16) + ``OUT/config.json``.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from .augment import random_flips, random_zoom_shift
from .device import cpu_has_native_bf16, resolve_device
from .export import STATE_FILE, config_differences, export_config, export_model, foreign_model
from .grid import image_grid
from .images import (IMAGE_SUFFIX_TEXT, ImageError, image_mode, is_image_name, list_files, open_image, plural,
                     square_resize, tensor_to_pil)
from .model import DiffusionModel
from .network import UNet, UNetConfig, count_parameters
from .sampler import sample
from .schedule import LOSS_WEIGHTINGS, DiffusionConfig, Schedule, loss_weights, training_diffusion

LOCK_FILE = ".train.lock"  # held (flock) by the run training into the folder


@dataclass
class TrainConfig:
    data: str
    out: str
    image_size: int = 64
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (3,)
    num_head_channels: int = 32
    channels: int = 3  # 1 trains a grayscale model (images become their luma)
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    max_steps: int = 100_000
    max_minutes: float | None = None
    cooldown_steps: int = 0  # lr falls linearly to zero over the last this many steps before max_steps
    cooldown_minutes: float = 0.0  # ... or over the last this many minutes before max_minutes
    save_every_minutes: float = 5.0
    sample_every: int = 500
    seed: int = 0
    device: str = "auto"
    mixed_precision: bool = True  # CUDA: bf16/fp16 autocast. CPU: bf16 only with cpu_bf16
    cpu_bf16: bool | None = None  # None: on where the CPU has native bf16 (emulated bf16 is 10x+ slower)
    loss_weighting: str = "p2"  # one of LOSS_WEIGHTINGS
    hflip: bool = True  # random horizontal flips; off for data with a handedness (digits, text)
    random_zoom: float = 0.0  # zoom half of each batch by up to this fraction (augment.random_zoom_shift)
    random_shift: float = 0.0  # ... and shift it by up to this fraction of the image size
    extra: dict = field(default_factory=dict)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, raised after the state was saved and the user was told how to resume."""

    reported = True


def find_images(folder: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Path]:
    """Image files under folder, sorted; hidden files and folders and `exclude` (the --out folder, whose
    sample grids must not become training images) are skipped, as ``sample --ref-dir`` skips them. A
    subfolder that cannot be listed is refused (ValueError naming it) before anything trains: a run that
    silently left out part of the data would only show it hours later, if ever."""
    root = Path(folder)
    return [root / rel for rel in list_files(root, exclude, what="training data folder") if is_image_name(rel)]


def load_dataset(folder: str | os.PathLike, size: int, channels: int = 3,
                 exclude: str | os.PathLike | None = None) -> torch.Tensor:
    """Every readable image in the folder, as uint8 (N, channels, size, size); unreadable files (and FIFOs,
    devices, broken links) are skipped and listed; an unreadable subfolder is an error (find_images)."""
    tensors, skipped = [], []
    mode = image_mode(channels)
    for path in find_images(folder, exclude):
        try:
            img = square_resize(open_image(path), size).convert(mode)
        except ImageError as e:
            skipped.append(str(e))
            continue
        tensors.append(torch.from_numpy(np.array(img, dtype=np.uint8).reshape(size, size, channels)).permute(2, 0, 1))
    if not tensors:
        raise ValueError(f"no readable images in {folder} (images are {IMAGE_SUFFIX_TEXT}; "
                         "hidden files and the --out folder are skipped)")
    if skipped:
        shown = skipped[:5]
        print(f"skipped {len(skipped)} file(s) that could not be used: " + "; ".join(shown)
              + (f"; ... and {len(skipped) - len(shown)} more" if len(skipped) > len(shown) else ""))
    return torch.stack(tensors)


def learning_rate(cfg: TrainConfig, step: int, elapsed_s: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based), ``elapsed_s`` seconds into the run (earlier
    sessions included): linear warm-up, constant, and with a cooldown a linear fall to zero at the run's end,
    the warmup-stable-decay schedule, so a run of unknown length can be continued and cooled down at will."""
    lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if cfg.cooldown_steps:
        lr *= min(1.0, max(0.0, (cfg.max_steps - step) / cfg.cooldown_steps))
    if cfg.cooldown_minutes and cfg.max_minutes:
        lr *= min(1.0, max(0.0, (cfg.max_minutes * 60 - elapsed_s) / (cfg.cooldown_minutes * 60)))
    return lr


def continue_from_export(out: Path, unet_cfg: UNetConfig, model: UNet, ema: UNet, log,
                         diffusion: DiffusionConfig | None = None) -> tuple[int, float]:
    """No training state (a fresh machine; only the committed export is there): start from the exported
    EMA weights, so a bundled model can keep training in any later session. The optimizer restarts."""
    from safetensors.torch import load_file

    config = export_config(out) or {}
    try:  # compared as configs: fields added since the export take their defaults
        exported = UNetConfig.from_dict(config.get("unet", {})).to_dict()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{out} holds a model whose architecture cannot be read ({e}); pick a new --out") from None
    diffs = config_differences(exported, unet_cfg.to_dict(), "in the exported model")
    if diffusion is not None:
        diffs += config_differences(DiffusionConfig.from_dict(config.get("diffusion", {})).to_dict(),
                                    diffusion.to_dict(), "in the exported model")
    if diffs:
        raise ValueError(f"{out} holds a model with another architecture ({'; '.join(diffs)}); use matching "
                         "options or a new --out")
    weights = {k: v.float() for k, v in load_file(str(out / "model.safetensors")).items()}
    model.load_state_dict(weights)
    ema.load_state_dict(weights)
    info = config.get("training", {})
    log(f"no training state in {out}: continuing from its exported EMA weights at step {info.get('steps', 0)} "
        f"(fresh optimizer); this run will replace {out / 'model.safetensors'} with the new weights")
    return int(info.get("steps", 0)), float(info.get("minutes", 0.0)) * 60


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One train run per --out: two would overwrite each other's state and export. The lock (flock) goes
    with the process, so a killed run blocks no later one; the file is removed on the way out, so none
    is left in the model folder. Without fcntl (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = out / LOCK_FILE
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise ValueError(f"another train run is using {out}; wait for it or pick another --out") from None
        except OSError:  # a filesystem without locks (some network disks): train unlocked, as before
            break
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # the run that held it removed that file meanwhile: lock the one now there
    try:
        yield
    finally:
        try:
            path.unlink()  # while still holding the lock, so a waiting run sees the file change (above)
        except OSError:
            pass
        f.close()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; kill, timeout and batch schedulers' end of job


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _catch_sigterm():
    """Make SIGTERM stop training the way Ctrl-C does (saved first); returns the handler to restore."""
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _release_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold a Ctrl-C or SIGTERM until the block ends: the optimizer and EMA updates must not stop
    halfway, or the state saved on the way out would mix two steps."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for signum in caught:
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)  # Python's Ctrl-C handler and _raise_interrupt raise KeyboardInterrupt
        elif handler == signal.SIG_DFL:
            raise KeyboardInterrupt


def _autocast(device: torch.device, enabled: bool, cpu_bf16: bool = False):
    if not enabled or (device.type == "cpu" and not cpu_bf16):
        return torch.autocast(device.type, enabled=False)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.autocast("cpu", dtype=torch.bfloat16)


def train(cfg: TrainConfig, log=print) -> Path:
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # every rank would write the same files
        raise ValueError("train runs in one process; run it without torchrun")
    device = resolve_device(cfg.device)
    if cfg.loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {cfg.loss_weighting!r}")
    out = Path(cfg.out)
    unet_cfg = UNetConfig(image_size=cfg.image_size, in_channels=cfg.channels, out_channels=cfg.channels,
                          model_channels=cfg.model_channels, channel_mult=cfg.channel_mult,
                          num_res_blocks=cfg.num_res_blocks, attention_levels=cfg.attention_levels,
                          num_head_channels=cfg.num_head_channels)
    diffusion = training_diffusion()
    if not Path(cfg.data).is_dir():  # before a state is read: no wait for this error
        raise FileNotFoundError(f"training data folder not found: {cfg.data}")
    if out.resolve() == Path(cfg.data).resolve():
        raise ValueError("--out must not be the --data folder itself (its sample grids would become training images)")
    reason = foreign_model(out)
    if reason:
        raise ValueError(f"{out} holds another model ({reason}); pick a new --out")
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _train(cfg, out, unet_cfg, diffusion, device, log)


def _train(cfg: TrainConfig, out: Path, unet_cfg: UNetConfig, diffusion: DiffusionConfig, device: torch.device,
           log) -> Path:
    torch.manual_seed(cfg.seed)
    model = UNet(unet_cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed_before = 0, 0.0
    gen = torch.Generator().manual_seed(cfg.seed)

    # the state or export is checked before the data is decoded: no wait for an error
    state_path = out / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        # compared as configs: fields added since the state was written take their defaults
        diffs = config_differences(UNetConfig.from_dict(state["unet"]).to_dict(), unet_cfg.to_dict(), "in the state")
        if diffs:
            raise ValueError(f"{state_path} was trained with another architecture ({'; '.join(diffs)}); use the "
                             "same options, a new --out, or delete it")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
        gen.set_state(state["rng"].cpu())  # the generator lives on the CPU; map_location moved its state
        asked = {"lr": cfg.lr, "batch size": cfg.batch_size}
        before = [f"{what} {state[key]:g}" for what, key in (("lr", "lr"), ("batch size", "batch_size"))
                  if key in state and state[key] != asked[what]]  # states written before they were recorded: none
        log(f"resumed from step {step} ({elapsed_before / 60:.1f} min of training so far); lr {cfg.lr:g}, "
            f"batch size {cfg.batch_size}" + (f" (before: {', '.join(before)})" if before else ""))
    elif (out / "model.safetensors").exists():
        step, elapsed_before = continue_from_export(out, unet_cfg, model, ema, log, diffusion)
        log(f"lr {cfg.lr:g}, batch size {cfg.batch_size}")
    reached = [f"--steps {cfg.max_steps}"] if step >= cfg.max_steps else []
    if cfg.max_minutes and elapsed_before >= cfg.max_minutes * 60:
        reached.append(f"--minutes {cfg.max_minutes:g}")
    if reached:
        log(f"already trained {plural(step, 'step')} / {elapsed_before / 60:.1f} min ({' and '.join(reached)}); "
            "nothing to do")
        return out / "model.safetensors"

    data = load_dataset(cfg.data, cfg.image_size, cfg.channels, exclude=out)
    log(f"{plural(len(data), 'training image')} from {cfg.data}, {cfg.image_size}px, device {device}")
    log(f"model: {count_parameters(model) / 1e6:.2f} M parameters")
    schedule = Schedule.from_config(diffusion)
    abar64 = torch.tensor(schedule.alphas_cumprod, dtype=torch.float64)
    abar = abar64.float().to(device)
    weights = loss_weights(abar64, cfg.loss_weighting).float().to(device)
    cpu_bf16 = cpu_has_native_bf16() if cfg.cpu_bf16 is None else cfg.cpu_bf16
    if device.type == "cpu" and cfg.mixed_precision:
        log(f"loss weighting {cfg.loss_weighting}; bf16 autocast " + (
            "on" if cpu_bf16 else "off") + (" (this CPU has native bf16)" if cfg.cpu_bf16 is None and cpu_bf16
                                            else " (no native bf16 on this CPU)" if cfg.cpu_bf16 is None else ""))
    else:
        log(f"loss weighting {cfg.loss_weighting}")
    if not cfg.hflip:
        log("random horizontal flips off")
    augment = {key: value for key, value in (("random_zoom", cfg.random_zoom), ("random_shift", cfg.random_shift))
               if value}
    if augment:
        log(f"half of each batch zoomed by up to {cfg.random_zoom:g} and shifted by up to {cfg.random_shift:g} "
            "of the image size")
    cooldown = {key: value for key, value in (("cooldown_steps", cfg.cooldown_steps),
                                              ("cooldown_minutes", cfg.cooldown_minutes)) if value}
    if cooldown:
        spans = ([plural(cfg.cooldown_steps, "step")] if cfg.cooldown_steps else []) + (
            [f"{cfg.cooldown_minutes:g} min"] if cfg.cooldown_minutes else [])
        log(f"cooldown: the learning rate falls linearly to zero over the last {' or '.join(spans)}")

    saved_step = step  # what is on disk already (nothing, at step 0)

    def save_state() -> None:
        nonlocal saved_step
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                    "rng": gen.get_state(), "unet": unet_cfg.to_dict(), "diffusion": diffusion.to_dict(),
                    "elapsed_s": elapsed_before + time.time() - start,
                    "lr": cfg.lr, "batch_size": cfg.batch_size, "loss_weighting": cfg.loss_weighting},
                   tmp)
        os.replace(tmp, state_path)
        export_model(ema, diffusion, out, {"steps": step, "batch_size": cfg.batch_size, "images": len(data),
                                           "loss_weighting": cfg.loss_weighting, "hflip": cfg.hflip,
                                           "minutes": round((elapsed_before + time.time() - start) / 60, 1),
                                           "device": str(device), **cooldown, **augment})
        saved_step = step

    start = last_save = time.time()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True)
    stopped = ""  # why the loop ended early, logged once the bar is closed (not mid-bar)
    model.train()
    previous_sigterm = _catch_sigterm()
    try:
        while step < cfg.max_steps:
            idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
            x0 = data[idx].float() / 127.5 - 1.0
            x0 = random_flips(x0, gen, cfg.hflip)
            x0 = random_zoom_shift(x0, gen, cfg.random_zoom, cfg.random_shift).to(device)
            t = torch.randint(schedule.num_steps, (cfg.batch_size,), generator=gen).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            a = abar[t][:, None, None, None]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            with _autocast(device, cfg.mixed_precision, cpu_bf16):
                pred = model(xt, t)
            loss = (weights[t] * (pred.float() - noise).square().mean(dim=(1, 2, 3))).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            with _interrupt_after():
                for group in opt.param_groups:
                    group["lr"] = learning_rate(cfg, step, elapsed_before + time.time() - start)
                opt.step()
                with torch.no_grad():
                    decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # warm-up so early EMA is not all noise
                    for pe, pm in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(pm, 1 - decay)
                step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            now = time.time()
            if now - last_save > cfg.save_every_minutes * 60 or step == cfg.max_steps:
                save_state()
                last_save = now
            if cfg.sample_every and step % cfg.sample_every == 0:
                if saved_step != step:
                    save_state()
                write_sample_grid(ema, diffusion, out / "samples" / f"step_{step:07d}.png", device)
            if cfg.max_minutes and (elapsed_before + now - start) > cfg.max_minutes * 60:
                stopped = f"time budget of {cfg.max_minutes:g} min reached at step {step}"
                break
        if saved_step != step:
            save_state()
    except KeyboardInterrupt:
        bar.close()
        if saved_step != step:
            save_state()
            print(f"interrupted at step {step}; saved, run the same command to resume", file=sys.stderr)
        else:
            print(f"interrupted at step {step}; nothing new to save", file=sys.stderr)
        raise TrainingInterrupted from None
    finally:
        bar.close()
        _release_sigterm(previous_sigterm)
    if stopped:
        log(stopped)
    log(f"wrote {out / 'model.safetensors'}")
    return out / "model.safetensors"


def write_sample_grid(unet: UNet, diffusion: DiffusionConfig, path: Path, device: torch.device, n: int = 16,
                      steps: str = "100") -> Path:
    """An unconditional grid from the EMA weights, to watch training progress by eye."""
    was_training = unet.training
    unet.eval()
    model = DiffusionModel(unet=unet, diffusion=diffusion, name="training-ema", device=device)
    x = sample(model, None, seeds=list(range(n)), steps=steps)
    unet.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid([tensor_to_pil(im) for im in x], cols=int(math.sqrt(n))).save(path)
    return path
