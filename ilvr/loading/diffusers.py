"""diffusers UNet2DModel folders: their config and scheduler config mapped onto our UNet and
DiffusionConfig, and their state dict (old attention names included) renamed onto the ADM module tree."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..network import UNetConfig
from ..schedule import DiffusionConfig
from .errors import ModelLoadError

# diffusers block type -> (has attention, its resampler: "conv", "resnet", or None = the config's
# downsample_type / upsample_type). Only these map onto the ADM module tree; the skip blocks (score-SDE's
# FIR resampling and skip paths) and anything else are refused rather than loaded wrongly.
_DOWN_BLOCKS = {"DownBlock2D": (False, "conv"), "AttnDownBlock2D": (True, None),
                "ResnetDownsampleBlock2D": (False, "resnet")}
_UP_BLOCKS = {"UpBlock2D": (False, "conv"), "AttnUpBlock2D": (True, None), "ResnetUpsampleBlock2D": (False, "resnet")}


def _blocks(types: list[str], table: dict[str, tuple[bool, str | None]], sampler_type: str,
            what: str) -> tuple[list[bool], set[str]]:
    """Attention per block, and the resampler kinds of all blocks but the last (which has none)."""
    unknown = [t for t in types if t not in table]
    if unknown:
        raise ModelLoadError(f"unsupported diffusers {what} blocks {unknown}; supported: {sorted(table)}")
    kinds = {table[t][1] or sampler_type for t in types[:-1]}
    return [table[t][0] for t in types], kinds


def unet_config_from_diffusers(cfg: Mapping[str, Any]) -> UNetConfig:
    """Map a UNet2DModel config onto our UNet, refusing every option our UNet does not compute the same
    way: loading such weights would not fail, it would silently give wrong images."""
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ModelLoadError(f"only diffusers UNet2DModel is supported, this config is a {cfg.get('_class_name')}")
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise ModelLoadError("only positional time embeddings are supported (Fourier ones are for score-SDE models)")
    boc = list(cfg.get("block_out_channels", (224, 448, 672, 896)))
    down_types = list(cfg.get("down_block_types", ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")))
    up_types = list(cfg.get("up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")))
    down_attention, down_kinds = _blocks(down_types, _DOWN_BLOCKS, cfg.get("downsample_type", "conv"), "down")
    up_attention, up_kinds = _blocks(up_types, _UP_BLOCKS, cfg.get("upsample_type", "conv"), "up")
    if len(up_types) != len(down_types) or up_attention != down_attention[::-1]:
        raise ModelLoadError(f"attention must sit at the same levels going down and up; down_block_types "
                             f"{down_types} and up_block_types {up_types} do not mirror each other")
    if len(down_kinds | up_kinds) > 1:
        raise ModelLoadError("all down- and upsamplers must be of one kind (conv or resnet); this config mixes "
                             f"them (down_block_types {down_types}, downsample_type {cfg.get('downsample_type', 'conv')!r}, "
                             f"up_block_types {up_types}, upsample_type {cfg.get('upsample_type', 'conv')!r})")
    scale_shift = cfg.get("resnet_time_scale_shift", "default")
    groups = cfg.get("norm_num_groups", 32)
    # the middle block's attention normalises with attn_norm_num_groups, or when that is unset with
    # norm_num_groups under "default" and with no norm at all under "scale_shift"
    mid_groups = cfg.get("attn_norm_num_groups") or (groups if scale_shift == "default" else None)
    unsupported = {
        "resnet_time_scale_shift": scale_shift not in ("default", "scale_shift"),
        "act_fn": cfg.get("act_fn", "silu") not in ("silu", "swish"),
        "center_input_sample": bool(cfg.get("center_input_sample", False)),
        "mid_block_type": cfg.get("mid_block_type", "UNetMidBlock2D") != "UNetMidBlock2D",
        "add_attention": not cfg.get("add_attention", True),
        "time_embedding_dim": cfg.get("time_embedding_dim") not in (None, 4 * boc[0]),
        "norm_num_groups": not isinstance(groups, int),
        "attn_norm_num_groups": mid_groups is not None and mid_groups != groups,
        "class_embed_type": cfg.get("class_embed_type") is not None,
        "mid_block_scale_factor": cfg.get("mid_block_scale_factor", 1) != 1,
    }
    bad = [f"{k}={cfg.get(k)!r}" for k, v in unsupported.items() if v]
    if mid_groups is None:
        bad.append("a middle attention without GroupNorm (diffusers' choice for resnet_time_scale_shift='scale_shift' "
                   "without attn_norm_num_groups)")
    if bad:
        raise ModelLoadError(f"this diffusers UNet uses options our UNet does not implement: {', '.join(bad)}")
    head_dim = cfg.get("attention_head_dim", 8)
    size = cfg.get("sample_size") or 64
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ModelLoadError(f"this diffusers UNet makes {size[0]}x{size[1]} images; only square models are supported")
        size = size[0]
    return UNetConfig(
        image_size=int(size), in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3), model_channels=boc[0],
        channel_mult=tuple(c // boc[0] if c % boc[0] == 0 else c / boc[0] for c in boc),
        num_res_blocks=cfg.get("layers_per_block", 2),
        attention_levels=tuple(i for i, a in enumerate(down_attention) if a),
        num_head_channels=-1 if head_dim is None else head_dim,
        use_scale_shift_norm=scale_shift == "scale_shift",
        resblock_updown=down_kinds == {"resnet"},
        downsample_padding="asymmetric" if cfg.get("downsample_padding", 1) == 0 else "symmetric",
        norm_eps=cfg.get("norm_eps", 1e-5), norm_groups=groups, flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
        freq_shift=cfg.get("freq_shift", 0), num_classes=cfg.get("num_class_embeds"),
    )


_RESNET_RENAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                   "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_ATTN_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _RESNET_RENAMES:
        raise ModelLoadError(f"unexpected diffusers resnet parameter {rest!r}")
    return f"{_RESNET_RENAMES[head]}.{tail}"


def diffusers_to_adm(sd: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DModel state dict onto our (ADM) module tree."""
    R = cfg.num_res_blocks
    out: dict[str, torch.Tensor] = {}
    attn: dict[str, dict[str, torch.Tensor]] = {}  # our attention prefix -> {to_q.weight: ...}
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
           "class_embedding": "label_emb"}

    def attention_param(prefix: str, rest: str, value: torch.Tensor) -> None:
        name, _, kind = rest.rpartition(".")
        name = _ATTN_LEGACY.get(name, name)
        if name == "group_norm":
            out[f"{prefix}.norm.{kind}"] = value
        else:
            attn.setdefault(prefix, {})[f"{name}.{kind}"] = value

    for key, value in sd.items():
        for src, dst in top.items():
            if key.startswith(src + "."):
                out[dst + key[len(src):]] = value
                break
        else:
            parts = key.split(".")
            if parts[0] == "down_blocks":
                level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
                base = 1 + level * (R + 1)
                if kind == "resnets":
                    out[f"input_blocks.{base + j}.0.{_rename_resnet(rest)}"] = value
                elif kind == "attentions":
                    attention_param(f"input_blocks.{base + j}.1", rest, value)
                elif kind == "downsamplers":
                    sub = rest.split(".", 1)
                    out[f"input_blocks.{base + R}.0." + (f"op.{sub[1]}" if sub[0] == "conv" else _rename_resnet(rest))] = value
                else:
                    raise ModelLoadError(f"unexpected diffusers key {key}")
            elif parts[0] == "up_blocks":
                u, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
                level = cfg.num_levels - 1 - u
                base = u * (R + 1)
                if kind == "resnets":
                    out[f"output_blocks.{base + j}.0.{_rename_resnet(rest)}"] = value
                elif kind == "attentions":
                    attention_param(f"output_blocks.{base + j}.1", rest, value)
                elif kind == "upsamplers":
                    slot = 2 if level in cfg.attention_levels else 1
                    sub = rest.split(".", 1)
                    out[f"output_blocks.{base + R}.{slot}." + (f"conv.{sub[1]}" if sub[0] == "conv" else _rename_resnet(rest))] = value
                else:
                    raise ModelLoadError(f"unexpected diffusers key {key}")
            elif parts[0] == "mid_block":
                kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
                if kind == "resnets":
                    out[f"middle_block.{2 * j}.{_rename_resnet(rest)}"] = value
                else:
                    attention_param("middle_block.1", rest, value)
            else:
                raise ModelLoadError(f"unexpected diffusers key {key}")

    for prefix, p in attn.items():
        try:
            q, k, v = (p[f"to_{n}.weight"] for n in "qkv")
            qb, kb, vb = (p[f"to_{n}.bias"] for n in "qkv")
            proj_w, proj_b = p["to_out.0.weight"], p["to_out.0.bias"]
        except KeyError as e:
            raise ModelLoadError(f"attention at {prefix} lacks {e}") from e
        c = q.shape[0]
        heads = cfg.heads(c)
        d = c // heads
        # legacy layout: per head, its q rows, then k rows, then v rows
        w = torch.stack([q.reshape(heads, d, -1), k.reshape(heads, d, -1), v.reshape(heads, d, -1)], dim=1)
        b = torch.stack([qb.reshape(heads, d), kb.reshape(heads, d), vb.reshape(heads, d)], dim=1)
        out[f"{prefix}.qkv.weight"] = w.reshape(3 * c, c, 1)
        out[f"{prefix}.qkv.bias"] = b.reshape(3 * c)
        out[f"{prefix}.proj_out.weight"] = proj_w.reshape(c, c, 1)
        out[f"{prefix}.proj_out.bias"] = proj_b
    return out


