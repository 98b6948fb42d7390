"""Training jobs: the record, its status and its whole life (create, claim, run, cancel, resume, delete).

The CLI's `train` and the worker both run a job through `run_job`. A running job records its runner (host,
pid, start time, and a heartbeat written by a thread every HEARTBEAT_SECONDS); a running job whose runner is
gone (its pid is dead on this host, or its heartbeat is older than STALE_SECONDS) reads as interrupted, so it
can be resumed and is never trained by two processes at once. docs/DESIGN.md, "Jobs", has the rules.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Callable

from sqlalchemy import and_, delete, func, insert, select, update

from .config import TrainConfig, uses_tiny_defaults
from .db import jobs as jobs_table
from .db import same
from .errors import UserError
from .images import check_subject_photos, expand_image_paths
from .library import Library, new_id
from .paths import atomic_write_bytes

# The model, identifier and checkpoint modules are imported where a job needs them: they pull in torch, diffusers
# and transformers (about 6 s on this project's 2-core CPU machine), which `jobs list`, `jobs show` and the UI's job
# table never need.

HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 60.0
WRITE_INTERVAL = 0.5  # at most ~2 progress writes a second: the database is shared with the UI
CANCEL_CHECK_INTERVAL = 0.5
HOST = socket.gethostname()
CHECKPOINT_FILE = "checkpoint.safetensors"
METER_FILE = "meter.json"  # the meter's points and chosen step (dreambooth_lora/meter.py writes it)
METER_CHECKPOINTS = "meter"  # the adapter tensors at each meter point, until the adapter is saved
LOG_FILE = "log.txt"
# Settings added after jobs were first recorded, with what a record made before them trained with: such a job (a
# queued one, or one resumed from its checkpoint) keeps its recipe instead of taking the defaults of today
RECORDED_BEFORE = {"unet_layers": "attention", "caption_dropout": 0.0}
PHASES_FILE = "phases.json"  # when each phase of each run began: the studio's monitor and the adapter's training time
STORE_REFRESH_SECONDS = 5.0  # a job's log and phases come from the store at most this often (the studio asks each tick)
_refreshed: dict[Path, float] = {}  # each log and phases file: when (time.monotonic) this process last checked it
_refreshed_lock = threading.Lock()


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"  # running, asked to stop; becomes cancelled at its next step
    INTERRUPTED = "interrupted"  # stopped with a checkpoint (or its runner vanished): resumable
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RunnerLost(Exception):
    """The job is no longer this process's: it was given up on (its Ray node lost, its heartbeat stale) and may
    be running elsewhere. Raised at the runner's next progress report or cancel check, so it stops writing: no
    checkpoint, no row (the new runner's), no log line."""


class ErrorKind(StrEnum):
    """Why a job failed: a person's mistake in its settings (running it again fails the same way) or anything else."""

    USER = "user"
    CRASH = "crash"


ACTIVE = (JobStatus.RUNNING, JobStatus.CANCELLING)
RESUMABLE = (JobStatus.INTERRUPTED, JobStatus.CANCELLED, JobStatus.FAILED)
FINISHED = (JobStatus.DONE, *RESUMABLE)


@dataclass(frozen=True)
class Runner:
    """The process training a job."""

    host: str
    pid: int
    started: float
    heartbeat: float
    node: str | None = None  # the Ray node it runs on (worker --engine ray), else None

    @classmethod
    def this_process(cls, node: str | None = None) -> "Runner":
        now = time.time()
        return cls(HOST, os.getpid(), now, now, node)

    def gone(self, now: float | None = None) -> bool:
        if self.host == HOST and not pid_alive(self.pid):
            return True
        return (now or time.time()) - self.heartbeat > STALE_SECONDS


@dataclass(frozen=True)
class Job:
    id: str
    status: JobStatus
    config: dict
    phase: str
    step: int
    total: int
    losses: list
    message: str
    error: str | None
    error_kind: ErrorKind | None
    adapter_id: str | None
    runner: Runner | None
    cancel_requested: bool
    created: float
    updated: float
    folder: Path
    requeues: int = 0  # times the Ray dispatcher queued it again after its node was lost (ray_dispatch.py)
    owner: str | None = None  # the user it belongs to (None: no one in particular); its adapter gets the same

    @property
    def name(self) -> str:
        return self.config.get("name", "")

    @property
    def resumable(self) -> bool:
        """Whether running it again can succeed: not for a failure caused by its own settings."""
        return self.status in RESUMABLE and not (self.status == JobStatus.FAILED and self.error_kind == ErrorKind.USER)

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT_FILE

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{**RECORDED_BEFORE, **self.config})

    @property
    def meter_record(self) -> dict:
        """The meter's points and chosen step ({} when the meter was off or has not measured yet)."""
        path = self.folder / METER_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def to_dict(self, adapter_name: str | None = None) -> dict:
        """The JSON of `jobs show --json`; `adapter` is the adapter's current name (None until saved)."""
        runner = None if self.runner is None else {"host": self.runner.host, "pid": self.runner.pid, "node": self.runner.node,
                                                   "started": self.runner.started, "heartbeat": self.runner.heartbeat}
        meter = self.meter_record
        return {"id": self.id, "status": str(self.status), "phase": self.phase, "step": self.step, "total": self.total,
                "losses": self.losses, "message": self.message, "error": self.error,
                "error_kind": self.error_kind and str(self.error_kind), "resumable": self.resumable, "adapter": adapter_name,
                "adapter_id": self.adapter_id, "runner": runner, "cancel_requested": self.cancel_requested,
                "created": self.created, "updated": self.updated, "config": self.config, "requeues": self.requeues,
                "owner": self.owner,
                "meter": meter.get("meter", []), "chosen_step": meter.get("chosen_step")}


