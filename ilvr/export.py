"""Our model folder: ``config.json`` + ``model.safetensors`` (fp16 weights, the config in their metadata
too), as training and ``python -m ilvr convert`` write it and ``ilvr.loading`` reads it with nothing
else to pass; and recognising a folder that holds another tool's model, so training never overwrites it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .network import UNet
from .schedule import DiffusionConfig

STATE_FILE = "train_state.ckpt.pt"  # the resumable training state beside an export (git-ignored)
# files that hold a model of any tool (more than load_model reads: ilvr.loading.LOADABLE_WEIGHT_SUFFIXES);
# one of another tool's in the --out folder means training there would overwrite its config.json
MODEL_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".onnx", ".msgpack", ".h5")


def export_model(model: UNet, diffusion: DiffusionConfig, out_dir: str | os.PathLike, info: dict | None = None,
                 dtype: torch.dtype = torch.float16) -> Path:
    """Write weights (safetensors, fp16 by default, config in its metadata too) and config.json."""
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


def foreign_model(out: Path) -> str | None:
    """What in `out` belongs to a model that is not ours (None: no model, or our own export/state).
    Training writes config.json and model.safetensors there, so it would overwrite that model."""
    if not out.is_dir():
        return None
    config = out / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            return "a config.json that is not ours"
        if not isinstance(data, dict) or data.get("format") != "ilvr":
            kind = (data.get("_class_name") or data.get("model_type")) if isinstance(data, dict) else None
            return f"config.json of a {kind}" if isinstance(kind, str) else 'a config.json without "format": "ilvr"'
    if (out / "model_index.json").is_file():
        return "a diffusers pipeline: model_index.json"
    weights = sorted(p.name for p in out.iterdir() if p.is_file() and p.suffix.lower() in MODEL_FILE_SUFFIXES
                     and p.name not in (STATE_FILE, "model.safetensors"))
    if weights:
        return ", ".join(weights[:3]) + (f" and {len(weights) - 3} more" if len(weights) > 3 else "")
    if (out / "model.safetensors").is_file() and not config.is_file() and export_config(out) is None:
        return "model.safetensors without our config.json"
    return None


def export_config(out: Path) -> dict | None:
    """Our exported model's config: config.json, or else the copy in model.safetensors' metadata."""
    config = out / "config.json"
    if config.is_file():
        return json.loads(config.read_text())
    try:
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            return json.loads((f.metadata() or {})["ilvr_config"])
    except Exception:  # not a safetensors file, or not ours
        return None


def config_differences(old: dict, new: dict, where: str) -> list[str]:
    """'field: old where, new asked' for every field that differs, to say what to change."""
    def show(v):
        return "(none)" if v is None else v

    return [f"{k}: {show(old.get(k))} {where}, {show(new.get(k))} asked" for k in new if old.get(k) != new.get(k)]
