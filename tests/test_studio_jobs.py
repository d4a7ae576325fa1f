"""studio.jobs and studio.tasks: the four tabs' job builders, running a job with streamed previews and
Cancel, and saving its results (studio.outputs) with the summary and status text (studio.status)."""
from __future__ import annotations

import os
import threading

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ilvr.images import ImageError, read_settings  # noqa: E402
from ilvr.sampler import Cancelled  # noqa: E402
from studio import jobs as J  # noqa: E402
from studio import outputs as O  # noqa: E402
from studio import status  # noqa: E402
from studio import tasks as T  # noqa: E402


@pytest.fixture
def tiny_model(tiny_checkpoint):
    from ilvr.loading import load_model

    return load_model(str(tiny_checkpoint), device="cpu")


def test_generation_job_runs_streams_and_saves(tiny_model, tmp_path):
    ref = Image.new("RGB", (40, 40), (250, 200, 40))
    job = T.generation_job(tiny_model, ref, T.GENERATION_MODES[0], "2, 8", 4, "0", 2, "4", 0, "cubic", "ddpm", 3)
    assert [r.n_factor for r in job.rows] == [2, 8] and job.seeds == [3, 4]
    runner = J.run_job(tiny_model, job, poll_s=0.001)
    updates = []
    while True:
        try:
            updates.append(next(runner))
        except StopIteration as done:
            result = done.value
            break
    assert all(0 < u.done <= u.total == 8 for u in updates)
    assert [len(images) for _, images in result.rows] == [2, 2]
    saved = O.save_result(result, tiny_model, root=tmp_path)
    assert len(saved.gallery) == 4 and len(saved.files) == 5
    first = read_settings(saved.gallery[0][0])
    assert (first["N"], first["seed"], first["steps"], first["task"]) == (2, 3, "4", "generation")
    assert read_settings(saved.grid_path)["seeds"] == [3, 4]
    assert "seeds **3, 4**" in saved.summary
    assert O.is_run_folder(saved.grid_path.parent)  # named and marked as the app's: prunable later


def test_range_sweep_rows(tiny_model):
    job = T.generation_job(tiny_model, Image.new("RGB", (8, 8)), T.GENERATION_MODES[1], "", 4, "0, 600", 1, "4", 0,
                           "cubic", "ddpm", 0)
    assert [(r.n_factor, r.stop_at, r.label) for r in job.rows] == [(4, 0, "1000->0"), (4, 600, "1000->600")]


def test_job_builders_reject_bad_input(tiny_model):
    with pytest.raises(ImageError, match="upload a reference image"):
        T.translation_job(tiny_model, None, 8, 1, "4", 0, "cubic", "ddpm", 0)
    with pytest.raises(ValueError, match="valid N"):
        T.translation_job(tiny_model, Image.new("RGB", (8, 8)), 5, 1, "4", 0, "cubic", "ddpm", 0)
    with pytest.raises(ValueError, match="steps must be"):
        T.translation_job(tiny_model, Image.new("RGB", (8, 8)), 4, 1, "lots", 0, "cubic", "ddpm", 0)
    with pytest.raises(ValueError, match="unknown filter"):
        T.translation_job(tiny_model, Image.new("RGB", (8, 8)), 4, 1, "4", 0, "nearest", "ddpm", 0)
    with pytest.raises(ImageError, match="sketch pad is empty"):
        T.paint_job(tiny_model, T.PAINT_SOURCES[1], None, None, 4, 1, "4", 0, "cubic", "ddpm", 0)
    with pytest.raises(ImageError, match="upload an image to edit"):
        T.scribble_job(tiny_model, None, 2, True, 1, "4", 200, "cubic", "ddpm", 0)


def test_stop_step_that_conditions_nothing_is_warned_about(tiny_model):
    img = Image.new("RGB", (8, 8))
    job = T.translation_job(tiny_model, img, 4, 1, "4", 1000, "cubic", "ddpm", 0)
    assert "ignores the reference" in " ".join(J.job_warnings(job, tiny_model))
    assert J.job_warnings(T.translation_job(tiny_model, img, 4, 1, "4", 990, "cubic", "ddpm", 0), tiny_model) == []
    sweep = T.generation_job(tiny_model, img, T.GENERATION_MODES[1], "", 4, "0, 1000", 1, "4", 0, "cubic", "ddpm", 0)
    assert "row 1000->1000 ignores" in " ".join(J.job_warnings(sweep, tiny_model))


def test_scribble_job_without_strokes_warns(tiny_model):
    img = Image.new("RGB", (32, 32), (10, 120, 200))
    job, warnings = T.scribble_job(tiny_model, {"background": img, "layers": [], "composite": img}, 2, True, 1, "4",
                                   200, "cubic", "ddpm", 0)
    assert job.mask is None and not job.keep_outside and warnings


