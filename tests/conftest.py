"""Shared fixtures: tiny models made on the spot, so no test needs the network."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ilvr.network import UNet, UNetConfig  # noqa: E402
from ilvr.schedule import DiffusionConfig  # noqa: E402

TINY = dict(image_size=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
            num_head_channels=32)


def tiny_unet(seed: int = 0, **overrides) -> UNet:
    torch.manual_seed(seed)
    unet = UNet(UNetConfig(**{**TINY, **overrides})).eval()
    # ADM zero-inits nothing we rely on, but make every output layer non-trivial anyway
    return unet


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """A random 32 px model saved in our format (config.json + model.safetensors)."""
    from ilvr.train import export_model

    folder = tmp_path / "tiny"
    export_model(tiny_unet(), DiffusionConfig(), folder)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app launched from app.py on a free local port, one per test module (tests/app_server.py)."""
    from app_server import AppServer

    srv = AppServer(tmp_path_factory.mktemp("app"))
    yield srv
    srv.stop()
