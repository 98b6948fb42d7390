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


def test_a_bench_without_a_work_folder_removes_the_temporary_one_it_made(monkeypatch, tmp_path):
    seen = []

    def fake_tasks(pool, tasks, work, on_row):  # the folder's lifecycle only: no training
        (work / "data-run").mkdir()
        seen.append(work)
        return {}, []

    monkeypatch.setattr(quality, "_run_tasks", fake_tasks)
    task = (quality.Run("redyellow-ball", 1.0, 0, "none"), quality.Settings())
    quality.run_tasks([task], workers=1)
    assert seen and seen[0].name.startswith("dbl-quality-") and not seen[0].exists()
    quality.run_tasks([task], workers=1, work=tmp_path)  # a folder the caller gave stays, with the runs' libraries
    assert seen[1] == tmp_path and (tmp_path / "data-run").is_dir()


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
    # the base model against itself: not zero (sampling noise), but under what training without priors does
    assert 0.0 < report["base"]["redyellow-ball"]["class_diversity_floor"] < rows[0.0]["class_diversity_tv"]
    assert report["class_samples"] == 16 * quality.CLASS_SAMPLES_FACTOR


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

    def fake_bench(quick, settings, workers, machine, work=None, on_row=None, seeds=None):
        assert work is None  # no --work: the bench makes and removes its own folder
        on_row(row)
        return report

    monkeypatch.setattr(bench, "run_bench", fake_bench)
    monkeypatch.setattr(sys, "argv", ["quality.py", "--quick", "--json", "--markdown"])
    assert bench.main() == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == report
    assert "subject_fidelity" in err and "| setting |" in err


# ----- the option rows (bench/options.py) -----

def option_row(variant, seed, fidelity, leak, chosen=None, chosen_step=400):
    row = dict(subject="redyellow-ball", prior_weight=1.0, seed=seed, text_encoder="none", variant=variant, steps=400,
               subject_fidelity=fidelity, prior_leak=leak, recontext=1.0, recontext_subject=0.5,
               class_diversity_tv=0.1, train_seconds=60.0)
    if chosen is not None:
        row.update(chosen_step=chosen_step, meter=[], chosen=dict(subject_fidelity=chosen[0], prior_leak=chosen[1],
                   recontext=1.0, recontext_subject=0.5, class_diversity_tv=0.1))
    return row


def test_options_plan_has_each_variant_over_every_subject_and_both_seeds_at_lambda_1():
    from dreambooth_lora.bench import options
    from dreambooth_lora.tinyworld import world

    tasks = options.plan(quick=False)
    assert len(tasks) == len(options.VARIANTS) * len(world.SUBJECTS) * 2
    assert all(run.prior_weight == 1.0 and run.variant in options.VARIANTS for run, _ in tasks)
    settings = {run.variant: s for run, s in tasks}
    assert settings["min-snr-5"].snr_gamma == 5.0 and settings["noise-offset-0.05"].noise_offset == 0.05
    assert settings["defaults+meter"].meter_every > 0 and settings["min-snr-5"].meter_every == 0
    assert len(options.plan(quick=True)) == len(options.VARIANTS)


def test_options_plan_picks_subjects_or_single_runs_for_screening():
    from dreambooth_lora.bench import options

    boxes = options.plan(quick=False, variants=["batch-4"], seeds=[2, 3], subjects=["bluecyan-box"])
    assert [(run.subject, run.seed, run.variant) for run, _ in boxes] == [("bluecyan-box", 2, "batch-4"), ("bluecyan-box", 3, "batch-4")]
    assert boxes[0][1].batch_size == 4 and boxes[0][0].prior_weight == 1.0
    pairs = [("bluecyan-box", 1), ("redyellow-ball", 3)]
    runs = options.plan(quick=False, variants=["defaults", "lr-7e-4-500"], pairs=pairs)
    assert [(run.variant, run.subject, run.seed) for run, _ in runs] == [
        ("defaults", "bluecyan-box", 1), ("defaults", "redyellow-ball", 3),
        ("lr-7e-4-500", "bluecyan-box", 1), ("lr-7e-4-500", "redyellow-ball", 3)]
    assert runs[2][1].lr == 7e-4 and runs[2][1].steps == 500 and runs[0][1].lr is None
    with pytest.raises(SystemExit):
        options.plan(quick=False, subjects=["no-such-subject"])
    assert set(options.SCREENED) <= set(options.REPEATS)  # screened rows run by name only


