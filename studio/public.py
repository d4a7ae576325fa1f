"""What the app allows its visitors, decided once at startup from how it is served and from the
environment (docs/security.md has the table).

A server is *public* when other computers can reach it: ``--share`` (a gradio.live link), a ``--host``
that is not a loopback address (``0.0.0.0``, a LAN address, a host name), or a Hugging Face Space
(``SYSTEM=spaces``). A public server loads only the listed models unless ``ILVR_ALLOW_MODEL_PATHS=1``,
caps the work of one run and lets each browser session have one run queued or running at a time.
Models the app loads are checked against ``ModelLimits`` on every server; the CLI and the Python API
have no such limits.

This module imports neither gradio nor torch: app.py reads it before its slow imports, so a bad
value in the environment is one line at startup.
"""
from __future__ import annotations

import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

MODEL_PATHS_ENV = "ILVR_ALLOW_MODEL_PATHS"
MAX_IMAGE_SIZE_ENV = "ILVR_MAX_IMAGE_SIZE"
MAX_PARAMETERS_ENV = "ILVR_MAX_PARAMETERS"
MAX_IMAGE_STEPS_ENV = "ILVR_MAX_IMAGE_STEPS"
ONE_RUN_ENV = "ILVR_ONE_RUN_PER_SESSION"

DEFAULT_MAX_IMAGE_SIZE = 512  # the largest published ILVR/ADM models are 512 px
DEFAULT_MAX_PARAMETERS = 600_000_000  # ADM's 256 px unconditional model has 552 M
PUBLIC_MAX_IMAGE_STEPS = 8_000  # images x steps of one run: 8 images at 1000 steps, 32 at 250
MAX_TRAIN_TIMESTEPS = 10_000  # a model's schedule length (improved-diffusion uses 4000); not an env var
SECURITY_DOC = "docs/security.md"

_YES = ("1", "true", "yes", "on")


class PolicyError(ValueError):
    """A setting in the environment that cannot be used (one line for the operator)."""


@dataclass(frozen=True)
class ModelLimits:
    """What a model loaded by the app may be: checked from its config before it is built where the
    file records it, and on the built model otherwise."""

    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE
    max_parameters: int = DEFAULT_MAX_PARAMETERS
    max_train_timesteps: int = MAX_TRAIN_TIMESTEPS

    @property
    def max_weights_bytes(self) -> int:
        """The largest weights file that can hold max_parameters (float32, plus room for the container):
        a bigger one is refused unread."""
        return 4 * self.max_parameters + 64 * 2 ** 20


@dataclass(frozen=True)
class ServerPolicy:
    exposure: str | None  # how other computers reach the server ("--share", "--host 0.0.0.0", ...); None: loopback
    allow_paths: bool  # visitors may type a local path or any Hub repo id
    limits: ModelLimits
    max_image_steps: int | None  # images x steps of one run; None: no cap
    one_run_per_session: bool

    @property
    def public(self) -> bool:
        return self.exposure is not None

    @property
    def detailed_errors(self) -> bool:
        """Whether load errors may name files and echo config values: only for the person at a loopback
        server who may load paths anyway."""
        return self.allow_paths and not self.public

    def startup_lines(self) -> list[str]:
        if not self.public:
            return []
        cap = f"at most {self.max_image_steps} images x steps per run" if self.max_image_steps else "no cap on a run"
        session = "one run per browser session" if self.one_run_per_session else "any number of runs per session"
        paths = (f"visitors may load any model path or Hub repo ({MODEL_PATHS_ENV}=1), never from the upload folder"
                 if self.allow_paths else
                 f"model paths are off: visitors load only the listed models (set {MODEL_PATHS_ENV}=1 to allow paths)")
        return [f"ILVR Studio is reachable from other computers ({self.exposure}): {paths}; {cap}; {session}. "
                f"See {SECURITY_DOC}."]


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; any other address or host name may be reachable."""
    name = (host or "").strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def exposure(host: str, share: bool, env: Mapping[str, str] = os.environ) -> str | None:
    """How other computers reach a server started with this host and share flag; None when they cannot."""
    if env.get("SYSTEM") == "spaces":
        return "a Hugging Face Space"
    if share:
        return "--share"
    if not is_loopback(host):
        return f"--host {host or '(all interfaces)'}"
    return None


def model_paths_allowed(env: Mapping[str, str] = os.environ, public: bool | None = None) -> bool:
    """Whether visitors may load any local path or Hub repo (``ILVR_ALLOW_MODEL_PATHS=1``/``0``).

    Unset: only on a server nobody else can reach; ``public=None`` judges that from the environment
    alone (a Space is public). A typed path lets a visitor probe the server's files (and load what
    they uploaded), and a repo id makes the server download anything.
    """
    value = env.get(MODEL_PATHS_ENV, "").strip().lower()
    if value:
        return value in _YES  # anything else (a typo too) keeps the box closed
    if public is None:
        public = env.get("SYSTEM") == "spaces"
    return not public


def _whole(env: Mapping[str, str], name: str, default: int | None, minimum: int) -> int | None:
    text = env.get(name, "").strip().replace("_", "")
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise PolicyError(f"{name}={env[name]!r} is not a whole number") from None
    if value < minimum:
        raise PolicyError(f"{name} must be at least {minimum}, got {value}")
    return value


def model_limits(env: Mapping[str, str] = os.environ) -> ModelLimits:
    return ModelLimits(max_image_size=_whole(env, MAX_IMAGE_SIZE_ENV, DEFAULT_MAX_IMAGE_SIZE, 1),
                       max_parameters=_whole(env, MAX_PARAMETERS_ENV, DEFAULT_MAX_PARAMETERS, 1))


def server_policy(host: str, share: bool, env: Mapping[str, str] = os.environ) -> ServerPolicy:
    """The policy for a server started with this --host and --share (raises PolicyError on a bad value)."""
    reach = exposure(host, share, env)
    public = reach is not None
    steps = _whole(env, MAX_IMAGE_STEPS_ENV, PUBLIC_MAX_IMAGE_STEPS if public else 0, 0)
    one_run = env.get(ONE_RUN_ENV, "").strip().lower()
    return ServerPolicy(exposure=reach, allow_paths=model_paths_allowed(env, public), limits=model_limits(env),
                        max_image_steps=steps or None, one_run_per_session=one_run in _YES if one_run else public)


def upload_folders(env: Mapping[str, str] = os.environ) -> list[Path]:
    """Where Gradio keeps what visitors upload (GRADIO_TEMP_DIR, else the system temp dir's gradio/),
    resolved: the app never loads a model from there, whatever the settings."""
    folders = [Path(tempfile.gettempdir()) / "gradio"]
    if env.get("GRADIO_TEMP_DIR"):
        folders.insert(0, Path(env["GRADIO_TEMP_DIR"]))
    return list(dict.fromkeys(p.expanduser().resolve() for p in folders))
