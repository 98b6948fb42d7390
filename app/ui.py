"""The studio's Gradio Blocks: Train (with jobs), Library and Generate tabs.

A view only: handlers turn form values into dreambooth_lora calls and results into components.
Training runs in the worker process (dreambooth_lora.worker); this process only writes job rows.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image

from dreambooth_lora.config import TEXT_ENCODER_MODES, TrainConfig, defaults_for, uses_tiny_defaults
from dreambooth_lora.errors import UserError
from dreambooth_lora.generate import AdapterSession, GenerateSettings, base_model_for, resolve_adapters
from dreambooth_lora.images import photo_problem
from dreambooth_lora.library import Library
from dreambooth_lora.models import builtin_names, default_base_model, load_base_model, native_resolution
from dreambooth_lora.tinyworld import SUBJECTS, subject_image_paths
from dreambooth_lora.jobs import ACTIVE, RESUMABLE, Job, Jobs, JobStatus

MAX_MIX = 4  # sliders in the Generate tab's fixed pool
REFRESH_SECONDS = 1.5
# Presets scale the model's default step count and pick a rank; Balanced is exactly the core defaults.
PRESETS = {
    "Fast": {"rank": 4, "steps_scale": 0.5},
    "Balanced": {"rank": 8, "steps_scale": 1.0},
    "Best": {"rank": 16, "steps_scale": 1.5},
}
PHASES = {"class_images": "Class images", "training": "Step", "saving": "Saving", "preparing": "Preparing"}


class ModelCache:
    """Loaded base models with their AdapterSession, keyed by base-model name (the last `size` kept)."""

    def __init__(self, size: int = 1):
        self.size = size
        self.sessions: OrderedDict[str, AdapterSession] = OrderedDict()
        self.lock = threading.Lock()  # one generation at a time per process: a session is stateful

    def session(self, base_model: str) -> AdapterSession:
        if base_model in self.sessions:
            self.sessions.move_to_end(base_model)
        else:
            self.sessions[base_model] = AdapterSession(load_base_model(base_model))
            while len(self.sessions) > self.size:
                self.sessions.popitem(last=False)
        return self.sessions[base_model]


def user_errors(handler):
    """Show a UserError's sentence as a visible error message instead of a traceback."""

    def wrapped(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except UserError as error:
            raise gr.Error(str(error), print_exception=False) from None

    wrapped.__name__ = handler.__name__
    return wrapped


def build_ui(library: Library, prior_dir: Path | None = None) -> gr.Blocks:
    cache = ModelCache()
    with gr.Blocks(title="DreamBooth-LoRA Studio") as demo:
        gr.Markdown("# DreamBooth-LoRA Studio\nTrain a subject from a few photos, then mix subjects with sliders.")
        timer = gr.Timer(REFRESH_SECONDS)
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                train_tab(library, timer)
            with gr.Tab("Library", id="library"):
                library_refresh = library_tab(library, timer)
            with gr.Tab("Generate", id="generate"):
                generate_tab(library, cache, timer, library_refresh)
    return demo


# ----------------------------------------------------------------------------- Train
def train_tab(library: Library, timer: gr.Timer) -> None:
    with gr.Row():
        with gr.Column(scale=3):
            uploads = gr.File(label="Subject photos (3-5 work best, up to 20)", file_count="multiple",
                              file_types=["image"], type="filepath", elem_id="train-images")
            upload_notes = gr.Markdown(elem_id="upload-notes")
            previews = gr.Gallery(label="Previews", columns=6, height=130, show_label=False, interactive=False,
                                  allow_preview=False, fit_columns=False)
            with gr.Row():
                token = gr.Textbox(label="Token", value="sks", info="a rare word that will mean your subject",
                                   elem_id="train-token")
                class_noun = gr.Textbox(label="Class noun", placeholder="dog", info="what the subject is",
                                        elem_id="train-class")
                name = gr.Textbox(label="Subject name", placeholder="(default: token-class-date)", elem_id="train-name")
            gr.Examples(
                examples=[[[str(p) for p in subject_image_paths(n)], "sks", SUBJECTS[n].cls, n] for n in SUBJECTS],
                inputs=[uploads, token, class_noun, name], label="Example subjects (tiny world, 32x32)",
            )
            with gr.Row():
                base_model = gr.Dropdown(builtin_names(), value=default_base_model(), allow_custom_value=True,
                                         label="Base model", info="a built-in, a hub id, a diffusers folder or a .safetensors file",
                                         elem_id="train-base-model")
                preset = gr.Radio(list(PRESETS), value="Balanced", label="Preset",
                                  info="Fast: half the steps, rank 4. Best: 1.5x steps, rank 16.")
            with gr.Accordion("Advanced", open=False):
                with gr.Row():
                    steps = gr.Number(label="Steps", value=0, precision=0, info="0: the preset x the model's default",
                                      elem_id="adv-steps")
                    rank = gr.Slider(1, 64, value=8, step=1, label="LoRA rank")
                    alpha = gr.Number(label="LoRA alpha", value=0, info="0: equal to the rank")
                with gr.Row():
                    prior_weight = gr.Number(label="Prior weight λ", value=1.0, info="0 disables class priors")
                    num_class_images = gr.Number(label="Class images", value=0, precision=0,
                                                 info="0: the model's default (λ = 0 trains without)", elem_id="adv-class-images")
                    lr = gr.Number(label="Learning rate", value=0, info="0: the model's default (1e-4 real, 1e-3 built-in)")
                with gr.Row():
                    resolution = gr.Number(label="Resolution (px)", value=0, precision=0, info="0: the model's native size")
                    text_encoder = gr.Radio(list(TEXT_ENCODER_MODES), value="none", label="Text encoder")
                    loraplus = gr.Number(label="LoRA+ ratio", value=0, info="0: off; 16 is the paper's")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0)
                    token_embedding = gr.Radio(["auto", "on", "off"], value="auto", label="Train token embedding",
                                               info="auto: on for built-in models")
                    checkpoint_every = gr.Number(label="Checkpoint every (steps)", value=100, precision=0,
                                                 info="and every 2 minutes; 0: by time only")
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="start-training")
            start_message = gr.Markdown(elem_id="start-message")
        with gr.Column(scale=2):
            job_choice = gr.Dropdown(label="Job", choices=[], value=None, elem_id="job-choice")
            job_status = gr.Markdown("No jobs yet: upload photos and press Start.", elem_id="job-status")
            loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=220, label="Loss")
            samples = gr.Gallery(label="Samples while training", columns=4, height=150, interactive=False, fit_columns=False)
            with gr.Row():
                cancel = gr.Button("Cancel", variant="stop", visible=False, elem_id="cancel-job")
                resume = gr.Button("Resume", visible=False, elem_id="resume-job")
    jobs_table = gr.Dataframe(headers=["job", "subject", "status", "progress", "updated"], label="Jobs",
                              interactive=False, elem_id="jobs-table")
    seen = gr.State(None)

    # the photo rules depend on the training resolution, so the notes follow the model and resolution fields too
    for source in (uploads, base_model, resolution):
        source.change(check_uploads, [uploads, base_model, resolution], [previews, upload_notes])
    preset.change(lambda p: PRESETS[p]["rank"], preset, rank)

    def start_clicked(files, *form):
        try:
            checked = _train_config(len(files or []), *form)  # validated once here for the photos' resolution
            px = checked.resolution or native_resolution(checked.base_model)
            accepted = [f for f in files or [] if _image_problem(f, px) is None]
            config = _train_config(len(accepted), *form)
            job_id = Jobs(library).create(config, accepted)
        except UserError as error:
            gr.Warning(str(error))
            return f"**Error:** {error}", gr.skip()
        name = Jobs(library).get(job_id).name
        message = f"Queued **{name}** as job `{job_id}`; jobs run one at a time in the background."
        return message, gr.update(choices=_job_choices(library), value=job_id)

    form = [token, class_noun, name, base_model, preset, steps, rank, alpha, prior_weight, num_class_images, lr,
            resolution, text_encoder, loraplus, seed, token_embedding, checkpoint_every]
    start.click(start_clicked, [uploads, *form], [start_message, job_choice])

    job_outputs = [jobs_table, job_choice, job_status, loss_plot, samples, cancel, resume, seen]

    def refresh(selected, last_seen):
        jobs = Jobs(library).list()
        if selected not in {j.id for j in jobs}:
            selected = jobs[0].id if jobs else None
        signature = (selected, tuple((j.id, j.status, j.updated) for j in jobs))
        if signature == last_seen:
            return [gr.skip()] * len(job_outputs)
        return [_jobs_frame(jobs), gr.update(choices=_job_choices(library, jobs), value=selected),
                *job_view(library, selected), signature]

    timer.tick(refresh, [job_choice, seen], job_outputs, show_progress="hidden")
    job_choice.change(lambda s: refresh(s, None), [job_choice], job_outputs, show_progress="hidden")

    @user_errors
    def cancel_clicked(job_id):
        gr.Info(f"Job {job_id}: {Jobs(library).cancel(job_id)}.")
        return None

    @user_errors
    def resume_clicked(job_id):
        gr.Info(f"Job {job_id}: queued again; it {Jobs(library).resume(job_id)}.")
        return None

    cancel.click(cancel_clicked, job_choice, seen)
    resume.click(resume_clicked, job_choice, seen)


