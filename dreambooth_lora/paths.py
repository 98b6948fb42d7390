"""Where on-disk state lives, and validation of names before they become paths."""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+-]{0,79}$")


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: the flag, else $DBL_HOME, else ./studio_data."""
    root = Path(explicit or os.environ.get("DBL_HOME") or "studio_data")
    root.mkdir(parents=True, exist_ok=True)
    return root


def prior_root(explicit: str | os.PathLike | None = None) -> Path:
    """The class-prior cache: the flag, else $DBL_PRIOR_DIR, else ./prior_data (shared by data roots)."""
    return Path(explicit or os.environ.get("DBL_PRIOR_DIR") or "prior_data")


def validate_name(name: str, what: str = "name") -> str:
    """Return `name` if it is safe as a display name and folder name, else raise UserError."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name or name.strip() != name:
        raise UserError(
            f"Invalid {what} {name!r}: use 1-80 letters, digits, spaces, '.', '_', '+' or '-', "
            "starting with a letter or digit, and no '..'."
        )
    return name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a crash leaves the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
