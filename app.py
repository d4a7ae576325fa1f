"""ILVR Studio: a Gradio app for ILVR (Choi et al., ICCV 2021) on unconditional diffusion models.

Endpoints and wiring only: the sampling maths lives in ilvr/ (the engine), the page's widgets and the
table of its four tabs in studio/ui.py, everything else the app needs (model cache and limits, input
checks, scribble masks, jobs with streamed previews, result files, status text) in studio/.

    python app.py                 # http://127.0.0.1:7860, bundled 64 px emoji model, CPU is fine
    python app.py --share         # also a temporary public gradio.live link
    python app.py --host 0.0.0.0 --port 8080

Reachable from other computers (--share, a --host other than loopback, a Space), the app is a public
server: only the listed models load, runs are capped, one run per browser session (docs/security.md).
"""
from __future__ import annotations

import argparse
import errno
import os
import socket
import sys

from studio.public import PolicyError, server_policy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line and the server policy, read before gradio and torch are imported: --help, a
    busy --port and a bad setting in the environment answer at once instead of after ~20 s of imports
    and UI building. Exits 2 on a busy or unusable port or a bad setting."""
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
    try:
        args.policy = server_policy(args.host, args.share)
    except PolicyError as e:
        parser.exit(2, f"{e}\n")
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


ARGS = parse_args(None if __name__ == "__main__" else [])  # imported (tests): the defaults and the environment

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from ilvr.loading import ModelLoadError  # noqa: E402
from ilvr.registry import BY_NAME, DEFAULT_MODEL, generation_factors  # noqa: E402
from ilvr.sampler import Cancelled  # noqa: E402
from studio.inputs import reference_image  # noqa: E402
from studio.jobs import ActiveRuns, StopFlags, job_warnings, run_job  # noqa: E402
from studio.models import ModelCache, model_source, shown_error  # noqa: E402
from studio.outputs import OUTPUTS_ENV, foreign_entries, resolve_output_root, save_result  # noqa: E402
from studio.status import model_markdown, progress_markdown, run_header, slow_run_warning  # noqa: E402
from studio.tasks import (TRANSLATION_METHODS, ddib_job, ddib_source_for, example_set, factor_choices,  # noqa
                          generation_job, paint_job, presets, scribble_job, translation_job)
from studio.components import (Refused, endpoint, install_pixel_limit, one_run_per_session, refused,  # noqa: E402
                               user_error)
from studio.ui import CSS, EXAMPLES, FOOTER, INTRO, MAX_UPLOAD, TABS, ModelPicker, Tab, build_tab, debounce_js, model_picker  # noqa

try:  # ZeroGPU on Hugging Face Spaces; a no-op everywhere else
    import spaces

    gpu = spaces.GPU(duration=180)
except Exception:  # noqa: BLE001 - the package is optional
    def gpu(fn):
        return fn

POLICY = ARGS.policy  # studio.public: model paths, limits, per-visitor caps (docs/security.md)
ALLOW_MODEL_PATHS = POLICY.allow_paths
CACHE = ModelCache(limits=POLICY.limits, detailed_errors=POLICY.detailed_errors)
STOPS = StopFlags()
RUNNING = ActiveRuns()  # sessions with a run in progress (the one-run-per-session check)
OUTPUTS, OUTPUTS_WARNING = resolve_output_root()  # checked once, at startup; None: nothing writable
DEFAULT_SIZE = BY_NAME[DEFAULT_MODEL].image_size
LONG_RUN_S = 15 * 60  # warn before runs estimated longer than this
# browser sessions whose state Gradio keeps (least recently used dropped first). Each holds a copy of the
# UI's config, about 0.75 MB here; Gradio's default of 10,000 would let a public Space grow to gigabytes.
# The app keeps no per-session state of its own (no gr.State), so a dropped session loses nothing.
SESSIONS_KEPT = 500
# what loading a model updates: the status, the generation tab's N values, each tab's N, the DDIB source
# model, and each tab's example rows (one per example set)
LOAD_OUTPUTS = 2 + len(TABS) + 1 + sum(len(spec.examples) for spec in TABS)


# ----------------------------------------------------------------------------- handlers
def _message(e: Exception | str) -> str:
    """The exception's text as a sentence; a leading file name (``notes.txt: ...``) keeps its case."""
    text = str(e).strip() or type(e).__name__
    return text[0].upper() + text[1:] if text.split(" ", 1)[0].isalpha() else text


