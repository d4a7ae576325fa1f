"""Train an unconditional DDPM on a folder of images: the recipe the paper's own models follow,
compact enough to read in one sitting.

Epsilon loss, AdamW with warm-up, gradient clipping, EMA weights, mixed precision (bf16 autocast on
CPUs that support it, fp16/bf16 on CUDA), periodic sample grids, resumable state every few minutes.
The exported model is ``OUT/model.safetensors`` (EMA weights, fp16) + ``OUT/config.json``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .images import ImageError, image_mode, open_image, square_resize
from .loading import resolve_device
from .network import UNet, UNetConfig, count_parameters
from .schedule import DiffusionConfig, Schedule

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
STATE_FILE = "train_state.ckpt.pt"


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
    save_every_minutes: float = 5.0
    sample_every: int = 500
    seed: int = 0
    device: str = "auto"
    mixed_precision: bool = True  # CUDA: bf16/fp16 autocast. CPU: bf16 only with cpu_bf16
    cpu_bf16: bool = False  # fast on CPUs with AVX512-BF16/AMX, 10x+ slower elsewhere (emulated)
    extra: dict = field(default_factory=dict)


def find_images(folder: str | os.PathLike) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"training data folder not found: {root}")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_dataset(folder: str | os.PathLike, size: int, channels: int = 3) -> torch.Tensor:
    """Every readable image in the folder, as uint8 (N, channels, size, size); unreadable files are skipped."""
    tensors, skipped = [], []
    mode = image_mode(channels)
    for path in find_images(folder):
        try:
            img = square_resize(open_image(path), size).convert(mode)
        except ImageError as e:
            skipped.append(str(e))
            continue
        tensors.append(torch.from_numpy(np.array(img, dtype=np.uint8).reshape(size, size, channels)).permute(2, 0, 1))
    if not tensors:
        raise ValueError(f"no readable images in {folder}")
    if skipped:
        shown = skipped[:5]
        print(f"skipped {len(skipped)} file(s) that could not be used: " + "; ".join(shown)
              + (f"; ... and {len(skipped) - len(shown)} more" if len(skipped) > len(shown) else ""))
    return torch.stack(tensors)


def export_model(model: UNet, diffusion: DiffusionConfig, out_dir: str | os.PathLike, info: dict | None = None,
                 dtype: torch.dtype = torch.float16) -> Path:
    """Write weights (safetensors, fp16 by default, config in its metadata too) and config.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"format": "ilvr", "unet": model.config.to_dict(), "diffusion": diffusion.to_dict(), "training": info or {}}
    tensors = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
               for k, v in model.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"ilvr_config": json.dumps(config)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600: others on a shared disk could not read the model
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out / "model.safetensors"


def continue_from_export(out: Path, unet_cfg: UNetConfig, model: UNet, ema: UNet, log) -> tuple[int, float]:
    """No training state (a fresh machine; only the committed export is there): start from the exported
    EMA weights, so a bundled model can keep training in any later session. The optimizer restarts."""
    from safetensors.torch import load_file

    config = json.loads((out / "config.json").read_text())
    if config.get("unet") != unet_cfg.to_dict():
        raise ValueError(f"{out} holds a model with another architecture; use a new --out or matching options")
    weights = {k: v.float() for k, v in load_file(str(out / "model.safetensors")).items()}
    model.load_state_dict(weights)
    ema.load_state_dict(weights)
    info = config.get("training", {})
    log(f"no training state in {out}: continuing from its exported EMA weights at step {info.get('steps', 0)} "
        "(fresh optimizer)")
    return int(info.get("steps", 0)), float(info.get("minutes", 0.0)) * 60


def _autocast(device: torch.device, enabled: bool, cpu_bf16: bool = False):
    if not enabled or (device.type == "cpu" and not cpu_bf16):
        return torch.autocast(device.type, enabled=False)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.autocast("cpu", dtype=torch.bfloat16)


def train(cfg: TrainConfig, log=print) -> Path:
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    unet_cfg = UNetConfig(image_size=cfg.image_size, in_channels=cfg.channels, out_channels=cfg.channels,
                          model_channels=cfg.model_channels, channel_mult=cfg.channel_mult,
                          num_res_blocks=cfg.num_res_blocks, attention_levels=cfg.attention_levels,
                          num_head_channels=cfg.num_head_channels)
    diffusion = DiffusionConfig(variance_type="fixed_small")
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(cfg.data, cfg.image_size, cfg.channels)  # after the config's checks: no wait for an error
    log(f"{len(data)} training images from {cfg.data}, {cfg.image_size}px, device {device}")
    schedule = Schedule.from_config(diffusion)
    abar = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32, device=device)

    torch.manual_seed(cfg.seed)
    model = UNet(unet_cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed_before = 0, 0.0
    gen = torch.Generator().manual_seed(cfg.seed)

    state_path = out / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        if UNetConfig.from_dict(state["unet"]) != unet_cfg:  # compared as configs: newer fields take defaults
            raise ValueError(f"{state_path} was trained with another architecture; use a new --out or delete it")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
        gen.set_state(state["rng"])
        log(f"resumed from step {step} ({elapsed_before / 60:.1f} min of training so far)")
    elif (out / "model.safetensors").exists() and (out / "config.json").exists():
        step, elapsed_before = continue_from_export(out, unet_cfg, model, ema, log)
    log(f"model: {count_parameters(model) / 1e6:.2f} M parameters")

    def save_state() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                    "rng": gen.get_state(), "unet": unet_cfg.to_dict(), "elapsed_s": elapsed_before + time.time() - start},
                   tmp)
        os.replace(tmp, state_path)
        export_model(ema, diffusion, out, {"steps": step, "batch_size": cfg.batch_size, "images": len(data),
                                           "minutes": round((elapsed_before + time.time() - start) / 60, 1),
                                           "device": str(device)})

    start = last_save = time.time()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True)
    model.train()
    while step < cfg.max_steps:
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        x0 = data[idx].float() / 127.5 - 1.0
        flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0).to(device)
        t = torch.randint(schedule.num_steps, (cfg.batch_size,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        a = abar[t][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with _autocast(device, cfg.mixed_precision, cfg.cpu_bf16):
            pred = model(xt, t)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
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
            save_state()
            write_sample_grid(ema, diffusion, out / "samples" / f"step_{step:07d}.png", device)
        if cfg.max_minutes and (elapsed_before + now - start) > cfg.max_minutes * 60:
            log(f"time budget of {cfg.max_minutes} min reached at step {step}")
            break
    save_state()
    bar.close()
    return out / "model.safetensors"


def write_sample_grid(unet: UNet, diffusion: DiffusionConfig, path: Path, device: torch.device, n: int = 16,
                      steps: str = "100") -> Path:
    """An unconditional grid from the EMA weights, to watch training progress by eye."""
    from .model import DiffusionModel
    from .sampler import sample
    from .images import tensor_to_pil
    from .grid import image_grid

    was_training = unet.training
    unet.eval()
    model = DiffusionModel(unet=unet, diffusion=diffusion, name="training-ema", device=device)
    x = sample(model, None, seeds=list(range(n)), steps=steps)
    unet.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid([tensor_to_pil(im) for im in x], cols=int(math.sqrt(n))).save(path)
    return path
