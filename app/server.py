"""`serve`: mark jobs whose runner is gone interrupted, start one worker child process, run the Gradio app."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from starlette.middleware import Middleware

from dreambooth_lora.errors import UserError
from dreambooth_lora.jobs import Jobs
from dreambooth_lora.library import Library
from dreambooth_lora.paths import data_root as resolve_data_root
from dreambooth_lora.paths import prior_root
from dreambooth_lora.tinyworld.world import SUBJECT_IMAGE_DIR
from dreambooth_lora.users import UsersFile
from dreambooth_lora.worker import terminate_with_parent

from .file_guard import DataRootGuard

WORKER_STOP_SECONDS = 30  # the worker finishes its current step and writes a checkpoint first


def serve(host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
          data_root: str | None = None, prior_dir: str | None = None, engine: str = "local",
          ray_address: str | None = None, users: str | None = None) -> int:
    """Run the studio until Ctrl-C or SIGTERM; the worker is stopped (job checkpointed) on the way out.

    `users`: a users file (dreambooth_lora.users): each person logs in as one of its users and sees their own
    adapters, jobs and history (an admin sees everyone's); `auth` is one shared login to the whole library.
    """
    from .ui import build_ui

    if auth is not None and users is not None:
        raise UserError("--auth and --users cannot be used together: --users gives each person a login of their own.")
    root = resolve_data_root(data_root).resolve()
    prior = prior_root(prior_dir).resolve()
    credentials = parse_auth(auth)
    users_file = UsersFile(Path(users)) if users is not None else None  # a missing or malformed file stops here
    if users_file is not None and not users_file.users():
        raise UserError(f"The users file {users} has no users; add one with `dreambooth-lora users add NAME --users {users}`.")
    library = Library(root)
    # Only jobs whose runner is gone: a `dreambooth-lora train` running beside the server keeps its job.
    for job_id in Jobs(library).reap():
        print(f"job {job_id} lost its runner (a crash or a server restart): marked interrupted (resumable)", file=sys.stderr)
    demo = build_ui(library, prior, users_file)
    supervisor = WorkerSupervisor(library, prior, engine_args(engine, ray_address))
    supervisor.start()
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        demo.launch(server_name=host, server_port=port, auth=users_file.login if users_file else credentials,
                    allowed_paths=[str(root), str(SUBJECT_IMAGE_DIR)],  # outputs only: app/file_guard.py
                    app_kwargs={"middleware": [Middleware(DataRootGuard, root=root)]},
                    footer_links=[], quiet=False)
    except OSError as error:
        raise UserError(f"Cannot serve on {host}:{port} ({error}); choose another --port.") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        supervisor.stop()
    return 0


class WorkerSupervisor:
    """Keeps one worker child running: notices its death within a second, leaves its job interrupted (resumable),
    says so in the server's output, worker.log and the job's log, and starts a new worker so the queue goes on."""

    CHECK_SECONDS = 1.0
    BACKOFF_SECONDS = 30.0  # after 3 deaths within a minute: a worker that cannot start should not spin

    def __init__(self, library: Library, prior: Path, worker_args: list[str] = ()):
        self.library, self.prior, self.worker_args = library, prior, list(worker_args)
        self.worker: subprocess.Popen | None = None
        self.deaths: list[float] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self.worker = start_worker(self.library.root, self.prior, self.worker_args)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        stop_worker(self.worker)

    def _watch(self) -> None:
        while not self._stopped.wait(self.CHECK_SECONDS):
            code = self.worker.poll()
            if code is None:
                continue
            now = time.time()
            self.deaths = [t for t in self.deaths if now - t < 60] + [now]
            # Its training child gets SIGTERM with it and stops with a checkpoint (interrupted, resumable);
            # a job whose runner is gone altogether is marked interrupted here.
            Jobs(self.library).reap()
            self._say(f"worker pid {self.worker.pid} exited with code {code}; its job (if any) stops with a checkpoint "
                      "and reads interrupted (resumable); starting a new worker")
            if len(self.deaths) >= 3 and self._stopped.wait(self.BACKOFF_SECONDS):
                return
            self.worker = start_worker(self.library.root, self.prior, self.worker_args)

    def _say(self, line: str) -> None:
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} serve: {line}"
        print(stamped, file=sys.stderr, flush=True)
        with open(self.library.root / "worker.log", "a", encoding="utf-8") as log:
            log.write(stamped + "\n")


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth must look like USER:PASSWORD.")
    return user, password


def engine_args(engine: str, ray_address: str | None) -> list[str]:
    """The worker's flags for an engine: `--engine ray` makes it the Ray dispatcher (dreambooth_lora/ray_dispatch.py)."""
    if engine == "local":
        return []
    return ["--engine", engine] + (["--ray-address", ray_address] if ray_address else [])


def start_worker(root: Path, prior: Path, worker_args: list[str] = ()) -> subprocess.Popen:
    """One `dreambooth-lora worker` child with the same data root and prior cache; its output goes to worker.log."""
    command = [sys.executable, "-m", "dreambooth_lora.cli", "worker", "--data-root", str(root), "--prior-dir", str(prior),
               *worker_args]
    with open(root / "worker.log", "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=terminate_with_parent if sys.platform == "linux" else None)


def stop_worker(worker: subprocess.Popen) -> None:
    """SIGTERM lets the worker checkpoint its job (marked interrupted); kill it if it does not finish in time."""
    if worker.poll() is not None:
        return
    worker.terminate()
    try:
        worker.wait(WORKER_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def _raise_keyboard_interrupt(signum, frame):
    # Once: a second SIGTERM (a process group signalled twice) must not break into Gradio's own shutdown.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt
