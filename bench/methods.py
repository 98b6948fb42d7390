#!/usr/bin/env python
"""Adapter types side by side on builtin:tiny-world: LoRA, DoRA, LoHa, LoKr (issue 17), QR-LoRA, VeRA, AdaLoRA (issue 18). Prints a table, then JSON.

Each type trains on the redyellow-ball subject with the product's defaults for built-ins (config.defaults_for; the
README's tables were measured with those of 2026-11-27: 400 steps, rank 8, alpha 8, lr 1e-3, batch 2 + 2, the noise
target, identifier embedding, lambda = 1, 64 class images) at seeds 0 and 1, and is judged by the
world's analyser exactly as bench/quality.py judges LoRA: subject fidelity, prior leak, recontext (asked
background obeyed) and how many of those are the subject, plus trainable parameters (adapter layers and
identifier rows), file size and training seconds. A failed run is reported in its row.

    python bench/methods.py --markdown      # the README table
    python bench/methods.py --types lora loha --seeds 0
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from dreambooth_lora.bench.quality import (
    Run, Settings, start_worker, baseline_task, class_images_task, train_and_evaluate,
)

SUBJECT = "redyellow-ball"
TYPES = ("lora", "dora", "loha", "lokr", "qrlora", "vera", "adalora")
COLUMNS = ("subject_fidelity", "prior_leak", "recontext", "recontext_subject", "trainable_params", "file_bytes", "train_seconds")


def run_methods(types, seeds, settings: Settings, workers: int, work: Path, on_row=lambda row: None) -> dict:
    from dreambooth_lora.tinyworld import world

    started = time.time()
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=start_worker)
    try:
        prior = pool.apply_async(class_images_task, (world.SUBJECTS[SUBJECT].cls, work))
        baseline = pool.apply_async(baseline_task, (SUBJECT, settings.samples))
        prior.get()
        for kind in types:  # one folder per type (run names repeat across types), sharing the class images
            (work / kind).mkdir(parents=True, exist_ok=True)
            if not (work / kind / "prior").exists():
                (work / kind / "prior").symlink_to(work / "prior")
        jobs = [(kind, seed, pool.apply_async(train_and_evaluate, (Run(SUBJECT, 1.0, seed, "none"),
                                                                   replace(settings, adapter_type=kind), work / kind)))
                for kind in types for seed in seeds]
        rows = []
        for kind, seed, job in jobs:
            try:
                row = job.get()
                row.pop("class_readings", None)
            except Exception as error:  # noqa: BLE001 - one failed training is reported in its row; the table goes on
                row = {"adapter_type": kind, "seed": seed, "error": f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]}
            row["adapter_type"] = kind
            rows.append(row)
            on_row(row)
        _, base_scores, ceiling = baseline.get()
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    summary = {}
    for kind in types:
        ok = [r for r in rows if r["adapter_type"] == kind and "error" not in r]
        summary[kind] = {c: round(sum(r[c] for r in ok) / len(ok), 3) if ok else None for c in COLUMNS}
        summary[kind]["runs"] = len(ok)
        summary[kind]["failed"] = [r["error"] for r in rows if r["adapter_type"] == kind and "error" in r]
    return {"subject": SUBJECT, "seeds": list(seeds), "samples_per_prompt": settings.samples, "runs": rows,
            "summary": summary, "vae_ceiling": ceiling,
            "base": {"fidelity": base_scores["instance"]["subject"], "leak": base_scores["class"]["subject"],
                     "recontext": base_scores["recontext"]["background"]},
            "seconds": round(time.time() - started, 1)}


def markdown(report: dict) -> str:
    lines = ["| adapter type | runs | fidelity | leak | recontext (background) | recontext (subject) | trainable params | file KB | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind, values in report["summary"].items():
        if values["runs"] == 0:
            lines.append(f"| {kind} | 0 | failed: {'; '.join(values['failed'])} |" + " |" * 6)
            continue
        lines.append(f"| {kind} | {values['runs']} | {values['subject_fidelity']:.3f} | {values['prior_leak']:.3f} | "
                     f"{values['recontext']:.3f} | {values['recontext_subject']:.3f} | {values['trainable_params']:,.0f} | "
                     f"{values['file_bytes'] / 1024:.0f} | {values['train_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES, help="adapter types to compare")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds (default 0 1)")
    parser.add_argument("--samples", type=int, default=32, help="images per prompt (default 32)")
    parser.add_argument("--steps", type=int, default=None, help="override the default steps (a smoke run)")
    parser.add_argument("--lr", type=float, default=None, help="override the default learning rate (7e-4 on built-ins)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="single-threaded worker processes")
    parser.add_argument("--work", default=None, help="working folder (default: a new temporary one)")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    parser.add_argument("--json", action="store_true", help="print the JSON report alone on stdout (tables go to stderr)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="dbl-methods-"))
    report = run_methods(args.types, args.seeds, Settings(samples=args.samples, steps=args.steps, lr=args.lr), args.workers, work,
                         on_row=lambda row: print(json.dumps(row), file=sys.stderr, flush=True))
    out = sys.stderr if args.json else sys.stdout
    print(markdown(report), file=out)
    print(f"{len(report['runs'])} trainings on {args.workers} workers in {report['seconds']} s; base model: {report['base']}; "
          f"VAE ceiling {report['vae_ceiling']}", file=out)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
