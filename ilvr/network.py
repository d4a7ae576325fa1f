"""One configurable UNet for the two DDPM families people actually publish.

The module tree and parameter names follow openai/guided-diffusion's ``UNetModel`` (ADM), so ADM
``.pt`` state dicts load with no renaming; diffusers ``UNet2DModel`` (Ho et al. / google/ddpm-*)
weights are renamed onto the same tree by ``ilvr.loading``. The handful of numerical differences
between the families (downsample padding, norm eps, sinusoid layout, heads) are config fields, so a
single forward pass reproduces both.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config_checks import check_field_types, check_positive


@dataclass
class UNetConfig:
    """Architecture of a UNet: the single source of truth, stored beside every checkpoint we write."""

    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3  # 6 when the model also predicts its variance (learn_sigma)
    model_channels: int = 128
    channel_mult: tuple[float, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2  # per level going down; the up path has one more
    attention_levels: tuple[int, ...] = (2, 3)  # level i works at image_size / 2**i
    num_head_channels: int = 64  # channels per attention head; -1: num_heads heads at every level
    num_heads: int = 1  # used when num_head_channels is -1 (guided-diffusion's training default is 4; Google DDPM 1)
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    downsample_padding: str = "symmetric"  # "symmetric" (ADM, pad 1) | "asymmetric" (TF SAME)
    norm_eps: float = 1e-5
    norm_groups: int = 32  # every GroupNorm's group count (ADM: always 32; diffusers: norm_num_groups)
    flip_sin_to_cos: bool = True  # ADM sinusoid is [cos, sin]
    freq_shift: float = 0.0  # Google DDPM uses 1
    dropout: float = 0.0
    num_classes: int | None = None

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult) if isinstance(self.channel_mult, (list, tuple)) else self.channel_mult
        if isinstance(self.attention_levels, (list, tuple)):
            self.attention_levels = tuple(sorted(self.attention_levels))
        check_field_types(self)
        check_positive(self, "image_size", "in_channels", "out_channels", "model_channels", "channel_mult",
                       "num_res_blocks", "num_heads", "norm_groups")
        if self.num_head_channels != -1 and self.num_head_channels <= 0:
            raise ValueError(f"num_head_channels must be above 0 (or -1: num_heads heads), got {self.num_head_channels}")
        if self.downsample_padding not in ("symmetric", "asymmetric"):
            raise ValueError(f"downsample_padding must be 'symmetric' or 'asymmetric', got {self.downsample_padding!r}")
        levels = len(self.channel_mult)
        if any(not 0 <= level < levels for level in self.attention_levels):
            raise ValueError(f"attention levels {list(self.attention_levels)} must be level indices 0..{levels - 1} "
                             f"({levels} levels)")
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(f"image size {self.image_size} must be divisible by {2 ** (levels - 1)}: each of the "
                             f"{levels} levels after the first halves it")
        widths = sorted({self.width(m) for m in self.channel_mult})
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f"channel counts {widths} must be multiples of the {self.norm_groups} GroupNorm groups")

    def width(self, mult: float) -> int:
        """Channels at a level with this multiplier: rounded, so a fractional multiplier read back from
        a diffusers config (480 / 352 * 352 = 479.99...) gives 480, as guided-diffusion's exact ones do."""
        return round(self.model_channels * mult)

    def heads(self, channels: int) -> int:
        """Attention heads at a level with this many channels."""
        if self.num_head_channels == -1:
            if channels % self.num_heads:
                raise ValueError(f"{channels} channels do not split into {self.num_heads} heads")
            return self.num_heads
        if channels % self.num_head_channels:
            raise ValueError(f"{channels} channels do not split into heads of {self.num_head_channels}")
        return channels // self.num_head_channels

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNet config keys: {sorted(unknown)}")
        return cls(**d)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal embedding; (flip=True, shift=0) is ADM's, (False, 1) is Google DDPM's."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(exponent)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype, as ADM does (fp16 norms drift)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._by_channel(x) if x.is_cuda and torch.compiler.is_compiling() else self._fused(x)

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float() if self.weight is not None else None,
                            self.bias.float() if self.bias is not None else None, self.eps).to(x.dtype)

    def _by_channel(self, x: torch.Tensor) -> torch.Tensor:
        """The same norm from per-channel mean and variance, combined per group. Compiled on CUDA, Inductor
        keeps activations channels-last, where a group's values are strided but a channel's statistics
        are contiguous column reductions: the UNet call of the 256 px ADM at batch 8 took 12.3 ms
        instead of 16.1 ms on an H100 (scripts/gpu_step_breakdown.py). Eager and CPU keep F.group_norm's
        fused kernel, which is faster there."""
        n, c, groups = x.shape[0], x.shape[1], self.num_groups
        xf = x.float()
        var_c, mean_c = torch.var_mean(xf, dim=tuple(range(2, x.dim())), correction=0)
        mean_c, var_c = mean_c.view(n, groups, -1), var_c.view(n, groups, -1)
        mean_g = mean_c.mean(-1)
        # within-channel plus between-channel variance: exact, and no E[x^2] - mean^2 cancellation
        var_g = var_c.mean(-1) + (mean_c - mean_g[..., None]).square().mean(-1)
        inv = torch.rsqrt(var_g + self.eps).repeat_interleave(c // groups, dim=1)
        scale = inv if self.weight is None else inv * self.weight.float()
        shift = -mean_g.repeat_interleave(c // groups, dim=1) * scale
        if self.bias is not None:
            shift = shift + self.bias.float()
        view = (n, c) + (1,) * (x.dim() - 2)
        return (xf * scale.view(view) + shift.view(view)).to(x.dtype)


def _norm(channels: int, cfg: UNetConfig) -> GroupNorm32:
    return GroupNorm32(cfg.norm_groups, channels, eps=cfg.norm_eps)


def _in_place() -> bool:
    """Whether elementwise ops may overwrite their input: only under inference_mode, where no autograd
    graph can need it. Saves an allocation and a memory pass per op (about 8% of a CPU step for the
    bundled model); training and torch.no_grad run guided-diffusion's out-of-place ops. Never while
    torch.compile traces: it plans buffers itself, and the inference_mode query would break its graph."""
    return not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()


def _residual_add(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """skip + h; written into h (a block's fresh output) where ``_in_place`` allows."""
    return h.add_(skip) if _in_place() else skip + h


class SiLUAfterNorm(nn.SiLU):
    """SiLU that works in place under inference_mode. Only for an input nothing else reads (a norm's or a
    sum's fresh output): never for the timestep embedding, which every ResBlock shares."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x, inplace=_in_place())


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: str):
        super().__init__()
        self.asymmetric = padding == "asymmetric"
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:  # right/bottom only, like TensorFlow "SAME"
            x = F.pad(x, (0, 1, 0, 1))
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(nn.Module):
    """Residual block with a timestep embedding; optionally resamples (ADM's resblock_updown)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, cfg: UNetConfig,
                 up: bool = False, down: bool = False):
        super().__init__()
        self.use_scale_shift_norm = cfg.use_scale_shift_norm
        self.in_layers = nn.Sequential(_norm(channels, cfg), SiLUAfterNorm(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.up, self.down = up, down
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if cfg.use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(_norm(out_channels, cfg), SiLUAfterNorm(), nn.Dropout(cfg.dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.up or self.down:
            h = self.in_layers[:-1](x)
            h, x = self._resample(h), self._resample(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[1:](torch.addcmul(shift, self.out_layers[0](h), 1 + scale))
        else:
            h = self.out_layers(h + emb_out)
        return _residual_add(h, self.skip_connection(x))


class AttentionBlock(nn.Module):
    """Spatial self-attention. qkv channels use ADM's *legacy* layout [head][q,k,v][dim]."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.num_heads = cfg.heads(channels)
        self.norm = _norm(channels, cfg)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))  # (B, 3C, T)
        # (B, H, 3, T, d), copied so that each head's d values are adjacent: SDPA's fused CPU kernel needs
        # that, and without it falls back to the unfused maths (2-3x slower at 16-32 px attention on CPU)
        qkv = qkv.reshape(b, self.num_heads, 3, c // self.num_heads, -1).transpose(-1, -2).contiguous()
        q, k, v = qkv.unbind(dim=2)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, d)
        h = h.transpose(-1, -2).reshape(b, c, -1)
        return _residual_add(self.proj_out(h), flat).reshape(b, c, height, width)


class TimestepSequential(nn.Sequential):
    """A sequential container that hands the timestep embedding to the ResBlocks inside it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """The denoiser: ``unet(x, t)`` returns the raw network output (eps, or eps and variance)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc = cfg.model_channels
        emb_ch = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_ch)

        ch = cfg.width(cfg.channel_mult[0])
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_ch, cfg.width(mult), cfg)]
                ch = cfg.width(mult)
                if level in cfg.attention_levels:
                    layers.append(AttentionBlock(ch, cfg))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != cfg.num_levels - 1:
                down = ResBlock(ch, emb_ch, ch, cfg, down=True) if cfg.resblock_updown else Downsample(ch, cfg.downsample_padding)
                self.input_blocks.append(TimestepSequential(down))
                skip_channels.append(ch)

        self.middle_block = TimestepSequential(ResBlock(ch, emb_ch, ch, cfg), AttentionBlock(ch, cfg),
                                               ResBlock(ch, emb_ch, ch, cfg))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_ch, cfg.width(mult), cfg)]
                ch = cfg.width(mult)
                if level in cfg.attention_levels:
                    layers.append(AttentionBlock(ch, cfg))
                if level and i == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, emb_ch, ch, cfg, up=True) if cfg.resblock_updown else Upsample(ch))
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(_norm(ch, cfg), SiLUAfterNorm(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.input_blocks[0][0].weight.dtype

    def to_compute_dtype(self, dtype: torch.dtype) -> "UNet":
        """Store convolution, linear and embedding weights in `dtype`, the norms in fp32 (ADM's fp16 layout).

        Cheaper than autocast for inference: no weight is re-cast at every call, and every activation
        stays in `dtype` except inside the GroupNorms, which compute in fp32 anyway.
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding)):
                module.to(dtype)
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) noisy images; t: (B,) timesteps on the training scale (0..T-1)."""
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels, self.config.flip_sin_to_cos,
                                                 self.config.freq_shift).to(self.time_embed[0].weight.dtype))
        if self.config.num_classes is not None:
            if y is None:
                raise ValueError("this is a class-conditional model: pass class labels y")
            emb = emb + self.label_emb(y)
        h = x.to(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
