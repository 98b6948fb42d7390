"""The job lifecycle and the worker: queue order, cancel, interrupt-then-resume, failures, runners that vanish,
and two worker processes sharing one queue."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from dreambooth_lora import jobs as jobs_module
from dreambooth_lora.config import TrainConfig
from dreambooth_lora.errors import UserError
from dreambooth_lora.jobs import Jobs, JobStatus, Runner
from dreambooth_lora.library import Library
from dreambooth_lora.tinyworld import subject_image_paths
from dreambooth_lora.worker import run_worker

IMAGES = subject_image_paths("bluecyan-box")[:3]


@pytest.fixture(scope="module")
def prior_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("prior")  # shared, so the class images are generated once


@pytest.fixture
def library(tmp_path):
    return Library(tmp_path / "data")


@pytest.fixture
def jobs(library):
    return Jobs(library)


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


def test_a_base_model_that_cannot_load_is_refused_at_submit(jobs, tmp_path):
    for name, words in (("builtin:nope", "Unknown built-in model 'builtin:nope'"),
                        (str(tmp_path / "missing-model"), "not in the Hugging Face cache"),
                        ("someone/not-cached", "Cannot load base model 'someone/not-cached' offline")):
        with pytest.raises(UserError, match=re.escape(words)):
            jobs.create(TrainConfig(token="sks", class_noun="box", base_model=name, name="refused", steps=2), IMAGES)
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(UserError, match="no model_index.json"):
        jobs.create(TrainConfig(token="sks", class_noun="box", base_model=str(tmp_path / "not-a-model"), steps=2), IMAGES)
    assert jobs.list() == []  # nothing was queued


def test_queued_jobs_run_one_at_a_time_in_order(library, jobs, prior_dir, tmp_path):
    first = jobs.create(config("first", 2), IMAGES)
    time.sleep(0.01)  # distinct creation times (the queue's order)
    # The second job fails fast: its base model folder is gone by the time it runs (a person's mistake, so no Resume).
    vanishing = tmp_path / "vanishing-model"
    vanishing.mkdir()
    (vanishing / "model_index.json").write_text("{}")
    second = jobs.create(TrainConfig(token="sks", class_noun="box", base_model=str(vanishing), name="second", steps=2,
                                     resolution=32),  # the photos are 32 px
                         IMAGES)
    shutil.rmtree(vanishing)
    assert jobs.get(first).status == jobs.get(second).status == JobStatus.QUEUED

    run_once(library, prior_dir)
    done = jobs.get(first)
    assert done.status == JobStatus.DONE and done.step == 2 and len(done.losses) == 2
    assert library.get(done.adapter_id).name == "first" == jobs.adapter_name(done)
    assert jobs.get(second).status == JobStatus.QUEUED  # one job per claim: the second waited

    run_once(library, prior_dir)
    failed = jobs.get(second)
    assert failed.status == JobStatus.FAILED and "Cannot load base model" in failed.error
    assert "\n" not in failed.error and "Traceback" in (failed.folder / "log.txt").read_text()
    assert not failed.resumable  # its own settings failed it: running it again cannot work
    with pytest.raises(UserError, match="fix them and start a new job"):
        jobs.resume(second)
    assert [e.name for e in library.list()] == ["first"]
    run_once(library, prior_dir)  # nothing queued: returns at once


def test_cancel_stops_the_job_and_saves_no_adapter(library, jobs, prior_dir):
    job_id = jobs.create(config("cancelled", 500), IMAGES)
    training = threading.Event()
    worker = threading.Thread(target=run_once, args=(library, prior_dir), kwargs={"on_progress": at_step(1, training)})
    worker.start()
    assert training.wait(120)
    assert jobs.cancel(job_id) == JobStatus.CANCELLING
    worker.join(60)
    job = jobs.get(job_id)
    assert job.status == JobStatus.CANCELLED and 1 <= job.step < 500
    assert library.list() == [] and not library.name_taken("cancelled")
    assert job.checkpoint.exists()  # kept, so it can be resumed
    assert not list((library.root / "adapters").glob(".staging-*"))

    queued = jobs.create(config("never-started", 2), IMAGES)
    assert jobs.cancel(queued) == JobStatus.CANCELLED
    run_once(library, prior_dir)
    assert jobs.get(queued).status == JobStatus.CANCELLED and library.list() == []
    jobs.delete(queued)
    assert not jobs.folder(queued).exists() and queued not in {j.id for j in jobs.list()}


def test_train_again_queues_the_same_settings_and_photos_under_a_free_name(library, jobs):
    first = jobs.create(config("again", 3, rank=4), IMAGES)
    with pytest.raises(UserError, match="once it has finished"):
        jobs.again(first)
    jobs.cancel(first)
    second = jobs.again(first)
    copy = jobs.get(second)
    assert copy.status == JobStatus.QUEUED and copy.name == "again-2"
    assert {**copy.config, "name": "again"} == jobs.get(first).config
    assert [p.read_bytes() for p in sorted((copy.folder / "images").iterdir())] == \
        [p.read_bytes() for p in sorted((jobs.folder(first) / "images").iterdir())]


def test_interrupted_job_resumes_from_its_checkpoint(library, jobs, prior_dir):
    job_id = jobs.create(config("resumed", 8, checkpoint_every=2), IMAGES)
    stop = threading.Event()  # what SIGTERM sets when the server shuts its worker down
    # Set from the worker's own progress report at step 3, so the stop lands mid-run on any machine.
    worker = threading.Thread(target=run_once, args=(library, prior_dir), kwargs={"stop": stop, "on_progress": at_step(3, stop)})
    worker.start()
    worker.join(120)
    stopped = jobs.get(job_id)
    assert stopped.status == JobStatus.INTERRUPTED and 3 <= stopped.step < 8
    losses_before = stopped.losses
    assert len(losses_before) == stopped.step

    # A crash: the job is running with a runner that no longer exists, and reads as interrupted.
    jobs.update(job_id, status=JobStatus.RUNNING, runner_host=jobs_module.HOST, runner_pid=_dead_pid(),
                heartbeat=time.time())
    assert jobs.get(job_id).status == JobStatus.INTERRUPTED

    assert "resumes from its checkpoint at step" in jobs.resume(job_id)
    assert jobs.get(job_id).status == JobStatus.QUEUED
    run_once(library, prior_dir)
    done = jobs.get(job_id)
    assert done.status == JobStatus.DONE and done.step == 8
    assert done.losses[: len(losses_before)] == losses_before  # continued, not restarted
    assert len(done.losses) == 8
    assert library.get("resumed").steps == 8


def test_a_live_runner_keeps_its_job_and_a_silent_one_loses_it(jobs):
    # `dreambooth-lora train` records itself as the runner; `serve` starting beside it must leave the job alone.
    live = jobs.create(config("live", 2), IMAGES, status=JobStatus.RUNNING)
    assert jobs.get(live).runner.pid == os.getpid()
    assert jobs.reap() == [] and jobs.get(live).status == JobStatus.RUNNING
    # A runner on another machine is judged by its heartbeat alone.
    far = jobs.create(config("far", 2), IMAGES)
    assert jobs.claim_next(Runner("another-host", 1, time.time(), time.time())).id == far
    assert jobs.get(far).status == JobStatus.RUNNING
    jobs.update(far, heartbeat=time.time() - jobs_module.STALE_SECONDS - 1)
    assert jobs.reap() == [far] and jobs.get(far).status == JobStatus.INTERRUPTED
    assert "another-host" in (jobs.folder(far) / "log.txt").read_text()
    assert jobs.get(live).status == JobStatus.RUNNING


def test_a_runner_whose_job_was_queued_again_elsewhere_stops_and_leaves_the_job_to_its_new_runner(library, jobs,
                                                                                                     prior_dir, monkeypatch):
    monkeypatch.setattr(jobs_module, "CANCEL_CHECK_INTERVAL", 0.0)  # the loop asks at every step, as cancel does
    job_id = jobs.create(config("fenced", 8, checkpoint_seconds=0), IMAGES)
    jobs.claim(job_id, Runner.this_process())
    elsewhere = Runner("another-host", 4242, time.time(), time.time(), node="other-node")

    def lost_at_step_2(_job_id, progress) -> None:
        # what the Ray dispatcher does when this runner's node is removed while the process lives on
        if progress.phase == "training" and progress.step == 2 and jobs.get(job_id).runner.host != "another-host":
            assert jobs.lost(job_id, "its node was removed") == JobStatus.INTERRUPTED
            jobs.requeue(job_id, 3)
            jobs.claim(job_id, elsewhere)

    returned = jobs_module.run_job(jobs, job_id, prior_dir, observer=lost_at_step_2)
    job = jobs.get(job_id)
    assert returned.status == job.status == JobStatus.RUNNING and job.runner.host == "another-host"
    assert job.phase == "preparing" and job.adapter_id is None and job.step <= 2  # as the claim left it
    assert library.list() == [] and not job.checkpoint.exists()  # stopped at once: no adapter, no checkpoint
    assert jobs.beat(job_id, elsewhere)  # still the new runner's
    assert "started on another-host" in jobs.read_log(job_id).splitlines()[-1]  # nothing logged after the claim


def test_a_crashing_job_records_its_error_and_the_queue_goes_on(library, jobs, prior_dir):
    lost = jobs.create(config("lost-images", 2), IMAGES)
    shutil.rmtree(jobs.folder(lost) / "images")
    later = jobs.create(config("later", 2), IMAGES)
    jobs.cancel(later)

    run_once(library, prior_dir)
    failed = jobs.get(lost)
    assert failed.status == JobStatus.FAILED and failed.error.startswith("FileNotFoundError")
    assert library.list() == []
    with pytest.raises(Exception, match="only queued or running"):
        jobs.cancel(lost)
    with pytest.raises(Exception, match="lost its photos"):
        jobs.resume(lost)  # resume is offered only where it can work
    assert "starts again from step 0" in jobs.resume(later)  # cancelled before it started: no checkpoint


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.slow
def test_two_worker_processes_run_each_of_six_jobs_exactly_once(library, jobs, prior_dir):
    queued = [jobs.create(config(f"job{i}", 2), IMAGES) for i in range(6)]
    command = [sys.executable, "-m", "dreambooth_lora.cli", "worker", "--until-idle",
               "--data-root", str(library.root), "--prior-dir", str(prior_dir)]
    workers = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    errors = [worker.communicate(timeout=600)[1].decode() for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], errors
    for job_id in queued:
        job = jobs.get(job_id)
        assert job.status == JobStatus.DONE, (job_id, job.error)
        assert (job.folder / "log.txt").read_text().count("started on") == 1  # claimed once, by one worker
    claimed_by = [{w.pid for w in workers if f"started on {jobs_module.HOST} pid {w.pid}\n" in (jobs.folder(j) / "log.txt").read_text()}
                  for j in queued]
    assert all(len(pids) == 1 for pids in claimed_by)  # each claimed by exactly one of the two workers
    assert sorted(e.name for e in library.list()) == [f"job{i}" for i in range(6)]


def test_a_data_root_from_before_the_jobs_module_is_converted(tmp_path):
    import json
    import sqlite3

    root = tmp_path / "old"
    root.mkdir()
    with sqlite3.connect(root / "library.db") as db:  # the schema the library had before jobs.py
        db.executescript("""
            CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, params TEXT NOT NULL, phase TEXT,
              step INTEGER DEFAULT 0, total INTEGER DEFAULT 0, losses TEXT DEFAULT '[]', message TEXT DEFAULT '',
              error TEXT, adapter_id TEXT, worker_pid INTEGER, heartbeat REAL, cancel_requested INTEGER DEFAULT 0,
              created REAL, updated REAL);""")
        config = TrainConfig(token="sks", class_noun="box", base_model="builtin:tiny-random", name="old").to_dict()
        for job_id, status in (("a", "done"), ("b", "running")):
            db.execute("INSERT INTO jobs (id, status, params, phase, step, total, losses, created, updated) "
                       "VALUES (?, ?, ?, ?, 3, 8, '[1.0, 0.5, 0.25]', 1.0, 2.0)",
                       (job_id, status, json.dumps({"config": config}), status))
    jobs = Jobs(Library(root))
    done, was_running = jobs.get("a"), jobs.get("b")
    assert done.status == JobStatus.DONE and done.config == json.loads(json.dumps(config))  # as stored: JSON lists
    assert done.train_config() == TrainConfig(**config) and done.losses == [1.0, 0.5, 0.25]
    assert was_running.status == JobStatus.INTERRUPTED and was_running.step == 3  # no runner survives an upgrade


def test_sample_settings_phases_and_photos_reach_the_job_and_the_adapter(library, jobs, prior_dir):
    """The studio's Advanced sample settings drive the samples drawn while training (one image per prompt at each
    sample step), the job records when each phase began, and the adapter keeps its photos and training time."""
    prompts = ("a photo of sks box", "a photo of sks box on a red background")
    job_id = jobs.create(config("sampled", 4, sample_every=2, sample_prompts=prompts), IMAGES)
    run_once(library, prior_dir)  # the worker's own default (samples_per_job=0 here) yields to the job's setting
    job = jobs.get(job_id)
    assert job.status == JobStatus.DONE
    assert sorted(p.name for p in (job.folder / "samples").iterdir()) == ["step-00002-1.png", "step-00002.png"]
    marks = jobs.phases(job_id)
    order = [m.phase for m in marks]
    assert order[0] == "preparing" and order[-1] == "done"
    assert {"class_images", "training", "saving", "samples"} <= set(order)
    assert jobs_module.steps_per_second(marks, marks[-1].started, job.step) > 0
    entry = library.get("sampled")
    assert [p.read_bytes() for p in entry.photos] == [p.read_bytes() for p in IMAGES]
    assert entry.meta["num_images"] == 3 and entry.meta["sample_prompts"] == list(prompts)
    assert 0 < entry.meta["training_seconds"] <= marks[-1].started - marks[0].started + 1
    assert "started on" in jobs.read_log(job_id) and jobs.read_log(job_id, max_lines=1).count("\n") == 0


def test_resume_says_it_restarts_from_the_last_checkpoint_when_the_job_got_further(library, jobs, prior_dir):
    job_id = jobs.create(config("killed", 6, checkpoint_every=2), IMAGES)
    stop = threading.Event()
    worker = threading.Thread(target=run_once, args=(library, prior_dir), kwargs={"stop": stop, "on_progress": at_step(3, stop)})
    worker.start()
    worker.join(120)
    stopped = jobs.get(job_id)
    # as after a kill -9: the job row had reached a later step than its last checkpoint
    jobs.update(job_id, step=stopped.step + 2)
    message = jobs.resume(job_id)
    assert message == (f"restarts from its last checkpoint at step {stopped.step} of 6 (it stopped at step "
                       f"{stopped.step + 2}; steps {stopped.step + 1}-{stopped.step + 2} are trained again)")
