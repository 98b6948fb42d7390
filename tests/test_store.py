"""The store by URL (dreambooth_lora/store.py): two data roots ("machines") share one database and one store, here
a `file://` folder (fsspec's local filesystem; tests/test_cluster.py runs the same on S3 with moto)."""

from __future__ import annotations

import os
import threading
import time

import pytest
from safetensors.torch import save_file

from dreambooth_lora.checkpoint import checkpoint_step
from dreambooth_lora import jobs as jobs_module
from dreambooth_lora.config import TrainConfig
from dreambooth_lora.jobs import Jobs, JobStatus, Runner, run_job
from dreambooth_lora.library import Library
from dreambooth_lora.store import Store
from dreambooth_lora.tinyworld import subject_image_paths

pytest.importorskip("fsspec")

IMAGES = subject_image_paths("bluecyan-box")[:3]


@pytest.fixture
def machines(tmp_path, monkeypatch):
    """Two data roots on one database and one store."""
    monkeypatch.setenv("DBL_DB_URL", f"sqlite:///{tmp_path / 'shared.db'}")
    monkeypatch.setenv("DBL_STORE_URL", f"file://{tmp_path / 'store'}")
    return Library(tmp_path / "one"), Library(tmp_path / "two")


def submit(library: Library, name: str, steps: int, **overrides) -> str:
    return Jobs(library).create(TrainConfig(token="zqx", class_noun="box", base_model="builtin:tiny-random", name=name,
                                            steps=steps, num_class_images=1, train_token_embedding=False, **overrides),
                                IMAGES)


def runner_on(machine: str) -> Runner:
    """This process as a runner on another machine (the two data roots share this host in the tests)."""
    now = time.time()
    return Runner(f"machine-{machine}", os.getpid(), now, now)


def test_put_fetch_and_remove_mirror_the_data_root(tmp_path):
    root = tmp_path / "root"
    (root / "jobs" / "a" / "images").mkdir(parents=True)
    (root / "jobs" / "a" / "images" / "00.png").write_bytes(b"one")
    (root / "jobs" / "a" / ".hidden.tmp").write_bytes(b"temporary")
    store = Store(f"file://{tmp_path / 'store'}", root)
    store.put(root / "jobs" / "a")
    assert sorted(p.relative_to(tmp_path / "store").as_posix() for p in (tmp_path / "store").rglob("*") if p.is_file()) \
        == ["jobs/a/images/00.png"]  # dotfiles (temporaries) stay behind; no partial objects are left
    other = Store(f"file://{tmp_path / 'store'}", tmp_path / "other")
    assert other.fetch(tmp_path / "other" / "jobs" / "a")
    assert (tmp_path / "other" / "jobs" / "a" / "images" / "00.png").read_bytes() == b"one"
    assert not other.fetch(tmp_path / "other" / "jobs" / "missing")
    store.remove(root / "jobs" / "a")
    assert not list((tmp_path / "store").rglob("*.png"))


def test_a_fetch_downloads_a_checkpoint_only_when_the_stored_one_continues_from_a_later_step(tmp_path, monkeypatch):
    import torch

    from dreambooth_lora.checkpoint import save_checkpoint

    url = f"file://{tmp_path / 'store'}"
    there, here = Store(url, tmp_path / "there"), Store(url, tmp_path / "here")

    def write_checkpoint(root, step: int) -> None:
        weight = torch.nn.Parameter(torch.full((2,), float(step)))
        save_checkpoint(root / "jobs" / "a" / "checkpoint.safetensors", {"w": weight}, torch.optim.AdamW([weight]),
                        torch.Generator(), step, [0.5] * step)

    (tmp_path / "there" / "jobs" / "a" / "meter").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "there" / "jobs" / "a" / "meter" / "step-00002.safetensors"))
    write_checkpoint(tmp_path / "there", 4)
    there.put(tmp_path / "there" / "jobs" / "a")
    downloaded = []
    get_file = here.fs.get_file
    monkeypatch.setattr(here.fs, "get_file", lambda key, *args, **kwargs: downloaded.append(key.rsplit("/", 1)[1])
                        or get_file(key, *args, **kwargs))
    folder = tmp_path / "here" / "jobs" / "a"
    here.fetch(folder)
    assert sorted(downloaded) == ["checkpoint.safetensors", "step-00002.safetensors"]  # what this machine lacked
    assert not list(folder.rglob("*.step"))  # the step record stays in the store
    downloaded.clear()
    here.fetch(folder)
    assert downloaded == []  # the same step: nothing downloaded
    write_checkpoint(tmp_path / "there", 6)
    there.put(tmp_path / "there" / "jobs" / "a" / "checkpoint.safetensors")
    here.fetch(folder)
    assert downloaded == ["checkpoint.safetensors"] and checkpoint_step(folder / "checkpoint.safetensors") == 6
    downloaded.clear()
    write_checkpoint(tmp_path / "here", 9)  # this machine got further than the store's step 8
    write_checkpoint(tmp_path / "there", 8)
    there.put(tmp_path / "there" / "jobs" / "a" / "checkpoint.safetensors")
    here.fetch(folder)
    assert downloaded == [] and checkpoint_step(folder / "checkpoint.safetensors") == 9