@dataclass(frozen=True)
class PhaseMark:
    """A phase began (preparing, class_images, training, checkpoint, saving, samples), or a run ended (a status)."""

    phase: str
    started: float
    step: int
    run: float  # when the run (one process training the job) began: marks of one run belong together


ENDINGS = {str(s) for s in (JobStatus.DONE, JobStatus.FAILED, JobStatus.INTERRUPTED, JobStatus.CANCELLED)}


def phase_spans(marks: list[PhaseMark], now: float) -> list[tuple[PhaseMark, float, int]]:
    """Each phase with its seconds and the steps it advanced. A run's last phase lasts until its ending mark, or
    until `now` if it is the newest mark; a run that died without an ending mark loses its last phase."""
    spans = []
    for index, mark in enumerate(marks):
        if mark.phase in ENDINGS:
            continue
        following = marks[index + 1] if index + 1 < len(marks) else None
        if following is not None and following.run == mark.run:
            spans.append((mark, following.started - mark.started, following.step - mark.step))
        elif following is None:
            spans.append((mark, max(0.0, now - mark.started), None))
    return spans


def phase_seconds(marks: list[PhaseMark], now: float) -> dict[str, float]:
    """Seconds per phase over every run, in the order the phases first began."""
    totals: dict[str, float] = {}
    for mark, seconds, _ in phase_spans(marks, now):
        totals[mark.phase] = totals.get(mark.phase, 0.0) + seconds
    return totals


def steps_per_second(marks: list[PhaseMark], now: float, step: int) -> float | None:
    """Training speed over every training phase so far (`step`: where the job is now); None before it is known."""
    steps = seconds = 0.0
    for mark, span_seconds, advanced in phase_spans(marks, now):
        if mark.phase == "training":
            steps += (step - mark.step) if advanced is None else advanced
            seconds += span_seconds
    return steps / seconds if steps > 0 and seconds > 0 else None


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


_RUNNER_COLUMNS = ("runner_host", "runner_pid", "runner_started", "heartbeat", "runner_node")


def _runner_values(runner: Runner | None) -> dict:
    if runner is None:
        return dict.fromkeys(_RUNNER_COLUMNS)
    return dict(runner_host=runner.host, runner_pid=runner.pid, runner_started=runner.started, heartbeat=runner.heartbeat,
                runner_node=runner.node)


