"""Shared fixtures: tiny models made on the spot, so no test needs the network."""
from __future__ import annotations

import os
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


@pytest.fixture(scope="session", autouse=True)
def private_runtime_cache(tmp_path_factory):
    """ONNX exports and CPU backend choices go to a folder of this test session, not the user's cache
    (and no verdict measured by an earlier session decides a backend here)."""
    from ilvr.runtime.onnx_cache import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("runtime-cache") / "onnx")
    yield
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


# `python -m ilvr train` flags for a tiny 16 px model: two levels, attention at the second
TINY_TRAIN_FLAGS = ["--image-size", "16", "--channels", "32", "--channel-mult", "1,2", "--attention-levels", "1"]


def noise_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    """A folder of random RGB PNGs (height, width per image) to train on."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def tiny_unet(seed: int = 0, **overrides) -> UNet:
    torch.manual_seed(seed)
    unet = UNet(UNetConfig(**{**TINY, **overrides})).eval()
    # ADM zero-inits nothing we rely on, but make every output layer non-trivial anyway
    return unet


@pytest.fixture
def ref_png(tmp_path) -> Path:
    """A small two-colour reference image (red with a blue square), not square on purpose in the CLI tests."""
    from PIL import Image

    img = Image.new("RGB", (50, 40), (200, 40, 40))
    img.paste((40, 40, 200), (10, 10, 30, 30))
    path = tmp_path / "ref.png"
    img.save(path)
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """A random 32 px model saved in our format (config.json + model.safetensors)."""
    from ilvr.export import export_model

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
