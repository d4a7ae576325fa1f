"""guided-diffusion/ADM checkpoints: a raw .pt carries no flags, so its architecture is read off the
tensor shapes and keys, and what it cannot record is assumed from the published models."""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from ..model import DiffusionModel
from ..network import UNetConfig
from .errors import ModelLoadError

ADM_IMAGE_SIZE_BY_MULT = {(1, 1, 2, 2, 4, 4): 256, (1, 1, 2, 3, 4): 128, (1, 2, 3, 4): 64, (0.5, 1, 1, 2, 2, 4, 4): 512}


def _block_indices(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    pat = re.compile(rf"^{prefix}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def _submodules(sd: Mapping[str, torch.Tensor], block: str) -> dict[int, set[str]]:
    """For 'output_blocks.3' -> {0: {'in_layers', ...}, 1: {'norm', 'qkv', ...}, ...}."""
    pat = re.compile(rf"^{re.escape(block)}\.(\d+)\.([^.]+)")
    subs: dict[int, set[str]] = {}
    for k in sd:
        if m := pat.match(k):
            subs.setdefault(int(m.group(1)), set()).add(m.group(2))
    return subs


def infer_adm_config(sd: Mapping[str, torch.Tensor], num_head_channels: int = 64,
                     image_size: int | None = None) -> UNetConfig:
    """Read a guided-diffusion UNetModel's flags off its state dict."""
    try:
        mc = sd["time_embed.0.weight"].shape[1]
        in_channels = sd["input_blocks.0.0.weight"].shape[1]
        out_channels = sd["out.2.weight"].shape[0]
        n_out = len(_block_indices(sd, "output_blocks"))
        up_at = [k for k in range(n_out) if any(
            ("conv" in s or "in_layers" in s) for idx, s in _submodules(sd, f"output_blocks.{k}").items() if idx > 0)]
        num_res_blocks = (up_at[0] if up_at else n_out - 1)
        levels = n_out // (num_res_blocks + 1)
        mults, attention = [], []
        for level in range(levels):
            first = 1 + level * (num_res_blocks + 1)
            mults.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] / mc)
            if f"input_blocks.{first}.1.qkv.weight" in sd:
                attention.append(level)
        resblock_updown = levels > 1 and f"input_blocks.{1 + num_res_blocks}.0.in_layers.0.weight" in sd
        out_ch0 = sd["input_blocks.1.0.out_layers.3.weight"].shape[0]
        scale_shift = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * out_ch0
    except KeyError as e:
        raise ModelLoadError(f"this looks like a guided-diffusion checkpoint but key {e} is missing") from e
    channel_mult = tuple(int(m) if float(m).is_integer() else m for m in mults)
    if image_size is None:
        image_size = ADM_IMAGE_SIZE_BY_MULT.get(channel_mult, 2 ** (levels + 2))
    num_classes = sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None
    return UNetConfig(image_size=image_size, in_channels=in_channels, out_channels=out_channels, model_channels=mc,
                      channel_mult=channel_mult, num_res_blocks=num_res_blocks, attention_levels=tuple(attention),
                      num_head_channels=num_head_channels, use_scale_shift_norm=scale_shift,
                      resblock_updown=resblock_updown, num_classes=num_classes)


def new_to_legacy_qkv(sd: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """ADM's use_new_attention_order stores qkv as [q,k,v][head][d]; we run the legacy [head][q,k,v][d]."""
    out = dict(sd)
    for k, v in sd.items():
        if k.endswith(".qkv.weight") or k.endswith(".qkv.bias"):
            c = v.shape[0] // 3
            heads = cfg.heads(c)
            out[k] = v.reshape(3, heads, c // heads, *v.shape[1:]).transpose(0, 1).reshape(v.shape)
    return out


def assumed_settings(model: DiffusionModel) -> dict[str, Any]:
    """What loading assumed because a guided-diffusion .pt does not record it (and no option gave it):
    the published ADM/ILVR/P2 models' values, which a user's own model may not share."""
    if model.info.get("family") != "adm" or model.info.get("known"):  # the registry's models are checked
        return {}
    cfg, diffusion, given = model.unet.config, model.diffusion, model.info.get("options", {})
    heads = {"num_heads": cfg.num_heads} if cfg.num_head_channels == -1 else {"num_head_channels": cfg.num_head_channels}
    if given.keys() & {"num_heads", "num_head_channels"}:
        heads = {}
    assumed = {"image_size": cfg.image_size, **heads, "attention_order": "legacy",
               "beta_schedule": diffusion.beta_schedule, "num_train_timesteps": diffusion.num_train_timesteps,
               "prediction_type": diffusion.prediction_type}
    return {k: v for k, v in assumed.items() if k not in given}

