"""The quality bench's quick mode runs end to end and shows DreamBooth's prior-preservation effect."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "quality.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("quality_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diversity_distance_is_zero_for_equal_and_one_for_disjoint_attributes():
    bench = load_bench()
    from dreambooth_lora.tinyworld.analyser import Attributes

    a = [Attributes("ball", ("red",), "solid", "white"), Attributes("ball", ("blue",), "solid", "black")]
    b = [Attributes("ball", ("yellow",), "split", "gray")] * 2
    assert bench.diversity_distance(a, list(reversed(a))) == 0.0
    assert bench.diversity_distance(a, b) == pytest.approx(1.0)


@pytest.mark.slow
def test_quick_bench_reports_every_metric_and_priors_reduce_leak(monkeypatch, tmp_path):
    bench = load_bench()
    monkeypatch.setattr(bench.tempfile, "mkdtemp", lambda prefix="": str(tmp_path))
    args = argparse.Namespace(quick=True, samples=16, steps=None, lr=None, token_lr=None, batch_size=None,
                              text_encoder="none", machine="test")
    report = bench.run(args)
    rows = {row["prior_weight"]: row for row in report["runs"]}
    assert set(rows) == {0.0, 1.0}
    for row in rows.values():
        for key in ("subject_fidelity", "prior_leak", "class_diversity_tv", "recontext", "recontext_subject"):
            assert 0.0 <= row[key] <= 1.0
    # lambda = 0 lets the subject leak into its class; priors keep "a photo of a ball" the base model's.
    assert rows[1.0]["prior_leak"] < rows[0.0]["prior_leak"]
    assert rows[0.0]["subject_fidelity"] > 0.25  # the subject is learned at all
    assert report["vae_ceiling"]["redyellow-ball"] == 1.0
