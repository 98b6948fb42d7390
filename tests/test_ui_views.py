"""What the studio shows, without a browser: form to TrainConfig, messages in the studio's words, job and
library text (app/views.py)."""

from __future__ import annotations

import time

import pytest

from app import views
from dreambooth_lora.config import TrainConfig, defaults_for
from dreambooth_lora.errors import UserError
from dreambooth_lora.generate import GenerateSettings
from dreambooth_lora.jobs import ErrorKind, Jobs, JobStatus
from dreambooth_lora.library import Library

FORM = dict(token="sks", class_noun="box", name="", base_model="builtin:tiny-random", preset="Balanced", steps=0,
            rank=8, alpha=0, prior_weight=1.0, num_class_images=0, lr=0, resolution=0, text_encoder="none",
            loraplus=0, seed=0, token_embedding="auto", checkpoint_every=100)


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
    assert "| mix of | a × 0.8, b × -0.5 |" in text and "| method | cat |" in text and "steps" not in text
    assert views.prompt_hints([entry]) == "Tokens: a-and-b is a mix of a × 0.8, b × -0.5"


def test_smoothed_loss_by_hand():
    assert views.smoothed([2.0]) == [2.0]  # debiased: the first point is the first loss
    first, second = views.smoothed([2.0, 4.0], 0.5)
    assert (first, second) == (2.0, (0.5 * 1.0 + 0.5 * 4.0) / 0.75)
    frame = views.loss_frame([2.0, 4.0])
    assert list(frame["series"]) == ["raw", "raw", "smoothed", "smoothed"] and list(frame["step"]) == [1, 2, 1, 2]
    assert views.loss_frame([]) is None


def test_adapter_specs_pair_the_text_strengths_only_when_set_apart():
    assert views.adapter_specs(["a", "b"], False, [0.5, 1.0, 1.0], [0.0, 0.0, 1.0]) == [("a", 0.5), ("b", 1.0)]
    assert views.adapter_specs(["a"], True, [0.5, 1.0], [0.0, 1.0]) == [("a", (0.5, 0.0))]
