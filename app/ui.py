"""The studio's Gradio Blocks: Train (with jobs), Library and Generate tabs.

A view only: handlers turn form values into dreambooth_lora calls and results into components.
Training runs in the worker process (dreambooth_lora.worker); this process only writes job rows.
Each handler acts through the library of the person logged in (`scoped(request)`: with `serve --users`, the
user's own adapters, jobs and history; without it, the whole library).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Callable

import gradio as gr
from PIL import Image

from app import generation as gen
from app import settings_file, views
from app.generation import MAX_MIX, ModelCache
from app.views import PRESETS
from dreambooth_lora.config import ADAPTER_TYPES, TEXT_ENCODER_MODES
from dreambooth_lora.errors import UserError
from dreambooth_lora.history import get_generation, recent_generations, zip_generation
from dreambooth_lora.jobs import FINISHED, Jobs, JobStatus
from dreambooth_lora.library import Library
from dreambooth_lora.models import builtin_names, default_base_model
from dreambooth_lora.sweep import DEFAULT_WEIGHTS
from dreambooth_lora.tinyworld import SUBJECTS, subject_image_paths
from dreambooth_lora.users import UsersFile

REFRESH_SECONDS = 1.5
GALLERY_COLUMNS = 6  # thumbnails per row in the Library's gallery


def shows_errors(message: gr.components.Component):
    """A handler returning a dict of updates shows a UserError as an error line in `message`, worded for the
    studio's fields: no traceback, no toast that piles up, no error badge left on other components."""

    def decorate(handler):
        # wraps: Gradio reads the handler's signature, e.g. an `evt: gr.SelectData` argument it must fill in
        @functools.wraps(handler)
        def wrapped(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except UserError as error:
                return {message: views.error_markdown(error)}

        return wrapped

    return decorate


Scoped = Callable[[gr.Request], Library]  # the library of the person making a request


def request_scope(library: Library, users: UsersFile | None = None) -> Scoped:
    """The one place a request becomes a library: the logged-in user's view with a users file, else `library`."""
    if users is None:
        return lambda request: library  # today's single user (with or without --auth)
    return lambda request: users.library_for(library, getattr(request, "username", None))


def build_ui(library: Library, prior_dir: Path | None = None, users: UsersFile | None = None) -> gr.Blocks:
    cache = ModelCache()
    scoped = request_scope(library, users)
    with gr.Blocks(title="DreamBooth-LoRA Studio") as demo:
        gr.Markdown("# DreamBooth-LoRA Studio\nTrain a subject from a few photos, then mix subjects with sliders.")
        if users is not None:  # several users: who is signed in, and Gradio's own /logout
            with gr.Row():
                signed_in = gr.Markdown(elem_id="signed-in")
                gr.Button("Log out", link="/logout", size="sm", scale=0, elem_id="log-out")

            def who(request: gr.Request) -> str:
                mine = scoped(request)
                return views.signed_in_text(mine.user, mine.admin)

            demo.load(who, None, signed_in)
        timer = gr.Timer(REFRESH_SECONDS)
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                train_tab(demo, scoped, timer)
            with gr.Tab("Library", id="library"):
                library_refresh = library_tab(scoped, timer)
            with gr.Tab("Generate", id="generate"):
                generate_tab(demo, scoped, cache, timer, library_refresh)
    return demo


# ----------------------------------------------------------------------------- Train
def train_tab(demo: gr.Blocks, scoped: Scoped, timer: gr.Timer) -> None:
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
            subjects = list(SUBJECTS)
            examples = gr.Gallery([(str(subject_image_paths(n)[0]), n) for n in subjects], columns=8, height=150,
                                  label="Example subjects (tiny world, 32x32): pick one to fill the form",
                                  allow_preview=False, interactive=False, fit_columns=False, elem_id="example-subjects")
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
                    lr = gr.Number(label="Learning rate", value=0, info="0: the model's default (1e-4 real, 7e-4 built-in)")
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
                    sample_every = gr.Number(label="Sample every (steps)", value=0, precision=0, scale=1,
                                             info="0: four times per run", elem_id="adv-sample-every")
                    sample_prompts = gr.Textbox(label="Sample prompts", lines=2, scale=3, elem_id="adv-sample-prompts",
                                                placeholder="one per line, up to 4 (empty: a photo of <token> <class>)",
                                                info="drawn while training and saved with the adapter")
                with gr.Row():
                    adapter_type = gr.Radio(list(ADAPTER_TYPES), value="lora", label="Adapter type", elem_id="adv-adapter-type",
                                            info=views.ADAPTER_TYPE_INFO)
            with gr.Accordion("Settings file", open=False, elem_id="settings-box"):
                settings_upload = gr.File(label="Import settings (.settings.json from Export settings): fills the form",
                                          file_types=[".json"], type="filepath", elem_id="settings-import")
                settings_message = gr.Markdown(elem_id="settings-message")
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="start-training")
            start_message = gr.Markdown(elem_id="start-message")
        with gr.Column(scale=2, elem_id="job-panel"):
            # allow_custom_value: a tick in flight may carry a job just deleted (see the Library's adapter dropdown)
            job_choice = gr.Dropdown(label="Job", choices=[], value=None, allow_custom_value=True, elem_id="job-choice")
            # empty until the first refresh: "no jobs" shown before the jobs are read would be wrong after a reload
            job_status = gr.Markdown("", elem_id="job-status")
            monitor = gr.Markdown("", elem_id="job-monitor")
            loss_plot = gr.LinePlot(x="step", y="loss", color="curve", title="Training loss (blue: per step, orange: smoothed)",
                                    color_map={"loss": "#4c78a8", "smoothed": "#f58518"}, height=260,
                                    label="Loss", elem_id="loss-plot")
            meter_plot = gr.LinePlot(x="step", y="value", color="curve", title="Meter", height=220, visible=False,
                                     color_map={"instance loss": "#4c78a8", "prior drift": "#f58518"},
                                     label="Meter (train --meter-every)", elem_id="meter-plot")
            samples = gr.Gallery(label="Samples while training", columns=4, height=150, interactive=False, fit_columns=False,
                                 elem_id="train-samples")
            with gr.Row():
                cancel = gr.Button("Cancel", variant="stop", visible=False, elem_id="cancel-job")
                resume = gr.Button("Resume", visible=False, elem_id="resume-job")
                again = gr.Button("Train again", visible=False, elem_id="train-again")
                delete_job = gr.Button("Delete job", visible=False, elem_id="delete-job")
                export_settings = gr.Button("Export settings", visible=False, elem_id="export-settings")
            job_message = gr.Markdown(elem_id="job-message")
            settings_file_out = gr.File(label="Download settings (.json)", visible=False, interactive=False, elem_id="settings-download")
            with gr.Accordion("Log", open=False, elem_id="job-log-box"):
                job_log = gr.Textbox(show_label=False, lines=10, max_lines=10, interactive=False, autoscroll=True,
                                     elem_id="job-log")
    jobs_table = gr.Dataframe(headers=views.JOB_COLUMNS, label="Jobs", interactive=False, elem_id="jobs-table")
    seen = gr.State(None)

    # the photo rules depend on the training resolution, so the notes follow the model and resolution fields too
    for source in (uploads, base_model, resolution):
        source.change(views.check_uploads, [uploads, base_model, resolution], [previews, upload_notes])
    preset.input(lambda p: PRESETS[p]["rank"], preset, rank)  # a person's pick; an imported rank stays

    def example_picked(evt: gr.SelectData):
        subject = subjects[evt.index]
        return {uploads: [str(p) for p in subject_image_paths(subject)], token: SUBJECTS[subject].identifier, class_noun: SUBJECTS[subject].cls,
                name: subject}

    examples.select(example_picked, None, {uploads, token, class_noun, name})

    fields = dict(token=token, class_noun=class_noun, name=name, base_model=base_model, preset=preset, steps=steps,
                  rank=rank, alpha=alpha, prior_weight=prior_weight, num_class_images=num_class_images, lr=lr,
                  resolution=resolution, text_encoder=text_encoder, loraplus=loraplus, seed=seed,
                  token_embedding=token_embedding, checkpoint_every=checkpoint_every, sample_every=sample_every,
                  sample_prompts=sample_prompts, adapter_type=adapter_type)
    form = [fields[key] for key in views.FORM_FIELDS]

    @shows_errors(start_message)
    def start_clicked(request: gr.Request, files, *form_values):
        checked = views.train_config(len(files or []), *form_values)  # validated once here for the photos' resolution
        accepted, _ = views.check_uploads(files, checked.base_model, checked.resolution)
        jobs = Jobs(scoped(request))
        config = views.train_config(len(accepted), *form_values)
        job_id = jobs.create(config, accepted)
        message = views.queued_message(jobs.get(job_id), config.token)
        return {start_message: message, job_choice: gr.update(choices=views.job_choices(jobs.list()), value=job_id)}

    start.click(start_clicked, [uploads, *form], {start_message, job_choice})

    @shows_errors(settings_message)
    def settings_imported(request: gr.Request, path):
        if not path:
            return {settings_message: ""}
        config = settings_file.read_settings(Path(path))
        values, notes = views.form_values(config)
        if values["name"]:  # the job it came from has most likely saved an adapter under this name
            values["name"] = scoped(request).free_name(values["name"])
        lines = [f"Settings of **{config.name or config.token}** are in the form: add photos and press Start.", *notes]
        return {**{fields[key]: value for key, value in values.items()}, settings_message: "\n\n".join(lines)}

    settings_upload.upload(settings_imported, settings_upload, set(form) | {settings_message})

    job_outputs = {jobs_table, job_choice, job_status, monitor, loss_plot, meter_plot, samples, cancel, resume, again, delete_job,
                   export_settings, job_log, seen}

    def refresh(request: gr.Request, selected, last_seen):
        jobs = Jobs(scoped(request))
        listed = jobs.list()
        if selected not in {j.id for j in listed}:
            selected = listed[0].id if listed else None
        signature = (selected, tuple((j.id, j.status, j.updated) for j in listed))
        if signature == last_seen:
            return dict.fromkeys(job_outputs, gr.skip())  # Gradio wants a value for every output
        job = next((j for j in listed if j.id == selected), None)
        return {jobs_table: views.jobs_frame(listed), job_choice: gr.update(choices=views.job_choices(listed), value=selected),
                **job_view(jobs, job), seen: signature}

    def job_view(jobs: Jobs, job) -> dict:
        """Status text, loss plot, samples and which buttons apply, for one job (None: there are none)."""
        if job is None:
            return {job_status: views.NO_JOBS, monitor: "", loss_plot: None, meter_plot: gr.update(visible=False), samples: [], cancel: gr.update(visible=False),
                    resume: gr.update(visible=False), again: gr.update(visible=False), delete_job: gr.update(visible=False),
                    export_settings: gr.update(visible=False), job_log: ""}
        # by stem: step-00002 before step-00002-1 (by name, "-" sorts before ".", putting the second prompt's first)
        sample_files = sorted((job.folder / "samples").glob("step-*.png"), key=lambda p: p.stem)
        meter = views.meter_frame(job.meter_record)
        return {
            meter_plot: gr.update(value=meter, visible=meter is not None, title=views.meter_title(job.meter_record)),
            job_status: views.job_text(jobs, job), monitor: views.monitor_text(job, jobs.phases(job.id)),
            loss_plot: views.loss_frame(job.losses), job_log: jobs.read_log(job.id), export_settings: gr.update(visible=True),
            samples: [(str(p), views.sample_caption(p.stem, job.config.get("sample_prompts") or ())) for p in sample_files],
            cancel: gr.update(visible=job.status in (JobStatus.QUEUED, JobStatus.RUNNING)),
            resume: gr.update(visible=job.resumable),
            again: gr.update(visible=job.status in FINISHED), delete_job: gr.update(visible=job.status in FINISHED),
        }

    def loaded(request: gr.Request, selected):
        return refresh(request, selected, None)

    def picked(request: gr.Request, selected):
        return {**refresh(request, selected, None), job_message: "", settings_file_out: gr.update(visible=False, value=None)}

    timer.tick(refresh, [job_choice, seen], job_outputs, show_progress="hidden")
    demo.load(loaded, [job_choice], job_outputs, show_progress="hidden")
    # .input: a person's pick (a refresh that moves the selection must not wipe the message of a Delete)
    job_choice.input(picked, [job_choice], job_outputs | {job_message, settings_file_out}, show_progress="hidden")

    @shows_errors(job_message)
    def cancel_clicked(request: gr.Request, job_id):
        return {job_message: f"Job {job_id}: {Jobs(scoped(request)).cancel(job_id)}.", seen: None}

    @shows_errors(job_message)
    def resume_clicked(request: gr.Request, job_id):
        return {job_message: f"Job {job_id}: queued again; it {Jobs(scoped(request)).resume(job_id)}.", seen: None}

    @shows_errors(job_message)
    def delete_clicked(request: gr.Request, job_id):
        Jobs(scoped(request)).delete(job_id)
        return {job_message: f"Deleted job {job_id} (its photos and checkpoint; its adapter stays in the Library).",
                seen: None}

    @shows_errors(job_message)
    def again_clicked(request: gr.Request, job_id):
        jobs = Jobs(scoped(request))
        new_id = jobs.again(job_id)
        return {job_message: f"Queued **{jobs.get(new_id).name}** as job `{new_id}` with the same settings and photos.",
                seen: None}

    @shows_errors(job_message)
    def export_settings_clicked(request: gr.Request, job_id):
        job = Jobs(scoped(request)).get(job_id or "")
        path = settings_file.export_settings(job, Path(tempfile.mkdtemp(prefix="dbl-settings-")))
        return {settings_file_out: gr.update(value=str(path), visible=True),
                job_message: f"Settings of **{job.name}** as a file: Import settings (under the form) fills the form "
                             "with them."}

    export_settings.click(export_settings_clicked, job_choice, {settings_file_out, job_message})
    cancel.click(cancel_clicked, job_choice, {job_message, seen})
    again.click(again_clicked, job_choice, {job_message, seen})
    resume.click(resume_clicked, job_choice, {job_message, seen})
    delete_job.click(delete_clicked, job_choice, {job_message, seen})


