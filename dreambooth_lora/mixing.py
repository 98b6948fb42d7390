"""Save a weighted mix of library adapters as one new adapter (PEFT `add_weighted_adapter` semantics).

Per layer the mix means delta W = sum_i w_i s_i B_i A_i with s_i = alpha_i / r_i, the same sum
`AdapterSession` applies at inference (diffusers `set_adapters`). Methods:
- `cat` (exact): B = [sqrt|w_i s_i| B_i ...], A = [sign(w_i) sqrt|w_i s_i| A_i ...] stacked along the rank;
  rank = sum of ranks, alpha = rank so the new scale is 1.
- `linear` (an approximation): B = sum_i sqrt|w_i s_i| B_i, A = sum_i sign(w_i) sqrt|w_i s_i| A_i;
  the product has cross terms B_i A_j, so it equals the mix only in special cases. Equal ranks only.
- `svd`: form delta W and keep its top `rank` singular directions; exact when `rank` reaches the sum of
  ranks, otherwise the relative Frobenius error of each layer is reported.
A layer present in only some adapters mixes only those. Identifier embeddings mix as in AdapterSession:
base + sum_i w_i (learned_i - base), which needs the base model's embedding table.
"""

from __future__ import annotations

import math

import torch

from .errors import UserError
from .adapter_file import EMBEDDING_PREFIX, AdapterFile, LayerFactors, check_new_name, read_adapter, store_adapter
from .library import AdapterEntry, Library
from .resize import svd_factorize

METHODS = ("cat", "linear", "svd")


def mix_deltas(ups: list[torch.Tensor], downs: list[torch.Tensor], scales: list[float], weights: list[float]) -> torch.Tensor:
    """sum_i w_i s_i B_i A_i: the weight change a mix applies to one layer."""
    return sum(w * s * (up.double() @ down.double()) for up, down, s, w in zip(ups, downs, scales, weights))


