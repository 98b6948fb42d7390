#!/usr/bin/env python
"""Personalisation quality on builtin:tiny-world, judged by the world's analyser (prints a table and JSON).

For each shipped subject: train with the product's defaults at lambda = 1 and lambda = 0 and report
subject_fidelity ("a photo of sks <class>" images judged to be the subject), prior_leak (plain
"a photo of a <class>" images judged to be the subject), class_diversity (total-variation distance
between the attributes of plain class images and the base model's), recontext (asked background
obeyed in "a photo of sks <class> on a green background", and how many of those are the subject),
plus text encoder none/lora/qlora for one subject. Fails only on errors; goals are read off the table.

    python bench/quality.py --json          # full grid (3 subjects x lambda {0,1} x 2 seeds + TE modes)
    python bench/quality.py --quick         # one subject, one seed, lambda {0,1}
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from dreambooth_lora.config import TrainConfig
from dreambooth_lora.generate import AdapterSession, GenerateSettings
from dreambooth_lora.library import Library
from dreambooth_lora.models import load_base_model
from dreambooth_lora.tinyworld import analyser, world
from dreambooth_lora.train import create_job, run_training

MODEL = "builtin:tiny-world"
TOKEN = "sks"
RECONTEXT_BACKGROUND = "green"  # never behind a shipped instance image


def prompts(cls: str) -> dict[str, str]:
    return {
        "instance": f"a photo of {TOKEN} {cls}",
        "class": f"a photo of a {cls}",
        "recontext": f"a photo of {TOKEN} {cls} on a {RECONTEXT_BACKGROUND} background",
    }


ATTRIBUTES = ("colours", "pattern", "background")


def total_variation(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()) or 1, sum(b.values()) or 1
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


def diversity_distance(readings: list, base_readings: list) -> float:
    """Mean total-variation distance of each attribute's distribution (colour set, pattern, background).

    Per-attribute marginals rather than the joint: with tens of samples a joint over ~100 combinations
    is mostly sampling noise.
    """
    def counts(rows, name):
        return Counter(tuple(sorted(getattr(r, name))) if name == "colours" else getattr(r, name) for r in rows)

    return sum(total_variation(counts(readings, n), counts(base_readings, n)) for n in ATTRIBUTES) / len(ATTRIBUTES)


def evaluate(session: AdapterSession, subject: str, cls: str, samples: int, seed: int) -> dict:
    """Generate each prompt `samples` times with fixed seeds and read the images back."""
    out = {}
    for role, prompt in prompts(cls).items():
        images = session.generate(GenerateSettings(prompt=prompt, num_images=samples, seed=seed))
        readings = [analyser.analyse(image) for image in images]
        out[role] = {
            "subject": sum(analyser.is_subject(image, subject) for image in images) / samples,
            "background": sum(r.background == RECONTEXT_BACKGROUND for r in readings) / samples,
            "readings": readings,
        }
    return out


def vae_ceiling(model, subject: str) -> float:
    """Share of the subject's instance images the VAE can reconstruct as the subject: fidelity's ceiling."""
    from PIL import Image

    from dreambooth_lora.train import _to_tensor

    paths = world.subject_image_paths(subject)
    pixels = torch.stack([_to_tensor(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        recon = model.vae.decode(model.vae.encode(pixels).latent_dist.mean).sample
    arrays = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return sum(analyser.is_subject(a, subject) for a in arrays) / len(arrays)


def run(args) -> dict:
    base = load_base_model(MODEL)
    subjects = list(world.SUBJECTS)[: 1 if args.quick else None]
    seeds = [0] if args.quick else [0, 1]
    runs = [(s, lam, seed, args.text_encoder) for s in subjects for lam in (1.0, 0.0) for seed in seeds]
    if not args.quick:
        runs += [(subjects[0], 1.0, 0, mode) for mode in ("lora", "qlora") if mode != args.text_encoder]
    work = Path(tempfile.mkdtemp(prefix="dbl-quality-"))
    library = Library(work / "data")
    base_session = AdapterSession(base)
    baselines = {}
    results = []
    for subject_name, prior_weight, seed, te_mode in runs:
        subject = world.SUBJECTS[subject_name]
        if subject.cls not in baselines:
            baselines[subject.cls] = evaluate(base_session, subject_name, subject.cls, args.samples, 10_000)
        config = TrainConfig(
            token=TOKEN, class_noun=subject.cls, base_model=MODEL, name=f"{subject_name}-l{prior_weight:g}-s{seed}-{te_mode}",
            prior_weight=prior_weight, seed=seed, text_encoder=te_mode, steps=args.steps,
            **({"lr": args.lr} if args.lr else {}), **({"token_lr": args.token_lr} if args.token_lr else {}),
            **({"batch_size": args.batch_size} if args.batch_size else {}),
        )
        job = create_job(library, config, world.subject_image_paths(subject_name))
        started = time.time()
        result = run_training(library, job, prior_dir=work / "prior")
        seconds = time.time() - started
        session = AdapterSession(load_base_model(MODEL))
        session.apply([(result.adapter, 1.0)])
        scores = evaluate(session, subject_name, subject.cls, args.samples, 10_000)
        base_class = baselines[subject.cls]["class"]["readings"]
        row = {
            "subject": subject_name, "prior_weight": prior_weight, "seed": seed, "text_encoder": te_mode,
            "steps": result.adapter.steps, "train_seconds": round(seconds, 1),
            "subject_fidelity": scores["instance"]["subject"],
            "prior_leak": scores["class"]["subject"],
            "class_diversity_tv": round(diversity_distance(scores["class"]["readings"], base_class), 3),
            "recontext": scores["recontext"]["background"],
            "recontext_subject": scores["recontext"]["subject"],
            "final_loss": result.losses[-1],
        }
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return {
        "model": MODEL, "samples_per_prompt": args.samples, "machine": args.machine,
        "vae_ceiling": {s: vae_ceiling(base, s) for s in subjects},
        "base": {cls: {"leak": b["class"]["subject"], "recontext": b["recontext"]["background"]} for cls, b in baselines.items()},
        "runs": results, "summary": summarise(results),
    }


def summarise(results: list[dict]) -> dict:
    def mean(rows, key):
        return round(sum(r[key] for r in rows) / len(rows), 3) if rows else None

    summary = {}
    for lam in (1.0, 0.0):
        rows = [r for r in results if r["prior_weight"] == lam and r["text_encoder"] == results[0]["text_encoder"]]
        summary[f"lambda={lam:g}"] = {k: mean(rows, k) for k in ("subject_fidelity", "prior_leak", "class_diversity_tv", "recontext", "recontext_subject", "train_seconds")}
    for mode in ("none", "lora", "qlora"):
        rows = [r for r in results if r["prior_weight"] == 1.0 and r["text_encoder"] == mode and r["subject"] == results[0]["subject"] and r["seed"] == 0]
        if rows:
            summary[f"text_encoder={mode}"] = {k: mean(rows, k) for k in ("subject_fidelity", "prior_leak", "class_diversity_tv", "recontext")}
    return summary


def print_table(report: dict) -> None:
    columns = ("subject_fidelity", "prior_leak", "class_diversity_tv", "recontext", "recontext_subject", "train_seconds")
    print(f"{'setting':<22}" + "".join(f"{c:>20}" for c in columns))
    for name, values in report["summary"].items():
        print(f"{name:<22}" + "".join(f"{'' if values.get(c) is None else values.get(c):>20}" for c in columns))
    print(f"VAE ceiling (instance images reconstructed as the subject): {report['vae_ceiling']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the JSON report on stdout after the table")
    parser.add_argument("--samples", type=int, default=32, help="images per prompt")
    parser.add_argument("--steps", type=int, default=None, help="override the default steps")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--token-lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--text-encoder", default="none")
    parser.add_argument("--machine", default="2-core CPU")
    args = parser.parse_args()
    from dreambooth_lora.cli import _quiet_libraries

    _quiet_libraries()
    started = time.time()
    report = run(args)
    report["seconds"] = round(time.time() - started, 1)
    print_table(report)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