# ----------------------------------------------------------------------------- Library
def library_tab(scoped: Scoped, timer: gr.Timer):
    """Returns the listing's signature state: other tabs clear it to redraw the library after adding adapters."""
    # its height follows the number of rows (views.gallery_height): a fixed height cut off the second row from 9
    # adapters on, and "auto" left a tall empty box under one row
    gallery = gr.Gallery(label="Adapters", columns=GALLERY_COLUMNS, height=views.gallery_height(0, GALLERY_COLUMNS),
                         allow_preview=False, interactive=False, fit_columns=False, elem_id="library-gallery")
    table = gr.Dataframe(headers=views.LIBRARY_COLUMNS,
                         interactive=False, label="Adapters", elem_id="library-table")
    with gr.Row():
        with gr.Column(scale=2):
            # allow_custom_value: an event already on its way with a name that a rename or delete just removed from
            # the choices is otherwise refused by Gradio with a traceback; the handlers treat unknown names themselves
            chosen = gr.Dropdown(label="Adapter", choices=[], value=None, allow_custom_value=True, elem_id="library-choice")
            details = gr.Markdown(elem_id="library-details")
            adapter_samples = gr.Gallery(label="Samples", columns=4, height=190, interactive=False, elem_id="library-samples")
            photos = gr.Gallery(label="Training photos", columns=4, height=190, interactive=False, allow_preview=False,
                                fit_columns=False,
                                visible=False, elem_id="library-photos")
        with gr.Column(scale=2):
            with gr.Row():
                new_name = gr.Textbox(label="New name", scale=3, elem_id="library-new-name")
                rename = gr.Button("Rename", scale=1, elem_id="library-rename")
            delete = gr.Button("Delete…", variant="stop", elem_id="library-delete")
            with gr.Group(visible=False) as confirm_box:
                confirm_text = gr.Markdown()
                with gr.Row():
                    confirm = gr.Button("Yes, delete it", variant="stop", elem_id="library-delete-confirm")
                    keep = gr.Button("Keep it")
            with gr.Row():
                export_format = gr.Radio(["diffusers", "kohya"], value="diffusers", label="Download format",
                                         elem_id="library-format")
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
    listing_outputs = {gallery, table, chosen, seen}

    def listing(library: Library, selected, last_seen=None) -> dict:
        """Gallery, table and the adapter dropdown, its choices and value together: a value outside the choices
        is refused by Gradio on every later event (the rename defect of issue 14)."""
        entries = library.list()
        signature = tuple((e.id, e.name) for e in entries)
        if signature == last_seen:
            return dict.fromkeys(listing_outputs, gr.skip())  # Gradio wants a value for every output
        thumbs = [(str(e.samples[0]) if e.samples else _placeholder(), e.name) for e in entries]
        return {gallery: gr.update(value=thumbs, height=views.gallery_height(len(entries), GALLERY_COLUMNS)),
                table: views.library_frame(entries),
                chosen: gr.update(choices=[e.name for e in entries], value=views.chosen_name(entries, selected)),
                seen: signature}

    def tick(request: gr.Request, selected, last_seen):
        return listing(scoped(request), selected, last_seen)

    timer.tick(tick, [chosen, seen], listing_outputs, show_progress="hidden")

    def show(request: gr.Request, name):
        library = scoped(request)
        entry = _find(library, name)
        shown_photos = [str(p) for p in entry.photos] if entry else []
        return {details: views.adapter_details(entry), adapter_samples: [str(p) for p in entry.samples] if entry else [],
                photos: gr.update(value=shown_photos, visible=bool(shown_photos)),
                confirm_box: gr.update(visible=False), export_file: None}  # the download was another adapter's

    chosen.change(show, chosen, {details, adapter_samples, photos, confirm_box, export_file})
    gallery.select(_select_by_index(scoped), None, chosen)
    table.select(_select_by_index(scoped), None, chosen)  # a row of the table picks its adapter too

    @shows_errors(action_message)
    def do_rename(request: gr.Request, name, new):
        library = scoped(request)
        entry = library.rename(_need(name), (new or "").strip())
        return {**listing(library, entry.name), action_message: f"Renamed to **{entry.name}**.", new_name: ""}

    rename.click(do_rename, [chosen, new_name], listing_outputs | {action_message, new_name})

    delete.click(lambda name: {confirm_box: gr.update(visible=bool(name)),
                               confirm_text: f"Delete **{name}** and its samples? This cannot be undone."},
                 chosen, {confirm_box, confirm_text})
    keep.click(lambda: gr.update(visible=False), None, confirm_box)

    @shows_errors(action_message)
    def do_delete(request: gr.Request, name):
        library = scoped(request)
        library.delete(_need(name))
        return {**listing(library, None), action_message: f"Deleted **{name}**.", confirm_box: gr.update(visible=False)}

    confirm.click(do_delete, chosen, listing_outputs | {action_message, confirm_box})

    @shows_errors(action_message)
    def do_export(request: gr.Request, name, fmt):
        from dreambooth_lora.formats import export_adapter, sidecar_path

        entry = scoped(request).get(_need(name))
        out, notes = export_adapter(entry, fmt, Path(tempfile.mkdtemp(prefix="dbl-export-")) / f"{entry.name}.{fmt}.safetensors")
        # A kohya export keeps a learned identifier embedding in a sidecar file next to the LoRA.
        files = [str(path) for path in (out, sidecar_path(out)) if path.exists()]
        return {export_file: files, action_message: "\n\n".join([f"Exported **{entry.name}** ({fmt}).", *notes])}

    export.click(do_export, [chosen, export_format], {export_file, action_message})

    @shows_errors(action_message)
    def do_import(request: gr.Request, file, embedding, name, token, class_noun, base_model):
        from dreambooth_lora.formats import import_adapter

        library = scoped(request)
        if not file:
            raise UserError("Choose a LoRA .safetensors file to import.")
        entry, notes = import_adapter(library, Path(file), name=(name or "").strip() or None,
                                      base_model=(base_model or "").strip() or None,
                                      token=(token or "").strip(), class_noun=(class_noun or "").strip(),
                                      sidecar=Path(embedding) if embedding else None)
        return {**listing(library, entry.name),
                action_message: "\n\n".join([f"Imported **{entry.name}** for {entry.base_model}.", *notes])}

    import_button.click(do_import, [import_file, import_embedding, import_name, import_token, import_class, import_base],
                        listing_outputs | {action_message})

    return seen