def test_a_job_created_on_one_machine_trains_on_another_and_its_adapter_is_seen_by_both(machines, tmp_path):
    one, two = machines
    job_id = submit(one, "moved", steps=3)
    assert not (two.root / "jobs" / job_id).exists()
    jobs_two = Jobs(two)
    jobs_two.claim(job_id, runner_on("two"))
    job = run_job(jobs_two, job_id, tmp_path / "prior")  # fetches the photos from the store
    assert job.status == JobStatus.DONE, job.error
    entry = one.get("moved")  # the adapter's folder comes from the store to the first machine
    assert entry.file.is_file() and entry.samples and entry.photos
    assert "saved adapter moved" in Jobs(one).read_log(job_id)  # the runner's log lines, as the store has them
    one.delete("moved")
    assert not list((tmp_path / "store" / "adapters").rglob("*"))


def test_an_interrupted_job_resumes_on_another_machine_from_the_stored_checkpoint(machines, tmp_path):
    one, two = machines
    job_id = submit(one, "resumed", steps=6, checkpoint_every=2)
    jobs_one, stop = Jobs(one), threading.Event()

    def stop_at_step_3(_job_id, progress) -> None:
        if progress.phase == "training" and progress.step >= 3:
            stop.set()

    jobs_one.claim(job_id, Runner.this_process())
    assert run_job(jobs_one, job_id, tmp_path / "prior", observer=stop_at_step_3, stop=stop).status == JobStatus.INTERRUPTED
    stored = Store(f"file://{tmp_path / 'store'}", two.root)
    stored.fetch(two.root / "jobs" / job_id)
    assert checkpoint_step(two.root / "jobs" / job_id / "checkpoint.safetensors") == 3  # the stop's own checkpoint
    jobs_two = Jobs(two)
    jobs_two.resume(job_id)
    jobs_two.claim(job_id, Runner.this_process())
    job = run_job(jobs_two, job_id, tmp_path / "prior")
    assert job.status == JobStatus.DONE and len(job.losses) == 6
    assert "resumed at step 3" in jobs_two.read_log(job_id)


def test_a_jobs_log_comes_from_the_store_only_when_its_runner_is_another_machine_and_not_at_every_read(machines,
                                                                                                       monkeypatch):
    one, _ = machines
    jobs = Jobs(one)
    job_id = submit(one, "watched", steps=3)
    log, store = jobs.folder(job_id) / "log.txt", one.store
    monkeypatch.setattr(jobs_module, "STORE_REFRESH_SECONDS", 0.0)
    jobs.claim(job_id, Runner.this_process())
    store.fs.pipe_file(store.key(log), b"a line this machine's runner never wrote\n")
    assert "never wrote" not in jobs.read_log(job_id)  # the runner is here: its own copy, the store is not asked
    jobs.update(job_id, runner_host="machine-two")  # now another machine runs it
    assert "never wrote" in jobs.read_log(job_id)
    monkeypatch.setattr(jobs_module, "STORE_REFRESH_SECONDS", 3600.0)
    store.fs.pipe_file(store.key(log), b"a newer line\n")
    assert "newer" not in jobs.read_log(job_id)  # asked a moment ago: not again within the interval
    monkeypatch.setattr(jobs_module, "STORE_REFRESH_SECONDS", 0.0)
    assert "newer" in jobs.read_log(job_id)