def diffusion_from_scheduler(cfg: Mapping[str, Any]) -> DiffusionConfig:
    schedule = cfg.get("beta_schedule", "linear")
    if schedule not in ("linear", "squaredcos_cap_v2"):
        raise ModelLoadError(f"unsupported beta_schedule {schedule!r} in scheduler_config.json")
    if cfg.get("trained_betas"):
        raise ModelLoadError("scheduler_config.json with trained_betas is not supported")
    variance = cfg.get("variance_type", "fixed_small")
    # diffusers samples the _log variants alike (the same variance, clipped or logged differently)
    variance = {"fixed_small_log": "fixed_small", "fixed_large_log": "fixed_large"}.get(variance, variance)
    unsupported = {
        "variance_type": variance == "learned",  # the log variance itself, not learned_range's interpolation
        "thresholding": bool(cfg.get("thresholding", False)),
        "clip_sample_range": cfg.get("clip_sample_range", 1.0) != 1.0,
        "rescale_betas_zero_snr": bool(cfg.get("rescale_betas_zero_snr", False)),
    }
    bad = [f"{k}={cfg.get(k)!r}" for k, v in unsupported.items() if v]
    if bad:
        raise ModelLoadError(f"scheduler_config.json uses settings our sampler does not implement: {', '.join(bad)}")
    return DiffusionConfig(num_train_timesteps=cfg.get("num_train_timesteps", 1000),
                           beta_schedule="cosine" if schedule == "squaredcos_cap_v2" else "linear",
                           beta_start=cfg.get("beta_start", 1e-4), beta_end=cfg.get("beta_end", 0.02),
                           prediction_type=cfg.get("prediction_type", "epsilon"), variance_type=variance,
                           clip_sample=bool(cfg.get("clip_sample", True)))

