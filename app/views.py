"""What the studio shows, as plain functions: form values to a TrainConfig, job and library text and rows, and
error sentences worded for the studio's fields. No Gradio here, so each is unit-tested without a browser
(tests/test_ui_views.py); app/ui.py lays out components and calls these.
"""

from __future__ import annotations

import re
import time

import pandas as pd

from pathlib import Path

from dreambooth_lora.adapter_file import parameter_count
from dreambooth_lora.config import TrainConfig, defaults_for, uses_tiny_defaults
from dreambooth_lora.errors import UserError
from dreambooth_lora.images import photo_problem
from dreambooth_lora.jobs import ACTIVE, Job, Jobs, JobStatus, PhaseMark, phase_seconds, steps_per_second
from dreambooth_lora.library import AdapterEntry
from dreambooth_lora.models import default_base_model, native_resolution

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
    "--sample-every": "Sample every (steps)", "--sample-prompt": "Sample prompts",
    "--train-token-embedding": "Train token embedding: on", "--adapter-type": "Adapter type",
}
_FLAG = re.compile(r"--[a-z][a-z0-9-]*")


def ui_error_text(error: UserError | str) -> str:
    """A core UserError's sentence with its CLI flags replaced by the studio's field names."""
    return _FLAG.sub(lambda m: FIELD_LABELS.get(m.group(0), m.group(0)), str(error))


def queued_message(job, asked_token: str) -> str:
    """What Start says: the job queued, and the identifier the subject got when the one asked for is in use."""
    text = f"Queued **{job.name}** as job `{job.id}`; jobs run one at a time in the background."
    token = job.config.get("token")
    if token and token != asked_token:
        text += (f"\n\nThe identifier *{asked_token}* is already used by another adapter on this base model, so this "
                 f"subject is called **{token}**: prompt with *a photo of {token} {job.config.get('class_noun', '')}*.")
    return text


def signed_in_text(user: str | None, admin: bool) -> str:
    """The header line of a studio served with --users: who is working, and what they see."""
    if user is None:
        return ""
    return f"Signed in as **{user}**" + (" (admin: everyone's adapters and jobs)" if admin else "")


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
# The Train form's fields, in the order train_config takes them (app/ui.py lays the components out in this order).
FORM_FIELDS = ("token", "class_noun", "name", "base_model", "preset", "steps", "rank", "alpha", "prior_weight",
               "num_class_images", "lr", "resolution", "text_encoder", "loraplus", "seed", "token_embedding",
               "checkpoint_every", "sample_every", "sample_prompts", "adapter_type")


def train_config(num_images, token, class_noun, name, base_model, preset, steps, rank, alpha, prior_weight,
                 num_class_images, lr, resolution, text_encoder, loraplus, seed, token_embedding,
                 checkpoint_every, sample_every=0, sample_prompts="", adapter_type="lora") -> TrainConfig:
    """The Train form's values as a TrainConfig (validated there); 0 in an optional number means its default.
    Sample prompts are one per line."""
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
        checkpoint_every=_int(_blank(checkpoint_every)) or 0, sample_every=_int(_blank(sample_every)),
        sample_prompts=tuple((sample_prompts or "").splitlines()), adapter_type=adapter_type or "lora",
    )


def form_values(config: TrainConfig) -> tuple[dict, list[str]]:
    """The Train form's values for a config (train_config's inverse), and a note for each setting the form has no
    field for (kept out: the studio trains what its form shows)."""
    values = dict(
        token=config.token, class_noun=config.class_noun, name=config.name or "", base_model=config.base_model,
        preset="Balanced", steps=config.steps or 0, rank=config.rank, alpha=config.alpha or 0,
        prior_weight=config.prior_weight, num_class_images=config.num_class_images or 0, lr=config.lr or 0,
        resolution=config.resolution or 0, text_encoder=config.text_encoder, loraplus=config.loraplus_ratio or 0,
        seed=config.seed, token_embedding={None: "auto", True: "on", False: "off"}[config.train_token_embedding],
        checkpoint_every=config.checkpoint_every, sample_every=config.sample_every or 0,
        sample_prompts="\n".join(config.sample_prompts), adapter_type=config.adapter_type,
    )
    defaults = TrainConfig(token=config.token, class_noun=config.class_noun, base_model=config.base_model)
    in_form = {"name", "steps", "rank", "alpha", "prior_weight", "num_class_images", "lr", "resolution", "text_encoder",
               "loraplus_ratio", "seed", "train_token_embedding", "checkpoint_every", "sample_every", "sample_prompts",
               "token", "class_noun", "base_model", "adapter_type"}
    left_out = [f"{key} = {value!r}" for key, value in config.to_dict().items()
                if key not in in_form and value != getattr(defaults, key)]
    if config.sample_every == 0:
        left_out.append("sample_every = 0 (no samples; the form's 0 means four per run)")
    notes = [f"Not in the studio's form, so not used: {', '.join(left_out)}."] if left_out else []
    return values, notes


