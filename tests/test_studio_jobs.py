"""ilvr.app_support without a server: parsing, masks, the model cache, jobs, result files."""
from __future__ import annotations

import os
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ilvr import app_support as S  # noqa: E402
from ilvr.images import ImageError, read_settings  # noqa: E402
from ilvr.loading import ModelLoadError  # noqa: E402
from ilvr.sampler import Cancelled  # noqa: E402


# ----------------------------------------------------------------------------- parsing

def test_parse_factors_and_errors():
    assert S.parse_factors("2, 4 8;16", 64) == [2, 4, 8, 16]
    assert S.parse_factors([4, "4", 8.0], 64) == [4, 8]
    with pytest.raises(ValueError, match="valid N: 1, 2, 4, 8, 16, 32, 64"):
        S.parse_factors("3", 64)
    with pytest.raises(ValueError, match="whole number"):
        S.parse_factors("two", 64)
    with pytest.raises(ValueError, match="at least one"):
        S.parse_factors(" , ", 64)
    with pytest.raises(ValueError, match="at most 8"):
        S.parse_factors("1,2,4,8,16,32,64,1024,2048", 4096)


def test_parse_single_values():
    assert S.parse_factor("8", 64) == 8 and S.parse_factor(8.0, 64) == 8
    for bad in (True, 2.5, "", None, "8px"):
        with pytest.raises(ValueError):
            S.parse_factor(bad, 64)
    assert S.parse_stop(None) == 0 and S.parse_stop(200.0) == 200
    with pytest.raises(ValueError, match="between 0 and 1000"):
        S.parse_stop(1001)
    assert S.parse_stops("0, 500 1000") == [0, 500, 1000]
    assert S.parse_samples(3.0) == 3
    for bad in (0, 9, "x"):
        with pytest.raises(ValueError):
            S.parse_samples(bad)


def test_seeds():
    assert S.make_seeds(5, 3) == [5, 6, 7]
    random = S.make_seeds(-1, 2)
    assert random[1] == random[0] + 1 and random[0] >= 0
    with pytest.raises(ValueError):
        S.make_seeds(S.MAX_SEED, 2)


def test_model_source():
    assert S.model_source("emoji64", "") == "emoji64"
    assert S.model_source("emoji64", "  '/tmp/x.pt' ") == "/tmp/x.pt"
    assert S.model_source(None, None) == "emoji64"


def test_model_paths_can_be_switched_off_and_are_off_on_spaces():
    assert S.model_paths_allowed({}) and S.model_paths_allowed({"ILVR_ALLOW_MODEL_PATHS": "1", "SYSTEM": "spaces"})
    assert not S.model_paths_allowed({"SYSTEM": "spaces"})
    for off in ("0", "false", "No", " off ", "disable"):  # a typo must not open the box on a public Space
        assert not S.model_paths_allowed({"ILVR_ALLOW_MODEL_PATHS": off, "SYSTEM": "spaces"})
    assert S.model_paths_allowed({"ILVR_ALLOW_MODEL_PATHS": "Yes", "SYSTEM": "spaces"})
    assert S.model_source("emoji64", "", allow_paths=False) == "emoji64"
    assert S.model_source("cat-256 (Google DDPM, EMA)", None, allow_paths=False) == "cat-256 (Google DDPM, EMA)"
    for choice, path in [("emoji64", "/root"), ("emoji64", "/etc/passwd"), ("emoji64", "/no/such.pt"),
                         ("some-user/any-repo", "")]:  # the same answer whether the path exists or not
        with pytest.raises(ModelLoadError, match=r"only loads the models in the list \(ILVR_ALLOW_MODEL_PATHS"):
            S.model_source(choice, path, allow_paths=False)


# ----------------------------------------------------------------------------- images and masks

def test_reference_image_errors(tmp_path):
    with pytest.raises(ImageError, match="upload a reference image first"):
        S.reference_image(None)
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(ImageError):
        S.reference_image(str(tmp_path / "x.png"))
    rgba = np.zeros((8, 8, 4), np.uint8)
    assert S.reference_image(rgba).mode == "RGB"


def test_sketch_image_empty_and_painted():
    blank = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert S.sketch_image(None) is None
    assert S.sketch_image({"background": None, "layers": [blank], "composite": blank}) is None
    painted = blank.copy()
    painted.paste((255, 0, 0, 255), (8, 8, 24, 24))
    img = S.sketch_image({"background": None, "layers": [painted], "composite": painted})
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((16, 16)) == (255, 0, 0)


