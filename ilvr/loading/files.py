"""Reading weights from disk: safetensors and weights-only pickles (never a full unpickle), the weights
file of a folder, and a loaded UNet built from a weights file with its config and scheduler config."""
from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from ..images import special_kind
from ..network import UNet, UNetConfig
from ..schedule import DiffusionConfig, guided_diffusion_betas, training_diffusion
from .adm import infer_adm_config, new_to_legacy_qkv
from .diffusers import diffusers_to_adm, diffusion_from_scheduler, unet_config_from_diffusers
from .errors import ModelLoadError

LOADABLE_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")  # weights files load_model reads


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (for safetensors) metadata of one weights file."""
    path = Path(path)
    _check_regular_file(path)
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
        with warnings.catch_warnings():  # torch's note on a bare pickle's protocol: not the user's business
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; none should crash the caller
        # torch's own text advises loading with weights_only=False, which runs the pickle's code: never quoted
        message = str(e)
        unsafe = _unsafe_pickle_globals(path) or [g for g in [_refused_global(message)] if g]
        if unsafe:
            raise ModelLoadError(
                f"{path.name} holds Python objects besides tensors (its pickle refers to {' and '.join(unsafe)}), "
                "which are refused for safety: loading a full pickle can run any code, so only plain state dicts of tensors "
                "are read. If the file comes from a source you trust, re-save only its tensors on a trusted "
                "machine (torch.save(model.state_dict(), PATH), or as .safetensors) and turn that into a "
                "pickle-free model folder with `python -m ilvr convert PATH --out FOLDER`.") from e
        detail = _weights_only_detail(message)
        if detail:
            raise ModelLoadError(f"{path.name} could not be loaded as a weights-only PyTorch checkpoint ({detail}): "
                                 "the file may be damaged, or was not written by torch.save.") from e
        first = message.splitlines()[0][:200] if message.strip() else ""
        if "weights_only" in first or "weights only" in first.lower():
            first = ""
        raise ModelLoadError(
            f"{path.name} could not be loaded as a weights-only PyTorch checkpoint ({type(e).__name__}"
            f"{': ' + first if first else ''}). Only plain state dicts are accepted; arbitrary pickles are refused "
            "for safety.") from e
    return unwrap_state_dict(obj, path.name), _train_state_metadata(obj)


def _check_regular_file(path: Path) -> None:
    """A weights file must be a regular file (or a link to one): opening a FIFO blocks, a device never ends."""
    try:
        kind = special_kind(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ModelLoadError(f"weights file not found: {path}") from None
    except OSError as e:
        raise ModelLoadError(f"{path} cannot be read ({e.strerror or type(e).__name__})") from None
    if kind:
        raise ModelLoadError(f"{path} is not a regular file ({kind}); a model is a weights file or a model folder")


_GLOBAL = re.compile(r"\bGLOBAL\s+([A-Za-z_][\w.]*)")  # "Unsupported global: GLOBAL posix.system was not ...",
# "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"


def _refused_global(message: str) -> str | None:
    """The global (module.name) torch's weights-only unpickler refused, read off its message."""
    match = _GLOBAL.search(message)
    return match.group(1).rstrip(".") if match else None


_PICKLE_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
                   "STRING"}


def _pickle_globals(stream, max_ops: int) -> Iterator[str]:
    """module.name of every global one pickle refers to, read with pickletools, which only parses (nothing
    runs). STACK_GLOBAL takes its names from the strings pushed before it, memoized ones included."""
    import pickletools

    strings: list[str | None] = []  # what the ops pushed, as far as it matters here (None: not a string)
    memo: dict[int, str | None] = {}
    for count, (op, arg, _) in enumerate(pickletools.genops(stream)):
        if count > max_ops:
            return
        name = op.name
        if name in ("GLOBAL", "INST"):
            yield str(arg).replace(" ", ".", 1)
        elif name == "STACK_GLOBAL" and len(strings) >= 2 and None not in strings[-2:]:
            yield f"{strings[-2]}.{strings[-1]}"
        if name in _PICKLE_STRINGS:
            strings.append(arg if isinstance(arg, str) else bytes(arg).decode("latin-1"))
        elif name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = strings[-1] if strings else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            strings.append(memo.get(int(arg)))
        elif op.stack_after and name not in ("FRAME", "PROTO"):
            strings.append(None)
        if name == "STOP":
            return


def _unsafe_pickle_globals(path: Path, max_ops: int = 1_000_000, limit: int = 3) -> list[str]:
    """The globals outside torch that a checkpoint's pickle refers to and torch's weights-only loader does
    not allow (posix.system, builtins.eval, argparse.Namespace, ...): what a refusal should name, even where
    torch stops earlier at one of its own (a bare pickle's tensors) or at protocol 4's framing, which it
    calls "Unsupported operand 149". The pickle is parsed, never run: the zip archive's data.pkl, or the
    pickles of a bare file one after another (the legacy torch.save format holds several)."""
    import zipfile

    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = set(_get_allowed_globals())
    except Exception:  # a private helper: if torch moves it, what it allowed in torch 2.6 to 2.13
        allowed = {"collections.OrderedDict", "collections.Counter", "_codecs.encode", "builtins.bytearray",
                   "builtins.set", "builtins.complex"}
    found: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            if zipfile.is_zipfile(path):
                archive = stack.enter_context(zipfile.ZipFile(path))
                pickles = [n for n in archive.namelist() if n.endswith("data.pkl")][:1]
                streams = [stack.enter_context(archive.open(n)) for n in pickles]
            else:
                f = stack.enter_context(open(path, "rb"))
                streams = [f] * 5  # at most the legacy format's magic number, protocol, sys info and data
            for stream in streams:
                for name in _pickle_globals(stream, max_ops):
                    if name not in allowed and not name.startswith("torch.") and name not in found:
                        found.append(name)
                        if len(found) >= limit:
                            return found
    except Exception:  # the end of the file, or a damaged pickle: what was found so far
        pass
    return found