class Jobs:
    """The jobs of one library: rows in its database and folders under <data root>/jobs/.

    Scoped like its library (Library.for_user): a user's Jobs lists, reads, cancels, resumes and deletes only that
    user's jobs (another user's reads exactly like a missing one) and records the user on the jobs it creates. The
    runner's side (claim_next, hand_over, beat, update) and reap work on every job: the worker serves everyone.
    """

    def __init__(self, library: Library):
        self.library = library
        self.engine = library.engine
        self.root = library.root / "jobs"
        self.root.mkdir(exist_ok=True)

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    # ----- creating -----
    def create(self, config: TrainConfig, image_paths: list, status: JobStatus = JobStatus.QUEUED) -> str:
        """Check the photos and the name, copy the photos into jobs/<id>/images and record the job.

        With status RUNNING the calling process is its runner (the CLI's foreground `train`).
        """
        from .models import check_base_model, native_resolution
        check_base_model(config.base_model, config.config_dir)  # a bad model is refused here, not after queueing
        files = expand_image_paths(image_paths)
        # every file, its size at the training resolution and the count, now, before anything slow happens
        check_subject_photos(files, config.resolution or native_resolution(config.base_model))
        asked = config.token
        config = self.with_free_identifier(config)
        name = self.library.check_new_name(config.name or default_adapter_name(self.library, config))
        job_id = new_id()
        images = self.folder(job_id) / "images"
        images.mkdir(parents=True)
        for index, path in enumerate(files):
            shutil.copyfile(path, images / f"{index:02d}{Path(path).suffix.lower()}")
        self.library.keep(images)  # in the store before the row: any machine can train it (store.py)
        now = time.time()
        runner = Runner.this_process() if status == JobStatus.RUNNING else None
        with self.engine.begin() as db:
            db.execute(insert(jobs_table).values(
                id=job_id, status=str(status), config=json.dumps({**config.to_dict(), "name": name}), phase=str(status),
                step=0, total=0, losses="[]", message="", cancel_requested=0, created=now, updated=now,
                owner=self.library.user, **_runner_values(runner)))
        self.log(job_id, f"created ({status}) for adapter {name!r}")
        if config.token != asked:
            self.log(job_id, f"identifier {asked!r} is in use on {config.base_model}: this subject is called {config.token!r}")
        return job_id

    def with_free_identifier(self, config: TrainConfig) -> TrainConfig:
        """`config` with an identifier no adapter in the library and no unfinished job on its base model uses, so
        that subjects can be mixed (identifier.choose_identifier: a frozen embedding's identifier is refused instead).
        When the identifier's embedding trains, an identifier that is a piece of the vocabulary is refused too."""
        from .identifier import choose_identifier, identifiers_in_use, rename_in_prompt
        # library-wide (subjects of different users share a base model's words); another user's is not named
        users: dict[str, str] = {}
        everyone = self.library.everyone()
        for entry in everyone.list():
            if entry.base_model == config.base_model:
                what = f"adapter {entry.name!r}" if self.library.owns(entry.owner) else "another user's adapter"
                users.update({word: what for word in identifiers_in_use([entry.token]) if word not in users})
        for job in Jobs(everyone).list((JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.INTERRUPTED)):
            if job.config.get("base_model") == config.base_model:
                what = f"job {job.id}" if self.library.owns(job.owner) else "another user's job"
                users.update({word: what for word in identifiers_in_use([job.config.get("token")]) if word not in users})
        trains = config.train_token_embedding if config.train_token_embedding is not None else uses_tiny_defaults(config.base_model)
        token = choose_identifier(config.token, set(users), trains, users)
        if trains:  # refused now, not when training starts after the queue (identifier.IdentifierEmbedding does the same)
            check_own_token(token, config.base_model, config.config_dir)
        return replace(config, token=token, instance_prompt=rename_in_prompt(config.instance_prompt, config.token, token))

    # ----- reading -----
    def get(self, job_id: str) -> Job:
        self.reap()
        with self.engine.connect() as db:
            row = db.execute(self._visible(select(jobs_table)).where(jobs_table.c.id == job_id)).mappings().first()
        if row is None:
            raise UserError(f"No job {job_id!r} under {self.library.root}.")
        return self._job(row)

    def list(self, statuses: tuple[JobStatus, ...] | None = None) -> list[Job]:
        """Newest first."""
        self.reap()
        query = self._visible(select(jobs_table)).order_by(jobs_table.c.created.desc(), jobs_table.c.id.desc())
        if statuses is not None:
            query = query.where(jobs_table.c.status.in_([str(s) for s in statuses]))
        with self.engine.connect() as db:
            return [self._job(row) for row in db.execute(query).mappings().all()]

    def _visible(self, query):
        return self.library.visible(query, jobs_table.c.owner)  # scoped like its library

    def adapter_name(self, job: Job) -> str | None:
        if not job.adapter_id:
            return None
        try:
            return self.library.get(job.adapter_id).name
        except UserError:  # deleted since
            return None

    def reap(self) -> list[str]:
        """Running jobs whose runner is gone become interrupted (resumable); returns their ids."""
        with self.engine.connect() as db:
            rows = db.execute(select(jobs_table).where(jobs_table.c.status.in_([str(s) for s in ACTIVE]))).mappings().all()
        reaped = []
        for row in rows:
            runner = _runner(row)
            if runner is not None and not runner.gone():
                continue
            # Compare-and-set on the heartbeat: a runner that beats meanwhile keeps its job.
            with self.engine.begin() as db:
                changed = db.execute(update(jobs_table).where(
                    jobs_table.c.id == row["id"], jobs_table.c.status == row["status"],
                    same(jobs_table.c.heartbeat, row["heartbeat"]), same(jobs_table.c.runner_pid, row["runner_pid"]),
                ).values(status=str(JobStatus.INTERRUPTED), updated=time.time(),  # the phase stays: where it stopped
                         message=f"its runner stopped ({row['phase']}, step {row['step']}); resume to continue from the last checkpoint")
                ).rowcount
            if changed:
                where = "no runner" if runner is None else f"pid {runner.pid} on {runner.host}"
                self.log(row["id"], f"marked interrupted: its runner ({where}) is gone")
                reaped.append(row["id"])
        return reaped

    # ----- the runner's side -----
    def claim_next(self, runner: Runner) -> Job | None:
        """Take the oldest queued job for `runner`: one atomic UPDATE ... WHERE status = 'queued' per try."""
        while True:
            with self.engine.connect() as db:
                job_id = db.execute(select(jobs_table.c.id).where(jobs_table.c.status == str(JobStatus.QUEUED))
                                    .order_by(jobs_table.c.created, jobs_table.c.id).limit(1)).scalar()
            if job_id is None:
                return None
            if self._take(job_id, runner, (JobStatus.QUEUED,)):
                return self.get(job_id)  # (the worker's Jobs sees every job)
            # another worker took it between the two statements: try the next one

    def claim_queued(self, job_id: str, runner: Runner) -> Job | None:
        """Take one queued job (a Ray task starting, ray_dispatch.py); None when it is not queued any more."""
        return self.get(job_id) if self._take(job_id, runner, (JobStatus.QUEUED,)) else None

    def claim(self, job_id: str, runner: Runner) -> Job:
        """Take one job to run in this process (`train --resume`): a queued or resumable one, never a running one."""
        job = self.get(job_id)
        if job.status == JobStatus.FAILED and not job.resumable:
            raise _failed_by_its_settings(job)
        if not self._take(job_id, runner, (JobStatus.QUEUED, *RESUMABLE)):
            job = self.get(job_id)
            if job.status in ACTIVE:
                raise UserError(f"Job {job_id} is {job.status} in pid {job.runner.pid} on {job.runner.host}; "
                                "cancel it first or wait for it.")
            raise UserError(f"Job {job_id} is {job.status}; only queued, interrupted, cancelled or failed jobs can run again.")
        return self.get(job_id)

    def _take(self, job_id: str, runner: Runner, statuses) -> bool:
        with self.engine.begin() as db:
            taken = db.execute(update(jobs_table).where(
                jobs_table.c.id == job_id, jobs_table.c.status.in_([str(s) for s in statuses]),
            ).values(status=str(JobStatus.RUNNING), phase="preparing", error=None, error_kind=None, cancel_requested=0,
                     updated=time.time(),
                     message="", **_runner_values(runner))).rowcount == 1
        if taken:
            self._from_store(job_id)  # the log and phases this runner appends to, as the last runner left them
            self.log(job_id, f"started on {runner.host} pid {runner.pid}" + (f" (Ray node {runner.node})" if runner.node else ""))
        return taken

    def hand_over(self, job_id: str, from_pid: int, runner: Runner) -> Job:
        """A worker's child process takes over the job its worker claimed (pid `from_pid`, this host)."""
        with self.engine.begin() as db:
            taken = db.execute(update(jobs_table).where(
                jobs_table.c.id == job_id, jobs_table.c.status == str(JobStatus.RUNNING),
                jobs_table.c.runner_pid == from_pid, jobs_table.c.runner_host == runner.host,
            ).values(updated=time.time(), **_runner_values(runner))).rowcount == 1
        if not taken:
            raise UserError(f"Job {job_id} is not running under pid {from_pid}; nothing to take over.")
        self.log(job_id, f"running in pid {runner.pid} (a child of worker pid {from_pid})")
        return self.get(job_id)

    def beat(self, job_id: str, runner: Runner) -> bool:
        """The runner's heartbeat; False when the job is no longer this runner's."""
        with self.engine.begin() as db:
            return db.execute(update(jobs_table).where(jobs_table.c.id == job_id, _owned_by(runner))
                              .values(heartbeat=time.time())).rowcount == 1

    def update(self, job_id: str, runner: Runner | None = None, **fields) -> bool:
        """Progress and results; `losses` is a list, `status` a JobStatus. With `runner` (the runner's own writes)
        only while the job is still that runner's. Returns whether the row was written."""
        if "losses" in fields:
            fields["losses"] = json.dumps(fields["losses"])
        if "status" in fields:
            fields["status"] = str(JobStatus(fields["status"]))
        query = update(jobs_table).where(jobs_table.c.id == job_id)
        if runner is not None:
            query = query.where(_owned_by(runner))
        with self.engine.begin() as db:
            return db.execute(query.values(updated=time.time(), **fields)).rowcount == 1

    def lost(self, job_id: str, why: str) -> JobStatus | None:
        """A running job whose runner is known to be gone (its Ray task failed with its node): cancelled when a
        cancel was asked for, else interrupted (resumable). Returns the new status, None when it was not running."""
        for status, cancelling in ((JobStatus.CANCELLED, 1), (JobStatus.INTERRUPTED, 0)):
            with self.engine.begin() as db:
                changed = db.execute(update(jobs_table).where(
                    jobs_table.c.id == job_id, jobs_table.c.status.in_([str(s) for s in ACTIVE]),
                    jobs_table.c.cancel_requested == cancelling,
                ).values(status=str(status), phase=str(status), updated=time.time(),
                         message=f"its runner was lost ({why}); resume to continue from the last checkpoint")).rowcount
            if changed:
                self.log(job_id, f"marked {status}: its runner was lost ({why})")
                return status
        return None

    def requeue(self, job_id: str, most: int) -> str | None:
        """Queue an interrupted job again (resume), at most `most` times in its life; returns what happens, in words,
        or None when it has been queued again `most` times already (it stays interrupted)."""
        with self.engine.begin() as db:
            counted = db.execute(update(jobs_table).where(
                jobs_table.c.id == job_id, jobs_table.c.status == str(JobStatus.INTERRUPTED),
                func.coalesce(jobs_table.c.requeues, 0) < most,
            ).values(requeues=func.coalesce(jobs_table.c.requeues, 0) + 1)).rowcount
        if not counted:
            self.log(job_id, f"not queued again: it was queued again {most} times already after lost runners")
            return None
        return self.resume(job_id)

    def cancel_requested(self, job_id: str, runner: Runner | None = None) -> bool | None:
        """Whether a cancel was asked for; with `runner`, None when the job is no longer that runner's."""
        query = select(jobs_table.c.cancel_requested).where(jobs_table.c.id == job_id)
        if runner is not None:
            query = query.where(_owned_by(runner))
        with self.engine.connect() as db:
            row = db.execute(query).first()
        return None if row is None and runner is not None else bool(row and row[0])

    # ----- what a person does -----
    def cancel(self, job_id: str) -> JobStatus:
        """A queued job is cancelled at once; a running one stops at its next step (cancelling)."""
        job = self.get(job_id)
        with self.engine.begin() as db:
            if db.execute(update(jobs_table).where(jobs_table.c.id == job_id, jobs_table.c.status == str(JobStatus.QUEUED))
                          .values(status=str(JobStatus.CANCELLED), phase=str(JobStatus.CANCELLED), cancel_requested=1,
                                  message="cancelled before it started", updated=time.time())).rowcount:
                self.log(job_id, "cancelled while queued")
                return JobStatus.CANCELLED
            if db.execute(update(jobs_table).where(jobs_table.c.id == job_id, jobs_table.c.status == str(JobStatus.RUNNING))
                          .values(status=str(JobStatus.CANCELLING), cancel_requested=1, updated=time.time(),
                                  message="cancel requested; stopping at the next step")).rowcount:
                self.log(job_id, "cancel requested")
                return JobStatus.CANCELLING
        if job.status == JobStatus.CANCELLING:
            return JobStatus.CANCELLING
        raise UserError(f"Job {job_id} is {self.get(job_id).status}; only queued or running jobs can be cancelled.")

    def resume(self, job_id: str) -> str:
        """Queue an interrupted, cancelled or failed job again for the worker; returns what will happen, in words."""
        from .checkpoint import checkpoint_step
        job = self.get(job_id)
        if job.status not in RESUMABLE:
            raise UserError(f"Job {job_id} is {job.status}; only interrupted, cancelled or failed jobs can be resumed.")
        if not job.resumable:
            raise _failed_by_its_settings(job)
        self.fetch(job_id)
        self._from_store(job_id)
        if not (job.folder / "images").is_dir():
            raise UserError(f"Job {job_id} has lost its photos ({job.folder / 'images'}); start a new job instead.")
        step = checkpoint_step(job.checkpoint)
        if step is None:
            message = "no checkpoint: starts again from step 0"
        elif job.step > step:  # the steps after the last checkpoint were not saved
            again = f"step {job.step} is" if job.step == step + 1 else f"steps {step + 1}-{job.step} are"
            message = (f"restarts from its last checkpoint at step {step} of {job.total or '?'} (it stopped at step "
                       f"{job.step}; {again} trained again)")
        else:
            message = f"resumes from its checkpoint at step {step} of {job.total or '?'}"
        with self.engine.begin() as db:
            changed = db.execute(update(jobs_table).where(
                jobs_table.c.id == job_id, jobs_table.c.status.in_([str(s) for s in RESUMABLE]),
            ).values(status=str(JobStatus.QUEUED), phase=str(JobStatus.QUEUED), cancel_requested=0, error=None, error_kind=None,
                     message=message, updated=time.time(), **_runner_values(None))).rowcount
        if not changed:
            raise UserError(f"Job {job_id} changed meanwhile ({self.get(job_id).status}); try again.")
        self.log(job_id, f"queued again: {message}")
        return message

    def again(self, job_id: str) -> str:
        """Queue a new job with a finished job's settings and photos under a free name; returns its id."""
        job = self.get(job_id)
        if job.status not in FINISHED:
            raise UserError(f"Job {job_id} is {job.status}; train it again once it has finished.")
        photos = sorted((job.folder / "images").glob("*"))
        if not photos:
            raise UserError(f"Job {job_id} has lost its photos ({job.folder / 'images'}); start a new job instead.")
        taken = {j.name for j in self.list()}  # a queued job's name is not in the library yet, but is spoken for
        name, suffix = self.library.free_name(job.name), 2
        while name in taken:
            name, suffix = self.library.free_name(f"{job.name}-{suffix}"), suffix + 1
        return self.create(replace(job.train_config(), name=name), photos)

    def delete(self, job_id: str) -> None:
        """Remove a finished job's row, photos and checkpoint (row first, so listings never show half of it)."""
        job = self.get(job_id)
        if job.status not in FINISHED:
            raise UserError(f"Job {job_id} is {job.status}; cancel it first (only finished jobs can be deleted).")
        trash = self.root / f".deleted-{job_id}"
        with self.engine.begin() as db:
            if not db.execute(delete(jobs_table).where(jobs_table.c.id == job_id,
                                                       jobs_table.c.status.in_([str(s) for s in FINISHED]))).rowcount:
                raise UserError(f"Job {job_id} changed meanwhile ({self.get(job_id).status}); try again.")
            if job.folder.exists():
                job.folder.rename(trash)
        if self.library.store is not None:
            self.library.store.remove(job.folder)
        shutil.rmtree(trash, ignore_errors=True)

    def fetch(self, job_id: str) -> None:
        """Bring the job's photos and newest checkpoint from the store (when there is one) before it runs here."""
        if self.library.store is not None:
            self.library.store.fetch(self.folder(job_id))

    def mark_phase(self, job_id: str, phase: str, step: int, run: float) -> None:
        """Record that `phase` began (only the job's runner writes these, so read-append-write is safe; its copy
        came from the store when it claimed the job)."""
        marks = [vars(m) for m in self._read_phases(job_id)] + [vars(PhaseMark(phase, time.time(), step, run))]
        atomic_write_bytes(self.folder(job_id) / PHASES_FILE, json.dumps(marks).encode())
        self.library.keep(self.folder(job_id) / PHASES_FILE)

    def phases(self, job_id: str) -> list[PhaseMark]:
        self._refresh(job_id, self.folder(job_id) / PHASES_FILE)
        return self._read_phases(job_id)

    def _read_phases(self, job_id: str) -> list[PhaseMark]:
        try:
            return [PhaseMark(**mark) for mark in json.loads((self.folder(job_id) / PHASES_FILE).read_text())]
        except FileNotFoundError:
            return []

    def read_log(self, job_id: str, max_lines: int = 200) -> str:
        """The last `max_lines` lines of the job's log (what happened, with every failure's traceback)."""
        self._refresh(job_id, self.folder(job_id) / LOG_FILE)
        try:
            lines = (self.folder(job_id) / LOG_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-max_lines:])

    def log(self, job_id: str, line: str) -> None:
        folder = self.folder(job_id)
        if folder.is_dir():
            with open(folder / LOG_FILE, "a", encoding="utf-8") as handle:
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line.rstrip()}\n")
            # Last writer wins in the store: lines two machines append at the same moment may miss one copy.
            self.library.keep(folder / LOG_FILE)

    def _refresh(self, job_id: str, path: Path) -> None:
        """A job's log or phases as the store has them when its runner is another machine or this one has no copy
        (a runner on this machine writes this copy itself); asked at most every STORE_REFRESH_SECONDS per file."""
        if self.library.store is None or not path.parent.is_dir():
            return
        now = time.monotonic()
        with _refreshed_lock:
            if path in _refreshed and now - _refreshed[path] < STORE_REFRESH_SECONDS:
                return
            _refreshed[path] = now
        if path.exists() and not self._runs_elsewhere(job_id):
            return
        self.library.store.fetch_file(path)

    def _runs_elsewhere(self, job_id: str) -> bool:
        """Whether the job's last runner is another machine (a Ray node on this machine shares its data root)."""
        with self.engine.connect() as db:
            host = db.execute(select(jobs_table.c.runner_host).where(jobs_table.c.id == job_id)).scalar()
        return host is not None and host != HOST

    def _from_store(self, job_id: str) -> None:
        """The job's log and phases as the store has them, before this process appends to them: another machine
        may have run the job since (in the store the last writer wins)."""
        if self.library.store is not None:
            for name in (LOG_FILE, PHASES_FILE):
                self.library.store.fetch_file(self.folder(job_id) / name)

    def _job(self, row) -> Job:
        return Job(id=row["id"], status=JobStatus(row["status"]), config=json.loads(row["config"]), phase=row["phase"] or "",
                   step=row["step"] or 0, total=row["total"] or 0, losses=json.loads(row["losses"] or "[]"),
                   message=row["message"] or "", error=row["error"],
                   error_kind=ErrorKind(row["error_kind"]) if row["error_kind"] else None,
                   adapter_id=row["adapter_id"], runner=_runner(row),
                   cancel_requested=bool(row["cancel_requested"]), created=row["created"] or 0.0,
                   updated=row["updated"] or 0.0, folder=self.folder(row["id"]), requeues=row["requeues"] or 0,
                   owner=row["owner"])


