"""The CPU runtime's disk caches: ONNX exports (ilvr.runtime.onnx_cache) and the backend chosen by
measurement (ilvr.runtime.cpu_choice). Timings are injected: speed itself is the benchmarks' business."""
import pytest
import torch

from ilvr import bench
from ilvr.export import export_model
from ilvr.loading import load_model
from ilvr.network import UNetConfig
from ilvr.runtime import cpu_choice, onnx_cache
from ilvr.runtime.cpu_choice import MeasuredBackend, pick_backend
from ilvr.runtime.onnx_cache import CACHE_ENV, export_key
from ilvr.runtime.onnx_cpu import BACKEND_ENV, OnnxUNet
from ilvr.sampler import sample
from ilvr.schedule import DiffusionConfig

TINY = UNetConfig(image_size=16, out_channels=6, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(1,), num_head_channels=32)
DIFFUSION = DiffusionConfig(variance_type="learned_range")
SHAPE = (3, 16, 16)


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Every test starts with an empty cache folder and no forced backend."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache" / "onnx"))
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def exports(monkeypatch):
    """Counts ONNX exports (every one goes through torch.onnx.export)."""
    calls = []
    real = torch.onnx.export

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", counting)
    return calls


def folder_with(tmp_path, seed: int, name: str = "tiny"):
    export_model(bench.random_model(TINY, DIFFUSION, seed=seed).unet, DIFFUSION, tmp_path / name)
    return tmp_path / name


def onnx_files(cache):
    return sorted(p.name for p in (cache / "onnx").glob("*.onnx"))


# ----------------------------------------------------------------------------- the ONNX cache

def test_a_second_load_of_the_same_model_does_not_export_again(tmp_path, fresh_cache, exports):
    folder = folder_with(tmp_path, seed=1)
    first = load_model(folder, device="cpu", cpu_backend="onnxruntime")
    second = load_model(folder, device="cpu", cpu_backend="onnxruntime")
    assert len(exports) == 1
    assert first.cpu_runtime.cache_path == second.cpu_runtime.cache_path
    assert onnx_files(fresh_cache) == [first.cpu_runtime.cache_path.name]
    assert not [p for p in (fresh_cache / "onnx").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_outputs_are_identical_with_and_without_the_cache(tmp_path, exports):
    folder = folder_with(tmp_path, seed=2)
    load_model(folder, device="cpu", cpu_backend="onnxruntime")  # writes the entry
    cached = load_model(folder, device="cpu", cpu_backend="onnxruntime")  # reads it
    assert len(exports) == 1 and cached.cpu_runtime.cache_path is not None
    fresh = OnnxUNet(cached.unet, cache=False)
    x, t = torch.randn(3, *SHAPE), torch.tensor([999, 500, 3])
    assert torch.equal(cached.cpu_runtime(x, t), fresh(x, t))
    ref = bench.synthetic_reference(16, 3, seed=5)
    plain = load_model(folder, device="cpu", cpu_backend="torch")
    torch.testing.assert_close(sample(cached, ref, seeds=[1, 2], n_factor=4, steps=6),
                               sample(plain, ref, seeds=[1, 2], n_factor=4, steps=6), atol=1e-4, rtol=1e-4)


def test_different_weights_and_settings_get_different_entries(tmp_path, fresh_cache, monkeypatch):
    a = load_model(folder_with(tmp_path, seed=3, name="a"), device="cpu", cpu_backend="onnxruntime")
    b = load_model(folder_with(tmp_path, seed=4, name="b"), device="cpu", cpu_backend="onnxruntime")
    assert a.cpu_runtime.cache_path != b.cpu_runtime.cache_path and len(onnx_files(fresh_cache)) == 2

    key = export_key(a.unet, SHAPE, channels_last=True)
    assert export_key(a.unet, SHAPE, channels_last=False) != key
    assert export_key(a.unet, (3, 32, 32), channels_last=True) != key
    monkeypatch.setitem(onnx_cache.EXPORT_SETTINGS, "opset", onnx_cache.ONNX_OPSET - 1)
    assert export_key(a.unet, SHAPE, channels_last=True) != key
    monkeypatch.setitem(onnx_cache.EXPORT_SETTINGS, "opset", onnx_cache.ONNX_OPSET)
    assert export_key(a.unet, SHAPE, channels_last=True) == key
    monkeypatch.setattr(onnx_cache, "versions", lambda: {"torch": "0.0", "onnx": None, "onnxruntime": None})
    assert export_key(a.unet, SHAPE, channels_last=True) != key


@pytest.mark.parametrize("damage", [b"", b"not an onnx file", None], ids=["empty", "garbage", "truncated"])
def test_a_damaged_entry_is_exported_again_and_replaced(tmp_path, exports, damage):
    folder = folder_with(tmp_path, seed=5)
    first = load_model(folder, device="cpu", cpu_backend="onnxruntime")
    path = first.cpu_runtime.cache_path
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2] if damage is None else damage)
    again = load_model(folder, device="cpu", cpu_backend="onnxruntime")
    assert len(exports) == 2 and again.cpu_runtime.cache_path == path
    assert path.stat().st_size == len(good)  # the whole export is back in place
    x, t = torch.randn(2, *SHAPE), torch.tensor([10, 900])
    torch.testing.assert_close(again.cpu_runtime(x, t), first.cpu_runtime(x, t), atol=0, rtol=0)