def test_scribble_mask_from_layers_and_from_difference():
    bg = Image.new("RGB", (128, 96), (200, 180, 40))  # not square: cropped like the reference
    layer = Image.new("RGBA", (128, 96), (0, 0, 0, 0))
    layer.paste((0, 0, 0, 255), (60, 40, 70, 50))
    comp = Image.alpha_composite(bg.convert("RGBA"), layer)
    mask, cov = S.scribble_mask({"background": bg, "layers": [layer], "composite": comp}, 32, dilate=0)
    assert mask.shape == (32, 32) and 0 < cov < 0.1
    ys, xs = torch.nonzero(mask, as_tuple=True)
    # the square crop keeps x in [16, 112); the stroke at x 60..70, y 40..50 lands near the centre
    assert 12 <= xs.min() and xs.max() <= 19 and 12 <= ys.min() and ys.max() <= 18
    # without layers, the difference between composite and background finds the same strokes
    mask2, _ = S.scribble_mask({"background": bg, "layers": [], "composite": comp}, 32, dilate=0)
    assert torch.equal(mask, mask2)
    grown, cov2 = S.scribble_mask({"background": bg, "layers": [layer], "composite": comp}, 32, dilate=2)
    assert cov2 > cov and bool((grown >= mask).all())
    none, zero = S.scribble_mask({"background": bg, "layers": [], "composite": bg}, 32)
    assert none is None and zero == 0.0


def test_text_bar_and_times():
    assert S.text_bar(0, 10).count("█") == 0 and S.text_bar(10, 10).endswith("100 %")
    assert S.estimate_text(0.2) == "a second or two"
    assert S.estimate_text(75) == "about 1 min 15 s"


# ----------------------------------------------------------------------------- cache and jobs

def test_model_cache_reuses_and_reloads(tiny_checkpoint):
    calls = []

    def loader(source, device, dtype):
        from ilvr.loading import load_model

        calls.append(source)
        return load_model(source, device=device, dtype=dtype)

    cache = S.ModelCache(max_models=1, device="cpu", loader=loader)
    a = cache.get(str(tiny_checkpoint))
    assert cache.get(str(tiny_checkpoint)) is a and len(calls) == 1
    weights = tiny_checkpoint / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # re-exported checkpoint
    assert cache.get(str(tiny_checkpoint)) is not a and len(calls) == 2
    assert cache.seconds_per_image_step(a) > 0


def test_model_cache_remembers_failures_briefly():
    calls = []

    def loader(source, device, dtype):
        calls.append(source)
        raise ModelLoadError("offline")

    cache = S.ModelCache(loader=loader, retry_after_s=60)
    for _ in range(3):
        with pytest.raises(ModelLoadError, match="offline"):
            cache.get("someone/some-model")
    assert calls == ["someone/some-model"]
    with pytest.raises(ModelLoadError, match="pick a model"):
        cache.get("  ")


@pytest.fixture
def tiny_model(tiny_checkpoint):
    from ilvr.loading import load_model

    return load_model(str(tiny_checkpoint), device="cpu")


def test_generation_job_runs_streams_and_saves(tiny_model, tmp_path):
    ref = Image.new("RGB", (40, 40), (250, 200, 40))
    job = S.generation_job(tiny_model, ref, S.GENERATION_MODES[0], "2, 8", 4, "0", 2, "4", 0, "cubic", "ddpm", 3)
    assert [r.n_factor for r in job.rows] == [2, 8] and job.seeds == [3, 4]
    runner = S.run_job(tiny_model, job, poll_s=0.001)
    updates = []
    while True:
        try:
            updates.append(next(runner))
        except StopIteration as done:
            result = done.value
            break
    assert all(0 < u.done <= u.total == 8 for u in updates)
    assert [len(images) for _, images in result.rows] == [2, 2]
    saved = S.save_result(result, tiny_model, root=tmp_path)
    assert len(saved.gallery) == 4 and len(saved.files) == 5
    first = read_settings(saved.gallery[0][0])
    assert (first["N"], first["seed"], first["steps"], first["task"]) == (2, 3, "4", "generation")
    assert read_settings(saved.grid_path)["seeds"] == [3, 4]
    assert "seeds **3, 4**" in saved.summary
    assert S.is_run_folder(saved.grid_path.parent)  # named and marked as the app's: prunable later


def test_range_sweep_rows(tiny_model):
    job = S.generation_job(tiny_model, Image.new("RGB", (8, 8)), S.GENERATION_MODES[1], "", 4, "0, 600", 1, "4", 0,
                           "cubic", "ddpm", 0)
    assert [(r.n_factor, r.stop_at, r.label) for r in job.rows] == [(4, 0, "1000->0"), (4, 600, "1000->600")]


