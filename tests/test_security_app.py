"""The app as a public server (docs/security.md): who may load what, limits on models, images and runs,
failed loads that keep nothing, and bad API values answered without tracebacks in the server log."""
from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from app_server import BUNDLED_WEIGHTS, NO_BUNDLED_MODEL, ROOT, AppServer  # noqa: E402
from conftest import tiny_unet  # noqa: E402
from ilvr.loading import ModelLoadError  # noqa: E402
from ilvr.schedule import DiffusionConfig  # noqa: E402
from studio import models as M  # noqa: E402
from studio.public import ModelLimits, model_limits, server_policy, upload_folders  # noqa: E402

EX = ROOT / "examples"
MODEL = "emoji64"


# ----------------------------------------------------------------------------- who may load what

@pytest.mark.parametrize("host, share, env, public, paths", [
    ("127.0.0.1", False, {}, False, True),
    ("localhost", False, {}, False, True),
    ("::1", False, {}, False, True),
    ("127.0.0.1", True, {}, True, False),  # --share: a gradio.live link anyone can open
    ("0.0.0.0", False, {}, True, False),
    ("192.168.1.20", False, {}, True, False),
    ("myhost.example", False, {}, True, False),
    ("127.0.0.1", False, {"SYSTEM": "spaces"}, True, False),
    ("0.0.0.0", True, {"ILVR_ALLOW_MODEL_PATHS": "1"}, True, True),  # the operator's explicit opt-in
    ("127.0.0.1", False, {"ILVR_ALLOW_MODEL_PATHS": "0"}, False, False),
])
def test_share_and_public_hosts_turn_model_paths_off(host, share, env, public, paths):
    policy = server_policy(host, share, env)
    assert policy.public is public and policy.allow_paths is paths
    assert policy.detailed_errors is (paths and not public)
    assert (policy.max_image_steps is not None) is public and policy.one_run_per_session is public
    lines = policy.startup_lines()
    assert bool(lines) is public
    if public and not paths:
        assert "model paths are off" in lines[0] and "ILVR_ALLOW_MODEL_PATHS=1" in lines[0]


def test_operator_settings_from_the_environment():
    env = {"ILVR_MAX_IMAGE_SIZE": "1024", "ILVR_MAX_PARAMETERS": "1_000_000_000", "ILVR_MAX_IMAGE_STEPS": "0",
           "ILVR_ONE_RUN_PER_SESSION": "0"}
    policy = server_policy("0.0.0.0", False, env)
    assert policy.limits.max_image_size == 1024 and policy.limits.max_parameters == 10 ** 9
    assert policy.max_image_steps is None and not policy.one_run_per_session
    assert model_limits({}) == ModelLimits(512, 600_000_000)
    with pytest.raises(ValueError, match="ILVR_MAX_IMAGE_SIZE='big' is not a whole number"):
        model_limits({"ILVR_MAX_IMAGE_SIZE": "big"})