def _runner(row) -> Runner | None:
    if row["runner_pid"] is None:
        return None
    return Runner(row["runner_host"] or "", row["runner_pid"], row["runner_started"] or 0.0, row["heartbeat"] or 0.0,
                  row["runner_node"])


def _failed_by_its_settings(job: Job) -> UserError:
    return UserError(f"Job {job.id} failed because of its settings ({job.error}); fix them and start a new job.")


def _owned_by(runner: Runner):
    """The job still runs under `runner`: not given up on (interrupted), nor queued again and claimed by another."""
    return and_(jobs_table.c.runner_pid == runner.pid, jobs_table.c.runner_host == runner.host,
                jobs_table.c.status.in_([str(s) for s in ACTIVE]))


def check_own_token(token: str, base_model: str, config_dir: str | None = None) -> None:
    """Refuse, with training's own sentence, an identifier the base model's tokenizer already has as a piece of its
    vocabulary (it cannot get a token of its own); reads the tokenizer alone. Nothing is checked when the tokenizer
    cannot be read that cheaply: training checks again."""
    from .identifier import tokenizer_with_tokens
    from .models import load_tokenizer
    tokenizer = load_tokenizer(base_model, config_dir)
    if tokenizer is not None:
        tokenizer_with_tokens(tokenizer, [token])


