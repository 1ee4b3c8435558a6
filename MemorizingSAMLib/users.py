"""Who may use a server: a users file of names and token hashes, re-read when it changes (standard library only).

File format, one user per line (``#`` starts a comment)::

    alice  sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  max_sessions=4
    bob    sha256:...

Only the SHA-256 of each token is stored (tokens are long random strings, so a plain hash suffices); a token is
never written to a log or echoed in an answer. ``memsam users add NAME --file F`` makes a token, prints it once
and appends the user's line.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from .fileio import atomic_text

_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


@dataclass(frozen=True)
class User:
    name: str
    token_sha256: str
    max_sessions: int | None = None  # None: the server's per-user default


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_users(text: str, source: str = "users file") -> dict[str, User]:
    """Users by name; a malformed line is an error naming the line (the whole file is refused)."""
    users: dict[str, User] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < 2 or not _NAME.match(parts[0]) or not re.fullmatch(r"sha256:[0-9a-f]{64}", parts[1]):
            raise ValueError(f"{source}, line {n}: expected 'NAME sha256:<64 hex digits> [max_sessions=N]'")
        quota = None
        for opt in parts[2:]:
            m = re.fullmatch(r"max_sessions=(\d+)", opt)
            if not m or int(m.group(1)) < 1:
                raise ValueError(f"{source}, line {n}: unknown or invalid option {opt!r}")
            quota = int(m.group(1))
        if parts[0] in users:
            raise ValueError(f"{source}, line {n}: user {parts[0]!r} appears twice")
        users[parts[0]] = User(parts[0], parts[1][len("sha256:") :], quota)
    return users


class Authenticator:
    """Maps a bearer token to its user. From a users file (re-read when its modification time or size changes;
    a file that becomes malformed keeps the last good users and records the error), or from a single token
    (one user, ``default``)."""

    def __init__(self, users_file: str | os.PathLike | None = None, token: str | None = None) -> None:
        if (users_file is None) == (token is None):
            raise ValueError("give a users file or a single token")
        self.path = Path(users_file) if users_file is not None else None
        self._users: dict[str, User] = {} if token is None else {"default": User("default", token_hash(token))}
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self.error: str | None = None
        if self.path is not None:
            self._users = parse_users(self.path.read_text(), str(self.path))  # refused at start if malformed
            st = self.path.stat()
            self._stamp = (st.st_mtime_ns, st.st_size)

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except OSError as e:
            self.error = f"{self.path}: {e.strerror}"
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        with self._lock:
            try:
                self._users = parse_users(self.path.read_text(), str(self.path))
                self.error = None
            except (OSError, ValueError) as e:
                self.error = str(e)
            self._stamp = stamp

    @property
    def users(self) -> dict[str, User]:
        self._refresh()
        return self._users

    def user_for(self, authorization: str) -> User | None:
        """The user whose token the ``Authorization: Bearer ...`` header carries, or None."""
        if not authorization.startswith("Bearer "):
            return None
        digest = token_hash(authorization[len("Bearer ") :].strip())
        found = None
        for user in self.users.values():  # every hash compared, in constant time each
            if hmac.compare_digest(digest, user.token_sha256):
                found = user
        return found


def add_user(path: str | os.PathLike, name: str, max_sessions: int | None = None) -> str:
    """Append a user with a new random token to the users file (made if missing); returns the token."""
    if not _NAME.match(name):
        raise ValueError(f"user name {name!r}: use 1-64 letters, digits and . _ @ -")
    p = Path(path)
    text = p.read_text() if p.exists() else "# memsam users: NAME sha256:<token hash> [max_sessions=N]\n"
    if name in parse_users(text, str(p)):
        raise ValueError(f"{p}: user {name!r} exists already")
    token = secrets.token_urlsafe(32)
    line = f"{name} sha256:{token_hash(token)}" + (f" max_sessions={max_sessions}" if max_sessions else "")
    atomic_text(p, text.rstrip("\n") + "\n" + line + "\n")
    os.chmod(p, 0o600)
    return token
