"""ILVR Studio: a Gradio app for ILVR (Choi et al., ICCV 2021) on unconditional diffusion models.

Layout and wiring only: the sampling maths lives in ilvr/ (the engine), everything else the app needs
(model cache, input checks, scribble masks, jobs with streamed previews, result files, status text) in
studio/. The four tabs are rows of TABS, a table of TabSpec: read one to see how a tab is made.

    python app.py                 # http://127.0.0.1:7860, bundled 64 px emoji model, CPU is fine
    python app.py --share         # also a temporary public gradio.live link
    python app.py --host 0.0.0.0 --port 8080
"""
from __future__ import annotations

import argparse
import errno
import os
import socket
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, read before gradio and torch are imported: --help and a busy --port answer
    at once instead of after ~20 s of imports and UI building. Exits 2 on a busy or unusable port."""
    parser = argparse.ArgumentParser(description="ILVR Studio: the Gradio app")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="interface to listen on (0.0.0.0 for all; default 127.0.0.1 or $GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None,
                        help="port to listen on (default: $GRADIO_SERVER_PORT or 7860, else the next free one)")
    parser.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="sampling runs at once (default: 1 on CPU, 2 on a GPU)")
    parser.add_argument("--max-queue", type=int, default=16, help="runs allowed to wait in the queue")
    args = parser.parse_args(argv)
    if args.port is not None:
        problem = port_problem(args.host, args.port)
        if problem:
            print(problem, file=sys.stderr)
            sys.exit(2)
    return args


def port_problem(host: str, port: int) -> str | None:
    """Why host:port cannot be listened on (one line for the user), or None when it is free."""
    host = host.strip("[]")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Gradio does: TIME_WAIT is free
            s.bind((host, port))
    except OverflowError:
        return f"port {port} is not a valid port number (0-65535)"
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return f"port {port} is in use; pick another with --port"
        return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


if __name__ == "__main__":
    ARGS = parse_args()

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, NamedTuple  # noqa: E402

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from ilvr.filters import KERNELS  # noqa: E402
from ilvr.images import MAX_PIXELS  # noqa: E402
from ilvr.loading import ModelLoadError  # noqa: E402
from ilvr.registry import BUNDLED, BY_NAME, DEFAULT_MODEL, MODELS, SCRIBBLE_STOP_AT, generation_factors  # noqa: E402
from ilvr.sampler import Cancelled  # noqa: E402
from ilvr.validate import SAMPLERS  # noqa: E402
from studio.inputs import MAX_SAMPLES, reference_image  # noqa: E402
from studio.jobs import StopFlags, job_warnings, run_job  # noqa: E402
from studio.models import ModelCache, model_paths_allowed, model_source  # noqa: E402
from studio.outputs import OUTPUTS_ENV, foreign_entries, resolve_output_root, save_result  # noqa: E402
from studio.status import model_markdown, progress_markdown, run_header, slow_run_warning  # noqa: E402
from studio.tasks import (GENERATION_MODES, PAINT_SOURCES, factor_choices, generation_job, paint_job,  # noqa: E402
                          presets, scribble_job, translation_job)

try:  # ZeroGPU on Hugging Face Spaces; a no-op everywhere else
    import spaces

    gpu = spaces.GPU(duration=180)
except Exception:  # noqa: BLE001 - the package is optional
    def gpu(fn):
        return fn

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE / "examples"
CACHE = ModelCache()
STOPS = StopFlags()
ALLOW_MODEL_PATHS = model_paths_allowed()  # ILVR_ALLOW_MODEL_PATHS; off on Spaces unless set to 1
OUTPUTS, OUTPUTS_WARNING = resolve_output_root()  # checked once, at startup; None: nothing writable
DEFAULT_SIZE = BY_NAME[DEFAULT_MODEL].image_size
LONG_RUN_S = 15 * 60  # warn before runs estimated longer than this
# browser sessions whose state Gradio keeps (least recently used dropped first). Each holds a copy of the
# UI's config, about 0.75 MB here; Gradio's default of 10,000 would let a public Space grow to gigabytes.
# The app keeps no per-session state of its own (no gr.State), so a dropped session loses nothing.
SESSIONS_KEPT = 500
STEP_CHOICES = ["10", "25", "50", "100", "250", "500", "1000", "ddim50", "ddim100"]
BRUSH_COLORS = ["#202020", "#ffffff", "#e8283c", "#ff8c1a", "#ffcc33", "#5cb85c", "#2f7de1", "#9b59b6",
                "#f5a3c7", "#8b5a2b", "#f1c27d", "#c68642"]
CSS = """
.ilvr-explain {font-size: 0.95em; opacity: 0.9}
.ilvr-gallery img {image-rendering: pixelated}
.ilvr-gallery .grid-container {grid-template-columns: repeat(auto-fill, minmax(100px, 1fr)) !important}
"""
INTRO = (
    "# ILVR Studio\n"
    "Iterative Latent Variable Refinement ([Choi et al., ICCV 2021](https://arxiv.org/abs/2108.02938)) "
    "steers an unconditional diffusion model with a reference image, without any training: at every "
    "denoising step the sample's low frequencies (the image shrunk by a factor **N** and blown back up) "
    "are replaced by the reference's, noised to the same level. Small N copies the reference closely; "
    "large N keeps only its rough layout and colours, and the model invents the rest.")
FOOTER = ("Runs on a CUDA GPU when available (float16), else on Apple's MPS or the CPU (float32). "
          "One run at a time on CPU; further runs wait in the queue. "
          "Bundled model and examples: Noto Emoji (Apache-2.0); Twemoji examples CC-BY-4.0, "
          "Twitter, Inc. and other contributors (see examples/README.md).")


# ----------------------------------------------------------------------------- upload components
def user_error(message: str, title: str) -> gr.Error:
    """An expected mistake of the user's: shown in the page, not logged with a traceback."""
    return gr.Error(message, title=title, print_exception=False)