def create_job(library: Library, config: TrainConfig, image_paths: list, status: JobStatus = JobStatus.QUEUED) -> str:
    return Jobs(library).create(config, image_paths, status)


def default_adapter_name(library: Library, config: TrainConfig) -> str:
    return library.free_name(f"{config.token}-{config.class_noun.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M')}")


# ----------------------------------------------------------------- running a job (CLI and worker alike)


def run_job(jobs: Jobs, job_id: str, prior_dir=None, *, observer: Callable | None = None,
            stop: threading.Event | None = None, sample_every: int = 0, raise_user_errors: bool = False) -> Job:
    """Train a job this process has claimed, to done, cancelled, interrupted or failed; return its final record.

    `observer(job_id, progress)` sees every progress report after it is recorded; `stop` (SIGTERM in the worker)
    interrupts at the next step with a checkpoint. Every exception ends the job as failed with a one-line reason;
    the traceback goes to the job's log file; with `raise_user_errors` (the CLI) a UserError is raised again
    after it is recorded, so the person sees its sentence. A runner whose job is taken from it (RunnerLost) stops
    at once and returns the job as its new runner has it.
    """
    from .train import TrainingStopped, run_training  # train imports this module; listing jobs needs no trainer

    stop = stop or threading.Event()
    job = jobs.get(job_id)
    if job.config.get("sample_every") is not None:  # the job's own setting (the studio's Advanced) wins
        sample_every = job.config["sample_every"]
    runner = job.runner
    if saved := jobs.adapter_name(job):  # its adapter reached the library before a crash (while samples were drawn)
        jobs.update(job_id, runner=runner, status=JobStatus.DONE, phase=str(JobStatus.DONE), step=len(job.losses),
                    message=f"saved adapter {saved} (before an interruption)")
        return jobs.get(job_id)
    jobs.fetch(job_id)  # from the store: this machine may not have trained it before
    writer = _ProgressWriter(jobs, job_id, observer, runner)
    heartbeat = _Heartbeat(jobs, job_id, runner, on_lost=writer.lost.set)
    heartbeat.start()
    # Every write to the row below is the runner's own: made only while the job is still this runner's (owned).
    owned = True
    try:
        result = run_training(jobs.library, job_id, prior_dir, on_progress=writer, should_stop=writer.stop_check(stop),
                              sample_every=sample_every)
    except RunnerLost:
        owned = False
    except TrainingStopped as stopped:
        status = JobStatus.CANCELLED if writer.cancel_seen or jobs.cancel_requested(job_id) else JobStatus.INTERRUPTED
        owned = jobs.update(job_id, runner=runner, status=status, phase=str(status), step=stopped.step,
                            losses=writer.losses[: stopped.step],
                            message=f"{status} at step {stopped.step}; the checkpoint is kept, so it can be resumed")
    except KeyboardInterrupt:  # before the training loop (loading, class images): nothing to checkpoint yet
        status = JobStatus.CANCELLED if jobs.cancel_requested(job_id) else JobStatus.INTERRUPTED
        owned = jobs.update(job_id, runner=runner, status=status, phase=str(status),
                            message=f"{status} before training started; resume to start it again")
    except Exception as error:  # noqa: BLE001 - any failure (bad input, out of memory) ends the job as failed
        kind = ErrorKind.USER if isinstance(error, UserError) else ErrorKind.CRASH
        owned = jobs.update(job_id, runner=runner, status=JobStatus.FAILED, phase=str(JobStatus.FAILED),
                            error=one_line(error), error_kind=str(kind), losses=writer.losses)
        if owned:
            jobs.log(job_id, "failed:\n" + traceback.format_exc())
        if raise_user_errors and isinstance(error, UserError):
            raise
    else:
        (jobs.folder(job_id) / "timings.json").write_text(json.dumps(result.timings))  # for bench/speed.py
        owned = jobs.update(job_id, runner=runner, status=JobStatus.DONE, phase=str(JobStatus.DONE),
                            step=len(result.losses), losses=result.losses, adapter_id=result.adapter.id,
                            message=f"saved adapter {result.adapter.name}")
    finally:
        heartbeat.stop()
    job = jobs.get(job_id)
    if not owned:  # its log and phases are the new runner's too
        print(f"job {job_id}: stopped, no longer this runner's (pid {os.getpid()} on {HOST}); it is {job.status} now",
              file=sys.stderr, flush=True)
        return job
    jobs.mark_phase(job_id, str(job.status), job.step, writer.run)
    jobs.log(job_id, f"{job.status} at step {job.step}" + (f": {job.error}" if job.error else ""))
    return job


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, UserError):
        text = f"{type(error).__name__}: {text}"
    return text[:500]


