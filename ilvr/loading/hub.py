"""Models on the Hugging Face Hub: where downloads are cached, whether the Hub can be reached now (a
quick probe instead of minutes of retries), and fetching a repo's files or finding them in a cache."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..registry import CHECKPOINTS_DIR
from .errors import ModelLoadError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


HUB_PROBE_TIMEOUT_S = 5.0


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