def check_uploads(files, base_model=None, resolution=None):
    """Previews of the usable photos and one line per rejected file (unreadable, or too small or long for training)."""
    files = files or []
    px = _int(_blank(resolution)) or native_resolution((base_model or "").strip() or default_base_model())
    problems = {f: _image_problem(f, px) for f in files}
    good = [f for f in files if problems[f] is None]
    lines = [f"**Rejected** {problem}" for problem in problems.values() if problem]
    if files and len(good) < 3:
        lines.append(f"Add {3 - len(good)} more photo(s): training needs at least 3.")
    elif len(good) > 5:
        lines.append(f"{len(good)} photos: 3-5 usually suffice; more makes training slower.")
    if good and not lines:
        lines.append(f"{len(good)} photos ready.")
    return good, "\n\n".join(lines)


def _image_problem(path, resolution: int | None) -> str | None:
    return photo_problem(Path(path), resolution)  # names the file, its size and the rule


def _blank(value):
    # gr.Number sends 0 for an empty box, so 0 means "the default" for the optional numbers.
    return None if value in (None, "", 0) else value


def _train_config(num_images, token, class_noun, name, base_model, preset, steps, rank, alpha, prior_weight,
                  num_class_images, lr, resolution, text_encoder, loraplus, seed, token_embedding, checkpoint_every):
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
        checkpoint_every=_int(_blank(checkpoint_every)) or 0,
    )