def friendly(component):
    """Make an image input turn unreadable uploads (not an image, corrupt, decompression bomb) into a
    clear gr.Error instead of a bare traceback. (Wrapping the instance, not subclassing: Gradio writes
    a .pyi stub next to any module that subclasses a component.)"""
    preprocess = component.preprocess

    def safe_preprocess(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Image.DecompressionBombError as e:
            raise user_error(f"The uploaded image is larger than {MAX_PIXELS // 1_000_000} megapixels. Shrink "
                             "it first: it is resized to the model's resolution anyway.", "Image too large") from e
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise user_error(f"The uploaded file is not an image this app can read ({type(e).__name__}). "
                             "Use a PNG, JPEG or WebP.", "Unreadable image") from e

    component.preprocess = safe_preprocess
    return component


# ----------------------------------------------------------------------------- handlers
def _message(e: Exception) -> str:
    """The exception's text as a sentence; a leading file name (``notes.txt: ...``) keeps its case."""
    text = str(e).strip() or type(e).__name__
    return text[0].upper() + text[1:] if text.split(" ", 1)[0].isalpha() else text


def check_upload(value) -> None:
    """Report an unreadable upload (a truncated or mislabelled file) when it arrives, not at Run."""
    if value:
        try:
            reference_image(value)
        except ValueError as e:  # ImageError is a ValueError
            gr.Warning(f"{_message(e)}. Upload a PNG, JPEG or WebP image.", title="Unreadable image")


def _model(choice: str, path: str):
    try:
        return CACHE.get(model_source(choice, path, ALLOW_MODEL_PATHS))
    except ModelLoadError as e:
        raise user_error(_message(e), "Model not loaded") from e


def load_model(choice: str, path: str):
    """Load (download on first use) the picked model; update the status and the N presets."""
    try:
        source = model_source(choice, path, ALLOW_MODEL_PATHS)
        if CACHE.cached(source) is None:
            hub = source not in BUNDLED and not Path(source).expanduser().exists()
            yield (f"Loading `{source}` …" + (" (first use downloads it from the Hugging Face Hub; "
                                              "this can take a few minutes)" if hub else ""),) + (gr.skip(),) * 5
        model = CACHE.get(source)
    except ModelLoadError as e:
        yield (f"**Not loaded:** {e}",) + (gr.skip(),) * 5
        raise user_error(_message(e), "Model not loaded") from e
    size = model.image_size
    p, choices = presets(size), factor_choices(size)
    yield (model_markdown(model, p),
           gr.update(value=", ".join(str(n) for n in generation_factors(size))),
           *(gr.update(choices=choices, value=p[spec.name]) for spec in TABS))  # the n_input of each tab


def path_cleared(choice: str, path: str):
    """Emptying the path box means the list's model again: reload the status (cached, so instant)."""
    if (path or "").strip():
        yield (gr.skip(),) * 6  # typing a path: it loads on Enter or the button
        return
    yield from load_model(choice, "")


def _stream(job_fn, choice: str, path: str, request: gr.Request | None, progress: gr.Progress):
    """Shared body of the four sampling events: build the job, stream previews, save the results."""
    if OUTPUTS is None:  # reported at startup too: refuse before sampling, not after it
        raise user_error(f"This server cannot save result files: set {OUTPUTS_ENV} to a writable folder.",
                         "Server misconfigured")  # its log says so once, at startup
    model = _model(choice, path)
    try:
        job, warnings = job_fn(model)
    except ValueError as e:  # ImageError is a ValueError
        raise user_error(_message(e), "Check the inputs") from e
    for w in warnings + job_warnings(job, model):
        gr.Warning(w)
    estimate = CACHE.seconds_per_image_step(model) * job.image_steps(model)
    if estimate > LONG_RUN_S:
        gr.Warning(slow_run_warning(model, estimate))
    header = run_header(job, model, estimate)
    # None, not gr.skip(), for the result outputs: in Gradio 6 every skip of an output left a copy of that
    # component in the session (about 0.15 MB per run, for as long as the session is kept)
    yield None, None, None, header
    session = _stop_key(request, job.task)
    stop = STOPS.register(session)
    runner = run_job(model, job, stop)
    try:
        while True:
            try:
                update = next(runner)
            except StopIteration as finished:
                result = finished.value
                break
            progress((update.done, update.total), desc=update.desc, unit="steps")
            yield update.preview, None, None, progress_markdown(header, update)
    except Cancelled:
        gr.Warning("Sampling cancelled.")
        yield None, None, None, "Cancelled."
        return
    except ValueError as e:
        raise user_error(_message(e), "Check the inputs") from e
    finally:
        runner.close()
        STOPS.release(session, stop)
    CACHE.record_speed(model, result.elapsed_s, job.image_steps(model))
    try:
        saved = save_result(result, model, OUTPUTS)
    except OSError as e:  # e.g. the disk filled up or the folder became read-only since startup
        raise gr.Error(f"The results could not be saved in {OUTPUTS}: {e.strerror or e}.",
                       title="Not saved") from e
    # the saved file, not the image: its download keeps the PNG's settings and its name
    yield str(saved.grid_path), saved.gallery, saved.files, saved.summary


# The four endpoints. Their parameters are the API's (gradio_client callers pass them in this order):
# the model picker's two values, the tab's own inputs (TabSpec.inputs), then the Advanced settings.
@gpu
def run_generation(choice, path, image, mode, factors, range_n, stops, samples, steps, stop_at, kernel, sampler,
                   seed, request: gr.Request = None, progress=gr.Progress()):
    """N-factor generation: a grid with one row per N (paper Fig. 4) or per conditioning range (Fig. 5)."""
    yield from _stream(lambda m: (generation_job(m, image, mode, factors, range_n, stops, samples, steps,
                                                 stop_at, kernel, sampler, seed), []),
                       choice, path, request, progress)


@gpu
def run_translation(choice, path, image, n, samples, steps, stop_at, kernel, sampler, seed,
                    request: gr.Request = None, progress=gr.Progress()):
    """Domain translation: samples of the model's domain that share the reference's coarse structure."""
    yield from _stream(lambda m: (translation_job(m, image, n, samples, steps, stop_at, kernel, sampler, seed), []),
                       choice, path, request, progress)


@gpu
def run_paint(choice, path, source, image, sketch, n, samples, steps, stop_at, kernel, sampler, seed,
              request: gr.Request = None, progress=gr.Progress()):
    """Paint-to-image: a painting or clip-art (uploaded or sketched) turned into the model's domain."""
    yield from _stream(lambda m: (paint_job(m, source, image, sketch, n, samples, steps, stop_at, kernel,
                                            sampler, seed), []),
                       choice, path, request, progress)


@gpu
def run_scribble(choice, path, editor, n, keep_unedited, samples, steps, stop_at, kernel, sampler, seed,
                 request: gr.Request = None, progress=gr.Progress()):
    """Scribble editing: colour strokes on an image become realistic edits (ILVR on steps T -> stop)."""
    yield from _stream(lambda m: scribble_job(m, editor, n, keep_unedited, samples, steps, stop_at, kernel,
                                              sampler, seed),
                       choice, path, request, progress)


def _stop_key(request: gr.Request | None, task: str) -> str | None:
    return f"{request.session_hash}:{task}" if request is not None and request.session_hash else None


def canceller(task: str):
    """A Cancel handler for one tab: stops this browser session's sampler of that tab (the queue
    also drops the tab's pending runs, through the event's `cancels`) and says so in the tab's result
    box: the cancelled run itself can no longer update the page."""
    def cancel(request: gr.Request):
        if STOPS.cancel(_stop_key(request, task)):
            return "**Cancelled.** The run was stopped; nothing from it was saved."
        return gr.skip()  # nothing was running: keep the last result's summary
    return cancel


# ----------------------------------------------------------------------------- building blocks of a tab
class Advanced(NamedTuple):
    """The Advanced accordion's widgets, in the order of the run_* parameters."""

    samples: gr.Slider
    steps: gr.Dropdown
    stop: gr.Slider
    kernel: gr.Dropdown
    sampler: gr.Radio
    seed: gr.Number


def advanced(prefix: str, samples: int, stop_at: int = 0, samples_label: str = "Number of samples",
             stop_info: str = "") -> Advanced:
    """The Advanced accordion shared by the tabs: steps, stop step, filter, sampler, seed, samples."""
    with gr.Accordion("Advanced settings", open=False, elem_id=f"{prefix}-advanced"):
        with gr.Row():
            steps = gr.Dropdown(STEP_CHOICES, value="250", allow_custom_value=True, label="Steps",
                                info="Respaced sampling steps (250 = the default, good quality; 1000 = as in the "
                                     "paper's figures; 25-50 = fast preview; 'ddim50' = 50 steps spaced as in "
                                     "DDIM's paper, for the DDIM sampler below)",
                                elem_id=f"{prefix}-steps")
            stop = gr.Slider(0, 1000, value=stop_at, step=10, label="Stop step",
                             info=stop_info or "Condition on the reference only from step 1000 down to this "
                                               "step; later steps run free (0 = every step)",
                             elem_id=f"{prefix}-stop")
        with gr.Row():
            kernel = gr.Dropdown(list(KERNELS), value="cubic", label="Filter (φ_N)",
                                 info="resize-right kernel of the low-pass: down by N, back up")
            sampler = gr.Radio(list(SAMPLERS), value="ddpm", label="Sampler")
        with gr.Row():
            seed = gr.Number(value=0, precision=0, label="Seed", info="sample k uses seed + k; -1 = random",
                             elem_id=f"{prefix}-seed")
            count = gr.Slider(1, MAX_SAMPLES, value=samples, step=1, label=samples_label,
                              elem_id=f"{prefix}-samples")
    return Advanced(count, steps, stop, kernel, sampler, seed)


def debounce_js(button_id: str, ms: int = 1500) -> str:
    """Browser-side: disable the run button for a moment after a click. Gradio's trigger_mode="once"
    misses a fast double click, which queued the same run twice (twice the wait on a CPU Space). The
    inputs pass through unchanged, and the button comes back even if the run fails or is cancelled."""
    return (f"(...args) => {{ const b = document.getElementById('{button_id}'); "
            f"if (b) {{ b.disabled = true; setTimeout(() => {{ b.disabled = false; }}, {ms}); }} return args; }}")


def run_buttons(prefix: str, label: str):
    """The run and cancel buttons under a tab's settings (#PREFIX-run, #PREFIX-cancel)."""
    with gr.Row():
        run = gr.Button(label, variant="primary", elem_id=f"{prefix}-run")
        cancel = gr.Button("Cancel", variant="stop", elem_id=f"{prefix}-cancel")
    return run, cancel


def result_area(prefix: str, label: str):
    """Result area: status (progress, then seeds and settings), the labelled grid (live preview of the
    predicted x0 while sampling), the samples, and the PNG files. Returned as [grid, gallery, files, info],
    the order of the run_* outputs."""
    info = gr.Markdown(f"Results, seeds and settings appear here. {label}; while sampling, the grid previews "
                       "the predicted x₀.", elem_id=f"{prefix}-info", container=True, padding=True, min_height=56)
    # no labels drawn over the images: the grid has its own row labels, the gallery its captions
    grid = gr.Image(label=label, show_label=False, type="pil", format="png", interactive=False, height=520,
                    elem_id=f"{prefix}-grid")
    gallery = gr.Gallery(label="Samples (PNG with settings embedded)", show_label=False, columns=6, height=260,
                         format="png", elem_classes="ilvr-gallery", object_fit="contain", elem_id=f"{prefix}-gallery")
    files = gr.File(label="Download PNGs (seed and settings in each file's ilvr text chunk)",
                    file_count="multiple", interactive=False, height=140, elem_id=f"{prefix}-files")
    return [grid, gallery, files, info]


def example_path(name: str) -> str:
    return str(EXAMPLES / name)


def scribble_example(name: str) -> dict:
    return {"background": example_path(f"{name}_background.png"), "layers": [example_path(f"{name}_layer.png")],
            "composite": example_path(f"{name}_composite.png")}


def reference_upload(label: str, elem_id: str):
    return friendly(gr.Image(label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"],
                             height=260, elem_id=elem_id))


def n_dropdown(choices: list[int], value: int):
    return gr.Dropdown(choices, value=value, allow_custom_value=True, label="N",
                       info="low-pass factor; must divide the image size")


# ----------------------------------------------------------------------------- each tab's own inputs
# A tab's layout function makes the widgets above its Advanced settings and returns them by name: the
# run inputs (TabSpec.inputs) and anything its wiring needs. Its wiring function (optional) connects them.

def generation_layout(p: dict[str, int], choices: list[int]) -> dict[str, Any]:
    widgets = dict(image=reference_upload("Reference", "gen-image"),
                   mode=gr.Radio(list(GENERATION_MODES), value=GENERATION_MODES[0], label="Grid rows"),
                   factors=gr.Textbox(", ".join(str(n) for n in generation_factors(DEFAULT_SIZE)),
                                      label="N values (one row each)",
                                      info="divisors of the model's image size, comma-separated",
                                      elem_id="gen-factors"))
    with gr.Row(visible=False) as widgets["range_row"]:
        widgets["range_n"] = gr.Dropdown(choices, value=p["generation"], allow_custom_value=True,
                                         label="N for the range sweep")
        widgets["stops"] = gr.Textbox("0, 250, 500, 750", label="Stop steps (one row each)",
                                      info="row s conditions on steps 1000→s")
    return widgets


def generation_wiring(tab: Tab) -> None:
    """An N sweep shows the N values and one stop step; a range sweep its N and stop steps instead."""
    w = tab.widgets
    w["mode"].change(lambda m: (gr.update(visible=m == GENERATION_MODES[0]),
                                gr.update(visible=m != GENERATION_MODES[0]),
                                gr.update(visible=m == GENERATION_MODES[0])),  # the sweep sets stops per row
                     w["mode"], [w["factors"], w["range_row"], tab.advanced.stop], queue=False,
                     api_visibility="private")


def translation_layout(p: dict[str, int], choices: list[int]) -> dict[str, Any]:
    return dict(image=reference_upload("Reference (any domain)", "tr-image"),
                n=n_dropdown(choices, p["translation"]))


def paint_layout(p: dict[str, int], choices: list[int]) -> dict[str, Any]:
    widgets = dict(source=gr.Radio(list(PAINT_SOURCES), value=PAINT_SOURCES[0], label="Reference from",
                                   elem_id="paint-source"))
    with gr.Tabs():
        with gr.Tab("Upload a painting"):
            widgets["image"] = reference_upload("Painting / clip-art", "paint-image")
        with gr.Tab("Sketch pad"):
            widgets["sketch"] = friendly(gr.Sketchpad(
                label="Paint here (white background)", type="pil", image_mode="RGBA", canvas_size=(256, 256),
                height=340, layers=False, brush=gr.Brush(colors=BRUSH_COLORS, default_size=18,
                                                         default_color="#ffcc33"), elem_id="paint-pad"))
    widgets["n"] = n_dropdown(choices, p["paint"])
    return widgets


def paint_wiring(tab: Tab) -> None:
    """The source follows what the user did last: uploaded a painting or painted on the pad."""
    w = tab.widgets
    w["image"].change(lambda v: PAINT_SOURCES[0] if v else gr.skip(), w["image"], w["source"], queue=False,
                      api_visibility="private")
    w["sketch"].input(lambda: PAINT_SOURCES[1], None, w["source"], queue=False, api_visibility="private")


def scribble_layout(p: dict[str, int], choices: list[int]) -> dict[str, Any]:
    widgets = dict(editor=friendly(gr.ImageEditor(
        label="Image to edit: upload, then draw with the brush", type="pil", image_mode="RGBA",
        canvas_size=(256, 256), fixed_canvas=True, height=360, transforms=(), layers=False,
        sources=["upload", "clipboard"], brush=gr.Brush(colors=BRUSH_COLORS, default_size=16, default_color="#202020"),
        elem_id="sc-editor")))
    with gr.Row():
        widgets["n"] = n_dropdown(choices, p["scribble"])
        widgets["keep_unedited"] = gr.Checkbox(False, label="Keep unedited region",
                                               info="pin everything away from the strokes to the input",
                                               elem_id="sc-keep")
    return widgets


# ----------------------------------------------------------------------------- the table of tabs
@dataclass(frozen=True)
class TabSpec:
    """Everything that differs between the four tabs; build_tab and wire_tab do the rest."""

    name: str  # the tab's id, its job's task, its key in the N presets (ilvr.registry.PAPER_PRESETS)
    title: str
    prefix: str  # of the elem_ids: #PREFIX-run, #PREFIX-info, #PREFIX-steps ... (the browser test uses them)
    explain: str
    layout: Callable[[dict[str, int], list[int]], dict[str, Any]]
    inputs: tuple[str, ...]  # the layout's widgets passed to `run`, after the model picker's two values
    run: Callable  # the endpoint (run_*), served as /api_name
    api_name: str
    run_label: str
    grid_label: str
    examples: tuple[Any, ...]  # values for the widget named example_input
    examples_label: str
    example_input: str = "image"
    n_input: str = "n"  # the N dropdown that a newly loaded model's preset for this tab updates
    uploads: tuple[str, ...] = ("image",)  # image uploads checked as soon as they arrive
    samples: int = 4
    samples_label: str = "Number of samples"
    stop_at: int = 0
    stop_info: str = ""
    wiring: Callable[[Tab], None] | None = None


TABS = [
    TabSpec(
        name="generation", title="N-factor generation", prefix="gen",
        explain="One reference, many samples: each row uses a different **N** (paper Fig. 4). Samples share "
                "the reference's image shrunk by N: N=2 gives near copies, N=32 only the colours. The range "
                "sweep (Fig. 5) fixes N and varies the **stop step**: conditioning on steps 1000→s; a larger "
                "s leaves more late steps free, so fine details vary more.",
        layout=generation_layout, inputs=("image", "mode", "factors", "range_n", "stops"), n_input="range_n",
        run=run_generation, api_name="generate", run_label="Generate grid",
        grid_label="The grid has a row per N (or per stop step in a range sweep)",
        examples=(example_path("noto_grinning_face.png"), example_path("noto_fox.png"),
                  example_path("twemoji_sun_with_face.png")),
        examples_label="Examples (Noto Emoji, Apache-2.0; Twemoji, CC-BY-4.0)",
        samples=3, samples_label="Samples per row", wiring=generation_wiring),
    TabSpec(
        name="translation", title="Domain translation", prefix="tr",
        explain="Give a reference from *another* domain (here: Twemoji drawings for a model trained on Noto "
                "emoji). **N** sets how much of it survives: the paper uses N=32 at 256 px (scaled to your "
                "model); lower N follows the reference more, higher N looks more like the model's own images. "
                "The **stop step** ends conditioning early (0 = all steps).",
        layout=translation_layout, inputs=("image", "n"),
        run=run_translation, api_name="translate", run_label="Translate",
        grid_label="The grid shows the reference, then the translations",
        examples=(example_path("twemoji_cat_face.png"), example_path("twemoji_frog.png"),
                  example_path("twemoji_sun_with_face.png")),
        examples_label="Examples (Twemoji by Twitter, CC-BY-4.0)"),
    TabSpec(
        name="paint", title="Paint-to-image", prefix="paint",
        explain="Upload a painting or clip-art, or paint one on the sketch pad: flat colour regions become "
                "realistic images. A large **N** (paper: 64 at 256 px, scaled) keeps only the colour layout, "
                "so brush strokes turn into model-like texture; the **stop step** frees the last steps.",
        layout=paint_layout, inputs=("source", "image", "sketch", "n"),
        run=run_paint, api_name="paint", run_label="Paint to image",
        grid_label="The grid shows the painting, then the images made from it",
        examples=(example_path("paint_smiley.png"), example_path("paint_heart.png"), example_path("paint_cat.png")),
        examples_label="Examples (drawn by scripts/make_app_examples.py)", wiring=paint_wiring),
    TabSpec(
        name="scribble", title="Scribble editing", prefix="sc",
        explain="Upload an image and draw coloured scribbles on it. ILVR with a small **N** (paper: 8 at 256 "
                "px, scaled) follows your edited image on steps 1000→**stop step** (200), then the free last "
                "steps blend the strokes into realistic detail. *Keep unedited region* changes only the area "
                "around your strokes.",
        layout=scribble_layout, inputs=("editor", "n", "keep_unedited"),
        run=run_scribble, api_name="scribble", run_label="Apply scribbles",
        grid_label="The grid shows the edited input (and mask), then the results",
        examples=(scribble_example("scribble_sunglasses"), scribble_example("scribble_green_apple")),
        examples_label="Examples (Noto Emoji, Apache-2.0, with drawn scribbles)", example_input="editor",
        uploads=(), stop_at=SCRIBBLE_STOP_AT,
        stop_info="Condition on the edited image from step 1000 down to this step, then run free so strokes "
                  "become realistic (paper: 200)"),
]


# ----------------------------------------------------------------------------- the page
@dataclass
class Tab:
    """A built tab: its spec and its widgets."""

    spec: TabSpec
    widgets: dict[str, Any]
    advanced: Advanced
    run: gr.Button
    cancel: gr.Button
    results: list  # [grid, gallery, files, info], the run's outputs


@dataclass
class ModelPicker:
    choice: gr.Dropdown
    path: gr.Textbox
    load: gr.Button
    status: gr.Markdown


def model_picker() -> ModelPicker:
    with gr.Row():
        choice = gr.Dropdown([m.name for m in MODELS], value=DEFAULT_MODEL, label="Model", scale=2,
                             info=f"{DEFAULT_MODEL} is bundled and works offline; the others download "
                                  "from the Hugging Face Hub on first use")
        path = gr.Textbox("", label="…or a local checkpoint", scale=2, elem_id="model-path",
                          placeholder="path to a .pt / .safetensors file or a diffusers folder",
                          info="overrides the list when filled; the status line says what a "
                               "guided-diffusion .pt left to assume",
                          visible=ALLOW_MODEL_PATHS)  # hidden (and refused) on public Spaces
        load = gr.Button("Load model", scale=1, elem_id="load-model")
    status = gr.Markdown("Loading the bundled model …", elem_id="model-status")
    return ModelPicker(choice, path, load, status)


def build_tab(spec: TabSpec, p: dict[str, int], choices: list[int]) -> Tab:
    """Explanation; inputs, Advanced settings and buttons on the left; results on the right; examples."""
    with gr.Tab(spec.title, id=spec.name):
        gr.Markdown(spec.explain, elem_classes="ilvr-explain")
        with gr.Row():
            with gr.Column(scale=2):
                widgets = spec.layout(p, choices)
                adv = advanced(spec.prefix, spec.samples, stop_at=spec.stop_at, samples_label=spec.samples_label,
                               stop_info=spec.stop_info)
                run, cancel = run_buttons(spec.prefix, spec.run_label)
            with gr.Column(scale=3):
                results = result_area(spec.prefix, spec.grid_label)
        gr.Examples([[value] for value in spec.examples], inputs=[widgets[spec.example_input]],
                    label=spec.examples_label)
    return Tab(spec, widgets, adv, run, cancel, results)


def wire_model_picker(demo: gr.Blocks, picker: ModelPicker, tabs: list[Tab]) -> None:
    """Loading a model (button, list, Enter in the path box, page load) updates the status and every N."""
    generation = next(t for t in tabs if t.spec.name == "generation")
    n_outputs = [picker.status, generation.widgets["factors"], *(t.widgets[t.spec.n_input] for t in tabs)]
    load_kw = dict(fn=load_model, inputs=[picker.choice, picker.path], outputs=n_outputs, concurrency_id="load",
                   concurrency_limit=2, show_progress="hidden")  # the status line says "Loading"
    picker.load.click(api_name="load_model", **load_kw)
    picker.choice.change(api_visibility="private", **load_kw)
    picker.path.submit(api_visibility="private", **load_kw)
    picker.path.blur(**{**load_kw, "fn": path_cleared}, api_visibility="private")
    demo.load(api_visibility="private", **load_kw)


def wire_tab(tab: Tab, picker: ModelPicker) -> None:
    """The tab's own wiring, upload checks, its run endpoint and its Cancel button."""
    spec = tab.spec
    if spec.wiring is not None:
        spec.wiring(tab)
    for name in spec.uploads:
        upload = tab.widgets[name]
        upload.upload(check_upload, upload, None, api_visibility="private", show_progress="hidden")
    inputs = [picker.choice, picker.path, *(tab.widgets[name] for name in spec.inputs), *tab.advanced]
    event = tab.run.click(spec.run, inputs, tab.results, api_name=spec.api_name, show_progress_on=[tab.results[0]],
                          js=debounce_js(f"{spec.prefix}-run"), concurrency_id="sampling", show_progress="full")
    tab.cancel.click(canceller(spec.name), None, tab.results[3], cancels=[event], queue=False,
                     api_visibility="private")


def build_demo() -> gr.Blocks:
    p, choices = presets(DEFAULT_SIZE), factor_choices(DEFAULT_SIZE)
    with gr.Blocks(title="ILVR Studio", delete_cache=(3600, 6 * 3600)) as demo:
        gr.Markdown(INTRO)
        picker = model_picker()
        with gr.Tabs():
            tabs = [build_tab(spec, p, choices) for spec in TABS]
        gr.Markdown(FOOTER)
        wire_model_picker(demo, picker, tabs)
        for tab in tabs:
            wire_tab(tab, picker)
    return demo


# ----------------------------------------------------------------------------- launch
def launch_options(foreign: list[Path]) -> dict:
    """launch() arguments besides host and port. The results folder is allowed explicitly: Gradio
    refuses to serve files outside the working and temp dirs (ILVR_APP_OUTPUTS=/data/outputs on a
    Space). Everything else already in that folder (`foreign`) is blocked, since allowed folders are
    served whole."""
    allowed, blocked = [str(EXAMPLES)], []
    if OUTPUTS is not None:
        allowed.append(str(OUTPUTS))
        blocked = [str(p) for p in foreign]
        if blocked:
            blocked += [p.strip() for p in os.environ.get("GRADIO_BLOCKED_PATHS", "").split(",") if p.strip()]
    return dict(show_error=True, max_file_size="25mb", css=CSS, allowed_paths=allowed,
                blocked_paths=blocked or None, state_session_capacity=SESSIONS_KEPT)


def main(args: argparse.Namespace | None = None) -> None:
    args = args if args is not None else parse_args()
    if OUTPUTS_WARNING:
        print(OUTPUTS_WARNING, file=sys.stderr)
    foreign = foreign_entries(OUTPUTS) if OUTPUTS is not None else []
    if foreign:
        print(f"ILVR Studio: {OUTPUTS_ENV}={OUTPUTS} also holds {', '.join(p.name for p in foreign[:5])}"
              f"{' …' if len(foreign) > 5 else ''}. The app never deletes those and blocks them from download, but "
              "Gradio serves anything added there later: give the app a folder of its own.", file=sys.stderr)
    demo = build_demo()
    concurrency = args.concurrency or (2 if torch.cuda.is_available() else 1)
    demo.queue(default_concurrency_limit=concurrency, max_size=args.max_queue)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options(foreign))
    except OSError as e:  # the port was taken while the UI was being built, or no free one in Gradio's range
        if "Cannot find empty port" not in str(e):
            raise
        print(f"port {args.port} is in use; pick another with --port" if args.port is not None
              else "no free port from $GRADIO_SERVER_PORT (default 7860) on; pick one with --port", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(ARGS)
