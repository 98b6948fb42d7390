"""Mixing and resize: the maths against hand computations, then images on builtin:tiny-random.

Adapters are built with random non-zero A and B on every UNet and text-encoder target plus an
identifier embedding (written by adapter_file.write_adapter, as training does), so every part shows in the images.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
import torch

from dreambooth_lora.cli import main
from dreambooth_lora.errors import UserError
from dreambooth_lora.adapter_file import AdapterFile, read_adapter, write_adapter
from dreambooth_lora.formats import model_linear_shapes
from dreambooth_lora.generate import AdapterSession, GenerateSettings
from dreambooth_lora.identifier import IDENTIFIER_PREFIX, initial_vectors
from dreambooth_lora.library import Library
from dreambooth_lora.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS
from dreambooth_lora.mixing import cat_factors, linear_factors, mix_adapters, mix_deltas
from dreambooth_lora.resize import energy, format_rank_report, min_rank_for_energy, rank_report, resize_adapter, svd_factorize

PROMPT = "a photo of sks zwx dog"


# ----- pure maths against hand computations -----

def test_mix_deltas_by_hand():
    up1, down1 = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0, 4.0]])  # B1 A1 = [[3, 4], [6, 8]]
    up2, down2 = torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0, 1.0]])  # B2 A2 = [[1, 1], [0, 0]]
    delta = mix_deltas([up1, up2], [down1, down2], scales=[0.5, 2.0], weights=[1.0, -1.0])
    # 1 * 0.5 * [[3, 4], [6, 8]] - 1 * 2 * [[1, 1], [0, 0]] = [[-0.5, 0], [3, 4]]
    assert torch.allclose(delta, torch.tensor([[-0.5, 0.0], [3.0, 4.0]], dtype=torch.float64))


def test_cat_factors_are_exact_and_put_the_sign_on_down():
    up1, down1 = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0, 4.0]])
    up2, down2 = torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0, 1.0]])
    up, down = cat_factors([up1, up2], [down1, down2], scales=[0.5, 2.0], weights=[1.0, -1.0])
    # part 1: sqrt(0.5) on each side; part 2: sqrt(2) on each side, minus on A only
    assert torch.allclose(up, torch.tensor([[math.sqrt(0.5), math.sqrt(2)], [2 * math.sqrt(0.5), 0.0]]))
    assert torch.allclose(down, torch.tensor([[3 * math.sqrt(0.5), 4 * math.sqrt(0.5)], [-math.sqrt(2), -math.sqrt(2)]]))
    assert torch.allclose((up @ down).double(), torch.tensor([[-0.5, 0.0], [3.0, 4.0]], dtype=torch.float64), atol=1e-6)


def test_linear_factors_by_hand_are_only_an_approximation():
    up1, down1 = torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0, 0.0]])
    up2, down2 = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0, 1.0]])
    up, down = linear_factors([up1, up2], [down1, down2], scales=[1.0, 1.0], weights=[1.0, 1.0])
    assert torch.equal(up, torch.tensor([[1.0], [1.0]])) and torch.equal(down, torch.tensor([[1.0, 1.0]]))
    # the mix is the identity; the linear product has the cross terms B1 A2 and B2 A1
    assert torch.equal(up @ down, torch.ones(2, 2))


def test_energy_by_hand():
    assert torch.allclose(energy(torch.tensor([3.0, 2.0, 1.0])), torch.tensor([9 / 14, 13 / 14, 1.0], dtype=torch.float64))
    assert torch.equal(energy(torch.zeros(3)), torch.ones(3, dtype=torch.float64))
    assert min_rank_for_energy(torch.tensor([3.0, 2.0, 1.0]), 0.9) == 2
    assert min_rank_for_energy(torch.tensor([3.0, 2.0, 1.0]), 1.0) == 3


def test_svd_factorize_by_hand():
    delta = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    up, down, error = svd_factorize(delta, 2)
    assert torch.allclose(up @ down, torch.diag(torch.tensor([3.0, 2.0, 0.0])), atol=1e-6)
    assert error == pytest.approx(math.sqrt(1 / 14))
    up, down, error = svd_factorize(delta, 3)
    assert torch.allclose(up @ down, delta, atol=1e-6) and error == pytest.approx(0.0, abs=1e-7)


# ----- on the tiny model -----

@pytest.fixture(scope="module")
def root(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("data")
    library = Library(root)
    add_random_adapter(library, model, "a", "sks", rank=4, alpha=4.0, seed=1)
    add_random_adapter(library, model, "b", "zwx", rank=4, alpha=8.0, seed=2)  # a different scale
    add_random_adapter(library, model, "c", "sks", rank=2, alpha=2.0, seed=3, unet=False)  # text encoder only, rank 2
    add_random_adapter(library, model, "u", "", rank=4, alpha=4.0, seed=4, text_encoder=False)  # UNet only, no embedding
    add_random_adapter(library, model, "other", "sks", rank=4, alpha=4.0, seed=5, fingerprint="0123456789abcdef")
    return root


def add_random_adapter(library, model, name, token, rank, alpha, seed, unet=True, text_encoder=True, fingerprint=None):
    """A library adapter with random non-zero A and B (visible deltas) and, with a token, an identifier embedding."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    targets = (UNET_TARGETS if unet else []) + (TEXT_ENCODER_TARGETS if text_encoder else [])
    for key, (out_features, in_features) in model_linear_shapes(model).items():
        if any(key.endswith("." + t) for t in targets):
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.3
    if token:
        init = initial_vectors(token, 1, model.tokenizer, model.text_encoder.get_input_embeddings().weight)
        tensors[IDENTIFIER_PREFIX + token] = init + torch.randn(init.shape, generator=generator)
    meta = {"id": library.new_adapter_id(), "name": name, "token": token, "class_noun": "dog",
            "base_model": model.name, "fingerprint": fingerprint or model.fingerprint, "rank": rank, "alpha": alpha, "steps": 10}
    staging = library.staging_folder()
    write_adapter(staging / "adapter.safetensors", AdapterFile.from_tensors(tensors, meta, alpha))
    return library.add_adapter(staging, meta)


