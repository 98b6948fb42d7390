#!/usr/bin/env python
"""The analyser's fidelity and leak at every meter point of the six λ = 1 default runs (each subject, seeds 0 and 1),
beside the meter's instance loss and prior drift: does any point-picking have room, and do the meter's signals track
fidelity? Also one run without the meter, to show that measuring changes nothing (bluecyan-box, seed 1).

A one-off analysis behind README "Options and the meter": the per-point adapter tensors are kept by turning
Meter.drop_tensors off in its worker processes, then each is stored as an adapter and scored.

    python bench/meter_points.py --work /tmp/meter-points > points.jsonl   # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

METER_EVERY = 50


def _setup():
    import torch

    from dreambooth_lora.quiet import quiet_libraries

    torch.set_num_threads(1)
    quiet_libraries()


def _train(work: Path, subject_name: str, seed: int, meter_every: int):
    from dreambooth_lora.bench.quality import MODEL, TOKEN
    from dreambooth_lora.config import TrainConfig
    from dreambooth_lora.jobs import Jobs, create_job
    from dreambooth_lora.library import Library
    from dreambooth_lora.tinyworld import world
    from dreambooth_lora.train import run_training

    library = Library(work / f"data-{subject_name}-{seed}-m{meter_every}")
    config = TrainConfig(token=TOKEN, class_noun=world.SUBJECTS[subject_name].cls, base_model=MODEL,
                         name=f"{subject_name}-{seed}", seed=seed, meter_every=meter_every)
    job = create_job(library, config, world.subject_image_paths(subject_name))
    return library, Jobs(library).folder(job), config, run_training(library, job, prior_dir=work / "prior")


def every_point(work: Path, subject_name: str, seed: int) -> dict:
    _setup()
    from dreambooth_lora import meter

    meter.Meter.drop_tensors = lambda self: None  # keep each point's tensors for scoring
    from dreambooth_lora.adapter_file import AdapterFile, store_adapter
    from dreambooth_lora.bench.quality import adapter_scores
    from dreambooth_lora.jobs import METER_CHECKPOINTS
    from dreambooth_lora.tinyworld import world

    library, folder, config, result = _train(work, subject_name, seed, METER_EVERY)
    points = []
    for point in result.meter:
        tensors = meter.Meter(METER_EVERY, 1.0, None, None, folder / "unused", folder / METER_CHECKPOINTS).tensors_at(point["step"])
        meta = {**result.adapter.meta, "name": f"{subject_name}-{seed}-step{point['step']}"}
        entry = store_adapter(library, AdapterFile.from_tensors(tensors, meta, config.lora_alpha))
        scores = adapter_scores(entry, subject_name, world.SUBJECTS[subject_name].cls, 32)
        points.append({**point, "fidelity": scores["subject_fidelity"], "leak": scores["prior_leak"],
                       "recontext": scores["recontext"]})
    return {"subject": subject_name, "seed": seed, "chosen_step": result.chosen_step,
            "final_loss": result.losses[-1], "points": points}


def without_meter(work: Path, subject_name: str, seed: int) -> dict:
    _setup()
    from dreambooth_lora.bench.quality import adapter_scores
    from dreambooth_lora.tinyworld import world

    _, _, _, result = _train(work, subject_name, seed, 0)
    scores = adapter_scores(result.adapter, subject_name, world.SUBJECTS[subject_name].cls, 32)
    return {"subject": subject_name, "seed": seed, "meter": False, "final_loss": result.losses[-1],
            "fidelity": scores["subject_fidelity"], "leak": scores["prior_leak"]}


def class_images(work: Path, cls: str) -> str:
    _setup()
    from dreambooth_lora.bench.quality import class_images_task

    return class_images_task(cls, work)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for the runs' libraries and class images")
    parser.add_argument("--workers", type=int, default=2, help="single-threaded worker processes (default 2)")
    args = parser.parse_args()
    from dreambooth_lora.tinyworld import world

    work, started = Path(args.work), time.time()
    pool = multiprocessing.get_context("spawn").Pool(args.workers)
    try:
        for cls in sorted({subject.cls for subject in world.SUBJECTS.values()}):
            pool.apply(class_images, (work, cls))
        jobs = [pool.apply_async(without_meter, (work, "bluecyan-box", 1))]
        jobs += [pool.apply_async(every_point, (work, s, seed)) for s in world.SUBJECTS for seed in (0, 1)]
        for job in jobs:
            print(json.dumps(job.get()), flush=True)
        pool.close()
    finally:
        pool.terminate()
        pool.join()
    print(json.dumps({"seconds": round(time.time() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
