"""The weight sweep: its plan (which weights in which cell) and its labelled grid, by hand; then a real sweep
with the tiny random model."""

from __future__ import annotations

import pytest
from PIL import Image

from dreambooth_lora.errors import UserError
from dreambooth_lora.sweep import LABEL_BAND, label_grid, sweep_plan


def test_each_row_varies_one_adapter_and_holds_the_others():
    plan = sweep_plan([("a", 0.8), ("b", 0.5)], (0.0, 1.0))
    assert plan == [[(("a", 0.0), ("b", 0.5)), (("a", 1.0), ("b", 0.5))],
                    [(("a", 0.8), ("b", 0.0)), (("a", 0.8), ("b", 1.0))]]
    with pytest.raises(UserError, match="at least one adapter"):
        sweep_plan([])


def test_grid_places_each_cell_under_its_labels():
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    cells = [[Image.new("RGB", (32, 32), c) for c in row] for row in colours]
    grid = label_grid(cells, ["first", "second"], ["w 0", "w 0.5", "w 1"], cell_size=40)
    left = grid.width - 3 * 40
    assert grid.height == LABEL_BAND + 2 * 40 and left > 8
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            assert grid.getpixel((left + c * 40 + 20, LABEL_BAND + r * 40 + 20)) == colour
    top_band = grid.crop((left, 0, grid.width, LABEL_BAND))
    left_band = grid.crop((0, LABEL_BAND, left, grid.height))
    assert min(top_band.convert("L").getdata()) < 128 and min(left_band.convert("L").getdata()) < 128  # text drawn
    with pytest.raises(ValueError):
        label_grid(cells, ["only one"], ["w 0", "w 0.5", "w 1"])


def test_a_sweep_at_weight_zero_is_the_base_image(tmp_path, session_subject_images):
    from dreambooth_lora.config import TrainConfig
    from dreambooth_lora.generate import AdapterSession, GenerateSettings
    from dreambooth_lora.jobs import JobStatus, Jobs, run_job
    from dreambooth_lora.library import Library
    from dreambooth_lora.models import load_base_model
    from dreambooth_lora.sweep import run_sweep

    library = Library(tmp_path / "data")
    jobs = Jobs(library)
    job_id = jobs.create(TrainConfig(token="sks", class_noun="box", base_model="builtin:tiny-random", name="swept",
                                     steps=2, num_class_images=1, lr=0.05), session_subject_images, status=JobStatus.RUNNING)
    assert run_job(jobs, job_id, tmp_path / "prior").status == JobStatus.DONE
    session = AdapterSession(load_base_model("builtin:tiny-random"))
    settings = GenerateSettings(prompt="a photo of sks box", steps=2, seed=3, size=32)
    grid = run_sweep(session, library, settings, [("swept", 1.0)], (0.0, 1.0))
    session.apply([])
    base = session.generate(GenerateSettings(prompt="a photo of sks box", steps=2, seed=3, size=32, num_images=1))[0]
    cell = grid.width - 2 * 128
    zero = grid.crop((cell, LABEL_BAND, cell + 128, LABEL_BAND + 128))
    assert list(zero.getdata()) == list(base.convert("RGB").resize((128, 128), Image.NEAREST).getdata())
