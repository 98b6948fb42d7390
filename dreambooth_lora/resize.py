"""Rank analysis and resize: singular values of each layer's delta W, energy kept per rank, smaller copies.

For a layer, delta W = (alpha / r) B A has singular values s_1 >= s_2 >= ...; keeping the top k gives the
best rank-k approximation (Eckart-Young) with energy E(k) = sum_{i<=k} s_i^2 / sum_i s_i^2 and relative
Frobenius error sqrt(1 - E(k)). A resized adapter keeps per-layer ranks: diffusers builds its LoraConfig
from the file's `lora_adapter_metadata`, whose `rank_pattern` / `alpha_pattern` express them exactly.

Per adapter type (adapter_types.py), what is factorised is the type's `update()`: LoRA's (alpha/r) B A; DoRA's
direction update (alpha/r) B A, its magnitudes kept, so the copy stays DoRA; LoHa's and LoKr's delta W, whose
rank may exceed r (LoHa up to r^2, LoKr up to the rank of a Kronecker product), so their copies are plain LoRA.
"""

from __future__ import annotations

import torch

from .errors import UserError
from .adapter_file import AdapterFile, LayerFactors, read_adapter, store_adapter
from .adapter_types import DoRA, LoRA
from .library import AdapterEntry, Library

REPORT_ENERGIES = (0.9, 0.95, 0.99, 0.999)


def energy(singular_values: torch.Tensor) -> torch.Tensor:
    """E(k) for k = 1..n: the share of sum s_i^2 kept by the top k values (all 1 for a zero matrix)."""
    squares = singular_values.double() ** 2
    total = squares.sum()
    if total == 0:
        return torch.ones_like(squares)
    return torch.cumsum(squares, 0) / total


def min_rank_for_energy(singular_values: torch.Tensor, target: float) -> int:
    """Smallest k >= 1 with E(k) >= target (a tiny tolerance absorbs float rounding at target 1)."""
    kept = energy(singular_values)
    return int(torch.nonzero(kept >= target - 1e-12)[0].item()) + 1


def svd_factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of `delta` (up = U_k S_k, down = Vh_k, as kohya's svd_merge and PEFT do) and the
    relative Frobenius error ||delta - up @ down|| / ||delta|| (0 for a zero delta)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.shape[0])
    up, down = u[:, :k] * s[:k], vh[:k, :]
    norm = torch.linalg.matrix_norm(delta.double())
    error = float(torch.linalg.matrix_norm(delta.double() - up @ down) / norm) if norm > 0 else 0.0
    return up.float(), down.float(), error


def max_layer_rank(layer) -> int:
    """The most singular values a layer's update can have: r for LoRA and DoRA, the full rank for LoHa and LoKr."""
    return layer.rank if isinstance(layer, LoRA) else min(layer.shape)


def layer_singular_values(layer) -> torch.Tensor:
    """Singular values of the layer's update ((alpha/r) B A for LoRA); only the ones it can have are kept."""
    return torch.linalg.svdvals(layer.update())[: max_layer_rank(layer)]


def resized_layer(layer, up: torch.Tensor, down: torch.Tensor):
    """The factors kept, scale folded in (alpha = rank); a DoRA layer keeps its magnitudes."""
    if isinstance(layer, DoRA):
        return DoRA(down, up, float(down.shape[0]), layer.magnitude)
    return LayerFactors(down, up, float(down.shape[0]))


