"""The UNet reproduces diffusers' UNet2DModel (Google DDPM layout) and guided-diffusion's key layout."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ilvr.loading import diffusers_to_adm, unet_config_from_diffusers
from ilvr.network import GroupNorm32, UNet, UNetConfig, count_parameters, timestep_embedding

diffusers = pytest.importorskip("diffusers")

# state-dict listings (every key and shape) made from guided-diffusion's UNetModel at the ILVR
# authors' flags and from diffusers' UNet2DModel at the google/ddpm-*-256 config
LISTINGS = Path(__file__).resolve().parent / "data"

# google/ddpm-*-256 and ddpm-cifar10-32 configs, scaled down in width and depth (same block types)
GOOGLE_256_SMALL = dict(sample_size=64, in_channels=3, out_channels=3, block_out_channels=[32, 32, 64, 64, 96, 96],
                        down_block_types=["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
                        up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
                        layers_per_block=2, attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6,
                        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, act_fn="silu")
GOOGLE_CIFAR_SMALL = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=[32, 64, 64, 64],
                          down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                          up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
                          layers_per_block=2, attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6,
                          downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
# an ADM-like diffusers config: scale-shift norm, resnet up/down, 32-channel heads, symmetric padding
ADM_LIKE = dict(sample_size=32, block_out_channels=[32, 64, 64], layers_per_block=1,
                down_block_types=["ResnetDownsampleBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D"],
                up_block_types=["ResnetUpsampleBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
                attention_head_dim=32, resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32,
                downsample_type="resnet", upsample_type="resnet", downsample_padding=1,
                flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Diffusers zero-inits nothing, but give every tensor (norms too) random values to catch mix-ups."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / math.sqrt(max(p[0].numel(), 1))))


@pytest.mark.parametrize("cfg", [GOOGLE_256_SMALL, GOOGLE_CIFAR_SMALL], ids=["ddpm-256-layout", "ddpm-cifar10-layout"])
def test_forward_matches_diffusers_google_ddpm(cfg):
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**cfg).eval()
    _randomize(ref)
    ours_cfg = unet_config_from_diffusers({"_class_name": "UNet2DModel", **cfg})
    ours = UNet(ours_cfg).eval()
    ours.load_state_dict(diffusers_to_adm(ref.state_dict(), ours_cfg), strict=True)
    assert count_parameters(ours) == sum(p.numel() for p in ref.parameters())
    size = cfg["sample_size"]
    x = torch.randn(2, 3, size, size)
    t = torch.tensor([3, 917])
    with torch.no_grad():
        expected = ref(x, t).sample
        got = ours(x, t)
    assert (got - expected).abs().max().item() <= 1e-4


def test_forward_matches_diffusers_adm_like_blocks():
    torch.manual_seed(1)
    ref = diffusers.UNet2DModel(**ADM_LIKE).eval()
    _randomize(ref, 1)
    ours_cfg = unet_config_from_diffusers({"_class_name": "UNet2DModel", **ADM_LIKE})
    assert ours_cfg.resblock_updown and ours_cfg.use_scale_shift_norm
    ours = UNet(ours_cfg).eval()
    ours.load_state_dict(diffusers_to_adm(ref.state_dict(), ours_cfg), strict=True)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        assert (ours(x, t) - ref(x, t).sample).abs().max().item() <= 1e-4


def _listing(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (LISTINGS / name).read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            out[key] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return out


P2_FLAGS = dict(image_size=256, out_channels=6, model_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1,
                attention_levels=(4,), num_head_channels=64, resblock_updown=True, use_scale_shift_norm=True)


def test_adm_ffhq_p2_layout_matches_guided_diffusion_listing():
    """Every key and shape of guided-diffusion's UNetModel at the ILVR authors' flags (93.56 M params)."""
    with torch.device("meta"):
        unet = UNet(UNetConfig(**P2_FLAGS))
    assert {k: tuple(v.shape) for k, v in unet.state_dict().items()} == _listing("adm-keys-ffhq-p2.txt")
    assert count_parameters(unet) == 93_563_910


def test_adm_256_uncond_parameter_count():
    """openai 256x256_diffusion_uncond / LSUN models: 552,814,086 parameters."""
    with torch.device("meta"):
        unet = UNet(UNetConfig(image_size=256, out_channels=6, model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4),
                               num_res_blocks=2, attention_levels=(3, 4, 5), num_head_channels=64, resblock_updown=True))
    assert count_parameters(unet) == 552_814_086
    assert unet.state_dict()["input_blocks.10.1.qkv.weight"].shape == (1536, 512, 1)


def test_diffusers_256_layout_matches_listing():
    with torch.device("meta"):
        ref = diffusers.UNet2DModel(**{**GOOGLE_256_SMALL, "block_out_channels": [128, 128, 256, 256, 512, 512], "sample_size": 256})
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == _listing("diffusers-keys-ddpm-256.txt")
    cfg = unet_config_from_diffusers({**GOOGLE_256_SMALL, "block_out_channels": [128, 128, 256, 256, 512, 512]})
    with torch.device("meta"):
        assert count_parameters(UNet(cfg)) == 113_673_219


def test_adm_sinusoid_is_cos_then_sin():
    t = torch.tensor([7.0])
    emb = timestep_embedding(t, 8, flip_sin_to_cos=True, freq_shift=0)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    assert torch.allclose(emb[0], torch.cat([torch.cos(7 * freqs), torch.sin(7 * freqs)]))
    google = timestep_embedding(t, 8, flip_sin_to_cos=False, freq_shift=1)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 3)
    assert torch.allclose(google[0], torch.cat([torch.sin(7 * freqs), torch.cos(7 * freqs)]))


def test_legacy_qkv_order_matches_hand_computed_attention():
    """ADM stores qkv as [head][q,k,v][d]; check one attention block against plain maths."""
    from ilvr.network import AttentionBlock

    cfg = UNetConfig(num_head_channels=32)
    block = AttentionBlock(64, cfg).eval()
    _randomize(block, 3)
    x = torch.randn(1, 64, 4, 4)
    flat = x.reshape(1, 64, 16)
    qkv = block.qkv(block.norm(flat))[0]  # (192, 16)
    heads = []
    for h in range(2):
        chunk = qkv[h * 96:(h + 1) * 96]
        q, k, v = chunk[:32], chunk[32:64], chunk[64:]
        w = torch.softmax(q.T @ k / math.sqrt(32), dim=-1)  # (T, T)
        heads.append((w @ v.T).T)
    expected = flat + block.proj_out(torch.cat(heads)[None])
    with torch.no_grad():
        assert torch.allclose(block(x).reshape(1, 64, 16), expected, atol=1e-5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_attention_uses_the_fused_cpu_kernel(memory_format):
    """Strided q/k/v make SDPA fall back to its unfused maths on CPU (2-3x slower at 16-32 px)."""
    from torch.profiler import profile

    from ilvr.network import AttentionBlock

    block = AttentionBlock(64, UNetConfig(num_head_channels=32)).eval()
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=memory_format)
    with torch.inference_mode(), profile() as prof:
        block(x)
    ops = {event.name for event in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops


def test_downsample_padding_differs_between_families():
    from ilvr.network import Downsample

    x = torch.randn(1, 32, 8, 8)
    sym, asym = Downsample(32, "symmetric"), Downsample(32, "asymmetric")
    asym.load_state_dict(sym.state_dict())
    w, b = sym.op.weight, sym.op.bias
    with torch.no_grad():
        assert torch.allclose(sym(x), torch.nn.functional.conv2d(x, w, b, stride=2, padding=1), atol=1e-6)
        assert torch.allclose(asym(x), torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), w, b, stride=2), atol=1e-6)
        assert not torch.allclose(sym(x), asym(x))


def _tiny_unet(**config) -> UNet:
    """16 px, two levels, attention at the second: every block type, in milliseconds."""
    return UNet(UNetConfig(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_levels=(1,), **config)).eval()


@pytest.mark.parametrize("scale_shift,updown,heads", [(True, True, 16), (False, False, -1)])
def test_inference_mode_in_place_ops_match_autograd_forward(scale_shift, updown, heads):
    """inference_mode runs SiLU and the residual adds in place; the result must equal the out-of-place
    forward that training and torch.no_grad use, and must leave the caller's input untouched."""
    torch.manual_seed(0)
    unet = _tiny_unet(num_head_channels=heads, use_scale_shift_norm=scale_shift, resblock_updown=updown)
    for p in unet.parameters():  # random, not zero-initialised outputs, so every branch contributes
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    x_before = x.clone()
    with torch.no_grad():
        expected = unet(x, t)
    with torch.inference_mode():
        got = unet(x, t)
    assert torch.equal(x, x_before)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the same under CPU autocast, where every activation after the first conv is bf16
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected_bf16 = unet(x, t)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got_bf16 = unet(x, t)
    assert got_bf16.dtype == expected_bf16.dtype
    torch.testing.assert_close(got_bf16, expected_bf16, rtol=0, atol=0)
    # and gradients still flow through the out-of-place path
    unet(x, t).square().mean().backward()
    assert all(p.grad is not None for p in unet.parameters())