def images(model, adapters, fuse=False, prompt=PROMPT) -> np.ndarray:
    session = AdapterSession(model)
    try:
        session.apply(adapters, fuse=fuse)
        settings = GenerateSettings(prompt=prompt, num_images=1, steps=2, seed=7, size=32)  # small: CPU time
        return np.stack([np.asarray(image, dtype=np.float64) for image in session.generate(settings)])
    finally:
        session.clear()


def same_images(left, right) -> bool:
    return np.abs(left - right).max() <= 2  # uint8 images: float rounding may flip a level


def differs(left, right) -> bool:
    return np.abs(left - right).mean() > 1.0


PLAIN = "a photo of a dog"  # no identifier token: only LoRA layers can change these images


@pytest.fixture(scope="module")
def base_images(model):
    return images(model, [], prompt=PLAIN)


@pytest.fixture(scope="module")
def mix_images(model, root):
    """The parts a=0.7, b=-0.3 loaded side by side in one session: what every saved mix must reproduce."""
    library = Library(root)
    return images(model, [(library.get("a"), 0.7), (library.get("b"), -0.3)])


def test_session_applies_unet_and_text_encoder_parts(model, root, base_images):
    library = Library(root)
    from peft.tuners.lora import LoraLayer

    session = AdapterSession(model)
    session.apply([(library.get("a"), 1.0)])
    in_unet = sum(isinstance(m, LoraLayer) for m in session.pipe.unet.modules())
    in_text = sum(isinstance(m, LoraLayer) for m in session.pipe.text_encoder.modules())
    session.clear()
    layers = read_adapter(library.get("a").file).layers
    assert in_unet == sum(k.startswith("unet.") for k in layers) > 0
    assert in_text == sum(k.startswith("text_encoder.") for k in layers) > 0
    # each half changes the images on its own: u is UNet-only, c text-encoder-only
    assert differs(images(model, [(library.get("u"), 1.0)], prompt=PLAIN), base_images)
    assert differs(images(model, [(library.get("c"), 1.0)], prompt=PLAIN), base_images)


def test_fused_mix_gives_the_same_images(model, root, mix_images):
    library = Library(root)
    mix = [(library.get("a"), 0.7), (library.get("b"), -0.3)]
    assert same_images(images(model, mix, fuse=True), mix_images)


def test_different_base_model_is_refused(model, root, capsys):
    library = Library(root)
    with pytest.raises(UserError, match="fingerprint"):
        AdapterSession(model).apply([(library.get("other"), 1.0)])
    with pytest.raises(UserError, match="different base models"):
        mix_adapters(library, [("a", 1.0), ("other", 1.0)], "never", "cat")
    assert main(["mix", "--data-root", str(root), "--adapter", "a=1", "--adapter", "other=1", "--name", "never"]) == 2
    assert "different base models" in capsys.readouterr().err


def test_cat_mix_equals_loading_the_parts(model, root, mix_images):
    library = Library(root)
    assert main(["mix", "--data-root", str(root), "--adapter", "a=0.7", "--adapter", "b=-0.3", "--adapter", "c=0.5",
                 "--name", "m-cat", "--method", "cat"]) == 0
    entry = library.get("m-cat")
    expected = images(model, [(library.get("a"), 0.7), (library.get("b"), -0.3), (library.get("c"), 0.5)])
    assert differs(expected, mix_images)  # c's part shows
    assert same_images(images(model, [(entry, 1.0)]), expected)
    weights = read_adapter(entry.file)
    assert weights.layers["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"].rank == 8  # c has no UNet part
    assert weights.layers["text_encoder.encoder.layers.0.self_attn.q_proj"].rank == 10
    assert entry.token == "sks zwx" and entry.meta["mix"]["method"] == "cat"
    assert [p["weight"] for p in entry.meta["mix"]["parts"]] == [0.7, -0.3, 0.5]