def cat_factors(ups, downs, scales, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of mix_deltas: each part's scale split as sqrt over B and A, its sign on A only."""
    factors = [math.sqrt(abs(w * s)) for s, w in zip(scales, weights)]
    signs = [1.0 if w * s >= 0 else -1.0 for s, w in zip(scales, weights)]
    up = torch.cat([f * b for f, b in zip(factors, ups)], dim=1)
    down = torch.cat([sign * f * a for sign, f, a in zip(signs, factors, downs)], dim=0)
    return up, down


def linear_factors(ups, downs, scales, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `linear`: weighted sums of the factors themselves (equal ranks); an approximation of the mix."""
    factors = [math.sqrt(abs(w * s)) for s, w in zip(scales, weights)]
    signs = [1.0 if w * s >= 0 else -1.0 for s, w in zip(scales, weights)]
    up = sum(f * b for f, b in zip(factors, ups))
    down = sum(sign * f * a for sign, f, a in zip(signs, factors, downs))
    return up, down


def mix_adapters(library: Library, specs: list[tuple[str, float]], new_name: str, method: str = "cat",
                 rank: int | None = None, samples=()) -> tuple[AdapterEntry, dict]:
    """Combine library adapters by weight into a new library entry (with `samples`, PIL images of the mix, as its
    samples); returns it and a report."""
    from .generate import base_model_for

    if not specs:
        raise UserError("mix needs at least one --adapter NAME=WEIGHT.")
    if method not in METHODS:
        raise UserError(f"--method {method!r}: use cat (exact), linear or svd.")
    if rank is not None and method != "svd":
        raise UserError(f"--rank applies to --method svd only; --method {method} sets the rank itself.")
    parts = [(library.get(name), float(weight)) for name, weight in specs]
    base_model_for(parts, None, "")  # refuses adapters trained on different base models
    check_new_name(library, new_name)
    adapters = [read_adapter(entry.file) for entry, _ in parts]
    if method == "svd":
        full = max(sum(a.layers[k].rank for a in adapters if k in a.layers) for k in _layer_keys(adapters))
        rank = rank if rank is not None else max(a.max_rank for a in adapters)  # PEFT's default: the largest part rank
        if not 1 <= rank <= full:
            raise UserError(f"--rank {rank}: must be from 1 to {full} (the sum of the parts' ranks, where svd is exact).")
    if method == "linear":
        _check_equal_ranks(parts, adapters)

    layers, per_layer = {}, {}
    for key in _layer_keys(adapters):
        present = [(a.layers[key], w) for a, (_, w) in zip(adapters, parts) if key in a.layers]
        ups, downs = [f.up for f, _ in present], [f.down for f, _ in present]
        scales, weights = [f.scale for f, _ in present], [w for _, w in present]
        if method == "cat":
            up, down = cat_factors(ups, downs, scales, weights)
        elif method == "linear":
            up, down = linear_factors(ups, downs, scales, weights)
        else:
            up, down, error = svd_factorize(mix_deltas(ups, downs, scales, weights), rank)
            per_layer[key] = {"rank": down.shape[0], "relative_error": round(error, 6)}
        layers[key] = LayerFactors(down.float(), up.float(), float(down.shape[0]))  # alpha = rank: scale 1

    entries = [entry for entry, _ in parts]
    meta = {
        "name": new_name, "token": " ".join(dict.fromkeys(e.token for e in entries if e.token)),
        "class_noun": " ".join(dict.fromkeys(e.class_noun for e in entries if e.class_noun)),
        "base_model": entries[0].base_model, "fingerprint": entries[0].fingerprint, "steps": 0,
        "text_encoder": "lora" if any(k.startswith("text_encoder.") for k in layers) else "none",
        "train_token_embedding": any(a.embeddings for a in adapters),
        "mix": {"method": method, "rank": rank if method == "svd" else None,
                "parts": [{"name": e.name, "id": e.id, "weight": w, "token": e.token, "class_noun": e.class_noun}
                          for e, w in parts]},
    }
    embeddings = _mixed_embeddings(entries[0].base_model, parts, adapters)
    entry = store_adapter(library, AdapterFile(layers, embeddings, meta), samples)
    report = {"method": method, "exact": method == "cat" or (method == "svd" and _all_exact(per_layer)),
              "parts": meta["mix"]["parts"], "rank": entry.rank, "layers": len(layers),
              "embeddings": sorted(embeddings), "size_bytes": entry.file.stat().st_size}
    if method == "svd":
        report["max_relative_error"] = max((p["relative_error"] for p in per_layer.values()), default=0.0)
        report["per_layer"] = per_layer
    return entry, report


def _layer_keys(adapters: list[AdapterFile]) -> list[str]:
    return sorted({key for adapter in adapters for key in adapter.layers})


def _check_equal_ranks(parts, adapters) -> None:
    ranks = {entry.name: sorted({layer.rank for layer in a.layers.values()}) for (entry, _), a in zip(parts, adapters)}
    if len({tuple(r) for r in ranks.values()}) > 1 or any(len(r) > 1 for r in ranks.values()):
        listing = ", ".join(f"{name} rank {'/'.join(map(str, r))}" for name, r in ranks.items())
        raise UserError(f"--method linear needs adapters of one equal rank ({listing}); use --method cat or svd.")


def _all_exact(per_layer: dict) -> bool:
    return all(p["relative_error"] < 1e-6 for p in per_layer.values())


def _mixed_embeddings(base_model: str, parts, adapters) -> dict[str, torch.Tensor]:
    """Identifier rows mixed exactly as AdapterSession mixes them, so the saved mix loads with weight 1 to the same."""
    deltas = {}
    for adapter, (_, weight) in zip(adapters, parts):
        for piece, vector in adapter.embeddings.items():
            deltas.setdefault(piece, []).append((vector, weight))
    if not deltas:
        return {}
    from .generate import check_compatible, mixed_token_embedding
    from .models import load_base_model

    model = load_base_model(base_model)
    check_compatible(parts[0][0], model)
    mixed = mixed_token_embedding(model, {EMBEDDING_PREFIX + piece: pairs for piece, pairs in deltas.items()})
    return {key.removeprefix(EMBEDDING_PREFIX): vector for key, vector in mixed.state().items()}