def _int(value):
    return None if value is None else int(value)


def _job_choices(library: Library, jobs: list[Job] | None = None) -> list[tuple[str, str]]:
    jobs = Jobs(library).list() if jobs is None else jobs
    return [(f"{j.name or j.id} · {j.status}", j.id) for j in jobs]


def _progress_text(job: Job) -> str:
    status, phase, step, total = job.status, job.phase, job.step, job.total
    if status in ACTIVE:
        if phase == "class_images":
            return f"class images {step} of {total}"
        if phase == "training":
            return f"step {step} of {total}"
        return phase or "preparing"
    if status in ("interrupted", "cancelled") and total:
        return f"stopped at step {step} of {total}"
    if status == "failed":
        return "error"
    if status == "done":
        return f"{total} steps"
    return status


def _jobs_frame(jobs: list[Job]) -> pd.DataFrame:
    return pd.DataFrame(
        [[j.id, j.name, str(j.status), _progress_text(j),
          time.strftime("%H:%M:%S", time.localtime(j.updated or j.created))] for j in jobs],
        columns=["job", "subject", "status", "progress", "updated"],
    )


def job_view(library: Library, job_id: str | None) -> list:
    """Status text, loss plot, samples and button visibility for one job."""
    if job_id is None:
        return ["No jobs yet: upload photos and press Start.", None, [], gr.update(visible=False), gr.update(visible=False)]
    jobs = Jobs(library)
    job = jobs.get(job_id)
    status = job.status
    progress = _progress_text(job)
    lines = [f"### {job.name or job_id}", f"**{status}**" + (f" · {progress}" if progress != status else "")]
    if status in ACTIVE and job.phase == "preparing" and job.message:
        lines.append(job.message)
    elif status == JobStatus.QUEUED:
        queued = [j.id for j in sorted(jobs.list((JobStatus.QUEUED,)), key=lambda j: j.created)]
        lines.append(f"waiting: position {queued.index(job_id) + 1} in the queue" if job_id in queued else "")
    elif status == JobStatus.FAILED:
        lines.append(f"**Error:** {job.error}")
    elif status in (JobStatus.INTERRUPTED, JobStatus.CANCELLED):
        lines.append(job.message)
    elif status == JobStatus.DONE and job.adapter_id:
        lines.append(f"{job.message}: find it in the Library tab.")
    if job.losses:
        lines.append(f"last loss {job.losses[-1]:.4f}")
    losses = pd.DataFrame({"step": range(1, len(job.losses) + 1), "loss": job.losses})
    sample_files = sorted((job.folder / "samples").glob("step-*.png"))
    gallery = [(str(p), f"step {int(p.stem.split('-')[1])}") for p in sample_files]
    return [
        "\n\n".join(line for line in lines if line), losses if len(losses) else None, gallery,
        gr.update(visible=status in (JobStatus.QUEUED, JobStatus.RUNNING)),
        gr.update(visible=status in RESUMABLE),
    ]


