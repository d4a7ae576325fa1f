"""The page: the four tabs' widgets as a table (TabSpec) and the blocks every tab shares; app.py wires
these widgets to its endpoints. Its input components are the guarded ones of ``studio.components``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import gradio as gr

from ilvr.filters import KERNELS
from ilvr.registry import BY_NAME, DEFAULT_MODEL, MODELS, SCRIBBLE_STOP_AT, generation_factors
from ilvr.validate import SAMPLERS

from .components import Checkbox, Dropdown, ImageEditor, ImageUpload, Radio, Seed, Sketchpad, Slider, Textbox
from .inputs import MAX_SAMPLES
from .tasks import GENERATION_MODES, PAINT_SOURCES, TRANSLATION_METHODS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MAX_UPLOAD = "25mb"  # launch(max_file_size=...): uploads and editor blobs
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
          "Bundled emoji models and examples: Noto Emoji (Apache-2.0), Microsoft Fluent Emoji (MIT); "
          "Twemoji examples CC-BY-4.0, Twitter, Inc. and other contributors; digit models and examples: "
          "rendered from free fonts (see examples/README.md and each model's card).")


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
            steps = Dropdown(STEP_CHOICES, value="250", allow_custom_value=True, label="Steps",
                             info="Respaced sampling steps (250 = the default, good quality; 1000 = as in the "
                                  "paper's figures; 25-50 = fast preview; 'ddim50' = 50 steps spaced as in "
                                  "DDIM's paper, for the DDIM sampler below)",
                             elem_id=f"{prefix}-steps")
            stop = Slider(0, 1000, value=stop_at, step=10, label="Stop step",
                          info=stop_info or "Condition on the reference only from step 1000 down to this "
                                            "step; later steps run free (0 = every step)",
                          elem_id=f"{prefix}-stop")
        with gr.Row():
            kernel = Dropdown(list(KERNELS), value="cubic", label="Filter (φ_N)",
                              info="resize-right kernel of the low-pass: down by N, back up")
            sampler = Radio(list(SAMPLERS), value="ddpm", label="Sampler")
        with gr.Row():
            seed = Seed(value=0, precision=0, label="Seed", info="sample k uses seed + k; -1 = random",
                        elem_id=f"{prefix}-seed")
            count = Slider(1, MAX_SAMPLES, value=samples, step=1, label=samples_label, elem_id=f"{prefix}-samples")
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
    return ImageUpload(label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"], height=260,
                       elem_id=elem_id)


def n_dropdown(choices: list[int], value: int):
    return Dropdown(choices, value=value, allow_custom_value=True, label="N",
                    info="low-pass factor; must divide the image size")


# ----------------------------------------------------------------------------- each tab's own inputs
# A tab's layout function makes the widgets above its Advanced settings and returns them by name: the
# run inputs (TabSpec.inputs) and anything its wiring needs. Its wiring function (optional) connects them.

def generation_layout(p: dict[str, int], choices: list[int], size: int) -> dict[str, Any]:
    widgets = dict(image=reference_upload("Reference", "gen-image"),
                   mode=Radio(list(GENERATION_MODES), value=GENERATION_MODES[0], label="Grid rows"),
                   factors=Textbox(", ".join(str(n) for n in generation_factors(size)),
                                   label="N values (one row each)",
                                   info="divisors of the model's image size, comma-separated", elem_id="gen-factors"))
    with gr.Row(visible=False) as widgets["range_row"]:
        widgets["range_n"] = Dropdown(choices, value=p["generation"], allow_custom_value=True,
                                      label="N for the range sweep")
        widgets["stops"] = Textbox("0, 250, 500, 750", label="Stop steps (one row each)",
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


def translation_layout(p: dict[str, int], choices: list[int], size: int) -> dict[str, Any]:
    widgets = dict(image=reference_upload("Reference (any domain)", "tr-image"),
                   n=n_dropdown(choices, p["translation"]))
    with gr.Row():
        widgets["method"] = Radio(list(TRANSLATION_METHODS), value=TRANSLATION_METHODS[0], label="Method",
                                  info="ILVR (N sets what survives) or DDIB (Su et al. 2023: through a second "
                                       "model of the reference's domain; deterministic, no N)", elem_id="tr-method")
        widgets["source_model"] = Dropdown([m.name for m in MODELS], value=BY_NAME[DEFAULT_MODEL].ddib_source,
                                           label="DDIB source model", info="a model of the reference's domain, of "
                                           "the same size as the model above", visible=False, elem_id="tr-source")
    return widgets


def translation_wiring(tab: Tab) -> None:
    """The source model matters to DDIB only."""
    w = tab.widgets
    w["method"].change(lambda m: gr.update(visible=m == TRANSLATION_METHODS[1]), w["method"], w["source_model"],
                       queue=False, api_visibility="private")


def paint_layout(p: dict[str, int], choices: list[int], size: int) -> dict[str, Any]:
    widgets = dict(source=Radio(list(PAINT_SOURCES), value=PAINT_SOURCES[0], label="Reference from",
                                elem_id="paint-source"))
    with gr.Tabs():
        with gr.Tab("Upload a painting"):
            widgets["image"] = reference_upload("Painting / clip-art", "paint-image")
        with gr.Tab("Sketch pad"):
            widgets["sketch"] = Sketchpad(
                label="Paint here (white background)", type="filepath", image_mode="RGBA", canvas_size=(256, 256),
                height=340, layers=False, brush=gr.Brush(colors=BRUSH_COLORS, default_size=18,
                                                         default_color="#ffcc33"), elem_id="paint-pad")
    widgets["n"] = n_dropdown(choices, p["paint"])
    return widgets


def paint_wiring(tab: Tab) -> None:
    """The source follows what the user did last: uploaded a painting or painted on the pad."""
    w = tab.widgets
    w["image"].change(lambda v: PAINT_SOURCES[0] if v else gr.skip(), w["image"], w["source"], queue=False,
                      api_visibility="private")
    w["sketch"].input(lambda: PAINT_SOURCES[1], None, w["source"], queue=False, api_visibility="private")


def scribble_layout(p: dict[str, int], choices: list[int], size: int) -> dict[str, Any]:
    widgets = dict(editor=ImageEditor(
        label="Image to edit: upload, then draw with the brush", type="filepath", image_mode="RGBA",
        canvas_size=(256, 256), fixed_canvas=True, height=360, transforms=(), layers=False,
        sources=["upload", "clipboard"], brush=gr.Brush(colors=BRUSH_COLORS, default_size=16, default_color="#202020"),
        elem_id="sc-editor"))
    with gr.Row():
        widgets["n"] = n_dropdown(choices, p["scribble"])
        widgets["keep_unedited"] = Checkbox(False, label="Keep unedited region",
                                            info="pin everything away from the strokes to the input", elem_id="sc-keep")
    return widgets


# ----------------------------------------------------------------------------- the table of tabs
@dataclass(frozen=True)
class Examples:
    """One example row of a tab: the values of its example input, and where they come from."""

    values: tuple[Any, ...]
    label: str


EXAMPLE_SETS = ("emoji", "digits")  # the example sets a registry entry may name (ModelEntry.examples)
DIGIT_EXAMPLES_LABEL = "Examples (coloured digits, rendered by scripts/make_app_examples.py)"


@dataclass(frozen=True)
class TabSpec:
    """Everything that differs between the four tabs; build_tab and app.wire_tab do the rest."""

    name: str  # the tab's id, its job's task, its key in the N presets (ilvr.registry.PAPER_PRESETS)
    title: str
    prefix: str  # of the elem_ids: #PREFIX-run, #PREFIX-info, #PREFIX-steps ... (the browser test uses them)
    explain: str
    layout: Callable[[dict[str, int], list[int], int], dict[str, Any]]
    inputs: tuple[str, ...]  # the layout's widgets passed to the endpoint, after the model picker's two values
    api_name: str  # the endpoint (app.ENDPOINTS[name]) is served as /api_name
    run_label: str
    grid_label: str
    examples: dict[str, Examples]  # by example set (EXAMPLE_SETS): the one of the loaded model is shown
    example_input: str = "image"
    n_input: str = "n"  # the N dropdown that a newly loaded model's preset for this tab updates
    uploads: tuple[str, ...] = ("image",)  # image uploads checked as soon as they arrive
    samples: int = 4
    samples_label: str = "Number of samples"
    stop_at: int = 0
    stop_info: str = ""
    wiring: Callable[[Tab], None] | None = None
    trailing_inputs: tuple[str, ...] = ()  # layout widgets passed after the Advanced settings (newer parameters)


TABS = [
    TabSpec(
        name="generation", title="N-factor generation", prefix="gen",
        explain="One reference, many samples: each row uses a different **N** (paper Fig. 4). Samples share "
                "the reference's image shrunk by N: N=2 gives near copies, N=32 only the colours. The range "
                "sweep (Fig. 5) fixes N and varies the **stop step**: conditioning on steps 1000→s; a larger "
                "s leaves more late steps free, so fine details vary more.",
        layout=generation_layout, inputs=("image", "mode", "factors", "range_n", "stops"), n_input="range_n",
        api_name="generate", run_label="Generate grid",
        grid_label="The grid has a row per N (or per stop step in a range sweep)",
        examples={"emoji": Examples((example_path("noto_grinning_face.png"), example_path("noto_fox.png"),
                                     example_path("twemoji_sun_with_face.png")),
                                    "Examples (Noto Emoji, Apache-2.0; Twemoji, CC-BY-4.0)"),
                  "digits": Examples((example_path("digit_orange7_on_teal.png"),
                                      example_path("digit_red3_on_blue.png")),
                                     DIGIT_EXAMPLES_LABEL)},
        samples=3, samples_label="Samples per row", wiring=generation_wiring),
    TabSpec(
        name="translation", title="Domain translation", prefix="tr",
        explain="Give a reference from *another* domain (here: Twemoji drawings for a model trained on Noto "
                "emoji). **N** sets how much of it survives: the paper uses N=32 at 256 px (scaled to your "
                "model); lower N follows the reference more, higher N looks more like the model's own images. "
                "The **stop step** ends conditioning early (0 = all steps). **DDIB** translates through a second "
                "model of the reference's domain instead (e.g. all digits → sevens).",
        layout=translation_layout, inputs=("image", "n"), trailing_inputs=("method", "source_model"),
        wiring=translation_wiring,
        api_name="translate", run_label="Translate",
        grid_label="The grid shows the reference, then the translations",
        examples={"emoji": Examples((example_path("twemoji_cat_face.png"), example_path("twemoji_frog.png"),
                                     example_path("twemoji_sun_with_face.png")),
                                    "Examples (Twemoji by Twitter, CC-BY-4.0)"),
                  "digits": Examples((example_path("digit_red3_on_blue.png"),
                                      example_path("digit_yellow5_on_green.png"),
                                      example_path("digit_white2_on_purple.png")), DIGIT_EXAMPLES_LABEL)}),
    TabSpec(
        name="paint", title="Paint-to-image", prefix="paint",
        explain="Upload a painting or clip-art, or paint one on the sketch pad: flat colour regions become "
                "realistic images. A large **N** (paper: 64 at 256 px, scaled) keeps only the colour layout, "
                "so brush strokes turn into model-like texture; the **stop step** frees the last steps.",
        layout=paint_layout, inputs=("source", "image", "sketch", "n"),
        api_name="paint", run_label="Paint to image",
        grid_label="The grid shows the painting, then the images made from it",
        examples={"emoji": Examples((example_path("paint_smiley.png"), example_path("paint_heart.png"),
                                     example_path("paint_cat.png")),
                                    "Examples (drawn by scripts/make_app_examples.py)"),
                  "digits": Examples((example_path("paint_digit_seven.png"),),
                                     "Examples (drawn by scripts/make_app_examples.py)")},
        wiring=paint_wiring),
    TabSpec(
        name="scribble", title="Scribble editing", prefix="sc",
        explain="Upload an image and draw coloured scribbles on it. ILVR with a small **N** (paper: 8 at 256 "
                "px, scaled) follows your edited image on steps 1000→**stop step** (200), then the free last "
                "steps blend the strokes into realistic detail. *Keep unedited region* changes only the area "
                "around your strokes.",
        layout=scribble_layout, inputs=("editor", "n", "keep_unedited"),
        api_name="scribble", run_label="Apply scribbles",
        grid_label="The grid shows the edited input (and mask), then the results",
        examples={"emoji": Examples((scribble_example("scribble_sunglasses"), scribble_example("scribble_green_apple")),
                                    "Examples (Noto Emoji, Apache-2.0, with drawn scribbles)"),
                  "digits": Examples((scribble_example("scribble_digit_one"),),
                                     "Examples (a rendered digit with a drawn scribble)")},
        example_input="editor",
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
    example_groups: dict[str, gr.Column]  # by example set; the loaded model's is visible


@dataclass
class ModelPicker:
    choice: gr.Dropdown
    path: gr.Textbox
    load: gr.Button
    status: gr.Markdown


def model_picker(allow_paths: bool) -> ModelPicker:
    with gr.Row():
        choice = Dropdown([m.name for m in MODELS], value=DEFAULT_MODEL, label="Model", scale=2,
                          elem_id="model-choice",
                          info=f"{DEFAULT_MODEL} is bundled and works offline; the others download "
                               "from the Hugging Face Hub on first use")
        path = Textbox("", label="…or a local checkpoint", scale=2, elem_id="model-path",
                       placeholder="path to a .pt / .safetensors file or a diffusers folder",
                       info="overrides the list when filled; the status line says what a "
                            "guided-diffusion .pt left to assume",
                       visible=allow_paths)  # hidden (and refused) on a public server
        load = gr.Button("Load model", scale=1, elem_id="load-model")
    status = gr.Markdown("Loading the bundled model …", elem_id="model-status")
    return ModelPicker(choice, path, load, status)


def build_tab(spec: TabSpec, p: dict[str, int], choices: list[int], size: int, example_set: str) -> Tab:
    """Explanation; inputs, Advanced settings and buttons on the left; results on the right; the example
    rows, of which the one for `example_set` is visible."""
    with gr.Tab(spec.title, id=spec.name):
        gr.Markdown(spec.explain, elem_classes="ilvr-explain")
        with gr.Row():
            with gr.Column(scale=2):
                widgets = spec.layout(p, choices, size)
                adv = advanced(spec.prefix, spec.samples, stop_at=spec.stop_at, samples_label=spec.samples_label,
                               stop_info=spec.stop_info)
                run, cancel = run_buttons(spec.prefix, spec.run_label)
            with gr.Column(scale=3):
                results = result_area(spec.prefix, spec.grid_label)
        groups = {}
        for name, examples in spec.examples.items():
            with gr.Column(visible=name == example_set) as groups[name]:
                gr.Examples([[value] for value in examples.values], inputs=[widgets[spec.example_input]],
                            label=examples.label)
    return Tab(spec, widgets, adv, run, cancel, results, groups)
