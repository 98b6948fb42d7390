"""The adapter library and job table: SQLite index plus one folder per adapter under the data root."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .paths import atomic_write_bytes, validate_name

SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token TEXT, class_noun TEXT, base_model TEXT, fingerprint TEXT,
    rank INTEGER, alpha REAL, steps INTEGER, created REAL, size_bytes INTEGER,
    meta TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,          -- queued, running, done, failed, cancelled, interrupted
    params TEXT NOT NULL,          -- JSON: TrainConfig fields and image paths
    phase TEXT, step INTEGER DEFAULT 0, total INTEGER DEFAULT 0,
    losses TEXT DEFAULT '[]', message TEXT DEFAULT '', error TEXT,
    adapter_id TEXT, worker_pid INTEGER, heartbeat REAL, cancel_requested INTEGER DEFAULT 0,
    created REAL, updated REAL
);
"""


@dataclass(frozen=True)
class AdapterEntry:
    id: str
    name: str
    token: str
    class_noun: str
    base_model: str
    fingerprint: str
    rank: int
    alpha: float
    steps: int
    created: float
    size_bytes: int
    meta: dict
    folder: Path

    @property
    def file(self) -> Path:
        return self.folder / "adapter.safetensors"

    @property
    def samples(self) -> list[Path]:
        return sorted((self.folder / "samples").glob("*.png"))

    def summary(self) -> dict:
        return {
            "id": self.id, "name": self.name, "token": self.token, "class_noun": self.class_noun,
            "base_model": self.base_model, "fingerprint": self.fingerprint, "rank": self.rank,
            "alpha": self.alpha, "steps": self.steps, "created": self.created,
            "created_iso": time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created)),
            "size_bytes": self.size_bytes, "file": str(self.file), "samples": [str(p) for p in self.samples],
        }


class Library:
    """Adapters and jobs under one data root; library.db is the single source of truth for listings."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "adapters").mkdir(exist_ok=True)
        (self.root / "jobs").mkdir(exist_ok=True)
        with self._db() as db:
            db.executescript(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / "library.db", timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        return _Closing(db)

    # ----- adapters -----
    def new_adapter_id(self) -> str:
        return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]

    def add_adapter(self, staged_folder: Path, meta: dict) -> AdapterEntry:
        """Move a fully written staging folder into adapters/<id>/ and index it, all or nothing."""
        name = validate_name(meta["name"], "adapter name")
        adapter_id = meta["id"]
        final = self.root / "adapters" / adapter_id
        atomic_write_bytes(staged_folder / "meta.json", json.dumps(meta, indent=1, sort_keys=True).encode())
        size = (staged_folder / "adapter.safetensors").stat().st_size
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            if db.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone():
                db.execute("ROLLBACK")
                raise UserError(f"An adapter named {name!r} already exists; choose another --name.")
            staged_folder.rename(final)
            try:
                db.execute(
                    "INSERT INTO adapters VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (adapter_id, name, meta.get("token", ""), meta.get("class_noun", ""), meta.get("base_model", ""),
                     meta.get("fingerprint", ""), int(meta.get("rank", 0)), float(meta.get("alpha", 0)),
                     int(meta.get("steps", 0)), float(meta.get("created", time.time())), size, json.dumps(meta)),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                final.rename(staged_folder)
                raise
        return self.get(name)

    def staging_folder(self) -> Path:
        folder = self.root / "adapters" / f".staging-{uuid.uuid4().hex}"
        folder.mkdir(parents=True)
        return folder

    def name_taken(self, name: str) -> bool:
        with self._db() as db:
            return db.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone() is not None

    def list(self) -> list[AdapterEntry]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM adapters ORDER BY created DESC").fetchall()
        return [self._entry(row) for row in rows]

    def get(self, name_or_id: str) -> AdapterEntry:
        with self._db() as db:
            row = db.execute("SELECT * FROM adapters WHERE name = ? OR id = ?", (name_or_id, name_or_id)).fetchone()
        if row is None:
            known = ", ".join(e.name for e in self.list()[:10]) or "none yet"
            raise UserError(f"No adapter named {name_or_id!r} in the library (known: {known}).")
        return self._entry(row)

    def rename(self, name: str, new_name: str) -> AdapterEntry:
        entry = self.get(name)
        validate_name(new_name, "adapter name")
        meta = dict(entry.meta, name=new_name)
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            if db.execute("SELECT 1 FROM adapters WHERE name = ? AND id != ?", (new_name, entry.id)).fetchone():
                db.execute("ROLLBACK")
                raise UserError(f"An adapter named {new_name!r} already exists.")
            db.execute("UPDATE adapters SET name = ?, meta = ? WHERE id = ?", (new_name, json.dumps(meta), entry.id))
            db.execute("COMMIT")
        atomic_write_bytes(entry.folder / "meta.json", json.dumps(meta, indent=1, sort_keys=True).encode())
        return self.get(entry.id)

    def delete(self, name: str) -> None:
        """Remove the row first (so listings never show a half-deleted adapter), then the files."""
        entry = self.get(name)
        trash = entry.folder.with_name(f".deleted-{entry.id}")
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM adapters WHERE id = ?", (entry.id,))
            entry.folder.rename(trash)
            db.execute("COMMIT")
        shutil.rmtree(trash, ignore_errors=True)

    def _entry(self, row) -> AdapterEntry:
        return AdapterEntry(
            id=row["id"], name=row["name"], token=row["token"], class_noun=row["class_noun"],
            base_model=row["base_model"], fingerprint=row["fingerprint"], rank=row["rank"], alpha=row["alpha"],
            steps=row["steps"], created=row["created"], size_bytes=row["size_bytes"], meta=json.loads(row["meta"]),
            folder=self.root / "adapters" / row["id"],
        )

    # ----- jobs -----
    def job_folder(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def create_job(self, params: dict, status: str = "queued") -> str:
        job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.job_folder(job_id).mkdir(parents=True)
        now = time.time()
        with self._db() as db:
            db.execute(
                "INSERT INTO jobs (id, status, params, phase, created, updated) VALUES (?,?,?,?,?,?)",
                (job_id, status, json.dumps(params), "queued", now, now),
            )
        return job_id

    def job(self, job_id: str) -> dict:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UserError(f"No job {job_id!r} under {self.root}.")
        return _job_dict(row)

    def jobs(self, statuses: tuple[str, ...] | None = None) -> list[dict]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs ORDER BY created DESC").fetchall()
        return [_job_dict(r) for r in rows if statuses is None or r["status"] in statuses]

    def update_job(self, job_id: str, **fields) -> None:
        if "losses" in fields:
            fields["losses"] = json.dumps(fields["losses"])
        if "params" in fields:
            fields["params"] = json.dumps(fields["params"])
        fields["updated"] = time.time()
        columns = ", ".join(f"{key} = ?" for key in fields)
        with self._db() as db:
            db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))

    def claim_next_job(self, worker_pid: int) -> dict | None:
        """Atomically take the oldest queued job for this worker."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY created LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            now = time.time()
            db.execute(
                "UPDATE jobs SET status='running', worker_pid=?, heartbeat=?, updated=?, phase='preparing', error=NULL "
                "WHERE id=?", (worker_pid, now, now, row["id"]),
            )
            db.execute("COMMIT")
        return self.job(row["id"])


class _Closing:
    """sqlite3 connection as a context manager that closes (the stdlib one only commits)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, *exc) -> None:
        self.db.close()


def _job_dict(row) -> dict:
    job = dict(row)
    job["params"] = json.loads(job["params"])
    job["losses"] = json.loads(job["losses"] or "[]")
    return job