class _Heartbeat:
    """A thread that writes the runner's heartbeat every HEARTBEAT_SECONDS, so loading and class images count."""

    def __init__(self, jobs: Jobs, job_id: str, runner: Runner | None, on_lost: Callable[[], None]):
        self.jobs, self.job_id, self.runner, self.on_lost = jobs, job_id, runner, on_lost
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def start(self) -> None:
        if self.runner is not None:
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(HEARTBEAT_SECONDS):
            if not self.jobs.beat(self.job_id, self.runner):
                self.on_lost()  # the training loop stops at its next report or check (RunnerLost)
                return


class _ProgressWriter:
    """on_progress for run_training: throttled writes of phase, step and losses, and the cancel check. Both raise
    RunnerLost once the job is no longer `runner`'s (its write found the row another's, or the heartbeat did)."""

    def __init__(self, jobs: Jobs, job_id: str, observer: Callable | None = None, runner: Runner | None = None):
        self.jobs, self.job_id, self.observer, self.runner = jobs, job_id, observer, runner
        self.lost = threading.Event()
        self.losses: list[float] = list(jobs.get(job_id).losses)
        self.last_write, self.last_phase, self.last_check = 0.0, None, 0.0
        self.cancel_seen = False
        self.run = time.time()

    def __call__(self, progress) -> None:
        self._record(progress)
        if self.observer is not None:
            self.observer(self.job_id, progress)

    def _record(self, progress) -> None:
        if self.lost.is_set():
            raise RunnerLost(self.job_id)
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
        if progress.adapter_id:
            fields["adapter_id"] = progress.adapter_id
        if progress.phase == "training":
            fields["losses"] = self.losses
        if progress.message:
            fields["message"] = progress.message
        if not self.jobs.update(self.job_id, runner=self.runner, **fields):
            self.lost.set()
            raise RunnerLost(self.job_id)
        if progress.phase != self.last_phase:
            self.jobs.mark_phase(self.job_id, progress.phase, progress.step, self.run)
        if progress.message:
            self.jobs.log(self.job_id, progress.message)
        self.last_write, self.last_phase = now, progress.phase

    def stop_check(self, stop: threading.Event):
        def should_stop() -> bool:
            if stop.is_set():
                return True
            now = time.time()
            if now - self.last_check >= CANCEL_CHECK_INTERVAL:
                self.last_check = now
                asked = self.jobs.cancel_requested(self.job_id, self.runner)
                if asked is None:
                    self.lost.set()
                self.cancel_seen = bool(asked)
            if self.lost.is_set():
                raise RunnerLost(self.job_id)
            return self.cancel_seen

        return should_stop