def _train_state_metadata(obj: Any) -> dict[str, str]:
    """`ilvr train`'s resumable state records its architecture: read it like our safetensors' metadata,
    so the state's EMA weights load with their real settings instead of a guessed ADM layout."""
    if not (isinstance(obj, Mapping) and isinstance(obj.get("unet"), Mapping) and isinstance(obj.get("ema"), Mapping)
            and "step" in obj):
        return {}
    diffusion = obj.get("diffusion") or training_diffusion().to_dict()
    config = {"format": "ilvr", "unet": dict(obj["unet"]), "diffusion": dict(diffusion),
              "training": {"steps": int(obj["step"]), "source": "training state (EMA weights, fp32)"}}
    return {"ilvr_config": json.dumps(config)}


def _weights_only_detail(message: str) -> str:
    """What torch's weights-only unpickler objected to, without the advice around it."""
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\n|$)", message, re.S)
    return match.group(1).strip() if match else ""


def unwrap_state_dict(obj: Any, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: its EMA/model/state_dict entry, without DDP's or compile's prefix."""
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



# ----------------------------------------------------------------------------- resolving a source

def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):  # a list or a number would fail later, far from its cause
        kind = {list: "a list", str: "a string", bool: "true or false", type(None): "null"}.get(type(data), "a number")
        raise ModelLoadError(f"{path} is not a JSON object (it holds {kind})")
    return data


def _first_existing(folder: Path, names: list[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _weights_in_folder(folder: Path) -> Path:
    found = _first_existing(folder, ["model.safetensors", "diffusion_pytorch_model.safetensors",
                                     "diffusion_pytorch_model.bin", "model.pt"])
    if found:
        return found
    candidates = sorted(p for p in folder.iterdir() if p.suffix in LOADABLE_WEIGHT_SUFFIXES)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ModelLoadError(f"no weights file ({', '.join(LOADABLE_WEIGHT_SUFFIXES)}) in {folder}")
    raise ModelLoadError(f"{folder} holds several weights files ({', '.join(p.name for p in candidates)}); pass one of them")


ModelCheck = Callable[[UNetConfig, DiffusionConfig, int], None]  # (architecture, diffusion, parameter count)


def build_from_files(weights: Path, config: dict[str, Any] | None = None,
                     scheduler: dict[str, Any] | None = None, check: ModelCheck | None = None,
                     **overrides) -> tuple[UNet, DiffusionConfig, dict]:
    """Identify the format, infer or read the config, and return a loaded UNet (fp32, CPU).
    check(unet_config, diffusion, parameters) runs before any weights are placed in the network (a
    server's limits: it raises ModelLoadError to refuse)."""
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
        text = str(e) if len(str(e)) <= 200 else str(e)[:200] + "..."  # one field's problem, not a dump of its value
        raise ModelLoadError(f"{weights.name}: its config or load options cannot be used "
                             f"({type(e).__name__}: {text})") from e
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
    if check is not None:
        check(unet_cfg, diffusion, sum(p.numel() for p in unet.parameters()))
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


def load_local(path: Path, check: ModelCheck | None = None, **overrides) -> tuple[UNet, DiffusionConfig, dict]:
    if path.is_dir():
        folder = path / "unet" if (path / "unet" / "config.json").is_file() and not (path / "config.json").is_file() else path
        config_path = folder / "config.json"
        config = _read_json(config_path) if config_path.is_file() else None
        sched_path = _first_existing(path, ["scheduler_config.json", "scheduler/scheduler_config.json",
                                            "../scheduler/scheduler_config.json"])  # path is a pipeline's unet/
        scheduler = _read_json(sched_path) if sched_path else None
        return build_from_files(_weights_in_folder(folder), config, scheduler, check, **overrides)
    _check_regular_file(path)  # a FIFO or /dev/zero: said as such, whatever its name
    if path.suffix not in LOADABLE_WEIGHT_SUFFIXES:
        raise ModelLoadError(f"{path.name}: expected a weights file ({', '.join(LOADABLE_WEIGHT_SUFFIXES)}) or a model folder")
    config_path = path.parent / "config.json"
    config = _read_json(config_path) if config_path.is_file() else None
    if config is not None and config.get("format") != "ilvr" and "_class_name" not in config and "block_out_channels" not in config:
        config = None  # an unrelated config.json beside a .pt
    sched_path = _first_existing(path.parent, ["scheduler_config.json", "../scheduler/scheduler_config.json"])
    return build_from_files(path, config, _read_json(sched_path) if sched_path else None, check, **overrides)