def test_job_builders_reject_bad_input(tiny_model):
    with pytest.raises(ImageError, match="upload a reference image"):
        S.translation_job(tiny_model, None, 8, 1, "4", 0, "cubic", "ddpm", 0)
    with pytest.raises(ValueError, match="valid N"):
        S.translation_job(tiny_model, Image.new("RGB", (8, 8)), 5, 1, "4", 0, "cubic", "ddpm", 0)
    with pytest.raises(ValueError, match="steps must be"):
        S.translation_job(tiny_model, Image.new("RGB", (8, 8)), 4, 1, "lots", 0, "cubic", "ddpm", 0)
    with pytest.raises(ValueError, match="unknown filter"):
        S.translation_job(tiny_model, Image.new("RGB", (8, 8)), 4, 1, "4", 0, "nearest", "ddpm", 0)
    with pytest.raises(ImageError, match="sketch pad is empty"):
        S.paint_job(tiny_model, S.PAINT_SOURCES[1], None, None, 4, 1, "4", 0, "cubic", "ddpm", 0)
    with pytest.raises(ImageError, match="upload an image to edit"):
        S.scribble_job(tiny_model, None, 2, True, 1, "4", 200, "cubic", "ddpm", 0)


def test_stop_step_that_conditions_nothing_is_warned_about(tiny_model):
    img = Image.new("RGB", (8, 8))
    job = S.translation_job(tiny_model, img, 4, 1, "4", 1000, "cubic", "ddpm", 0)
    assert "ignores the reference" in " ".join(S.job_warnings(job, tiny_model))
    assert S.job_warnings(S.translation_job(tiny_model, img, 4, 1, "4", 990, "cubic", "ddpm", 0), tiny_model) == []
    sweep = S.generation_job(tiny_model, img, S.GENERATION_MODES[1], "", 4, "0, 1000", 1, "4", 0, "cubic", "ddpm", 0)
    assert "row 1000->1000 ignores" in " ".join(S.job_warnings(sweep, tiny_model))


def test_scribble_job_without_strokes_warns(tiny_model):
    img = Image.new("RGB", (32, 32), (10, 120, 200))
    job, warnings = S.scribble_job(tiny_model, {"background": img, "layers": [], "composite": img}, 2, True, 1, "4",
                                   200, "cubic", "ddpm", 0)
    assert job.mask is None and not job.keep_outside and warnings


def test_run_job_stops_when_asked(tiny_model):
    job = S.translation_job(tiny_model, Image.new("RGB", (8, 8)), 4, 1, "1000", 0, "cubic", "ddpm", 0)
    stop = threading.Event()
    runner = S.run_job(tiny_model, job, stop, poll_s=0.01)
    next(runner)  # at least one step done
    stop.set()
    with pytest.raises(Cancelled):
        for _ in runner:
            pass


def test_stop_flags():
    flags = S.StopFlags()
    a, b = flags.register("s1"), flags.register("s2")
    assert flags.cancel("s1") == 1 and a.is_set() and not b.is_set()
    flags.release("s1", a)
    assert flags.cancel("s1") == 0


def test_grayscale_model_runs_every_job_kind(tmp_path):
    """1-channel models (MNIST-style) take colour references as their luma and give grayscale PNGs."""
    from conftest import tiny_unet

    from ilvr.loading import load_model
    from ilvr.schedule import DiffusionConfig
    from ilvr.train import export_model

    folder = export_model(tiny_unet(in_channels=1, out_channels=1), DiffusionConfig(), tmp_path / "gray").parent
    model = load_model(str(folder), device="cpu")
    photo = Image.new("RGB", (32, 32), (200, 40, 40))
    stroke = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    stroke.paste((0, 0, 255, 255), (4, 4, 12, 12))
    editor = {"background": photo, "layers": [stroke], "composite": photo}
    job, _ = S.scribble_job(model, editor, 1, True, 1, "4", 0, "cubic", "ddpm", 0)  # N=1: returns the input
    assert job.reference.shape == (1, 32, 32) and job.mask is not None
    runner = S.run_job(model, job, poll_s=0.001)
    while True:
        try:
            next(runner)
        except StopIteration as done:
            result = done.value
            break
    saved = S.save_result(result, model, root=tmp_path / "out")
    out = Image.open(saved.gallery[0][0])
    assert out.mode == "L"
    luma = np.asarray(photo.convert("L"), np.int16)
    assert np.abs(np.asarray(out, np.int16) - luma).max() <= 1  # everything pinned or N=1: the input's luma
    assert Image.open(saved.grid_path).size[0] > 32


