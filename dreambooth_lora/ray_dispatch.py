"""`worker --engine ray`: queued jobs trained as Ray tasks on the machines of a Ray cluster.

The dispatcher (this module; it runs on the head node, as `worker --engine ray` or under `serve --engine ray`)
submits each queued job as one Ray task. A task needs one GPU (`num_gpus=1` in the decorator itself, so each task
runs in a fresh worker process and its GPU memory is freed after it), or one CPU slot for a `--device cpu` job or
on a cluster without GPUs. Ray keeps a task waiting until a node has what it needs.

- **Each job runs once.** The task claims its job when Ray starts it (`Jobs.claim_queued`: an atomic update of a
  queued row), so a job reads queued while it waits for a GPU, and a job submitted twice (two dispatchers, or
  cancelled meanwhile) runs at most once. Progress, the heartbeat and the result go through the database, as for
  the local worker (`jobs.run_job`).
- **No silent restarts.** Ray would retry a task whose worker died 3 times, restarting a half-finished training
  from scratch; the tasks have `max_retries=0`. A task lost with its node leaves its job interrupted
  (`Jobs.lost`), and the dispatcher queues it again to resume from its last checkpoint (`Jobs.requeue`), at most
  MAX_REQUEUES times in the job's life; the checkpoint and photos come from the store (`store.py`).
- **Cancel.** `jobs cancel` (or the studio) sets the job's flag; the training loop stops at its next step with a
  checkpoint. A task that has not stopped CANCEL_GRACE_SECONDS later (loading, class images) gets `ray.cancel`
  (a KeyboardInterrupt in the task), and CANCEL_GRACE_SECONDS after that `ray.cancel(force=True)` (its worker is
  killed; the job reads cancelled).

Every node uses the same library: the dispatcher passes its `DBL_*` and `AWS_*` variables (the database and the
store) and its data root path to each task; a node keeps its working copy of the files at that path.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UserError
from .jobs import ACTIVE, Jobs, JobStatus, Runner, run_job
from .library import Library

MAX_REQUEUES = 3  # a job whose runner is lost this many times stays interrupted (resume it by hand)
CANCEL_GRACE_SECONDS = 10.0
POLL_SECONDS = 1.0
PASSED_ENV_PREFIXES = ("DBL_", "AWS_")  # the library's database and store, and the store's credentials


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install -e '.[cluster]' (README, \"More than one machine\").") from None
    return ray


def connect(address: str | None = None):
    """Join the Ray instance at `address` ("auto": the one `ray start` runs on this machine; "local": a private
    one for this process); default: $RAY_ADDRESS, else a `ray start` instance on this machine, else a new local one."""
    ray = import_ray()
    if os.environ.get("DBL_PASSIVE_WAIT") == "1":  # serve's idle policy (cli.wait_passively): a local Ray started
        os.environ.pop("OMP_WAIT_POLICY", None)  # here hands this environment to its workers, which train
        os.environ.pop("DBL_PASSIVE_WAIT")
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except ConnectionError as error:
            raise UserError(f"Cannot join the Ray cluster at {address or 'this machine'}: {error}") from None
    return ray


def train_task(root: str, prior: str | None, job_id: str, env: dict) -> dict:
    """The body of one Ray task: claim the job if it is still queued, train it here, return how it ended."""
    os.environ.update(env)  # a fresh worker process per task: nothing leaks into the next one
    import signal

    import ray

    # ray.cancel interrupts the task as a SIGINT would; a worker started from a shell's background job (or under
    # nohup) inherits SIGINT ignored, and the cancel would then do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    library = Library(Path(root))
    jobs = Jobs(library)
    context = ray.get_runtime_context()
    node = context.get_node_id()
    job = jobs.claim_queued(job_id, Runner.this_process(node=node))
    if job is None:
        return {"job": job_id, "ran": False, "node": node}
    from .worker import SAMPLES_PER_JOB, sample_every_for  # the local worker's rule for intermediate samples

    job = run_job(jobs, job_id, Path(prior) if prior else None, sample_every=sample_every_for(job, SAMPLES_PER_JOB))
    return {"job": job_id, "ran": True, "node": node, "status": str(job.status)}


@dataclass
class Dispatched:
    job_id: str
    ref: object  # the task's ray.ObjectRef
    cancel_seen: float | None = None
    cancels_sent: int = 0


class Dispatcher:
    """Submits queued jobs as Ray tasks and follows them; `step()` is one pass, `run()` loops."""

    def __init__(self, library: Library, prior_dir: Path | None, *, max_requeues: int = MAX_REQUEUES,
                 cancel_grace: float = CANCEL_GRACE_SECONDS, say: Callable[[str], None] | None = None):
        self.ray = import_ray()
        self.library, self.jobs = library, Jobs(library)
        self.prior_dir = prior_dir
        self.max_requeues, self.cancel_grace = max_requeues, cancel_grace
        self.say = say or (lambda line: print(f"{time.strftime('%H:%M:%S')} dispatcher: {line}", file=sys.stderr, flush=True))
        self.running: dict[str, Dispatched] = {}
        ray = self.ray
        # Declared here (Ray is an optional extra); num_gpus in the decorator itself: a fresh process per task.
        self._on_gpu = ray.remote(num_gpus=1, num_cpus=1, max_retries=0)(train_task)
        self._on_cpu = ray.remote(num_cpus=1, max_retries=0, max_calls=1)(train_task)

    @property
    def env(self) -> dict:
        return {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV_PREFIXES)}

    def step(self) -> None:
        self._collect()
        self._cancel()
        self._submit()

    def idle(self) -> bool:
        return not self.running and not self.jobs.list((JobStatus.QUEUED,))

    def run(self, stop: threading.Event, poll_seconds: float = POLL_SECONDS, until_idle: bool = False) -> int:
        """Until `stop` (or, with `until_idle`, until nothing is queued or running); then cancels what still runs
        (its jobs checkpoint and read interrupted when the tasks end with the dispatcher's Ray driver)."""
        self._warn_about_sharing()
        while not stop.is_set():
            self.step()
            if until_idle and self.idle():
                break
            stop.wait(poll_seconds)
        for dispatched in self.running.values():
            self.ray.cancel(dispatched.ref)  # a KeyboardInterrupt: the job stops with a checkpoint (interrupted)
        for dispatched in list(self.running.values()):
            self._wait_for(dispatched)
        return 0

    # ----- the three parts of a pass -----
    def _submit(self) -> None:
        gpus = self.ray.cluster_resources().get("GPU", 0) > 0
        for job in reversed(self.jobs.list((JobStatus.QUEUED,))):  # oldest first
            if job.id in self.running:
                continue
            on_gpu = gpus and job.config.get("device", "auto") != "cpu"
            task = self._on_gpu if on_gpu else self._on_cpu
            ref = task.remote(str(self.library.root.resolve()), str(self.prior_dir) if self.prior_dir else None,
                              job.id, self.env)
            self.running[job.id] = Dispatched(job.id, ref)
            self.say(f"job {job.id} submitted ({'one GPU' if on_gpu else 'one CPU slot'})")

    def _collect(self) -> None:
        if not self.running:
            return
        refs = {d.ref: d for d in self.running.values()}
        ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in ready:
            self._finished(refs[ref])

    def _finished(self, dispatched: Dispatched) -> None:
        ray = self.ray
        del self.running[dispatched.job_id]
        try:
            result = ray.get(dispatched.ref)
        except ray.exceptions.TaskCancelledError:
            status = self.jobs.lost(dispatched.job_id, "its Ray task was cancelled")
            self.say(f"job {dispatched.job_id}: task cancelled ({status or self.jobs.get(dispatched.job_id).status})")
            return
        except ray.exceptions.RayError as error:  # the worker or its node died, or the task raised
            why = f"Ray: {type(error).__name__}"
            status = self.jobs.lost(dispatched.job_id, why)
            self.say(f"job {dispatched.job_id}: its task failed ({why}); the job is {status or self.jobs.get(dispatched.job_id).status}")
            if status == JobStatus.INTERRUPTED:
                message = self.jobs.requeue(dispatched.job_id, self.max_requeues)
                self.say(f"job {dispatched.job_id}: " + (f"queued again; it {message}" if message else
                                                        f"left interrupted after {self.max_requeues} requeues"))
            return
        if result["ran"]:
            self.say(f"job {dispatched.job_id}: {result['status']} on node {result['node'][:12]}")

    def _cancel(self) -> None:
        """Escalate for jobs asked to stop: the training loop's own check first, then ray.cancel, then force."""
        now = time.time()
        for dispatched in self.running.values():
            if dispatched.cancel_seen is None:
                if self.jobs.cancel_requested(dispatched.job_id):
                    dispatched.cancel_seen = now
                continue
            if dispatched.cancels_sent < 2 and now - dispatched.cancel_seen >= self.cancel_grace * (dispatched.cancels_sent + 1):
                force = dispatched.cancels_sent == 1
                self.ray.cancel(dispatched.ref, force=force)
                dispatched.cancels_sent += 1
                self.say(f"job {dispatched.job_id}: still running {now - dispatched.cancel_seen:.0f} s after its cancel; "
                         f"ray.cancel(force={force})")

    def _wait_for(self, dispatched: Dispatched) -> None:
        try:
            self.ray.get(dispatched.ref, timeout=CANCEL_GRACE_SECONDS * 3)
        except Exception:  # noqa: BLE001 - cancelled, lost or timed out: the job's own row says what happened
            pass
        job = self.jobs.get(dispatched.job_id)
        if job.status in ACTIVE:
            self.jobs.lost(dispatched.job_id, "the dispatcher stopped")

    def _warn_about_sharing(self) -> None:
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        if len(nodes) > 1 and os.environ.get("DBL_STORE_URL") is None:
            self.say(f"{len(nodes)} Ray nodes share the data root {self.library.root} without DBL_STORE_URL: "
                     "other machines see the photos and checkpoints only if that path is a shared filesystem")


def run_dispatcher(library: Library, prior_dir: Path | None, address: str | None = None,
                   stop: threading.Event | None = None, until_idle: bool = False,
                   poll_seconds: float = POLL_SECONDS) -> int:
    """`worker --engine ray`: join Ray and dispatch until SIGTERM/SIGINT (or, `until_idle`, an empty queue)."""
    import signal

    stop = stop or threading.Event()
    connect(address)
    if threading.current_thread() is threading.main_thread():  # after ray.init, whose own SIGTERM handler dumps and dies
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    dispatcher = Dispatcher(library, prior_dir)
    resources = dispatcher.ray.cluster_resources()
    dispatcher.say(f"joined Ray: {len(dispatcher.ray.nodes())} node(s), {resources.get('GPU', 0):g} GPU(s), "
                   f"{resources.get('CPU', 0):g} CPU(s)")
    return dispatcher.run(stop, poll_seconds, until_idle)