def rank_report(entry: AdapterEntry) -> dict:
    """Per-layer singular values and energy, plus min/mean/max energy over layers at each rank."""
    weights = read_adapter(entry.file)
    if not weights.layers:
        raise UserError(f"Adapter {entry.name!r} holds no LoRA layers to analyse.")
    per_layer = {}
    for key, layer in sorted(weights.layers.items()):
        values = layer_singular_values(layer)
        per_layer[key] = {"rank": len(values), "singular_values": [round(float(v), 6) for v in values],
                          "energy": [round(float(e), 6) for e in energy(values)]}
    max_rank = max(layer["rank"] for layer in per_layer.values())
    table = []
    for k in range(1, max_rank + 1):
        at_k = torch.tensor([layer["energy"][min(k, layer["rank"]) - 1] for layer in per_layer.values()])
        table.append({"rank": k, "min": float(at_k.min()), "mean": float(at_k.mean()), "max": float(at_k.max())})
    needed = {f"{e:g}": max(min_rank_for_energy(torch.tensor(layer["singular_values"]), e) for layer in per_layer.values())
              for e in REPORT_ENERGIES}
    return {"adapter": entry.name, "layers": len(per_layer), "rank": max_rank, "table": table,
            "rank_for_energy": needed, "per_layer": per_layer}


def format_rank_report(report: dict) -> str:
    lines = [f"Adapter {report['adapter']}: {report['layers']} LoRA layers, rank {report['rank']}.",
             "Energy kept at each rank, E(r) = sum_{i<=r} s_i^2 / sum s_i^2, over layers:",
             f"{'rank':>4}  {'min':>7}  {'mean':>7}  {'max':>7}"]
    for row in report["table"]:
        lines.append(f"{row['rank']:>4}  {row['min']:>7.2%}  {row['mean']:>7.2%}  {row['max']:>7.2%}")
    needed = ", ".join(f"{float(e):.1%} -> rank {r}" for e, r in report["rank_for_energy"].items())
    lines.append(f"Smallest rank keeping the energy in every layer: {needed}.")
    return "\n".join(lines)


def resize_adapter(library: Library, name: str, energy: float | None, rank: int | None,
                   new_name: str | None) -> tuple[AdapterEntry, dict]:
    """Save a copy whose layers keep `energy` (per-layer smallest rank) or at most `rank`; scale folded in, alpha = rank."""
    entry = library.get(name)
    if (energy is None) == (rank is None):
        raise UserError("resize needs exactly one of --energy E or --rank R.")
    if energy is not None and not 0 < energy <= 1:
        raise UserError(f"--energy {energy}: must be a fraction in (0, 1], e.g. 0.99.")
    weights = read_adapter(entry.file)
    most = max((max_layer_rank(layer) for layer in weights.layers.values()), default=entry.rank)
    if rank is not None and not 1 <= rank <= most:
        raise UserError(f"--rank {rank}: adapter {entry.name!r} has rank {most}; choose 1 to {most}.")
    target = f"e{energy:g}" if energy is not None else f"r{rank}"
    new_name = library.check_new_name(new_name) if new_name else library.free_name(f"{entry.name}-{target}")
    layers, per_layer = {}, {}
    for key, layer in sorted(weights.layers.items()):
        values = layer_singular_values(layer)
        keep = min_rank_for_energy(values, energy) if energy is not None else min(rank, max_layer_rank(layer))
        up, down, error = svd_factorize(layer.update(), keep)
        layers[key] = resized_layer(layer, up, down)
        per_layer[key] = {"rank": down.shape[0], "relative_error": round(error, 6)}
    # a lower-rank copy is plain LoRA: a qrlora/vera/adalora entry's trained type and count do not carry over
    meta = {**{k: v for k, v in entry.meta.items() if k not in ("adapter_type", "trainable_params", "stored_as")},
            "name": new_name,
            "resized_from": {"name": entry.name, "id": entry.id, "energy": energy, "rank": rank}}
    new_entry = store_adapter(library, AdapterFile(layers, dict(weights.identifiers), meta))
    ranks = [layer["rank"] for layer in per_layer.values()]
    return new_entry, {
        "size_bytes_before": entry.file.stat().st_size, "size_bytes_after": new_entry.file.stat().st_size,
        "adapter_type": new_entry.meta.get("adapter_type"), "rank_before": entry.rank, "rank_after": max(ranks), "min_layer_rank": min(ranks),
        "max_relative_error": max(layer["relative_error"] for layer in per_layer.values()),
        "per_layer": per_layer,
    }
