"""The adapter store: durable copies of adapter folders, job photos and checkpoints at `DBL_STORE_URL`.

Without `DBL_STORE_URL` the data root is the store (one machine; nothing here runs). With it — `s3://bucket/prefix`
(an S3-compatible server is named by the standard `AWS_ENDPOINT_URL_S3`, credentials by the usual `AWS_*`
variables), or any fsspec URL such as `file:///mnt/shared/studio` — the data root becomes this machine's working
copy, and the store holds the same tree under the URL: `adapters/<id>/…` and `jobs/<id>/…`. The rules:

- what a row points at is put in the store before the row is committed (a job's photos before its row, an
  adapter's folder before its row), so no machine ever lists something the store lacks;
- a checkpoint is put after it is written locally, so a job resumes on another machine from its last checkpoint;
  beside it goes a step record (`<key>.step`, the step as text), so a machine that has a checkpoint of its own
  downloads the store's only when it continues from a later step;
- a machine that lacks a folder fetches it when it needs it (`fetch`), so any machine can generate with any
  adapter and train any job.

fsspec (a dependency of the `cluster` extra) does the transport. Each object is put whole: an S3 PUT is atomic,
and on a local or mounted filesystem the object is written under a temporary name and renamed, so a reader sees
the old object or the new one, never half of one.
"""

from __future__ import annotations

import os
import uuid
from functools import lru_cache
from pathlib import Path

from .errors import UserError

STORE_ENV = "DBL_STORE_URL"
STEP_SUFFIX = ".step"  # beside a checkpoint in the store: the step it continues from (a fetch compares this)


class Store:
    """One store URL, mirrored by one data root on this machine."""

    def __init__(self, url: str, root: Path):
        try:
            import fsspec
        except ImportError:  # the cluster extra is not installed
            raise UserError(f"{STORE_ENV}={url} needs fsspec: pip install -e '.[cluster]'.") from None
        self.url, self.root = url, Path(root).resolve()
        self.fs, base = fsspec.core.url_to_fs(url)
        self.base = base.rstrip("/")
        self.renames = "file" in _protocols(self.fs)  # a local or mounted filesystem: write, then rename

    def key(self, local: Path) -> str:
        """The object name of a path under the data root: the same relative path under the store's base."""
        return f"{self.base}/{Path(local).resolve().relative_to(self.root).as_posix()}"

    # ----- putting -----
    def put(self, local: Path, as_path: Path | None = None) -> None:
        """Put a file, or every file under a folder (dotfiles skipped: temporaries), at `as_path`'s key (default:
        its own)."""
        local = Path(local)
        target = Path(as_path) if as_path is not None else local
        if local.is_dir():
            for path in sorted(p for p in local.rglob("*") if p.is_file() and not _hidden(p.relative_to(local))):
                self._put_file(path, self.key(target / path.relative_to(local)))
        elif local.is_file():
            self._put_file(local, self.key(target))

    def _put_file(self, local: Path, key: str) -> None:
        step = _checkpoint_step(local) if local.name.endswith(".safetensors") else None
        self._put_object(key, lambda target: self.fs.put_file(str(local), target))
        if step is not None:  # after the checkpoint: a record never names a step the store does not have yet
            self._put_object(key + STEP_SUFFIX, lambda target: self.fs.pipe_file(target, str(step).encode()))

    def _put_object(self, key: str, write) -> None:
        if not self.renames:
            write(key)
            return
        partial = f"{key}.{uuid.uuid4().hex[:8]}.part"
        self.fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
        write(partial)
        self.fs.mv(partial, key)

    def remove(self, local: Path) -> None:
        """Remove the objects of a file or folder (nothing there is fine)."""
        try:
            self.fs.rm(self.key(local), recursive=True)
        except FileNotFoundError:
            pass

    # ----- fetching -----
    def fetch(self, local: Path, refresh: bool = False) -> bool:
        """Bring the objects under a folder's key into the folder: the ones this machine lacks (with `refresh`,
        every one; a checkpoint only when the store's continues from a later step). Returns whether the store
        had anything there."""
        local = Path(local)
        prefix = self.key(local)
        self.fs.invalidate_cache(prefix)  # other machines write here: no listing cached from before
        try:
            remote = [p for p in self.fs.find(prefix) if not p.endswith(".part")]
        except FileNotFoundError:
            remote = []
        recorded = {key.removesuffix(STEP_SUFFIX) for key in remote if key.endswith(STEP_SUFFIX)}
        for key in remote:
            if key.endswith(STEP_SUFFIX):
                continue
            path = local / key[len(prefix) + 1:]
            # What this machine has stands (objects are written once), except a checkpoint the store holds at a
            # later step: its step record, a few bytes, says so without downloading the checkpoint.
            if path.exists() and not refresh and not (key in recorded and self._later_step(key, path)):
                continue
            self._fetch_file(key, path)
        return bool(remote)

    def _later_step(self, key: str, path: Path) -> bool:
        """Whether the store's checkpoint at `key` continues from a later step than the local one at `path`."""
        theirs, ours = int(self.fs.cat_file(key + STEP_SUFFIX)), _checkpoint_step(path)
        return ours is not None and theirs > ours  # (a local file that is no checkpoint stands: _older_or_same)

    def fetch_file(self, local: Path) -> None:
        """Bring one file (a log, the phases) up to date from the store, when the store has it."""
        key = self.key(local)
        self.fs.invalidate_cache(key)
        if self.fs.exists(key):
            self._fetch_file(key, Path(local))

    def _fetch_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.fs.get_file(key, str(tmp))
            if path.name.endswith(".safetensors") and path.exists() and _older_or_same(tmp, path):
                return  # this machine's checkpoint is as new (its put may have failed: it is put again)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _older_or_same(fetched: Path, local: Path) -> bool:
    """A fetched checkpoint that does not continue from a later step than the local one; adapter files (no step
    in their header) are the same object once written, so the local copy stands."""
    theirs, ours = _checkpoint_step(fetched), _checkpoint_step(local)
    return theirs is None or ours is None or theirs <= ours


def _checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint file (its header's); None for a missing file or one that is not a checkpoint."""
    from .checkpoint import checkpoint_step  # torch: only where checkpoints are compared

    try:
        return checkpoint_step(path)
    except (KeyError, TypeError):  # no step in its header: an adapter file or a meter point's tensors
        return None


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _protocols(fs) -> tuple:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def store_for(root: Path) -> Store | None:
    """The store of a data root: None when `DBL_STORE_URL` is unset (the data root is the store)."""
    url = os.environ.get(STORE_ENV)
    return _store(url, str(Path(root).resolve())) if url else None


@lru_cache(maxsize=8)
def _store(url: str, root: str) -> Store:
    return Store(url, Path(root))
