#!/usr/bin/env python
"""Personalisation quality on builtin:tiny-world, judged by the world's analyser (prints a table, then JSON).

For each shipped subject: train with the product's defaults at lambda = 1 and lambda = 0 and report
subject_fidelity, prior_leak, class_diversity_tv, recontext and recontext_subject (see
dreambooth_lora/bench/quality.py), plus text encoder none/lora/qlora for one subject.
Fails only on errors; goals are read off the table.

    python bench/quality.py --json          # full grid (3 subjects x lambda {0,1} x 2 seeds + TE modes)
    python bench/quality.py --quick         # one subject, one seed, lambda {1,0}
    python bench/quality.py --seeds 2 3     # fresh seeds: 3 subjects x lambda {0,1} x seeds 2, 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dreambooth_lora.bench.quality import Settings, run_bench

COLUMNS = ("subject_fidelity", "prior_leak", "class_diversity_tv", "recontext", "recontext_subject", "train_seconds")


def print_table(report: dict, file=sys.stdout) -> None:
    say = lambda text: print(text, file=file)
    say(f"{'setting':<22}" + "".join(f"{c:>20}" for c in COLUMNS))
    for name, values in report["summary"].items():
        say(f"{name:<22}" + "".join(f"{'' if values.get(c) is None else values.get(c):>20}" for c in COLUMNS))
    for run in report["runs"]:
        if "error" in run:
            say(f"FAILED {run['subject']} lambda={run['prior_weight']:g} seed={run['seed']} TE {run['text_encoder']}: {run['error']}")
    say(f"VAE ceiling (instance images reconstructed as the subject): {report['vae_ceiling']}")
    if report.get("base"):  # the base model against itself at other seeds: a diversity figure's noise floor
        floors = {s: base["class_diversity_floor"] for s, base in report["base"].items()}
        say(f"diversity TV floor ({report['class_samples']} class images against as many more from the base model): {floors}")
    say(f"{len(report['runs'])} trainings on {report['workers']} workers in {report['seconds']} s ({report['machine']})")


def markdown(report: dict) -> str:
    """The summary and per-run tables as Markdown, for the README."""
    runs = report["runs"]
    first = runs[0]

    def label(name: str) -> tuple[str, int]:
        key, value = name.split("=")
        if key == "lambda":
            rows = [r for r in runs if r["prior_weight"] == float(value) and r["text_encoder"] == first["text_encoder"]]
            return f"λ = {value}, text encoder {first['text_encoder']}, all subjects", len(rows)
        return f"{first['subject']}, λ = 1, seed 0, text encoder {value}", 1

    lines = ["| setting | runs | " + " | ".join(COLUMNS) + " |", "|---|---" + "|---" * len(COLUMNS) + "|"]
    for name, values in report["summary"].items():
        text, count = label(name)
        lines.append(f"| {text} | {count} | " + " | ".join("" if values.get(c) is None else f"{values[c]:g}" for c in COLUMNS) + " |")
    lines += ["", "| subject | λ | seed | text encoder | fidelity | leak | diversity TV | recontext (background) | recontext (subject) | train s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['subject']} | {r['prior_weight']:g} | {r['seed']} | {r['text_encoder']} | failed: {r['error']} |" + " |" * 5)
            continue
        lines.append(f"| {r['subject']} | {r['prior_weight']:g} | {r['seed']} | {r['text_encoder']} | {r['subject_fidelity']:.3f} | "
                     f"{r['prior_leak']:.3f} | {r['class_diversity_tv']:.3f} | {r['recontext']:.3f} | {r['recontext_subject']:.3f} | {r['train_seconds']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the JSON report alone on stdout (tables go to stderr)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown after the table")
    parser.add_argument("--samples", type=int, default=32, help="images per prompt")
    parser.add_argument("--steps", type=int, default=None, help="override the default steps")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--token-lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--text-encoder", default="none")
    parser.add_argument("--ema-decay", type=float, default=None, help="override the default weight average's decay (0: off)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="training seeds (default 0 1); given, the grid is the lambda rows alone, without the TE modes")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="single-threaded worker processes")
    parser.add_argument("--machine", default=f"{os.cpu_count()}-core CPU")
    parser.add_argument("--work", default=None,
                        help="folder that keeps the runs' libraries (their adapters) and class images (default: a "
                             "temporary one, removed at the end)")
    args = parser.parse_args()
    settings = Settings(samples=args.samples, steps=args.steps, lr=args.lr, token_lr=args.token_lr,
                        batch_size=args.batch_size, text_encoder=args.text_encoder, ema_decay=args.ema_decay)
    report = run_bench(args.quick, settings, args.workers, args.machine, work=args.work,
                       on_row=lambda row: print(json.dumps(row), file=sys.stderr, flush=True), seeds=args.seeds)
    tables = sys.stderr if args.json else sys.stdout  # with --json, stdout is the JSON alone
    print_table(report, tables)
    if args.markdown:
        print(markdown(report), file=tables)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
