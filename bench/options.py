#!/usr/bin/env python
"""The option rows on builtin:tiny-world, judged by the world's analyser: min-SNR-γ (γ = 5), noise offset (0.05),
a cosine learning-rate schedule, the weight average (--ema-decay) off, 0.98 and 0.99,
and the meter's chosen checkpoint beside the final one (dreambooth_lora/bench/options.py).

Every row trains each shipped subject at λ = 1 with seeds 0 and 1 (--quick: one subject, seed 0) with the product's
defaults otherwise; the rows screened for the built-ins' defaults (issue 16) run by name only. The meter table holds,
per run, the chosen point's fidelity and leak beside the final's; the meter "predicts" when the chosen fidelity is at least the final's with leak no higher in at least 5 of 6 runs.

    python bench/options.py --json > options.json   # 42 trainings (7 rows); tables on stderr
    python bench/options.py --variants ema-0.98 no-ema --seeds 0 1   # chosen rows
    python bench/options.py --variants batch-4 --runs bluecyan-box:2 redyellow-ball:3   # chosen runs
    python bench/options.py --quick                 # one training per row
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dreambooth_lora.bench.options import COLUMNS, REPEATS, VARIANTS, plan, summarise
from dreambooth_lora.bench.quality import run_tasks


def print_tables(report: dict, file=sys.stdout) -> None:
    say = lambda text: print(text, file=file)
    say(f"{'variant':<20}{'runs':>6}" + "".join(f"{c:>19}" for c in COLUMNS) + f"{'min fidelity':>14}{'runs >= 0.8':>13}")
    for name, values in report["summary"].items():
        if name.startswith("meter_"):
            continue
        say(f"{name:<20}{values['runs']:>6}" + "".join(f"{values[c]:>19}" for c in COLUMNS)
            + f"{values['min_fidelity']:>14}{values['runs_fidelity_ge_0_8']:>13}")
    metered = [r for r in report["runs"] if "chosen" in r]
    if metered:
        say("\nmeter: chosen point vs final (rule: dreambooth_lora/meter.py RULE)")
        say(f"{'subject':<16}{'seed':>5}{'chosen step':>12}{'fidelity final':>16}{'chosen':>8}{'leak final':>12}{'chosen':>8}")
        for r in metered:
            say(f"{r['subject']:<16}{r['seed']:>5}{r['chosen_step']:>8}/{r['steps']:<3}{r['subject_fidelity']:>16.3f}"
                f"{r['chosen']['subject_fidelity']:>8.3f}{r['prior_leak']:>12.3f}{r['chosen']['prior_leak']:>8.3f}")
        say(f"verdict: {json.dumps(report['summary']['meter_verdict'])}")
    for run in report["runs"]:
        if "error" in run:
            say(f"FAILED {run['variant']} {run['subject']} seed={run['seed']}: {run['error']}")
    say(f"{len(report['runs'])} trainings on {report['workers']} workers in {report['seconds']} s ({report['machine']})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one subject, seed 0 (3 trainings)")
    parser.add_argument("--json", action="store_true", help="print the JSON report alone on stdout (tables go to stderr)")
    parser.add_argument("--samples", type=int, default=32, help="images per prompt (default 32)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="single-threaded worker processes")
    parser.add_argument("--machine", default=f"{os.cpu_count()}-core CPU", help="what to call this machine in the report")
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help=f"only these rows ({', '.join(VARIANTS)}; default: all but defaults and no-ema, "
                             "whose adapters other rows repeat, and the rows screened for the defaults, issue 16)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="training seeds (default 0 1)")
    parser.add_argument("--subjects", nargs="+", default=None, metavar="SUBJECT", help="only these subjects (default: all)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="SUBJECT:SEED",
                        help="only these runs, e.g. bluecyan-box:2 redyellow-ball:3 (instead of subjects x seeds)")
    parser.add_argument("--work", default=None, help="folder that keeps the runs' libraries (their adapters) and class images (default: a "
                             "temporary one, removed at the end)")
    args = parser.parse_args()
    variants = args.variants or [name for name in VARIANTS if name not in REPEATS]
    pairs = [(text.rsplit(":", 1)[0], int(text.rsplit(":", 1)[1])) for text in args.runs or ()]
    report = run_tasks(plan(args.quick, args.samples, variants, args.seeds, args.subjects, pairs), args.workers, args.machine, args.work,
                       on_row=lambda row: print(json.dumps(row), file=sys.stderr, flush=True))
    report["summary"] = summarise(report["runs"])
    print_tables(report, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
