"""The job worker, driven in-process: queue order, cancel, interrupt-then-resume, failures."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import pytest

from dreambooth_lora.config import TrainConfig
from dreambooth_lora.library import Library
from dreambooth_lora.tinyworld import subject_image_paths
from dreambooth_lora.worker import cancel_job, mark_orphaned_jobs, resume_job, run_worker, submit_job

IMAGES = subject_image_paths("bluecyan-box")[:3]


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("prior")  # shared, so the class images are generated once


@pytest.fixture
def library(tmp_path):
    return Library(tmp_path / "data")


def config(name: str, steps: int, **overrides) -> TrainConfig:
    return TrainConfig(token="sks", class_noun="box", base_model="builtin:tiny-random", name=name,
                       steps=steps, num_class_images=1, **overrides)


def run_once(library, prior_dir, **kwargs) -> None:
    run_worker(library, prior_dir, once=True, samples_per_job=0, **kwargs)


def at_step(step: int, event: threading.Event):
    """An on_progress observer that sets `event` once training reaches `step` (recorded in the database)."""

    def observe(job_id, progress) -> None:
        if progress.phase == "training" and progress.step >= step:
            event.set()

    return observe


def test_queued_jobs_run_one_at_a_time_in_order(library, prior_dir):
    first = submit_job(library, config("first", 2), IMAGES)
    time.sleep(0.01)
    # The second job fails fast (unknown model), so the order is visible without a second full run.
    second = submit_job(library, TrainConfig(token="sks", class_noun="box", base_model="builtin:nope",
                                             name="second", steps=2), IMAGES)
    assert library.job(first)["status"] == library.job(second)["status"] == "queued"

    run_once(library, prior_dir)
    done = library.job(first)
    assert done["status"] == "done" and done["step"] == 2 and len(done["losses"]) == 2
    assert library.get(done["adapter_id"]).name == "first"
    assert library.job(second)["status"] == "queued"  # one job per claim: the second waited

    run_once(library, prior_dir)
    failed = library.job(second)
    assert failed["status"] == "failed" and "Unknown built-in model 'builtin:nope'" in failed["error"]
    assert "\n" not in failed["error"]
    assert [e.name for e in library.list()] == ["first"]
    run_once(library, prior_dir)  # nothing queued: returns at once


def test_cancel_stops_the_job_and_saves_no_adapter(library, prior_dir):
    job_id = submit_job(library, config("cancelled", 500), IMAGES)
    training = threading.Event()
    worker = threading.Thread(target=run_once, args=(library, prior_dir), kwargs={"on_progress": at_step(1, training)})
    worker.start()
    assert training.wait(120)
    assert cancel_job(library, job_id) == "cancelling"
    worker.join(60)
    job = library.job(job_id)
    assert job["status"] == "cancelled" and 1 <= job["step"] < 500
    assert library.list() == [] and not library.name_taken("cancelled")
    assert (library.job_folder(job_id) / "checkpoint.safetensors").exists()  # kept, so it can be resumed
    assert not list((library.root / "adapters").glob(".staging-*"))

    queued = submit_job(library, config("never-started", 2), IMAGES)
    assert cancel_job(library, queued) == "cancelled"
    run_once(library, prior_dir)
    assert library.job(queued)["status"] == "cancelled" and library.list() == []


def test_interrupted_job_resumes_from_its_checkpoint(library, prior_dir):
    job_id = submit_job(library, config("resumed", 8), IMAGES)
    stop = threading.Event()  # what SIGTERM sets when the server shuts its worker down
    # Set from the worker's own progress report at step 3, so the stop lands mid-run on any machine.
    worker = threading.Thread(target=run_once, args=(library, prior_dir), kwargs={"stop": stop, "on_progress": at_step(3, stop)})
    worker.start()
    worker.join(120)
    stopped = library.job(job_id)
    assert stopped["status"] == "interrupted" and 3 <= stopped["step"] < 8
    losses_before = stopped["losses"]
    assert len(losses_before) == stopped["step"]

    # A restart: the worker process is gone, and serve marks its running job interrupted.
    library.update_job(job_id, status="running", worker_pid=_dead_pid())
    assert mark_orphaned_jobs(library) == [job_id]
    assert library.job(job_id)["status"] == "interrupted"

    assert resume_job(library, job_id) == "queued"
    run_once(library, prior_dir)
    done = library.job(job_id)
    assert done["status"] == "done" and done["step"] == 8
    assert done["losses"][: len(losses_before)] == losses_before  # continued, not restarted
    assert len(done["losses"]) == 8
    assert library.get("resumed").steps == 8


def test_a_crashing_job_records_its_error_and_the_queue_goes_on(library, prior_dir):
    lost = submit_job(library, config("lost-images", 2), IMAGES)
    shutil.rmtree(library.job_folder(lost) / "images")
    later = submit_job(library, config("later", 2), IMAGES)
    cancel_job(library, later)

    run_once(library, prior_dir)
    failed = library.job(lost)
    assert failed["status"] == "failed" and failed["error"].startswith("FileNotFoundError")
    assert library.list() == []
    with pytest.raises(Exception, match="only queued or running"):
        cancel_job(library, lost)
    assert resume_job(library, lost) == "queued"  # a failed job can be tried again


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
