"""TIES / DARE / magnitude-prune merges (dreambooth_lora/merges.py) against PEFT's own add_weighted_adapter, and
`mix --method ties|dare_linear` end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import model as peft_lora_model

from dreambooth_lora.adapter_file import LayerFactors
from dreambooth_lora.cli import main
from dreambooth_lora.library import Library
from dreambooth_lora.merges import FACTOR_METHODS, SVD_METHODS, Merger, MergeOptions

from test_mixing import add_random_adapter, images  # the mixing tests' random-adapter builder and renderer

WEIGHTS = (1.0, -0.7)


class Toy(torch.nn.Module):
    """Two layers whose module order is their sorted order, so PEFT walks them as mixing.py does."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(12, 10)
        self.b = torch.nn.Linear(10, 8)

    def forward(self, x):
        return self.b(self.a(x))


def peft_model():
    torch.manual_seed(0)
    model = get_peft_model(Toy(), LoraConfig(r=4, lora_alpha=8, target_modules=["a", "b"], init_lora_weights=False),
                           adapter_name="p0")
    model.add_adapter("p1", LoraConfig(r=4, lora_alpha=4, target_modules=["a", "b"], init_lora_weights=False))
    return model


def layer(model, key, adapter):
    module = getattr(model.base_model.model, key)
    return module.lora_A[adapter].weight.detach().clone(), module.lora_B[adapter].weight.detach().clone(), module.scaling[adapter]


def seeded_like_merger(monkeypatch, seed):
    """PEFT's rules, each call seeded as Merger seeds its k-th call (seed + k): the rules themselves are PEFT's."""
    calls = {"n": 0}
    for name in ("ties", "dare_linear", "dare_ties", "magnitude_prune", "task_arithmetic"):
        original = getattr(peft_lora_model, name)

        def wrapped(*args, _original=original, **kwargs):
            torch.manual_seed(seed + calls["n"])
            calls["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(peft_lora_model, name, wrapped)


CASES = [(method, "total") for method in FACTOR_METHODS + SVD_METHODS] + [
    (method, "frequency") for method in ("ties", "dare_ties", "ties_svd", "dare_ties_svd")]  # the signed rules


@pytest.mark.parametrize("method, majority_sign", CASES)
def test_each_merge_equals_peft_add_weighted_adapter(method, majority_sign, monkeypatch):
    model = peft_model()
    options = MergeOptions(density=0.5, majority_sign=majority_sign, seed=3)
    seeded_like_merger(monkeypatch, options.seed)
    svd = method.endswith("_svd")
    model.add_weighted_adapter(["p0", "p1"], list(WEIGHTS), "merged", combination_type=method, density=0.5,
                               majority_sign_method=majority_sign, **({"svd_rank": 3} if svd else {}))
    merger = Merger(method, options)
    for key in ("a", "b"):
        parts = []
        for adapter, weight in zip(("p0", "p1"), WEIGHTS):
            down, up, scale = layer(model, key, adapter)
            parts.append((LayerFactors(down, up, scale * down.shape[0]), weight))
        want_down, want_up, want_scale = layer(model, key, "merged")
        got = merger.svd(parts, 3)[0] if svd else merger.factors(parts)
        assert got.scale == want_scale == 1.0
        if svd:  # the factors of an SVD are unique up to signs: compare the products
            assert torch.allclose(got.up @ got.down, want_scale * want_up @ want_down, atol=1e-5), key
        else:
            assert torch.allclose(got.down, want_down, atol=1e-6) and torch.allclose(got.up, want_up, atol=1e-6), key
        assert (got.up @ got.down).abs().sum() > 0


def test_dare_repeats_with_its_seed_and_changes_with_another():
    generator = torch.Generator().manual_seed(1)
    parts = [(LayerFactors(torch.randn(4, 12, generator=generator), torch.randn(10, 4, generator=generator), 4.0), 1.0)
             for _ in range(2)]
    first = Merger("dare_linear", MergeOptions(0.5, seed=0)).factors(parts)
    again = Merger("dare_linear", MergeOptions(0.5, seed=0)).factors(parts)
    other = Merger("dare_linear", MergeOptions(0.5, seed=1)).factors(parts)
    assert torch.equal(first.down, again.down) and not torch.equal(first.down, other.down)


def test_mix_by_ties_and_dare_saves_adapters_that_generate(model, tmp_path, capsys):
    root = tmp_path / "data"
    library = Library(root)
    add_random_adapter(library, model, "a", "sks", rank=4, alpha=4.0, seed=1)
    add_random_adapter(library, model, "b", "zwx", rank=4, alpha=8.0, seed=2)
    base = images(model, [])
    for name, extra in (("t", ["--method", "ties", "--density", "0.5"]),
                        ("d", ["--method", "dare_linear", "--density", "0.5", "--seed", "0"]),
                        ("s", ["--method", "ties_svd", "--density", "0.5", "--rank", "6"])):
        code = main(["mix", "--data-root", str(root), "--adapter", "a=1", "--adapter", "b=1", "--name", name, *extra])
        assert code == 0, capsys.readouterr().err
        entry = Library(root).get(name)
        assert entry.meta["mix"]["density"] == 0.5 and entry.rank == (6 if name == "s" else 4)
        assert np.abs(images(model, [(entry, 1.0)]) - base).mean() > 1.0  # the merge changes the images
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["--method", "ties"], "--method ties needs --density D"),
    (["--method", "cat", "--density", "0.5"], "--density applies to the ties/dare/magnitude_prune merges only"),
    (["--method", "ties", "--density", "1.5"], "--density 1.5: must be in (0, 1]"),
    (["--method", "magnitude_prune", "--density", "0.5", "--majority-sign", "frequency"], "--majority-sign applies to ties and dare_ties"),
    (["--method", "ties", "--density", "0.5", "--seed", "1"], "--seed applies to the dare merges only"),
    (["--method", "ties", "--density", "0.5", "--rank", "2"], "--rank applies to --method svd and the *_svd merges only"),
    (["--method", "nope"], "--method 'nope': use cat (exact), linear, svd, or a merge"),
])
def test_bad_merge_options_are_one_line_errors(model, tmp_path, capsys, args, message):
    root = tmp_path / "data"
    library = Library(root)
    add_random_adapter(library, model, "a", "", rank=4, alpha=4.0, seed=1)
    add_random_adapter(library, model, "b", "", rank=2, alpha=2.0, seed=2)
    code = main(["mix", "--data-root", str(root), "--adapter", "a=1", "--adapter", "a=0.5", "--name", "m", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    # factor merges need one rank
    code = main(["mix", "--data-root", str(root), "--adapter", "a=1", "--adapter", "b=1", "--name", "m2",
                 "--method", "dare_ties", "--density", "0.5"])
    assert code == 2 and "--method dare_ties needs adapters of one equal rank" in capsys.readouterr().err
