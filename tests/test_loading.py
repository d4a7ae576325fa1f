"""Loading: config inference from raw ADM state dicts, diffusers folders, our format, the Hub cache, errors."""
from __future__ import annotations

import argparse
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ilvr.loading import ModelLoadError, assumed_settings, infer_adm_config, load_model, unet_config_from_diffusers
from ilvr.network import UNet, UNetConfig
from ilvr.sampler import sample

# the published ADM flag sets, scaled down in width (same structure)
P2_SMALL = UNetConfig(image_size=256, out_channels=6, model_channels=32, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1,
                      attention_levels=(4,), num_head_channels=64, resblock_updown=True, use_scale_shift_norm=True)
ADM256_SMALL = UNetConfig(image_size=256, out_channels=6, model_channels=32, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                          attention_levels=(3, 4, 5), num_head_channels=64, resblock_updown=True, use_scale_shift_norm=True)
PLAIN_64 = UNetConfig(image_size=64, out_channels=3, model_channels=32, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                      attention_levels=(2, 3), num_head_channels=32, resblock_updown=False, use_scale_shift_norm=False)


@pytest.mark.parametrize("cfg", [P2_SMALL, ADM256_SMALL, PLAIN_64], ids=["ffhq-p2", "adm-256-uncond", "plain-64"])
def test_adm_config_is_inferred_from_state_dict(cfg, tmp_path):
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    path = tmp_path / "ema_0.9999_100000.pt"
    torch.save(unet.state_dict(), path)
    inferred = infer_adm_config(unet.state_dict(), num_head_channels=cfg.num_head_channels)
    assert inferred == cfg
    model = load_model(path, device="cpu", channels_last=False, num_head_channels=cfg.num_head_channels)
    assert model.unet.config == cfg
    assert model.diffusion.variance_type == ("learned_range" if cfg.out_channels == 6 else "fixed_large")
    size = 32
    x, t = torch.randn(1, 3, size, size), torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(model.unet(x, t), unet(x, t))


@pytest.mark.parametrize("wrap", ["ddp", "compiled", "ddp-compiled", "training-dict"])
def test_wrapped_state_dicts_are_unwrapped(tmp_path, wrap):
    """Weights saved from a DistributedDataParallel or torch.compile'd module, or inside a training dict."""
    unet = UNet(PLAIN_64)
    sd = unet.state_dict()
    prefix = {"ddp": "module.", "compiled": "_orig_mod.", "ddp-compiled": "module._orig_mod.", "training-dict": ""}[wrap]
    obj = {prefix + k: v for k, v in sd.items()}
    if wrap == "training-dict":
        obj = {"model": obj, "step": 10}
    torch.save(obj, tmp_path / "weights.pt")
    model = load_model(tmp_path / "weights.pt", device="cpu", cpu_backend="torch", num_head_channels=32)
    assert all(torch.equal(model.unet.state_dict()[k].float(), v) for k, v in sd.items())


def test_fixed_head_count_of_guided_diffusions_training_default(tmp_path):
    """guided-diffusion trains with num_heads=4 at every level unless given --num_head_channels; such a
    model loads with num_heads=4, and only then computes what it was trained to."""
    cfg = UNetConfig(**{**PLAIN_64.to_dict(), "model_channels": 32, "channel_mult": (1, 2, 3),
                        "attention_levels": (1, 2), "num_head_channels": -1, "num_heads": 4})
    torch.manual_seed(0)
    trained = UNet(cfg).eval()  # heads of 16 and 24 channels: no single head size describes it
    path = tmp_path / "ema_0.9999_200000.pt"
    torch.save(trained.state_dict(), path)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([300])
    model = load_model(path, device="cpu", cpu_backend="torch", num_heads=4)
    assert model.unet.config.heads(64) == model.unet.config.heads(96) == 4
    with torch.no_grad():
        assert torch.allclose(model.unet(x, t), trained(x, t), atol=1e-5)
        assumed = load_model(path, device="cpu", cpu_backend="torch", num_head_channels=32)
        assert not torch.allclose(assumed.unet(x, t), trained(x, t), atol=1e-3)
    with pytest.raises(ModelLoadError, match="not both"):
        load_model(path, device="cpu", num_heads=4, num_head_channels=32)