def test_a_cache_that_cannot_be_written_or_is_off_only_costs_the_export(tmp_path, monkeypatch, exports):
    folder = folder_with(tmp_path, seed=6)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "onnx"))
    for _ in range(2):
        model = load_model(folder, device="cpu", cpu_backend="onnxruntime")
        assert isinstance(model.cpu_runtime, OnnxUNet) and model.cpu_runtime.cache_path is None
    monkeypatch.setenv(CACHE_ENV, "0")
    assert onnx_cache.runtime_cache_dir() is None
    model = load_model(folder, device="cpu", cpu_backend="onnxruntime")
    assert model.cpu_runtime.cache_path is None and len(exports) == 3


def test_a_failed_write_leaves_the_old_entry_and_no_temporary_file(tmp_path):
    target = tmp_path / "entry.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with onnx_cache.atomic_path(target) as tmp:
            tmp.write_bytes(b"half a fil")
            raise RuntimeError("the export failed halfway")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["entry.onnx"]
    with onnx_cache.atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["entry.onnx"]


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("ILVR_CACHE", str(tmp_path / "ilvr-cache"))
    assert onnx_cache.runtime_cache_dir() == tmp_path / "ilvr-cache" / "onnx"
    monkeypatch.delenv("ILVR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert onnx_cache.runtime_cache_dir() == tmp_path / "xdg" / "ilvr" / "onnx"


def test_weights_changed_after_loading_are_exported_outside_the_cache(tmp_path, fresh_cache, exports):
    """A model being changed (training, load_state_dict) would fill the cache with one entry per change."""
    model = load_model(folder_with(tmp_path, seed=7), device="cpu", cpu_backend="onnxruntime")
    with torch.no_grad():
        next(model.unet.parameters()).add_(0.1)
    sample(model, None, seeds=[0], steps=2)
    assert len(exports) == 2 and model.cpu_runtime.cache_path is None
    assert len(onnx_files(fresh_cache)) == 1


# ----------------------------------------------------------------------------- the measured backend choice

@pytest.fixture
def timings(monkeypatch):
    """Injected UNet call timings: set `timings.seconds`; `timings.calls` records each measurement."""
    class Fake:
        seconds = {"onnxruntime": 1.0, "torch": 2.0}
        calls: list = []

    Fake.calls = []

    def measure(unet, onnx, batch):
        Fake.calls.append(batch)
        return dict(Fake.seconds)

    monkeypatch.setattr(cpu_choice, "time_unet_calls", measure)
    return Fake


@pytest.mark.parametrize("ort, torch_s, expected", [
    (0.5, 1.0, "onnxruntime"), (0.95, 1.0, "onnxruntime"), (0.97, 1.0, "torch"), (1.0, 1.0, "torch"),
    (1.3, 1.0, "torch")])
def test_onnxruntime_is_used_only_where_it_measured_clearly_faster(ort, torch_s, expected):
    seconds = {"onnxruntime": ort, "torch": torch_s}
    chosen = pick_backend(seconds)
    assert chosen == expected
    assert seconds[chosen] <= seconds["torch"]  # never slower than plain PyTorch by its own measurement


def test_the_two_backends_are_timed_in_turns_by_block_after_their_warm_up_calls(monkeypatch):
    """A PyTorch call timed right after an onnxruntime call shares the cores with its spinning threads."""
    calls = []

    class Recorder:
        def __init__(self, name, config=None):
            self.name, self.config = name, config

        def __call__(self, x, t):
            calls.append(self.name)
            return x

    ticks = iter(range(1000))
    monkeypatch.setattr(cpu_choice.time, "perf_counter", lambda: next(ticks))
    seconds = cpu_choice.time_unet_calls(Recorder("torch", TINY), Recorder("onnxruntime"), batch=1, calls=3, rounds=2)
    warm, timed = calls[:4], calls[4:]
    assert warm == ["onnxruntime"] * 2 + ["torch"] * 2
    assert timed == (["onnxruntime"] * 3 + ["torch"] * 3) * 2
    assert seconds == {"onnxruntime": 1, "torch": 1}  # each call took one tick: the best of a backend's calls


@pytest.mark.parametrize("faster", ["onnxruntime", "torch"])
def test_a_run_uses_the_backend_that_measured_faster(tmp_path, timings, faster):
    timings.seconds = {"onnxruntime": 1.0, "torch": 3.0}
    if faster == "torch":
        timings.seconds = {"onnxruntime": 3.0, "torch": 1.0}
    folder = folder_with(tmp_path, seed=8)
    ref = bench.synthetic_reference(16, 3, seed=5)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = load_model(folder, device="cpu")
        assert isinstance(model.cpu_runtime, MeasuredBackend) and model.cpu_runtime.onnx is None  # no export yet
        threads = []
        got = sample(model, ref, seeds=[1, 2], n_factor=4, steps=5,
                     progress=lambda info: threads.append(torch.get_num_threads()))
    finally:
        torch.set_num_threads(before)
    assert timings.calls == [2]
    # onnxruntime's runs keep PyTorch's own ops on one thread; PyTorch's runs keep every thread for the UNet
    assert threads == ([1] * 5 if faster == "onnxruntime" else [2] * 5)
    plain = load_model(folder, device="cpu", cpu_backend="torch")
    torch.testing.assert_close(got, sample(plain, ref, seeds=[1, 2], n_factor=4, steps=5), atol=1e-4, rtol=1e-4)


def test_the_verdict_is_kept_on_disk_per_batch_size(tmp_path, fresh_cache, timings, exports):
    folder = folder_with(tmp_path, seed=9)
    timings.seconds = {"onnxruntime": 5.0, "torch": 1.0}
    model = load_model(folder, device="cpu")
    assert not model.cpu_runtime.uses_onnxruntime(4)
    assert model.cpu_runtime.uses_onnxruntime(4) is False and timings.calls == [4]  # measured once per process
    assert len(list((fresh_cache / "cpu-backend").glob("*.json"))) == 1

    again = load_model(folder, device="cpu")  # a later process: the verdict is read, not measured
    assert not again.cpu_runtime.uses_onnxruntime(4)
    assert timings.calls == [4] and again.cpu_runtime.onnx is None and len(exports) == 1  # PyTorch: no export

    timings.seconds = {"onnxruntime": 1.0, "torch": 5.0}
    assert again.cpu_runtime.uses_onnxruntime(1) and timings.calls == [4, 1]  # another batch size is measured
    assert len(exports) == 1  # with the export from the cache


def test_another_thread_count_or_architecture_is_measured_again(tmp_path, timings):
    model = load_model(folder_with(tmp_path, seed=10), device="cpu")
    model.cpu_runtime.uses_onnxruntime(2)
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        model.cpu_runtime.uses_onnxruntime(2)
    finally:
        torch.set_num_threads(before)
    assert timings.calls == [2, 2]
    export_model(bench.random_model(UNetConfig(**{**TINY.to_dict(), "model_channels": 64}), DIFFUSION).unet,
                 DIFFUSION, tmp_path / "wider")
    load_model(tmp_path / "wider", device="cpu").cpu_runtime.uses_onnxruntime(2)
    assert timings.calls == [2, 2, 2]


def test_a_damaged_verdict_is_measured_again(tmp_path, fresh_cache, timings):
    folder = folder_with(tmp_path, seed=11)
    load_model(folder, device="cpu").cpu_runtime.uses_onnxruntime(3)
    (verdict,) = (fresh_cache / "cpu-backend").glob("*.json")
    verdict.write_text("{ not json")
    assert load_model(folder, device="cpu").cpu_runtime.uses_onnxruntime(3)
    assert timings.calls == [3, 3]


def test_a_forced_backend_is_never_measured(tmp_path, timings, monkeypatch):
    folder = folder_with(tmp_path, seed=12)
    monkeypatch.setenv(BACKEND_ENV, "onnxruntime")
    assert isinstance(load_model(folder, device="cpu").cpu_runtime, OnnxUNet)
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert load_model(folder, device="cpu").cpu_runtime is None
    sample(load_model(folder, device="cpu", cpu_backend="onnxruntime"), None, seeds=[0, 1], steps=2)
    assert timings.calls == []


def test_a_failed_export_makes_auto_use_pytorch_with_a_warning(tmp_path, timings, monkeypatch):
    folder = folder_with(tmp_path, seed=13)

    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    model = load_model(folder, device="cpu")
    with pytest.warns(RuntimeWarning, match="onnxruntime cannot run this UNet"):
        out = sample(model, None, seeds=[0], steps=3)
    assert torch.isfinite(out).all() and timings.calls == [] and not model.cpu_runtime.uses_onnxruntime(2)


def test_auto_sessions_follow_changed_weights(tmp_path, timings):
    model = load_model(folder_with(tmp_path, seed=14), device="cpu")
    sample(model, None, seeds=[1], steps=3)
    assert model.cpu_runtime.onnx is not None  # onnxruntime measured faster (injected)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.mul_(1.01)
    sample(model, None, seeds=[1], steps=3)
    runtime = model.cpu_runtime
    assert isinstance(runtime, MeasuredBackend) and not runtime.cache and not runtime.is_stale(model.unet)
    x, t = torch.randn(1, *SHAPE), torch.tensor([5])
    with torch.no_grad():
        torch.testing.assert_close(runtime(x, t), model.unet(x, t), atol=1e-5, rtol=1e-4)
