"""Crash safety end to end: bench/faults.py kills training once in each phase and checks library and resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_a_kill_in_any_phase_leaves_a_sound_library_and_a_job_that_resumes():
    bench = Path(__file__).parents[1] / "bench" / "faults.py"
    run = subprocess.run([sys.executable, str(bench), "--kills", "1", "--json"], capture_output=True, text=True, timeout=1200)
    report = json.loads(run.stdout)
    assert report["failures"] == 0, [row for row in report["rows"] if row["failures"]]
    for point in ("class_images", "step", "checkpoint", "saving"):
        assert report["kills_per_phase"][point]["kills"] == 1
        assert report["kills_per_phase"][point]["phases"] == [{"step": "training"}.get(point, point)]
    workers = report["two_workers"]  # how the 6 jobs split between the 2 workers depends on timing; the count does not
    assert (workers["done"], workers["runs_per_job"], workers["adapters"], sum(workers["jobs_per_worker"])) == (6, [1], 6, 6)
    assert run.returncode == 0