def test_new_attention_order_is_converted(tmp_path):
    """use_new_attention_order checkpoints store [q,k,v][head][d]: converting gives the same function."""
    torch.manual_seed(0)
    unet = UNet(PLAIN_64).eval()
    sd = unet.state_dict()
    new = {}
    for k, v in sd.items():  # legacy -> new layout by hand
        if ".qkv." in k:
            c = v.shape[0] // 3
            heads = c // 32
            v = v.reshape(heads, 3, c // heads, *v.shape[1:]).transpose(0, 1).reshape(v.shape)
        new[k] = v
    torch.save(new, tmp_path / "new.pt")
    model = load_model(tmp_path / "new.pt", device="cpu", channels_last=False, num_head_channels=32, attention_order="new")
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    with torch.no_grad():
        assert torch.allclose(model.unet(x, t), unet(x, t), atol=1e-6)


def _diffusers_folder(tmp_path: Path, legacy_names: bool = False, safetensors: bool = True) -> tuple[Path, torch.nn.Module]:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(sample_size=32, block_out_channels=[32, 64], down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                                up_block_types=["AttnUpBlock2D", "UpBlock2D"], layers_per_block=1, attention_head_dim=None,
                                norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1).eval()
    folder = tmp_path / "ddpm-tiny"
    ref.save_pretrained(folder, safe_serialization=safetensors)
    if legacy_names:  # the 2022 hub .bin files name attention query/key/value/proj_attn
        weights = folder / "diffusion_pytorch_model.bin"
        sd = torch.load(weights, weights_only=True)
        renamed = {}
        for k, v in sd.items():
            for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
                k = k.replace(f".{new}.", f".{old}.")
            renamed[k] = v
        torch.save(renamed, weights)
    (folder / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
        "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_small"}))
    return folder, ref


@pytest.mark.parametrize("legacy,safetensors", [(False, True), (True, False)], ids=["safetensors", "legacy-bin"])
def test_diffusers_folder_loads_and_matches(tmp_path, legacy, safetensors):
    folder, ref = _diffusers_folder(tmp_path, legacy, safetensors)
    model = load_model(folder, device="cpu")
    assert model.info["family"] == "diffusers"
    assert model.image_size == 32 and model.diffusion.variance_type == "fixed_small"
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 999])
    with torch.no_grad():
        assert (model.unet(x, t) - ref(x, t).sample).abs().max() <= 1e-4


def test_a_pipelines_unet_folder_finds_its_scheduler(tmp_path):
    folder, _ = _diffusers_folder(tmp_path)
    pipeline = tmp_path / "pipeline"
    (pipeline / "scheduler").mkdir(parents=True)
    shutil.move(str(folder), str(pipeline / "unet"))
    sched = json.loads((pipeline / "unet" / "scheduler_config.json").read_text())
    (pipeline / "unet" / "scheduler_config.json").unlink()
    (pipeline / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, "beta_schedule": "squaredcos_cap_v2"}))
    for source in (pipeline, pipeline / "unet", pipeline / "unet" / "diffusion_pytorch_model.safetensors"):
        assert load_model(source, device="cpu", cpu_backend="torch").diffusion.beta_schedule == "cosine", source
    (pipeline / "scheduler" / "scheduler_config.json").unlink()
    with pytest.warns(UserWarning, match="no scheduler_config.json.*assuming"):
        assert load_model(pipeline / "unet", device="cpu", cpu_backend="torch").diffusion.beta_schedule == "linear"


