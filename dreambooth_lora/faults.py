"""Fault injection for the crash-safety bench (bench/faults.py) and its test.

With `DBL_FAULT=<point>:<n>` in the environment, the process kills itself with SIGKILL (as `kill -9` would)
the n-th time it passes `fault_point(<point>)`. Points: class_images (a class image written, the cache manifest not yet updated), step
(mid-step: gradients computed, weights not updated), checkpoint (checkpoint file written, not yet renamed
into place), saving (adapter file written in its staging folder; then again with the folder moved into the
library but its row not committed). Without the variable this costs one dictionary lookup.

With `DBL_PAUSE=<point>:<n>:<file>` the process instead waits at the n-th pass until `file` exists: tests hold a
job at a known place (a Ray node removed under it, a cancel that must escalate) and release it by creating the file.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

POINTS = ("class_images", "step", "checkpoint", "saving")
_passed: dict[str, int] = {}
_paused: dict[str, int] = {}


def fault_point(name: str) -> None:
    if os.environ.get("DBL_PAUSE"):
        _pause_point(name, os.environ["DBL_PAUSE"])
    wanted = os.environ.get("DBL_FAULT")
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _pause_point(name: str, wanted: str) -> None:
    point, count, release = wanted.split(":", 2)
    if point != name:
        return
    _paused[name] = _paused.get(name, 0) + 1
    if _paused[name] == int(count):
        while not Path(release).exists():
            time.sleep(0.05)