def check_upload(value) -> None:
    """Report an unreadable upload (a truncated or mislabelled file) when it arrives, not at Run."""
    if isinstance(value, Refused):
        gr.Warning(value.message, title=value.title)
    elif value:
        try:
            reference_image(value)
        except ValueError as e:  # ImageError is a ValueError
            gr.Warning(f"{_message(e)}. Upload a PNG, JPEG or WebP image.", title="Unreadable image")


def _load_error(e: ModelLoadError, source: str) -> str:
    """What the page says about a failed load: no other files' names on a public server (studio.models)."""
    return _message(shown_error(str(e), source, POLICY.detailed_errors))


def _model(choice: str, path: str):
    source = (path or "").strip() or choice
    try:
        return CACHE.get(model_source(choice, path, ALLOW_MODEL_PATHS))
    except ModelLoadError as e:
        message = _load_error(e, source)
    raise user_error(message, "Model not loaded")


def load_model(choice: str, path: str):
    """Load (download on first use) the picked model; update the status and the N presets."""
    refused(choice, path)
    source, message = (path or "").strip() or choice, None
    try:
        source = model_source(choice, path, ALLOW_MODEL_PATHS)
        if CACHE.cached(source) is None:
            hub = source in BY_NAME and not BY_NAME[source].bundled
            yield (f"Loading `{source}` …" + (" (first use downloads it from the Hugging Face Hub; "
                                              "this can take a few minutes)" if hub else ""),) \
                + (gr.skip(),) * (LOAD_OUTPUTS - 1)
        model = CACHE.get(source)
    except ModelLoadError as e:
        message = _load_error(e, source)
    if message is not None:  # raised out here: nothing of the failed load stays referenced
        yield (f"**Not loaded:** {message}",) + (gr.skip(),) * (LOAD_OUTPUTS - 1)
        raise user_error(message, "Model not loaded")
    size = model.image_size
    p, choices = presets(size, source), factor_choices(size)
    examples, ddib_source = example_set(source), ddib_source_for(source, size)
    yield (model_markdown(model, p),
           gr.update(value=", ".join(str(n) for n in generation_factors(size))),
           *(gr.update(choices=choices, value=p[spec.name]) for spec in TABS),  # the n_input of each tab
           gr.update(value=ddib_source) if ddib_source else gr.skip(),
           *(gr.update(visible=name == examples) for spec in TABS for name in spec.examples))


def path_cleared(choice: str, path: str):
    """Emptying the path box means the list's model again: reload the status (cached, so instant)."""
    if isinstance(path, Refused) or (path or "").strip():
        yield (gr.skip(),) * LOAD_OUTPUTS  # typing a path: it loads on Enter or the button
        return
    yield from load_model(choice, "")


def _run_cap(job, model) -> None:
    """A public server's cap on one run's work (ILVR_MAX_IMAGE_STEPS): images x sampler steps."""
    cap, images = POLICY.max_image_steps, len(job.rows) * len(job.seeds)
    if cap and job.image_steps(model) > cap:
        raise user_error(f"This server runs at most {cap:,} images × steps per run; this one asks for {images} "
                         f"image{'s' if images > 1 else ''} × {job.steps_per_row(model)} steps. Use fewer samples, "
                         "rows or steps.", "Run too large")