@pytest.mark.parametrize("kwargs,message", [
    (dict(dtype="float64"), "dtype must be fp32, fp16 or bf16"),
    (dict(dtype=torch.int8), "dtype must be fp32, fp16 or bf16"),
    (dict(dtype=32), "dtype must be"),
    (dict(cpu_backend="tensorrt"), "CPU backend must be one of"),
])
def test_bad_load_arguments_are_explained_before_reading_weights(kwargs, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model("no/such-model-anywhere", device="cpu", **kwargs)  # fails on the argument, not the source


def test_dtype_names_users_type(tiny_checkpoint):
    for name in ("fp32", "float32", "torch.float32", "FP32"):
        assert load_model(tiny_checkpoint, device="cpu", dtype=name).dtype == torch.float32
    assert "32 px" in repr(load_model(tiny_checkpoint, device="cpu"))  # a summary, not the module tree


# UNet2DModel configs as users write them (the diffusers "train an unconditional model" tutorial, small
# models with fewer norm groups, resnet resampling), at tiny widths
_TWO_LEVELS = dict(sample_size=16, block_out_channels=[32, 64], down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                   up_block_types=["AttnUpBlock2D", "UpBlock2D"], layers_per_block=1)
USER_CONFIGS = {
    "tutorial": dict(_TWO_LEVELS, block_out_channels=[32, 32, 64, 64], layers_per_block=2,
                     down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
    "norm-groups-8": dict(_TWO_LEVELS, norm_num_groups=8),
    "resnet-resampling": dict(_TWO_LEVELS, down_block_types=["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
                              up_block_types=["AttnUpBlock2D", "ResnetUpsampleBlock2D"],
                              downsample_type="resnet", upsample_type="resnet"),
    "grayscale": dict(_TWO_LEVELS, in_channels=1, out_channels=1, norm_num_groups=16),
    # 120 / 88 * 88 = 119.99...: a width that must round, not truncate, back to 120
    "fractional-widths": dict(_TWO_LEVELS, block_out_channels=[88, 120], norm_num_groups=8),
}


@pytest.mark.parametrize("name", sorted(USER_CONFIGS))
def test_user_diffusers_configs_match_diffusers(tmp_path, name):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**USER_CONFIGS[name]).eval()
    with torch.no_grad():  # diffusers zero-initialises some layers: make every weight count
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_config(tmp_path)
    model = load_model(tmp_path, device="cpu", cpu_backend="torch")
    x, t = torch.randn(2, ref.config.in_channels, 16, 16), torch.tensor([3, 900])
    with torch.no_grad():
        assert (model.unet(x, t) - ref(x, t).sample).abs().max() <= 1e-4


@pytest.mark.parametrize("change,named", [
    (dict(act_fn="gelu"), "act_fn"),
    (dict(center_input_sample=True), "center_input_sample"),
    (dict(add_attention=False), "add_attention"),
    (dict(mid_block_type=None), "mid_block_type"),
    (dict(time_embedding_dim=64), "time_embedding_dim"),
    (dict(attn_norm_num_groups=8), "attn_norm_num_groups"),
    (dict(resnet_time_scale_shift="scale_shift"), "middle attention without GroupNorm"),
    (dict(up_block_types=["UpBlock2D", "UpBlock2D"]), "mirror"),
    (dict(downsample_type="resnet", upsample_type="resnet"), "one kind"),
    (dict(down_block_types=["DownBlock2D", "AttnSkipDownBlock2D"]), "AttnSkipDownBlock2D"),
    (dict(sample_size=[16, 32]), "16x32 images; only square"),
    (dict(norm_num_groups=None), "norm_num_groups=None"),
    (dict(mid_block_scale_factor=2.0), "mid_block_scale_factor=2.0"),
])
def test_diffusers_options_we_do_not_compute_are_refused(change, named):
    """Options our UNet does not compute the same way are refused by name: several used to load and sample
    wrong images (act_fn, center_input_sample, attn_norm_num_groups, skip blocks), the rest failed with a
    key or shape error that did not say why."""
    with pytest.raises(ModelLoadError, match=named):
        unet_config_from_diffusers(dict(_TWO_LEVELS, **change))
    unet_config_from_diffusers(dict(_TWO_LEVELS))  # the same config without the change is fine


@pytest.mark.parametrize("file,change,message", [
    ("config.json", {"block_out_channels": "abc"}, "config or load options cannot be used"),
    ("config.json", {"layers_per_block": "two"}, "config or load options cannot be used"),
    ("config.json", {"norm_eps": "x"}, "norm_eps must be float, got 'x'"),
    ("config.json", {"down_block_types": None}, "config or load options cannot be used"),
    ("scheduler_config.json", {"num_train_timesteps": "many"}, "num_train_timesteps must be int"),
    ("scheduler_config.json", {"variance_type": "learned"}, "variance_type='learned'"),
    ("scheduler_config.json", {"variance_type": "learned_range"}, "does not fit a UNet with 3 output channels"),
    ("scheduler_config.json", {"thresholding": True}, "thresholding=True"),
])
def test_hand_edited_configs_fail_at_load_with_a_message(tmp_path, file, change, message):
    """A bad value fails loading with a ModelLoadError that names it, not later inside sampling."""
    folder, _ = _diffusers_folder(tmp_path)
    path = folder / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ModelLoadError, match=message):
        load_model(folder, device="cpu", cpu_backend="torch")


def test_our_format_roundtrip(tiny_checkpoint):
    model = load_model(tiny_checkpoint, device="cpu")
    assert model.info["family"] == "ilvr" and model.image_size == 32
    single = load_model(tiny_checkpoint / "model.safetensors", device="cpu")  # config also in the metadata
    assert single.unet.config == model.unet.config


def test_cpu_models_use_channels_last_with_the_same_output(tiny_checkpoint):
    fast = load_model(tiny_checkpoint, device="cpu")
    plain = load_model(tiny_checkpoint, device="cpu", channels_last=False)
    conv = fast.unet.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert plain.unet.input_blocks[0][0].weight.is_contiguous()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.inference_mode():
        torch.testing.assert_close(fast.predict(x, t), plain.predict(x, t), atol=1e-5, rtol=1e-5)


def _fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """The on-disk layout huggingface_hub uses: models--owner--name/{refs/main,snapshots/<rev>/...}."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for name, src in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, snap / name)


def test_hub_repo_loads_from_local_cache_offline(tmp_path, monkeypatch):
    folder, ref = _diffusers_folder(tmp_path)
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "google/ddpm-ema-tiny-32", {p.name: p for p in folder.iterdir()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    model = load_model("google/ddpm-ema-tiny-32", device="cpu", cache_dir=cache)
    assert model.info["repo_id"] == "google/ddpm-ema-tiny-32"
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([5])
    with torch.no_grad():
        assert (model.unet(x, t) - ref(x, t).sample).abs().max() <= 1e-4


def test_hub_raw_checkpoint_with_filename(tmp_path, monkeypatch):
    torch.manual_seed(0)
    unet = UNet(P2_SMALL)
    pt = tmp_path / "diffusion_ffhq_10m.pt"
    torch.save(unet.state_dict(), pt)
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "deepinv/diffunet", {"diffusion_ffhq_10m.pt": pt})
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    model = load_model("deepinv/diffunet:diffusion_ffhq_10m.pt", device="cpu", cache_dir=cache)
    assert model.unet.config == P2_SMALL
    same = load_model("deepinv/diffunet", filename="diffusion_ffhq_10m.pt", device="cpu", cache_dir=cache)
    assert same.unet.config == P2_SMALL
    assert assumed_settings(model) == assumed_settings(same) == {}  # the registry's FFHQ model: settings checked
    local = load_model(pt, device="cpu", cpu_backend="torch")  # someone's own .pt: say what was assumed
    assert assumed_settings(local)["beta_schedule"] == "linear" and assumed_settings(local)["num_head_channels"] == 64


def test_hub_offline_and_missing_give_clear_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"offline mode \(HF_HUB_OFFLINE\), and it is not in the cache"):
        load_model("google/ddpm-ema-church-256", device="cpu", cache_dir=tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="neither a local file"):
        load_model("no such model", device="cpu")


def test_bad_files_give_specific_errors(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="junk.pt is not a PyTorch checkpoint"):
        load_model(junk, device="cpu")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="neither, it is empty"):
        load_model(empty, device="cpu")
    garbled = tmp_path / "garbled.pt"
    garbled.write_bytes(b"\x80\x04garbage")  # looks like a pickle, is not one
    with pytest.raises(ModelLoadError, match="could not be loaded as a weights-only.*may be damaged"):
        load_model(garbled, device="cpu")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(ModelLoadError, match=r"refers to builtins\.print\), which are refused for safety"):
        load_model(evil, device="cpu")  # named although torch stops at protocol 4's framing ("operand 149")
    full = tmp_path / "full.pt"
    torch.save({"weight": torch.zeros(1), "args": argparse.Namespace(lr=1)}, full)  # a training script's habit
    with pytest.raises(ModelLoadError, match="Python objects besides tensors.*Namespace.*refused for safety") as no:
        load_model(full, device="cpu")
    assert "weights_only=False" not in str(no.value)  # never advise the unsafe load

    opt = tmp_path / "opt0.pt"
    torch.save({"state": {}, "param_groups": []}, opt)
    with pytest.raises(ModelLoadError, match="optimizer state"):
        load_model(opt, device="cpu")

    unknown = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, unknown)
    with pytest.raises(ModelLoadError, match="matches no known layout.*input_blocks.0.0.weight"):
        load_model(unknown, device="cpu")

    truncated = tmp_path / "trunc.pt"
    sd = UNet(PLAIN_64).state_dict()
    sd.pop("input_blocks.1.0.in_layers.2.weight")
    torch.save(sd, truncated)
    with pytest.raises(ModelLoadError, match="do not split into heads of 64; pass the heads it was trained with.*--model-option num_head_channels=32 or num_heads=4"):
        load_model(truncated, device="cpu")
    with pytest.raises(ModelLoadError, match="do not fit.*Missing.*input_blocks.1.0.in_layers.2.weight"):
        load_model(truncated, device="cpu", num_head_channels=32)

    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(bad_st, device="cpu")


def test_a_config_that_is_not_a_json_object_is_explained(tiny_checkpoint):
    (tiny_checkpoint / "config.json").write_text("[1, 2]")  # used to fail with an AttributeError traceback
    with pytest.raises(ModelLoadError, match=r"config.json is not a JSON object \(it holds a list\)"):
        load_model(tiny_checkpoint, device="cpu")


def test_diffusers_weights_without_config_is_explained(tmp_path):
    folder, _ = _diffusers_folder(tmp_path)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", lone / "weights.safetensors")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(lone / "weights.safetensors", device="cpu")


def test_cuda_request_without_gpu_is_explained(tiny_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelLoadError, match="no GPU"):
        load_model(tiny_checkpoint, device="cuda")


def test_no_dns_goes_straight_to_the_cache(tmp_path, monkeypatch):
    """Offline without HF_HUB_OFFLINE: no 25 s of retries, the cached copy is used or a clear error given."""
    import socket
    import time

    import huggingface_hub.constants as hc

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    folder, ref = _diffusers_folder(tmp_path)
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "google/ddpm-ema-tiny-32", {p.name: p for p in folder.iterdir()})
    assert load_model("google/ddpm-ema-tiny-32", device="cpu", cache_dir=cache).image_size == 32
    start = time.time()
    with pytest.raises(ModelLoadError, match=r"offline \(huggingface.co cannot be resolved\), and it is not in"):
        load_model("google/ddpm-ema-church-256", device="cpu", cache_dir=cache)
    assert time.time() - start < 5


def test_a_hub_that_does_not_answer_costs_seconds_not_minutes(tmp_path, monkeypatch):
    """Behind a firewall that accepts connections and never replies, huggingface_hub alone retried
    for about 6.5 minutes per model before giving up."""
    import socket
    import threading
    import time

    import huggingface_hub.constants as hc
    import ilvr.loading.hub as hub

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    threading.Thread(target=lambda: held.extend(server.accept() for _ in range(8)), daemon=True).start()
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(hub, "HUB_PROBE_TIMEOUT_S", 1.0)
    folder, _ = _diffusers_folder(tmp_path)
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "google/ddpm-ema-tiny-32", {p.name: p for p in folder.iterdir()})
    start = time.time()
    assert load_model("google/ddpm-ema-tiny-32", device="cpu", cache_dir=cache).image_size == 32
    with pytest.raises(ModelLoadError, match=r"did not answer within 1 s .*, and it is not in the cache"):
        load_model("google/ddpm-ema-church-256", device="cpu", cache_dir=cache)
    assert time.time() - start < 15
    server.close()


def test_huggingface_cache_variables_are_honoured(tmp_path, monkeypatch):
    """HF_HOME / HF_HUB_CACHE (a Space's persistent storage) hold the downloads unless ILVR_CACHE says
    otherwise, and a model already there is found even when ILVR_CACHE points elsewhere."""
    import huggingface_hub.constants as hc
    from ilvr.loading import hub_cache_dir

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    for name in ("ILVR_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    folder, _ = _diffusers_folder(tmp_path)
    _fake_hub_cache(tmp_path / "hf" / "hub", "google/ddpm-ema-tiny-32", {p.name: p for p in folder.iterdir()})
    assert load_model("google/ddpm-ema-tiny-32", device="cpu").image_size == 32
    monkeypatch.setenv("ILVR_CACHE", str(tmp_path / "ours"))
    assert hub_cache_dir() == tmp_path / "ours"
    assert load_model("google/ddpm-ema-tiny-32", device="cpu").image_size == 32  # found in HF_HOME's cache
    monkeypatch.delenv("HF_HOME")
    monkeypatch.delenv("ILVR_CACHE")
    assert hub_cache_dir().parts[-2:] == ("checkpoints", "hub")
    # huggingface_hub's other variables, with its precedence: HF_HUB_CACHE > HUGGINGFACE_HUB_CACHE > HF_HOME > XDG
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "old-name"))
    assert hub_cache_dir() == tmp_path / "old-name"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new-name"))
    assert hub_cache_dir() == tmp_path / "new-name"


def test_a_model_in_the_xdg_cache_is_found_offline(tmp_path, monkeypatch):
    """A model that diffusers downloaded under XDG_CACHE_HOME is used offline even with ILVR_CACHE elsewhere."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("ILVR_CACHE", str(tmp_path / "empty"))
    folder, _ = _diffusers_folder(tmp_path)
    _fake_hub_cache(tmp_path / "xdg" / "huggingface" / "hub", "google/ddpm-ema-tiny-32",
                    {p.name: p for p in folder.iterdir()})
    assert load_model("google/ddpm-ema-tiny-32", device="cpu").image_size == 32


def _pipeline_files(folder: Path) -> dict[str, Path]:
    """A diffusers pipeline repo's layout: model_index.json, unet/, scheduler/."""
    index = folder.parent / "model_index.json"
    index.write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                 "scheduler": ["diffusers", "DDPMScheduler"]}))
    files = {"model_index.json": index, "scheduler/scheduler_config.json": folder / "scheduler_config.json"}
    files.update({f"unet/{p.name}": p for p in folder.iterdir() if p.name != "scheduler_config.json"})
    return files


