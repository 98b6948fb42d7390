#!/usr/bin/env python
"""What a run's misses look like: train chosen λ = 1 runs on builtin:tiny-world with the product's defaults (or a row
of bench/options.py), generate the quality bench's prompts (its seeds and counts: 32 images each, 128 of the plain
class prompt) at one or more guidance scales, and group the images the analyser does not read as the subject by what
it read instead (class, pattern, colours, background). Behind README "Quality": why the box misses at seeds 2 and 3.

    python bench/misses.py --runs bluecyan-box:2 bluecyan-box:3                  # the defaults, guidance 5
    python bench/misses.py --runs bluecyan-box:3 --guidance 2 3 5 7.5            # the same adapter at several scales
    python bench/misses.py --runs bluecyan-box:2 --leave-out 1                   # without the subject's photo 1
    python bench/misses.py --runs bluecyan-box:2 --variant token-lr-1e-2 --json  # a row of bench/options.py
    python bench/misses.py --runs pinkred-ring:5 --samples 128                   # leak judged on 512 class images

Each run trains on its own single-threaded worker process (--workers, default 2), as the quality bench does.
Give each call a new --work folder (or none): a run's library there keeps its adapter's name taken, so a run already
trained in the folder is refused.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from dreambooth_lora.bench.options import VARIANTS


def misses_of(scores: dict) -> list[dict]:
    """The analyser's readings of the images that are not the subject, grouped and counted, most common first."""
    counts = Counter((r.cls, r.pattern, "+".join(r.colours), r.background)
                     for r, hit in zip(scores["readings"], scores["hits"]) if not hit)
    return [{"class": c, "pattern": p, "colours": colours, "background": b, "images": n}
            for (c, p, colours, b), n in counts.most_common()]


def one_run(run, variant: str, leave_out: list[int], guidances: list[float], samples: int, work: str) -> dict:
    from dataclasses import replace

    from dreambooth_lora.bench.quality import evaluate, train_run
    from dreambooth_lora.generate import AdapterSession
    from dreambooth_lora.models import load_base_model
    from dreambooth_lora.tinyworld import world

    subject, seed = run.subject, run.seed
    photos = [p for i, p in enumerate(world.subject_image_paths(subject)) if i not in leave_out]
    result, seconds = train_run(run, replace(VARIANTS[variant], samples=samples), Path(work), photos)
    session = AdapterSession(load_base_model(result.adapter.base_model))
    session.apply([(result.adapter, 1.0)], fuse=True)
    cls = world.SUBJECTS[subject].cls
    rows = []
    for guidance in guidances:
        scores = evaluate(session, subject, cls, samples, guidance)
        rows.append({"guidance": guidance, "fidelity": scores["instance"]["subject"], "leak": scores["class"]["subject"],
                     "recontext": scores["recontext"]["background"], "recontext_subject": scores["recontext"]["subject"],
                     "misses": misses_of(scores["instance"]),
                     "recontext_backgrounds": dict(Counter(r.background for r in scores["recontext"]["readings"]).most_common())})
    return {"subject": subject, "seed": seed, "variant": variant, "photos": [p.name for p in photos],
            "train_seconds": round(seconds, 1), "by_guidance": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, metavar="SUBJECT:SEED", help="e.g. bluecyan-box:2 redyellow-ball:3")
    parser.add_argument("--variant", default="defaults", choices=sorted(VARIANTS), help="a row of bench/options.py (default: the defaults)")
    parser.add_argument("--guidance", nargs="+", type=float, default=[5.0], help="guidance scales to generate at (default 5, the product's)")
    parser.add_argument("--leave-out", nargs="*", type=int, default=[], metavar="INDEX",
                        help="train without these of the subject's shipped photos (0-based, as named in the subject's folder)")
    parser.add_argument("--samples", type=int, default=32, help="images per prompt (default 32)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="single-threaded worker processes")
    parser.add_argument("--work", default=None, help="folder for the runs' libraries and class images (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run on stdout (the table goes to stderr)")
    args = parser.parse_args()
    pairs = []
    for text in args.runs:
        subject, _, seed = text.rpartition(":")
        if not subject or not seed.isdigit():
            parser.error(f"--runs {text!r}: write SUBJECT:SEED, e.g. bluecyan-box:2")
        pairs.append((subject, int(seed)))
    work = args.work or tempfile.mkdtemp(prefix="dbl-misses-")
    started = time.time()
    from dreambooth_lora.bench.quality import Run, run_library, start_class_images, start_worker
    from dreambooth_lora.tinyworld import world

    unknown = sorted({s for s, _ in pairs} - set(world.SUBJECTS))
    if unknown:
        parser.error(f"unknown subject(s) {unknown}; choose from {sorted(world.SUBJECTS)}")
    runs = [Run(s, 1.0, seed, "none", args.variant + "".join(f"-no{i}" for i in args.leave_out)) for s, seed in pairs]
    taken = [run.name for run in runs if run_library(work, run).exists()]
    if taken:  # its library keeps the adapter's name, so training it again there would fail
        parser.error(f"--work {work} already holds run(s) {', '.join(taken)}: give each call a new --work folder")
    # the quality bench's workers (one thread each), so a run here is the bench's run bit for bit
    with multiprocessing.get_context("spawn").Pool(args.workers, initializer=start_worker) as pool:
        for job in start_class_images(pool, [(run, VARIANTS[args.variant]) for run in runs], Path(work)):
            job.get()
        jobs = [pool.apply_async(one_run, (run, args.variant, args.leave_out, args.guidance, args.samples, work))
                for run in runs]
        reports = [job.get() for job in jobs]
    table = sys.stderr if args.json else sys.stdout
    for report in reports:
        for row in report["by_guidance"]:
            missed = ", ".join(f"{m['images']}× {m['class']} {m['pattern']} {m['colours']} on {m['background']}" for m in row["misses"])
            print(f"{report['subject']} seed {report['seed']} ({report['variant']}, photos {' '.join(report['photos'])}), "
                  f"guidance {row['guidance']:g}: fidelity {row['fidelity']:.3f}, leak {row['leak']:.3f}, recontext "
                  f"{row['recontext']:.3f} / subject {row['recontext_subject']:.3f} (backgrounds {row['recontext_backgrounds']}); "
                  f"misses: {missed or 'none'}", file=table)
        if args.json:
            print(json.dumps(report))
    print(f"{len(reports)} trainings on {args.workers} workers in {time.time() - started:.0f} s", file=table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
