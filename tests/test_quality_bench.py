"""The quality bench's quick mode runs end to end and shows DreamBooth's prior-preservation effect."""

from __future__ import annotations

import pytest

from dreambooth_lora.bench import quality


def test_diversity_distance_is_zero_for_equal_and_one_for_disjoint_attributes():
    from dreambooth_lora.tinyworld.analyser import Attributes

    a = [Attributes("ball", ("red",), "solid", "white"), Attributes("ball", ("blue",), "solid", "black")]
    b = [Attributes("ball", ("yellow",), "split", "gray")] * 2
    assert quality.diversity_distance(a, list(reversed(a))) == 0.0
    assert quality.diversity_distance(a, b) == pytest.approx(1.0)


def test_full_plan_covers_every_subject_both_lambdas_two_seeds_and_each_text_encoder_mode():
    from dreambooth_lora.tinyworld import world

    runs = quality.plan(quick=False)
    assert len(runs) == len(set(runs)) == len(world.SUBJECTS) * 2 * 2 + 2
    assert {(r.subject, r.prior_weight, r.seed) for r in runs if r.text_encoder == "none"} == {
        (s, lam, seed) for s in world.SUBJECTS for lam in (0.0, 1.0) for seed in (0, 1)}
    assert {r.text_encoder for r in runs} == {"none", "lora", "qlora"}
    assert [(r.prior_weight, r.seed) for r in quality.plan(quick=True)] == [(1.0, 0), (0.0, 0)]


@pytest.mark.slow
def test_quick_bench_reports_every_metric_and_priors_reduce_leak(tmp_path):
    report = quality.run_bench(True, quality.Settings(samples=16), workers=2, machine="test", work=tmp_path)
    rows = {row["prior_weight"]: row for row in report["runs"]}
    assert set(rows) == {0.0, 1.0}
    for row in rows.values():
        for key in ("subject_fidelity", "prior_leak", "class_diversity_tv", "recontext", "recontext_subject"):
            assert 0.0 <= row[key] <= 1.0
    # lambda = 0 lets the subject leak into its class; priors keep "a photo of a ball" the base model's.
    assert rows[1.0]["prior_leak"] < rows[0.0]["prior_leak"]
    assert rows[1.0]["class_diversity_tv"] < rows[0.0]["class_diversity_tv"]
    assert rows[1.0]["subject_fidelity"] > 0.5  # the subject is learned with priors on too
    assert report["vae_ceiling"]["redyellow-ball"] == 1.0
    assert report["base"]["redyellow-ball"]["fidelity"] < 0.2  # the base model alone does not draw it


def test_a_failed_run_is_reported_in_its_row_and_left_out_of_the_means():
    ok = dict(subject="redyellow-ball", prior_weight=1.0, seed=0, text_encoder="none", subject_fidelity=0.5,
              prior_leak=0.0, class_diversity_tv=0.1, recontext=1.0, recontext_subject=0.5, train_seconds=10.0)
    failed = dict(subject="redyellow-ball", prior_weight=1.0, seed=1, text_encoder="none", error="RuntimeError: boom")
    summary = quality.summarise([ok, failed])
    assert summary["lambda=1"]["subject_fidelity"] == 0.5 and summary["lambda=0"]["subject_fidelity"] is None

    bench = load_script("quality")
    table = bench.markdown({"runs": [ok, failed], "summary": summary})
    assert "| redyellow-ball | 1 | 1 | none | failed: RuntimeError: boom |" in table


def load_script(name: str):
    """One of the bench/ scripts as a module (they are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_with_json_stdout_is_the_json_report_alone_and_the_tables_go_to_stderr(monkeypatch, capsys):
    import json
    import sys

    bench = load_script("quality")
    row = dict(subject="redyellow-ball", prior_weight=1.0, seed=0, text_encoder="none", subject_fidelity=0.5,
               prior_leak=0.0, class_diversity_tv=0.1, recontext=1.0, recontext_subject=0.5, train_seconds=10.0)
    report = {"runs": [row], "summary": quality.summarise([row]), "vae_ceiling": {}, "workers": 2, "seconds": 1.0,
              "machine": "test"}

    def fake_bench(quick, settings, workers, machine, on_row):
        on_row(row)
        return report

    monkeypatch.setattr(bench, "run_bench", fake_bench)
    monkeypatch.setattr(sys, "argv", ["quality.py", "--quick", "--json", "--markdown"])
    assert bench.main() == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == report
    assert "subject_fidelity" in err and "| setting |" in err
