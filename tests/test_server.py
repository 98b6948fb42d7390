"""`serve` as a process: it leaves a live CLI training alone and keeps its worker alive through a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from live import wait_until

from dreambooth_lora.jobs import Jobs, JobStatus
from dreambooth_lora.library import Library
from dreambooth_lora.tinyworld import subject_image_paths

pytestmark = pytest.mark.slow
IMAGES = [str(p) for p in subject_image_paths("bluecyan-box")[:3]]
REPO = Path(__file__).parents[1]


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "dreambooth_lora.cli", *map(str, args)]


@pytest.fixture
def dirs(tmp_path):
    return ["--data-root", tmp_path / "data", "--prior-dir", tmp_path / "prior"]


def start_serve(tmp_path, dirs):
    log = open(tmp_path / "serve.log", "wb")
    port = 17000 + os.getpid() % 1000
    process = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), *map(str, dirs)], cwd=REPO,
                               stdout=log, stderr=subprocess.STDOUT)
    return process, log


def stop(process) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


def training(jobs: Jobs, job_id: str):
    job = jobs.get(job_id)
    return job if job.status == JobStatus.RUNNING and job.phase == "training" and job.step >= 1 else None


def test_serve_leaves_a_live_cli_training_running(tmp_path, dirs):
    # SIGINT at its default, as in a terminal where a person presses Ctrl-C: a test run started in the background of a
    # non-interactive shell (`... &`) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    train = subprocess.Popen(cli("train", "--images", *IMAGES, "--token", "sks", "--class-noun", "box", "--quiet",
                                 "--base-model", "builtin:tiny-random", "--steps", 100_000, "--num-class-images", 1, *dirs),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    jobs = Jobs(Library(tmp_path / "data"))
    try:
        job_id = wait_until(lambda: [j.id for j in jobs.list()], 120, "the CLI job exists")[0]
        wait_until(lambda: training(jobs, job_id), 120, "the CLI job trains")
        serve, log = start_serve(tmp_path, dirs)
        try:
            wait_until(lambda: (tmp_path / "data" / "worker.log").exists(), 120, "serve started its worker")
            assert jobs.get(job_id).status == JobStatus.RUNNING and jobs.get(job_id).runner.pid == train.pid
            assert "marked interrupted" not in (tmp_path / "serve.log").read_text()
        finally:
            stop(serve)
            log.close()
        assert jobs.get(job_id).status == JobStatus.RUNNING  # and still after serve went away
    finally:
        train.send_signal(signal.SIGINT)  # Ctrl-C: checkpoint and stop
        train.wait(120)
    assert jobs.get(job_id).status == JobStatus.INTERRUPTED


def test_a_killed_worker_is_noticed_its_job_interrupted_and_the_queue_goes_on(tmp_path, dirs):
    submit = lambda name, steps: json.loads(subprocess.run(
        cli("train", "--images", *IMAGES, "--token", "sks", "--class-noun", "box", "--name", name, "--submit",
            "--base-model", "builtin:tiny-random", "--steps", steps, "--num-class-images", 1, *dirs),
        capture_output=True, check=True).stdout)["job"]
    long_job, next_job = submit("long", 100_000), submit("next", 2)
    jobs = Jobs(Library(tmp_path / "data"))
    serve, log = start_serve(tmp_path, dirs)
    try:
        running = wait_until(lambda: training(jobs, long_job), 180, "the worker trains the first job")
        worker_pid = int(Path(f"/proc/{running.runner.pid}/stat").read_text().split(") ")[1].split()[1])  # its ppid
        os.kill(worker_pid, signal.SIGKILL)
        killed = time.time()
        wait_until(lambda: jobs.get(long_job).status == JobStatus.INTERRUPTED, 10, "the job reads interrupted")
        assert time.time() - killed <= 10
        wait_until(lambda: jobs.get(next_job).status == JobStatus.DONE, 180, "a new worker runs the next job")
        assert f"worker pid {worker_pid} exited with code -9" in (tmp_path / "data" / "worker.log").read_text()
        assert "stopped on SIGTERM: its worker stopped or died" in (jobs.folder(long_job) / "log.txt").read_text()
        assert jobs.resume(long_job).startswith("resumes from its checkpoint")
    finally:
        stop(serve)
        log.close()
