"""What the studio shows, without a browser: form to TrainConfig, messages in the studio's words, job and
library text (app/views.py)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from app import views
from dreambooth_lora import jobs as jobs_module
from dreambooth_lora.config import TrainConfig, defaults_for
from dreambooth_lora.errors import UserError
from dreambooth_lora.generate import GenerateSettings
from dreambooth_lora.jobs import ErrorKind, Job, Jobs, JobStatus, PhaseMark
from dreambooth_lora.library import Library

FORM = dict(token="sks", class_noun="box", name="", base_model="builtin:tiny-random", preset="Balanced", steps=0,
            rank=8, alpha=0, prior_weight=1.0, num_class_images=0, lr=0, resolution=0, text_encoder="none",
            loraplus=0, seed=0, token_embedding="auto", checkpoint_every=100, sample_every=0, sample_prompts="")


def form(**changes):
    return list({**FORM, **changes}.values())


def test_form_zeros_mean_defaults_and_presets_scale_steps():
    balanced = views.train_config(3, *form())
    assert balanced == TrainConfig(token="sks", class_noun="box", base_model="builtin:tiny-random", rank=8,
                                   checkpoint_every=100)
    assert balanced.steps is None  # the model's default, filled in when the job runs
    default = defaults_for(True, 3, 0)["steps"]  # tiny-random uses the built-in defaults
    assert views.train_config(3, *form(preset="Fast")).steps == round(default * 0.5)
    assert views.train_config(3, *form(preset="Fast", steps=7)).steps == 7  # a number typed in wins
    assert views.train_config(3, *form(token_embedding="off")).train_token_embedding is False


@pytest.mark.parametrize("make, field", [
    (lambda: views.train_config(3, *form(token="my subject")), "Token 'my subject'"),
    (lambda: views.train_config(3, *form(resolution=7)), "Resolution (px) 7"),
    (lambda: GenerateSettings(prompt=" "), "Prompt is empty"),
    (lambda: GenerateSettings(prompt="a", size=7), "Size (px) 7"),
])
def test_errors_name_the_studio_fields_not_cli_flags(make, field):
    with pytest.raises(UserError) as caught:
        make()
    text = views.error_markdown(caught.value)
    assert text.startswith("**Error:** ") and field in text and "--" not in text


def test_the_name_clash_message_speaks_of_a_name():
    assert views.ui_error_text("An adapter named 'x' already exists; choose another --name.") == \
        "An adapter named 'x' already exists; choose another name."


def _library_with_adapter(tmp_path, name="box", meta=None):
    library = Library(tmp_path / "data")
    staged = library.staging_folder()
    (staged / "adapter.safetensors").write_bytes(b"")
    meta = {"id": library.new_adapter_id(), "name": name, "token": "sks", "class_noun": "box", "base_model": "builtin:tiny-random",
            "fingerprint": "", "rank": 4, "alpha": 4.0, "steps": 10, "created": time.time(),
            "train_token_embedding": True, "final_loss": 0.123456, **(meta or {})}
    library.add_adapter(staged, meta)
    return library


def test_rename_keeps_the_choice_among_the_choices(tmp_path):
    library = _library_with_adapter(tmp_path)
    library.rename("box", "box-copy")
    entries = library.list()
    assert views.chosen_name(entries, "box-copy") == "box-copy"
    assert views.chosen_name(entries, "box") == "box-copy"  # a stale name falls back to one that exists
    assert list(views.library_frame(entries)["name"]) == ["box-copy"]
    assert views.chosen_name([], "box") is None


def test_details_say_yes_or_no_and_round_the_loss(tmp_path):
    entry = _library_with_adapter(tmp_path).get("box")
    text = views.adapter_details(entry)
    assert "| token embedding | yes |" in text and "True" not in text
    assert "| final loss | 0.1235 |" in text
    assert views.adapter_details(None) == views.EMPTY_LIBRARY


def test_a_failed_job_from_its_settings_offers_no_resume(tmp_path, subject_images):
    library = Library(tmp_path / "data")
    jobs = Jobs(library)
    config = TrainConfig(token="sks", class_noun="box", base_model="builtin:tiny-random", steps=2, name="j")
    job_id = jobs.create(config, subject_images)
    jobs.update(job_id, status=JobStatus.FAILED, error="Cannot load base model 'x' offline.", error_kind=str(ErrorKind.USER))
    job = jobs.get(job_id)
    assert not job.resumable
    assert "start a new job" in views.job_text(jobs, job)
    jobs.update(job_id, error="RuntimeError: out of memory", error_kind=str(ErrorKind.CRASH))
    assert jobs.get(job_id).resumable  # a crash may not happen again


def test_more_adapters_than_sliders_are_named_as_ignored():
    assert views.mix_note(["a", "b"], 4) == ""
    assert views.mix_note(list("abcde"), 4) == "Only the first 4 adapters are used; ignored: e."


def test_a_mix_shows_its_parts_and_weights(tmp_path):
    mix = {"method": "cat", "rank": None, "parts": [{"name": "a", "id": "1", "weight": 0.8}, {"name": "b", "id": "2", "weight": -0.5}]}
    entry = _library_with_adapter(tmp_path, "a-and-b", {"mix": mix, "steps": 0}).get("a-and-b")
    text = views.adapter_details(entry)
    assert "| mix of | a × 0.8, b × -0.5 |" in text and "| type | mix (exact concatenation) + identifier embedding |" in text
    assert "steps" not in text and "| class | mix |" in text  # saved before its parts' classes were recorded
    assert views.prompt_hints([entry]) == "Tokens: a-and-b is a mix of a × 0.8, b × -0.5"


def test_a_mix_of_a_ball_and_a_box_reads_as_one_not_as_class_ball_box(tmp_path):
    parts = [{"name": "ball-a", "id": "1", "weight": 1.0, "token": "sks", "class_noun": "ball"},
             {"name": "box-b", "id": "2", "weight": 0.5, "token": "sks", "class_noun": "box"}]
    library = _library_with_adapter(tmp_path, "ball-box", {"mix": {"method": "cat", "rank": None, "parts": parts},
                                                           "class_noun": "ball box", "steps": 0})
    entry = library.get("ball-box")
    row = views.library_frame([entry]).iloc[0]
    assert row["class"] == "ball + box (mix)" and row["steps"] == ""
    text = views.adapter_details(entry)
    assert "| class | ball + box (mix) |" in text and "a photo of sks ball box" not in text
    assert "`sks ball` and `sks box`" in text


def test_details_tell_how_an_adapter_was_trained(tmp_path, subject_images):
    from dreambooth_lora.adapter_file import AdapterFile, LayerFactors, store_adapter

    library = Library(tmp_path / "data")
    layers = {"unet.down.0.to_q": LayerFactors(torch.zeros(4, 8), torch.zeros(16, 4), 4.0)}  # 32 + 64 numbers
    meta = {"name": "box", "token": "sks", "class_noun": "box", "base_model": "builtin:tiny-random", "steps": 400,
            "lr": 0.001, "seed": 7, "training_seconds": 83.4, "num_images": 3, "text_encoder": "lora",
            "train_token_embedding": True, "batch_size": 2}
    entry = store_adapter(library, AdapterFile(layers, {"sks": torch.zeros(1, 32)}, meta), photos=subject_images)
    assert [p.read_bytes() for p in entry.photos] == [p.read_bytes() for p in subject_images]
    text = views.adapter_details(entry)
    for row in ("| training photos | 3 |", "| learning rate | 0.001 |", "| seed | 7 |", "| training time | 1:23 |",
                "| type | LoRA on the UNet attention + text-encoder LoRA + identifier embedding |",
                "| parameters | 128 |", "| steps | 400 |", "| batch | 2 |"):
        assert row in text


def test_job_settings_fill_the_form_and_come_back_as_the_same_config():
    config = TrainConfig(token="zwx", class_noun="teddy bear", base_model="builtin:tiny-random", name="bear", steps=120,
                         rank=16, alpha=8.0, prior_weight=0.5, num_class_images=10, lr=2e-4, resolution=64,
                         text_encoder="lora", loraplus_ratio=16.0, seed=3, train_token_embedding=False,
                         checkpoint_every=50, sample_every=30, sample_prompts=("a photo of zwx teddy bear", "zwx at sea"))
    values, notes = views.form_values(config)
    assert notes == [] and list(values) == list(views.FORM_FIELDS)
    assert views.train_config(3, *values.values()) == config
    defaults = TrainConfig(token="sks", class_noun="box", base_model="builtin:tiny-random", batch_size=4)
    values, notes = views.form_values(defaults)
    assert views.train_config(3, *values.values()) == TrainConfig(token="sks", class_noun="box", base_model="builtin:tiny-random")
    assert notes == ["Not in the studio's form, so not used: batch_size = 4."]


def test_sample_settings_from_the_form():
    config = views.train_config(3, *form(sample_every=25, sample_prompts="a photo of sks box\n\n  sks box in snow \n"))
    assert config.sample_every == 25 and config.sample_prompts == ("a photo of sks box", "sks box in snow")
    assert views.train_config(3, *form()).sample_every is None  # 0: the worker's four per run
    with pytest.raises(UserError) as caught:
        views.train_config(3, *form(sample_prompts="a\nb\nc\nd\ne"))
    assert views.error_markdown(caught.value) == "**Error:** Sample prompts: at most 4 sample prompts (5 given)."


def _job(status=JobStatus.RUNNING, step=30, total=100, updated=0.0, phase="training"):
    return Job(id="j", status=status, config={}, phase=phase, step=step, total=total, losses=[], message="", error=None,
               error_kind=None, adapter_id=None, runner=None, cancel_requested=False, created=0.0, updated=updated,
               folder=None)


def test_monitor_speed_elapsed_eta_and_phase_times_by_hand():
    marks = [PhaseMark("preparing", 100.0, 0, 1.0), PhaseMark("class_images", 102.0, 0, 1.0),
             PhaseMark("training", 112.0, 0, 1.0), PhaseMark("checkpoint", 122.0, 20, 1.0),
             PhaseMark("training", 123.0, 20, 1.0)]
    # at t=128: 20 steps in 10 s, then 10 more in 5 s -> 30 steps in 15 s of training = 2 it/s; 70 left -> 35 s
    text = views.monitor_text(_job(step=30), marks, now=128.0)
    assert text.startswith("**2.00 it/s** · elapsed 28.0 s · ETA 35.0 s")
    assert "Phases: preparing 2.0 s · class images 10.0 s · training 15.0 s · checkpoints 1.0 s" in text
    # a finished job: its clock stops at the ending mark, no ETA
    done = marks + [PhaseMark("saving", 163.0, 100, 1.0), PhaseMark("done", 165.0, 100, 1.0)]
    text = views.monitor_text(_job(JobStatus.DONE, step=100, updated=400.0), done, now=500.0)
    assert "elapsed 1:05" in text and "ETA" not in text and "saving 2.0 s" in text
    # a run that died without an ending mark loses its last phase; the resumed run counts from its own start
    resumed = marks + [PhaseMark("preparing", 300.0, 20, 2.0), PhaseMark("training", 301.0, 20, 2.0)]
    assert jobs_module.phase_seconds(resumed, 311.0) == {"preparing": 3.0, "class_images": 10.0, "training": 20.0,
                                                         "checkpoint": 1.0}
    assert views.monitor_text(None, marks) == "" and views.monitor_text(_job(), []) == ""


def test_smoothed_loss_by_hand():
    assert views.smoothed([2.0]) == [2.0]  # debiased: the first point is the first loss
    first, second = views.smoothed([2.0, 4.0], 0.5)
    assert (first, second) == (2.0, (0.5 * 1.0 + 0.5 * 4.0) / 0.75)
    frame = views.loss_frame([2.0, 4.0])
    assert list(frame["curve"]) == ["loss", "loss", "smoothed", "smoothed"] and list(frame["step"]) == [1, 2, 1, 2]
    assert views.loss_frame([]) is None


def test_training_samples_say_their_step_and_which_prompt():
    assert views.sample_caption("step-00050", ()) == "step 50"
    prompts = ["a photo of sks box", "a photo of sks box on a red background"]
    assert views.sample_caption("step-00002", prompts) == "step 2 · #1"
    assert views.sample_caption("step-00002-1", prompts) == "step 2 · #2"
    job = replace(_job(JobStatus.DONE), config={"sample_prompts": prompts})
    assert "Sample prompts: #1 *a photo of sks box* · #2 *a photo of sks box on a red background*" in views.job_text(None, job)


def test_the_library_gallery_grows_a_row_at_a_time():
    assert views.gallery_height(0, 6) == views.gallery_height(6, 6) == 260
    assert views.gallery_height(9, 6) == 460  # the second row from the seventh adapter on is shown, not cut off


def test_start_says_which_identifier_the_subject_got_and_refusals_name_the_form_fields(tmp_path, subject_images):
    from dreambooth_lora.adapter_file import AdapterFile, store_adapter
    from dreambooth_lora.errors import UserError
    from dreambooth_lora.jobs import Jobs

    library = Library(tmp_path / "data")
    store_adapter(library, AdapterFile({}, {}, {"name": "ball", "token": "sks", "class_noun": "ball",
                                                "base_model": "builtin:tiny-random"}))
    jobs = Jobs(library)
    config = TrainConfig(token="sks", class_noun="box", base_model="builtin:tiny-random")  # embedding: auto (on here)
    text = views.queued_message(jobs.get(jobs.create(config, subject_images)), "sks")
    assert "so this subject is called **sks2**: prompt with *a photo of sks2 box*" in text
    with pytest.raises(UserError) as refused:
        jobs.create(TrainConfig(token="sks", class_noun="box", base_model="builtin:tiny-random",
                                train_token_embedding=False), subject_images)
    shown = views.ui_error_text(refused.value)
    assert "Choose another Token, or train its embedding (Train token embedding: on)" in shown and "--" not in shown


def test_the_meter_plot_has_both_curves_and_says_the_chosen_step():
    assert views.meter_frame({}) is None  # the meter off: no plot
    record = {"meter": [{"step": 2, "instance_loss": 0.5, "prior_drift": 0.01},
                        {"step": 4, "instance_loss": 0.4, "prior_drift": 0.02}], "chosen_step": 4}
    frame = views.meter_frame(record)
    assert list(frame["curve"]) == ["instance loss"] * 2 + ["prior drift"] * 2
    assert list(frame["value"]) == [0.5, 0.4, 0.01, 0.02] and list(frame["step"]) == [2, 4, 2, 4]
    assert views.meter_title(record).endswith("chose step 4")


def test_the_header_says_who_is_signed_in_and_what_an_admin_sees():
    assert views.signed_in_text(None, True) == ""  # one user: no header line
    assert views.signed_in_text("alice", False) == "Signed in as **alice**"
    assert "everyone's adapters and jobs" in views.signed_in_text("root", True)
