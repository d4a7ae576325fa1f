"""The models the app and CLI offer by name, with the paper's presets scaled to each resolution.

The paper's presets are for 256 px: translation N=32, paint-to-image N=64, scribbles N=8 refined on
steps 1000 -> 200. A 64 px model sees a quarter of the pixels per side, so N scales with size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS_DIR = PROJECT_ROOT / "checkpoints"  # bundled models; hub downloads under hub/ by default

PAPER_SIZE = 256
PAPER_PRESETS = {"generation": 16, "translation": 32, "paint": 64, "scribble": 8}
SCRIBBLE_STOP_AT = 200


def _nearest_divisor(image_size: int, target: float, above: int = 1) -> int | None:
    """The divisor of image_size above `above` and at most image_size / 2 nearest to target on a log
    scale (N=3 and N=6 are equally far from 4.24), so a preset is always a valid N."""
    candidates = [n for n in range(max(2, above + 1), image_size // 2 + 1) if image_size % n == 0]
    return min(candidates, key=lambda n: (abs(math.log(n / target)), n)) if candidates else None


def scaled_factor(task: str, image_size: int) -> int:
    """The paper's N for a task, scaled to image_size and made a divisor of it (at least 2 when the size
    allows: a 28 px model gets translation N=4, as 32 * 28 / 256 = 3.5)."""
    return _nearest_divisor(image_size, max(2.0, PAPER_PRESETS[task] * image_size / PAPER_SIZE)) or 1


def generation_factors(image_size: int) -> list[int]:
    """The rows of the paper's Fig. 4 grid: N doubling from 2 up to image_size / 2, each a divisor of
    the size (powers of two for the usual sizes; 2, 4, 7, 14 for a 28 px model)."""
    out: list[int] = []
    n = _nearest_divisor(image_size, 2)
    while n is not None:
        out.append(n)
        n = _nearest_divisor(image_size, 2 * n, above=n)
    return out


def task_presets(image_size: int, entry: ModelEntry | None = None) -> dict[str, int]:
    """Each task's starting N for a model of this size: the paper's N scaled from 256 px, unless the
    registry entry names its own."""
    return {task: scaled_factor(task, image_size) for task in PAPER_PRESETS} | dict(entry.presets if entry else ())


@dataclass(frozen=True)
class ModelEntry:
    name: str  # what users type / pick
    source: str  # repo id, or the bundled folder name under checkpoints/
    image_size: int
    filename: str | None = None  # for hub repos of raw checkpoints
    bundled: bool = False
    examples: str = "emoji"  # the app's example set for this model (studio.ui.EXAMPLE_SETS)
    presets: tuple[tuple[str, int], ...] = ()  # (task, N) where measurement beat the scaled paper preset
    ddib_source: str | None = None  # the model whose domain DDIB translates from, offered by the app

    @property
    def path(self) -> Path:
        return CHECKPOINTS_DIR / self.source


MODELS: list[ModelEntry] = [
    # ours, offline: Noto and Fluent Flat emoji of faces, animals, plants, fruit and vegetables
    # (checkpoints/emoji-faces-animals64)
    ModelEntry("emoji-faces-animals64", "emoji-faces-animals64", 64, bundled=True, ddib_source="emoji64"),
    # ours, the earlier model on all 3,786 Noto emoji: kept so images made with it can be remade
    ModelEntry("emoji64", "emoji64", 64, bundled=True),
    # ours, offline: 32 px coloured digits rendered from free fonts (scripts/build_digits_dataset.py);
    # sevens only, the target of the coloured-digit task, and all ten digits, its DDIB source
    # (translation N=8, not the scaled 4: at N=4 a "3" stays a 3; docs/digits.md measures every N)
    ModelEntry("digits-sevens32", "digits-sevens32", 32, bundled=True, examples="digits",
               ddib_source="digits-all32", presets=(("translation", 8),)),
    ModelEntry("digits-all32", "digits-all32", 32, bundled=True, examples="digits"),
    # FFHQ faces, the ILVR/DPS authors' 93.6 M ADM (P2 weighting)
    ModelEntry("ffhq-256 (ILVR authors, ADM)", "deepinv/diffunet", 256, filename="diffusion_ffhq_10m.pt"),
    # Ho et al.'s DDPMs in diffusers layout, 113.7 M each
    ModelEntry("celebahq-256 (Google DDPM, EMA)", "google/ddpm-ema-celebahq-256", 256),
    ModelEntry("church-256 (Google DDPM, EMA)", "google/ddpm-ema-church-256", 256),
    ModelEntry("cat-256 (Google DDPM, EMA)", "google/ddpm-ema-cat-256", 256),
    ModelEntry("bedroom-256 (Google DDPM, EMA)", "google/ddpm-ema-bedroom-256", 256),
]

BY_NAME = {m.name: m for m in MODELS}
BUNDLED = {m.name: m for m in MODELS if m.bundled}
DEFAULT_MODEL = "emoji-faces-animals64"
