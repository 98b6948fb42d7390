"""Base models: fingerprints, the offline tokenizer, built-ins and folders."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPTokenizer

from dreambooth_lora.errors import UserError
from dreambooth_lora.models import builtin_names, fingerprint, load_base_model
from dreambooth_lora.tokenizer import RARE_TOKENS, build_tokenizer

PROMPTS = ["a photo of sks dog", "A Photo of a RED mug on the beach!", "zwx ohwx unknownword 42"]


def test_fingerprint_is_stable_across_builds(tiny_random_builder):
    assert tiny_random_builder().fingerprint == tiny_random_builder().fingerprint


def test_fingerprint_equal_for_fp16_copy_of_the_same_weights(tiny_random_builder):
    model = tiny_random_builder()
    halves = [copy.deepcopy(module).half() for module in (model.unet, model.vae, model.text_encoder)]
    assert halves[0].dtype == torch.float16
    assert fingerprint(*halves) == model.fingerprint


def test_fingerprint_changes_with_the_weights(tiny_random_builder):
    model = tiny_random_builder()
    with torch.no_grad():
        model.unet.conv_in.weight.view(-1)[0] += 1.0  # the first element is in the hashed sample
    assert fingerprint(model.unet, model.vae, model.text_encoder) != model.fingerprint


def test_fingerprint_same_from_a_folder_in_fp16_and_fp32(tiny_random_builder, tmp_path):
    """The same weights built in code, saved as fp32 or fp16 diffusers folders and loaded back, agree."""
    model = tiny_random_builder()
    model.pipeline().save_pretrained(tmp_path / "fp32")
    half = model.pipeline().to(torch.float16)
    half.save_pretrained(tmp_path / "fp16")
    from_fp32, from_fp16 = load_base_model(str(tmp_path / "fp32")), load_base_model(str(tmp_path / "fp16"))
    assert from_fp16.unet.dtype == torch.float32  # loaded in fp32, so only fp16 rounding differs
    assert from_fp32.fingerprint == from_fp16.fingerprint == model.fingerprint
    assert from_fp32.name == str(tmp_path / "fp32")  # the name differs, the fingerprint does not


def test_tokenizer_round_trips_through_save_and_load(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.model_max_length == tokenizer.model_max_length == 77
    for prompt in PROMPTS:
        assert loaded(prompt).input_ids == tokenizer(prompt).input_ids
    for token in RARE_TOKENS:
        assert len(loaded.tokenize(token)) == 1  # identifiers are whole tokens, so training one touches no other word
    assert loaded.decode(loaded("a photo of sks dog").input_ids, skip_special_tokens=True) == "a photo of sks dog"


def test_tiny_world_loads_and_differs_from_tiny_random(tiny_random_builder):
    if "builtin:tiny-world" not in builtin_names():
        pytest.fail("builtin:tiny-world is not shipped in dreambooth_lora/builtin/tiny-world")
    world = load_base_model("builtin:tiny-world")
    assert world.name == "builtin:tiny-world" and world.native_resolution > 0
    assert world.fingerprint == load_base_model("builtin:tiny-world").fingerprint
    assert world.fingerprint != tiny_random_builder().fingerprint
    assert not any(p.requires_grad for p in world.unet.parameters())  # base weights frozen on load


@pytest.mark.parametrize(
    "name,message",
    [
        ("builtin:nope", "Unknown built-in model 'builtin:nope'"),
        ("model.ckpt", "only .safetensors"),
        ("{tmp}/missing.safetensors", "missing.safetensors does not exist"),
        ("{tmp}/single.safetensors", "single.safetensors is a single-file checkpoint: pass --config"),
        ("{tmp}/plainfolder", "plainfolder is a folder but not a diffusers model"),
        ("{tmp}/not-there", "not-there' offline"),
        ("nobody/no-such-model", "'nobody/no-such-model' offline"),
    ],
)
def test_unloadable_base_models_are_named(tmp_path, name, message):
    (tmp_path / "single.safetensors").write_bytes(b"x")
    (tmp_path / "plainfolder").mkdir()
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("{tmp}", "")):
        load_base_model(name.format(tmp=tmp_path))
