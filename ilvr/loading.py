"""Load the checkpoints people actually have, without asking them for architecture flags.

Accepted sources (``load_model(source)``):
  * a bundled model name (``ilvr.registry``), e.g. ``emoji64``;
  * a local file: guided-diffusion/ADM ``.pt``/``.pth``, or a ``.safetensors`` of ours or of diffusers;
  * a local folder: ours (config.json + model.safetensors) or diffusers (config.json +
    diffusion_pytorch_model.safetensors/.bin + scheduler_config.json, flat or in unet/ and scheduler/);
  * a Hugging Face Hub repo id, optionally with a file: ``google/ddpm-ema-church-256`` or
    ``deepinv/diffunet`` with filename ``diffusion_ffhq_10m.pt`` (or ``deepinv/diffunet:diffusion_ffhq_10m.pt``).

A raw ADM ``.pt`` carries no flags, so the architecture is read off the tensor shapes and keys (the
official repo's most reported failure is "size mismatch" from hand-typed flags). Pickles are only
ever opened with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch

from .cpu_memory import keep_freed_heap
from .model import DiffusionModel, inference_unet
from .network import UNet, UNetConfig
from .onnx_cpu import cpu_backend as cpu_backend_choice
from .onnx_cpu import cpu_runtime_for
from .schedule import DiffusionConfig, guided_diffusion_betas

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS_DIR = PROJECT_ROOT / "checkpoints"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
ADM_IMAGE_SIZE_BY_MULT = {(1, 1, 2, 2, 4, 4): 256, (1, 1, 2, 3, 4): 128, (1, 2, 3, 4): 64, (0.5, 1, 1, 2, 2, 4, 4): 512}


class ModelLoadError(RuntimeError):
    """A model that could not be loaded, with a message meant for the user."""


def hub_cache_dir() -> Path:
    """Where hub downloads go: $ILVR_CACHE; else huggingface_hub's own cache when HF_HUB_CACHE or HF_HOME
    is set (a Space's persistent /data, a shared cache the user chose); else checkpoints/hub."""
    if os.environ.get("ILVR_CACHE"):
        return Path(os.environ["ILVR_CACHE"]).expanduser()
    return _user_hf_cache() or CHECKPOINTS_DIR / "hub"


_HF_CACHE_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


def _huggingface_cache() -> Path:
    """huggingface_hub's cache folder, by its own precedence (read now, where huggingface_hub.constants
    froze the environment at import): HF_HUB_CACHE > HUGGINGFACE_HUB_CACHE > HF_HOME > XDG_CACHE_HOME."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(folder)).expanduser()


def _user_hf_cache() -> Path | None:
    """huggingface_hub's cache folder when the environment names one, else None."""
    return _huggingface_cache() if any(os.environ.get(name) for name in _HF_CACHE_VARIABLES) else None


# ----------------------------------------------------------------------------- reading weights

def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (for safetensors) metadata of one weights file."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{path.name} is not a readable safetensors file: {e}") from e
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK") or magic.startswith(b"\x80")):  # torch.save's zip archive, or a legacy pickle
        raise ModelLoadError(f"{path.name} is not a PyTorch checkpoint (torch.save writes a zip archive or a pickle; "
                             f"this file is neither{', it is empty' if not magic else ''})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; none should crash the caller
        detail = _weights_only_detail(str(e))  # torch's full text advises weights_only=False: we never do that
        if detail.startswith("Unsupported global"):
            raise ModelLoadError(
                f"{path.name} holds Python objects besides tensors (a full pickle: {detail}), which are refused "
                "for safety: only plain state dicts of tensors load. Save `model.state_dict()` (or its EMA "
                "weights) with torch.save, or as .safetensors.") from e
        if detail:
            raise ModelLoadError(f"{path.name} could not be loaded as a weights-only PyTorch checkpoint ({detail}): "
                                 "the file may be damaged, or was not written by torch.save.") from e
        raise ModelLoadError(
            f"{path.name} could not be loaded as a weights-only PyTorch checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). Only plain state dicts are accepted; arbitrary pickles are refused "
            "for safety.") from e
    return _unwrap_state_dict(obj, path.name), _train_state_metadata(obj)


def _train_state_metadata(obj: Any) -> dict[str, str]:
    """`ilvr train`'s resumable state records its architecture: read it like our safetensors' metadata,
    so the state's EMA weights load with their real settings instead of a guessed ADM layout."""
    if not (isinstance(obj, Mapping) and isinstance(obj.get("unet"), Mapping) and isinstance(obj.get("ema"), Mapping)
            and "step" in obj):
        return {}
    from .train import training_diffusion  # here: train imports this module

    diffusion = obj.get("diffusion") or training_diffusion().to_dict()
    config = {"format": "ilvr", "unet": dict(obj["unet"]), "diffusion": dict(diffusion),
              "training": {"steps": int(obj["step"]), "source": "training state (EMA weights, fp32)"}}
    return {"ilvr_config": json.dumps(config)}


def _weights_only_detail(message: str) -> str:
    """What torch's weights-only unpickler objected to, without the advice around it."""
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\n|$)", message, re.S)
    return match.group(1).strip() if match else ""


