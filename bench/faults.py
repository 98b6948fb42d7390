#!/usr/bin/env python
"""Crash safety: kill training with SIGKILL at random points of each phase, check the library, resume.

Each kill runs `dreambooth-lora train` on builtin:tiny-random in a child process. Most kills are injected
(`DBL_FAULT=<point>:<n>`, see dreambooth_lora/faults.py: the process kills itself with SIGKILL at the n-th
pass of a point, n drawn at random); `random` kills come from outside (`kill -9`) after a random delay. After
each kill it checks:
  - the job reads interrupted (its runner is gone), and the phase recorded at kill time is the one aimed at;
  - `PRAGMA integrity_check` of library.db is ok;
  - every listed adapter's file loads, and no staging or deleted folder is listed;
  - `train --resume` finishes; the job is done with exactly `steps` losses, whose first c equal the
    checkpoint's (c = the checkpoint's step: a continuous history), and at most one checkpoint interval lost.
Then two `dreambooth-lora worker --until-idle` processes share one queue of 6 jobs: each must run exactly once.

    python bench/faults.py                 # 5 kills per phase (about 5 minutes on 2 cores)
    python bench/faults.py --kills 1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth_lora.checkpoint import checkpoint_step  # noqa: E402
from dreambooth_lora.jobs import Jobs, JobStatus  # noqa: E402
from dreambooth_lora.library import Library  # noqa: E402
from dreambooth_lora.adapter_file import read_adapter  # noqa: E402

STEPS, EVERY, CLASS_IMAGES, RESOLUTION = 24, 5, 4, 32
PHASE_OF_POINT = {"class_images": {"class_images"}, "step": {"training"}, "checkpoint": {"checkpoint"},
                  "saving": {"saving"}, "random": None}


def write_photos(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(3):
        rng = np.random.default_rng(index)
        pixels = np.empty((64, 64, 3), dtype=np.uint8)
        pixels[:] = rng.integers(40, 220, 3, dtype=np.uint8)
        pixels[16:48, 8 + 4 * index: 40 + 4 * index] = (200, 40 + 30 * index, 30)
        paths.append(folder / f"photo{index}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "dreambooth_lora.cli", *map(str, args)]


def one_kill(point: str, index: int, work: Path, photos: list[Path], rng: random.Random) -> dict:
    data, prior = work / "data", work / f"prior-{point}-{index}"  # a fresh cache: class images are generated again
    name = f"{point}-{index}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    nth = {"class_images": rng.randint(1, CLASS_IMAGES), "step": rng.randint(1, STEPS),
           "checkpoint": rng.randint(1, (STEPS - 1) // EVERY + 1), "saving": rng.randint(1, 2), "random": 0}[point]
    if point != "random":
        env["DBL_FAULT"] = f"{point}:{nth}"
    train = cli("train", "--images", *photos, "--token", "sks", "--class-noun", "dog", "--name", name,
                "--base-model", "builtin:tiny-random", "--steps", STEPS, "--checkpoint-every", EVERY,
                "--num-class-images", CLASS_IMAGES, "--resolution", RESOLUTION, "--quiet",
                "--data-root", data, "--prior-dir", prior)
    process = subprocess.Popen(train, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work)
    if point == "random":
        delay = rng.uniform(1.0, 6.0)  # start-up takes ~2-4 s: some kills land before the job exists
        try:
            process.wait(delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
    out, err = process.communicate()
    row = {"point": point, "nth": nth, "returncode": process.returncode}
    jobs = Jobs(Library(data))
    job = next((j for j in jobs.list() if j.name == name), None)
    if job is None:  # a random kill that landed before the job was recorded: nothing to resume
        return {**row, "phase_at_kill": "before the job existed", "failures": check_library(data) if (data / "library.db").exists() else []}
    row.update(job=job.id, phase_at_kill=job.phase, step_at_kill=job.step)
    failures = []
    if process.returncode != -signal.SIGKILL:
        if point == "random" and process.returncode == 0:
            row["finished_before_kill"] = True  # the run outpaced the random delay: nothing to check but the end
        else:
            failures.append(f"not killed: exit {process.returncode}: {err.decode()[-300:]}")
    elif job.status != JobStatus.INTERRUPTED:
        failures.append(f"status after kill is {job.status}, not interrupted")
    if PHASE_OF_POINT[point] and process.returncode == -signal.SIGKILL and job.phase not in PHASE_OF_POINT[point]:
        failures.append(f"killed in phase {job.phase!r}, aimed at {point}")
    failures += check_library(data)
    resumed_from = checkpoint_step(job.checkpoint)
    row["checkpoint_step"] = resumed_from
    if not row.get("finished_before_kill"):
        losses_at_checkpoint = json.loads(_checkpoint_losses(job.checkpoint)) if resumed_from else []
        resume = subprocess.run(cli("train", "--resume", job.id, "--quiet", "--data-root", data, "--prior-dir", prior),
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, cwd=work)
        done = jobs.get(job.id)
        if resume.returncode != 0 or done.status != JobStatus.DONE:
            failures.append(f"resume: exit {resume.returncode}, status {done.status}: {resume.stderr.decode()[-300:]}")
        if len(done.losses) != STEPS:
            failures.append(f"{len(done.losses)} losses after resume, not {STEPS}")
        if done.losses[: len(losses_at_checkpoint)] != losses_at_checkpoint:
            failures.append("the loss history before the checkpoint changed on resume")
        # Steps completed when killed: exact for an injected mid-step kill, else the last recorded step.
        killed_at = nth - 1 if point == "step" else (job.step if job.phase in ("training", "checkpoint", "saving") else 0)
        lost = max(killed_at, resumed_from or 0) - (resumed_from or 0)
        row["steps_lost"] = lost
        if lost > EVERY:
            failures.append(f"{lost} steps lost, more than one checkpoint interval ({EVERY})")
        failures += check_library(data)
    if not any(e.name == name for e in Library(data).list()):
        failures.append(f"adapter {name} not in the library after resume")
    row["failures"] = failures
    return row


def _checkpoint_losses(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return handle.metadata()["losses"]


def check_library(data: Path) -> list[str]:
    failures = []
    with sqlite3.connect(data / "library.db") as db:
        result = db.execute("PRAGMA integrity_check").fetchone()[0]
    if result != "ok":
        failures.append(f"integrity_check: {result}")
    for entry in Library(data).list():
        if entry.folder.name.startswith("."):
            failures.append(f"listed adapter lives in {entry.folder.name}")
        try:
            tensors = read_adapter(entry.file).tensors
            if not tensors:
                failures.append(f"{entry.name}: empty adapter file")
        except Exception as error:  # noqa: BLE001 - any unreadable listed file is a failure to report
            failures.append(f"{entry.name}: {error}")
    return failures


def two_workers(work: Path, photos: list[Path]) -> dict:
    data, prior = work / "workers", work / "prior-workers"
    jobs = Jobs(Library(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    queued = []
    for index in range(6):
        submit = subprocess.run(cli("train", "--images", *photos, "--token", "sks", "--class-noun", "dog",
                                    "--name", f"queued-{index}", "--base-model", "builtin:tiny-random", "--steps", 4,
                                    "--num-class-images", 2, "--resolution", RESOLUTION, "--submit",
                                    "--data-root", data, "--prior-dir", prior), env=env, capture_output=True, check=True)
        queued.append(json.loads(submit.stdout)["job"])
    workers = [subprocess.Popen(cli("worker", "--until-idle", "--data-root", data, "--prior-dir", prior), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    for worker in workers:
        worker.wait()
    logs = {job_id: (jobs.folder(job_id) / "log.txt").read_text() for job_id in queued}
    runs = {job_id: log.count("started on") for job_id, log in logs.items()}  # one line per claim
    by_worker = {worker.pid: sum(f" pid {worker.pid}\n" in log for log in logs.values()) for worker in workers}
    return {"jobs": len(queued), "done": sum(jobs.get(j).status == JobStatus.DONE for j in queued),
            "runs_per_job": sorted(set(runs.values())), "jobs_per_worker": sorted(by_worker.values()),
            "adapters": len(Library(data).list())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5, help="kills per phase (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill points (default 0)")
    parser.add_argument("--json", action="store_true", help="print the JSON report alone on stdout (rows go to stderr)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dbl-faults-") as folder:
        work = Path(folder)
        photos = write_photos(work / "photos")
        for point in PHASE_OF_POINT:
            for index in range(args.kills):
                rows.append(one_kill(point, index, work, photos, rng))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        workers = two_workers(work, photos)
    summary = {point: {"kills": sum(r["returncode"] == -signal.SIGKILL for r in rows if r["point"] == point),
                       "phases": sorted({r["phase_at_kill"] for r in rows if r["point"] == point}),
                       "failures": sum(len(r["failures"]) for r in rows if r["point"] == point)}
               for point in PHASE_OF_POINT}
    report = {"kills_per_phase": summary, "failures": sum(len(r["failures"]) for r in rows),
              "two_workers": workers, "seconds": round(time.time() - started, 1), "rows": rows}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for point, figures in summary.items():
            print(f"{point:<13} kills {figures['kills']:>2}  phases at kill {figures['phases']}  failures {figures['failures']}")
        print(f"two workers, {workers['jobs']} jobs: {workers['done']} done, runs per job {workers['runs_per_job']}, "
              f"jobs per worker {workers['jobs_per_worker']}, adapters {workers['adapters']}")
        print(f"total failures {report['failures']} in {report['seconds']} s")
    ok = report["failures"] == 0 and workers["runs_per_job"] == [1] and workers["done"] == workers["jobs"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
