"""Prints the tiny-world analyser's accuracy (JSON) on fresh ground truth, clean and softened.

Softened = Gaussian blur (radius 0.7) + Gaussian noise (sigma 8/255): a diffusion model's samples
are softer than renders, so those figures bound how far the analyser's judgements can be trusted.
Run: python bench/analyser_accuracy.py [--samples 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from dreambooth_lora.tinyworld.analyser import (  # noqa: E402
    SOFTEN_BLUR_RADIUS,
    SOFTEN_NOISE_SIGMA,
    analyse,
    expected_attributes,
    is_subject,
    soften,
)
from dreambooth_lora.tinyworld.world import SUBJECTS, render, render_subject, sample  # noqa: E402

FIELDS = ("cls", "colours", "pattern", "background")


# Not a requirement: softer still, nearer what a factor-4 VAE does to seams, to show the margin.
HARDER = {"blur_radius": 1.3, "noise_sigma": 12.0}


def attribute_accuracy(n: int, seed: int, softening: dict[str, float] | None) -> dict[str, float]:
    """Per-attribute and all-correct accuracy over n fresh base-world scenes, softened if asked."""
    rng = np.random.default_rng(seed)
    hits = dict.fromkeys(FIELDS + ("all",), 0)
    for _ in range(n):
        scene = sample(rng)
        image = render(scene) if softening is None else soften(render(scene), rng, **softening)
        seen, truth = analyse(image), expected_attributes(scene)
        right = {field: getattr(seen, field) == getattr(truth, field) for field in FIELDS}
        right["all"] = all(right.values())
        for field, ok in right.items():
            hits[field] += ok
    return {field: count / n for field, count in hits.items()}


def subject_rates(n: int, seed: int) -> dict[str, float]:
    """is_subject on softened renders: detection rate per subject, false-positive rate on the base world."""
    rng = np.random.default_rng(seed)
    rates = {}
    for name in SUBJECTS:
        hits = sum(is_subject(soften(render_subject(name, rng)[0], rng), name) for _ in range(n))
        rates[f"{name}_detected"] = hits / n
    false_hits = 0
    for _ in range(n):
        image = soften(render(sample(rng)), rng)
        false_hits += any(is_subject(image, name) for name in SUBJECTS)
    rates["base_world_false_positive"] = false_hits / n
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description="tiny-world analyser accuracy")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    softening = {"blur_radius": SOFTEN_BLUR_RADIUS, "noise_sigma": SOFTEN_NOISE_SIGMA}
    report = {
        "samples": args.samples,
        "clean": attribute_accuracy(args.samples, args.seed, None),
        "softened": attribute_accuracy(args.samples, args.seed + 1, softening),
        "softening": softening,
        "harder": attribute_accuracy(args.samples, args.seed + 3, HARDER),
        "harder_softening": HARDER,
        "subjects_softened": subject_rates(args.samples // 4, args.seed + 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
