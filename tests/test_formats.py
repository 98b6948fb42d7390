"""Export and import: kohya and diffusers files load in a plain fresh pipeline with every module injected,
round trips give the same images, and bad files are refused naming the first bad key."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth_lora.cli import main
from dreambooth_lora.adapter_file import read_adapter
from dreambooth_lora.formats import export_adapter, import_adapter, kohya_name, sidecar_path
from dreambooth_lora.generate import AdapterSession, GenerateSettings
from dreambooth_lora.library import Library
from dreambooth_lora.models import load_base_model
from test_mixing import add_random_adapter  # the same random-adapter builder as the mixing tests

SETTINGS = GenerateSettings(prompt="a photo of sks dog", num_images=1, steps=2, seed=3, size=32)
PLAIN = GenerateSettings(prompt="a photo of a dog", num_images=1, steps=2, seed=3, size=32)  # what a plain pipeline can match


@pytest.fixture(scope="module")
def root(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("data")
    library = Library(root)
    add_random_adapter(library, model, "a", "sks", rank=4, alpha=8.0, seed=1)
    return root


def session_images(model, entry, settings) -> np.ndarray:
    session = AdapterSession(model)
    try:
        session.apply([(entry, 1.0)])
        return as_array(session.generate(settings))
    finally:
        session.clear()


def fresh_pipeline_images(file, settings) -> tuple[np.ndarray, int]:
    """A plain StableDiffusionPipeline on a freshly built model: load_lora_weights, count injected layers, generate."""
    pipe = load_base_model("builtin:tiny-random").pipeline()
    pipe.load_lora_weights(str(file))
    injected = sum(isinstance(m, LoraLayer) for m in [*pipe.unet.modules(), *pipe.text_encoder.modules()])
    generator = [torch.Generator("cpu").manual_seed(settings.seed)]
    out = pipe([settings.prompt], num_inference_steps=settings.steps, guidance_scale=settings.guidance,
               height=settings.size, width=settings.size, generator=generator).images
    return as_array(out), injected


def as_array(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float64) for image in images])


def same_images(left, right) -> bool:
    return np.abs(left - right).max() <= 2


def test_kohya_export_keys_metadata_and_sidecar(root, tmp_path):
    entry = Library(root).get("a")
    out, _ = export_adapter(entry, "kohya", str(tmp_path / "a.safetensors"))
    tensors = load_file(out)
    # the names ComfyUI (comfy/lora.py model_lora_keys_clip / model_lora_keys_unet) and A1111 map for SD 1.x
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in tensors
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in tensors
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in tensors
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert not any(k.startswith("lora_te_encoder_") for k in tensors)
    assert len(tensors) == 3 * len(read_adapter(entry.file).layers)
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"].item() == 8.0
    with safe_open(str(out), "pt") as handle:
        header = handle.metadata()
    assert header["ss_network_module"] == "networks.lora" and header["ss_network_dim"] == "4"
    assert header["ss_network_alpha"] == "8" and header["ss_base_model_version"] == "sd_v1"
    assert header["ss_output_name"] == "a" and header["ss_steps"] == header["ss_max_train_steps"] == "10"
    assert "sks" in header["ss_training_comment"] and json.loads(header["dreambooth_lora"])["token"] == "sks"
    sidecar = load_file(sidecar_path(out))
    assert sidecar_path(out).name == "a.embedding.safetensors" and sidecar["emb_params"].shape == (1, 32)
    assert kohya_name("text_encoder.encoder.layers.0.self_attn.q_proj") == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def test_bundled_embedding_keys_break_diffusers_loading(root, tmp_path):
    """Why the embedding goes in a sidecar: diffusers rejects a kohya file holding bundle_emb keys."""
    out, _ = export_adapter(Library(root).get("a"), "kohya", str(tmp_path / "a.safetensors"))
    tensors = load_file(out)
    tensors["bundle_emb.sks.string_to_param.*"] = torch.zeros(1, 32)
    save_file(tensors, str(tmp_path / "bundled.safetensors"))
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        fresh_pipeline_images(tmp_path / "bundled.safetensors", PLAIN)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_export_loads_in_a_fresh_pipeline_with_every_module(model, root, tmp_path, fmt):
    entry = Library(root).get("a")
    out, _ = export_adapter(entry, fmt, str(tmp_path / f"a.{fmt}.safetensors"))
    fresh, injected = fresh_pipeline_images(out, PLAIN)
    assert injected == len(read_adapter(entry.file).layers) == 40
    assert same_images(fresh, session_images(model, entry, PLAIN))


def test_kohya_round_trip_gives_the_same_images(model, root, tmp_path, capsys):
    out = tmp_path / "a.kohya.safetensors"
    assert main(["library", "--data-root", str(root), "export", "a", "--format", "kohya", "--out", str(out)]) == 0
    assert main(["library", "--data-root", str(root), "import", str(out), "--name", "a-back",
                 "--base-model", "builtin:tiny-random"]) == 0
    capsys.readouterr()
    library = Library(root)
    back = library.get("a-back")
    assert back.token == "sks" and back.meta["imported_format"] == "kohya" and back.fingerprint == model.fingerprint
    original = session_images(model, library.get("a"), SETTINGS)
    assert same_images(session_images(model, back, SETTINGS), original)
    assert np.abs(original - session_images(model, back, PLAIN)).mean() > 1.0  # the identifier embedding matters


def test_peft_import_with_and_without_config(model, root, tmp_path):
    library = Library(root)
    weights = read_adapter(library.get("a").file)
    unet_layers = {k.removeprefix("unet."): v for k, v in weights.layers.items() if k.startswith("unet.")}
    tensors = {}
    for module, layer in unet_layers.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = layer.down
        tensors[f"base_model.model.{module}.lora_B.weight"] = layer.up
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    bare, _ = import_adapter(library, folder / "adapter_model.safetensors", "peft-bare", "builtin:tiny-random", "", "")
    assert {layer.alpha for layer in read_adapter(bare.file).layers.values()} == {4.0}  # no config: alpha = rank
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    entry, _ = import_adapter(library, folder / "adapter_model.safetensors", "peft-a", "builtin:tiny-random", "", "dog")
    imported = read_adapter(entry.file).layers
    assert set(imported) == {f"unet.{m}" for m in unet_layers}
    for module, layer in unet_layers.items():
        assert torch.allclose(imported[f"unet.{module}"].delta(), layer.delta())


def test_diffusers_import_keeps_everything(model, root, tmp_path):
    library = Library(root)
    out, _ = export_adapter(library.get("a"), "diffusers", str(tmp_path / "a-diffusers.safetensors"))
    entry, _ = import_adapter(library, out, None, "builtin:tiny-random", "", "")
    assert entry.name == "a-diffusers" and entry.token == "sks"  # name from the file, token from our metadata
    original, imported = read_adapter(library.get("a").file), read_adapter(entry.file)
    assert imported.layers.keys() == original.layers.keys() and imported.identifiers.keys() == original.identifiers.keys()
    assert all(torch.equal(imported.layers[k].up, original.layers[k].up) for k in original.layers)


def _bad_files(root, tmp_path):
    tensors = load_file(export_adapter(Library(root).get("a"), "kohya", str(tmp_path / "good.safetensors"))[0])
    unknown = dict(tensors, **{"lora_unet_nonexistent_block_to_q.lora_down.weight": torch.zeros(4, 16)})
    shapes = dict(tensors)
    shapes["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"] = torch.zeros(4, 99)
    ldm = {k.replace("lora_unet_down_blocks_0_attentions_0", "lora_unet_input_blocks_1_1"): v for k, v in tensors.items()}
    files = {}
    for label, content in (("unknown", unknown), ("shapes", shapes), ("ldm", ldm), ("other", {"model.weight": torch.zeros(2)})):
        save_file(content, str(tmp_path / f"{label}.safetensors"))
        files[label] = tmp_path / f"{label}.safetensors"
    (tmp_path / "pickle.ckpt").write_bytes(b"not really")
    (tmp_path / "broken.safetensors").write_bytes(b"not really")
    return files


@pytest.mark.parametrize("label, message", [
    ("unknown", "key 'lora_unet_nonexistent_block_to_q.lora_down.weight' names no layer"),
    ("shapes", "key 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight' has shapes"),
    ("ldm", "key 'lora_unet_input_blocks_1_1_transformer_blocks_0_attn"),  # LDM paths: diffusers' SD1 loader cannot place them
    ("other", "not a diffusers, kohya or PEFT LoRA file (first unrecognised key 'model.weight')"),
    ("pickle", "only .safetensors LoRA files can be imported"),
    ("broken", "not a readable safetensors file"),
    ("missing", "no such file"),
])
def test_import_refusals_exit_2(root, tmp_path, capsys, label, message):
    _bad_files(root, tmp_path)
    name = {"pickle": "pickle.ckpt", "missing": "missing.safetensors"}.get(label, f"{label}.safetensors")
    argv = ["library", "--data-root", str(root), "import", str(tmp_path / name), "--name", "never",
            "--base-model", "builtin:tiny-random"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not Library(root).name_taken("never")


def test_export_refusals_exit_2(root, tmp_path, capsys):
    assert main(["library", "--data-root", str(root), "export", "nosuch", "--format", "kohya"]) == 2
    assert "No adapter named 'nosuch'" in capsys.readouterr().err
    assert main(["library", "--data-root", str(root), "export", "a", "--out", str(tmp_path / "a.ckpt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


# ----- our own trained adapter, exported as kohya and imported back without --base-model -----

@pytest.fixture(scope="module")
def trained_root(tmp_path_factory, session_subject_images, session_prior_dir):
    """A real training run on builtin:tiny-random (identifier embedding on, the built-ins' default)."""
    root = tmp_path_factory.mktemp("trained")
    argv = ["train", "--images", *map(str, session_subject_images), "--token", "sks", "--class-noun", "dog",
            "--base-model", "builtin:tiny-random", "--steps", "10", "--num-class-images", "2", "--name", "trained",
            "--data-root", str(root), "--prior-dir", str(session_prior_dir), "--quiet"]
    assert main(argv) == 0
    assert Library(root).get("trained").meta["train_token_embedding"] is True
    return root


def test_kohya_export_imports_without_base_model_and_gives_the_same_images(model, trained_root, tmp_path, capsys):
    root = str(trained_root)
    out = tmp_path / "trained.kohya.safetensors"
    assert main(["library", "--data-root", root, "export", "trained", "--format", "kohya", "--out", str(out)]) == 0
    assert "note: The identifier embedding ('sks') is in" in capsys.readouterr().err  # export says where it went
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata()["ss_sd_model_name"] == "builtin:tiny-random"
    assert main(["library", "--data-root", root, "import", str(out), "--name", "trained-back"]) == 0  # no --base-model
    captured = capsys.readouterr()
    assert json.loads(captured.out)["notes"] == [] and "note:" not in captured.err
    library = Library(trained_root)
    back = library.get("trained-back")
    assert back.base_model == "builtin:tiny-random" and back.fingerprint == model.fingerprint
    assert back.meta["train_token_embedding"] is True  # the sidecar beside the file was picked up
    assert same_images(session_images(model, back, SETTINGS), session_images(model, library.get("trained"), SETTINGS))


def test_kohya_import_without_its_sidecar_says_the_embedding_is_missing(model, trained_root, tmp_path, capsys):
    root = str(trained_root)
    out = tmp_path / "alone" / "trained.kohya.safetensors"
    assert main(["library", "--data-root", root, "export", "trained", "--format", "kohya", "--out", str(out)]) == 0
    capsys.readouterr()
    sidecar = sidecar_path(out)
    moved = sidecar.rename(tmp_path / "elsewhere.safetensors")
    assert main(["library", "--data-root", root, "import", str(out), "--name", "no-embedding"]) == 0
    captured = capsys.readouterr()
    assert f"note: trained.kohya.safetensors was trained with an identifier embedding for 'sks', but it is not in the file " \
           f"and no {sidecar.name} was found beside it" in captured.err
    assert len(json.loads(captured.out)["notes"]) == 1
    assert Library(trained_root).get("no-embedding").meta["identifier_embedding_missing"] is True
    # given as --embedding, the same sidecar from elsewhere completes the adapter
    assert main(["library", "--data-root", root, "import", str(out), "--name", "with-embedding", "--embedding", str(moved)]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == []
    library = Library(trained_root)
    original = session_images(model, library.get("trained"), SETTINGS)
    assert same_images(session_images(model, library.get("with-embedding"), SETTINGS), original)
    assert np.abs(session_images(model, library.get("no-embedding"), SETTINGS) - original).mean() > 1.0


def test_import_names_a_base_model_that_is_not_here(root, tmp_path, capsys):
    out, _ = export_adapter(Library(root).get("a"), "kohya", str(tmp_path / "a.safetensors"))
    tensors = load_file(out)
    save_file(tensors, str(tmp_path / "foreign.safetensors"), metadata={"ss_sd_model_name": "v1-5-pruned-emaonly.safetensors"})
    assert main(["library", "--data-root", str(root), "import", str(tmp_path / "foreign.safetensors"), "--name", "never"]) == 2
    err = capsys.readouterr().err
    assert "was made for the base model 'v1-5-pruned-emaonly.safetensors', which is not available here; pass --base-model" in err
    assert not Library(root).name_taken("never")


def test_reexport_without_an_embedding_removes_the_old_sidecar(model, root, tmp_path):
    library = Library(root)
    plain = add_random_adapter(library, model, "no-token", "", rank=4, alpha=4.0, seed=9)  # no identifier embedding
    out, notes = export_adapter(library.get("a"), "kohya", str(tmp_path / "x.safetensors"))
    assert sidecar_path(out).exists() and "keep it beside x.safetensors" in notes[0]
    out, notes = export_adapter(plain, "kohya", str(tmp_path / "x.safetensors"))
    assert not sidecar_path(out).exists() and notes == []  # else import would pair a's embedding with this file
