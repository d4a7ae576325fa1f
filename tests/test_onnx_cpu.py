"""ilvr.runtime.onnx_cpu: the UNet on onnxruntime on CPU gives PyTorch's outputs, and every way out of it
works. The disk cache of exports and the measured backend choice: tests/test_cpu_runtime_cache.py."""
import pytest
import torch

from ilvr import bench
from studio.models import device_label
from ilvr.loading import ModelLoadError, load_model
from ilvr.network import UNetConfig
from ilvr.runtime.onnx_cache import CACHE_ENV
from ilvr.runtime.onnx_cpu import BACKEND_ENV, OnnxUNet, cpu_backend
from ilvr.sampler import sample
from ilvr.schedule import DiffusionConfig
from ilvr.export import export_model

# learned sigma (6 output channels) and an attention level, as the ADM checkpoints have
TINY = UNetConfig(image_size=16, out_channels=6, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(1,), num_head_channels=32)
DIFFUSION = DiffusionConfig(variance_type="learned_range")


@pytest.fixture
def tiny_folder(tmp_path):
    export_model(bench.random_model(TINY, DIFFUSION, seed=3).unet, DIFFUSION, tmp_path / "tiny")
    return tmp_path / "tiny"


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert cpu_backend() == "auto"  # measured per batch size (ilvr.runtime.cpu_choice)
    assert cpu_backend("torch") == "torch"
    monkeypatch.setenv(BACKEND_ENV, "Torch")
    assert cpu_backend() == "torch"
    assert cpu_backend("onnxruntime") == "onnxruntime"  # an explicit choice wins over the variable
    with pytest.raises(ValueError, match="auto, onnxruntime, torch"):
        cpu_backend("tensorrt")


def test_onnx_unet_matches_pytorch_at_any_batch_size():
    unet = bench.random_model(TINY, DIFFUSION, seed=4).unet.eval()
    runtime = OnnxUNet(unet, threads=1)
    for batch in (1, 3):  # one export serves every batch size
        x = torch.randn(batch, 3, 16, 16)
        t = torch.tensor([999, 10, 500][:batch])
        with torch.no_grad():
            expected = unet(x, t)
        got = runtime(x, t)
        assert got.dtype == torch.float32 and got.shape == (batch, 6, 16, 16)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_load_model_on_cpu_samples_through_onnxruntime_like_pytorch(tiny_folder):
    fast = load_model(tiny_folder, device="cpu", cpu_backend="onnxruntime")
    plain = load_model(tiny_folder, device="cpu", cpu_backend="torch")
    assert isinstance(fast.cpu_runtime, OnnxUNet) and plain.cpu_runtime is None
    assert device_label(fast) == "CPU, float32, onnxruntime" and device_label(plain) == "CPU, float32"
    ref = bench.synthetic_reference(16, 3, seed=5)
    a = sample(fast, ref, seeds=[1, 2], n_factor=4, steps=20)
    b = sample(plain, ref, seeds=[1, 2], n_factor=4, steps=20)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_changed_weights_are_exported_again_before_the_next_run(tiny_folder):
    model = load_model(tiny_folder, device="cpu", cpu_backend="onnxruntime")
    first = model.cpu_runtime
    ref = bench.synthetic_reference(16, 3, seed=5)
    sample(model, ref, seeds=[1], n_factor=4, steps=5)
    assert model.cpu_runtime is first and not first.is_stale(model.unet)  # sampling leaves the weights alone

    torch.manual_seed(3)
    changed = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
               for k, v in model.unet.state_dict().items()}
    model.unet.load_state_dict(changed)  # in place: same tensors, new values
    assert first.is_stale(model.unet)
    got = sample(model, ref, seeds=[1], n_factor=4, steps=5)
    assert isinstance(model.cpu_runtime, OnnxUNet) and model.cpu_runtime is not first
    plain = load_model(tiny_folder, device="cpu", cpu_backend="torch")
    plain.unet.load_state_dict(changed)
    torch.testing.assert_close(got, sample(plain, ref, seeds=[1], n_factor=4, steps=5), atol=1e-4, rtol=1e-4)


def test_environment_variable_keeps_pytorch(tiny_folder, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert load_model(tiny_folder, device="cpu").cpu_runtime is None
    monkeypatch.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(ModelLoadError, match="CPU backend"):
        load_model(tiny_folder, device="cpu")


def test_autograd_and_compile_use_the_pytorch_unet(tiny_folder, monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    model = load_model(tiny_folder, device="cpu")
    x, t = torch.randn(1, 3, 16, 16, requires_grad=True), torch.tensor([3])
    assert model.predict(x, t).grad_fn is not None  # gradients need PyTorch's graph
    with torch.no_grad():
        assert model.predict(x, t).grad_fn is None
    model.compile()
    assert model.cpu_runtime is None


def test_a_failed_export_falls_back_to_pytorch_with_a_warning(tiny_folder, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo")

    monkeypatch.setenv(CACHE_ENV, "0")  # an export of these weights from an earlier test would be found there
    monkeypatch.setattr(torch.onnx, "export", refuse)
    with pytest.warns(RuntimeWarning, match="onnxruntime cannot run this UNet .*operator foo"):
        model = load_model(tiny_folder, device="cpu", cpu_backend="onnxruntime")
    assert model.cpu_runtime is None
    out = sample(model, bench.synthetic_reference(16, 3, seed=6), seeds=[0], n_factor=2, steps=4)
    assert torch.isfinite(out).all()


def test_step_ops_run_single_threaded_and_the_setting_comes_back(tiny_folder):
    """While the UNet runs on onnxruntime the sampler's own PyTorch ops use one thread (see
    torch_ops_single_threaded); concurrent runs each get it, and the default returns after the last."""
    import threading

    from ilvr.runtime.onnx_cpu import torch_ops_single_threaded

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = load_model(tiny_folder, device="cpu", cpu_backend="onnxruntime")
        seen = []
        sample(model, None, seeds=[0], steps=3, progress=lambda info: seen.append(torch.get_num_threads()))
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2

        inside, leave = threading.Event(), threading.Event()

        def hold():
            with torch_ops_single_threaded():
                inside.set()
                leave.wait(5)

        other = threading.Thread(target=hold)
        other.start()
        assert inside.wait(5)
        with torch_ops_single_threaded():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2  # this thread's own setting is back while the other still runs
        leave.set()
        other.join(5)
        probe = {}
        fresh = threading.Thread(target=lambda: probe.update(n=torch.get_num_threads()))
        fresh.start()
        fresh.join(5)
        assert probe["n"] == 2  # and so is the default for new threads
    finally:
        torch.set_num_threads(before)
