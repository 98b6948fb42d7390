"""The meter (fixed probes, the choosing rule, checkpoints per point, --keep), min-SNR-γ, noise offset, more class
rows per step and the frozen prior target in a run, and their flags: every bad value answered with status 2 and
one sentence."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from peft.tuners.lora import LoraLayer

from dreambooth_lora import meter
from dreambooth_lora.adapter_file import read_adapter
from dreambooth_lora.cli import main
from dreambooth_lora.config import TrainConfig
from dreambooth_lora.errors import UserError
from dreambooth_lora.jobs import METER_CHECKPOINTS, Jobs, create_job
from dreambooth_lora.library import Library
from dreambooth_lora.identifier import IdentifierEmbedding
from dreambooth_lora.lora import adapters_disabled, attach_text_encoder_lora, attach_unet_lora
from dreambooth_lora.meter import MeterPoint, choose_step
from dreambooth_lora.train import Trainables, TrainingStopped, frozen_class_predictions, run_training

RESOLUTION = 32


def tiny_config(name: str, **overrides) -> TrainConfig:
    # the weight average off (the built-ins' default is on): the meter's points and keep best/both are trained weights
    values = dict(token="sks", class_noun="dog", base_model="builtin:tiny-random", name=name, resolution=RESOLUTION,
                  num_class_images=2, steps=6, lr=1e-2, ema_decay=0.0)
    return TrainConfig(**{**values, **overrides})


def train(library, config, images, prior_dir, **kwargs):
    return run_training(library, create_job(library, config, images), prior_dir, **kwargs)


def adapter_tensors(entry) -> dict[str, torch.Tensor]:
    return read_adapter(entry.file).tensors


def same_tensors(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


# ----- the maths -----

def test_probe_timesteps_are_the_middles_of_eight_equal_slices():
    assert meter.probe_timesteps(1000).tolist() == [62, 187, 312, 437, 562, 687, 812, 937]


def test_instance_probe_has_every_photo_at_every_timestep_with_one_seeded_noise_per_photo(model):
    scheduler = model.training_scheduler()
    latents = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    probe = meter.instance_probe(latents, scheduler)
    assert probe.noisy.shape == (3 * 8, 4, 4, 4)
    assert probe.timesteps.tolist() == meter.probe_timesteps(1000).tolist() * 3
    noise = probe.target.reshape(3, 8, 4, 4, 4)  # epsilon model: the target is the noise
    assert all(torch.equal(noise[p, 0], noise[p, t]) for p in range(3) for t in range(8))  # one noise per photo
    assert torch.equal(noise[1, 0], torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(meter.PROBE_SEED + 1)))
    again = meter.instance_probe(latents, scheduler)
    assert torch.equal(again.noisy, probe.noisy)  # fixed: the same probe at every point and on resume
    klass = meter.class_probe(torch.randn(12, 4, 4, 4), scheduler)
    assert klass.noisy.shape[0] == meter.CLASS_PROBES and klass.timesteps.tolist() == meter.probe_timesteps(1000).tolist()


def test_v_prediction_probes_target_the_velocity(model):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config({**model.scheduler_config, "prediction_type": "v_prediction"})
    latents = torch.randn(2, 4, 4, 4)
    probe = meter.instance_probe(latents, scheduler)
    epsilon = meter.instance_probe(latents, model.training_scheduler())
    rows = latents.repeat_interleave(8, dim=0)
    assert torch.allclose(probe.target, scheduler.get_velocity(rows, epsilon.target, probe.timesteps))


def test_choose_step_minimises_instance_loss_plus_prior_weight_times_drift_ties_to_the_earlier():
    points = [MeterPoint(100, 0.30, 0.00), MeterPoint(200, 0.20, 0.05), MeterPoint(300, 0.15, 0.20)]
    # by hand: lambda 1 -> 0.30, 0.25, 0.35; lambda 0 -> the lowest instance loss; lambda 2 -> 0.30, 0.30, 0.55
    assert choose_step(points, 1.0) == 200
    assert choose_step(points, 0.0) == 300
    assert choose_step(points, 2.0) == 100
    with pytest.raises(ValueError):
        choose_step([], 1.0)


def test_meter_is_due_every_k_steps_and_at_the_last_never_at_zero():
    assert [s for s in range(0, 11) if meter.meter_due(s, 4, 10)] == [4, 8, 10]
    assert not any(meter.meter_due(s, 0, 10) for s in range(11))


def test_with_adapters_disabled_the_model_is_the_base_and_afterwards_the_adapted_one(tiny_random_builder):
    model = tiny_random_builder()
    ids = model.tokenizer(["a photo of a dog"], padding="max_length", max_length=model.tokenizer.model_max_length,
                          return_tensors="pt").input_ids  # the class prompt: the meter's frozen pass sees no identifier
    noisy, timesteps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500])

    def outputs():
        with torch.no_grad():
            hidden = model.text_encoder(ids)[0]
            return hidden, model.unet(noisy, timesteps, hidden.expand(2, -1, -1)).sample

    base_text, base_unet = outputs()
    attach_unet_lora(model.unet, rank=4, alpha=4.0)
    attach_text_encoder_lora(model.text_encoder, rank=4, alpha=4.0)
    embedding = IdentifierEmbedding.new(model.text_encoder, model.tokenizer, "sks").attach(model.text_encoder)
    with torch.no_grad():
        for layer in (m for module in (model.unet, model.text_encoder) for m in module.modules() if isinstance(m, LoraLayer)):
            layer.lora_B["default"].weight.fill_(0.05)
        embedding.vectors.add_(1.0)
    adapted_text, adapted_unet = outputs()
    assert not torch.allclose(adapted_text, base_text) and not torch.allclose(adapted_unet, base_unet)
    with adapters_disabled(model.unet, model.text_encoder):
        off_text, off_unet = outputs()
    assert torch.equal(off_text, base_text) and torch.equal(off_unet, base_unet)
    again_text, again_unet = outputs()
    assert torch.equal(again_text, adapted_text) and torch.equal(again_unet, adapted_unet)
    assert all(p.requires_grad for n, p in model.unet.named_parameters() if "lora_" in n)  # still trainable


@pytest.mark.parametrize("text_encoder", ["none", "lora"])
def test_frozen_target_is_the_base_models_prediction_for_the_class_rows(tiny_random_builder, text_encoder):
    """--prior-target frozen: the class rows' target is the base model's prediction (every adapter off, the encoder's
    too), and the adapters are on again afterwards."""
    model = tiny_random_builder()
    config = TrainConfig(token="sks", class_noun="dog", base_model="builtin:tiny-random", text_encoder=text_encoder,
                         prior_target="frozen").resolved(3, True, RESOLUTION)
    trainables = Trainables(model, config, torch.device("cpu"), None, identifier=None)
    noisy, timesteps = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500, 900])

    def unet(states):
        with torch.no_grad():
            return model.unet(noisy[1:], timesteps[1:], states[1:]).sample

    base = unet(trainables.prompt_embeddings(1, 2))
    attach_unet_lora(model.unet, rank=4, alpha=4.0)
    if text_encoder == "lora":
        attach_text_encoder_lora(model.text_encoder, rank=4, alpha=4.0)
    with torch.no_grad():
        for layer in (m for module in (model.unet, model.text_encoder) for m in module.modules() if isinstance(m, LoraLayer)):
            layer.lora_B["default"].weight.fill_(0.05)
    hidden = trainables.prompt_embeddings(1, 2)  # the adapted encoder's states when it has a LoRA
    adapted = unet(hidden)
    run = SimpleNamespace(model=model, config=config, trainables=trainables, device=torch.device("cpu"),
                          autocast_dtype=None, weight_dtype=torch.float32)
    frozen = frozen_class_predictions(run, noisy, timesteps, hidden, n_instance=1)
    assert not torch.allclose(adapted, base) and torch.allclose(frozen, base, atol=1e-6)
    assert torch.equal(unet(hidden), adapted)  # the adapters are on again
    assert frozen_class_predictions(run, noisy[:1], timesteps[:1], hidden[:1], n_instance=1) is None  # no class rows


# ----- in a run -----

METERED_RECIPE = dict(batch_size=2, prior_target="noise")  # see metered; every run compared with it takes it too


@pytest.fixture(scope="module")
def metered(tmp_path_factory, session_subject_images, session_prior_dir):
    """The same 6-step run without the meter and with it (every 2 steps, keep both), each in a library of its own
    (in one library the second subject would be called "sks2": another identifier, another run). With 2 + 2 rows and
    the noise target (the built-ins' recipe before the contrast rows) the meter chooses a step before the last here, so
    keep both stores a second adapter; with today's built-in defaults it chose the last (seeded: each stays so), and
    the test of the second adapter skipped."""
    root = tmp_path_factory.mktemp("metered")
    plain_library, library = Library(root / "plain"), Library(root / "both")
    plain = train(plain_library, tiny_config("plain", **METERED_RECIPE), session_subject_images, session_prior_dir)
    progress = []
    both = train(library, tiny_config("both", meter_every=2, keep="both", **METERED_RECIPE), session_subject_images,
                 session_prior_dir, on_progress=progress.append)
    return library, plain, both, progress, plain_library


def test_the_meter_measures_every_k_steps_and_at_the_end_without_changing_the_training(metered):
    library, plain, both, progress, plain_library = metered
    assert [p["step"] for p in both.meter] == [2, 4, 6]
    assert all(p["instance_loss"] > 0 and p["prior_drift"] >= 0 for p in both.meter)
    assert both.meter[-1]["prior_drift"] > 0  # the adapted class predictions have moved from the frozen model's
    assert both.losses == plain.losses  # measuring draws no random numbers and changes no weight
    assert same_tensors(adapter_tensors(both.adapter), adapter_tensors(plain.adapter))  # the final weights
    assert both.chosen_step == choose_step([MeterPoint(**p) for p in both.meter], 1.0)
    assert any(p.message.startswith("meter at step 4: instance loss") for p in progress)
    job = Jobs(library).get(both.job_id)
    record = job.to_dict()
    assert record["meter"] == both.meter and record["chosen_step"] == both.chosen_step
    assert not (job.folder / METER_CHECKPOINTS).exists()  # the per-point tensors go once the adapters are saved
    assert Jobs(plain_library).get(plain.job_id).to_dict()["meter"] == []
    assert Jobs(plain_library).get(plain.job_id).to_dict()["chosen_step"] is None


def test_keep_both_adds_the_chosen_points_weights_equal_to_a_run_stopped_there(tmp_path, metered, session_subject_images,
                                                                                session_prior_dir):
    library, _, both, _, _ = metered
    if both.chosen_step == 6:
        assert both.chosen_adapter is None and [e.name for e in library.list()].count("both-step6") == 0
        pytest.skip("the meter chose the final step here: keep both stores one adapter")
    chosen = both.chosen_adapter
    assert chosen.name == f"both-step{both.chosen_step}" and chosen.meta["weights_step"] == both.chosen_step
    assert both.adapter.meta["chosen_step"] == both.chosen_step and both.adapter.meta["weights_step"] == 6
    # a run is deterministic in its seed and has no lr schedule: the weights at step N are a run of N steps
    short = train(Library(tmp_path / "short"), tiny_config("short", steps=both.chosen_step, **METERED_RECIPE),
                  session_subject_images, session_prior_dir)
    assert same_tensors(adapter_tensors(chosen), adapter_tensors(short.adapter))
    assert len(chosen.samples) > 0


def test_keep_best_stores_only_the_chosen_points_weights(tmp_path, metered, session_subject_images, session_prior_dir):
    _, _, both, _, _ = metered
    best = train(Library(tmp_path / "best"), tiny_config("best", meter_every=2, keep="best", **METERED_RECIPE),
                 session_subject_images, session_prior_dir)
    assert best.chosen_step == both.chosen_step and best.chosen_adapter is None
    expected = both.chosen_adapter or both.adapter  # the chosen point's weights, whichever adapter holds them
    assert same_tensors(adapter_tensors(best.adapter), adapter_tensors(expected))
    assert best.adapter.meta["weights_step"] == both.chosen_step


def test_a_resumed_metered_run_has_the_same_points_and_choice(tmp_path, metered, session_subject_images,
                                                              session_prior_dir):
    _, _, both, _, _ = metered
    library = Library(tmp_path / "data")
    job = create_job(library, tiny_config("resumed", meter_every=2, keep="both", checkpoint_every=3, **METERED_RECIPE),
                     session_subject_images)
    seen = []
    with pytest.raises(TrainingStopped):  # stopped after step 5: checkpoint at 5, meter points at 2 and 4
        run_training(library, job, session_prior_dir, on_progress=seen.append,
                     should_stop=lambda: sum(p.phase == "training" and not p.message for p in seen) >= 5)
    resumed = run_training(library, job, session_prior_dir)
    assert resumed.meter == both.meter and resumed.chosen_step == both.chosen_step


def test_without_class_images_the_drift_is_read_on_the_photos(tmp_path, session_subject_images, session_prior_dir):
    library = Library(tmp_path / "data")
    result = train(library, tiny_config("no-prior", prior_weight=0.0, meter_every=3), session_subject_images,
                   session_prior_dir)
    assert [p["step"] for p in result.meter] == [3, 6] and result.meter[-1]["prior_drift"] > 0
    # lambda = 0: the rule is the lowest instance loss
    assert result.chosen_step == min(result.meter, key=lambda p: p["instance_loss"])["step"]


@pytest.mark.parametrize("option", [dict(snr_gamma=5.0), dict(noise_offset=0.1)], ids=["min-snr", "noise-offset"])
def test_min_snr_and_noise_offset_change_the_training(tmp_path, session_subject_images, session_prior_dir, option):
    # each run in a library of its own: in one, the second would be called "sks2" and differ for that reason alone
    plain = train(Library(tmp_path / "plain"), tiny_config("plain", steps=3), session_subject_images, session_prior_dir)
    changed = train(Library(tmp_path / "changed"), tiny_config("changed", steps=3, **option), session_subject_images,
                    session_prior_dir)
    assert changed.losses != plain.losses
    assert not same_tensors(adapter_tensors(changed.adapter), adapter_tensors(plain.adapter))
    key, value = next(iter(option.items()))
    assert changed.adapter.meta[key] == value and plain.adapter.meta[key] == 0.0


def test_more_class_rows_per_step_change_the_training(tmp_path, session_subject_images, session_prior_dir):
    plain = train(Library(tmp_path / "plain"), tiny_config("plain", steps=3), session_subject_images, session_prior_dir)
    more = train(Library(tmp_path / "more"), tiny_config("more", steps=3, prior_batch_size=5), session_subject_images,
                 session_prior_dir)  # the built-ins take 3 photos a step, and as many class images by default
    assert more.losses != plain.losses
    assert not same_tensors(adapter_tensors(more.adapter), adapter_tensors(plain.adapter))
    assert more.adapter.meta["prior_batch_size"] == 5 and plain.adapter.meta["prior_batch_size"] is None


def test_with_the_frozen_target_the_first_step_has_no_prior_loss_at_any_weight(tmp_path, session_subject_images,
                                                                               session_prior_dir):
    """At the first step the UNet LoRA is zero (B starts at 0), so the adapted class predictions are the frozen ones:
    with the frozen target the class part of the loss is 0 whatever lambda is; with the noise target it is not."""
    def first_loss(name, **option):
        result = train(Library(tmp_path / name), tiny_config(name, steps=1, **option), session_subject_images,
                       session_prior_dir)
        return result.losses[0], result.adapter

    frozen_1, adapter = first_loss("frozen-1", prior_target="frozen")
    frozen_50, _ = first_loss("frozen-50", prior_target="frozen", prior_weight=50.0)
    noise_1, plain = first_loss("noise-1", prior_target="noise")
    noise_50, _ = first_loss("noise-50", prior_target="noise", prior_weight=50.0)
    assert frozen_1 == pytest.approx(frozen_50, rel=1e-6) and noise_50 > 2 * noise_1
    assert adapter.meta["prior_target"] == "frozen" and plain.meta["prior_target"] == "noise"


def test_contrast_rows_change_the_training_and_their_first_step_has_no_prior_loss(tmp_path, session_subject_images,
                                                                                  session_prior_dir):
    """--contrast-rows: the photos under the class prompt, towards the frozen model's prediction. At the first step
    the adapted model is the frozen one on those rows too, so lambda still does not move the first loss."""
    def run(name, **option):
        return train(Library(tmp_path / name), tiny_config(name, prior_target="frozen", **option),
                     session_subject_images, session_prior_dir)

    plain, contrast = run("plain", steps=3, contrast_rows=0), run("contrast", steps=3, contrast_rows=2)
    assert contrast.losses != plain.losses
    assert not same_tensors(adapter_tensors(contrast.adapter), adapter_tensors(plain.adapter))
    assert contrast.adapter.meta["contrast_rows"] == 2 and plain.adapter.meta["contrast_rows"] == 0
    heavy = run("heavy", steps=1, contrast_rows=2, prior_weight=50.0)
    assert heavy.losses[0] == pytest.approx(contrast.losses[0], rel=1e-6)


def test_contrast_rows_default_to_two_on_built_ins_and_need_the_frozen_target():
    assert tiny_config("f", prior_target="frozen", contrast_rows=1).resolved(3, True, RESOLUTION).contrast_rows == 1
    assert tiny_config("n").contrast_rows is None
    builtin = tiny_config("b").resolved(3, True, RESOLUTION)
    assert (builtin.prior_target, builtin.contrast_rows, builtin.batch_size) == ("frozen", 2, 3)
    # the noise target on a built-in takes no contrast rows by default, rather than refusing the built-in's 2
    assert tiny_config("bn", prior_target="noise").resolved(3, True, RESOLUTION).contrast_rows == 0
    real = tiny_config("n").resolved(3, False, 512)
    assert (real.prior_target, real.contrast_rows) == ("noise", 0)
    with pytest.raises(UserError, match="add --prior-target frozen"):
        tiny_config("n", contrast_rows=1).resolved(3, False, 512)  # real models' target is the noise


def test_min_snr_loss_is_the_weighted_mse_of_the_step(monkeypatch, tmp_path, session_subject_images, session_prior_dir):
    """With gamma above every SNR of the sampled steps the weights are 1: the loss is the plain one."""
    # tiny-random's schedule: SNR at t=0 is about 1/0.00085 ~ 1176 > 1000 (at t=1 ~ 590), so gamma 1000 weighs only
    # t=0 below 1. The draws are seeded: at seed 1 the two steps' 16 timesteps hold no 0 (seed 0's second step does)
    # when caption dropout draws nothing (its draws move the second step's timesteps)
    plain = train(Library(tmp_path / "plain"), tiny_config("plain", steps=2, seed=1, caption_dropout=0.0),
                  session_subject_images, session_prior_dir)
    huge = train(Library(tmp_path / "huge"), tiny_config("huge", steps=2, seed=1, snr_gamma=1000.0, caption_dropout=0.0),
                 session_subject_images, session_prior_dir)
    assert huge.losses == pytest.approx(plain.losses, rel=1e-5)


# ----- the flags -----

def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("extra,named", [
    (["--snr-gamma", "-1"], "--snr-gamma -1.0"),
    (["--noise-offset", "2"], "--noise-offset 2.0"),
    (["--meter-every", "-3"], "--meter-every -3"),
    (["--keep", "middle"], "--keep 'middle'"),
    (["--keep", "best"], "needs --meter-every"),
    (["--keep", "both", "--meter-every", "0"], "needs --meter-every"),
    (["--ema-decay", "1"], "--ema-decay 1.0"),
    (["--prior-batch-size", "0"], "--prior-batch-size 0"),
    (["--prior-target", "teacher"], "--prior-target 'teacher'"),
    (["--contrast-rows", "-1"], "--contrast-rows -1"),
    (["--contrast-rows", "1", "--prior-target", "noise"], "add --prior-target frozen"),
    (["--unet-layers", "all"], "--unet-layers 'all'"),
    (["--ema-decay", "0.9", "--meter-every", "2", "--keep", "both"], "use --ema-decay 0 with --keep best or both"),
])
def test_bad_option_values_are_one_line_and_status_2(capsys, tmp_path, subject_images, extra, named):
    code, _, err = run_cli(capsys, "train", "--images", *subject_images, "--token", "sks", "--class-noun", "dog",
                           "--base-model", "builtin:tiny-random", "--data-root", tmp_path / "data", *extra)
    assert code == 2 and err.count("error:") == 1 and named in err and "Traceback" not in err


def test_every_new_option_is_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--snr-gamma", "--noise-offset", "--meter-every", "--keep", "--ema-decay", "--prior-batch-size",
                 "--prior-target", "--contrast-rows", "--unet-layers"):
        assert flag in text


def test_train_json_and_jobs_show_json_carry_the_meter(capsys, tmp_path, subject_images):
    dirs = ["--data-root", tmp_path / "data", "--prior-dir", tmp_path / "prior"]
    code, out, err = run_cli(capsys, "train", "--images", *subject_images, "--token", "sks", "--class-noun", "dog",
                             "--base-model", "builtin:tiny-random", "--steps", 4, "--num-class-images", 2,
                             "--resolution", RESOLUTION, "--meter-every", 2, "--keep", "both", "--quiet", *dirs)
    assert code == 0, err
    result = json.loads(out)
    assert [p["step"] for p in result["meter"]] == [2, 4] and result["chosen_step"] in (2, 4)
    assert ("chosen_adapter" in result) == (result["chosen_step"] == 2)
    code, out, _ = run_cli(capsys, "jobs", "show", result["job"], "--json", *dirs)
    shown = json.loads(out)
    assert shown["meter"] == result["meter"] and shown["chosen_step"] == result["chosen_step"]
    code, out, _ = run_cli(capsys, "jobs", "show", result["job"], *dirs)
    assert f"meter: 2 points, chosen step {result['chosen_step']}" in out


def test_config_refuses_keep_without_meter():
    with pytest.raises(UserError, match="--keep best"):
        tiny_config("x", keep="best")


def test_the_built_ins_average_their_weights_unless_the_meter_keeps_a_point():
    from dreambooth_lora.config import TrainConfig

    config = TrainConfig(token="sks", class_noun="dog", base_model="builtin:tiny-world")
    assert config.resolved(4, True, 64).ema_decay > 0  # the tuned default (README "Quality")
    assert config.resolved(4, False, 512).ema_decay == 0  # real models: not measured, off
    kept = TrainConfig(token="sks", class_noun="dog", base_model="builtin:tiny-world", meter_every=50, keep="both")
    assert kept.resolved(4, True, 64).ema_decay == 0
    # 64 class images let the box lose its stripes at two seeds; the built-ins now draw the real models' 200
    assert config.resolved(4, True, 64).num_class_images == config.resolved(4, False, 512).num_class_images == 200
