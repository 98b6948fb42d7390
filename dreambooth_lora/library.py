"""The adapter library: rows in the library database plus one folder per adapter under the data root.

Jobs live in the same database; `jobs.py` owns them.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from .db import adapters, database_url, engine_for, same
from .errors import UserError
from .faults import fault_point
from .paths import atomic_write_bytes, validate_name
from .store import store_for

PHOTOS_FOLDER = "photos"  # an adapter's copies of the subject photos it was trained on

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
    owner: str | None = None  # the user it belongs to (None: no one in particular)

    @property
    def file(self) -> Path:
        return self.folder / "adapter.safetensors"

    @property
    def adapter_type(self) -> str:
        """lora, dora, loha or lokr (adapters from before adapter types are lora)."""
        return self.meta.get("adapter_type", "lora")

    @property
    def trainable_params(self) -> int | None:
        """Learned values in the file (None for adapters stored before it was recorded)."""
        return self.meta.get("trainable_params")

    @property
    def samples(self) -> list[Path]:
        return sorted((self.folder / "samples").glob("*.png"))

    @property
    def photos(self) -> list[Path]:
        """The subject photos it was trained on (none for mixes, imports and adapters from before they were kept)."""
        return sorted(p for p in (self.folder / PHOTOS_FOLDER).glob("*") if not p.name.startswith("."))

    def summary(self) -> dict:
        return {
            "id": self.id, "name": self.name, "token": self.token, "class_noun": self.class_noun,
            "base_model": self.base_model, "fingerprint": self.fingerprint, "rank": self.rank,
            "alpha": self.alpha, "steps": self.steps, "created": self.created,
            "created_iso": time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created)),
            "size_bytes": self.size_bytes, "file": str(self.file), "samples": [str(p) for p in self.samples],
            "owner": self.owner,
        }


class Library:
    """Adapters under one data root; the database is the single source of truth for listings.

    A library acts for a user (`serve --users`): `for_user(name)` is a view that lists, reads, renames, exports and
    deletes only that user's adapters (another user's reads exactly like a missing one) and records the user as the
    owner of what it adds. `Library(root)` acts for no one in particular and, like an admin's view, sees every
    adapter; what it adds belongs to no one (owner NULL). Names are unique per owner.
    """

    def __init__(self, root: Path, user: str | None = None, admin: bool = True):
        self.root = Path(root)
        self.user, self.admin = user, admin
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "adapters").mkdir(exist_ok=True)
        (self.root / "jobs").mkdir(exist_ok=True)
        self.engine = engine_for(database_url(self.root))
        self.store = store_for(self.root)  # None: the data root is the store (store.py)

    def keep(self, *paths: Path) -> None:
        """Put files or folders under the data root in the store (nothing to do without one)."""
        if self.store is not None:
            for path in paths:
                self.store.put(path)

    # ----- whose -----
    def for_user(self, user: str | None, admin: bool = False) -> "Library":
        """The same library acting for `user`: only their adapters (all of them for an admin); adds are theirs."""
        return Library(self.root, user, admin)

    def everyone(self) -> "Library":
        """A view of every adapter (library-wide rules such as the identifiers in use), acting for no one."""
        return self if self.user is None and self.admin else Library(self.root)

    @property
    def history_root(self) -> Path:
        """Where this user's generation history lives (dreambooth_lora.history): the data root for no one."""
        return self.root if self.user is None else self.root / "users" / self.user

    def owns(self, owner: str | None) -> bool:
        """Whether a row with this owner is visible here."""
        return self.admin or owner == self.user

    def _mine(self, column):
        """The owner condition of rows this library acts on: NULL-safe equality with its user."""
        return same(column, self.user)

    def visible(self, query, owner=adapters.c.owner):
        """`query` restricted to the rows this library's user may see (every row for an admin); `owner` is the
        owner column of the table it reads: the adapters' by default, the jobs' for jobs.py."""
        return query if self.admin else query.where(self._mine(owner))

    # ----- adapters -----
    def new_adapter_id(self) -> str:
        return new_id()

    def add_adapter(self, staged_folder: Path, meta: dict) -> AdapterEntry:
        """Move a fully written staging folder into adapters/<id>/ and index it, all or nothing; it is this user's."""
        name = validate_name(meta["name"], "adapter name")
        adapter_id = meta["id"]
        final = self.root / "adapters" / adapter_id
        atomic_write_bytes(staged_folder / "meta.json", json.dumps(meta, indent=1, sort_keys=True).encode())
        size = (staged_folder / "adapter.safetensors").stat().st_size
        row = dict(id=adapter_id, name=name, token=meta.get("token", ""), class_noun=meta.get("class_noun", ""),
                   base_model=meta.get("base_model", ""), fingerprint=meta.get("fingerprint", ""),
                   rank=int(meta.get("rank", 0)), alpha=float(meta.get("alpha", 0)), steps=int(meta.get("steps", 0)),
                   created=float(meta.get("created", time.time())), size_bytes=size, meta=json.dumps(meta), owner=self.user)
        with self.engine.begin() as db:
            if db.execute(select(adapters.c.id).where(adapters.c.name == name, self._mine(adapters.c.owner))).first():
                raise UserError(f"An adapter named {name!r} already exists; choose another name.")
            # Folder first (in the store, then in place), row second, in one transaction: a crash between them
            # leaves an unlisted folder (never a listed adapter without its files); a failed insert moves it back.
            if self.store is not None:
                self.store.put(staged_folder, as_path=final)
            staged_folder.rename(final)
            fault_point("saving")  # the folder is in place, its row not yet committed
            try:
                db.execute(insert(adapters).values(**row))
            except IntegrityError:  # the same name added by another process a moment ago
                final.rename(staged_folder)
                self._unstore(final)
                raise UserError(f"An adapter named {name!r} already exists; choose another name.") from None
            except BaseException:
                final.rename(staged_folder)
                self._unstore(final)
                raise
        return self.get(adapter_id)

    def staging_folder(self) -> Path:
        folder = self.root / "adapters" / f".staging-{uuid.uuid4().hex}"
        folder.mkdir(parents=True)
        return folder

    def name_taken(self, name: str) -> bool:
        """Whether an adapter this library would add could not have this name (names are unique per owner)."""
        with self.engine.connect() as db:
            return db.execute(select(adapters.c.id).where(adapters.c.name == name, self._mine(adapters.c.owner))).first() is not None

    def check_new_name(self, name: str) -> str:
        """`name` if it is valid and free in the library, else a UserError."""
        validate_name(name, "adapter name")
        if self.name_taken(name):
            raise UserError(f"An adapter named {name!r} already exists; choose another --name.")
        return name

    def free_name(self, base: str) -> str:
        """`base`, or `base-2`, `base-3`, ... : the first name not yet in the library."""
        name, suffix = base, 2
        while self.name_taken(name):
            name, suffix = f"{base}-{suffix}", suffix + 1
        return name

    def list(self) -> list[AdapterEntry]:
        with self.engine.connect() as db:
            rows = db.execute(self.visible(select(adapters)).order_by(adapters.c.created.desc())).mappings().all()
        return [self._entry(row) for row in rows]

    def get(self, name_or_id: str) -> AdapterEntry:
        """By id, else by name; an admin seeing several adapters of that name gets their own (else names the ids)."""
        with self.engine.connect() as db:
            rows = db.execute(self.visible(select(adapters)).where(
                or_(adapters.c.name == name_or_id, adapters.c.id == name_or_id))).mappings().all()
        rows = [r for r in rows if r["id"] == name_or_id] or rows
        if len(rows) > 1:
            rows = [r for r in rows if r["owner"] == self.user] or rows
        if len(rows) > 1:
            ids = ", ".join(f"{r['id']} ({r['owner'] or 'no user'})" for r in rows)
            raise UserError(f"Several users have an adapter named {name_or_id!r}; name one by its id: {ids}.")
        if not rows:
            known = ", ".join(e.name for e in self.list()[:10]) or "none yet"
            raise UserError(f"No adapter named {name_or_id!r} in the library (known: {known}).")
        return self._entry(rows[0])

    def rename(self, name: str, new_name: str) -> AdapterEntry:
        entry = self.get(name)
        validate_name(new_name, "adapter name")
        meta = dict(entry.meta, name=new_name)
        with self.engine.begin() as db:
            if db.execute(select(adapters.c.id).where(adapters.c.name == new_name, same(adapters.c.owner, entry.owner), adapters.c.id != entry.id)).first():
                raise UserError(f"An adapter named {new_name!r} already exists.")
            db.execute(update(adapters).where(adapters.c.id == entry.id).values(name=new_name, meta=json.dumps(meta)))
        atomic_write_bytes(entry.folder / "meta.json", json.dumps(meta, indent=1, sort_keys=True).encode())
        self.keep(entry.folder / "meta.json")
        return self.get(entry.id)

    def delete(self, name: str) -> None:
        """Remove the row first (so listings never show a half-deleted adapter), then the files."""
        entry = self.get(name)
        trash = entry.folder.with_name(f".deleted-{entry.id}")
        with self.engine.begin() as db:
            db.execute(delete(adapters).where(adapters.c.id == entry.id))
            entry.folder.rename(trash)
        self._unstore(entry.folder)
        shutil.rmtree(trash, ignore_errors=True)

    def _unstore(self, folder: Path) -> None:
        if self.store is not None:
            self.store.remove(folder)

    def _entry(self, row) -> AdapterEntry:
        folder = self.root / "adapters" / row["id"]
        if self.store is not None and not folder.is_dir():  # trained or imported on another machine
            self.store.fetch(folder)
        return AdapterEntry(
            id=row["id"], name=row["name"], token=row["token"], class_noun=row["class_noun"],
            base_model=row["base_model"], fingerprint=row["fingerprint"], rank=row["rank"], alpha=row["alpha"],
            steps=row["steps"], created=row["created"], size_bytes=row["size_bytes"], meta=json.loads(row["meta"]),
            folder=folder, owner=row["owner"],
        )


def new_id() -> str:
    """A sortable, unique id for an adapter or a job: its creation time plus 6 random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