def resolution_for_uploads(resolution, base_model) -> int | None:
    return _int(_blank(resolution)) or native_resolution((base_model or "").strip() or default_base_model())


def check_uploads(files, base_model=None, resolution=None) -> tuple[list[str], str]:
    """The usable photos (for the previews) and one line per rejected file (unreadable, or too small or long for
    training at the form's resolution), plus how many photos there are against the 3-5 that work best."""
    files = list(files or [])
    px = resolution_for_uploads(resolution, base_model)
    problems = {f: photo_problem(Path(f), px) for f in files}  # each names the file, its size and the rule
    good = [f for f in files if problems[f] is None]
    lines = [f"**Rejected** {problem}" for problem in problems.values() if problem]
    if files and len(good) < 3:
        lines.append(f"Add {3 - len(good)} more photo(s): training needs at least 3.")
    elif len(good) > 5:
        lines.append(f"{len(good)} photos: 3-5 usually suffice; more makes training slower.")
    if good and not lines:
        lines.append(f"{len(good)} photos ready.")
    return good, "\n\n".join(lines)


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
                         "curve": ["loss"] * len(losses) + ["smoothed"] * len(losses)})


def meter_frame(record: dict) -> pd.DataFrame | None:
    """The meter plot's data (dreambooth_lora/meter.py): the photos' probe loss and the prior drift per measured step,
    as two series; None when the meter was off or has not measured yet."""
    points = record.get("meter") or []
    if not points:
        return None
    steps = [p["step"] for p in points]
    return pd.DataFrame({"step": steps * 2, "value": [p["instance_loss"] for p in points] + [p["prior_drift"] for p in points],
                         "curve": ["instance loss"] * len(points) + ["prior drift"] * len(points)})


def meter_title(record: dict) -> str:
    chosen = record.get("chosen_step")
    return "Meter (blue: photos' loss, orange: prior drift)" + (f" · chose step {chosen}" if chosen else "")


def sample_caption(stem: str, prompts) -> str:
    """A training sample's caption from its file name (step-00050, step-00050-1: the second sample prompt's); short,
    as thumbnails cut captions off: with several prompts, their numbers, which job_text lists."""
    _, step, *index = stem.split("-")
    text = f"step {int(step)}"
    if len(prompts) > 1:  # with one prompt the step says it all
        text += f" · #{int(index[0]) + 1 if index else 1}"
    return text


def duration_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


PHASE_LABELS = {"preparing": "preparing", "class_images": "class images", "training": "training",
                "checkpoint": "checkpoints", "saving": "saving", "samples": "samples"}


def monitor_text(job: Job | None, marks: list[PhaseMark], now: float | None = None) -> str:
    """The training monitor's Markdown: speed, elapsed time and ETA while training, and how long each phase took."""
    if job is None or not marks:
        return ""
    active = job.status in ACTIVE
    now = time.time() if now is None else now
    end = now if active else job.updated  # a finished job's clock stopped at its last update
    seconds = phase_seconds(marks, end)
    rate = steps_per_second(marks, end, job.step)
    parts = []
    if rate:
        parts.append(f"**{rate:.2f} it/s**" if rate < 10 else f"**{rate:.0f} it/s**")
    parts.append(f"elapsed {duration_text(sum(seconds.values()))}")
    if active and job.phase == "training" and rate and job.total:
        parts.append(f"ETA {duration_text((job.total - job.step) / rate)}")
    phases = " · ".join(f"{PHASE_LABELS.get(phase, phase)} {duration_text(value)}" for phase, value in seconds.items())
    return " · ".join(parts) + (f"\n\nPhases: {phases}" if phases else "")


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
    prompts = job.config.get("sample_prompts") or []
    if len(prompts) > 1:  # the samples' captions number them
        lines.append("Sample prompts: " + " · ".join(f"#{i} *{p}*" for i, p in enumerate(prompts, start=1)))
    return "\n\n".join(line for line in lines if line)


# ----------------------------------------------------------------------------- Library
def class_text(entry: AdapterEntry) -> str:
    """A mix's class is its parts' classes ("ball + box"); an adapter's, its class noun."""
    mix = entry.meta.get("mix")
    if not mix:
        return entry.class_noun
    nouns = [part.get("class_noun") for part in mix["parts"]]
    if all(nouns):
        return " + ".join(dict.fromkeys(nouns)) + " (mix)"
    return "mix"  # a mix saved before its parts' classes were recorded