def test_svd_mix_exact_at_full_rank_and_reports_error_below(model, root, mix_images):
    library = Library(root)
    parts = [("a", 0.7), ("b", -0.3)]
    full, report = mix_adapters(library, parts, "m-svd8", "svd", rank=8)
    assert report["exact"] and report["max_relative_error"] < 1e-5
    assert same_images(images(model, [(full, 1.0)]), mix_images)
    small, report = mix_adapters(library, parts, "m-svd2", "svd", rank=2)
    assert not report["exact"] and 0 < report["max_relative_error"] < 1
    assert set(report["per_layer"]) == set(read_adapter(small.file).layers) and small.rank == 2


def test_linear_mix_needs_equal_ranks(root):
    library = Library(root)
    entry, report = mix_adapters(library, [("a", 0.5), ("b", 0.5)], "m-linear", "linear",
                                 samples=[Image.new("RGB", (8, 8), (255, 0, 0))])
    assert [Image.open(p).getpixel((0, 0)) for p in entry.samples] == [(255, 0, 0)]  # shown in the Library
    assert entry.rank == 4 and not report["exact"]
    with pytest.raises(UserError, match="equal rank"):
        mix_adapters(library, [("a", 0.5), ("c", 0.5)], "never", "linear")


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "nosuch=1"], "No adapter named 'nosuch'"),
    (["--adapter", "a=1", "--method", "svd", "--rank", "0"], "--rank 0: must be from 1 to 4"),
    (["--adapter", "a=1", "--adapter", "b=1", "--method", "svd", "--rank", "9"], "--rank 9: must be from 1 to 8"),
    (["--adapter", "a=1", "--rank", "2"], "--rank applies to --method svd and the *_svd merges only"),
    (["--adapter", "a=1", "--adapter", "c=1", "--method", "linear"], "needs adapters of one equal rank"),
    (["--adapter", "a=1", "--name", "a"], "already exists"),
])
def test_mix_refusals_exit_2(root, capsys, argv, message):
    argv = ["mix", "--data-root", str(root), *argv]
    argv += [] if "--name" in argv else ["--name", "never"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not Library(root).name_taken("never")


def test_mix_needs_an_adapter(root, capsys):
    with pytest.raises(UserError, match="at least one"):
        mix_adapters(Library(root), [], "never")
    assert main(["mix", "--data-root", str(root), "--name", "never"]) == 2
    assert "--adapter" in capsys.readouterr().err


# ----- rank analysis and resize -----

def test_rank_table(root, capsys):
    report = rank_report(Library(root).get("a"))
    assert [row["rank"] for row in report["table"]] == [1, 2, 3, 4]
    assert report["table"][-1]["min"] == pytest.approx(1.0)
    assert all(a["mean"] <= b["mean"] for a, b in zip(report["table"], report["table"][1:]))
    assert "rank" in format_rank_report(report)
    assert main(["library", "--data-root", str(root), "rank", "a"]) == 0
    printed = capsys.readouterr().out
    assert "min" in printed and "mean" in printed and "max" in printed and "\n   4  100.00%" in printed


def test_resize_full_rank_is_exact_and_energy_shrinks(model, root):
    library = Library(root)
    same, report = resize_adapter(library, "a", energy=None, rank=4, new_name="a-same")
    assert report["max_relative_error"] < 1e-5
    assert same_images(images(model, [(same, 1.0)]), images(model, [(library.get("a"), 1.0)]))
    smaller, report = resize_adapter(library, "a", energy=0.8, rank=None, new_name=None)
    assert smaller.name == "a-e0.8" and report["size_bytes_after"] < report["size_bytes_before"]
    layers = read_adapter(smaller.file).layers
    for key, layer in report["per_layer"].items():
        assert layers[key].rank == layer["rank"] and layer["relative_error"] <= math.sqrt(1 - 0.8) + 1e-6
    assert read_adapter(smaller.file).identifiers.keys() == read_adapter(library.get("a").file).identifiers.keys()
    # per-layer ranks load as they are (diffusers reads rank_pattern from the file's metadata)
    images(model, [(smaller, 1.0)])


@pytest.mark.parametrize("argv, message", [
    (["resize", "a", "--energy", "0"], "--energy 0.0: must be a fraction"),
    (["resize", "a", "--energy", "1.5"], "--energy 1.5"),
    (["resize", "a", "--rank", "0"], "--rank 0: adapter 'a' has rank 4"),
    (["resize", "a", "--rank", "5"], "choose 1 to 4"),
    (["resize", "nosuch", "--rank", "1"], "No adapter named 'nosuch'"),
    (["rank", "nosuch"], "No adapter named 'nosuch'"),
])
def test_resize_refusals_exit_2(root, capsys, argv, message):
    assert main(["library", "--data-root", str(root), *argv]) == 2
    assert message in capsys.readouterr().err
