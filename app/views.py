"""What the studio shows, as plain functions: form values to a TrainConfig, job and library text and rows, and
error sentences worded for the studio's fields. No Gradio here, so each is unit-tested without a browser
(tests/test_ui_views.py); app/ui.py lays out components and calls these.
"""

from __future__ import annotations

import re
import time

import pandas as pd

from dreambooth_lora.config import TrainConfig, defaults_for, uses_tiny_defaults
from dreambooth_lora.errors import UserError
from dreambooth_lora.jobs import ACTIVE, Job, Jobs, JobStatus
from dreambooth_lora.library import AdapterEntry
from dreambooth_lora.models import default_base_model

# Presets scale the model's default step count and pick a rank; Balanced is exactly the core defaults.
PRESETS = {
    "Fast": {"rank": 4, "steps_scale": 0.5},
    "Balanced": {"rank": 8, "steps_scale": 1.0},
    "Best": {"rank": 16, "steps_scale": 1.5},
}
NO_JOBS = "No jobs yet: upload photos and press Start."
EMPTY_LIBRARY = "The library is empty: train a subject in the Train tab."
JOB_COLUMNS = ["job", "subject", "status", "progress", "updated"]
LIBRARY_COLUMNS = ["name", "token", "class", "base model", "rank", "steps", "created", "size"]

# The core's messages name CLI flags (dreambooth_lora/config.py, generate.py); the studio names its own fields.
FIELD_LABELS = {
    "--token": "Token", "--class-noun": "Class noun", "--name": "name", "--base-model": "Base model",
    "--steps": "Steps", "--rank": "LoRA rank", "--alpha": "LoRA alpha", "--prior-weight": "Prior weight λ",
    "--num-class-images": "Class images", "--lr": "Learning rate", "--resolution": "Resolution (px)",
    "--text-encoder": "Text encoder", "--loraplus-ratio": "LoRA+ ratio", "--seed": "Seed",
    "--checkpoint-every": "Checkpoint every (steps)", "--prompt": "Prompt", "--num-images": "Images",
    "--guidance": "Guidance", "--size": "Size (px)", "--adapter": "Adapter",
}
_FLAG = re.compile(r"--[a-z][a-z0-9-]*")


def ui_error_text(error: UserError | str) -> str:
    """A core UserError's sentence with its CLI flags replaced by the studio's field names."""
    return _FLAG.sub(lambda m: FIELD_LABELS.get(m.group(0), m.group(0)), str(error))


def error_markdown(error: UserError | str) -> str:
    return f"**Error:** {ui_error_text(error)}"


# ----------------------------------------------------------------------------- Train form
def _blank(value):
    # gr.Number sends 0 for an empty box, so 0 means "the default" for the optional numbers.
    return None if value in (None, "", 0) else value


def _int(value):
    return None if value is None else int(value)


ADAPTER_TYPE_INFO = ("the UNet's adapter; rank and alpha scale it as alpha/rank. lora: B A of rank r. dora: LoRA plus a "
                     "magnitude per output row. loha: two rank-r products multiplied elementwise. lokr: a Kronecker "
                     "product, its second factor of rank r when r is below half its size. qrlora: r learned values per "
                     "layer on a pivoted QR of the frozen weight. vera: two learned vectors per layer on shared random "
                     "projections of rank r. adalora: ranks moved between layers, rank r on average at the end. qrlora and "
                     "vera take no alpha; all three are saved as exact LoRA")