def test_class_conditional_model_is_refused_before_sampling():
    from conftest import tiny_unet

    from ilvr.model import DiffusionModel
    from ilvr.schedule import DiffusionConfig

    model = DiffusionModel(unet=tiny_unet(num_classes=10), diffusion=DiffusionConfig(), name="imagenet")
    with pytest.raises(ValueError, match="class-conditional"):
        S.translation_job(model, Image.new("RGB", (8, 8)), 4, 1, "4", 0, "cubic", "ddpm", 0)


def test_status_line_says_what_a_guided_diffusion_file_left_to_assume(tmp_path, tiny_model):
    from conftest import tiny_unet

    from ilvr.loading import load_model

    torch.save(tiny_unet().state_dict(), tmp_path / "mine.pt")
    adm = load_model(str(tmp_path / "mine.pt"), device="cpu", cpu_backend="torch")
    presets = {"translation": 4, "paint": 8, "scribble": 2}
    assert "`beta_schedule=linear`" in S.model_markdown(adm, presets)
    assert "python -m ilvr convert" in S.model_markdown(adm, presets)
    assert "convert" not in S.model_markdown(tiny_model, presets)  # our format records everything


# ----------------------------------------------------------------------------- the outputs folder

def _age(path, hours: float) -> None:
    old = time.time() - hours * 3600
    os.utime(path, (old, old))


def test_prune_deletes_only_the_apps_old_result_folders(tmp_path):
    """The outputs folder may be shared (a Space's /data): only marked run folders are ever deleted."""
    def run_folder(name: str, marked: bool = True):
        d = tmp_path / name
        d.mkdir()
        (d / "translation_grid.png").write_bytes(b"png")
        if marked:
            (d / S.RUN_MARKER).write_text("")
        return d

    old_run = run_folder("20240101-120000-0123abcd")
    young_run = run_folder("20991231-235959-89abcdef")
    unmarked = run_folder("20240101-120001-0123abce", marked=False)  # a user's folder that happens to match
    notes = tmp_path / "my_notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    hf = tmp_path / ".huggingface"
    (hf / "hub").mkdir(parents=True)
    (hf / "token").write_text("hf_x")
    loose = tmp_path / "20240101-120002-0123abcf"  # a file, not a folder
    loose.write_text("x")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / S.RUN_MARKER).write_text("")
    link = tmp_path / "20240101-120003-0123abd0"
    link.symlink_to(target, target_is_directory=True)
    for p in (old_run, unmarked, notes, hf, loose, target):
        _age(p, 7)
    os.utime(link, (time.time() - 7 * 3600,) * 2, follow_symlinks=False)

    S.prune_outputs(tmp_path)
    assert not old_run.exists()
    assert young_run.is_dir() and unmarked.is_dir() and loose.is_file() and link.is_symlink()
    assert (notes / "todo.txt").read_text() == "keep me" and (hf / "token").is_file() and target.is_dir()
    assert S.foreign_entries(tmp_path) == sorted([notes, hf, target, unmarked, loose, link])


def test_unwritable_outputs_fall_back_to_a_temp_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert S.resolve_output_root({"ILVR_APP_OUTPUTS": str(tmp_path / "ok")}) == (tmp_path / "ok", None)
    assert (tmp_path / "ok").is_dir() and not list((tmp_path / "ok").iterdir())  # the write check cleans up
    bad = blocker / "outputs"  # cannot be made (and works the same when the tests run as root)
    folder, warning = S.resolve_output_root({"ILVR_APP_OUTPUTS": str(bad)})
    assert folder is not None and folder != bad and S.writable_folder(folder)
    assert f"ILVR_APP_OUTPUTS={bad}" in warning and str(folder) in warning
    folder.rmdir()

    def nowhere(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(S.tempfile, "mkdtemp", nowhere)
    folder, warning = S.resolve_output_root({"ILVR_APP_OUTPUTS": str(bad)})
    assert folder is None and "every run will fail until ILVR_APP_OUTPUTS names a writable folder" in warning
    monkeypatch.setattr(S.tempfile, "gettempdir", lambda: str(bad))  # TMPDIR read-only, ILVR_APP_OUTPUTS unset
    folder, warning = S.resolve_output_root({})
    assert folder is None and "TMPDIR" in warning
