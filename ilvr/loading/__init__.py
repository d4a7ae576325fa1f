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

Modules, by what they own: ``files`` (reading weights files and folders, building the UNet), ``adm``
(guided-diffusion architecture inference), ``diffusers`` (diffusers configs and state dicts), ``hub``
(Hub downloads and caches), ``errors`` (ModelLoadError). Device and dtype come from ``ilvr.device``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..runtime.cpu_memory import keep_freed_heap
from ..device import DeviceError, resolve_device, resolve_dtype
from ..model import DiffusionModel, inference_unet
from ..runtime.onnx_cpu import cpu_backend as cpu_backend_choice
from ..runtime.cpu_choice import cpu_runtime_for
from ..registry import BUNDLED, BY_NAME, MODELS
from .adm import ADM_IMAGE_SIZE_BY_MULT, assumed_settings, infer_adm_config, new_to_legacy_qkv
from .diffusers import diffusers_to_adm, diffusion_from_scheduler, unet_config_from_diffusers
from .errors import ModelLoadError
from .files import (LOADABLE_WEIGHT_SUFFIXES, ModelCheck, build_from_files, load_local, read_state_dict,
                    unwrap_state_dict)
from .hub import HUB_ID, download_from_hub, hub_cache_dir

__all__ = ["ADM_IMAGE_SIZE_BY_MULT", "HUB_ID", "LOADABLE_WEIGHT_SUFFIXES", "ModelCheck", "ModelLoadError",
           "assumed_settings", "build_from_files", "diffusers_to_adm", "diffusion_from_scheduler", "download_from_hub",
           "hub_cache_dir", "infer_adm_config", "load_local", "load_model", "new_to_legacy_qkv", "read_state_dict", "unwrap_state_dict",
           "unet_config_from_diffusers"]


def load_model(source: str | os.PathLike, device: str | torch.device | None = "auto",
               dtype: torch.dtype | str | None = None, *, filename: str | None = None, revision: str | None = None,
               cache_dir: str | os.PathLike | None = None, channels_last: bool | None = None,
               cpu_backend: str | None = None, check: ModelCheck | None = None, **overrides) -> DiffusionModel:
    """Load a model from a bundled name, local file/folder or Hub repo id (see module docstring).

    dtype is the compute dtype: default float32 on CPU and MPS and float16 on CUDA (``ilvr.device``; bf16 where supported
    is also fine). channels_last (default: on CPU only) stores the weights in oneDNN's preferred
    layout, about 20% faster on CPU (``python -m ilvr bench``); on CUDA it measured slower.
    On CPU this also fixes glibc's heap thresholds for the process (``ilvr.runtime.cpu_memory``: otherwise every
    step page-faults its activations in afresh), and in float32 runs the UNet on onnxruntime or PyTorch,
    whichever measured faster at a run's batch size (``ilvr.runtime.cpu_choice``; cpu_backend='torch' or
    'onnxruntime', or ILVR_CPU_BACKEND, forces one).
    overrides (what a guided-diffusion .pt does not record): image_size, num_head_channels or num_heads,
    attention_order ('legacy'|'new') and any DiffusionConfig field (e.g. beta_schedule='cosine').
    check(unet_config, diffusion, parameters), if given, may refuse the model (raise ModelLoadError) once its
    architecture is known and before its weights are placed or exported: a public server's limits.
    """
    try:  # argument errors before any file is read or downloaded
        dev = resolve_device(device)
        dtype = resolve_dtype(dtype, dev)
    except DeviceError as e:
        raise ModelLoadError(str(e)) from None
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
        unet, diffusion, info = load_local(BUNDLED[name].path, check, **overrides)
    elif Path(name).expanduser().exists():
        unet, diffusion, info = load_local(Path(name).expanduser(), check, **overrides)
    else:
        repo_id, _, file_in_id = name.partition(":")
        if not HUB_ID.match(repo_id):
            bundled = ", ".join(BUNDLED) or "none"
            raise ModelLoadError(f"{name!r} is neither a local file/folder, a bundled model ({bundled}) "
                                 "nor a Hub repo id like google/ddpm-ema-church-256")
        path = download_from_hub(repo_id, filename or file_in_id or None, revision, cache_dir)
        unet, diffusion, info = load_local(path, check, **overrides)
        info["repo_id"] = repo_id
        info["known"] = any(m.source == repo_id and m.filename == (filename or file_in_id or None) for m in MODELS)
    if dev.type == "cpu":
        keep_freed_heap()
    unet = inference_unet(unet, dev, dtype, dev.type == "cpu" if channels_last is None else channels_last)
    return DiffusionModel(unet=unet, diffusion=diffusion, name=name, device=dev, dtype=dtype, source=name,
                          info=info, cpu_runtime=cpu_runtime_for(unet, dev, dtype, backend))

