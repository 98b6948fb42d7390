"""Identifiers as tokens of their own (dreambooth_lora/identifier.py): whole words only, no existing embedding row
ever changes, per-piece files converted, and a second subject with an identifier in use gets another one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dreambooth_lora.adapter_file import AdapterFile, read_adapter, store_adapter
from dreambooth_lora.cli import main
from dreambooth_lora.config import TrainConfig
from dreambooth_lora.errors import UserError
from dreambooth_lora.identifier import (
    IDENTIFIER_PREFIX,
    LEGACY_PREFIX,
    IdentifierEmbedding,
    choose_identifier,
    convert_pieces,
    identifiers_in_use,
    initial_vectors,
    mix_identifiers,
    rename_in_prompt,
    spell,
)
from dreambooth_lora.jobs import Jobs
from dreambooth_lora.library import Library
from dreambooth_lora.models import load_base_model


@pytest.fixture(scope="module")
def world():
    return load_base_model("builtin:tiny-world")  # its tokenizer splits "myball" into m, y, ball</w>


def encode(model, tokenizer, prompt: str) -> torch.Tensor:
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.text_encoder(ids)[0]


# ----- pure parts -----

def test_a_taken_identifier_gets_a_number_when_its_embedding_trains():
    assert choose_identifier("sks", set(), True) == "sks"
    assert choose_identifier("sks", {"sks"}, True) == "sks2"
    assert choose_identifier("SKS", {"sks", "sks2"}, True) == "SKS3"
    with pytest.raises(UserError, match=r"'sks' is already used by adapter 'ball'.*another --token.*--train-token-embedding"):
        choose_identifier("sks", {"sks"}, False, {"sks": "adapter 'ball'"})
    assert identifiers_in_use(["sks", "rby bcx", "", None]) == {"sks", "rby", "bcx"}  # a mix names its parts'


def test_renaming_in_a_prompt_touches_whole_words_only():
    assert rename_in_prompt("a photo of SKS dog, sks2 and sksy", "sks", "sks2") == "a photo of sks2 dog, sks2 and sksy"
    assert rename_in_prompt(None, "sks", "sks2") is None


def test_per_piece_rows_are_put_in_spelling_order():
    assert spell("myball", ["ball</w>", "m", "y"]) == ["m", "y", "ball</w>"]
    assert spell("aaa", ["a", "a</w>"]) == ["a", "a", "a</w>"]  # a repeated piece is one row, used twice
    assert spell("xyz", ["m", "y"]) is None
    rows = {"ball</w>": torch.full((4,), 3.0), "m": torch.full((4,), 1.0), "y": torch.full((4,), 2.0)}
    converted = convert_pieces(rows, "myball")
    assert list(converted) == ["myball"] and converted["myball"][:, 0].tolist() == [1.0, 2.0, 3.0]


# ----- in a text encoder -----

def test_a_multi_piece_identifier_changes_no_other_word_and_no_existing_row(world):
    table_before = world.text_encoder.get_input_embeddings().weight.detach().clone()
    assert world.tokenizer.tokenize("myball") == ["m", "y", "ball</w>"]
    plain = {p: encode(world, world.tokenizer, p) for p in ("a photo of a ball", "a photo of myballs", "a photo of my ball")}
    identifier = IdentifierEmbedding.new(world.text_encoder, world.tokenizer, "myball").attach(world.text_encoder)
    try:
        # training moves the one new row (here: a step of plain gradient descent on some loss)
        out = world.text_encoder(identifier.tokenizer(["a photo of myball ball"], return_tensors="pt").input_ids)[0]
        out.square().mean().backward()
        with torch.no_grad():
            identifier.vectors -= 100.0 * identifier.vectors.grad
        assert identifier.vectors.grad.abs().sum() > 0
        for prompt, before in plain.items():  # other words, and words that contain the identifier, encode as before
            assert torch.equal(encode(world, identifier.tokenizer, prompt), before), prompt
        assert not torch.allclose(encode(world, identifier.tokenizer, "a photo of myball ball"),
                                  encode(world, world.tokenizer, "a photo of myball ball"))
        assert torch.equal(world.text_encoder.get_input_embeddings().weight, table_before)
        assert world.text_encoder.get_input_embeddings().weight.grad is None  # the table never took part in learning
        assert len(world.tokenizer) == identifier.table_size  # the base model's own tokenizer knows no new token
    finally:
        identifier.detach()


def test_an_identifier_that_is_a_vocabulary_piece_is_refused(world):
    piece = next(p for p in world.tokenizer.get_vocab() if p.isalpha() and len(p) > 2 and not p.endswith("</w>"))
    with pytest.raises(UserError, match="already a piece of this model's vocabulary"):
        IdentifierEmbedding.new(world.text_encoder, world.tokenizer, piece)


def test_mixing_distinct_identifiers_keeps_each_row(world):
    table = world.text_encoder.get_input_embeddings().weight
    a = {"rby": torch.randn(1, table.shape[1])}
    b = {"bcx": torch.randn(1, table.shape[1])}
    mixed = mix_identifiers([(a, 1.0), (b, 1.0)], world.tokenizer, table)
    assert torch.allclose(mixed["rby"], a["rby"]) and torch.allclose(mixed["bcx"], b["bcx"])
    half = mix_identifiers([(a, 0.5)], world.tokenizer, table)["rby"]
    init = initial_vectors("rby", 1, world.tokenizer, table)
    assert torch.allclose(half, init + 0.5 * (a["rby"] - init))


def test_a_per_piece_file_reads_as_one_identifier_with_the_old_encoding_of_its_word(world, tmp_path):
    """Files written before identifiers had tokens of their own: rows for m, y, ball</w>. Converted, the identifier
    encodes "myball" as the old hook did; "ball" alone is no longer touched (the old layout's leak)."""
    dim = world.text_encoder.get_input_embeddings().weight.shape[1]
    generator = torch.Generator().manual_seed(0)
    pieces = {p: torch.randn(dim, generator=generator) for p in ("m", "y", "ball</w>")}
    (tmp_path / "old").mkdir()
    save_file({LEGACY_PREFIX + p: v for p, v in pieces.items()}, str(tmp_path / "old" / "adapter.safetensors"),
              metadata={"dreambooth_lora": '{"token": "myball"}'})
    adapter = read_adapter(tmp_path / "old" / "adapter.safetensors")
    assert list(adapter.identifiers) == ["myball"] and adapter.identifier_tensors.keys() == {IDENTIFIER_PREFIX + "myball"}

    def old_hook(module, inputs, output):  # what the per-piece layout did: every occurrence of each piece replaced
        for piece, vector in pieces.items():
            mask = (inputs[0] == world.tokenizer.convert_tokens_to_ids(piece)).unsqueeze(-1)
            output = torch.where(mask, vector, output)
        return output

    pipe = world.pipeline()
    prompts = ("a photo of myball", "a photo of a ball")
    with torch.no_grad():
        base = {p: pipe.encode_prompt(p, "cpu", 1, False)[0] for p in prompts}
        handle = world.text_encoder.get_input_embeddings().register_forward_hook(old_hook)
        old = {p: pipe.encode_prompt(p, "cpu", 1, False)[0] for p in prompts}
        handle.remove()
        identifier = IdentifierEmbedding.for_text_encoder(world.text_encoder, world.tokenizer, adapter.identifiers)
        identifier.attach(world.text_encoder)
        pipe.tokenizer = identifier.tokenizer  # diffusers expands "myball" into myball myball_1 myball_2
        new = {p: pipe.encode_prompt(p, "cpu", 1, False)[0] for p in prompts}
        identifier.detach()
    assert torch.allclose(new["a photo of myball"], old["a photo of myball"], atol=1e-6)
    assert not torch.allclose(old["a photo of a ball"], base["a photo of a ball"])  # the old layout leaked into "ball"
    assert torch.equal(new["a photo of a ball"], base["a photo of a ball"])  # the converted one does not


# ----- a new subject with an identifier in use -----

def stored(library: Library, name: str, token: str, base_model: str = "builtin:tiny-random") -> None:
    store_adapter(library, AdapterFile({}, {}, {"name": name, "token": token, "class_noun": "dog", "base_model": base_model}))


def test_a_second_subject_called_sks_becomes_sks2(tmp_path, session_subject_images):
    library = Library(tmp_path / "data")
    stored(library, "ball", "sks")
    stored(library, "other-model", "zwx", base_model="builtin:tiny-world")  # other base models do not count
    jobs = Jobs(library)
    config = TrainConfig(token="sks", class_noun="dog", base_model="builtin:tiny-random", instance_prompt="a sks dog, sks")
    job = jobs.get(jobs.create(config, session_subject_images))
    assert job.config["token"] == "sks2" and job.config["instance_prompt"] == "a sks2 dog, sks2"
    assert "this subject is called 'sks2'" in (jobs.folder(job.id) / "log.txt").read_text()
    # a queued job's identifier counts as in use too
    third = jobs.get(jobs.create(TrainConfig(token="sks", class_noun="cat", base_model="builtin:tiny-random"), session_subject_images))
    assert third.config["token"] == "sks3"
    assert jobs.get(jobs.create(TrainConfig(token="zwx", class_noun="cat", base_model="builtin:tiny-random"),
                                session_subject_images)).config["token"] == "zwx"


def test_with_a_frozen_embedding_a_shared_identifier_is_refused(tmp_path, session_subject_images, capsys):
    root = tmp_path / "data"
    stored(Library(root), "ball", "sks")
    code = main(["train", "--data-root", str(root), "--images", *map(str, session_subject_images), "--token", "sks",
                 "--class-noun", "dog", "--base-model", "builtin:tiny-random", "--no-train-token-embedding"])
    err = capsys.readouterr().err
    assert code == 2 and "The identifier 'sks' is already used by adapter 'ball'" in err and "Traceback" not in err


def test_train_says_the_new_identifier_and_the_adapter_answers_to_it(tmp_path, session_subject_images, session_prior_dir, capsys):
    root = tmp_path / "data"
    stored(Library(root), "ball", "sks")
    code = main(["train", "--data-root", str(root), "--images", *map(str, session_subject_images), "--token", "sks",
                 "--class-noun", "dog", "--base-model", "builtin:tiny-random", "--steps", "2", "--num-class-images", "1",
                 "--resolution", "32", "--name", "dog2", "--prior-dir", str(session_prior_dir), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0 and "so this subject is called 'sks2'" in err and '"token": "sks2"' in out
    entry = Library(root).get("dog2")
    assert entry.token == "sks2" and read_adapter(entry.file).identifiers.keys() == {"sks2"}
    assert main(["library", "--data-root", str(root), "show", "dog2"]) == 0
    assert '"token": "sks2"' in capsys.readouterr().out


def test_a_vocabulary_piece_is_refused_at_submit_before_a_job_exists(tmp_path, session_subject_images, capsys,
                                                                      monkeypatch):
    """The same sentence training would give, now at submit (the tokenizer alone is read: no model loads), and no
    job row; with a frozen embedding the piece is a plain word and the job is queued."""
    import dreambooth_lora.models as models
    import dreambooth_lora.train as train

    def no_model(*args, **kwargs):
        raise AssertionError("the check at submit loaded the whole base model")

    monkeypatch.setattr(models, "load_base_model", no_model)
    monkeypatch.setattr(train, "load_base_model", no_model)
    tokenizer = models.load_tokenizer("builtin:tiny-random")
    piece = next(p for p in tokenizer.get_vocab() if p.isalpha() and len(p) > 2 and not p.endswith("</w>"))
    root = tmp_path / "data"
    submit = ["train", "--data-root", str(root), "--images", *map(str, session_subject_images), "--token", piece,
              "--class-noun", "dog", "--base-model", "builtin:tiny-random", "--submit"]
    code = main(submit)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"The identifier {piece!r} is already a piece of this model's vocabulary" in err
    assert Jobs(Library(root)).list() == []
    assert main([*submit, "--no-train-token-embedding"]) == 0  # a frozen identifier is plain words: no token of its own
    assert [job.config["token"] for job in Jobs(Library(root)).list()] == [piece]
