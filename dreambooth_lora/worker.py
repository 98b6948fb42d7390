"""The background job runner: takes queued training jobs from library.db one at a time.

`serve` starts one `dreambooth-lora worker` child process; the web UI only writes rows
(submit, cancel, resume) and reads them back, so training survives closing the page.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from .config import TrainConfig
from .errors import UserError
from .images import expand_image_paths
from .library import Library
from .train import Progress, TrainingStopped, create_job, run_training

POLL_SECONDS = 1.0
WRITE_INTERVAL = 0.5  # at most ~2 progress writes a second: SQLite is shared with the UI
CANCEL_CHECK_INTERVAL = 0.5
SAMPLES_PER_JOB = 4  # intermediate samples shown while a job trains (every total_steps // 4)
RESUMABLE = ("interrupted", "cancelled", "failed")


# ----- what the UI (or anyone) calls: rows in the jobs table -----
def submit_job(library: Library, config: TrainConfig, image_paths: list) -> str:
    """Validate the images and name, copy the photos, and queue the job for the worker."""
    return create_job(library, config, image_paths, status="queued")


def cancel_job(library: Library, job_id: str) -> str:
    """Ask for a job to stop: a queued one is cancelled at once, a running one at its next step."""
    job = library.job(job_id)
    if job["status"] not in ("queued", "running"):
        raise UserError(f"Job {job_id} is {job['status']}; only queued or running jobs can be cancelled.")
    # The flag goes first: a worker that claims the job a moment later still sees it and stops.
    library.update_job(job_id, cancel_requested=1, message="cancel requested; stopping at the next step")
    if library.job(job_id)["status"] == "queued":
        library.update_job(job_id, status="cancelled", phase="cancelled", message="cancelled before it started")
        return "cancelled"
    return "cancelling"


def resume_job(library: Library, job_id: str) -> str:
    """Queue an interrupted, cancelled or failed job again; it continues from its last checkpoint."""
    job = library.job(job_id)
    if job["status"] not in RESUMABLE:
        raise UserError(f"Job {job_id} is {job['status']}; only interrupted, cancelled or failed jobs can be resumed.")
    has_checkpoint = (library.job_folder(job_id) / "checkpoint.safetensors").exists()
    library.update_job(
        job_id, status="queued", phase="queued", cancel_requested=0, error=None, worker_pid=None,
        message=f"resuming from step {job['step']}" if has_checkpoint else "no checkpoint: starting from step 0",
    )
    return "queued"


def mark_orphaned_jobs(library: Library) -> list[str]:
    """Running jobs whose worker process is gone become 'interrupted' (resumable); returns their ids."""
    orphaned = []
    for job in library.jobs(("running",)):
        if not pid_alive(job["worker_pid"]):
            library.update_job(job["id"], status="interrupted", phase="interrupted",
                               message="the worker stopped (server restart); resume to continue from the last checkpoint")
            orphaned.append(job["id"])
    return orphaned


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# ----- the worker loop -----
def run_worker(
    library: Library,
    prior_dir: Path | None = None,
    poll_seconds: float = POLL_SECONDS,
    once: bool = False,
    stop: threading.Event | None = None,
    samples_per_job: int = SAMPLES_PER_JOB,
    on_progress=None,
) -> int:
    """Run queued jobs one at a time until stopped; with once=True run at most one job and return.

    `stop` (set by SIGTERM/SIGINT when this is the main thread) interrupts the running job at
    its next step, after a resumable checkpoint, and ends the loop. `on_progress(job_id, Progress)` is
    called after each report is recorded (tests synchronise on it).
    """
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    pid = os.getpid()
    while not stop.is_set():
        job = library.claim_next_job(pid)
        if job is not None:
            run_job(library, job, prior_dir, stop, samples_per_job, on_progress)
        if once:
            break
        if job is None:
            stop.wait(poll_seconds)
    return 0


def run_job(library: Library, job: dict, prior_dir, stop: threading.Event, samples_per_job: int,
            on_progress=None) -> str:
    """Train one claimed job, recording progress, and leave it done, cancelled, interrupted or failed."""
    job_id = job["id"]
    if job["cancel_requested"]:  # cancelled while this worker was claiming it
        library.update_job(job_id, status="cancelled", phase="cancelled", message="cancelled before it started")
        return "cancelled"
    reporter = _ProgressWriter(library, job_id, on_progress)
    try:
        result = run_training(
            library, job_id, prior_dir, on_progress=reporter, should_stop=reporter.stop_check(stop),
            sample_every=_sample_every(library, job, samples_per_job),
        )
    except TrainingStopped as stopped:
        status = "cancelled" if reporter.cancel_seen else "interrupted"
        library.update_job(job_id, status=status, phase=status, step=stopped.step, losses=reporter.losses,
                           message=f"{status} at step {stopped.step}; the checkpoint is kept, so it can be resumed")
        return status
    except Exception as error:  # noqa: BLE001 - any failure (bad input, out of memory) is recorded for the UI
        library.update_job(job_id, status="failed", phase="failed", error=_one_line(error), losses=reporter.losses)
        return "failed"
    library.update_job(job_id, status="done", phase="done", step=len(result.losses), losses=result.losses,
                       adapter_id=result.adapter.id, message=f"saved adapter {result.adapter.name}",
                       heartbeat=time.time())
    return "done"


def _sample_every(library: Library, job: dict, samples_per_job: int) -> int:
    """total_steps // samples_per_job, with the step count the trainer will resolve to."""
    if samples_per_job <= 0:
        return 0
    config = TrainConfig(**job["params"]["config"])
    num_images = len(expand_image_paths([library.job_folder(job["id"]) / "images"]))
    steps = config.resolved(num_images, config.base_model.startswith("builtin:"), 64).steps
    return steps // samples_per_job


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, UserError):
        text = f"{type(error).__name__}: {text}"
    return text[:500]


class _ProgressWriter:
    """on_progress for run_training: throttled writes of phase/step/losses and the heartbeat."""

    def __init__(self, library: Library, job_id: str, observer=None):
        self.library, self.job_id, self.observer = library, job_id, observer
        self.losses: list[float] = list(library.job(job_id)["losses"])
        self.last_write, self.last_phase, self.last_check = 0.0, None, 0.0
        self.cancel_seen = False

    def __call__(self, progress: Progress) -> None:
        self._record(progress)
        if self.observer is not None:
            self.observer(self.job_id, progress)

    def _record(self, progress: Progress) -> None:
        if progress.phase == "training" and progress.sample is None:
            if progress.message.startswith("resumed"):
                self.losses = self.losses[: progress.step]  # the checkpoint's step is the truth
            elif progress.loss is not None and progress.step > 0:
                self.losses[progress.step - 1 :] = [progress.loss]
        now = time.time()
        urgent = progress.phase != self.last_phase or progress.message or progress.sample is not None
        if not urgent and now - self.last_write < WRITE_INTERVAL and progress.step != progress.total:
            return
        fields = dict(phase=progress.phase, step=progress.step, total=progress.total, heartbeat=now)
        if progress.phase == "training":
            fields["losses"] = self.losses
        if progress.message:
            fields["message"] = progress.message
        self.library.update_job(self.job_id, **fields)
        self.last_write, self.last_phase = now, progress.phase

    def stop_check(self, stop: threading.Event):
        def should_stop() -> bool:
            if stop.is_set():
                return True
            now = time.time()
            if now - self.last_check >= CANCEL_CHECK_INTERVAL:
                self.last_check = now
                self.cancel_seen = bool(self.library.job(self.job_id)["cancel_requested"])
            return self.cancel_seen

        return should_stop
