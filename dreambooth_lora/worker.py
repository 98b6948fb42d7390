"""The background job runner: takes queued training jobs from the library database one at a time.

`serve` starts one `dreambooth-lora worker` child process; the web UI only writes rows (submit, cancel,
resume) and reads them back, so training survives closing the page. Several workers may share one library:
claiming a job is atomic (jobs.Jobs.claim_next), so each job runs once.

The worker trains each job in a child process of its own (`worker --job ID`): the idle worker may sleep
its OpenMP threads (serve starts it with OMP_WAIT_POLICY=PASSIVE) while the child trains with the default
policy, GPU memory is freed after every job, and a crash in training cannot take the worker down. The child
gets SIGTERM when the worker dies, so a killed worker's job stops with a checkpoint (interrupted).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from .config import uses_tiny_defaults
from .images import expand_image_paths
from .jobs import Job, Jobs, JobStatus, Runner, run_job
from .library import Library

POLL_SECONDS = 1.0
SAMPLES_PER_JOB = 4  # intermediate samples shown while a job trains (every total_steps // 4)
STOP_GRACE_SECONDS = 8.0  # a training child asked to stop is killed after this (its job then reads interrupted)


def run_worker(
    library: Library,
    prior_dir: Path | None = None,
    poll_seconds: float = POLL_SECONDS,
    once: bool = False,
    stop: threading.Event | None = None,
    samples_per_job: int = SAMPLES_PER_JOB,
    on_progress: Callable | None = None,
    until_idle: bool = False,
    isolate: bool = False,
) -> int:
    """Run queued jobs one at a time until stopped; `once`: at most one job; `until_idle`: until the queue is empty.

    `stop` (set by SIGTERM/SIGINT when this is the main thread) interrupts the running job at its next step,
    after a resumable checkpoint, and ends the loop. `on_progress(job_id, Progress)` sees each recorded report
    (in-process only). `isolate`: train each job in a child process (what the `worker` command does).
    """
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    jobs = Jobs(library)
    while not stop.is_set():
        jobs.reap()  # a job whose runner died (another worker, a CLI run) becomes resumable
        job = jobs.claim_next(Runner.this_process())
        if job is not None and isolate:
            run_in_child(library, job, prior_dir, stop)
        elif job is not None:
            run_job(jobs, job.id, prior_dir, observer=on_progress, stop=stop,
                    sample_every=sample_every_for(job, samples_per_job))
        if once or (until_idle and job is None):
            break
        if job is None:
            stop.wait(poll_seconds)
    return 0


def sample_every_for(job: Job, samples_per_job: int) -> int:
    """total_steps // samples_per_job, with the step count the trainer will resolve to."""
    if samples_per_job <= 0:
        return 0
    config = job.train_config()
    num_images = len(expand_image_paths([job.folder / "images"]))
    steps = config.resolved(num_images, uses_tiny_defaults(config.base_model), 64).steps
    return steps // samples_per_job


def run_in_child(library: Library, job: Job, prior_dir: Path | None, stop: threading.Event) -> int:
    """Train one claimed job in `dreambooth-lora worker --job ID`; forward a stop as SIGTERM; return its exit code."""
    command = [sys.executable, "-m", "dreambooth_lora.cli", "worker", "--job", job.id, "--data-root", str(library.root)]
    if prior_dir is not None:
        command += ["--prior-dir", str(prior_dir)]
    env = dict(os.environ)
    if env.get("DBL_PASSIVE_WAIT") == "1":  # set by the idle process itself: training gets the default policy
        env.pop("OMP_WAIT_POLICY", None)
        env.pop("DBL_PASSIVE_WAIT")
    child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                             preexec_fn=terminate_with_parent if sys.platform == "linux" else None)
    while child.poll() is None:
        if stop.wait(0.5):
            child.send_signal(signal.SIGTERM)  # it checkpoints and stops at its next step
            child.wait()
    if child.returncode != 0:
        Jobs(library).reap()  # a child that died mid-job (killed, out of memory) leaves it interrupted
    return child.returncode


def run_claimed_job(library: Library, job_id: str, prior_dir: Path | None) -> int:
    """`worker --job ID`: take over the job this process's parent worker claimed, and train it here."""
    jobs = Jobs(library)
    jobs.hand_over(job_id, os.getppid(), Runner.this_process())
    stop = threading.Event()

    def stop_soon(*_) -> None:
        # The training loop stops at its next step with a checkpoint; a phase that does not check (loading,
        # class images) would keep the job running long after its worker is gone, so give up within seconds.
        stop.set()
        deadline = threading.Timer(STOP_GRACE_SECONDS, lambda: os.kill(os.getpid(), signal.SIGKILL))
        deadline.daemon = True  # a child that stops in time exits normally
        deadline.start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_soon)
    job = run_job(jobs, job_id, prior_dir, stop=stop, sample_every=sample_every_for(jobs.get(job_id), SAMPLES_PER_JOB))
    if stop.is_set():
        jobs.log(job_id, "stopped on SIGTERM: its worker stopped or died (serve starts a new one)")
    return 0 if job.status in (JobStatus.DONE, JobStatus.CANCELLED, JobStatus.INTERRUPTED) else 1


def terminate_with_parent() -> None:
    """preexec_fn for child processes (the worker's training children, serve's worker)."""
    # Linux: when the parent dies (even by SIGKILL) the kernel sends this process SIGTERM.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