def train_config(num_images, token, class_noun, name, base_model, preset, steps, rank, alpha, prior_weight,
                 num_class_images, lr, resolution, text_encoder, loraplus, seed, token_embedding,
                 checkpoint_every, adapter_type="lora") -> TrainConfig:
    """The Train form's values as a TrainConfig (validated there); 0 in an optional number means its default."""
    base_model = (base_model or "").strip() or default_base_model()
    steps = _blank(steps)
    scale = PRESETS[preset]["steps_scale"]
    if steps is None and scale != 1.0:
        default = defaults_for(uses_tiny_defaults(base_model), max(num_images, 1), 0)["steps"]
        steps = max(1, round(default * scale))
    return TrainConfig(
        token=(token or "").strip(), class_noun=(class_noun or "").strip(), base_model=base_model,
        name=(name or "").strip() or None, steps=_int(steps), rank=_int(rank), alpha=_blank(alpha),
        prior_weight=float(prior_weight or 0.0), num_class_images=_int(_blank(num_class_images)),
        lr=_blank(lr), resolution=_int(_blank(resolution)), text_encoder=text_encoder,
        loraplus_ratio=_blank(loraplus), seed=_int(_blank(seed)) or 0,
        train_token_embedding={"auto": None, "on": True, "off": False}[token_embedding],
        checkpoint_every=_int(_blank(checkpoint_every)) or 0, adapter_type=adapter_type or "lora",
    )


def resolution_for_uploads(resolution, base_model) -> int | None:
    from dreambooth_lora.models import native_resolution

    return _int(_blank(resolution)) or native_resolution((base_model or "").strip() or default_base_model())


# ----------------------------------------------------------------------------- Jobs
def job_choices(jobs: list[Job]) -> list[tuple[str, str]]:
    return [(f"{j.name or j.id} · {j.status}", j.id) for j in jobs]


def progress_text(job: Job) -> str:
    status, phase, step, total = job.status, job.phase, job.step, job.total
    if status in ACTIVE:
        if phase == "class_images":
            return f"class images {step} of {total}"
        if phase == "training":
            return f"step {step} of {total}"
        return phase or "preparing"
    if status in (JobStatus.INTERRUPTED, JobStatus.CANCELLED) and total:
        return f"stopped at step {step} of {total}"
    if status == JobStatus.FAILED:
        return "error"
    if status == JobStatus.DONE:
        return f"{total} steps"
    return str(status)


def jobs_frame(jobs: list[Job]) -> pd.DataFrame:
    return pd.DataFrame(
        [[j.id, j.name, str(j.status), progress_text(j),
          time.strftime("%H:%M:%S", time.localtime(j.updated or j.created))] for j in jobs],
        columns=JOB_COLUMNS,
    )


SMOOTHING = 0.9  # exponential moving average of the loss, as TensorBoard's default smoothing slider


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased as in Adam so the first points are not pulled towards 0."""
    out, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**index))
    return out


def loss_frame(losses: list[float]) -> pd.DataFrame | None:
    """The loss plot's data: the raw loss per step and its smoothed curve, as two series."""
    if not losses:
        return None
    steps = list(range(1, len(losses) + 1))
    return pd.DataFrame({"step": steps * 2, "loss": list(losses) + smoothed(losses),
                         "series": ["raw"] * len(losses) + ["smoothed"] * len(losses)})


def job_text(jobs: Jobs, job: Job | None) -> str:
    """The job panel's Markdown: name, status and progress, and the line that says what happens next."""
    if job is None:
        return NO_JOBS
    status = job.status
    progress = progress_text(job)
    lines = [f"### {job.name or job.id}", f"**{status}**" + (f" · {progress}" if progress != status else "")]
    if status in ACTIVE and job.phase == "preparing" and job.message:
        lines.append(job.message)
    elif status == JobStatus.QUEUED:
        queued = [j.id for j in sorted(jobs.list((JobStatus.QUEUED,)), key=lambda j: j.created)]
        lines.append(f"waiting: position {queued.index(job.id) + 1} in the queue" if job.id in queued else "")
    elif status == JobStatus.FAILED:
        lines.append(error_markdown(job.error or "unknown"))
        if not job.resumable:
            lines.append("Fix the settings and start a new job.")
    elif status in (JobStatus.INTERRUPTED, JobStatus.CANCELLED):
        lines.append(job.message)
    elif status == JobStatus.DONE and job.adapter_id:
        lines.append(f"{job.message}: find it in the Library tab.")
    if job.losses:
        lines.append(f"last loss {job.losses[-1]:.4f}")
    return "\n\n".join(line for line in lines if line)