def _stream(job_fn, choice: str, path: str, request: gr.Request | None, progress: gr.Progress):
    """Shared body of the four sampling events: build the job, stream previews, save the results."""
    if OUTPUTS is None:  # reported at startup too: refuse before sampling, not after it
        raise user_error(f"This server cannot save result files: set {OUTPUTS_ENV} to a writable folder.",
                         "Server misconfigured")  # its log says so once, at startup
    model = _model(choice, path)
    try:
        job, warnings = job_fn(model)
    except ValueError as e:  # ImageError is a ValueError
        raise user_error(_message(e), "Check the inputs") from None
    _run_cap(job, model)
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
        raise user_error(_message(e), "Check the inputs") from None
    finally:
        runner.close()
        STOPS.release(session, stop)
    CACHE.record_speed(model, result.elapsed_s, job.image_steps(model))
    try:
        saved = save_result(result, model, OUTPUTS)
    except OSError as e:  # e.g. the disk filled up or the folder became read-only since startup
        raise gr.Error(f"The results could not be saved in {OUTPUTS}: {e.strerror or e}.", title="Not saved") from e
    # the saved file, not the image: its download keeps the PNG's settings and its name
    yield str(saved.grid_path), saved.gallery, saved.files, saved.summary


# The four endpoints. Their parameters are the API's (gradio_client callers pass them in this order):
# the model picker's two values, the tab's own inputs (TabSpec.inputs), then the Advanced settings.
@gpu
@endpoint(RUNNING)
def run_generation(choice, path, image, mode, factors, range_n, stops, samples, steps, stop_at, kernel, sampler,
                   seed, request: gr.Request = None, progress=gr.Progress()):
    """N-factor generation: a grid with one row per N (paper Fig. 4) or per conditioning range (Fig. 5)."""
    yield from _stream(lambda m: (generation_job(m, image, mode, factors, range_n, stops, samples, steps,
                                                 stop_at, kernel, sampler, seed), []),
                       choice, path, request, progress)


@gpu
@endpoint(RUNNING)
def run_translation(choice, path, image, n, samples, steps, stop_at, kernel, sampler, seed,
                    method=TRANSLATION_METHODS[0], source_model=None, request: gr.Request = None,
                    progress=gr.Progress()):
    """Domain translation: samples of the model's domain that share the reference's coarse structure (ILVR),
    or the reference carried over from a source model's domain (DDIB; `method` and `source_model` come
    last so that callers of the older signature keep working)."""
    method = method or TRANSLATION_METHODS[0]
    if method not in TRANSLATION_METHODS:
        raise user_error(f"method must be one of: {', '.join(TRANSLATION_METHODS)}; got {method!r}", "Check the inputs")
    if method == TRANSLATION_METHODS[0]:
        yield from _stream(lambda m: (translation_job(m, image, n, samples, steps, stop_at, kernel, sampler, seed),
                                      []), choice, path, request, progress)
        return
    if not (isinstance(source_model, str) and source_model.strip()):
        raise user_error("DDIB needs a source model: pick the model of the reference's domain.", "Check the inputs")
    source = _model(source_model, "")
    yield from _stream(lambda m: ddib_job(m, source, image, samples, steps, kernel, sampler, seed),
                       choice, path, request, progress)


@gpu
@endpoint(RUNNING)
def run_paint(choice, path, source, image, sketch, n, samples, steps, stop_at, kernel, sampler, seed,
              request: gr.Request = None, progress=gr.Progress()):
    """Paint-to-image: a painting or clip-art (uploaded or sketched) turned into the model's domain."""
    yield from _stream(lambda m: (paint_job(m, source, image, sketch, n, samples, steps, stop_at, kernel,
                                            sampler, seed), []),
                       choice, path, request, progress)


