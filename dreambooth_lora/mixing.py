"""Save a weighted mix of library adapters as one new adapter (PEFT `add_weighted_adapter` semantics).

Per layer the mix means delta W = sum_i w_i s_i B_i A_i with s_i = alpha_i / r_i, the same sum
`AdapterSession` applies at inference (diffusers `set_adapters`). Methods:
- `cat` (exact): B = [sqrt|w_i s_i| B_i ...], A = [sign(w_i) sqrt|w_i s_i| A_i ...] stacked along the rank;
  rank = sum of ranks, alpha = rank so the new scale is 1.
- `linear` (an approximation): B = sum_i sqrt|w_i s_i| B_i, A = sum_i sign(w_i) sqrt|w_i s_i| A_i;
  the product has cross terms B_i A_j, so it equals the mix only in special cases. Equal ranks only.
- `svd`: form delta W and keep its top `rank` singular directions; exact when `rank` reaches the sum of
  ranks, otherwise the relative Frobenius error of each layer is reported.
- `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` and their `*_svd` variants: PEFT's merge rules, applied
  in merges.py (`--density`, `--majority-sign`, `--seed`); plain LoRA only, as in PEFT.
A layer present in only some adapters mixes only those. Identifiers mix as in AdapterSession:
init + sum_i t_i (learned_i - init) with t_i the text strength (identifier.py), which needs the base model's table.

Other adapter types (DoRA, LoHa, LoKr; adapter_types.py) cannot be combined through their factors, so a layer
where any part is not plain LoRA mixes on delta W: sum_i delta_i(W0, w_i), each part's change at its strength
(DoRA's depends on the base weight W0 and is not linear in w). `cat` then factorises that sum exactly by SVD at
its numerical rank (exact, like LoRA's cat), `linear` keeps the parts' common rank and `svd` the chosen rank
(both approximations, their errors reported). The mixed layers are plain LoRA. Weights may be pairs
(UNet, text encoder), as in generate.
"""

from __future__ import annotations

import math

import torch

from .adapter_file import AdapterFile, LayerFactors, read_adapter, store_adapter
from .adapter_types import DoRA, LoRA
from .errors import UserError
from .identifier import mix_identifiers
from .library import AdapterEntry, Library
from .merges import FACTOR_METHODS, SIGNED, SVD_METHODS, Merger, MergeOptions, rule_of
from .resize import svd_factorize

METHODS = ("cat", "linear", "svd") + FACTOR_METHODS + SVD_METHODS


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
                 rank: int | None = None, samples=(), density: float | None = None, majority_sign: str | None = None,
                 seed: int | None = None) -> tuple[AdapterEntry, dict]:
    """Combine library adapters by weight into a new library entry (with `samples`, PIL images of the mix, as its
    samples); returns it and a report."""
    from .generate import base_model_for

    if not specs:
        raise UserError("mix needs at least one --adapter NAME=WEIGHT.")
    if method not in METHODS:
        raise UserError(f"--method {method!r}: use cat (exact), linear, svd, or a merge: {', '.join(FACTOR_METHODS + SVD_METHODS)}.")
    svd_like = method == "svd" or method in SVD_METHODS
    if rank is not None and not svd_like:
        raise UserError(f"--rank applies to --method svd and the *_svd merges only; --method {method} sets the rank itself.")
    options = _merge_options(method, density, majority_sign, seed)
    parts = [(library.get(name), weight if isinstance(weight, tuple) else float(weight)) for name, weight in specs]
    base_model_for(parts, None, "")  # refuses adapters trained on different base models
    library.check_new_name(new_name)
    adapters = [read_adapter(entry.file) for entry, _ in parts]
    if options and any(type(layer) is not LoRA for a in adapters for layer in a.layers.values()):
        kinds = ", ".join(sorted({a.adapter_type for a in adapters}))
        raise UserError(f"--method {method} merges plain LoRA adapters only (PEFT's rules; these are {kinds}); "
                        "use --method cat, linear or svd.")
    if svd_like:
        full = max(_full_rank([a.layers[k] for a in adapters if k in a.layers]) for k in _layer_keys(adapters))
        rank = rank if rank is not None else max(a.max_rank for a in adapters)  # PEFT's default: the largest part rank
        if method == "svd" and not 1 <= rank <= full:
            raise UserError(f"--rank {rank}: must be from 1 to {full} (the sum of the parts' ranks, where svd is exact).")
        if not 1 <= rank <= 4096:
            raise UserError(f"--rank {rank}: must be from 1 to 4096.")
    if method == "linear" or method in FACTOR_METHODS:
        _check_equal_ranks(parts, adapters, method)

    base = _base_weights(parts, adapters)
    merger = Merger(method, options) if options else None
    layers, per_layer = {}, {}
    with torch.random.fork_rng(devices=[]):  # DARE draws from the global generator, as in PEFT (merges.py)
        for key in _layer_keys(adapters):
            present = [(a.layers[key], _component_weight(w, key)) for a, (_, w) in zip(adapters, parts) if key in a.layers]
            if merger is not None:
                if method in FACTOR_METHODS:
                    layers[key] = merger.factors(present)
                else:
                    layers[key], error = merger.svd(present, rank)
                    per_layer[key] = {"rank": layers[key].rank, "relative_error": round(error, 6)}
                continue
            if not all(type(f) is LoRA for f, _ in present):
                delta = sum(f.delta(base.get(key), w) for f, w in present)
                keep = {"cat": None, "linear": present[0][0].rank, "svd": rank}[method]
                up, down, error = svd_factorize(delta, keep if keep is not None else numerical_rank(delta))
                if method != "linear":
                    per_layer[key] = {"rank": down.shape[0], "relative_error": round(error, 6)}
                layers[key] = LayerFactors(down.float(), up.float(), float(down.shape[0]))
                continue
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
        "train_token_embedding": any(a.identifiers for a in adapters),
        "mix": {"method": method, "rank": rank if svd_like else None,
                "parts": [{"name": e.name, "id": e.id, "weight": list(w) if isinstance(w, tuple) else w,
                           "token": e.token, "class_noun": e.class_noun} for e, w in parts],
                **({"density": options.density, "majority_sign": options.majority_sign, "seed": options.seed} if options else {})},
    }
    identifiers = _mixed_identifiers(entries[0].base_model, parts, adapters)
    entry = store_adapter(library, AdapterFile(layers, identifiers, meta), samples)
    report = {"method": method, "exact": method == "cat" or (method == "svd" and _all_exact(per_layer)),
              "types": sorted({a.adapter_type for a in adapters}),
              "parts": meta["mix"]["parts"], "rank": entry.rank, "layers": len(layers),
              "identifiers": sorted(identifiers), "size_bytes": entry.file.stat().st_size}
    if options:
        report.update(density=options.density, majority_sign=options.majority_sign, seed=options.seed)
    if per_layer:
        report["max_relative_error"] = max((p["relative_error"] for p in per_layer.values()), default=0.0)
        report["per_layer"] = per_layer
    return entry, report


