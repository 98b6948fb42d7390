"""More than one machine (README "More than one machine"): jobs dispatched as Ray tasks, the library on PostgreSQL
and an S3-compatible store (moto's server), all on this machine's loopback.

The Ray engine runs on a local Ray told it has GPUs it does not have (training then runs on the CPU), and on a
`ray.cluster_utils.Cluster` of a head without GPUs and two nodes with one each. A job is held at a known place with
`DBL_PAUSE` (dreambooth_lora/faults.py) and released by creating a file, so nothing here depends on how fast the
machine is. Outside CI the tests skip when the cluster extra (ray, psycopg, s3fs, moto) or PostgreSQL
(`scripts/postgres`, which .ci/run starts) is missing; under CI they fail instead.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest
from live import wait_until

from dreambooth_lora.config import TrainConfig
from dreambooth_lora.jobs import Jobs, JobStatus, pid_alive
from dreambooth_lora.library import Library
from dreambooth_lora.tinyworld import subject_image_paths

pytestmark = pytest.mark.slow

IMAGES = subject_image_paths("bluecyan-box")[:3]
OBJECT_STORE_BYTES = 80 * 1024 * 1024  # each Ray node would take 30 % of the RAM by default
WAIT_SECONDS = 300  # an upper bound for a condition to come true, not a synchronisation


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        _missing(f"the cluster extra is not installed ({module}): pip install -e '.[cluster,test]'")


def _missing(problem: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"cluster test cannot run under CI: {problem}")
    pytest.skip(problem)


def wait_for(condition, what: str):
    """Check `condition()` (a read of the database or the store) until it holds."""
    return wait_until(condition, WAIT_SECONDS, what)


def submit(jobs: Jobs, name: str, steps: int = 4, **overrides) -> str:
    return jobs.create(TrainConfig(token=f"zq{name}", class_noun="box", base_model="builtin:tiny-random", name=name,
                                   steps=steps, num_class_images=1, train_token_embedding=False, **overrides), IMAGES)


def started_lines(jobs: Jobs, job_id: str) -> list[str]:
    return [line for line in jobs.read_log(job_id).splitlines() if " started on " in line]


class Dispatching:
    """A dispatcher in a thread of this process (the Ray driver), stopped on exit."""

    def __init__(self, library: Library, prior: Path, **options):
        from dreambooth_lora.ray_dispatch import Dispatcher

        self.dispatcher = Dispatcher(library, prior, say=lambda line: None, **options)
        self.passes = 0
        self.stop = threading.Event()
        original = self.dispatcher.step

        def counted_step():
            original()
            self.passes += 1

        self.dispatcher.step = counted_step
        self.thread = threading.Thread(target=self.dispatcher.run, args=(self.stop, 0.1), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(WAIT_SECONDS)

    def after_passes(self, count: int) -> None:
        """Wait until the dispatcher has made `count` more passes (each sees every job and task)."""
        target = self.passes + count
        wait_for(lambda: self.passes >= target, f"{count} dispatcher passes")


@pytest.fixture
def local_ray(request):
    """A private local Ray with `gpus` GPUs that it is told of (none exist)."""
    _require("ray")
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=request.param, object_store_memory=OBJECT_STORE_BYTES,
             include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def library(tmp_path, monkeypatch):
    monkeypatch.delenv("DBL_STORE_URL", raising=False)
    monkeypatch.delenv("DBL_DB_URL", raising=False)
    return Library(tmp_path / "data")


@pytest.mark.parametrize("local_ray", [2], indirect=True)
def test_six_queued_jobs_from_two_users_finish_on_local_ray_each_exactly_once(local_ray, library, tmp_path):
    users = {name: library.for_user(name) for name in ("alice", "bob")}
    owned = {name: [submit(Jobs(mine), f"{name}{i}") for i in range(3)] for name, mine in users.items()}
    jobs, ids = Jobs(library), owned["alice"] + owned["bob"]
    with Dispatching(library, tmp_path / "prior"):
        wait_for(lambda: all(jobs.get(i).status == JobStatus.DONE for i in ids), "six jobs done")
    for job_id in ids:
        assert len(started_lines(jobs, job_id)) == 1, jobs.read_log(job_id)  # claimed and trained once
        assert jobs.get(job_id).runner.node  # by a Ray task
    assert sorted(e.meta["job"] for e in library.list()) == sorted(ids)  # one adapter per job
    for name, mine in users.items():  # each adapter belongs to its job's user, as in the studio
        assert sorted(e.meta["job"] for e in mine.list()) == sorted(owned[name])


@pytest.mark.parametrize("local_ray", [1], indirect=True)
def test_a_second_job_waits_while_the_only_gpu_is_busy(local_ray, library, tmp_path, monkeypatch):
    release = tmp_path / "release"
    monkeypatch.setenv("DBL_PAUSE", f"step:2:{release}")  # every job holds in its second step until released
    jobs = Jobs(library)
    first, second = submit(jobs, "first"), submit(jobs, "second")
    with Dispatching(library, tmp_path / "prior") as dispatching:
        wait_for(lambda: jobs.get(first).status == JobStatus.RUNNING and jobs.get(first).step >= 1, "the first job training")
        dispatching.after_passes(5)  # both tasks are submitted; Ray has had time to start the second, and must not
        assert second in dispatching.dispatcher.running
        assert jobs.get(second).status == JobStatus.QUEUED and jobs.get(second).runner is None
        release.touch()
        wait_for(lambda: all(jobs.get(i).status == JobStatus.DONE for i in (first, second)), "both jobs done")
    first_done = next(m.started for m in jobs.phases(first) if m.phase == "done")
    second_started = min(m.started for m in jobs.phases(second))
    assert second_started >= first_done  # the GPU was free only then


@pytest.mark.parametrize("local_ray", [1], indirect=True)
def test_a_cancelled_job_stops_and_saves_nothing(local_ray, library, tmp_path, monkeypatch):
    monkeypatch.setenv("DBL_PAUSE", f"step:2:{tmp_path / 'never'}")  # held where the training loop cannot see a cancel
    jobs = Jobs(library)
    job_id = submit(jobs, "cancelled", steps=50)
    with Dispatching(library, tmp_path / "prior", cancel_grace=1.0):
        wait_for(lambda: jobs.get(job_id).step >= 1, "the job training")
        assert jobs.cancel(job_id) == JobStatus.CANCELLING
        job = wait_for(lambda: (j := jobs.get(job_id)).status not in (JobStatus.RUNNING, JobStatus.CANCELLING) and j,
                       "the job to stop")
    assert job.status == JobStatus.CANCELLED
    assert job.adapter_id is None and library.list() == []
    assert len(started_lines(jobs, job_id)) == 1


# ----------------------------------------------------------------- several nodes, PostgreSQL and S3


@pytest.fixture(scope="module")
def s3_endpoint():
    _require("moto")
    _require("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def postgres_url():
    """A new database on the PostgreSQL that .ci/run started (scripts/postgres)."""
    _require("psycopg")
    admin = os.environ.get("DBL_TEST_POSTGRES_URL")
    if not admin:
        _missing("no PostgreSQL for the test: eval \"$(scripts/postgres start)\" sets DBL_TEST_POSTGRES_URL")
    from sqlalchemy import create_engine, text

    name = f"dbl_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as db:
        db.execute(text(f"CREATE DATABASE {name}"))
    yield admin.rsplit("/", 1)[0] + f"/{name}"
    from dreambooth_lora.db import engine_for

    engine_for.cache_clear()  # close this process's pool before the database goes
    with engine.connect() as db:
        db.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    engine.dispose()


@pytest.fixture
def shared_library(tmp_path, monkeypatch, s3_endpoint, postgres_url):
    """A library whose rows are in PostgreSQL and whose files are in an S3 bucket (moto)."""
    import s3fs

    bucket = f"studio-{uuid.uuid4().hex[:8]}"
    for key, value in {"AWS_ENDPOINT_URL_S3": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "DBL_DB_URL": postgres_url,
                       "DBL_STORE_URL": f"s3://{bucket}/studio"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="test", secret="test").mkdir(bucket)
    return Library(tmp_path / "head-data")


@pytest.fixture
def ray_cluster():
    """A head without GPUs and two nodes with one (told of) GPU each, all on this machine."""
    _require("ray")
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "object_store_memory": OBJECT_STORE_BYTES, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=OBJECT_STORE_BYTES) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, cluster.head_node, nodes
    ray.shutdown()
    cluster.shutdown()


def test_a_job_whose_node_is_removed_resumes_on_the_other_node_from_its_checkpoint(ray_cluster, shared_library, tmp_path,
                                                                                     monkeypatch):
    cluster, head, nodes = ray_cluster
    release = tmp_path / "release"
    monkeypatch.setenv("DBL_PAUSE", f"step:5:{release}")  # held in step 5, after the checkpoint at step 4
    library, jobs = shared_library, Jobs(shared_library)
    store = library.store
    job_id = submit(jobs, "moved", steps=8, checkpoint_every=2)
    checkpoint_key = store.key(jobs.folder(job_id) / "checkpoint.safetensors")
    with Dispatching(library, tmp_path / "prior") as dispatching:
        first = wait_for(lambda: (j := jobs.get(job_id)).step >= 4 and j.runner and j.runner.node and j, "the job at step 4")
        wait_for(lambda: store.fs.invalidate_cache() or store.fs.exists(checkpoint_key), "its checkpoint in the store")
        running_on = next(n for n in nodes if n.node_id == first.runner.node)
        cluster.remove_node(running_on, allow_graceful=False)
        # Its worker process notices the lost raylet a moment later; released before that, it would train on
        # (and checkpoint step 6) on a node Ray has given up (README "More than one machine", known limits).
        wait_for(lambda: not pid_alive(first.runner.pid), "the first run gone with its node")
        release.touch()  # the run on the other node passes step 5 freely
        job = wait_for(lambda: (j := jobs.get(job_id)).status in (JobStatus.DONE, JobStatus.FAILED) and j, "the job done")
        assert job.status == JobStatus.DONE, job.error
        # more jobs, with one GPU node left: they land there, never on the head
        more = [submit(jobs, f"more{i}") for i in range(2)]
        wait_for(lambda: all(jobs.get(i).status == JobStatus.DONE for i in more), "two more jobs done")
        dispatching.after_passes(1)
    (other,) = [n for n in nodes if n is not running_on]
    assert job.requeues == 1
    lines = started_lines(jobs, job_id)
    assert len(lines) == 2 and running_on.node_id in lines[0] and other.node_id in lines[1], lines
    assert "resumed at step 4" in jobs.read_log(job_id)
    assert len(job.losses) == 8
    assert not pid_alive(first.runner.pid)  # the first run went with its node: nothing else wrote the job
    assert all(jobs.get(i).runner.node == other.node_id for i in more)
    assert head.node_id not in {jobs.get(i).runner.node for i in (job_id, *more)}
    # every adapter is whole in the store: another machine, with an empty data root, lists and loads each one
    from dreambooth_lora.adapter_file import read_adapter

    elsewhere = Library(tmp_path / "another-machine")
    names = sorted(e.name for e in elsewhere.list())
    assert names == ["more0", "more1", "moved"]
    for entry in elsewhere.list():
        assert read_adapter(entry.file).layers
    assert not [key for key in store.fs.find(store.base) if key.endswith(".part")]
