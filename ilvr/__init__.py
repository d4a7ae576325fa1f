"""ILVR Studio engine: a compact DDPM + ILVR package that loads published checkpoints."""
from .filters import LowPass
from .images import load_reference, save_png, tensor_to_pil
from .loading import ModelLoadError, load_model
from .model import DiffusionModel
from .network import UNet, UNetConfig
from .sampler import sample
from .schedule import DiffusionConfig, Schedule, space_timesteps

__all__ = ["DiffusionConfig", "DiffusionModel", "LowPass", "ModelLoadError", "Schedule", "UNet", "UNetConfig",
           "load_model", "load_reference", "sample", "save_png", "space_timesteps", "tensor_to_pil"]
__version__ = "0.1.0"
