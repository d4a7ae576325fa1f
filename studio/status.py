"""Text the page shows: the model status line, a finished run's summary, progress bars and time estimates."""
from __future__ import annotations

from ilvr.loading import assumed_settings
from ilvr.model import DiffusionModel
from ilvr.network import count_parameters

from .jobs import Job, JobResult, Update
from .models import device_label


def fmt_seconds(s: float) -> str:
    """'8.5 s', '42 s', '1 min 15 s', '2 h 05 min'."""
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def text_bar(done: int, total: int, width: int = 24) -> str:
    """A progress bar in text, for status lines that are updated while sampling."""
    filled = round(width * done / total) if total else 0
    return f"`{'█' * filled}{'░' * (width - filled)}` {100 * done / total if total else 0:.0f} %"


def estimate_text(seconds: float) -> str:
    return f"about {fmt_seconds(seconds)}" if seconds >= 1 else "a second or two"


def run_header(job: Job, model: DiffusionModel, estimate_s: float) -> str:
    """The first line of a run's status: how many images, how many steps, where, and how long."""
    n_images = len(job.rows) * len(job.seeds)
    return (f"Sampling {n_images} image{'s' if n_images > 1 else ''} × {job.steps_per_row(model)} steps "
            f"on {device_label(model)}: estimated {estimate_text(estimate_s)}.")


def progress_markdown(header: str, update: Update) -> str:
    """The status while sampling: the header, a text progress bar, the step and the time left."""
    eta = f" · about {estimate_text(update.eta_s).removeprefix('about ')} left" if update.eta_s else ""
    return f"{header}\n\n{text_bar(update.done, update.total)} {update.desc}{eta}"


def slow_run_warning(model: DiffusionModel, estimate_s: float) -> str:
    return (f"This run will take {estimate_text(estimate_s)} on {device_label(model)}. "
            "Fewer steps (Advanced settings, e.g. 50) or fewer samples are much faster.")


def summary_markdown(result: JobResult, model: DiffusionModel) -> str:
    """Seeds and settings of a finished job, as shown next to the results."""
    job = result.job
    seeds = ", ".join(str(s) for s in job.seeds)
    lines = [f"**Done in {fmt_seconds(result.elapsed_s)}** on {result.device} · model `{model.name}` "
             f"({model.image_size} px)", ""]
    if job.source is not None:
        lines += [f"DDIB: the reference DDIM-inverted through `{job.source.name}`, then DDIM-sampled through "
                  f"`{model.name}` · steps `{job.steps}` each way · deterministic (one image, no seeds)"]
        return "\n".join(lines + _settings_note())
    lines += [f"seeds **{seeds}** (column k uses seed {job.seeds[0]} + k) · steps `{job.steps}` · "
              f"filter `{job.kernel}` · sampler `{job.sampler}`"
              + (f" · keep unedited region: {'yes' if job.keep_outside else 'no'}" if job.mask is not None else ""),
              "", "| row | N | conditioned steps |", "|---|---|---|"]
    for row in job.rows:
        span = "none" if row.stop_at >= model.diffusion.num_train_timesteps else \
            f"{model.diffusion.num_train_timesteps} → {row.stop_at}"
        lines.append(f"| {row.label} | {row.n_factor} | {span} |")
    return "\n".join(lines + _settings_note())


def _settings_note() -> list[str]:
    return ["", "Each PNG below carries these settings in its `ilvr` text chunk "
                "(`python -c \"from ilvr.images import read_settings; print(read_settings('file.png'))\"`)."]


def model_markdown(model: DiffusionModel, presets: dict[str, int]) -> str:
    """Status line for the model picker."""
    params = count_parameters(model.unet) / 1e6
    p = presets
    text = (f"**Loaded** `{model.name}`: {model.image_size} px, {params:.1f} M parameters, "
            f"{model.info.get('family', '?')} format · **device: {device_label(model)}** · "
            f"presets at {model.image_size} px: translation N={p['translation']}, "
            f"paint N={p['paint']}, scribbles N={p['scribble']}")
    assumed = assumed_settings(model)
    if assumed:
        text += ("\n\nRead with the published ADM settings, which a guided-diffusion `.pt` does not record: "
                 + ", ".join(f"`{k}={v}`" for k, v in assumed.items()) + ". A model of your own trained otherwise: "
                 "`python -m ilvr convert model.pt --model-option KEY=VALUE --out folder`, then load the folder.")
    return text
