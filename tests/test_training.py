"""Training on builtin:tiny-random: LoRA starts at the base model, training lowers the loss, the saved
adapter reloads to the same outputs, qlora keeps the 4-bit base fixed, and resume is exact.

The trained model is observed, not replaced: `capture_models` wraps train.load_base_model (and
train.quantize_text_encoder) so the test keeps a handle on the very objects run_training trains.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer

from dreambooth_lora import train
from dreambooth_lora.adapter_file import read_adapter
from dreambooth_lora.config import TrainConfig
from dreambooth_lora.errors import UserError
from dreambooth_lora.generate import AdapterSession
from dreambooth_lora.images import load_subject_images
from dreambooth_lora.library import Library
from dreambooth_lora.identifier import IdentifierEmbedding
from dreambooth_lora.lora import (
    attach_text_encoder_lora,
    attach_unet_lora,
)
from dreambooth_lora.losses import prior_preservation_loss
from dreambooth_lora.models import build_tiny_random
from dreambooth_lora.jobs import Jobs, create_job
from dreambooth_lora.train import TrainingStopped, encode_images, run_training

RESOLUTION = 32  # a quarter of tiny-random's native pixels: same code path, less CPU
PROMPT = "a photo of sks dog"


def tiny_config(name: str, **overrides) -> TrainConfig:
    values = dict(token="sks", class_noun="dog", base_model="builtin:tiny-random", name=name,
                  resolution=RESOLUTION, num_class_images=2, steps=30)
    return TrainConfig(**{**values, **overrides})


class capture_models:
    """Context manager: record the BaseModel (and quantized text encoder) run_training loads, unchanged."""

    def __init__(self):
        self.models, self.quantized = [], []
        self._patch = pytest.MonkeyPatch()

    def __enter__(self):
        real_load, real_quantize = train.load_base_model, train.quantize_text_encoder

        def load(*args, **kwargs):
            self.models.append(real_load(*args, **kwargs))
            return self.models[-1]

        def quantize(*args, **kwargs):
            self.quantized.append(real_quantize(*args, **kwargs))
            return self.quantized[-1]

        self._patch.setattr(train, "load_base_model", load)
        self._patch.setattr(train, "quantize_text_encoder", quantize)
        return self

    def __exit__(self, *exc):
        self._patch.undo()


# ----- fixed inputs and the loss on a fixed batch -----

def prompt_ids(model, prompt=PROMPT) -> torch.Tensor:
    return model.tokenizer([prompt], padding="max_length", max_length=model.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def fixed_unet_inputs(model, images, repeats: int = 4, seed: int = 123):
    """Instance latents (VAE means) with a fixed noise and timesteps, as the training step builds them."""
    means, _ = encode_images(model, images)
    latents = means.repeat(repeats, 1, 1, 1) * model.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
    noisy = model.training_scheduler().add_noise(latents, noise, timesteps)
    return noisy, timesteps, noise


@torch.no_grad()
def unet_output(model, text_encoder, noisy, timesteps, prompt=PROMPT) -> torch.Tensor:
    hidden = text_encoder(prompt_ids(model, prompt))[0].float()
    return model.unet(noisy, timesteps, hidden.expand(noisy.shape[0], -1, -1)).sample


def fixed_batch_loss(model, images) -> float:
    noisy, timesteps, noise = fixed_unet_inputs(model, images)
    prediction = unet_output(model, model.text_encoder, noisy, timesteps)
    return prior_preservation_loss(prediction, noise, noisy.shape[0], 0.0)[0].item()


def lora_layer_count(*modules) -> int:
    return sum(isinstance(m, LoraLayer) for module in modules for m in module.modules())


# ----- LoRA at step 0 -----

def test_lora_at_step_zero_gives_the_base_model_exactly(tiny_random_builder, session_subject_images):
    model = tiny_random_builder()
    images, _ = load_subject_images(session_subject_images, RESOLUTION)
    noisy, timesteps, _ = fixed_unet_inputs(model, images)
    ids = prompt_ids(model)
    with torch.no_grad():
        base_text = model.text_encoder(ids)[0]
        base_unet = unet_output(model, model.text_encoder, noisy, timesteps)
    attach_unet_lora(model.unet, rank=4, alpha=8.0)
    attach_text_encoder_lora(model.text_encoder, rank=4, alpha=8.0)
    model.tokenizer = IdentifierEmbedding.new(model.text_encoder, model.tokenizer, "sks").attach(model.text_encoder).tokenizer
    assert lora_layer_count(model.unet) == 4 * 2 * 4  # to_q/k/v/out of attn1 and attn2; down, mid and 2 up blocks
    assert lora_layer_count(model.text_encoder) == 4 * 2  # q/k/v/out_proj in 2 layers
    own_ids = prompt_ids(model)  # "sks" is now a token of its own, its row the one of its single piece
    assert not torch.equal(own_ids, ids)
    with torch.no_grad():
        assert torch.equal(model.text_encoder(own_ids)[0], base_text)
        assert torch.equal(unet_output(model, model.text_encoder, noisy, timesteps), base_unet)
    # ...and it is the zero B matrices that make it so: a non-zero B changes the output.
    with torch.no_grad():
        next(m for m in model.unet.modules() if isinstance(m, LoraLayer)).lora_B["default"].weight.fill_(0.1)
        assert not torch.equal(unet_output(model, model.text_encoder, noisy, timesteps), base_unet)


# ----- one real run shared by the next tests -----

@pytest.fixture(scope="module")
def trained(tmp_path_factory, session_subject_images, session_prior_dir):
    """30 steps with text-encoder LoRA and the identifier embedding, at a high lr so the change is clear, and with the
    built-ins' recipe of before the contrast rows (2 + 2 rows a step, the noise target, decay 0.95, every attention
    projection, no caption dropout). On this random
    model the loss below fell 1.158 -> 0.863 with it, but only to 1.011 with the built-ins' 3 + 3 + 2 rows, frozen
    target and decay 0.99 of 2026-11-28 (which over 30 steps also averages the first steps' near-base weights), and to
    1.000 with the noise target and 2 + 4 rows, and to 0.984 with that recipe but the adapter off cross-attention's
    keys and values and 5 % caption dropout: how far 30 steps go on a random model, not what the bench measures."""
    library = Library(tmp_path_factory.mktemp("trained_data"))
    job = create_job(library, tiny_config("subject", lr=1e-2, batch_size=2, prior_target="noise", ema_decay=0.95,
                                          text_encoder="lora", unet_layers="attention", caption_dropout=0.0),
                     session_subject_images)
    with capture_models() as captured:
        result = run_training(library, job, session_prior_dir)
    return library, result, captured.models[0]


def test_training_lowers_the_loss_on_a_fixed_batch(trained, session_subject_images):
    _, result, model = trained
    images, _ = load_subject_images(session_subject_images, RESOLUTION)
    before = fixed_batch_loss(build_tiny_random(), images)
    after = fixed_batch_loss(model, images)
    assert after < 0.85 * before, (before, after)  # measured: 1.158 -> 0.863 (noise target, 2 class rows)
    assert len(result.losses) == 30 and all(np.isfinite(result.losses))


def test_training_changes_the_output(trained, session_subject_images):
    _, _, model = trained
    base = build_tiny_random()
    images, _ = load_subject_images(session_subject_images, RESOLUTION)
    noisy, timesteps, _ = fixed_unet_inputs(base, images)
    before = unet_output(base, base.text_encoder, noisy, timesteps)
    after = unet_output(model, model.text_encoder, noisy, timesteps)
    assert (after - before).abs().mean() > 1e-3
    # The identifier embedding learned: the prompt with sks now encodes differently.
    with torch.no_grad():
        assert not torch.allclose(model.text_encoder(prompt_ids(model))[0], base.text_encoder(prompt_ids(base))[0])


def test_saved_adapter_reloads_to_the_trained_outputs(trained, session_subject_images):
    library, result, model = trained
    entry = library.get("subject")
    assert entry.id == result.adapter.id and entry.fingerprint == model.fingerprint
    adapter = read_adapter(entry.file)
    file_modules = {key.split(".lora_")[0] for key in adapter.lora_only()}
    assert len(adapter.unet_tensors) > 0 and len(adapter.text_encoder_tensors) > 0 and adapter.identifier_tensors

    # A plain diffusers pipeline on a fresh model places every LoRA module the file holds.
    plain = build_tiny_random().pipeline()
    plain.load_lora_weights(str(entry.file))
    assert lora_layer_count(plain.unet, plain.text_encoder) == len(file_modules) == 32 + 8  # every attention projection

    # The studio's session (LoRA + identifier embedding) on a fresh model matches the trained one in memory.
    fresh = build_tiny_random()
    session = AdapterSession(fresh)
    session.apply([(entry, 1.0)])
    images, _ = load_subject_images(session_subject_images, RESOLUTION)
    noisy, timesteps, _ = fixed_unet_inputs(fresh, images)
    with torch.no_grad():
        trained_text = model.text_encoder(prompt_ids(model))[0]
        reloaded_text = session.pipe.text_encoder(prompt_ids(session.pipe))[0]  # the session's tokenizer knows the identifier
    assert torch.allclose(reloaded_text, trained_text, atol=1e-5, rtol=0)
    trained_out = unet_output(model, model.text_encoder, noisy, timesteps)
    reloaded_out = unet_output(session.pipe, session.pipe.text_encoder, noisy, timesteps)
    assert torch.allclose(reloaded_out, trained_out, atol=1e-5, rtol=0), (reloaded_out - trained_out).abs().max()

    def image(pipe):
        return pipe([PROMPT], num_inference_steps=3, guidance_scale=5.0, height=RESOLUTION, width=RESOLUTION,
                    generator=[torch.Generator().manual_seed(0)], output_type="np").images
    with torch.no_grad():
        assert np.abs(image(session.pipe) - image(model.pipeline())).max() < 1e-5
        session.clear()  # and without the adapter the images are the base model's, visibly different
        assert np.abs(image(session.pipe) - image(model.pipeline())).mean() > 1e-3


@pytest.mark.parametrize("layers, expected", [
    ("cross-attention", {"attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"}),
    ("no-prompt-kv", {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"}),
])
def test_unet_layers_choose_the_projections_that_train_and_a_plain_pipeline_places_exactly_them(
        layers, expected, tmp_path, session_subject_images, session_prior_dir):
    """--unet-layers: the chosen projections train in each of the 4 transformer blocks and no other does; the file
    holds those layers and nothing else, and a plain diffusers pipeline places them all. The built-ins default to
    no-prompt-kv (the prompt's keys and values frozen), real models to every attention projection."""
    assert tiny_config("d").resolved(3, True, RESOLUTION).unet_layers == "no-prompt-kv"
    assert tiny_config("d").resolved(3, False, RESOLUTION).unet_layers == "attention"
    library = Library(tmp_path)
    config = tiny_config("layers", steps=2, lr=1e-2, ema_decay=0.0, unet_layers=layers)
    with capture_models() as captured:
        result = run_training(library, create_job(library, config, session_subject_images), session_prior_dir)
    trained_unet = captured.models[0].unet
    found = {name: module for name, module in trained_unet.named_modules() if isinstance(module, LoraLayer)}
    assert len(found) == 4 * len(expected)
    assert {"attn" + name.rsplit(".attn", 1)[1] for name in found} == expected  # "...attn1.to_out.0" -> "attn1.to_out.0"
    assert all(module.lora_B["default"].weight.abs().sum() > 0 for module in found.values())  # and they all trained
    adapter = read_adapter(result.adapter.file)
    file_modules = {key.split(".lora_")[0] for key in adapter.lora_only()}
    assert len(file_modules) == len(found)
    plain = build_tiny_random().pipeline()
    plain.load_lora_weights(str(result.adapter.file))
    assert lora_layer_count(plain.unet) == len(found) and lora_layer_count(plain.text_encoder) == 0
    with pytest.raises(UserError, match="--unet-layers 'all'"):
        tiny_config("bad", unet_layers="all")


def record_unet_states(monkeypatch) -> list:
    """Observe run_training's model, nothing replaced: the list gets the loaded model, then the encoder states of
    every UNet call (positional in a training step, a keyword in the pipelines)."""
    calls = []
    real_load = train.load_base_model

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        model.unet.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append((args[2] if len(args) > 2 else kwargs["encoder_hidden_states"])
                                                      .detach().clone()), with_kwargs=True)
        calls.append(model)
        return model

    monkeypatch.setattr(train, "load_base_model", load)
    return calls


def test_caption_dropout_trains_some_photo_rows_under_the_empty_prompt_and_no_class_row(
        tmp_path, session_subject_images, session_prior_dir, monkeypatch):
    """--caption-dropout P: each photo's row is under the empty prompt with probability P (guidance's unconditional
    branch), every other photo row under the instance prompt, and no class row ever is; the file records P."""
    calls = record_unet_states(monkeypatch)
    config = tiny_config("drop", steps=4, lr=1e-2, ema_decay=0.0, caption_dropout=0.5, batch_size=3, contrast_rows=0)
    result = run_training(Library(tmp_path), create_job(Library(tmp_path), config, session_subject_images), session_prior_dir)
    model, states = calls[0], calls[1:]
    ids = lambda text: model.tokenizer([text], padding="max_length", max_length=model.tokenizer.model_max_length,
                                       truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():  # the identifier's row is in the instance prompt alone: the empty and class prompts are the base's
        empty, klass = (model.text_encoder(ids(text))[0][0] for text in ("", "a photo of a dog"))
    steps = [batch for batch in states if batch.shape[0] == 6]  # 3 photo rows + 3 class rows (frozen-target passes: 3)
    assert len(steps) == 4
    photo_rows = [row for batch in steps for row in batch[:3]]
    dropped = [torch.allclose(row, empty, atol=1e-5) for row in photo_rows]
    assert 0 < sum(dropped) < len(photo_rows)  # some, not all, of the 12 draws at P = 0.5 (seeded: always the same)
    assert all(torch.allclose(batch[3:], klass.expand(3, -1, -1), atol=1e-5) for batch in steps)
    for step, batch in enumerate(steps):  # the rest: the instance prompt's states (its identifier row learns, step by step)
        kept = [row for row, gone in zip(batch[:3], dropped[3 * step:3 * step + 3]) if not gone]
        assert all(torch.equal(row, kept[0]) and not torch.allclose(row, klass, atol=1e-3) for row in kept)
    assert result.adapter.meta["caption_dropout"] == 0.5
    assert tiny_config("d").resolved(3, True, RESOLUTION).caption_dropout == 0.05  # the built-ins' default
    assert tiny_config("d").resolved(3, False, RESOLUTION).caption_dropout == 0.0  # real models: off
    with pytest.raises(UserError, match="--caption-dropout 1.0"):
        tiny_config("bad", caption_dropout=1.0)


def test_caption_dropout_keeps_the_empty_prompt_the_base_encoders_under_an_encoder_lora(
        tmp_path, session_subject_images, session_prior_dir, monkeypatch):
    """With a text-encoder LoRA the dropped rows still get the base encoder's empty-prompt states at every step: the
    encoder's adapter never rewrites the prompt that every generation is guided against."""
    from dreambooth_lora.lora import adapters_disabled

    calls = record_unet_states(monkeypatch)
    config = tiny_config("drop-te", steps=4, lr=5e-2, ema_decay=0.0, caption_dropout=0.5, batch_size=3,
                         contrast_rows=0, text_encoder="lora")
    run_training(Library(tmp_path), create_job(Library(tmp_path), config, session_subject_images), session_prior_dir)
    model, states = calls[0], calls[1:]
    ids = model.tokenizer([""], padding="max_length", max_length=model.tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
    with torch.no_grad(), adapters_disabled(model.unet, model.text_encoder):
        base_empty = model.text_encoder(ids)[0][0]
    with torch.no_grad():
        trained_empty = model.text_encoder(ids)[0][0]
    assert not torch.allclose(trained_empty, base_empty, atol=1e-4)  # the encoder LoRA learned: it would change ""
    steps = [batch[:3] for batch in states if batch.shape[0] == 6]  # the photo rows of each of the 4 steps
    assert len(steps) == 4
    dropped = [[bool(torch.allclose(row, base_empty, atol=1e-5)) for row in rows] for rows in steps]
    assert any(any(flags) for flags in dropped[1:])  # dropped after the LoRA has learned, still the base's ""
    for rows, flags in zip(steps, dropped):  # every other photo row is the instance prompt's (one state a step)
        kept = [row for row, gone in zip(rows, flags) if not gone]
        assert all(torch.equal(row, kept[0]) and not torch.allclose(row, base_empty, atol=1e-3) for row in kept)


def test_adapter_file_records_the_run(trained):
    library, result, model = trained
    meta = read_adapter(library.get("subject").file).meta
    assert meta["token"] == "sks" and meta["base_model"] == "builtin:tiny-random"
    assert meta["fingerprint"] == model.fingerprint and meta["steps"] == 30 and meta["rank"] == 8
    assert meta["text_encoder"] == "lora" and meta["train_token_embedding"] is True
    assert meta["final_loss"] == result.losses[-1]
    assert len(library.get("subject").samples) == train.SAMPLE_COUNT


def test_corrupt_adapter_file_is_a_user_error(tmp_path, trained):
    library, _, _ = trained
    data = library.get("subject").file.read_bytes()
    cases = {"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file at all",
             "bad-header": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"}
    for label, content in cases.items():
        path = tmp_path / f"{label}.safetensors"
        path.write_bytes(content)
        with pytest.raises(UserError, match=f"{label}.safetensors: not a readable safetensors file"):
            read_adapter(path)


# ----- QLoRA -----

@pytest.mark.parametrize("avx512_bf16", [True, False], ids=["avx512bf16-cpu", "other-cpu"])
@pytest.mark.parametrize("base_model", ["builtin:tiny-random", "builtin:tiny-world"])
def test_qlora_trains_lora_and_leaves_4bit_weights_alone(tmp_path, session_subject_images, session_prior_dir,
                                                        monkeypatch, base_model, avx512_bf16):
    # bitsandbytes picks its CPU 4-bit path by the CPU (AVX-512 BF16 or not) when a Linear4bit is built, and
    # machines of this kind differ: both paths run here, whatever this CPU has.
    import bitsandbytes.nn.modules
    from bitsandbytes.nn import Linear4bit

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: avx512_bf16)
    library = Library(tmp_path / "data")
    config = tiny_config("q", base_model=base_model, text_encoder="qlora", steps=4, lr=1e-3)
    job = create_job(library, config, session_subject_images)
    with capture_models() as captured:
        # Snapshot right after quantisation, before training touches anything.
        real_quantize = train.quantize_text_encoder
        snapshots = {}

        def quantize_and_snapshot(*args, **kwargs):
            encoder = real_quantize(*args, **kwargs)
            snapshots.update({name: module.weight.data.clone() for name, module in encoder.named_modules()
                              if isinstance(module, Linear4bit)})
            return encoder

        captured._patch.setattr(train, "quantize_text_encoder", quantize_and_snapshot)
        run_training(library, job, session_prior_dir)
    encoder = captured.models[0].text_encoder
    # LoRA wraps each 4-bit layer, which then sits at <name>.base_layer
    quantized = {name.removesuffix(".base_layer"): module for name, module in encoder.named_modules()
                 if isinstance(module, Linear4bit)}
    assert len(quantized) == len(snapshots) >= 8  # every attention projection (at least) is 4-bit
    for name, module in quantized.items():
        assert module.weight.data.dtype == torch.uint8  # packed NF4, not dequantised
        assert torch.equal(module.weight.data, snapshots[name]), name
        assert not module.weight.requires_grad
    lora_b = [p for n, p in encoder.named_parameters() if "lora_B" in n]
    assert len(lora_b) == encoder.config.num_hidden_layers * 4 and all(p.abs().max() > 0 for p in lora_b)  # B moved from 0
    saved = read_adapter(library.get("q").file)
    assert len(saved.text_encoder_tensors) == 2 * len(lora_b)
    assert all(v.dtype == torch.float32 for v in saved.tensors.values())
    assert len(library.get("q").samples) == train.SAMPLE_COUNT  # sampling ran on the 4-bit encoder too


# ----- interrupt and resume -----

@pytest.mark.parametrize("schedule, ema", [("constant", 0.0), ("cosine", 0.0), ("constant", 0.5)],
                         ids=["constant", "cosine", "ema"])
def test_resume_continues_from_the_checkpoint_and_matches_an_uninterrupted_run(tmp_path, session_subject_images,
                                                                               session_prior_dir, schedule, ema):
    """With the cosine schedule too: each group's base rate travels in the checkpoint and the rate of a step is a
    function of the step alone. With the weight average (--ema-decay) the average travels in the checkpoint."""
    steps, stop_after = 8, 3
    # the uninterrupted run in a library of its own: in one library the second subject would get "sks2"
    alone = Library(tmp_path / "alone")
    whole = run_training(alone, create_job(alone, tiny_config("whole", steps=steps, lr_schedule=schedule, ema_decay=ema),
                                           session_subject_images), session_prior_dir)
    library = Library(tmp_path / "data")

    job = create_job(library, tiny_config("resumed", steps=steps, lr_schedule=schedule, ema_decay=ema),
                     session_subject_images)
    seen = []

    def stop_after_k():
        return sum(p.phase == "training" for p in seen) >= stop_after

    with pytest.raises(TrainingStopped) as stopped:
        run_training(library, job, session_prior_dir, on_progress=seen.append, should_stop=stop_after_k)
    assert stopped.value.step == stop_after and stopped.value.job_id == job
    assert "--resume " + job in str(stopped.value)
    assert (Jobs(library).folder(job) / "checkpoint.safetensors").exists()
    assert not library.name_taken("resumed")  # no adapter from a stopped run

    progress = []
    resumed = run_training(library, job, session_prior_dir, on_progress=progress.append)
    training = [p for p in progress if p.phase == "training"]
    assert training[0].message == f"resumed at step {stop_after}" and training[0].step == stop_after
    assert [p.step for p in training[1:]] == list(range(stop_after + 1, steps + 1))
    assert resumed.losses == whole.losses  # losses before the stop come from the checkpoint
    assert not (Jobs(library).folder(job) / "checkpoint.safetensors").exists()  # done: no stale checkpoint

    left, right = read_adapter(whole.adapter.file).tensors, read_adapter(resumed.adapter.file).tensors
    assert left.keys() == right.keys()
    worst = max((left[k] - right[k]).abs().max().item() for k in left)
    assert worst == 0.0, f"resumed adapter differs from the uninterrupted one by {worst}"


def test_a_run_depends_on_its_seed_alone_not_on_what_ran_before_in_the_process(tmp_path, session_subject_images,
                                                                                session_prior_dir):
    adapters = []
    for name, global_seed in (("first", 1), ("second", 2)):
        torch.manual_seed(global_seed)  # e.g. the studio's worker ran other jobs before this one
        library = Library(tmp_path / name)  # one library each: in one, the second subject would be called "sks2"
        result = run_training(library, create_job(library, tiny_config(name, steps=2), session_subject_images),
                              session_prior_dir)
        adapters.append(read_adapter(result.adapter.file).tensors)
    left, right = adapters
    assert left.keys() == right.keys()
    assert all(torch.equal(left[k], right[k]) for k in left)


def test_the_saved_adapter_is_the_weight_average_of_the_steps(tmp_path, session_subject_images, session_prior_dir):
    """--ema-decay d saves sum_i d^(T-i) w_i / sum_i d^(T-i) over the weights w_i after each step i (losses.ema_rate),
    so one step saves that step's weights, and with d = 0.5 two steps save (0.5 w_1 + w_2) / 1.5."""
    import dreambooth_lora.train as train_module

    after_step, seen = train_module.Trainables.after_step, []

    def record(self):  # the weights after each step (after the identifier's norm cap), as the average sees them
        after_step(self)
        seen.append(self.tensors())

    runs = {}
    for name, steps, ema in (("one-plain", 1, 0.0), ("one-ema", 1, 0.5), ("two-ema", 2, 0.5)):
        library = Library(tmp_path / name)
        seen.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train_module.Trainables, "after_step", record)
            result = run_training(library, create_job(library, tiny_config(name, steps=steps, ema_decay=ema),
                                                      session_subject_images), session_prior_dir)
        runs[name] = (read_adapter(result.adapter.file).tensors, list(seen))
        assert result.adapter.meta["ema_decay"] == ema
    plain, ema_one = runs["one-plain"][0], runs["one-ema"][0]
    assert plain.keys() == ema_one.keys() and all(torch.equal(plain[k], ema_one[k]) for k in plain)
    saved, (first, second) = runs["two-ema"]
    assert set(saved) <= set(first)
    moved = [k for k in saved if not torch.equal(first[k], second[k])]
    assert moved  # the second step changed weights, so the average differs from either step's
    for key in saved:
        assert torch.allclose(saved[key], (0.5 * first[key] + second[key]) / 1.5, atol=1e-6), key


def test_the_cosine_schedule_changes_the_run(tmp_path, session_subject_images, session_prior_dir):
    runs = {}
    for schedule in ("constant", "cosine"):
        library = Library(tmp_path / schedule)
        result = run_training(library, create_job(library, tiny_config(schedule, steps=4, lr_schedule=schedule),
                                                  session_subject_images), session_prior_dir)
        runs[schedule] = read_adapter(result.adapter.file).tensors
        assert result.adapter.meta["lr_schedule"] == schedule
    assert runs["constant"].keys() == runs["cosine"].keys()
    assert not all(torch.equal(runs["constant"][k], runs["cosine"][k]) for k in runs["constant"])



def test_no_samples_saves_the_adapter_without_sample_images(tmp_path, session_subject_images, session_prior_dir):
    library = Library(tmp_path / "lib")
    result = run_training(library, create_job(library, tiny_config("bare", steps=2, samples=False), session_subject_images),
                          session_prior_dir)
    assert result.adapter.file.exists() and library.get("bare").samples == []  # bench/speed.py's --no-samples run


@pytest.mark.parametrize("asked, expected", [(None, 1), (2, 2)])
def test_cpu_steps_run_on_one_thread_when_small_unless_asked_and_the_process_gets_its_threads_back(
        tmp_path, session_subject_images, session_prior_dir, asked, expected):
    library = Library(tmp_path / "lib")
    torch.set_num_threads(2)
    seen = []  # the threads each training step ran on, as reported with its progress

    def on_progress(progress):
        if progress.phase == "training":
            seen.append(torch.get_num_threads())

    job_id = create_job(library, tiny_config("threads", steps=3, samples=False, cpu_threads=asked), session_subject_images)
    run_training(library, job_id, session_prior_dir, on_progress=on_progress)
    assert seen and set(seen) == {expected}  # tiny-random's step is far under step_cost.ONE_THREAD_BELOW_FLOPS
    assert torch.get_num_threads() == 2
    with pytest.raises(UserError, match="--cpu-threads 0"):
        tiny_config("bad", cpu_threads=0)


def test_a_step_draws_batch_instance_rows_then_prior_batch_class_rows():
    generator = torch.Generator().manual_seed(0)
    instance = (torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2))  # mean, std: every instance row 0
    prior = (torch.ones(5, 4, 2, 2), torch.zeros(5, 4, 2, 2))  # every class row 1
    latents, n_instance = train.sample_latents(instance, prior, 2, generator)
    assert n_instance == 2 and latents.shape[0] == 4  # as many class rows as instance rows by default
    latents, n_instance = train.sample_latents(instance, prior, 2, generator, prior_batch=6)
    assert n_instance == 2 and latents.shape[0] == 8
    assert latents[:2].eq(0).all() and latents[2:].eq(1).all()  # instance rows first
    latents, n_instance = train.sample_latents(instance, None, 2, generator, prior_batch=6)
    assert n_instance == 2 and latents.shape[0] == 2  # without priors there are no class rows
    latents, n_instance = train.sample_latents(instance, prior, 2, generator, prior_batch=3, contrast=1)
    assert n_instance == 2 and latents.shape[0] == 6  # the contrast row comes last, under the class prompt ...
    assert latents[:2].eq(0).all() and latents[2:5].eq(1).all() and latents[5:].eq(0).all()  # ... from the photos
    latents, n_instance = train.sample_latents(instance, None, 2, generator, contrast=1)
    assert latents.shape[0] == 2  # no priors, no class prompt rows: no contrast rows either
