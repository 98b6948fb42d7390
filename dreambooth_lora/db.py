"""The library database (SQLAlchemy Core): its tables and one engine per data root.

The default is the SQLite file `library.db` under the data root (WAL, so the UI reads while a trainer
writes). `DBL_DB_URL` names another database (e.g. PostgreSQL) for several machines.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from sqlalchemy import (Column, Float, Index, Integer, MetaData, String, Table, Text, create_engine, event, inspect,
                        text)
from sqlalchemy.engine import Engine

metadata = MetaData()

adapters = Table(
    "adapters", metadata,
    Column("id", String, primary_key=True),
    Column("name", String, nullable=False),  # unique per owner (the indexes below)
    Column("token", String), Column("class_noun", String), Column("base_model", String), Column("fingerprint", String),
    Column("rank", Integer), Column("alpha", Float), Column("steps", Integer), Column("created", Float),
    Column("size_bytes", Integer),
    Column("meta", Text, nullable=False),  # JSON
    # The user (of `serve --users`) it belongs to; NULL: no one in particular (the CLI's, or from before users).
    # Not "user": a reserved word in PostgreSQL.
    Column("owner", String),
)
# Names are unique per owner (two users may both have "dog"); NULL owners are one more namespace, which a plain
# UNIQUE (owner, name) would not enforce (NULLs differ in SQL), hence the partial index.
Index("adapters_owner_name", adapters.c.owner, adapters.c.name, unique=True)
Index("adapters_unowned_name", adapters.c.name, unique=True,
      sqlite_where=adapters.c.owner.is_(None), postgresql_where=adapters.c.owner.is_(None))

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
    Column("owner", String),  # as adapters.owner; the adapter a job saves gets its job's owner
)


def database_url(root: Path) -> str:
    return os.environ.get("DBL_DB_URL") or f"sqlite:///{Path(root).resolve() / 'library.db'}"


def same(column, value):
    """`column = value`, NULL-safe (SQL's `= NULL` is never true): for owners and the runner fields."""
    return column.is_(None) if value is None else column == value


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
    """Tables from an older version get the nullable columns added since (their rows read them as empty; `owner`:
    their rows belong to no one)."""
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
    Columns added since (error_kind: their failures read as crashes, resumable) come in _add_missing_columns.
    Adapters tables from before users had `name` unique across the library: rebuilt with names unique per owner."""
    names = inspect(engine).get_table_names()
    if "adapters" in names and _name_unique_alone(engine):
        _rebuild_adapters(engine)
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


def _name_unique_alone(engine: Engine) -> str | None:
    """The name of the adapters table's library-wide UNIQUE(name) of before users, if it still has one."""
    inspector = inspect(engine)
    found = [c for c in inspector.get_unique_constraints("adapters") if c["column_names"] == ["name"]]
    found += [i for i in inspector.get_indexes("adapters") if i.get("unique") and i["column_names"] == ["name"]
              and i["name"] != "adapters_unowned_name"]
    return (found[0]["name"] or "unnamed") if found else None


def _rebuild_adapters(engine: Engine) -> None:
    """Names unique per owner instead: SQLite cannot drop a column's UNIQUE, so its table is copied into one of
    today's shape (one transaction); other databases drop the constraint and get the indexes."""
    if engine.dialect.name != "sqlite":
        constraint = _name_unique_alone(engine)
        with engine.begin() as connection:
            connection.execute(text(f'ALTER TABLE adapters DROP CONSTRAINT "{constraint}"'))
            if "owner" not in {c["name"] for c in inspect(connection).get_columns("adapters")}:
                connection.execute(text('ALTER TABLE adapters ADD COLUMN "owner" VARCHAR'))
            for index in adapters.indexes:
                index.create(connection)
        return
    old = [c["name"] for c in inspect(engine).get_columns("adapters")]
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE adapters RENAME TO adapters_v1"))
        adapters.create(connection)
        columns = ", ".join(f'"{c.name}"' for c in adapters.columns if c.name in old)
        connection.execute(text(f"INSERT INTO adapters ({columns}) SELECT {columns} FROM adapters_v1"))
        connection.execute(text("DROP TABLE adapters_v1"))
