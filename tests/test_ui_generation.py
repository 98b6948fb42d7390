"""The Generate tab's logic and the job settings file, without a browser: form to settings, generation kept in the
history with its settings, download-all, and settings export/import with their messages (app/generation.py,
dreambooth_lora/history.py, app/settings_file.py)."""

from __future__ import annotations

import json
import zipfile

import pytest
from PIL import Image

from app import generation as gen
from app import settings_file, views
from dreambooth_lora.config import TrainConfig
from dreambooth_lora.errors import UserError
from dreambooth_lora.generate import GenerateSettings
from dreambooth_lora.history import get_generation, recent_generations, record_generation, zip_generation
from dreambooth_lora.jobs import Jobs
from dreambooth_lora.library import Library


@pytest.fixture
def library(tmp_path):
    return Library(tmp_path / "data")


def test_form_to_settings_keeps_the_first_four_adapters_with_their_weights():
    settings = gen.generate_settings("a photo of sks box", "", 5, 12, 4.5, 0, 2, list("abcde"), [0.5, 1, -1, 2])
    assert settings == GenerateSettings(prompt="a photo of sks box", num_images=2, steps=12, guidance=4.5, seed=5,
                                        adapters=(("a", 0.5), ("b", 1.0), ("c", -1.0), ("d", 2.0)))
    assert views.mix_note(list("abcde"), gen.MAX_MIX) == "Only the first 4 adapters are used; ignored: e."
    with pytest.raises(UserError) as caught:
        gen.generate_settings(" ", "", 0, 20, 5, 0, 4)
    assert views.ui_error_text(caught.value).startswith("Prompt is empty")


def test_a_generation_is_kept_with_its_settings_and_zipped(library):
    cache = gen.ModelCache()
    settings = gen.generate_settings("a photo of a box", "blurry", 3, 2, 5.0, 0, 2)
    result = gen.run_generation(library, cache, settings, "builtin:tiny-random")
    assert [caption for _, caption in result.captioned] == ["seed 3", "seed 4"]
    assert "2 images from builtin:tiny-random with no adapters" in result.message
    [kept] = recent_generations(library.root)
    assert kept.settings == settings and kept.base_model == "builtin:tiny-random"
    assert [str(p) for p in kept.images] == [path for path, _ in result.captioned]
    parameters = json.loads(Image.open(kept.images[1]).text["parameters"])
    assert parameters["seed"] == 4 and parameters["prompt"] == "a photo of a box"  # each image says how it was made
    with zipfile.ZipFile(zip_generation(kept)) as archive:
        assert sorted(archive.namelist()) == ["generation.json", "image-0000.png", "image-0001.png"]
        assert json.loads(archive.read("generation.json"))["settings"]["negative_prompt"] == "blurry"
    # its row in the history table, and its settings back in the form to repeat it
    row = gen.history_frame([kept]).iloc[0]
    assert (row["prompt"], row["adapters"], row["seed"], row["id"]) == ("a photo of a box", "no adapters", 3, kept.id)
    form = gen.form_of(kept)
    again = gen.generate_settings(form["prompt"], form["negative"], form["seed"], form["steps"], form["guidance"],
                                  form["size"], form["count"], form["chosen"], form["weights"], form["text_apart"],
                                  form["text_weights"])
    assert again == settings


def test_the_history_keeps_the_newest_and_looks_ids_up_without_making_paths(library):
    image = Image.new("RGB", (8, 8))
    for seed in range(4):
        record_generation(library.root, [image], GenerateSettings(prompt=f"p{seed}", num_images=1, seed=seed),
                          "builtin:tiny-random", 0.1, keep=3)
    kept = recent_generations(library.root)
    assert [g.settings.prompt for g in kept] == ["p3", "p2", "p1"]
    assert get_generation(library.root, kept[1].id).settings.prompt == "p2"
    assert get_generation(library.root, "../../etc") is None
    (library.root / "generations" / ".staging-x").mkdir()  # a crash mid-write leaves no listed generation
    assert len(recent_generations(library.root)) == 3


def _job(library, subject_images, **config):
    jobs = Jobs(library)
    base = dict(token="sks", class_noun="box", base_model="builtin:tiny-random", name="boxy")
    job_id = jobs.create(TrainConfig(**{**base, **config}), subject_images)
    return jobs.get(job_id)


def test_job_settings_export_then_import_give_the_same_config(library, subject_images, tmp_path):
    job = _job(library, subject_images, steps=40, rank=4, sample_prompts=("sks box on a table",), sample_every=10)
    path = settings_file.export_settings(job, tmp_path)
    assert path.name == "boxy.settings.json"
    assert settings_file.read_settings(path) == job.train_config()


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00", "is not a text file"),
    (b"{\"format\": ", "is not valid JSON (line 1, column 12"),
    (b"[1, 2]", "is not a studio settings file"),
    (json.dumps({"format": settings_file.FORMAT, "version": 9, "settings": {}}).encode(), "has settings version 9"),
    (json.dumps({"format": settings_file.FORMAT, "version": 1, "settings": {"token": "sks", "colour": 1}}).encode(),
     "does not know: colour"),
    (json.dumps({"format": settings_file.FORMAT, "version": 1, "settings": {"token": "sks"}}).encode(),
     "lacks class_noun, base_model"),
    (json.dumps({"format": settings_file.FORMAT, "version": 1, "settings": {
        "token": "sks", "class_noun": "box", "base_model": "builtin:tiny-random", "lr": "fast"}}).encode(),
     "lr must be a number (it is 'fast')"),
    (json.dumps({"format": settings_file.FORMAT, "version": 1, "settings": {
        "token": "sks", "class_noun": "box", "base_model": "builtin:tiny-random", "rank": 0}}).encode(),
     "LoRA rank 0: must be a whole number from 1 to 256"),
])
def test_a_bad_settings_file_is_refused_with_a_sentence(tmp_path, content, message):
    path = tmp_path / "my.settings.json"
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        settings_file.read_settings(path)
    text = views.ui_error_text(caught.value)
    assert message in text and "--" not in text


def test_text_strengths_pair_with_the_weights_only_when_set_apart():
    assert gen.mix_specs(["a", "b"], [0.5, 1.0, 1.0], False, [0.0, 0.0, 1.0]) == [("a", 0.5), ("b", 1.0)]
    assert gen.mix_specs(["a"], [0.5, 1.0], True, [0.0, 1.0]) == [("a", (0.5, 0.0))]
    settings = gen.generate_settings("a photo of sks box", "", 0, 20, 5, 0, 1, ["a"], [0.5], True, [0.25])
    assert settings.adapters == (("a", (0.5, 0.25)),) and gen.mix_text(settings.adapters) == "a × 0.5:0.25"
