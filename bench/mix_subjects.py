#!/usr/bin/env python
"""Two subjects typed with the same identifier, mixed: does each keep its subject? (builtin:tiny-world, analyser)

Trains redyellow-ball and bluecyan-box with `--token sks` each and the product's defaults:
- "distinct": both in one library, as a person would; the second gets `sks2` (docs/DESIGN.md, "Identifiers");
- "shared": the box again in a library of its own, so it keeps `sks` (the situation before identifiers got a
  token of their own and a free name: both adapters answer to one identifier).
Then generates "a photo of <ball's identifier> ball" and "a photo of <box's identifier> box" with each adapter alone
and with both at 1.0 + 1.0, and reports the share of images the analyser judges to be each subject.

With --merges, the two distinct-identifier adapters are also saved as one adapter by each of cat, linear, svd, ties,
dare_linear and magnitude_prune (weights 1 + 1; density 0.5, DARE seed 0), and each merge is judged on both
subjects' prompts and on the plain class prompts (leak: "a photo of a ball" drawn as the ball subject).

    python bench/mix_subjects.py [--samples 32] [--merges] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from dreambooth_lora.quiet import quiet_libraries


def subject_share(session, prompt: str, subject: str, samples: int, seed: int) -> float:
    from dreambooth_lora.generate import GenerateSettings
    from dreambooth_lora.tinyworld import analyser

    images = session.generate(GenerateSettings(prompt=prompt, num_images=samples, seed=seed))
    return sum(analyser.is_subject(image, subject) for image in images) / samples


def train(library, subject: str, prior_dir: Path):
    from dreambooth_lora.config import TrainConfig
    from dreambooth_lora.jobs import create_job
    from dreambooth_lora.tinyworld import world
    from dreambooth_lora.train import run_training

    config = TrainConfig(token="sks", class_noun=world.SUBJECTS[subject].cls, base_model="builtin:tiny-world", name=subject)
    return run_training(library, create_job(library, config, world.subject_image_paths(subject)), prior_dir=prior_dir).adapter


MERGE_METHODS = {"cat": {}, "linear": {}, "svd": {}, "ties": {"density": 0.5}, "dare_linear": {"density": 0.5, "seed": 0},
                 "magnitude_prune": {"density": 0.5}}


def judge_merges(library, ball, box, session, args) -> list[dict]:
    """Each method's single adapter from ball + box at weight 1 each, judged on both subjects and both classes."""
    from dreambooth_lora.mixing import mix_adapters

    rows = []
    for method, options in MERGE_METHODS.items():
        entry, _ = mix_adapters(library, [(ball.name, 1.0), (box.name, 1.0)], f"merge-{method.replace('_', '-')}",
                                method=method, **options)
        session.apply([(entry, 1.0)])
        share = lambda prompt, subject: subject_share(session, prompt, subject, args.samples, args.seed)
        rows.append({"method": method, **options, "rank": entry.rank,
                     "ball_fidelity": share(f"a photo of {ball.token} ball", "redyellow-ball"),
                     "box_fidelity": share(f"a photo of {box.token} box", "bluecyan-box"),
                     "ball_leak": share("a photo of a ball", "redyellow-ball"),
                     "box_leak": share("a photo of a box", "bluecyan-box")})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="images per prompt (default 32)")
    parser.add_argument("--seed", type=int, default=10_000, help="first generation seed (default: the quality bench's)")
    parser.add_argument("--json", action="store_true", help="print only the JSON report on stdout (table to stderr)")
    parser.add_argument("--merges", action="store_true", help="also judge the two adapters merged by each mix method")
    args = parser.parse_args(argv)
    quiet_libraries()
    from dreambooth_lora.generate import AdapterSession
    from dreambooth_lora.library import Library
    from dreambooth_lora.models import load_base_model

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="dbl-mix-") as work:
        work = Path(work)
        together = Library(work / "together")
        ball = train(together, "redyellow-ball", work / "prior")
        box = train(together, "bluecyan-box", work / "prior")
        box_alone = train(Library(work / "apart"), "bluecyan-box", work / "prior")
        session = AdapterSession(load_base_model("builtin:tiny-world"))
        rows = []
        for case, box_entry in (("distinct", box), ("shared", box_alone)):
            prompts = {"redyellow-ball": f"a photo of {ball.token} ball", "bluecyan-box": f"a photo of {box_entry.token} box"}
            for mix, adapters in (("ball alone", [(ball, 1.0)]), ("box alone", [(box_entry, 1.0)]),
                                  ("both at 1.0", [(ball, 1.0), (box_entry, 1.0)])):
                session.apply(adapters)
                for subject, prompt in prompts.items():
                    if mix.startswith("ball") and subject != "redyellow-ball" or mix.startswith("box") and subject != "bluecyan-box":
                        continue
                    rows.append({"case": case, "identifiers": f"{ball.token}/{box_entry.token}", "adapters": mix,
                                 "prompt": prompt, "subject": subject,
                                 "share": subject_share(session, prompt, subject, args.samples, args.seed)})
        merges = judge_merges(together, ball, box, session, args) if args.merges else []
        session.clear()
    report = {"rows": rows, "merges": merges, "samples": args.samples, "seconds": round(time.time() - started, 1),
              "machine": f"{platform.machine()} {platform.processor() or ''} {__import__('os').cpu_count()} cores".strip()}
    out = sys.stderr if args.json else sys.stdout
    print(f"{'case':<10}{'identifiers':<14}{'adapters':<14}{'prompt':<26}{'subject share':>14}", file=out)
    for row in rows:
        print(f"{row['case']:<10}{row['identifiers']:<14}{row['adapters']:<14}{row['prompt']:<26}{row['share']:>14.3f}", file=out)
    if merges:
        print(f"\n{'method':<16}{'ball fidelity':>14}{'box fidelity':>14}{'ball leak':>11}{'box leak':>10}{'rank':>6}", file=out)
        for m in merges:
            print(f"{m['method']:<16}{m['ball_fidelity']:>14.3f}{m['box_fidelity']:>14.3f}{m['ball_leak']:>11.3f}"
                  f"{m['box_leak']:>10.3f}{m['rank']:>6}", file=out)
    print(f"{report['seconds']} s on {report['machine']}", file=out)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
