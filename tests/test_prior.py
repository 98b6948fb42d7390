"""The class-prior cache: reuse, extension by only the missing images, regeneration on changed settings."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from dreambooth_lora.config import TrainConfig
from dreambooth_lora.library import Library
from dreambooth_lora.prior import PriorSettings, ensure_prior_images, prior_folder
from dreambooth_lora.jobs import create_job
from dreambooth_lora.train import run_training

SETTINGS = PriorSettings(prompt="a photo of a dog", resolution=32, steps=2)  # 2 sampler steps: CPU time


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_cache_reuses_extends_and_regenerates(tiny_random_builder, tmp_path):
    model = tiny_random_builder()
    reports = []
    first, generated = ensure_prior_images(model, SETTINGS, 2, tmp_path, on_progress=lambda d, t: reports.append((d, t)))
    assert generated == 2 and len(first) == 2 and all(p.exists() for p in first)
    assert reports[0] == (0, 2) and reports[-1] == (2, 2)
    assert first[0].parent == prior_folder(tmp_path, model.fingerprint, SETTINGS)
    assert first[0].parent.parent.name == model.fingerprint  # keyed by the model, not its name
    stamps = [p.stat().st_mtime_ns for p in first]

    again, generated = ensure_prior_images(model, SETTINGS, 2, tmp_path)
    assert generated == 0 and again == first and [p.stat().st_mtime_ns for p in again] == stamps

    more, generated = ensure_prior_images(model, SETTINGS, 3, tmp_path)
    assert generated == 1 and more[:2] == first and [p.stat().st_mtime_ns for p in first] == stamps
    manifest = json.loads((first[0].parent / "manifest.json").read_text())
    assert [manifest["images"][str(i)]["seed"] for i in range(3)] == [1000, 1001, 1002]

    # Fewer than cached: a prefix of the same set, nothing generated.
    assert ensure_prior_images(model, SETTINGS, 1, tmp_path) == (first[:1], 0)

    # A changed setting (same folder: prompt and size equal) makes every cached image stale.
    changed = replace(SETTINGS, guidance=2.0)
    regenerated, generated = ensure_prior_images(model, changed, 3, tmp_path)
    assert generated == 3 and regenerated[0].parent == first[0].parent
    assert json.loads((first[0].parent / "manifest.json").read_text())["settings"]["guidance"] == 2.0

    # A deleted file is regenerated, the others kept.
    regenerated[1].unlink()
    _, generated = ensure_prior_images(model, changed, 3, tmp_path)
    assert generated == 1 and regenerated[1].exists()


def test_extended_set_equals_one_made_at_once(tiny_random_builder, tmp_path):
    """Image i uses seed base+i and its own generator, so batching and extension do not change it."""
    model = tiny_random_builder()
    at_once, _ = ensure_prior_images(model, SETTINGS, 3, tmp_path / "once", batch_size=3)
    ensure_prior_images(model, SETTINGS, 1, tmp_path / "steps", batch_size=1)
    stepwise, generated = ensure_prior_images(model, SETTINGS, 3, tmp_path / "steps", batch_size=2)
    assert generated == 2
    for left, right in zip(at_once, stepwise):
        assert np.abs(pixels(left).astype(int) - pixels(right).astype(int)).max() <= 1
    assert np.abs(pixels(at_once[0]).astype(int) - pixels(at_once[1]).astype(int)).mean() > 1  # seeds differ


def test_prompt_or_size_change_uses_another_folder(tiny_random_builder, tmp_path):
    model = tiny_random_builder()
    dog, _ = ensure_prior_images(model, SETTINGS, 1, tmp_path)
    cat, generated = ensure_prior_images(model, replace(SETTINGS, prompt="a photo of a cat"), 1, tmp_path)
    small, _ = ensure_prior_images(model, replace(SETTINGS, resolution=16), 1, tmp_path)
    assert generated == 1 and len({dog[0].parent, cat[0].parent, small[0].parent}) == 3
    assert Image.open(small[0]).size == (16, 16)


def test_second_subject_of_the_same_class_reuses_the_set(make_subject_images, tmp_path):
    library = Library(tmp_path / "data")
    reports: dict[str, list] = {"first": [], "second": []}
    for name, folder in (("first", "a"), ("second", "b")):
        config = TrainConfig(token="sks", class_noun="dog", base_model="builtin:tiny-random", name=name,
                             steps=2, num_class_images=3, resolution=32)
        job = create_job(library, config, make_subject_images(3, folder=folder))
        on_progress = lambda progress, name=name: reports[name].append(progress)
        run_training(library, job, tmp_path / "prior", on_progress=on_progress)
    class_reports = {name: [(p.step, p.total) for p in got if p.phase == "class_images"] for name, got in reports.items()}
    assert class_reports["first"][0] == (0, 3) and class_reports["first"][-1] == (3, 3)
    assert class_reports["second"] == [(3, 3)]  # already complete at the first report, nothing generated
    folders = [p for p in (tmp_path / "prior").glob("*/*") if p.is_dir()]
    assert len(folders) == 1 and len(list(folders[0].glob("*.png"))) == 3