# ----------------------------------------------------------------------------- Library
def library_tab(library: Library, timer: gr.Timer):
    """Returns the listing's signature state: other tabs clear it to redraw the library after adding adapters."""
    gallery = gr.Gallery(label="Adapters", columns=6, height=220, allow_preview=False, interactive=False, fit_columns=False,
                         elem_id="library-gallery")
    table = gr.Dataframe(headers=["name", "token", "class", "base model", "rank", "steps", "created", "size"],
                         interactive=False, label="Adapters", elem_id="library-table")
    with gr.Row():
        with gr.Column(scale=2):
            chosen = gr.Dropdown(label="Adapter", choices=[], value=None, elem_id="library-choice")
            details = gr.Markdown(elem_id="library-details")
            adapter_samples = gr.Gallery(label="Samples", columns=4, height=140, interactive=False)
        with gr.Column(scale=2):
            with gr.Row():
                new_name = gr.Textbox(label="New name", scale=3)
                rename = gr.Button("Rename", scale=1)
            delete = gr.Button("Delete…", variant="stop", elem_id="library-delete")
            with gr.Group(visible=False) as confirm_box:
                confirm_text = gr.Markdown()
                with gr.Row():
                    confirm = gr.Button("Yes, delete it", variant="stop", elem_id="library-delete-confirm")
                    keep = gr.Button("Keep it")
            with gr.Row():
                export_format = gr.Radio(["diffusers", "kohya"], value="diffusers", label="Download format")
                export = gr.Button("Export", elem_id="library-export")
            export_file = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="library-download")
            with gr.Accordion("Import a LoRA file", open=False):
                import_file = gr.File(label="LoRA .safetensors", file_types=[".safetensors"], type="filepath",
                                      elem_id="import-file")
                import_embedding = gr.File(label="Its identifier embedding (optional: the .embedding.safetensors a kohya "
                                           "export writes beside the LoRA)", file_types=[".safetensors"], type="filepath",
                                           elem_id="import-embedding")
                with gr.Row():
                    import_name = gr.Textbox(label="Name", placeholder="(from the file name)", elem_id="import-name")
                    import_token = gr.Textbox(label="Token")
                    import_class = gr.Textbox(label="Class noun")
                import_base = gr.Dropdown(builtin_names(), value=None, allow_custom_value=True,
                                          label="Base model it was trained for (empty: the one the file names)",
                                          elem_id="import-base")
                import_button = gr.Button("Import", elem_id="import-button")
            action_message = gr.Markdown(elem_id="library-message")
    seen = gr.State(None)
    outputs = [gallery, table, chosen, seen]

    def listing(selected, last_seen):
        entries = library.list()
        signature = tuple((e.id, e.name) for e in entries)
        if signature == last_seen:
            return [gr.skip()] * len(outputs)
        names = [e.name for e in entries]
        selected = selected if selected in names else (names[0] if names else None)
        thumbs = [(str(e.samples[0]) if e.samples else _placeholder(), e.name) for e in entries]
        rows = [[e.name, e.token, e.class_noun, e.base_model, e.rank, e.steps,
                 time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created)), f"{e.size_bytes / 1024:.0f} KB"]
                for e in entries]
        frame = pd.DataFrame(rows, columns=["name", "token", "class", "base model", "rank", "steps", "created", "size"])
        return [thumbs, frame, gr.update(choices=names, value=selected), signature]

    timer.tick(listing, [chosen, seen], outputs, show_progress="hidden")

    def show(name):
        if not name or not library.name_taken(name):
            return "The library is empty: train a subject in the Train tab.", [], gr.update(visible=False)
        entry = library.get(name)
        meta = entry.meta
        rows = [("token", entry.token), ("class", entry.class_noun), ("base model", entry.base_model),
                ("rank / alpha", f"{entry.rank} / {entry.alpha:g}"), ("steps", entry.steps),
                ("prior weight λ", meta.get("prior_weight")), ("class images", meta.get("num_class_images")),
                ("text encoder", meta.get("text_encoder")), ("token embedding", meta.get("train_token_embedding")),
                ("final loss", meta.get("final_loss")), ("created", time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.created))),
                ("size", f"{entry.size_bytes / 1024:.0f} KB"), ("id", entry.id)]
        text = f"### {entry.name}\n\n| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows if v is not None)
        if entry.token:
            text += f"\n\nPrompt with: `a photo of {entry.token} {entry.class_noun}`"
        return text, [str(p) for p in entry.samples], gr.update(visible=False)

    chosen.change(show, chosen, [details, adapter_samples, confirm_box])
    gallery.select(_select_by_index(library), None, chosen)

    @user_errors
    def do_rename(name, new):
        entry = library.rename(_need(name), (new or "").strip())
        return f"Renamed to **{entry.name}**.", None, entry.name

    rename.click(do_rename, [chosen, new_name], [action_message, seen, chosen])

    delete.click(lambda name: (gr.update(visible=bool(name)), f"Delete **{name}** and its samples? This cannot be undone."),
                 chosen, [confirm_box, confirm_text])
    keep.click(lambda: gr.update(visible=False), None, confirm_box)

    @user_errors
    def do_delete(name):
        library.delete(_need(name))
        return f"Deleted **{name}**.", None, gr.update(visible=False)

    confirm.click(do_delete, chosen, [action_message, seen, confirm_box])

    @user_errors
    def do_export(name, fmt):
        try:
            from dreambooth_lora.formats import export_adapter, sidecar_path
        except ImportError:
            raise UserError("Export is not available yet (dreambooth_lora.formats is missing).") from None
        entry = library.get(_need(name))
        out, notes = export_adapter(entry, fmt, Path(tempfile.mkdtemp(prefix="dbl-export-")) / f"{entry.name}.{fmt}.safetensors")
        for note in notes:
            gr.Info(note)
        # A kohya export keeps a learned identifier embedding in a sidecar file next to the LoRA.
        return [str(path) for path in (out, sidecar_path(out)) if path.exists()]

    export.click(do_export, [chosen, export_format], export_file)

    @user_errors
    def do_import(file, embedding, name, token, class_noun, base_model):
        if not file:
            raise UserError("Choose a LoRA .safetensors file to import.")
        try:
            from dreambooth_lora.formats import import_adapter
        except ImportError:
            raise UserError("Import is not available yet (dreambooth_lora.formats is missing).") from None
        entry, notes = import_adapter(library, Path(file), name=(name or "").strip() or None,
                                      base_model=(base_model or "").strip() or None,
                                      token=(token or "").strip(), class_noun=(class_noun or "").strip(),
                                      sidecar=Path(embedding) if embedding else None)
        return "\n\n".join([f"Imported **{entry.name}** for {entry.base_model}.", *notes]), None

    import_button.click(do_import, [import_file, import_embedding, import_name, import_token, import_class, import_base], [action_message, seen])

    return seen


