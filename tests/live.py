"""Helpers for tests that run the real thing: a free loopback port, the studio as a child process, waiting for a
state the code promises to reach (an upper bound on a promise under test, not a synchronisation by sleeping)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, seconds: float, what: str):
    """`predicate()`'s first true value; fails when it is not true within `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {seconds} s: {what}")


@contextmanager
def running_studio(args: list[str], log_path: Path, stop_seconds: float = 60):
    """`python -m app --port P *args` until the block ends (then SIGTERM, as a person stopping it); yields its URL."""
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), *map(str, args)],
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"

        def answers() -> bool:
            if process.poll() is not None:
                raise AssertionError("the studio exited:\n" + log_path.read_text()[-3000:])
            try:
                urllib.request.urlopen(url, timeout=2)
                return True
            except OSError:
                return False

        try:
            wait_until(answers, 120, "the studio answers")
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(stop_seconds)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
