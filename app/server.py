"""`serve`: mark jobs whose runner is gone interrupted, start one worker child process, run the Gradio app."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from pathlib import Path

from dreambooth_lora.errors import UserError
from dreambooth_lora.library import Library
from dreambooth_lora.paths import data_root as resolve_data_root
from dreambooth_lora.paths import prior_root
from dreambooth_lora.tinyworld.world import SUBJECT_IMAGE_DIR
from dreambooth_lora.jobs import Jobs

WORKER_STOP_SECONDS = 30  # the worker finishes its current step and writes a checkpoint first


def serve(host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
          data_root: str | None = None, prior_dir: str | None = None) -> int:
    """Run the studio until Ctrl-C or SIGTERM; the worker is stopped (job checkpointed) on the way out."""
    from .ui import build_ui

    root = resolve_data_root(data_root).resolve()
    prior = prior_root(prior_dir).resolve()
    credentials = parse_auth(auth)
    library = Library(root)
    # Only jobs whose runner is gone: a `dreambooth-lora train` running beside the server keeps its job.
    for job_id in Jobs(library).reap():
        print(f"job {job_id} lost its runner (a crash or a server restart): marked interrupted (resumable)", file=sys.stderr)
    demo = build_ui(library, prior)
    worker = start_worker(root, prior)
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        demo.launch(server_name=host, server_port=port, auth=credentials, allowed_paths=[str(root), str(SUBJECT_IMAGE_DIR)],
                    footer_links=[], quiet=False)
    except OSError as error:
        raise UserError(f"Cannot serve on {host}:{port} ({error}); choose another --port.") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_worker(worker)
    return 0


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth must look like USER:PASSWORD.")
    return user, password


def start_worker(root: Path, prior: Path) -> subprocess.Popen:
    """One `dreambooth-lora worker` child with the same data root and prior cache; its output goes to worker.log."""
    command = [sys.executable, "-m", "dreambooth_lora.cli", "worker", "--data-root", str(root), "--prior-dir", str(prior)]
    with open(root / "worker.log", "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_terminate_with_parent if sys.platform == "linux" else None)


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


def _terminate_with_parent() -> None:
    # If the server dies without cleaning up (SIGKILL), the kernel sends the worker SIGTERM.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt
