"""The Gradio app through its HTTP API (gradio_client), against `python app.py` on a free local port.

Every tab's endpoint must return model-sized images with few steps on the bundled model; bad input
(no image, not an image, huge image, invalid N or steps, hub failure) must come back as a clear
error while the server keeps serving.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from app_server import BUNDLED_WEIGHTS, NO_BUNDLED_MODEL, ROOT  # noqa: E402
from ilvr.registry import DEFAULT_MODEL  # noqa: E402

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

pytestmark = pytest.mark.skipif(not BUNDLED_WEIGHTS.is_file(), reason=NO_BUNDLED_MODEL)

EX = ROOT / "examples"
MODEL = DEFAULT_MODEL
SIZE = 64
FAST = "5"  # respaced steps: enough to exercise every code path, fast on a busy CPU


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False)


def images_of(gallery) -> list[Image.Image]:
    return [Image.open(item["image"]) for item in gallery]


def settings_of(path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.info["ilvr"])


def assert_result(result, n_images: int):
    grid, gallery, files, info = result
    assert Path(grid).is_file() and Path(grid).name.endswith("_grid.png")
    assert "task" in settings_of(grid)  # the grid's download is the saved file, settings included
    imgs = images_of(gallery)
    assert len(imgs) == n_images
    assert all(im.size == (SIZE, SIZE) for im in imgs)
    assert len(files) == n_images + 1  # every sample plus the grid
    assert "Done in" in info
    return imgs, gallery


def translate(client, image, n=8, samples=1, steps=FAST, model=MODEL, path=""):
    return client.predict(model, path, image, n, samples, steps, 0, "cubic", "ddpm", 0, api_name="/translate")


# ----------------------------------------------------------------------------- the API surface

def test_every_sampling_event_has_an_api_name(server):
    import urllib.request

    with urllib.request.urlopen(server.url + "config") as r:
        config = json.load(r)
    names = {d.get("api_name") for d in config["dependencies"]}
    assert {"load_model", "generate", "translate", "paint", "scribble"} <= names
    tabs = {c["props"].get("label") for c in config["components"] if c["type"] == "tabitem"}
    assert {"N-factor generation", "Domain translation", "Paint-to-image", "Scribble editing"} <= tabs


def test_load_model_reports_device_and_presets(client):
    status, *updates = client.predict(MODEL, "", api_name="/load_model")
    assert "device: CPU" in status or "device: CUDA" in status
    assert "64 px" in status
    factors, *ns = [u["value"] if isinstance(u, dict) else u for u in updates[:5]]  # gr.update(...): a dict
    assert factors == "2, 4, 8, 16, 32"
    assert [int(n) for n in ns] == [4, 8, 16, 2]  # generation, translation, paint, scribble presets at 64 px
    source = updates[5]
    assert source["value"] == "emoji64"  # DDIB's source: another 64 px model


@pytest.mark.skipif(not (ROOT / "checkpoints" / "digits-sevens32" / "model.safetensors").is_file(),
                    reason="the bundled digit model is missing")
def test_digit_model_brings_its_presets_examples_and_ddib_source(client):
    status, *updates = client.predict("digits-sevens32", "", api_name="/load_model")
    assert "32 px" in status
    factors, *ns = [u["value"] if isinstance(u, dict) else u for u in updates[:5]]
    assert factors == "2, 4, 8, 16"
    assert [int(n) for n in ns] == [2, 8, 8, 2]  # scaled to 32 px (at least 2); translation N=8 as measured
    assert updates[5]["value"] == "digits-all32"
    client.predict(MODEL, "", api_name="/load_model")  # the other tests expect the default model's presets


@pytest.mark.skipif(not (ROOT / "checkpoints" / "digits-sevens32" / "model.safetensors").is_file(),
                    reason="the bundled digit model is missing")
def test_each_model_shows_its_own_example_rows():
    """Layout updates (the example rows' visibility) do not come back through the API: the handler itself."""
    import app

    sets = [name for spec in app.TABS for name in spec.examples]
    for model, shown in ((MODEL, "emoji"), ("digits-sevens32", "digits")):
        *_, last = app.load_model(model, "")
        assert len(last) == app.LOAD_OUTPUTS
        assert [u["visible"] for u in last[-len(sets):]] == [name == shown for name in sets], model


def test_translation_by_ddib(client):
    result = client.predict(MODEL, "", handle_file(EX / "twemoji_cat_face.png"), 8, 2, FAST, 0, "cubic", "ddpm", 0,
                            "DDIB", "emoji64", api_name="/translate")
    _, gallery = assert_result(result, 1)  # deterministic: one image whatever the sample count
    s = settings_of(gallery[0]["image"])
    assert (s["method"], s["source_model"], s["model"], s["steps"]) == ("ddib", "emoji64", MODEL, FAST)
    assert "seed" not in s and "N" not in s


@pytest.mark.parametrize("method, source, expected", [
    ("DDIB", None, "DDIB needs a source model"),
    ("DDIB", "digits-all32", "pick a source model of 64 px"),
    ("ddib-ish", "emoji64", r"not in the list of choices: \['ILVR', 'DDIB'\]"),
])
def test_translation_by_ddib_refuses_bad_settings(client, method, source, expected):
    with pytest.raises(AppError, match=expected):
        client.predict(MODEL, "", handle_file(EX / "twemoji_cat_face.png"), 8, 1, FAST, 0, "cubic", "ddpm", 0,
                       method, source, api_name="/translate")


# ----------------------------------------------------------------------------- each tab

def test_generation_n_sweep(client):
    result = client.predict(MODEL, "", handle_file(EX / "noto_grinning_face.png"), "N sweep (Fig. 4)", "2, 16", 4,
                            "0, 500", 2, FAST, 0, "cubic", "ddpm", 7, api_name="/generate")
    imgs, gallery = assert_result(result, 4)
    s = settings_of(gallery[0]["image"])
    assert (s["N"], s["seed"], s["steps"], s["model"], s["task"]) == (2, 7, FAST, MODEL, "generation")
    assert [settings_of(g["image"])["seed"] for g in gallery] == [7, 8, 7, 8]  # column k = seed + k in every row
    grid = Image.open(result[0])
    assert grid.size[1] > 3 * SIZE  # reference row + 2 rows of enlarged cells


def test_generation_range_sweep(client):
    result = client.predict(MODEL, "", handle_file(EX / "noto_fox.png"), "conditioning-range sweep (Fig. 5)",
                            "2, 4", 4, "0, 500, 1000", 1, FAST, 0, "cubic", "ddpm", 0, api_name="/generate")
    _, gallery = assert_result(result, 3)
    assert [settings_of(g["image"])["stop_at"] for g in gallery] == [0, 500, 1000]
    assert {settings_of(g["image"])["N"] for g in gallery} == {4}


def test_translation(client):
    imgs, gallery = assert_result(translate(client, handle_file(EX / "twemoji_cat_face.png"), n=8, samples=2), 2)
    assert np.abs(np.asarray(imgs[0], float) - np.asarray(imgs[1], float)).mean() > 0  # two different samples


def test_translation_is_reproducible(client):
    a = images_of(translate(client, handle_file(EX / "twemoji_frog.png"))[1])[0]
    b = images_of(translate(client, handle_file(EX / "twemoji_frog.png"))[1])[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_paint_from_upload(client):
    result = client.predict(MODEL, "", "uploaded image", handle_file(EX / "paint_heart.png"), None, 16, 2, FAST, 0,
                            "cubic", "ddpm", 0, api_name="/paint")
    assert_result(result, 2)


def test_paint_from_sketch(client, tmp_path):
    layer = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    layer.paste((255, 204, 51, 255), (40, 40, 216, 216))
    layer.save(tmp_path / "layer.png")
    sketch = {"background": None, "layers": [handle_file(tmp_path / "layer.png")],
              "composite": handle_file(tmp_path / "layer.png"), "id": None}
    result = client.predict(MODEL, "", "sketch pad", None, sketch, 16, 1, FAST, 0, "cubic", "ddpm", 0,
                            api_name="/paint")
    assert_result(result, 1)


def editor_value(name: str) -> dict:
    return {"background": handle_file(EX / f"{name}_background.png"),
            "layers": [handle_file(EX / f"{name}_layer.png")],
            "composite": handle_file(EX / f"{name}_composite.png"), "id": None}


def test_scribble_keeps_unedited_region(client):
    from ilvr.images import load_reference, tensor_to_pil
    from studio.inputs import scribble_mask

    result = client.predict(MODEL, "", editor_value("scribble_sunglasses"), 2, True, 1, FAST, 200, "cubic", "ddpm",
                            0, api_name="/scribble")
    (img,), gallery = assert_result(result, 1)
    s = settings_of(gallery[0]["image"])
    assert (s["N"], s["stop_at"], s["keep_outside"]) == (2, 200, True)
    name = "scribble_sunglasses"
    value = {k: Image.open(EX / f"{name}_{k}.png") for k in ("background", "composite")}
    value["layers"] = [Image.open(EX / f"{name}_layer.png")]
    mask, coverage = scribble_mask(value, SIZE, dilate=max(1, SIZE // 32))
    assert 0.02 < coverage < 0.5
    ref = np.asarray(tensor_to_pil(load_reference(EX / f"{name}_composite.png", SIZE)), int)
    out = np.asarray(img.convert("RGB"), int)
    outside = mask.numpy() == 0
    assert np.abs(out - ref)[outside].max() <= 1  # pinned to the input away from the strokes
    assert np.abs(out - ref)[~outside].mean() > 0.5  # and free to change where it was edited


def test_scribble_whole_image(client):
    result = client.predict(MODEL, "", editor_value("scribble_green_apple"), 2, False, 2, FAST, 200, "cubic", "ddpm",
                            0, api_name="/scribble")
    assert_result(result, 2)


# ----------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (d / "notes.txt").write_text("hello")
    Image.new("RGB", (9000, 9000), "white").save(d / "huge.png")  # 81 MP, a few hundred kB
    return d


@pytest.mark.parametrize("case, expected", [
    ("no image", "upload a reference image first"),
    ("corrupt", "not an image this app can read"),
    ("text file", "not an image this app can read"),
    ("huge", "larger than 64 megapixels"),
    ("N does not divide", "valid N: 1, 2, 4, 8, 16, 32, 64"),
    ("N not a number", "N must be a whole number"),
    ("bad steps", "steps must be"),
    ("hub offline", "cannot download"),
    ("missing local path", "neither a local file/folder"),
])
def test_bad_input_is_a_clear_error(client, server, bad_files, case, expected):
    cat = handle_file(EX / "twemoji_cat_face.png")
    args = {
        "no image": dict(image=None),
        "corrupt": dict(image=handle_file(bad_files / "corrupt.png")),
        "text file": dict(image=handle_file(bad_files / "notes.txt")),
        "huge": dict(image=handle_file(bad_files / "huge.png")),
        "N does not divide": dict(image=cat, n=7),
        "N not a number": dict(image=cat, n="many"),
        "bad steps": dict(image=cat, steps="fast"),
        "hub offline": dict(image=cat, model="cat-256 (Google DDPM, EMA)"),
        "missing local path": dict(image=cat, path="/no/such/checkpoint.pt"),
    }[case]
    with pytest.raises(AppError) as err:
        translate(client, **args)
    assert expected.lower() in str(err.value).lower()
    assert server.alive()


def test_bad_input_other_tabs(client, bad_files):
    with pytest.raises(AppError, match="(?i)sketch pad is empty"):
        client.predict(MODEL, "", "sketch pad", None, None, 16, 1, FAST, 0, "cubic", "ddpm", 0, api_name="/paint")
    with pytest.raises(AppError, match="(?i)upload an image to edit first"):
        client.predict(MODEL, "", None, 2, True, 1, FAST, 200, "cubic", "ddpm", 0, api_name="/scribble")
    huge = handle_file(bad_files / "huge.png")
    with pytest.raises(AppError, match="(?i)larger than 64 megapixels"):
        client.predict(MODEL, "", {"background": huge, "layers": [], "composite": huge, "id": None}, 2, True, 1, FAST,
                       200, "cubic", "ddpm", 0, api_name="/scribble")
    with pytest.raises(AppError, match="(?i)not an image this app can read"):
        corrupt = handle_file(bad_files / "corrupt.png")
        client.predict(MODEL, "", {"background": corrupt, "layers": [], "composite": corrupt, "id": None}, 2, True, 1,
                       FAST, 200, "cubic", "ddpm", 0, api_name="/scribble")
    with pytest.raises(AppError, match="(?i)at most 8 N values"):
        client.predict(MODEL, "", handle_file(EX / "noto_fox.png"), "N sweep (Fig. 4)", "1, 2, 4, 8, 16, 32, 64, 3, 5",
                       4, "0", 1, FAST, 0, "cubic", "ddpm", 0, api_name="/generate")
    with pytest.raises(AppError, match="(?i)stop step must be between 0 and 1000"):
        client.predict(MODEL, "", handle_file(EX / "noto_fox.png"), "conditioning-range sweep (Fig. 5)", "2", 4,
                       "0, 5000", 1, FAST, 0, "cubic", "ddpm", 0, api_name="/generate")


def test_hub_failure_on_load_is_clear_and_fast_the_second_time(client):
    for _ in range(2):
        start = time.time()
        with pytest.raises(AppError, match="(?i)offline"):
            client.predict("church-256 (Google DDPM, EMA)", "", api_name="/load_model")
    assert time.time() - start < 10


def test_error_messages_keep_the_case_of_file_names(client, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    with pytest.raises(AppError, match="notes.txt: expected a weights file"):  # not "Notes.txt": no such file
        client.predict(MODEL, str(notes), api_name="/load_model")


def test_server_keeps_serving_after_errors(client, server):
    assert server.alive()
    assert_result(translate(client, handle_file(EX / "twemoji_sun_with_face.png")), 1)
    assert "Traceback" not in server.log() or "gradio.exceptions.Error" in server.log()


def test_cancel_stops_a_long_run(client):
    job = client.submit(MODEL, "", handle_file(EX / "twemoji_cat_face.png"), 8, 8, "1000", 0, "cubic", "ddpm", 0,
                        api_name="/translate")
    deadline = time.time() + 60
    while time.time() < deadline and not (job.status().progress_data or job.done()):
        time.sleep(0.2)
    assert not job.done(), "a 1000-step run of 8 samples should still be running"
    job.cancel()
    start = time.time()
    assert_result(translate(client, handle_file(EX / "twemoji_cat_face.png")), 1)
    assert time.time() - start < 60


SESSION_GROWTH_SCRIPT = """
import json, os, sys
import app
from gradio_client import Client, handle_file
from ilvr.registry import DEFAULT_MODEL
demo = app.build_demo()
demo.queue(default_concurrency_limit=1)
demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), prevent_thread_lock=True, quiet=True,
            **app.launch_options([]))
client = Client(f"http://127.0.0.1:{sys.argv[1]}/", verbose=False)
counts = []
for _ in range(4):
    client.predict(DEFAULT_MODEL, "", handle_file(sys.argv[2]), 8, 1, "5", 0, "cubic", "ddpm", 0, api_name="/translate")
    counts.append(sum(len(s.blocks_config.blocks) for s in demo.state_holder.session_data.values()))
print("REPORT " + json.dumps({"counts": counts, "capacity": demo.state_holder.capacity, "kept": getattr(app, "SESSIONS_KEPT", None)}))
demo.close()
"""


def test_runs_do_not_grow_the_session_kept_by_the_server(tmp_path):
    """Each gr.skip() a run sent to its result outputs left a copy of the component in the browser
    session (Gradio 6): about 0.15 MB per run, kept with the session. And Gradio keeps 10,000 sessions
    of about 0.75 MB each unless told otherwise."""
    import subprocess
    import sys

    from app_server import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
           "ILVR_APP_OUTPUTS": str(tmp_path / "outputs"), "ILVR_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", SESSION_GROWTH_SCRIPT, str(free_port()),
                          str(EX / "twemoji_cat_face.png")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert len(set(report["counts"])) == 1, report  # the same blocks after run 1 and run 4
    assert report["capacity"] == report["kept"] < 10_000


def _app_py(*args: str, timeout: float = 120):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_has_share_port_host_flags():
    out = _app_py("--help")
    assert out.returncode == 0
    for flag in ("--share", "--port", "--host"):
        assert flag in out.stdout
    assert "port to listen on" in out.stdout


def test_help_answers_before_gradio_is_imported():
    import subprocess
    import sys

    code = ("import runpy, sys\nsys.argv = ['app.py', '--help']\n"
            "try:\n    runpy.run_path('app.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('imported:', sorted({'gradio', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "imported: []" in out.stdout, out.stdout + out.stderr


def test_busy_port_is_one_clear_line():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = _app_py("--host", "127.0.0.1", "--port", str(port))
    assert out.returncode == 2
    assert out.stderr.strip() == f"port {port} is in use; pick another with --port"  # no traceback, no UI built


# ----------------------------------------------------------------------------- a public deployment

@pytest.fixture(scope="module")
def public_server():
    """The app as deployed on a public Space with persistent storage: results in a shared folder outside
    the working and temp dirs (like /data), visitors' model paths off. One extra server start."""
    import shutil
    import tempfile

    from app_server import AppServer

    base = Path("/var/tmp")
    if not (base.is_dir() and os.access(base, os.W_OK)) or base.resolve() == Path(tempfile.gettempdir()).resolve():
        pytest.skip("needs a writable /var/tmp outside the system temp dir")
    workdir = Path(tempfile.mkdtemp(prefix="ilvr-app-test-", dir=base))
    shared = workdir / "outputs"  # AppServer points ILVR_APP_OUTPUTS here
    (shared / "my_notes").mkdir(parents=True)
    (shared / "my_notes" / "secret.txt").write_text("private")
    old = time.time() - 7 * 3600
    os.utime(shared / "my_notes", (old, old))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ILVR_ALLOW_MODEL_PATHS", "0")
        srv = AppServer(workdir)
    srv.shared = shared
    yield srv
    srv.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def test_results_outside_the_working_and_temp_dirs_are_served(public_server):
    client = Client(public_server.url, verbose=False)
    grid, gallery, files, info = translate(client, handle_file(EX / "twemoji_cat_face.png"))
    assert "Done in" in info and len(files) == 2
    runs = [d for d in public_server.shared.iterdir() if d.name != "my_notes"]
    assert len(runs) == 1 and (runs[0] / ".ilvr-studio-run").is_file()
    assert (public_server.shared / "my_notes" / "secret.txt").read_text() == "private"  # old, not the app's: kept
    assert "also holds my_notes" in public_server.log()


def test_other_files_in_the_results_folder_are_not_downloadable(public_server):
    import urllib.error
    import urllib.request

    secret = public_server.shared / "my_notes" / "secret.txt"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{public_server.url}gradio_api/file={secret}")
    assert err.value.code == 403


def test_model_paths_switched_off(public_server):
    import urllib.request

    client = Client(public_server.url, verbose=False)
    messages = []
    for path in ("/root", "/etc/passwd", "/no/such/checkpoint.pt"):
        with pytest.raises(AppError, match="only loads the models in the list") as err:
            client.predict(MODEL, path, api_name="/load_model")
        messages.append(str(err.value))
    assert len(set(messages)) == 1  # nothing tells which paths exist
    with pytest.raises(AppError, match="only loads the models in the list"):
        translate(client, handle_file(EX / "twemoji_cat_face.png"), path="/root")
    assert "64 px" in client.predict(MODEL, "", api_name="/load_model")[0]  # the list's models still load
    with urllib.request.urlopen(public_server.url + "config") as r:
        config = json.load(r)
    box = next(c for c in config["components"] if c["props"].get("elem_id") == "model-path")
    assert box["props"]["visible"] is False


def test_user_errors_leave_no_traceback_in_the_log(public_server):
    client = Client(public_server.url, verbose=False)
    with pytest.raises(AppError, match="valid N"):
        translate(client, handle_file(EX / "twemoji_cat_face.png"), n=7)
    with pytest.raises(AppError, match="only loads the models in the list"):
        client.predict(MODEL, "/root", api_name="/load_model")
    assert "Traceback" not in public_server.log()