def test_hub_pipeline_repo_with_unet_and_scheduler_folders(tmp_path, monkeypatch):
    """Early google/ddpm-* revisions (and DDPMPipeline.save_pretrained) keep the UNet in unet/ and the
    scheduler in scheduler/: found in the cache offline, with the pipeline's scheduler."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    folder, ref = _diffusers_folder(tmp_path)
    sched = json.loads((folder / "scheduler_config.json").read_text())
    (folder / "scheduler_config.json").write_text(json.dumps({**sched, "beta_schedule": "squaredcos_cap_v2"}))
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someone/ddpm-pipeline-32", _pipeline_files(folder))
    model = load_model("someone/ddpm-pipeline-32", device="cpu", cache_dir=cache)
    assert model.diffusion.beta_schedule == "cosine"  # read from scheduler/, not the defaults
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([5])
    with torch.no_grad():
        assert (model.unet(x, t) - ref(x, t).sample).abs().max() <= 1e-4
    with pytest.raises(ModelLoadError, match="offline mode.*not in the cache"):  # a repo not cached at all
        load_model("someone/not-cached", device="cpu", cache_dir=cache)


def test_hub_pipeline_repo_is_downloaded_from_its_subfolders(tmp_path, monkeypatch):
    """Online: a 404 for config.json at the top means a pipeline layout is tried, not a wrong message."""
    from huggingface_hub.errors import EntryNotFoundError

    import ilvr.loading.hub as hub

    folder, _ = _diffusers_folder(tmp_path)
    remote = _pipeline_files(folder)
    asked = []

    def hub_download(repo_id, filename, *, revision=None, cache_dir=None, local_files_only=False):
        asked.append(filename)
        if filename not in remote:
            raise EntryNotFoundError(f"404: {filename}")
        target = Path(cache_dir) / "snap" / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(remote[filename], target)
        return str(target)

    monkeypatch.setattr(hub, "_hub_unreachable", lambda: None)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", hub_download)
    model = load_model("someone/ddpm-pipeline-32", device="cpu", cache_dir=tmp_path / "cache")
    assert model.image_size == 32 and asked[0] == "config.json" and "unet/config.json" in asked
    assert "scheduler/scheduler_config.json" in asked
    remote.clear()
    with pytest.raises(ModelLoadError, match="has no file 'config.json'"):
        load_model("someone/raw-checkpoints", device="cpu", cache_dir=tmp_path / "cache2")


def test_a_training_state_loads_with_its_own_settings(tmp_path):
    """train_state.ckpt.pt records its UNet config: it must not be read as a guessed ADM .pt (64-channel
    heads, fixed_large variance), which sampled wrong images silently."""
    from conftest import TINY_TRAIN_FLAGS, noise_images
    from ilvr.cli import main as cli_main

    data = noise_images(tmp_path / "data", [(16, 16)] * 4)
    out = tmp_path / "model"
    assert cli_main(["train", "--data", str(data), "--out", str(out), *TINY_TRAIN_FLAGS, "--batch-size", "2",
                     "--steps", "2", "--sample-every", "0"]) == 0
    exported = load_model(out / "model.safetensors", device="cpu")
    (tmp_path / "alone").mkdir()  # without the config.json written beside it
    shutil.copy(out / "train_state.ckpt.pt", tmp_path / "alone" / "train_state.ckpt.pt")
    state = load_model(tmp_path / "alone" / "train_state.ckpt.pt", device="cpu")
    assert state.config == exported.config and state.config.num_head_channels == 32
    assert state.diffusion == exported.diffusion and state.diffusion.variance_type == "fixed_small"
    a = sample(exported, None, seeds=[0], steps="5")
    b = sample(state, None, seeds=[0], steps="5")
    assert (a - b).abs().max() < 0.02  # the export is the same EMA weights in fp16
    assert state.describe()["training"]["steps"] == 2 and exported.describe()["training"]["steps"] == 2


@pytest.mark.parametrize("steps", [500, 2000])
def test_diffusers_linear_betas_are_taken_as_written(tmp_path, steps):
    """diffusers uses beta_start/beta_end as given for any num_train_timesteps; guided-diffusion's 1000/T
    scaling applied to them gave another noise schedule (alpha-bar_T 4e-5 instead of 2e-9 at T=2000)."""
    folder, _ = _diffusers_folder(tmp_path)
    path = folder / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_train_timesteps": steps,
                                "variance_type": "fixed_large_log"}))
    model = load_model(folder, device="cpu", cpu_backend="torch")
    np.testing.assert_allclose(model.schedule.betas, np.linspace(1e-4, 0.02, steps), rtol=1e-12)
    assert model.diffusion.variance_type == "fixed_large"  # diffusers samples fixed_large_log alike
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DDPMScheduler(num_train_timesteps=steps).betas.double().numpy()
    np.testing.assert_allclose(model.schedule.betas, reference, rtol=1e-6)


def test_guided_diffusion_betas_scale_with_the_step_count(tmp_path):
    """improved-diffusion/guided-diffusion .pt files record no schedule: theirs is linear 1e-4..0.02 at
    1000 steps, scaled by 1000/T for other T (num_train_timesteps=4000 for the 4000-step models)."""
    unet = UNet(PLAIN_64)
    pt = tmp_path / "model.pt"
    torch.save(unet.state_dict(), pt)
    default = load_model(pt, device="cpu", cpu_backend="torch", num_head_channels=32)
    np.testing.assert_allclose(default.schedule.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-12)
    long = load_model(pt, device="cpu", cpu_backend="torch", num_head_channels=32, num_train_timesteps=4000)
    np.testing.assert_allclose(long.schedule.betas, np.linspace(2.5e-5, 0.005, 4000), rtol=1e-12)
    given = load_model(pt, device="cpu", cpu_backend="torch", num_head_channels=32, num_train_timesteps=4000,
                       beta_start=1e-4, beta_end=0.02)  # endpoints the user gives are taken as written
    np.testing.assert_allclose(given.schedule.betas, np.linspace(1e-4, 0.02, 4000), rtol=1e-12)


@pytest.mark.parametrize("option", [dict(num_heads=0), dict(num_head_channels=0), dict(num_heads=-4),
                                    dict(num_head_channels=2.5), dict(num_heads=True)])
def test_head_options_must_be_whole_numbers_above_zero(tmp_path, option):
    """0 used to be ignored silently (64-channel heads) and -4 failed at the first forward pass."""
    pt = tmp_path / "model.pt"
    torch.save(UNet(PLAIN_64).state_dict(), pt)
    name = next(iter(option))
    with pytest.raises(ModelLoadError, match=f"{name} must be a whole number above 0"):
        load_model(pt, device="cpu", cpu_backend="torch", **option)


def test_check_hook_sees_the_architecture_before_the_weights_are_placed(tiny_checkpoint, monkeypatch):
    """A server's limits (studio.models) refuse a model from its architecture alone: the check runs once
    the config is known and the network exists only on the meta device."""
    from ilvr.network import count_parameters

    seen = []
    model = load_model(tiny_checkpoint, device="cpu", cpu_backend="torch",
                       check=lambda cfg, diffusion, n: seen.append((cfg.image_size, diffusion.num_train_timesteps, n)))
    assert seen == [(32, 1000, count_parameters(model.unet))]

    placed = []
    original = torch.nn.Module.load_state_dict
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda *a, **k: placed.append(1) or original(*a, **k))

    def refuse(cfg, diffusion, n):
        raise ModelLoadError(f"image size {cfg.image_size} is over this server's limit")

    with pytest.raises(ModelLoadError, match="over this server's limit"):
        load_model(tiny_checkpoint, device="cpu", cpu_backend="torch", check=refuse)
    assert not placed  # refused before any weights were loaded