# ----------------------------------------------------------------------------- Library
def library_frame(entries: list[AdapterEntry]) -> pd.DataFrame:
    rows = [[e.name, e.token, e.class_noun, e.base_model, e.rank, e.steps,
             time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created)), f"{e.size_bytes / 1024:.0f} KB"]
            for e in entries]
    return pd.DataFrame(rows, columns=LIBRARY_COLUMNS)


def chosen_name(entries: list[AdapterEntry], selected: str | None) -> str | None:
    """The adapter the Library tab shows: the one selected if it still exists, else the newest."""
    names = [e.name for e in entries]
    return selected if selected in names else (names[0] if names else None)


def _shown(value):
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


def adapter_details(entry: AdapterEntry | None) -> str:
    """The Library tab's Markdown for one adapter: its settings as a table and the prompt to use it with."""
    if entry is None:
        return EMPTY_LIBRARY
    meta = entry.meta
    mix = meta.get("mix")
    if mix:  # a saved mix: its parts and weights tell its story; steps and the class prompt do not apply
        rows = [("mix of", mix_parts(entry)), ("method", mix["method"]), ("base model", entry.base_model),
                ("rank", entry.rank), ("size", f"{entry.size_bytes / 1024:.0f} KB"), ("id", entry.id)]
        return f"### {entry.name}\n\n| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    rows = [("token", entry.token), ("class", entry.class_noun), ("base model", entry.base_model),
            ("rank / alpha", f"{entry.rank} / {entry.alpha:g}"), ("steps", entry.steps),
            ("prior weight λ", meta.get("prior_weight")), ("class images", meta.get("num_class_images")),
            ("adapter type", entry.adapter_type), ("trainable parameters", entry.trainable_params),
            ("text encoder", meta.get("text_encoder")), ("token embedding", meta.get("train_token_embedding")),
            ("final loss", meta.get("final_loss")),
            ("created", time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.created))),
            ("size", f"{entry.size_bytes / 1024:.0f} KB"), ("id", entry.id)]
    text = f"### {entry.name}\n\n| setting | value |\n|---|---|\n" + "\n".join(
        f"| {k} | {_shown(v)} |" for k, v in rows if v is not None and v != "")
    if entry.token:
        text += f"\n\nPrompt with: `a photo of {entry.token} {entry.class_noun}`"
    return text


# ----------------------------------------------------------------------------- Generate
def adapter_specs(chosen, text_apart, weights, text_weights) -> list[tuple[str, object]]:
    """The Generate tab's adapters as (name, weight) or, with text strengths set apart, (name, (unet, text))."""
    if not text_apart:
        return [(name, float(weight)) for name, weight in zip(chosen or [], weights)]
    return [(name, (float(weight), float(text))) for name, weight, text in zip(chosen or [], weights, text_weights)]


def mix_parts(entry: AdapterEntry) -> str | None:
    mix = entry.meta.get("mix")
    from dreambooth_lora.generate import format_weight  # a part's weight may be a (UNet, text) pair

    return ", ".join(f"{part['name']} × {format_weight(part['weight'])}" for part in mix["parts"]) if mix else None


def prompt_hints(entries: list[AdapterEntry]) -> str:
    """Which words call up each chosen adapter; a mix names its parts (its joined class nouns are no prompt)."""
    lines = []
    for entry in entries:
        if mix_parts(entry):
            lines.append(f"{entry.name} is a mix of {mix_parts(entry)}")
        elif entry.token:
            lines.append(f"`{entry.token}` ({entry.class_noun}) — e.g. *a photo of {entry.token} {entry.class_noun}*")
    return "Tokens: " + "; ".join(lines) if lines else ""


def mix_note(chosen: list[str], limit: int) -> str:
    """What happens to adapters past the limit of sliders: said, not silently dropped."""
    extra = list(chosen or [])[limit:]
    if not extra:
        return ""
    return f"Only the first {limit} adapters are used; ignored: {', '.join(extra)}."