def test_run_job_stops_when_asked(tiny_model):
    job = T.translation_job(tiny_model, Image.new("RGB", (8, 8)), 4, 1, "1000", 0, "cubic", "ddpm", 0)
    stop = threading.Event()
    runner = J.run_job(tiny_model, job, stop, poll_s=0.01)
    next(runner)  # at least one step done
    stop.set()
    with pytest.raises(Cancelled):
        for _ in runner:
            pass


def test_stop_flags():
    flags = J.StopFlags()
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
    job, _ = T.scribble_job(model, editor, 1, True, 1, "4", 0, "cubic", "ddpm", 0)  # N=1: returns the input
    assert job.reference.shape == (1, 32, 32) and job.mask is not None
    runner = J.run_job(model, job, poll_s=0.001)
    while True:
        try:
            next(runner)
        except StopIteration as done:
            result = done.value
            break
    saved = O.save_result(result, model, root=tmp_path / "out")
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
        T.translation_job(model, Image.new("RGB", (8, 8)), 4, 1, "4", 0, "cubic", "ddpm", 0)


def test_status_line_says_what_a_guided_diffusion_file_left_to_assume(tmp_path, tiny_model):
    from conftest import tiny_unet

    from ilvr.loading import load_model

    torch.save(tiny_unet().state_dict(), tmp_path / "mine.pt")
    adm = load_model(str(tmp_path / "mine.pt"), device="cpu", cpu_backend="torch")
    presets = {"translation": 4, "paint": 8, "scribble": 2}
    assert "`beta_schedule=linear`" in status.model_markdown(adm, presets)
    assert "python -m ilvr convert" in status.model_markdown(adm, presets)
    assert "convert" not in status.model_markdown(tiny_model, presets)  # our format records everything


def _finish(runner):
    updates = []
    while True:
        try:
            updates.append(next(runner))
        except StopIteration as done:
            return updates, done.value


def test_ddib_job_is_one_deterministic_image_with_its_own_settings(tiny_model, tmp_path):
    ref = Image.new("RGB", (32, 32), (40, 70, 190))
    job, warnings = T.ddib_job(tiny_model, tiny_model, ref, 3, "4", "cubic", "ddpm", 5)
    assert job.seeds == [0] and len(job.rows) == 1 and job.sampler == "ddim"
    assert warnings and "one image instead of 3" in warnings[0]
    assert job.steps_per_row(tiny_model) == 8  # inversion and sampling, 4 steps each
    updates, result = _finish(J.run_job(tiny_model, job, poll_s=0.001))
    assert all(0 < u.done <= u.total == 8 for u in updates)
    saved = O.save_result(result, tiny_model, root=tmp_path)
    assert len(saved.gallery) == 1 and len(saved.files) == 2
    s = read_settings(saved.gallery[0][0])
    assert (s["method"], s["source_model"], s["sampler"], s["task"]) == ("ddib", tiny_model.name, "ddim",
                                                                         "translation")
    assert not {"seed", "N", "filter", "stop_at"} & set(s)  # ILVR's settings; DDIB has none
    assert read_settings(saved.grid_path)["method"] == "ddib"
    assert "DDIB" in saved.summary and "seeds **" not in saved.summary
    again = _finish(J.run_job(tiny_model, T.ddib_job(tiny_model, tiny_model, ref, 1, "4", "cubic", "ddpm", 9)[0],
                              poll_s=0.001))[1]
    assert np.array_equal(np.asarray(result.rows[0][1][0]), np.asarray(again.rows[0][1][0]))  # no seed in it


def test_ddib_job_refuses_a_source_of_another_size(tiny_model, tmp_path):
    from ilvr.loading import load_model
    from ilvr.network import UNet, UNetConfig
    from ilvr.schedule import DiffusionConfig
    from ilvr.export import export_model

    cfg = UNetConfig(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=())
    export_model(UNet(cfg), DiffusionConfig(), tmp_path / "m16")
    other = load_model(str(tmp_path / "m16"), device="cpu")
    with pytest.raises(ValueError, match="pick a source model of 32 px"):
        T.ddib_job(tiny_model, other, Image.new("RGB", (8, 8)), 1, "4", "cubic", "ddpm", 0)


def test_a_loaded_model_brings_its_example_set_and_ddib_source():
    from studio.tasks import ddib_source_for, example_set

    assert example_set("digits-sevens32") == "digits" and example_set("emoji-faces-animals64") == "emoji"
    assert example_set("/my/own/model.pt") == "emoji"  # not in the registry: the default set
    assert ddib_source_for("digits-sevens32", 32) == "digits-all32"  # named by its entry
    assert ddib_source_for("digits-all32", 32) == "digits-sevens32"  # else the first other model of its size
    assert ddib_source_for("/my/own/model.pt", 48) is None