def _unwrap_state_dict(obj: Any, name: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and {"state", "param_groups"} <= set(obj):
        raise ModelLoadError(f"{name} is an optimizer state (opt*.pt), not model weights; load the ema_*.pt or model*.pt file")
    for key in ("ema", "ema_model", "state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{name} does not hold a state dict of tensors")
    sd = dict(obj)
    for wrapper in ("module.", "_orig_mod."):  # saved from DistributedDataParallel, from torch.compile
        if sd and all(k.startswith(wrapper) for k in sd):
            sd = {k[len(wrapper):]: v for k, v in sd.items()}
    return sd


# ----------------------------------------------------------------------------- ADM (guided-diffusion)

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


# ----------------------------------------------------------------------------- diffusers UNet2DModel

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


# ----------------------------------------------------------------------------- resolving a source

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def _first_existing(folder: Path, names: list[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _weights_in_folder(folder: Path) -> Path:
    found = _first_existing(folder, ["model.safetensors", "diffusion_pytorch_model.safetensors",
                                     "diffusion_pytorch_model.bin", "model.pt"])
    if found:
        return found
    candidates = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModelLoadError(f"no weights file ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
    raise ModelLoadError(f"{folder} holds several weights files ({', '.join(p.name for p in candidates)}); pass one of them")


def build_from_files(weights: Path, config: dict[str, Any] | None = None,
                     scheduler: dict[str, Any] | None = None, **overrides) -> tuple[UNet, DiffusionConfig, dict]:
    """Identify the format, infer or read the config, and return a loaded UNet (fp32, CPU)."""
    sd, metadata = read_state_dict(weights)
    options = dict(overrides)
    if config is None and "ilvr_config" in metadata:
        config = json.loads(metadata["ilvr_config"])
    num_head_channels = overrides.pop("num_head_channels", None)
    num_heads = overrides.pop("num_heads", None)
    image_size = overrides.pop("image_size", None)
    attention_order = overrides.pop("attention_order", "legacy")
    diffusion_overrides = {k: overrides.pop(k) for k in list(overrides) if k in DiffusionConfig.__dataclass_fields__}
    if overrides:
        known = ["image_size", "num_head_channels", "num_heads", "attention_order", *DiffusionConfig.__dataclass_fields__]
        raise ModelLoadError(f"unknown load options {sorted(overrides)}; known: {', '.join(known)}")
    if attention_order not in ("legacy", "new"):
        raise ModelLoadError(f"attention_order must be 'legacy' or 'new' (ADM's use_new_attention_order), "
                             f"got {attention_order!r}")
    if num_heads is not None and num_head_channels is not None:
        raise ModelLoadError("give num_heads (the same head count at every level) or num_head_channels (channels "
                             "per head), not both")
    for name, value in (("num_heads", num_heads), ("num_head_channels", num_head_channels)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ModelLoadError(f"{name} must be a whole number above 0, got {value!r}")

    try:  # a hand-edited config or a bad option fails here with a message, not deep inside sampling
        if config is not None and config.get("format") == "ilvr":
            unet_cfg = UNetConfig.from_dict(config["unet"])
            diffusion = DiffusionConfig.from_dict(config.get("diffusion", {}))
            family = "ilvr"
        elif "input_blocks.0.0.weight" in sd:
            unet_cfg = infer_adm_config(sd, -1 if num_heads else num_head_channels or 64, image_size)
            if num_heads:
                unet_cfg = replace(unet_cfg, num_heads=num_heads)
            if attention_order == "new":
                sd = new_to_legacy_qkv(sd, unet_cfg)
            diffusion = DiffusionConfig(variance_type="learned_range" if unet_cfg.learn_sigma else "fixed_large")
            family = "adm"
        elif "conv_in.weight" in sd:
            if config is None:
                raise ModelLoadError(f"{weights.name} holds diffusers UNet2DModel weights but no config.json was found beside it")
            unet_cfg = unet_config_from_diffusers(config)
            sd = diffusers_to_adm(sd, unet_cfg)
            if scheduler is None:
                warnings.warn(f"{weights.name}: no scheduler_config.json beside it (or in ../scheduler/): assuming "
                              "diffusers' DDPMScheduler defaults (linear betas 1e-4..0.02 over 1000 steps, epsilon); "
                              "a model trained otherwise needs --model-option, e.g. beta_schedule=cosine",
                              stacklevel=2)
            diffusion = diffusion_from_scheduler(scheduler or {})
            family = "diffusers"
        else:
            sample = ", ".join(list(sd)[:4])
            raise ModelLoadError(
                f"{weights.name} matches no known layout: expected guided-diffusion/ADM keys (input_blocks.0.0.weight, "
                f"time_embed.0.weight, out.2.weight, ...) or diffusers UNet2DModel keys (conv_in.weight, "
                f"down_blocks.0.resnets.0.conv1.weight, ...); found {sample}, ...")
        if image_size is not None:
            unet_cfg = replace(unet_cfg, image_size=image_size)  # re-checked: the levels must divide it
        if (num_head_channels or num_heads) and family != "adm":
            raise ModelLoadError(f"{weights.name} records its attention heads ({family} format); num_head_channels and "
                                 "num_heads are only for guided-diffusion .pt files, which do not")
        if diffusion_overrides:
            diffusion = DiffusionConfig.from_dict({**diffusion.to_dict(), **diffusion_overrides})
        if family == "adm" and not {"beta_start", "beta_end"} & set(diffusion_overrides):
            diffusion = guided_diffusion_betas(diffusion)  # e.g. num_train_timesteps=4000 (improved-diffusion)
    except ModelLoadError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError) as e:
        raise ModelLoadError(f"{weights.name}: its config or load options cannot be used ({type(e).__name__}: {e})") from e
    if (diffusion.variance_type == "learned_range") != unet_cfg.learn_sigma:
        raise ModelLoadError(
            f"{weights.name}: variance_type {diffusion.variance_type!r} does not fit a UNet with {unet_cfg.out_channels} "
            f"output channels for {unet_cfg.in_channels} input channels (a learned variance doubles them)")

    try:
        with torch.device("meta"):
            unet = UNet(unet_cfg)
    except ValueError as e:
        hint = ("; pass the heads it was trained with (CLI: --model-option num_head_channels=32 or num_heads=4; "
                "Python: load_model(..., num_heads=4))") if "heads" in str(e) else ""
        raise ModelLoadError(f"{weights.name}: {e}{hint}") from e
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    missing, unexpected = _key_diff(unet, sd)
    if missing or unexpected:
        raise ModelLoadError(
            f"{weights.name}: the weights do not fit the inferred architecture ({family}). "
            f"Missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; unexpected: {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}")
    try:
        unet.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{weights.name}: shape mismatch against the inferred architecture ({family}): "
                             f"{str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else e}") from e
    info = {"family": family, "weights": str(weights)}
    if options:
        info["options"] = options
    if family == "ilvr" and config.get("training"):
        info["training"] = dict(config["training"])  # how many steps and images: `ilvr info` shows it
    return unet.eval(), diffusion, info


def _key_diff(unet: UNet, sd: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    expected = set(unet.state_dict())
    return sorted(expected - set(sd)), sorted(set(sd) - expected)


def load_local(path: Path, **overrides) -> tuple[UNet, DiffusionConfig, dict]:
    if path.is_dir():
        folder = path / "unet" if (path / "unet" / "config.json").is_file() and not (path / "config.json").is_file() else path
        config_path = folder / "config.json"
        config = _read_json(config_path) if config_path.is_file() else None
        sched_path = _first_existing(path, ["scheduler_config.json", "scheduler/scheduler_config.json",
                                            "../scheduler/scheduler_config.json"])  # path is a pipeline's unet/
        scheduler = _read_json(sched_path) if sched_path else None
        return build_from_files(_weights_in_folder(folder), config, scheduler, **overrides)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelLoadError(f"{path.name}: expected a weights file ({', '.join(WEIGHT_SUFFIXES)}) or a model folder")
    config_path = path.parent / "config.json"
    config = _read_json(config_path) if config_path.is_file() else None
    if config is not None and config.get("format") != "ilvr" and "_class_name" not in config and "block_out_channels" not in config:
        config = None  # an unrelated config.json beside a .pt
    sched_path = _first_existing(path.parent, ["scheduler_config.json", "../scheduler/scheduler_config.json"])
    return build_from_files(path, config, _read_json(sched_path) if sched_path else None, **overrides)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


HUB_PROBE_TIMEOUT_S = 5.0


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be used now (offline mode, no DNS, no answer in a few seconds), or None.

    huggingface_hub retries a silent server for minutes (six 10 s timeouts per file, three files per
    model) before it looks in the cache; behind a firewall that held the app's only run slot for 6.5
    minutes. One quick request decides instead, and then the cache is used directly.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return "offline mode (HF_HUB_OFFLINE)"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"offline ({host} cannot be resolved)"
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # httpx/requests raise their own timeout and connection errors
        return f"{constants.ENDPOINT} did not answer within {HUB_PROBE_TIMEOUT_S:g} s ({type(e).__name__})"
    return None


def download_from_hub(repo_id: str, filename: str | None = None, revision: str | None = None,
                      cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch a model from the Hub into the cache (or find it there when offline); return a local path."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    cache = str(cache_dir or hub_cache_dir())
    unreachable = _hub_unreachable()
    local_only = unreachable is not None
    # a model already in huggingface_hub's usual cache (fetched by diffusers, say) is used from there
    default_cache = _huggingface_cache()
    other_cache = str(default_cache) if local_only and default_cache.is_dir() and default_cache != Path(cache) else None

    def fetch(name: str) -> Path:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache, local_files_only=local_only))
        except LocalEntryNotFoundError:
            if other_cache is None:
                raise
            return Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=other_cache, local_files_only=True))

    def fetch_model(prefix: str, scheduler: str) -> Path:
        """config.json, the scheduler config if the repo has one, and the weights; returns their folder."""
        config = fetch(prefix + "config.json")
        try:
            fetch(scheduler)
        except EntryNotFoundError as e:
            if isinstance(e, LocalEntryNotFoundError):  # a subclass: offline, not "absent from the repo"
                raise
        for weights in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            try:
                fetch(prefix + weights)
                break
            except EntryNotFoundError as e:
                if isinstance(e, LocalEntryNotFoundError):
                    raise
        else:
            raise ModelLoadError(f"{repo_id} has a {prefix}config.json but no {prefix}diffusion_pytorch_model weights")
        return config.parent

    try:
        if filename:
            return fetch(filename)
        try:
            return fetch_model("", "scheduler_config.json")
        except EntryNotFoundError as flat_missing:  # also raised offline for a file not in the cache
            try:  # a pipeline repo: model_index.json + unet/ + scheduler/ (load_local reads that layout)
                return fetch_model("unet/", "scheduler/scheduler_config.json").parent
            except EntryNotFoundError:
                raise flat_missing from None
    except GatedRepoError as e:
        raise ModelLoadError(f"{repo_id} is gated: accept its terms on huggingface.co and log in "
                             "(`huggingface-cli login` or HF_TOKEN)") from e
    except RepositoryNotFoundError as e:
        raise ModelLoadError(f"no model {repo_id!r} on the Hugging Face Hub (or it is private)") from e
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"{repo_id} has no revision {revision!r}") from e
    except LocalEntryNotFoundError as e:
        raise ModelLoadError(f"cannot download {repo_id}{':' + filename if filename else ''}: "
                             f"{unreachable or 'offline'}, and it is not in the cache ({cache}). Connect to the "
                             "internet once, or use the bundled model.") from e
    except EntryNotFoundError as e:
        raise ModelLoadError(f"{repo_id} has no file {filename or 'config.json'!r}; for a repo of raw "
                             "checkpoints pass the file name (e.g. deepinv/diffunet:diffusion_ffhq_10m.pt)") from e
    except OSError as e:  # connection errors surface as requests/httpx OSErrors
        raise ModelLoadError(f"cannot download {repo_id}: {e}") from e