def numerical_rank(delta: torch.Tensor) -> int:
    """How many singular values of delta carry anything (above 1e-9 of the largest): an exact factorisation's rank."""
    values = torch.linalg.svdvals(delta.double())
    return max(1, int((values > values[0] * 1e-9).sum())) if values.numel() and values[0] > 0 else 1


def _full_rank(layers) -> int:
    """The rank where svd is exact: the sum of LoRA ranks, or the layer's full rank when any part is another type."""
    if all(type(layer) is LoRA for layer in layers):
        return sum(layer.rank for layer in layers)
    return min(layers[0].shape)


def _component_weight(weight, layer_key: str) -> float:
    from .generate import split_weight

    unet, text = split_weight(weight)
    return unet if layer_key.startswith("unet.") else text


def _base_weights(parts, adapters) -> dict[str, torch.Tensor]:
    """The base model's weights of the DoRA layers (their delta depends on them); {} when there are none."""
    keys = {key for a in adapters for key, layer in a.layers.items() if isinstance(layer, DoRA)}
    if not keys:
        return {}
    from .generate import check_compatible
    from .models import load_base_model

    model = load_base_model(parts[0][0].base_model)
    check_compatible(parts[0][0], model)
    return base_layer_weights(model, keys)


def base_layer_weights(model, keys) -> dict[str, torch.Tensor]:
    """`unet.<module>` / `text_encoder.<module>` -> that Linear's weight, for the keys asked."""
    weights = {}
    for component in ("unet", "text_encoder"):
        modules = dict(getattr(model, component).named_modules())
        for key in keys:
            if key.partition(".")[0] == component:
                weights[key] = modules[key.partition(".")[2]].weight.detach().double().cpu()
    return weights


def _layer_keys(adapters: list[AdapterFile]) -> list[str]:
    return sorted({key for adapter in adapters for key in adapter.layers})


def _merge_options(method: str, density, majority_sign, seed) -> MergeOptions | None:
    """The merge's options, or None for cat/linear/svd; an option that does not apply to `method` is refused."""
    if method not in FACTOR_METHODS + SVD_METHODS:
        given = [flag for flag, value in (("--density", density), ("--majority-sign", majority_sign), ("--seed", seed)) if value is not None]
        if given:
            raise UserError(f"{given[0]} applies to the ties/dare/magnitude_prune merges only, not --method {method}.")
        return None
    if density is None:
        raise UserError(f"--method {method} needs --density D (the share of values kept, e.g. 0.5).")
    if majority_sign is not None and rule_of(method) not in SIGNED:
        raise UserError(f"--majority-sign applies to ties and dare_ties merges only, not --method {method}.")
    if seed is not None and not rule_of(method).startswith("dare"):
        raise UserError(f"--seed applies to the dare merges only (their random mask), not --method {method}.")
    return MergeOptions(float(density), majority_sign or "total", int(seed or 0))


def _check_equal_ranks(parts, adapters, method: str = "linear") -> None:
    ranks = {entry.name: sorted({layer.rank for layer in a.layers.values()}) for (entry, _), a in zip(parts, adapters)}
    if len({tuple(r) for r in ranks.values()}) > 1 or any(len(r) > 1 for r in ranks.values()):
        listing = ", ".join(f"{name} rank {'/'.join(map(str, r))}" for name, r in ranks.items())
        raise UserError(f"--method {method} needs adapters of one equal rank ({listing}); use --method cat, svd or {method.removesuffix('_svd')}_svd.")


def _all_exact(per_layer: dict) -> bool:
    return all(p["relative_error"] < 1e-6 for p in per_layer.values())


def _mixed_identifiers(base_model: str, parts, adapters) -> dict[str, torch.Tensor]:
    """Identifiers mixed exactly as AdapterSession mixes them (text strengths), so the saved mix loads with weight 1
    to the same."""
    from .generate import split_weight

    weighted = [(adapter.identifiers, split_weight(weight)[1]) for adapter, (_, weight) in zip(adapters, parts)]
    weighted = [(identifiers, weight) for identifiers, weight in weighted if identifiers and weight != 0]
    if not weighted:
        return {}
    from .generate import check_compatible
    from .models import load_base_model

    model = load_base_model(base_model)
    check_compatible(parts[0][0], model)
    return mix_identifiers(weighted, model.tokenizer, model.text_encoder.get_input_embeddings().weight)