def test_app_turns_paths_off_for_share_and_public_hosts():
    """app.py decides from its own command line (before its slow imports); a bad setting is one line."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("ILVR_ALLOW_MODEL_PATHS", "SYSTEM", "GRADIO_SERVER_NAME")}
    code = ("import app\nfor argv in (['--share'], ['--host', '0.0.0.0'], []):\n"
            "    p = app.parse_args(argv).policy\n    print(argv, p.public, p.allow_paths)\n"
            "print('module:', app.ALLOW_MODEL_PATHS)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "['--share'] True False" in out.stdout and "['--host', '0.0.0.0'] True False" in out.stdout
    assert "[] False True" in out.stdout and "module: True" in out.stdout
    bad = subprocess.run([sys.executable, "app.py", "--host", "0.0.0.0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**env, "ILVR_MAX_IMAGE_STEPS": "lots"})
    assert bad.returncode == 2 and bad.stderr.strip() == "ILVR_MAX_IMAGE_STEPS='lots' is not a whole number"


def test_models_never_load_from_the_upload_folder(tmp_path, monkeypatch, tiny_checkpoint):
    uploads = tmp_path / "uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "systemp"))
    assert upload_folders() == [uploads.resolve(), (tmp_path / "systemp" / "gradio").resolve()]
    calls = []

    def loader(source, device, dtype, check=None):
        calls.append(source)
        raise AssertionError("never called")

    cache = M.ModelCache(device="cpu", loader=loader)
    for folder in upload_folders():
        shutil.copytree(tiny_checkpoint, folder / "abc123" / "tiny")
        target = folder / "abc123" / "tiny"
        elsewhere = tmp_path / f"link-{folder.name}"
        elsewhere.symlink_to(target)
        for path in (target, target / "model.safetensors", elsewhere, f"{folder}/abc123/../abc123/tiny",
                     folder / "missing.pt"):
            with pytest.raises(ModelLoadError, match="never loads models from its upload folder"):
                cache.get(str(path))
    assert calls == []


# ----------------------------------------------------------------------------- limits on models

def _oversize_model(folder: Path, image_size: int = 1024) -> Path:
    """A model of ours that says it makes 1024 px images, with tiny channels (a few MB)."""
    from ilvr.train import export_model

    export_model(tiny_unet(image_size=image_size), DiffusionConfig(), folder)
    return folder


def test_oversize_model_config_refused_before_building(tmp_path):
    calls = []

    def loader(source, device, dtype, check=None):
        calls.append(source)
        raise AssertionError("the UNet must not be built")

    folder = _oversize_model(tmp_path / "big")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(folder / "model.safetensors", alone / "weights.safetensors")  # its config only in the metadata
    cache = M.ModelCache(device="cpu", loader=loader)
    for path in (folder, folder / "model.safetensors", alone / "weights.safetensors"):
        with pytest.raises(ModelLoadError, match=r"image size \(1,024\) is above this server's limit of 512; "
                                                 r".*ILVR_MAX_IMAGE_SIZE"):
            cache.get(str(path))
    quiet = M.ModelCache(device="cpu", loader=loader, detailed_errors=False)
    with pytest.raises(ModelLoadError) as err:
        quiet.get(str(folder))
    assert "1,024" not in str(err.value) and "limit of 512" in str(err.value)  # no value from the file echoed
    small = M.ModelCache(device="cpu", loader=loader, limits=ModelLimits(max_parameters=1000))
    with pytest.raises(ModelLoadError, match="parameter count .* above this server's limit of 1,000; .*ILVR_MAX_PAR"):
        small.get(str(_oversize_model(tmp_path / "small", image_size=32)))
    assert calls == []
    found = M.inspect_checkpoint(folder, ModelLimits())
    assert found.image_size == 1024 and 0 < found.parameters < 10 ** 7


def test_model_limits_are_checked_on_the_built_model_too(tiny_checkpoint):
    from ilvr.loading import load_model

    def hub(source, device, dtype, check=None):  # a Hub download: nothing to read before it is built
        return load_model(str(tiny_checkpoint), device=device, dtype=dtype, check=check)

    cache = M.ModelCache(device="cpu", loader=hub, limits=ModelLimits(max_image_size=16))
    with pytest.raises(ModelLoadError, match=r"image size \(32\) is above this server's limit of 16"):
        cache.get("someone/tiny-model")
    assert M.ModelCache(device="cpu", loader=hub).get("someone/tiny-model").image_size == 32


def test_oversize_pickle_refused_from_its_index(tmp_path):
    sd = {"input_blocks.0.0.weight": torch.zeros(32, 3, 3, 3), "big": torch.zeros(2000)}
    torch.save({"state_dict": sd}, tmp_path / "m.pt")
    found = M.inspect_checkpoint(tmp_path / "m.pt", ModelLimits())
    assert found.parameters == 32 * 27 + 2000
    cache = M.ModelCache(device="cpu", limits=ModelLimits(max_parameters=100), loader=lambda *a, **k: 1 / 0)
    with pytest.raises(ModelLoadError, match="parameter count"):
        cache.get(str(tmp_path / "m.pt"))


# ----------------------------------------------------------------------------- failed loads keep nothing

def _big_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and o.numel() == 3_000_000)


def test_failed_loads_keep_messages_not_tensors(tmp_path, monkeypatch):
    path = tmp_path / "junk.pt"
    torch.save({"not.a.layer": torch.randn(3_000_000)}, path)  # 12 MB of a layout nobody knows
    (tmp_path / "sub").mkdir()
    (tmp_path / "alias.pt").symlink_to(path)
    monkeypatch.chdir(tmp_path)
    calls = []

    def loader(source, device, dtype, check=None):
        from ilvr.loading import load_model

        calls.append(source)
        return load_model(source, device=device, dtype=dtype)

    cache = M.ModelCache(device="cpu", loader=loader)
    before = _big_tensors()
    for spelling in (str(path), "junk.pt", "./junk.pt", "sub/../junk.pt", f" {path} ", "alias.pt"):
        with pytest.raises(ModelLoadError, match="matches no known layout"):
            cache.get(spelling)
    assert len(calls) == 1  # one key for every spelling; the same file is not read again
    failures = cache.failures()
    assert list(failures) == [str(path.resolve())] and all(isinstance(m, str) for m in failures.values())
    assert all(isinstance(entry[2], str) for entry in cache._failures.values())
    assert _big_tensors() == before  # no traceback holds the state dict that was read
    path.write_bytes(path.read_bytes())  # a changed file is tried again
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10 ** 9))
    with pytest.raises(ModelLoadError):
        cache.get(str(path))
    assert len(calls) == 2 and _big_tensors() == before


def test_failure_memory_is_bounded():
    def offline(source, device, dtype):
        raise ModelLoadError("offline")

    cache = M.ModelCache(loader=offline, max_failures=3)
    for k in range(10):
        with pytest.raises(ModelLoadError):
            cache.get(f"someone/model-{k}")
    assert list(cache.failures()) == [f"someone/model-{k}" for k in (7, 8, 9)]
    assert cache._source_locks == {}  # no lock left behind per source


def test_errors_name_no_other_files_unless_detailed():
    several = "/srv/models holds several weights files (a.pt, secret.pt); pass one of them"
    assert M.shown_error(several, "/srv/models", detailed=True) == several
    shown = M.shown_error(several, "/srv/models", detailed=False)
    assert "secret" not in shown and "could not be loaded" in shown
    config = "m.safetensors: its config or load options cannot be used (TypeError: bad value 'xyz')"
    assert "xyz" not in M.shown_error(config, "/x/m.safetensors", detailed=False)
    hub = "cannot download google/ddpm-ema-cat-256: offline, and it is not in the cache (/home/me/.cache/hf). Connect"
    assert M.shown_error(hub, "cat-256 (Google DDPM, EMA)", detailed=False) == \
        "cannot download google/ddpm-ema-cat-256: offline, and it is not in the cache (…). Connect"
    refusal = "this server only loads the models in the list (ILVR_ALLOW_MODEL_PATHS is off)"
    assert M.shown_error(refusal, "/etc", detailed=False) == refusal


# ----------------------------------------------------------------------------- images: one pixel limit

def test_oversize_editor_layer_refused_before_decoding(tmp_path, monkeypatch):
    from gradio.components.image_editor import EditorData
    from gradio.data_classes import FileData
    from PIL import ImageFile

    from studio import components as ui

    Image.new("1", (13000, 13000)).save(tmp_path / "layer.png")  # 169 MP in 26 kB
    Image.new("RGB", (64, 64), "white").save(tmp_path / "bg.png")
    decoded = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original_load(self))
    bg = FileData(path=str(tmp_path / "bg.png"))
    for component in (ui.ImageEditor(render=False), ui.Sketchpad(render=False)):
        value = component.preprocess(EditorData(background=bg, layers=[FileData(path=str(tmp_path / "layer.png"))],
                                                composite=bg))
        assert isinstance(value, ui.Refused) and "larger than 64 megapixels" in value.message
    assert (13000, 13000) not in decoded
    value = ui.ImageEditor(render=False).preprocess(EditorData(background=bg, layers=[bg], composite=bg))
    assert value["background"] == str(tmp_path / "bg.png") and value["layers"] == [str(tmp_path / "bg.png")]


def test_editor_canvases_are_bounded():
    from studio.components import BlobStore

    store = BlobStore(max_bytes=1000, max_entries=3, max_layers=2)
    store.put("a", "layer", 10 ** 9, b"x")  # Gradio would grow a list of 10^9 entries
    store.put("a", "sideways", None, b"x")
    assert len(store) == 0
    for k in range(5):
        store.put(f"id{k}", "background", None, b"x" * 300)
    assert len(store) == 3 and store.get("id0") is None and store.get("id4")["background"] == b"x" * 300
    store.put("big", "composite", None, b"x" * 900)
    assert len(store) == 1
    store.take("big")
    assert len(store) == 0


# ----------------------------------------------------------------------------- through the API

needs_model = pytest.mark.skipif(not BUNDLED_WEIGHTS.is_file(), reason=NO_BUNDLED_MODEL)
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402


def translate(client, image=None, n=8, samples=1, steps="5", seed=0, model=MODEL, path="", **kw):
    image = image if image is not None else handle_file(EX / "twemoji_cat_face.png")
    args = {"stop": 0, "kernel": "cubic", "sampler": "ddpm", **kw}
    return client.predict(model, path, image, n, samples, steps, args["stop"], args["kernel"], args["sampler"], seed,
                          api_name="/translate")


@pytest.fixture(scope="module")
def huge_layer(tmp_path_factory):
    d = tmp_path_factory.mktemp("huge")
    Image.new("1", (9000, 9000)).save(d / "layer.png")  # 81 MP, 10 kB
    return d / "layer.png"


@needs_model
def test_seed_must_be_a_whole_number(server):
    client = Client(server.url, verbose=False)
    with pytest.raises(AppError, match="(?i)seed must be a whole number, got 1.5"):
        translate(client, seed=1.5)
    assert "Done in" in translate(client, seed=2.0)[3]


@needs_model
def test_uploaded_model_cannot_be_loaded_by_its_temp_path(server, tmp_path):
    import httpx

    folder = _oversize_model(tmp_path / "ok", image_size=32)
    with open(folder / "model.safetensors", "rb") as f:
        r = httpx.post(server.url + "gradio_api/upload", files={"files": ("model.safetensors", f)})
    temp_path = r.json()[0]
    assert Path(temp_path).is_file()
    client = Client(server.url, verbose=False)
    with pytest.raises(AppError, match="never loads models from its upload folder"):
        client.predict(MODEL, temp_path, api_name="/load_model")
    assert "32 px" in client.predict(MODEL, str(folder / "model.safetensors"), api_name="/load_model")[0]


@needs_model
def test_oversize_model_refused_through_the_app(server, tmp_path):
    client = Client(server.url, verbose=False)
    with pytest.raises(AppError, match=r"image size \(1,024\) is above this server's limit of 512"):
        client.predict(MODEL, str(_oversize_model(tmp_path / "big")), api_name="/load_model")


@needs_model
@pytest.mark.parametrize("api", ["/scribble", "/paint"])
def test_oversize_editor_layer_refused(server, huge_layer, api):
    client = Client(server.url, verbose=False)
    bg = handle_file(EX / "scribble_sunglasses_background.png")
    value = {"background": bg, "layers": [handle_file(huge_layer)], "composite": bg, "id": None}
    with pytest.raises(AppError, match="(?i)larger than 64 megapixels"):
        if api == "/scribble":
            client.predict(MODEL, "", value, 2, True, 1, "5", 200, "cubic", "ddpm", 0, api_name=api)
        else:
            client.predict(MODEL, "", "sketch pad", None, value, 16, 1, "5", 0, "cubic", "ddpm", 0, api_name=api)
    assert server.alive()


@pytest.fixture(scope="module")
def public_server(tmp_path_factory):
    """`python app.py --host 0.0.0.0`: what --share and a Space get too. Runs capped at 1000 images x
    steps so the tests stay short."""
    if not BUNDLED_WEIGHTS.is_file():
        pytest.skip(NO_BUNDLED_MODEL)
    env = {"ILVR_MAX_IMAGE_STEPS": "1000", "ILVR_ALLOW_MODEL_PATHS": "", "SYSTEM": ""}
    srv = AppServer(tmp_path_factory.mktemp("public"), args=["--host", "0.0.0.0"], extra_env=env)
    yield srv
    srv.stop()


def test_public_server_says_so_and_refuses_paths(public_server):
    log = public_server.log()
    assert "reachable from other computers (--host 0.0.0.0)" in log and "model paths are off" in log
    with urllib.request.urlopen(public_server.url + "config") as r:
        config = json.load(r)
    box = next(c for c in config["components"] if c["props"].get("elem_id") == "model-path")
    assert box["props"]["visible"] is False
    client = Client(public_server.url, verbose=False)
    with pytest.raises(AppError, match="only loads the models in the list"):
        client.predict(MODEL, str(ROOT / "checkpoints"), api_name="/load_model")


def test_public_server_caps_a_run_and_takes_one_run_per_session(public_server):
    import httpx

    client = Client(public_server.url, verbose=False)
    with pytest.raises(AppError, match=r"at most 1,000 images × steps per run; this one asks for 2 images × 1000"):
        translate(client, samples=2, steps="1000")
    job = client.submit(MODEL, "", handle_file(EX / "twemoji_cat_face.png"), 8, 1, "1000", 0, "cubic", "ddpm", 0,
                        api_name="/translate")
    try:
        import time

        deadline = time.time() + 60
        while time.time() < deadline and not (job.status().progress_data or job.done()):
            time.sleep(0.2)
        assert not job.done()
        with pytest.raises(httpx.HTTPStatusError, match="400 Bad Request"):  # the page shows it as a toast
            translate(client)
        assert "You already have a run queued or running" in public_server.log()
        other = Client(public_server.url, verbose=False)  # another visitor queues behind it
        waiting = other.submit(MODEL, "", handle_file(EX / "twemoji_frog.png"), 8, 1, "5", 0, "cubic", "ddpm", 0,
                               api_name="/translate")
    finally:
        job.cancel()
    assert "Done in" in waiting.result(timeout=180)[3]
    assert "Done in" in translate(client)[3]  # the cancelled run's session may run again


def test_bad_api_values_leave_no_traceback(public_server):
    client = Client(public_server.url, verbose=False)
    cases = [dict(seed=1.5), dict(seed="abc"), dict(samples=100), dict(samples="x"), dict(stop=-5),
             dict(kernel="nope"), dict(sampler="euler"), dict(model="nope"), dict(n=[1, 2]), dict(image="hello"),
             dict(steps={"a": 1})]
    for kw in cases:
        with pytest.raises(AppError):
            translate(client, **kw)
    with pytest.raises(AppError):
        client.predict("no such model", "", api_name="/load_model")
    assert public_server.alive()
    assert "Traceback" not in public_server.log()
