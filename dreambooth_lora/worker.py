"""The background job runner: takes queued training jobs from the library database one at a time.

`serve` starts one `dreambooth-lora worker` child process; the web UI only writes rows (submit, cancel,
resume) and reads them back, so training survives closing the page. Several workers may share one library:
claiming a job is atomic (jobs.Jobs.claim_next), so each job runs once.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Callable

from .config import TrainConfig
from .images import expand_image_paths
from .jobs import Job, Jobs, Runner, run_job
from .library import Library

POLL_SECONDS = 1.0
SAMPLES_PER_JOB = 4  # intermediate samples shown while a job trains (every total_steps // 4)


def run_worker(
    library: Library,
    prior_dir: Path | None = None,
    poll_seconds: float = POLL_SECONDS,
    once: bool = False,
    stop: threading.Event | None = None,
    samples_per_job: int = SAMPLES_PER_JOB,
    on_progress: Callable | None = None,
    until_idle: bool = False,
) -> int:
    """Run queued jobs one at a time until stopped; `once`: at most one job; `until_idle`: until the queue is empty.

    `stop` (set by SIGTERM/SIGINT when this is the main thread) interrupts the running job at its next step,
    after a resumable checkpoint, and ends the loop. `on_progress(job_id, Progress)` sees each recorded report.
    """
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    jobs = Jobs(library)
    while not stop.is_set():
        jobs.reap()  # a job whose runner died (another worker, a CLI run) becomes resumable
        job = jobs.claim_next(Runner.this_process())
        if job is not None:
            run_job(jobs, job.id, prior_dir, observer=on_progress, stop=stop,
                    sample_every=_sample_every(job, samples_per_job))
        if once or (until_idle and job is None):
            break
        if job is None:
            stop.wait(poll_seconds)
    return 0


def _sample_every(job: Job, samples_per_job: int) -> int:
    """total_steps // samples_per_job, with the step count the trainer will resolve to."""
    if samples_per_job <= 0:
        return 0
    config = TrainConfig(**job.config)
    num_images = len(expand_image_paths([job.folder / "images"]))
    steps = config.resolved(num_images, config.base_model.startswith("builtin:"), 64).steps
    return steps // samples_per_job