def resolve_device(device: str | torch.device | None) -> torch.device:
    """auto (CUDA when present), cpu, cuda or cuda:N; anything else is a clear error, not torch's."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError("CUDA was asked for but torch sees no GPU; use the CPU "
                                 "(--device cpu, or device='cpu' in Python)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelLoadError(f"{device} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    return resolved


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


def load_model(source: str | os.PathLike, device: str | torch.device | None = "auto",
               dtype: torch.dtype | str | None = None, *, filename: str | None = None, revision: str | None = None,
               cache_dir: str | os.PathLike | None = None, channels_last: bool | None = None,
               cpu_backend: str | None = None, **overrides) -> DiffusionModel:
    """Load a model from a bundled name, local file/folder or Hub repo id (see module docstring).

    dtype is the compute dtype: default float32 on CPU and float16 on CUDA (bf16 where supported
    is also fine). channels_last (default: on CPU only) stores the weights in oneDNN's preferred
    layout, about 20% faster on CPU (``python -m ilvr bench``); on CUDA it measured slower.
    On CPU this also fixes glibc's heap thresholds for the process (``ilvr.cpu_memory``: otherwise every
    step page-faults its activations in afresh), and in float32 samples through onnxruntime
    (``ilvr.onnx_cpu``; cpu_backend='torch' or ILVR_CPU_BACKEND=torch keeps PyTorch).
    overrides (what a guided-diffusion .pt does not record): image_size, num_head_channels or num_heads,
    attention_order ('legacy'|'new') and any DiffusionConfig field (e.g. beta_schedule='cosine').
    """
    from .registry import BUNDLED, BY_NAME, MODELS

    dev = resolve_device(device)  # argument errors before any file is read or downloaded
    dtype = resolve_dtype(dtype, dev)
    try:
        backend = cpu_backend_choice(cpu_backend)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    name = str(source)
    if name in BY_NAME and not BY_NAME[name].bundled:  # a registry display name for a hub model
        entry = BY_NAME[name]
        filename = filename or entry.filename
        name = entry.source
    if name in BUNDLED:
        unet, diffusion, info = load_local(BUNDLED[name].path, **overrides)
    elif Path(name).expanduser().exists():
        unet, diffusion, info = load_local(Path(name).expanduser(), **overrides)
    else:
        repo_id, _, file_in_id = name.partition(":")
        if not HUB_ID.match(repo_id):
            bundled = ", ".join(BUNDLED) or "none"
            raise ModelLoadError(f"{name!r} is neither a local file/folder, a bundled model ({bundled}) "
                                 "nor a Hub repo id like google/ddpm-ema-church-256")
        path = download_from_hub(repo_id, filename or file_in_id or None, revision, cache_dir)
        unet, diffusion, info = load_local(path, **overrides)
        info["repo_id"] = repo_id
        info["known"] = any(m.source == repo_id and m.filename == (filename or file_in_id or None) for m in MODELS)
    if dev.type == "cpu":
        keep_freed_heap()
    unet = inference_unet(unet, dev, dtype, dev.type == "cpu" if channels_last is None else channels_last)
    return DiffusionModel(unet=unet, diffusion=diffusion, name=name, device=dev, dtype=dtype, source=name,
                          info=info, cpu_runtime=cpu_runtime_for(unet, dev, dtype, backend))


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """A compute dtype from a name ('fp16', 'bfloat16', ...); None: float16 on CUDA, float32 elsewhere."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    resolved = names.get(dtype.strip().lower().removeprefix("torch.")) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise ModelLoadError(f"dtype must be fp32, fp16 or bf16 (or torch.float32/float16/bfloat16), got {dtype!r}")
    return resolved