def library_frame(entries: list[AdapterEntry]) -> pd.DataFrame:
    rows = [[e.name, e.token, class_text(e), e.base_model, e.rank, "" if e.meta.get("mix") else e.steps,
             time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created)), f"{e.size_bytes / 1024:.0f} KB"]
            for e in entries]
    return pd.DataFrame(rows, columns=LIBRARY_COLUMNS)


def gallery_height(count: int, columns: int, row_px: int = 200, chrome_px: int = 60) -> int:
    """Pixels for a gallery of `count` square thumbnails: every row shown (a tile is at most ~200 px wide in the
    studio's layout), no tall empty box under a single row."""
    return chrome_px + row_px * max(1, -(-count // columns))


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


TYPE_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr", "qrlora": "QR-LoRA", "vera": "VeRA",
              "adalora": "AdaLoRA"}  # adapter_types.py and research_types.py names, as written


def adapter_kind(entry: AdapterEntry) -> str:
    """What the file holds, in words: where its LoRA layers sit and whether it carries an identifier embedding."""
    meta = entry.meta
    if meta.get("mix"):
        kind = f"mix ({'exact concatenation' if meta['mix']['method'] == 'cat' else meta['mix']['method']})"
    else:
        kind = f"{TYPE_NAMES.get(entry.adapter_type, entry.adapter_type)} on the UNet attention"
        if meta.get("text_encoder") in ("lora", "qlora"):
            kind += f" + text-encoder {'QLoRA' if meta['text_encoder'] == 'qlora' else 'LoRA'}"
    if meta.get("train_token_embedding"):
        kind += " + identifier embedding"
    if meta.get("imported_format"):
        kind += f", imported from a {meta['imported_format']} file"
    return kind


def _parameters(entry: AdapterEntry) -> str | None:
    """The values training learned (recorded when it was stored), else the numbers in the file (older adapters)."""
    if entry.trainable_params is not None:
        return f"{entry.trainable_params:,}"
    try:
        return f"{parameter_count(entry.file):,}"
    except UserError:  # a file gone or unreadable: the other rows still tell the story
        return None


def _table(entry: AdapterEntry, rows) -> str:
    return f"### {entry.name}\n\n| setting | value |\n|---|---|\n" + "\n".join(
        f"| {k} | {_shown(v)} |" for k, v in rows if v is not None and v != "")


def adapter_details(entry: AdapterEntry | None) -> str:
    """The Library tab's Markdown for one adapter: how it was made (photos, settings, time), what it is (type,
    parameters) and the prompt to use it with; for a mix, its parts and weights instead of training settings."""
    if entry is None:
        return EMPTY_LIBRARY
    meta = entry.meta
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.created))
    size = f"{entry.size_bytes / 1024:.0f} KB"
    mix = meta.get("mix")
    if mix:  # a saved mix: its parts and weights tell its story; steps and the class prompt do not apply
        rows = [("mix of", mix_parts(entry)), ("class", class_text(entry)), ("type", adapter_kind(entry)),
                ("base model", entry.base_model), ("rank", entry.rank), ("parameters", _parameters(entry)),
                ("created", created), ("size", size), ("id", entry.id)]
        return _table(entry, rows) + f"\n\nPrompt with its parts' words, e.g. {mix_prompt(entry)}"
    seconds = meta.get("training_seconds")
    rows = [("token", entry.token), ("class", entry.class_noun), ("type", adapter_kind(entry)),
            ("parameters", _parameters(entry)), ("base model", entry.base_model),
            ("training photos", meta.get("num_images") or (len(entry.photos) or None)),
            ("steps", entry.steps or None), ("learning rate", meta.get("lr")), ("seed", meta.get("seed")),
            ("rank / alpha", f"{entry.rank} / {entry.alpha:g}"), ("batch", meta.get("batch_size")),
            ("prior weight λ", meta.get("prior_weight")), ("class images", meta.get("num_class_images")),
            ("text encoder", meta.get("text_encoder")), ("token embedding", meta.get("train_token_embedding")),
            ("training time", duration_text(seconds) if seconds is not None else None),
            ("final loss", meta.get("final_loss")),
            ("imported from", Path(meta["imported_from"]).name if meta.get("imported_from") else None),
            ("created", created), ("size", size), ("id", entry.id)]
    text = _table(entry, rows)
    if entry.token:
        text += f"\n\nPrompt with: `a photo of {entry.token} {entry.class_noun}`"
    return text


def mix_prompt(entry: AdapterEntry) -> str:
    words = [f"`{p['token']} {p['class_noun']}`" for p in entry.meta["mix"]["parts"] if p.get("token")]
    return " and ".join(dict.fromkeys(words)) if words else "the prompts of the adapters it mixes"


# ----------------------------------------------------------------------------- Generate
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