def _select_by_index(library: Library):
    def select(evt: gr.SelectData):
        entries = library.list()
        return entries[evt.index].name if evt.index < len(entries) else gr.skip()

    return select


def _need(name):
    if not name:
        raise UserError("Choose an adapter first.")
    return name


_PLACEHOLDER: list[Image.Image] = []


def _placeholder() -> Image.Image:
    if not _PLACEHOLDER:
        _PLACEHOLDER.append(Image.new("RGB", (64, 64), (200, 200, 200)))
    return _PLACEHOLDER[0]


# ----------------------------------------------------------------------------- Generate
def generate_tab(library: Library, cache: ModelCache, timer: gr.Timer, library_seen: gr.State) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", placeholder="a photo of sks dog on the moon", elem_id="gen-prompt")
            hints = gr.Markdown(elem_id="gen-hints")
            negative = gr.Textbox(label="Negative prompt")
            picker = gr.Dropdown(label=f"Adapters (up to {MAX_MIX})", choices=[], multiselect=True, max_choices=MAX_MIX,
                                 elem_id="gen-adapters")
            sliders = [gr.Slider(-1, 2, value=1.0, step=0.05, label=f"weight {i + 1}", visible=False,
                                 elem_id=f"gen-weight-{i}") for i in range(MAX_MIX)]
            base_model = gr.Dropdown(builtin_names(), value=default_base_model(), allow_custom_value=True,
                                     label="Base model (used when no adapter is chosen)")
            with gr.Row():
                seed = gr.Number(label="Seed", value=0, precision=0)
                steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                guidance = gr.Slider(0, 20, value=5.0, step=0.5, label="Guidance")
            with gr.Row():
                size = gr.Number(label="Size (px)", value=0, precision=0, info="0: the model's native size")
                count = gr.Slider(1, 8, value=4, step=1, label="Images")
            run = gr.Button("Generate", variant="primary", elem_id="gen-run")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images", columns=4, height=360, interactive=False, elem_id="gen-gallery")
            gen_message = gr.Markdown(elem_id="gen-message")
            with gr.Row():
                mix_name = gr.Textbox(label="Save this mix as", placeholder="new adapter name", scale=3, elem_id="mix-name")
                save_mix = gr.Button("Save mix as adapter", scale=1, elem_id="mix-save")
    seen = gr.State(None)

    def adapter_choices(selected, last_seen):
        names = [e.name for e in library.list()]
        if names == last_seen:
            return gr.skip(), gr.skip()
        return gr.update(choices=names, value=[n for n in (selected or []) if n in names]), names

    timer.tick(adapter_choices, [picker, seen], [picker, seen], show_progress="hidden")

    def chosen_changed(chosen):
        chosen = chosen or []
        updates = [gr.update(visible=i < len(chosen), label=f"{chosen[i]} weight" if i < len(chosen) else f"weight {i + 1}")
                   for i in range(MAX_MIX)]
        hint_lines = []
        for name in chosen:
            if library.name_taken(name):
                entry = library.get(name)
                if entry.token:
                    hint_lines.append(f"`{entry.token}` ({entry.class_noun}) — e.g. *a photo of {entry.token} {entry.class_noun}*")
        hint = "Tokens: " + "; ".join(hint_lines) if hint_lines else ""
        return [hint, *updates]

    picker.change(chosen_changed, picker, [hints, *sliders])

    def specs(chosen, weights):
        return [(name, float(weight)) for name, weight in zip(chosen or [], weights)]

    @user_errors
    def generate(prompt_text, negative_text, base, chosen, seed_value, steps_value, guidance_value, size_value,
                 count_value, *weights):
        adapters = resolve_adapters(library, specs(chosen, weights))
        model_name = base_model_for(adapters, None, (base or "").strip() or default_base_model())
        settings = GenerateSettings(
            prompt=prompt_text or "", negative_prompt=negative_text or "", num_images=int(count_value),
            steps=int(steps_value), guidance=float(guidance_value), seed=int(seed_value or 0),
            size=int(size_value) if size_value else None,
            adapters=tuple(specs(chosen, weights)),
        )
        started = time.time()
        with cache.lock:
            session = cache.session(model_name)
            session.apply(adapters)
            images = session.generate(settings)
        mix = ", ".join(f"{n} × {w:g}" for n, w in settings.adapters) or "no adapters"
        return images, f"{len(images)} images from {model_name} with {mix} in {time.time() - started:.1f} s."

    run.click(generate, [prompt, negative, base_model, picker, seed, steps, guidance, size, count, *sliders],
              [gallery, gen_message])

    @user_errors
    def save(chosen, name, *weights):
        if not chosen:
            raise UserError("Choose the adapters to mix first.")
        try:
            from dreambooth_lora.mixing import mix_adapters
        except ImportError:
            raise UserError("Saving mixes is not available yet (dreambooth_lora.mixing is missing).") from None
        entry, _ = mix_adapters(library, specs(chosen, weights), (name or "").strip(), method="cat")
        return f"Saved the mix as **{entry.name}** (exact concatenation, rank {entry.rank}).", None

    save_mix.click(save, [picker, mix_name, *sliders], [gen_message, library_seen])