def _select_by_index(scoped: Scoped):
    """The adapter at a gallery index or a table cell's row, both listed newest first as library.list()."""

    def select(request: gr.Request, evt: gr.SelectData):
        entries = scoped(request).list()
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return entries[index].name if index < len(entries) else gr.skip()

    return select


def _find(library: Library, name):
    """The adapter of this name the library shows (an admin's: any user's), or None."""
    try:
        return library.get(name) if name else None
    except UserError:
        return None


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
def generate_tab(demo: gr.Blocks, scoped: Scoped, cache: ModelCache, timer: gr.Timer, library_seen: gr.State) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", placeholder="a photo of sks dog on the moon", elem_id="gen-prompt")
            hints = gr.Markdown(elem_id="gen-hints")
            negative = gr.Textbox(label="Negative prompt", elem_id="gen-negative")
            # allow_custom_value: an adapter deleted or renamed elsewhere must not make every later event fail;
            # an unknown name is refused with a sentence when generating
            # no max_choices: the dropdown would refuse a fifth pick without a word; views.mix_note names what is ignored
            picker = gr.Dropdown(label=f"Adapters (up to {MAX_MIX})", choices=[], multiselect=True,
                                 allow_custom_value=True, elem_id="gen-adapters")
            sliders = [gr.Slider(-1, 2, value=1.0, step=0.05, label=f"weight {i + 1}", visible=False,
                                 elem_id=f"gen-weight-{i}") for i in range(MAX_MIX)]
            with gr.Accordion("Text-encoder strengths", open=False, elem_id="gen-text-box"):
                text_apart = gr.Checkbox(False, label="Set them apart (off: each equals the adapter's weight)",
                                         elem_id="gen-text-apart")
                text_sliders = [gr.Slider(-1, 2, value=1.0, step=0.05, label=f"text strength {i + 1}", visible=False,
                                          elem_id=f"gen-text-weight-{i}") for i in range(MAX_MIX)]
            base_model = gr.Dropdown(builtin_names(), value=default_base_model(), allow_custom_value=True,
                                     label="Base model (used when no adapter is chosen)")
            with gr.Row():
                seed = gr.Number(label="Seed", value=0, precision=0, elem_id="gen-seed")
                steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                guidance = gr.Slider(0, 20, value=5.0, step=0.5, label="Guidance")
            with gr.Row():
                size = gr.Number(label="Size (px)", value=0, precision=0, info="0: the model's native size")
                count = gr.Slider(1, 8, value=4, step=1, label="Images")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="gen-run")
                sweep = gr.Button("Weight sweep", elem_id="gen-sweep")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images", columns=4, height=360, interactive=False, elem_id="gen-gallery")
            gen_message = gr.Markdown(elem_id="gen-message")
            download_all = gr.File(label="Download all (zip: the images and their settings)", interactive=False,
                                   elem_id="gen-download")
            with gr.Row():
                mix_name = gr.Textbox(label="Save this mix as", placeholder="new adapter name", scale=3, elem_id="mix-name")
                save_mix = gr.Button("Save mix as adapter", scale=1, elem_id="mix-save")
            with gr.Accordion("Weight sweep: the prompt at weights " + ", ".join(f"{w:g}" for w in DEFAULT_WEIGHTS)
                              + " of each chosen adapter, one seed", open=False, elem_id="sweep-box") as sweep_box:
                # no label badge and no toolbar: they covered the first and the last column labels
                sweep_image = gr.Image(label="Weight sweep", show_label=False, type="pil", interactive=False, buttons=[],
                                       elem_id="sweep-image")
                sweep_file = gr.File(label="Download the grid (PNG)", interactive=False, elem_id="sweep-download")
    history = gr.Dataframe(headers=gen.HISTORY_COLUMNS, label="History: recent generations (pick a row to see its "
                           "images and put its settings back in the form)", interactive=False, elem_id="gen-history")
    seen = gr.State(None)
    form = dict(prompt=prompt, negative=negative, seed=seed, steps=steps, guidance=guidance, size=size, count=count)

    def adapter_choices(request: gr.Request, selected, last_seen):
        names = [e.name for e in scoped(request).list()]
        if names == last_seen:
            return gr.skip(), gr.skip()
        return gr.update(choices=names, value=[n for n in (selected or []) if n in names]), names

    timer.tick(adapter_choices, [picker, seen], [picker, seen], show_progress="hidden")

    def chosen_changed(request: gr.Request, chosen):
        library = scoped(request)
        chosen = chosen or []
        updates = [gr.update(visible=i < len(chosen), label=f"{chosen[i]} weight" if i < len(chosen) else f"weight {i + 1}")
                   for i in range(MAX_MIX)]
        text_updates = [gr.update(visible=i < len(chosen), label=f"{chosen[i]} text strength" if i < len(chosen)
                                  else f"text strength {i + 1}") for i in range(MAX_MIX)]
        hint = views.prompt_hints([entry for entry in (_find(library, n) for n in chosen) if entry])
        return {hints: "\n\n".join(line for line in (hint, views.mix_note(chosen, MAX_MIX)) if line),
                **dict(zip(sliders, updates)), **dict(zip(text_sliders, text_updates))}

    picker.change(chosen_changed, picker, {hints, *sliders, *text_sliders})
    strengths = [text_apart, *sliders, *text_sliders]  # the handlers' trailing inputs: split by `split_strengths`

    def split_strengths(values):
        """(weights, text apart, text strengths) from the handlers' trailing `strengths` values."""
        return values[1 : 1 + MAX_MIX], values[0], values[1 + MAX_MIX :]

    def history_frame(request: gr.Request):
        return gen.history_frame(recent_generations(scoped(request).history_root))

    demo.load(history_frame, None, history, show_progress="hidden")

    @shows_errors(gen_message)
    def generate(request: gr.Request, prompt_text, negative_text, base, chosen, seed_value, steps_value, guidance_value,
                 size_value, count_value, *weights):
        settings = gen.generate_settings(prompt_text, negative_text, seed_value, steps_value, guidance_value, size_value,
                                         count_value, chosen, *split_strengths(weights))
        result = gen.run_generation(scoped(request), cache, settings, base)
        return {gallery: result.captioned, gen_message: result.message,
                download_all: str(zip_generation(result.generation)), history: history_frame(request)}

    run.click(generate, [prompt, negative, base_model, picker, seed, steps, guidance, size, count, *strengths],
              {gallery, gen_message, download_all, history})

    @shows_errors(gen_message)
    def history_picked(request: gr.Request, evt: gr.SelectData):
        row = evt.row_value or []
        generation = get_generation(scoped(request).history_root, str(row[-1])) if row else None
        if generation is None:
            raise UserError("That generation is no longer in the history; generate again.")
        values = gen.form_of(generation)
        chosen = values.pop("chosen")
        weights = values.pop("weights") + [1.0] * MAX_MIX
        text_weights = values.pop("text_weights") + [1.0] * MAX_MIX
        return {**{form[key]: values[key] for key in form}, picker: chosen, base_model: values["base_model"],
                **{slider: weight for slider, weight in zip(sliders, weights)}, text_apart: values["text_apart"],
                **{slider: weight for slider, weight in zip(text_sliders, text_weights)},
                gallery: [(str(p), f"seed {generation.settings.seed + i}") for i, p in enumerate(generation.images)],
                download_all: str(zip_generation(generation)), gen_message: gen.history_text(generation)}

    history.select(history_picked, None, set(form.values()) | set(strengths) | {picker, base_model, gallery, download_all,
                                                                                gen_message})

    @shows_errors(gen_message)
    def sweep_clicked(request: gr.Request, prompt_text, negative_text, chosen, seed_value, steps_value, guidance_value,
                      size_value, *weights):
        settings = gen.generate_settings(prompt_text, negative_text, seed_value, steps_value, guidance_value, size_value,
                                         1, chosen, *split_strengths(weights))
        grid, path, message = gen.run_weight_sweep(scoped(request), cache, settings)
        return {sweep_image: grid, sweep_file: str(path), sweep_box: gr.update(open=True), gen_message: message}

    sweep.click(sweep_clicked, [prompt, negative, picker, seed, steps, guidance, size, *strengths],
                {sweep_image, sweep_file, sweep_box, gen_message})

    @shows_errors(gen_message)
    def save(request: gr.Request, chosen, name, prompt_text, seed_value, steps_value, guidance_value, *weights):
        _, message = gen.save_mix(scoped(request), cache, gen.mix_specs(chosen, *split_strengths(weights)), name, prompt_text, seed_value,
                                  steps_value, guidance_value)
        return {gen_message: message, library_seen: None}

    save_mix.click(save, [picker, mix_name, prompt, seed, steps, guidance, *strengths], {gen_message, library_seen})
