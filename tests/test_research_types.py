"""QR-LoRA and VeRA (research_types.py): the pivoted QR by hand, step 0 is the base, the stored LoRA factors are the
trained layers' exact deltas, and each type trained on builtin:tiny-random through the CLI: generate -> export
(diffusers, kohya) -> import -> generate gives the same images; library show counts the learned values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dreambooth_lora.adapter_file import read_adapter
from dreambooth_lora.adapter_types import LoRA
from dreambooth_lora.cli import main
from dreambooth_lora.config import TrainConfig
from dreambooth_lora.jobs import create_job
from dreambooth_lora.library import Library
from dreambooth_lora.lora import UNET_TARGETS, attach_unet_lora
from dreambooth_lora.research_types import attach_adalora, pivoted_qr, unet_lora_layers
from dreambooth_lora.train import TrainingStopped, run_training
from test_adapter_types import generate  # the adapter-type tests' CLI generate helper

KINDS = ["qrlora", "vera", "adalora"]


# ----- the maths -----

def test_pivoted_qr_by_hand():
    # columns of norms 1, 3, 2: the pivots take the 3-column first, then what is left of the others
    weight = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 2.0]])
    q, down, diagonal = pivoted_qr(weight, rank=2)
    assert torch.allclose(diagonal, torch.tensor([3.0, 2.0], dtype=torch.float64))
    assert torch.allclose(q.abs(), torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert torch.allclose((q @ down).abs(), torch.tensor([[0, 0, 0], [0, 3.0, 0], [0, 0, 2.0]], dtype=torch.float64))
    # energy: |R_ii|^2 = 9, 4, 1 of 14; 0.6 needs the first column only, 0.95 all three
    assert pivoted_qr(weight, energy=0.6)[0].shape[1] == 1 and pivoted_qr(weight, energy=0.95)[0].shape[1] == 3


def test_pivoted_qr_reconstructs_a_random_matrix():
    weight = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    q, down, diagonal = pivoted_qr(weight, rank=7)
    assert torch.allclose(q @ down, weight.double(), atol=1e-10)
    assert torch.allclose(q.T @ q, torch.eye(7, dtype=torch.float64), atol=1e-10)
    assert bool((diagonal[:-1] >= diagonal[1:] - 1e-12).all())  # pivoting orders |R_ii|


@pytest.mark.parametrize("kind", KINDS)
def test_step_zero_is_the_base_and_the_factors_are_exact(tiny_random_builder, kind):
    model = tiny_random_builder()
    generator = torch.Generator().manual_seed(1)
    x, hidden = torch.randn(1, 4, 32, 32, generator=generator), torch.randn(1, 77, 32, generator=generator)
    hidden = hidden[..., : model.unet.config.cross_attention_dim]
    with torch.no_grad():
        base = model.unet(x, torch.tensor([10]), hidden).sample
        if kind == "adalora":
            attach_adalora(model.unet, rank=4, alpha=4.0, steps=10, targets=UNET_TARGETS)
        else:
            attach_unet_lora(model.unet, rank=4, alpha=4.0, kind=kind)
        assert torch.equal(model.unet(x, torch.tensor([10]), hidden).sample, base)
        learned = [p for n, p in model.unet.named_parameters() if p.requires_grad]
        assert learned and all(("qrlora" in n or "vera_lambda" in n or "lora_" in n)
                               for n, p in model.unet.named_parameters() if p.requires_grad)
        for param in learned:
            param.normal_(generator=generator)
        layers = unet_lora_layers(model.unet, kind, "default")
        rank = 6 if kind == "adalora" else 4  # AdaLoRA starts at 1.5 x its target rank
        assert len(layers) == 32 and all(type(layer) is LoRA and layer.rank == rank for layer in layers.values())
        for key, layer in layers.items():
            module = dict(model.unet.named_modules())[key.removeprefix("unet.")]
            linear = getattr(module, "base_layer", module)
            inputs = torch.randn(3, layer.shape[1], generator=generator)
            bias = 0.0 if linear.bias is None else linear.bias.double()
            expected = inputs.double() @ (linear.weight.double() + layer.delta()).T + bias
            assert torch.allclose(module(inputs).double(), expected, atol=1e-5), key


# ----- each type trained through the CLI -----

@pytest.fixture(scope="module")
def trained(tmp_path_factory, session_subject_images, session_prior_dir):
    root = tmp_path_factory.mktemp("research")
    common = ["--images", *map(str, session_subject_images), "--class-noun", "dog",
              "--base-model", "builtin:tiny-random", "--steps", "10", "--num-class-images", "2", "--lr", "0.05",
              "--rank", "8", "--no-train-token-embedding", "--data-root", str(root), "--prior-dir", str(session_prior_dir),
              "--quiet"]
    for kind in KINDS:  # a frozen identifier is plain words that two adapters cannot share: one word each
        assert main(["train", *common, "--token", f"sks{kind}", "--adapter-type", kind, "--name", kind]) == 0
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_library_show_counts_the_learned_values(trained, capsys, kind, builtin_unet_layers):
    capsys.readouterr()
    assert main(["library", "--data-root", str(trained), "show", kind]) == 0
    shown = json.loads(capsys.readouterr().out)
    layers = read_adapter(Library(trained).get(kind).file).layers
    assert shown["adapter_type"] == kind and shown["meta"]["stored_as"] == "lora"
    assert all(type(layer) is LoRA for layer in layers.values()) and len(layers) == builtin_unet_layers
    factor_size = sum(layer.num_params for layer in layers.values())
    if kind == "qrlora":
        assert all(layer.rank == 8 for layer in layers.values())
        assert shown["trainable_params"] == builtin_unet_layers * 8  # r lambdas per layer: hundreds, not the factors' thousands
        assert 100 <= shown["trainable_params"] < 1000 < factor_size
    elif kind == "vera":
        assert all(layer.rank == 8 for layer in layers.values())
        assert 0 < shown["trainable_params"] < factor_size  # two vectors per layer
    else:  # AdaLoRA: 12 ranks per layer trained (A, E, B), the pruned ones dropped from the file
        assert all(1 <= layer.rank <= 12 for layer in layers.values()) and shown["trainable_params"] >= factor_size


@pytest.mark.parametrize("kind", KINDS)
def test_export_import_round_trip_gives_the_same_images(trained, tmp_path, capsys, kind):
    root = str(trained)
    base = generate(trained, tmp_path, "base")
    original = generate(trained, tmp_path, "original", kind)
    # the trained vectors change the images (0.9-1.0 on average with the built-ins' 24 layers and caption dropout,
    # more than 1 with 32 layers): an import that dropped them would read as the base
    assert np.abs(original - base).mean() > 0.5
    for fmt in ("diffusers", "kohya"):
        out = tmp_path / f"{kind}.{fmt}.safetensors"
        assert main(["library", "--data-root", root, "export", kind, "--format", fmt, "--out", str(out)]) == 0
        assert main(["library", "--data-root", root, "import", str(out), "--name", f"{kind}-{fmt}"]) == 0
        capsys.readouterr()
        back = generate(trained, tmp_path, f"back-{fmt}", f"{kind}-{fmt}")
        assert np.abs(back - original).max() <= 2


@pytest.mark.parametrize("kind", KINDS)
def test_mixing_takes_them_as_lora(trained, tmp_path, capsys, kind):
    assert main(["mix", "--data-root", str(trained), "--adapter", f"{kind}=0.5", "--adapter", f"{kind}=0.5",
                 "--name", f"{kind}-mix"]) == 0
    capsys.readouterr()
    assert np.abs(generate(trained, tmp_path, "mix", f"{kind}-mix") - generate(trained, tmp_path, "one", kind)).max() <= 2


def test_a_resized_copy_is_plain_lora(trained, capsys):
    assert main(["library", "--data-root", str(trained), "resize", "qrlora", "--rank", "2", "--name", "qr2"]) == 0
    capsys.readouterr()
    entry = Library(trained).get("qr2")
    assert entry.adapter_type == "lora" and "stored_as" not in entry.meta
    assert entry.trainable_params == sum(layer.num_params for layer in read_adapter(entry.file).layers.values())


def test_qr_energy_keeps_a_rank_per_layer(session_subject_images, session_prior_dir, tmp_path, capsys, builtin_unet_layers):
    root = str(tmp_path / "data")
    assert main(["train", "--images", *map(str, session_subject_images), "--token", "sks", "--class-noun", "dog",
                 "--base-model", "builtin:tiny-random", "--steps", "3", "--num-class-images", "2", "--lr", "0.05",
                 "--no-train-token-embedding", "--adapter-type", "qrlora", "--qr-energy", "0.5", "--name", "e",
                 "--data-root", root, "--prior-dir", str(session_prior_dir), "--quiet"]) == 0
    entry = Library(root).get("e")
    ranks = {key: layer.rank for key, layer in read_adapter(entry.file).layers.items()}
    assert len(ranks) == builtin_unet_layers and min(ranks.values()) >= 1 and entry.trainable_params == sum(ranks.values())
    assert len(set(ranks.values())) > 1  # the threshold picks a rank per layer
    out = tmp_path / "e.safetensors"  # per-layer ranks travel in the rank pattern
    assert main(["library", "--data-root", root, "export", "e", "--format", "diffusers", "--out", str(out)]) == 0
    assert main(["library", "--data-root", root, "import", str(out), "--name", "e-back"]) == 0
    capsys.readouterr()
    assert {key: layer.rank for key, layer in read_adapter(Library(root).get("e-back").file).layers.items()} == ranks


@pytest.mark.parametrize("kind", KINDS)
def test_with_a_qlora_text_encoder(session_subject_images, session_prior_dir, tmp_path, capsys, kind, builtin_unet_layers):
    """The text encoder's modes stay LoRA (4-bit base under qlora): its layers are saved beside the UNet's factors."""
    root = str(tmp_path / "data")
    assert main(["train", "--images", *map(str, session_subject_images), "--token", "sks", "--class-noun", "dog",
                 "--base-model", "builtin:tiny-random", "--steps", "3", "--num-class-images", "2", "--rank", "4",
                 "--no-train-token-embedding", "--adapter-type", kind, "--text-encoder", "qlora", "--name", "q",
                 "--data-root", root, "--prior-dir", str(session_prior_dir), "--quiet"]) == 0
    adapter = read_adapter(Library(root).get("q").file)
    unet = [k for k in adapter.layers if k.startswith("unet.")]
    text = [layer for k, layer in adapter.layers.items() if k.startswith("text_encoder.")]
    assert len(unet) == builtin_unet_layers and len(text) == 8 and all(type(layer) is LoRA for layer in adapter.layers.values())
    learned_text = sum(layer.num_params for layer in text)
    assert adapter.meta["trainable_params"] > learned_text and adapter.meta["adapter_type"] == kind
    assert generate(root, tmp_path, "q", "q").shape[0] == 1


@pytest.mark.parametrize("kind", ["qrlora", "vera"])  # AdaLoRA's rank allocator state is not checkpointed
def test_resume_and_meter(tmp_path, session_subject_images, session_prior_dir, kind):
    """The checkpoint holds the learned vectors: a resumed run saves the uninterrupted run's factors bit for bit; the
    meter's frozen pass switches the type off (prior drift > 0 once it learned)."""
    config = lambda name: TrainConfig(token="sks", class_noun="dog", base_model="builtin:tiny-random", name=name,
                                      resolution=32, num_class_images=2, steps=6, lr=0.05, adapter_type=kind,
                                      train_token_embedding=False, meter_every=3)
    alone = Library(tmp_path / "alone")
    whole = run_training(alone, create_job(alone, config("whole"), session_subject_images), session_prior_dir)
    assert all(point["prior_drift"] > 0 for point in whole.meter)
    library = Library(tmp_path / "data")
    job, seen = create_job(library, config("resumed"), session_subject_images), []
    with pytest.raises(TrainingStopped):
        run_training(library, job, session_prior_dir, on_progress=seen.append,
                     should_stop=lambda: sum(p.phase == "training" for p in seen) >= 4)
    resumed = run_training(library, job, session_prior_dir)
    left, right = read_adapter(whole.adapter.file).tensors, read_adapter(resumed.adapter.file).tensors
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("argv, message", [
    (["--adapter-type", "vera", "--alpha", "4"], "--alpha does not apply"),
    (["--adapter-type", "lora", "--qr-energy", "0.5"], "--qr-energy"),
    (["--adapter-type", "qrlora", "--qr-energy", "1.5"], "--qr-energy"),
    (["--adapter-type", "qrlora", "--loraplus-ratio", "4"], "--loraplus-ratio"),
])
def test_mistakes_are_one_line_and_exit_2(session_subject_images, tmp_path, capsys, argv, message):
    code = main(["train", "--images", *map(str, session_subject_images), "--token", "sks", "--class-noun", "dog",
                 "--base-model", "builtin:tiny-random", "--data-root", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err