@gpu
@endpoint(RUNNING)
def run_scribble(choice, path, editor, n, keep_unedited, samples, steps, stop_at, kernel, sampler, seed,
                 request: gr.Request = None, progress=gr.Progress()):
    """Scribble editing: colour strokes on an image become realistic edits (ILVR on steps T -> stop)."""
    yield from _stream(lambda m: scribble_job(m, editor, n, keep_unedited, samples, steps, stop_at, kernel,
                                              sampler, seed),
                       choice, path, request, progress)


ENDPOINTS = {"generation": run_generation, "translation": run_translation, "paint": run_paint,
             "scribble": run_scribble}


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


# ----------------------------------------------------------------------------- wiring
def wire_model_picker(demo: gr.Blocks, picker: ModelPicker, tabs: list[Tab]) -> None:
    """Loading a model (button, list, Enter in the path box, page load) updates the status and every N."""
    generation = next(t for t in tabs if t.spec.name == "generation")
    translation = next(t for t in tabs if t.spec.name == "translation")
    n_outputs = [picker.status, generation.widgets["factors"], *(t.widgets[t.spec.n_input] for t in tabs),
                 translation.widgets["source_model"], *(g for t in tabs for g in t.example_groups.values())]
    load_kw = dict(fn=load_model, inputs=[picker.choice, picker.path], outputs=n_outputs, concurrency_id="load",
                   concurrency_limit=2, show_progress="hidden")  # the status line says "Loading"
    picker.load.click(api_name="load_model", **load_kw)
    picker.choice.change(api_visibility="private", **load_kw)
    picker.path.submit(api_visibility="private", **load_kw)
    picker.path.blur(**{**load_kw, "fn": path_cleared}, api_visibility="private")
    demo.load(api_visibility="private", **load_kw)


def wire_tab(demo: gr.Blocks, tab: Tab, picker: ModelPicker) -> None:
    """The tab's own wiring, upload checks, its run endpoint and its Cancel button."""
    spec, fn = tab.spec, ENDPOINTS[tab.spec.name]
    if spec.wiring is not None:
        spec.wiring(tab)
    for name in spec.uploads:
        upload = tab.widgets[name]
        upload.upload(check_upload, upload, None, api_visibility="private", show_progress="hidden")
    inputs = [picker.choice, picker.path, *(tab.widgets[name] for name in spec.inputs), *tab.advanced,
              *(tab.widgets[name] for name in spec.trailing_inputs)]
    validator = one_run_per_session(demo, fn, RUNNING) if POLICY.one_run_per_session else None
    event = tab.run.click(fn, inputs, tab.results, api_name=spec.api_name, show_progress_on=[tab.results[0]],
                          js=debounce_js(f"{spec.prefix}-run"), concurrency_id="sampling", show_progress="full",
                          validator=validator)
    tab.cancel.click(canceller(spec.name), None, tab.results[3], cancels=[event], queue=False,
                     api_visibility="private")


def build_demo() -> gr.Blocks:
    install_pixel_limit()  # Pillow itself refuses oversized images from their headers, in this process
    p, choices = presets(DEFAULT_SIZE, DEFAULT_MODEL), factor_choices(DEFAULT_SIZE)
    with gr.Blocks(title="ILVR Studio", delete_cache=(3600, 6 * 3600)) as demo:
        gr.Markdown(INTRO)
        picker = model_picker(ALLOW_MODEL_PATHS)
        with gr.Tabs():
            tabs = [build_tab(spec, p, choices, DEFAULT_SIZE, example_set(DEFAULT_MODEL)) for spec in TABS]
        gr.Markdown(FOOTER)
        wire_model_picker(demo, picker, tabs)
        for tab in tabs:
            wire_tab(demo, tab, picker)
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
    return dict(show_error=True, max_file_size=MAX_UPLOAD, css=CSS, allowed_paths=allowed,
                blocked_paths=blocked or None, state_session_capacity=SESSIONS_KEPT)


def main(args: argparse.Namespace | None = None) -> None:
    args = args if args is not None else parse_args()
    for line in args.policy.startup_lines():
        print(line, file=sys.stderr)
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
