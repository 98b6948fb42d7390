"""The users file of `serve --users FILE`: who may log in, with what password, and who is an admin.

One user a line, `name:hash` or `name:hash:admin`; blank lines and lines starting with `#` are skipped. The hash
is `scrypt$N$r$p$salt$key` (salt and key in base64), so a file states how each password was hashed and a later
change of the cost keeps old lines valid. `dreambooth-lora users add NAME --users FILE` writes one (the password
from stdin); the file is never written with a plain password. docs/DESIGN.md, "Users", has the rules.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .paths import atomic_write_bytes

# scrypt's cost: 2**14 x 8 x 128 bytes = 16 MiB and ~50 ms a login; RFC 7914's interactive-login figures
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SALT_BYTES, KEY_BYTES = 16, 32
ADMIN = "admin"
# also the name of the user's history folder (generations), so a path part: no ':', '/', '..' or spaces
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    admin: bool = False

    def line(self) -> str:
        return f"{self.name}:{self.password_hash}" + (f":{ADMIN}" if self.admin else "")


def validate_user_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise UserError(f"Invalid user name {name!r}: use 1-40 letters, digits, '_', '.' or '-', starting with a letter or digit.")
    return name


def hash_password(password: str) -> str:
    """A self-describing scrypt hash of `password` with a new random salt."""
    if not password:
        raise UserError("The password is empty; type one (a line on stdin).")
    salt = os.urandom(SALT_BYTES)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(key)])


def verify_password(password: str, password_hash: str) -> bool:
    """Whether `password` is the one `password_hash` was made from (constant time in the key comparison)."""
    n, r, p, salt, key = _parse_hash(password_hash)
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), key)


def parse_users(text: str, source: str = "the users file") -> dict[str, User]:
    """The users of a users file's text by name; a malformed line or a name twice is a UserError naming its line."""
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}, line {number}"
        parts = line.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != ADMIN):
            raise UserError(f"{where}: expected NAME:HASH or NAME:HASH:admin (make lines with `dreambooth-lora users add`).")
        name, password_hash = parts[0], parts[1]
        try:
            validate_user_name(name)
            _parse_hash(password_hash)
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
        if name in users:
            raise UserError(f"{where}: user {name!r} is listed twice.")
        users[name] = User(name, password_hash, admin=len(parts) == 3)
    return users


def read_users(path: Path) -> dict[str, User]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"No users file {str(path)!r}; create it with `dreambooth-lora users add NAME --users {path}`.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"Cannot read the users file {str(path)!r} ({error}).") from None
    return parse_users(text, str(path))


def add_user(path: Path, name: str, password: str, admin: bool = False) -> User:
    """Append a user to the users file (created if missing), atomically: a crash leaves the old file or the new one."""
    path = Path(path)
    validate_user_name(name)
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    if name in parse_users(existing, str(path)):  # also refuses to add to a malformed file
        raise UserError(f"User {name!r} is already in {path}; choose another name.")
    user = User(name, hash_password(password), admin)
    if existing and not existing.endswith("\n"):
        existing += "\n"
    atomic_write_bytes(path, (existing + user.line() + "\n").encode("utf-8"))  # mode 0600: mkstemp's
    return user


class UsersFile:
    """The users file as `serve` reads it: checked at start, read again when it changes (users added while it runs)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple | None = None
        self._users = self._load()

    def users(self) -> dict[str, User]:
        try:
            self._load()
        except UserError:  # a bad edit while serving: keep the users read last, refuse nobody new
            pass
        return self._users

    def _load(self) -> dict[str, User]:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp or stamp is None:
            self._users = read_users(self.path)
            self._stamp = stamp
        return self._users

    def login(self, name: str, password: str) -> bool:
        """Gradio's auth callable: whether this name and password may log in."""
        user = self.users().get(name)
        if user is None:
            verify_password(password or "", _DUMMY_HASH)  # as slow as a known name: no telling which names exist
            return False
        return verify_password(password or "", user.password_hash)

    def is_admin(self, name: str | None) -> bool:
        user = self.users().get(name) if name else None
        return bool(user and user.admin)

    def library_for(self, library, name: str | None):
        """The library as `name` sees it (Library.for_user; an admin sees every user's); refused for no such user."""
        user = self.users().get(name) if name else None
        if user is None:
            raise UserError("Log in first (this user is not in the users file any more).")
        return library.for_user(user.name, admin=user.admin)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * r * n + 2**20, dklen=KEY_BYTES)


def _parse_hash(password_hash: str) -> tuple[int, int, int, bytes, bytes]:
    parts = password_hash.split("$")
    try:
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, key = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
        if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 or n > 2**20 or not salt or not key:
            raise ValueError
    except ValueError:
        raise UserError("the password hash is not scrypt$N$r$p$salt$key (make it with `dreambooth-lora users add`).") from None
    return n, r, p, salt, key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_DUMMY_HASH = "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(b"\0" * SALT_BYTES), _b64(b"\0" * KEY_BYTES)])
