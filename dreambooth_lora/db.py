"""The library database (SQLAlchemy Core): its tables and one engine per data root.

The default is the SQLite file `library.db` under the data root (WAL, so the UI reads while a trainer
writes). `DBL_DB_URL` names another database (e.g. PostgreSQL) for several machines.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from sqlalchemy import (Column, Float, Integer, MetaData, String, Table, Text, create_engine, event, inspect,
                        text)
from sqlalchemy.engine import Engine

metadata = MetaData()

adapters = Table(
    "adapters", metadata,
    Column("id", String, primary_key=True),
    Column("name", String, nullable=False, unique=True),
    Column("token", String), Column("class_noun", String), Column("base_model", String), Column("fingerprint", String),
    Column("rank", Integer), Column("alpha", Float), Column("steps", Integer), Column("created", Float),
    Column("size_bytes", Integer),
    Column("meta", Text, nullable=False),  # JSON
)

jobs = Table(
    "jobs", metadata,
    Column("id", String, primary_key=True),
    Column("status", String, nullable=False),  # a jobs.JobStatus value
    Column("config", Text, nullable=False),  # JSON: the TrainConfig fields
    Column("phase", String), Column("step", Integer, default=0), Column("total", Integer, default=0),
    Column("losses", Text, default="[]"),  # JSON list, one loss per step
    Column("message", Text, default=""), Column("error", Text),
    Column("error_kind", String),  # a jobs.ErrorKind value for a failed job: a person's mistake or a crash
    Column("adapter_id", String),
    # The runner: the process training the job (host, pid, when it started, its last heartbeat).
    Column("runner_host", String), Column("runner_pid", Integer), Column("runner_started", Float),
    Column("heartbeat", Float),
    Column("cancel_requested", Integer, default=0),
    Column("created", Float), Column("updated", Float),
    Column("runner_node", String),  # the Ray node of its runner (worker --engine ray)
    Column("requeues", Integer, default=0),  # times queued again after a lost runner (ray_dispatch.py)
)


def database_url(root: Path) -> str:
    return os.environ.get("DBL_DB_URL") or f"sqlite:///{Path(root).resolve() / 'library.db'}"


@lru_cache(maxsize=16)
def engine_for(url: str) -> Engine:
    """One engine (connection pool) per database URL in this process, with the tables created."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_settings(connection, _record):
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at each checkpoint of the log
    else:
        engine = create_engine(url, pool_pre_ping=True)
    _migrate(engine)
    metadata.create_all(engine)
    _add_missing_columns(engine)
    return engine


def _add_missing_columns(engine: Engine) -> None:
    """Tables from an older version get the nullable columns added since (their rows read them as empty)."""
    inspector = inspect(engine)
    for table in metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                kind = column.type.compile(dialect=engine.dialect)
                with engine.begin() as connection:
                    connection.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def _migrate(engine: Engine) -> None:
    """Data roots from before the jobs module kept jobs as `params` JSON with a `worker_pid`: convert them.
    Columns added since (error_kind: their failures read as crashes, resumable) come in _add_missing_columns."""
    names = inspect(engine).get_table_names()
    if "jobs" not in names or "params" not in {c["name"] for c in inspect(engine).get_columns("jobs")}:
        return
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE jobs RENAME TO jobs_v1"))
        jobs.create(connection)
        connection.execute(text(
            "INSERT INTO jobs (id, status, config, phase, step, total, losses, message, error, adapter_id, heartbeat,"
            " cancel_requested, created, updated) SELECT id, CASE status WHEN 'running' THEN 'interrupted' ELSE status END,"
            " json_extract(params, '$.config'), phase, step, total, losses, message, error, adapter_id, heartbeat,"
            " cancel_requested, created, updated FROM jobs_v1"))
        connection.execute(text("DROP TABLE jobs_v1"))
