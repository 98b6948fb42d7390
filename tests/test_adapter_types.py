"""Adapter types (LoRA, DoRA, LoHa, LoKr): their maths against PEFT and by hand, then each type trained on
builtin:tiny-random through the CLI: generate -> export (diffusers, kohya) -> import -> generate gives the same
images, kohya keys follow ComfyUI's SD 1.x rule, strengths per component, mixing and resize."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dreambooth_lora.adapter_file import AdapterFile, read_adapter, store_adapter
from dreambooth_lora.adapter_types import ADAPTER_TYPES, DoRA, LoHa, LoKr
from dreambooth_lora.cli import main
from dreambooth_lora.formats import kohya_name, model_linear_shapes
from dreambooth_lora.library import Library
from dreambooth_lora.lora import ADAPTER_NAME, attach_unet_lora, collect_adapter_tensors
from dreambooth_lora.mixing import base_layer_weights

TYPES = list(ADAPTER_TYPES)
PROMPT = "a photo of sks dog"
GEN = ["--prompt", PROMPT, "--num-images", "1", "--steps", "4", "--seed", "3", "--base-model", "builtin:tiny-random"]


# ----- the maths: each type's delta equals what PEFT applies -----

@pytest.mark.parametrize("kind", TYPES)
def test_delta_equals_what_peft_merges(tiny_random_builder, kind):
    model = tiny_random_builder()
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    base = base_layer_weights(model, [key])[key]
    attach_unet_lora(model.unet, rank=2, alpha=3.0, kind=kind)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.unet.named_parameters():
            if ADAPTER_NAME in name and "magnitude" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    layer = AdapterFile.from_tensors(collect_adapter_tensors(model.unet), {}, alpha=3.0, rank=2).layers[key]
    assert type(layer) is ADAPTER_TYPES[kind]
    peft_layer = dict(model.unet.named_modules())[key.removeprefix("unet.")]
    peft_layer.merge()
    merged = peft_layer.get_base_layer().weight.detach().double()
    assert torch.allclose(base + layer.delta(base), merged, atol=1e-5)


def test_deltas_by_hand():
    w1a, w1b = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, 0.0]])
    w2a, w2b = torch.tensor([[3.0], [1.0]]), torch.tensor([[1.0, 1.0]])
    # (W1a W1b) * (W2a W2b) = [[1,0],[2,0]] * [[3,3],[1,1]] = [[3,0],[2,0]], scale 2/1
    assert torch.equal(LoHa(w1a, w1b, w2a, w2b, 2.0).delta(), torch.tensor([[6.0, 0.0], [4.0, 0.0]], dtype=torch.float64))
    lokr = LoKr({"lokr_w1": torch.tensor([[1.0, 2.0]]), "lokr_w2": torch.tensor([[1.0], [3.0]])}, alpha=4.0, rank=2)
    assert torch.equal(lokr.delta(), 2.0 * torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64))
    base = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    dora = DoRA(torch.zeros(1, 2), torch.zeros(2, 1), 1.0, torch.tensor([10.0, 1.0]))
    # B A = 0: W' = m W / ||W|| row by row = [[6, 8], [0, 1]]
    assert torch.allclose(base + dora.delta(base), torch.tensor([[6.0, 8.0], [0.0, 1.0]], dtype=torch.float64))
    assert torch.equal(dora.delta(base, strength=0.0), torch.zeros(2, 2, dtype=torch.float64))  # the slider at 0: off


def test_lokr_kohya_conventions_follow_comfyui():
    """ComfyUI lokr.py: alpha/dim only when a factor is decomposed; both full: scale 1."""
    w1a, w1b = torch.randn(4, 1), torch.randn(1, 4)
    w2a, w2b = torch.randn(4, 3), torch.randn(3, 4)
    parts = {"lokr_w1_a": w1a, "lokr_w1_b": w1b, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(6.0)}
    layer = LoKr.from_kohya(parts, 16, 16)
    comfy = torch.kron(w1a @ w1b, w2a @ w2b).double() * 6.0 / 3  # dim = lokr_w2_b.shape[0]
    assert torch.allclose(layer.delta(), comfy, atol=1e-5) and "lokr_w2" in layer.parts  # rank 3 >= 4/2: W2 kept full
    full = LoKr({"lokr_w1": torch.randn(4, 4), "lokr_w2": torch.randn(4, 4)}, alpha=2.0, rank=8)
    written = full.kohya(common_alpha=1.0)
    assert torch.allclose(torch.kron(written["lokr_w1"], written["lokr_w2"]).double(), full.delta(), atol=1e-5)
    back = LoKr.from_kohya(written, 16, 16)
    assert torch.allclose(back.delta(), full.delta(), atol=1e-5)


# ----- each type trained through the CLI -----

@pytest.fixture(scope="module")
def trained(tmp_path_factory, session_subject_images, session_prior_dir):
    """One adapter per type (UNet only, no identifier embedding: the images change through the type's layers alone),
    plus a LoRA with a trained text encoder."""
    root = tmp_path_factory.mktemp("types")
    common = ["--images", *map(str, session_subject_images), "--class-noun", "dog",
              "--base-model", "builtin:tiny-random", "--steps", "10", "--num-class-images", "2", "--lr", "0.02",
              "--rank", "4", "--no-train-token-embedding", "--data-root", str(root), "--prior-dir", str(session_prior_dir),
              "--quiet"]
    # a frozen identifier is plain words that two adapters in one library cannot share: one word each
    for kind in TYPES:
        assert main(["train", *common, "--token", f"sks{kind}", "--adapter-type", kind, "--name", kind]) == 0
    assert main(["train", *common, "--token", "skste", "--text-encoder", "lora", "--name", "te"]) == 0
    return root


def generate(root, tmp_path, label, *adapters) -> np.ndarray:
    out = tmp_path / label
    argv = ["generate", "--data-root", str(root), *GEN, "--out", str(out)]
    for spec in adapters:
        argv += ["--adapter", spec]
    assert main(argv) == 0
    return np.stack([np.asarray(Image.open(p), dtype=np.float64) for p in sorted(out.glob("*.png"))])


def same(left, right) -> bool:
    return np.abs(left - right).max() <= 2


def differs(left, right) -> bool:
    return np.abs(left - right).mean() > 1.0


@pytest.fixture(scope="module")
def base_images(trained, tmp_path_factory):
    return generate(trained, tmp_path_factory.mktemp("base"), "base")


@pytest.mark.parametrize("kind", TYPES)
def test_library_show_reports_type_and_parameters(trained, capsys, kind, builtin_unet_layers):
    capsys.readouterr()  # the fixture's training output
    assert main(["library", "--data-root", str(trained), "show", kind]) == 0
    shown = json.loads(capsys.readouterr().out)
    layers = read_adapter(Library(trained).get(kind).file).layers
    assert shown["adapter_type"] == kind and shown["meta"]["adapter_type"] == kind
    assert shown["trainable_params"] == sum(layer.num_params for layer in layers.values()) > 0
    assert all(type(layer) is ADAPTER_TYPES[kind] for layer in layers.values()) and len(layers) == builtin_unet_layers


@pytest.mark.parametrize("kind", TYPES)
def test_export_import_round_trip_gives_the_same_images(trained, base_images, tmp_path, capsys, kind):
    root = str(trained)
    original = generate(trained, tmp_path, "original", kind)
    assert differs(original, base_images)  # the type's layers change the images: a dropped adapter cannot pass
    for fmt in ("diffusers", "kohya"):
        out = tmp_path / f"{kind}.{fmt}.safetensors"
        assert main(["library", "--data-root", root, "export", kind, "--format", fmt, "--out", str(out)]) == 0
        assert main(["library", "--data-root", root, "import", str(out), "--name", f"{kind}-{fmt}"]) == 0
        capsys.readouterr()
        back = Library(trained).get(f"{kind}-{fmt}")
        assert back.adapter_type == kind and back.meta["imported_format"] == fmt
        assert same(generate(trained, tmp_path, f"back-{fmt}", back.name), original)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_diffusers_export_loads_in_a_plain_pipeline(trained, tmp_path, capsys, kind, builtin_unet_layers):
    """An independent loader: diffusers' load_lora_weights places every layer (DoRA ones as DoRA) and draws the same."""
    from peft.tuners.lora import LoraLayer

    from dreambooth_lora.models import load_base_model

    out = tmp_path / f"{kind}.safetensors"
    assert main(["library", "--data-root", str(trained), "export", kind, "--format", "diffusers", "--out", str(out)]) == 0
    capsys.readouterr()
    pipe = load_base_model("builtin:tiny-random").pipeline()
    pipe.load_lora_weights(str(out))
    layers = [m for m in pipe.unet.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == builtin_unet_layers and all(any(m.use_dora.values()) == (kind == "dora") for m in layers)
    image = pipe([PROMPT], num_inference_steps=4, guidance_scale=5.0, height=64, width=64,
                 generator=[torch.Generator("cpu").manual_seed(3)]).images[0]
    assert same(np.asarray(image, dtype=np.float64)[None], generate(trained, tmp_path, "session", kind))


COMFY_SUFFIXES = {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale", "hada_w1_a", "hada_w1_b",
                  "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b",
                  "lokr_w2_a", "lokr_w2_b", "lokr_t2"}


def comfyui_sd1_names(model) -> set[str]:
    """What ComfyUI's model_lora_keys_unet / model_lora_keys_clip map for SD 1.x: `lora_unet_` + a diffusers UNet
    weight's module path with '.' -> '_' (its unet_to_diffusers map covers every attention projection), and
    `lora_te_text_model_encoder_layers_<b>_<LORA_CLIP_MAP name>` for each CLIP layer b."""
    names = {"lora_unet_" + name.replace(".", "_") for name, module in model.unet.named_modules()
             if isinstance(module, torch.nn.Linear) and ".attentions." in name and ".transformer_blocks." in name}
    layers = len(model.text_encoder.encoder.layers)
    return names | {f"lora_te_text_model_encoder_layers_{b}_{c}" for b in range(layers)
                    for c in ("mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj", "self_attn_out_proj")}


@pytest.mark.parametrize("kind, expected", [("lora", {"lora_down.weight", "lora_up.weight", "alpha"}),
                                            ("dora", {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}),
                                            ("loha", {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
                                            ("lokr", {"lokr_w1", "lokr_w2", "alpha"})])
def test_kohya_keys_follow_comfyuis_naming_rule(trained, model, tmp_path, capsys, kind, expected, builtin_unet_layers):
    out = tmp_path / f"{kind}.safetensors"
    assert main(["library", "--data-root", str(trained), "export", kind, "--format", "kohya", "--out", str(out)]) == 0
    capsys.readouterr()
    tensors = load_file(out)
    allowed = comfyui_sd1_names(model)
    by_layer = {}
    for key in tensors:
        name, _, suffix = key.partition(".")
        assert name in allowed and suffix in COMFY_SUFFIXES, key
        by_layer.setdefault(name, set()).add(suffix)
    assert all(suffixes == expected for suffixes in by_layer.values()) and len(by_layer) == builtin_unet_layers
    shapes = model_linear_shapes(model)
    for layer_key, (out_features, _) in shapes.items():
        if kind == "dora" and kohya_name(layer_key) in by_layer:
            assert tensors[f"{kohya_name(layer_key)}.dora_scale"].shape == (out_features, 1)  # current LyCORIS: per row


def test_text_strength_zero_equals_the_adapter_without_its_text_encoder(trained, tmp_path):
    library = Library(trained)
    full = read_adapter(library.get("te").file)
    assert any(key.startswith("text_encoder.") for key in full.layers)
    unet_only = {key: layer for key, layer in full.layers.items() if key.startswith("unet.")}
    store_adapter(library, AdapterFile(unet_only, {}, {**full.meta, "name": "te-unet-only"}))
    without_text = generate(trained, tmp_path, "a10", "te=1.0:0.0")
    assert same(without_text, generate(trained, tmp_path, "unet-only", "te-unet-only"))
    both = generate(trained, tmp_path, "a11", "te=1.0:1.0")
    assert differs(without_text, both)
    assert same(both, generate(trained, tmp_path, "a1", "te"))  # an omitted text strength is the UNet one


def test_dora_at_zero_is_the_base_model(trained, base_images, tmp_path):
    assert same(generate(trained, tmp_path, "dora0", "dora=0"), base_images)
    assert differs(generate(trained, tmp_path, "dora05", "dora=0.5"), base_images)


@pytest.mark.parametrize("kind, partner", [("dora", "lora"), ("loha", "lora"), ("lokr", "lora"), ("loha", "dora")])
def test_cat_mix_of_each_type_equals_loading_the_parts(trained, tmp_path, capsys, kind, partner):
    expected = generate(trained, tmp_path, "parts", f"{kind}=0.7", f"{partner}=-0.3")
    assert main(["mix", "--data-root", str(trained), "--adapter", f"{kind}=0.7", "--adapter", f"{partner}=-0.3",
                 "--name", f"mix-{kind}-{partner}", "--method", "cat"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])  # after generate's file names
    assert report["exact"] and report["max_relative_error"] < 1e-5 and report["types"] == sorted({kind, partner})
    assert same(generate(trained, tmp_path, "mix", f"mix-{kind}-{partner}"), expected)
    assert main(["mix", "--data-root", str(trained), "--adapter", f"{kind}=0.7", "--name", f"svd-{kind}-{partner}",
                 "--method", "svd", "--rank", "1"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert not report["exact"] and 0 < report["max_relative_error"] < 1


@pytest.mark.parametrize("kind", TYPES)
def test_resize_keeps_the_images_at_full_energy(trained, tmp_path, capsys, kind):
    assert main(["library", "--data-root", str(trained), "resize", kind, "--energy", "1", "--name", f"{kind}-e1"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["max_relative_error"] < 1e-5
    assert report["adapter_type"] == ("dora" if kind == "dora" else "lora")  # LoHa/LoKr copies are plain LoRA
    assert same(generate(trained, tmp_path, "resized", f"{kind}-e1"), generate(trained, tmp_path, "original", kind))
    assert main(["library", "--data-root", str(trained), "rank", kind]) == 0


# ----- mistakes a person can make: one line, exit status 2 -----

@pytest.mark.parametrize("argv, message", [
    (["train", "--images", "x.png", "--token", "sks", "--class-noun", "dog", "--adapter-type", "lycoris"],
     "--adapter-type 'lycoris': choose one of lora, dora, loha, lokr"),
    (["train", "--images", "x.png", "--token", "sks", "--class-noun", "dog", "--adapter-type", "loha", "--text-encoder", "qlora"],
     "--text-encoder qlora pairs with --adapter-type lora, dora, qrlora, vera or adalora only"),
    (["train", "--images", "x.png", "--token", "sks", "--class-noun", "dog", "--adapter-type", "lokr", "--loraplus-ratio", "16"],
     "--loraplus-ratio speeds up LoRA's B matrices"),
    (["generate", "--prompt", "x", "--adapter", "a=1:2:3"], "write NAME=WEIGHT or NAME=UNET:TEXT"),
    (["generate", "--prompt", "x", "--adapter", "a=1:x"], "write NAME=WEIGHT or NAME=UNET:TEXT"),
])
def test_mistakes_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert main([*argv, "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_kohya_imports_are_checked_key_by_key(trained, tmp_path, capsys):
    root = str(trained)
    files = {}
    for kind in ("dora", "loha", "lokr"):
        out = tmp_path / f"{kind}.safetensors"
        assert main(["library", "--data-root", root, "export", kind, "--format", "kohya", "--out", str(out)]) == 0
        files[kind] = load_file(out)
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    bad = {
        "old-dora": ({**files["dora"], f"{layer}.dora_scale": torch.ones(1, 16)}, "a magnitude per input column"),
        "short-loha": ({**files["loha"], f"{layer}.hada_w2_b": torch.ones(4, 7)},
                       f"key '{layer}.hada_w1_a' has shapes that do not fit (loha: hada_w2_b has shape (4, 7)"),
        "half-loha": ({k: v for k, v in files["loha"].items() if k != f"{layer}.hada_w2_a"}, f"no matching {layer}.hada_w2_a"),
        "lokr-conv": ({**files["lokr"], f"{layer}.lokr_t2": torch.ones(1, 1, 3, 3)}, "lokr_t2 is a convolution"),
        "locon": ({**files["loha"], f"{layer}.lora_mid.weight": torch.ones(1)}, "is not a LoRA, DoRA, LoHa or LoKr weight"),
    }
    for label, (tensors, message) in bad.items():
        save_file(tensors, str(tmp_path / f"{label}.safetensors"))
        assert main(["library", "--data-root", root, "import", str(tmp_path / f"{label}.safetensors"), "--name", "never",
                     "--base-model", "builtin:tiny-random"]) == 2, label
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (label, err)
    assert not Library(trained).name_taken("never")


def test_linear_mix_of_other_types_keeps_their_rank_and_says_it_is_approximate(trained, capsys):
    assert main(["mix", "--data-root", str(trained), "--adapter", "loha=0.5", "--adapter", "lokr=0.5",
                 "--name", "linear-loha-lokr", "--method", "linear"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert not report["exact"] and report["rank"] == 4 and report["types"] == ["loha", "lokr"]
    assert Library(trained).get("linear-loha-lokr").adapter_type == "lora"


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_a_stopped_run_of_each_type_resumes_to_the_uninterrupted_weights(tmp_path, session_subject_images,
                                                                          session_prior_dir, kind):
    """The checkpoint holds every type's tensors (DoRA's magnitudes, LoHa's and LoKr's factors) and its optimizer
    state, so a run stopped part-way and resumed ends where an uninterrupted run ends."""
    from dreambooth_lora.config import TrainConfig
    from dreambooth_lora.jobs import create_job
    from dreambooth_lora.train import TrainingStopped, run_training

    config = TrainConfig(token="sks", class_noun="dog", base_model="builtin:tiny-random", name=kind, adapter_type=kind,
                         rank=4, resolution=32, num_class_images=2, steps=6, lr=0.02, checkpoint_every=1)
    whole_library = Library(tmp_path / "whole")  # one library each: in one, the second run would be called sks2
    whole = run_training(whole_library, create_job(whole_library, config, session_subject_images), session_prior_dir)
    library = Library(tmp_path / "stopped")
    job = create_job(library, config, session_subject_images)
    seen = []
    with pytest.raises(TrainingStopped) as stopped:
        run_training(library, job, session_prior_dir, on_progress=seen.append,
                     should_stop=lambda: sum(p.phase == "training" and not p.message for p in seen) >= 3)
    assert 0 < stopped.value.step < config.steps
    progress = []
    resumed = run_training(library, job, session_prior_dir, on_progress=progress.append)
    training = [p for p in progress if p.phase == "training"]
    assert training[0].message == f"resumed at step {stopped.value.step}"  # not a silent restart (it would end equal too)
    left, right = read_adapter(whole.adapter.file), read_adapter(resumed.adapter.file)
    assert left.adapter_type == right.adapter_type == kind
    assert left.tensors.keys() == right.tensors.keys()
    assert all(torch.equal(left.tensors[k], right.tensors[k]) for k in left.tensors), kind