def test_unet_traces_into_one_graph_for_torch_compile():
    """`--compile` is only fast if dynamo sees the whole forward: any graph break (e.g. a Python-level
    query it cannot trace) splits it into pieces run eagerly in between."""
    unet = _tiny_unet(num_head_channels=16, resblock_updown=True)
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            explanation = torch._dynamo.explain(unet)(torch.randn(1, 3, 16, 16), torch.tensor([10]))
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,layout", [((2, 64, 9, 7), torch.contiguous_format),
                                          ((2, 64, 9, 7), torch.channels_last), ((2, 64, 15), None)])
def test_group_norm_by_channel_is_the_same_norm(affine, shape, layout):
    """The compiled-CUDA GroupNorm (per-channel statistics, combined per group) must be GroupNorm, also
    where activations sit far from zero (mean 50, std 0.5): checked against F.group_norm in float64,
    since CPU's fp32 channels-last F.group_norm is itself off by 1e-2 there."""
    norm = GroupNorm32(32, 64, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(0)
    offsets = torch.randn(1, 64, *([1] * (len(shape) - 2)), generator=g) * 3
    for x in (torch.randn(shape, generator=g) * 3 + offsets, torch.randn(shape, generator=g) * 0.5 + 50):
        x = x.to(memory_format=layout) if layout is not None else x
        weight, bias = (norm.weight.double(), norm.bias.double()) if affine else (None, None)
        expected = torch.nn.functional.group_norm(x.double(), 32, weight, bias, norm.eps)
        got = norm._by_channel(x)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, atol=5e-5, rtol=1e-5)
        half = norm._by_channel(x.half())
        assert half.dtype == torch.float16
        expected_half = torch.nn.functional.group_norm(x.half().double(), 32, weight, bias, norm.eps)
        torch.testing.assert_close(half.double(), expected_half, atol=4e-3, rtol=1e-3)


def test_group_norm_by_channel_traces_without_graph_breaks():
    norm = GroupNorm32(32, 64)
    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(norm._by_channel)(torch.randn(2, 64, 8, 8))
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("change,message", [
    (dict(attention_levels=(4,)), "must be level indices 0..3"),
    (dict(image_size=60), "must be divisible by 8"),
    (dict(model_channels=20), "multiples of the 32 GroupNorm groups"),
])
def test_configs_that_cannot_build_a_working_unet_are_refused(change, message):
    """Each of these used to be accepted: an ignored attention level, or a crash deep inside a forward pass."""
    base = dict(image_size=64, model_channels=32, channel_mult=(1, 2, 2, 4), attention_levels=(3,))
    UNetConfig(**base)
    with pytest.raises(ValueError, match=message):
        UNetConfig(**{**base, **change})
