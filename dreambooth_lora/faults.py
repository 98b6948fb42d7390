"""Fault injection for the crash-safety bench (bench/faults.py) and its test.

With `DBL_FAULT=<point>:<n>` in the environment, the process kills itself with SIGKILL (as `kill -9` would)
the n-th time it passes `fault_point(<point>)`. Points: class_images (a class image written, the cache manifest not yet updated), step
(mid-step: gradients computed, weights not updated), checkpoint (checkpoint file written, not yet renamed
into place), saving (adapter file written in its staging folder; then again with the folder moved into the
library but its row not committed). Without the variable this costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

POINTS = ("class_images", "step", "checkpoint", "saving")
_passed: dict[str, int] = {}


def fault_point(name: str) -> None:
    wanted = os.environ.get("DBL_FAULT")
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
