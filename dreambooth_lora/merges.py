"""TIES, DARE and magnitude-prune merges of LoRA layers, with the semantics of PEFT's `add_weighted_adapter`.

The merge rules themselves are PEFT's (`peft.utils.merge_utils`: `ties`, `dare_linear`, `dare_ties`,
`magnitude_prune`); this module only applies them to our per-layer factors (adapter_file.LayerFactors) the way
`LoraModel.add_weighted_adapter` does, so a mix saved here equals PEFT's on the same adapters:
- `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` work on A and B separately, each part weighted by
  sign(w s) sqrt|w s| on A and sqrt|w s| on B (s = alpha / r); the parts need one equal rank; the result has
  that rank and alpha = rank (scale 1). Like PEFT's `linear`, the product is not the weighted sum of the deltas.
- the `*_svd` variants apply the rule to each part's delta W = s B A weighted by w, then keep the top `rank`
  singular directions (default: the largest part rank); any ranks.
`density` is the share of values kept (ties / magnitude_prune: the largest by magnitude; DARE: a random
Bernoulli mask, the survivors rescaled by 1 / density). `majority_sign` ("total" or "frequency") picks each
value's sign in TIES. DARE draws from torch's global generator as PEFT does; `seed` seeds it (see Merger).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from peft.utils.merge_utils import dare_linear, dare_ties, magnitude_prune, ties

from .adapter_file import LayerFactors
from .errors import UserError
from .resize import svd_factorize

RULES = {"ties": ties, "dare_linear": dare_linear, "dare_ties": dare_ties, "magnitude_prune": magnitude_prune}
FACTOR_METHODS = tuple(RULES)
SVD_METHODS = tuple(f"{name}_svd" for name in RULES)
METHODS = FACTOR_METHODS + SVD_METHODS
SIGNED = ("ties", "dare_ties")  # the rules that take a majority-sign method
MAJORITY_SIGN = ("total", "frequency")


@dataclass(frozen=True)
class MergeOptions:
    density: float
    majority_sign: str = "total"
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.density <= 1:
            raise UserError(f"--density {self.density}: must be in (0, 1] (the share of values kept).")
        if self.majority_sign not in MAJORITY_SIGN:
            raise UserError(f"--majority-sign {self.majority_sign!r}: choose total or frequency.")


def rule_of(method: str) -> str:
    return method.removesuffix("_svd")


class Merger:
    """Applies one method's rule layer by layer. The k-th application of the rule in a merge (layers in sorted key
    order, A before B) draws from torch's global generator seeded with `seed + k`, so a merge repeats exactly and
    the random DARE masks of different layers differ; callers restore the generator (mixing.py)."""

    def __init__(self, method: str, options: MergeOptions):
        self.method, self.options, self.calls = method, options, 0

    def _apply(self, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        torch.manual_seed(self.options.seed + self.calls)
        self.calls += 1
        rule = rule_of(self.method)
        extra = (self.options.majority_sign,) if rule in SIGNED else ()
        return RULES[rule](tensors, torch.tensor(weights, dtype=tensors[0].dtype), self.options.density, *extra)

    def factors(self, parts: list[tuple[LayerFactors, float]]) -> LayerFactors:
        """One layer by a factor rule (ties, dare_linear, dare_ties, magnitude_prune); the parts have one rank."""
        weights_a = [math.copysign(math.sqrt(abs(w * f.scale)), w * f.scale) for f, w in parts]
        weights_b = [math.sqrt(abs(w * f.scale)) for f, w in parts]
        down = self._apply([f.down.float() for f, _ in parts], weights_a)
        up = self._apply([f.up.float() for f, _ in parts], weights_b)
        return LayerFactors(down, up, float(down.shape[0]))

    def svd(self, parts: list[tuple[LayerFactors, float]], rank: int) -> tuple[LayerFactors, float]:
        """One layer by the rule on the deltas, re-factorised to `rank`; the factors and their relative error
        against the merged delta."""
        merged = self._apply([f.delta().float() for f, _ in parts], [w for _, w in parts])
        up, down, error = svd_factorize(merged, rank)
        return LayerFactors(down, up, float(down.shape[0])), error