def test_meter_verdict_counts_chosen_at_least_final_with_leak_no_higher_in_5_of_6():
    from dreambooth_lora.bench.options import meter_verdict, summarise

    rows = [option_row("defaults+meter", 0, 0.8, 0.0, chosen=(0.8, 0.0)),  # chose the last step: equal
            option_row("defaults+meter", 1, 0.6, 0.0, chosen=(0.7, 0.0), chosen_step=250),  # earlier and better
            option_row("defaults+meter", 2, 0.9, 0.0, chosen=(0.95, 0.1), chosen_step=300),  # higher leak: fails
            option_row("defaults+meter", 3, 0.9, 0.0, chosen=(0.85, 0.0), chosen_step=300),  # lower fidelity: fails
            option_row("defaults+meter", 4, 0.5, 0.1, chosen=(0.5, 0.0), chosen_step=350),
            option_row("defaults+meter", 5, 0.5, 0.0, chosen=(0.5, 0.0))]
    verdict = meter_verdict(rows)
    assert verdict == {"runs": 6, "chosen_at_least_final": 4, "needed": 5, "predicts": False,
                       "chose_an_earlier_step": 4, "earlier_and_better": 1, "earlier_and_worse": 1}
    summary = summarise(rows + [option_row("min-snr-5", 0, 1.0, 0.0), option_row("min-snr-5", 1, 0.5, 0.0)])
    assert summary["min-snr-5"]["subject_fidelity"] == 0.75 and summary["min-snr-5"]["min_fidelity"] == 0.5
    assert summary["min-snr-5"]["runs_fidelity_ge_0_8"] == 1 and summary["meter_verdict"] == verdict
    assert summary["meter_chosen"]["subject_fidelity"] == round((0.8 + 0.7 + 0.95 + 0.85 + 0.5 + 0.5) / 6, 3)


def test_options_script_with_json_prints_the_report_alone_on_stdout(monkeypatch, capsys):
    import json
    import sys

    script = load_script("options")
    rows = [option_row("defaults+meter", 0, 0.8, 0.0, chosen=(0.9, 0.0), chosen_step=300),
            option_row("noise-offset-0.05", 0, 0.7, 0.0)]
    monkeypatch.setattr(script, "run_tasks", lambda tasks, workers, machine, work, on_row: {
        "runs": rows, "workers": workers, "seconds": 1.0, "machine": machine})
    monkeypatch.setattr(sys, "argv", ["options.py", "--quick", "--json"])
    assert script.main() == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["summary"]["meter_verdict"]["earlier_and_better"] == 1
    assert "verdict:" in err and "noise-offset-0.05" in err


def test_fresh_seeds_plan_every_subject_at_both_lambdas_without_the_text_encoder_modes():
    from dreambooth_lora.bench.quality import plan
    from dreambooth_lora.tinyworld import world

    runs = plan(quick=False, seeds=[2, 3])
    assert {(r.subject, r.prior_weight, r.seed) for r in runs} == {
        (s, lam, seed) for s in world.SUBJECTS for lam in (1.0, 0.0) for seed in (2, 3)}
    assert len(runs) == len(world.SUBJECTS) * 4 and {r.text_encoder for r in runs} == {"none"}


def test_every_option_row_names_a_valid_adapter():
    from dreambooth_lora.bench.options import VARIANTS
    from dreambooth_lora.paths import validate_name

    for variant in VARIANTS:  # a run's name is its adapter's name in the run's library; fresh seeds have two digits
        validate_name(quality.Run("redyellow-ball", 1.0, 99, "none", variant).name, "adapter name")


def test_misses_script_refuses_a_work_folder_that_already_holds_the_run(monkeypatch, capsys, tmp_path):
    import sys

    misses = load_script("misses")
    quality.run_library(tmp_path, quality.Run("bluecyan-box", 1.0, 2, "none", "defaults")).mkdir()
    monkeypatch.setattr(sys, "argv", ["misses.py", "--runs", "bluecyan-box:2", "--work", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:  # before any worker starts: nothing is trained
        misses.main()
    assert exit_info.value.code == 2
    assert "already holds run(s)" in capsys.readouterr().err
