"""The local state store: what a process keeps across restarts.

One SQLite database, ``state.sqlite3`` in ``state-dir`` (default
``$XDG_STATE_HOME/emailmw``, else ``~/.local/state/emailmw``), in WAL mode. It
holds, for each durable subscription (``Subscription(..., durable=NAME)``):

* its topic and its position in the folder: the folder's UIDVALIDITY and the
  last UID up to which every message given to it was handled;
* the Message-IDs of the last :data:`HANDLED_KEPT` messages it handled, so
  that what is read again after a crash or a UIDVALIDITY change is not given
  twice.

Every change is committed at once (``synchronous=NORMAL``: a process killed
at any moment loses nothing committed; a power cut may lose the last
commits). A name is held by one subscription at a time: an exclusive
``flock`` on ``durable/<digest of the name>.lock``, which the operating
system releases when the process dies, so a crash never leaves a name taken.

Thread-safe: one connection, used under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import sqlite3
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

from emailmw.errors import DurableNameInUseError, StateStoreError

logger = logging.getLogger(__name__)

__all__ = ["HANDLED_KEPT", "DurableClaim", "DurableRecord", "StateStore", "default_state_dir"]

#: How many handled Message-IDs a durable subscription keeps (the newest).
HANDLED_KEPT = 10_000
#: The longest durable subscription name.
MAX_NAME_LENGTH = 200

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS durable (
    name TEXT PRIMARY KEY,
    topic TEXT NOT NULL,
    uidvalidity INTEGER,
    position INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS handled (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    message_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS handled_by_name ON handled (name, seq);
"""


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/emailmw``, else ``~/.local/state/emailmw``."""
    base = os.environ.get("XDG_STATE_HOME")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "emailmw"


def check_durable_name(name: object) -> str:
    """``name`` if it can name a durable subscription; else :class:`ValueError` saying why."""
    if not isinstance(name, str):
        raise ValueError(f"durable must be a name (str), got {type(name).__name__}")
    if not name or len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"durable must be 1 to {MAX_NAME_LENGTH} characters, got {len(name)}")
    if not name.isprintable():
        raise ValueError(f"durable name {name[:80]!r} contains non-printable characters")
    return name


@dataclass(frozen=True, slots=True)
class DurableRecord:
    """A durable subscription as stored: topic, position and handled Message-IDs
    (oldest first). ``uidvalidity`` is ``None`` for a name never used before."""

    name: str
    topic: str
    uidvalidity: int | None
    position: int
    handled: list[str]


class DurableClaim:
    """The lock on one durable subscription name (see :meth:`StateStore.claim`)."""

    def __init__(self, store: StateStore, name: str, fd: int) -> None:
        self.store = store
        self.name = name
        # released when the claim is (a subscription dropped without close())
        self._release = weakref.finalize(self, _unlock, fd)

    def release(self) -> None:
        """Let another subscription use the name. Idempotent."""
        self._release()


class StateStore:
    """The SQLite state store in ``directory`` (created with mode 0700 if missing).

    Raises :class:`~emailmw.StateStoreError` naming the file when it cannot be
    opened.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "state.sqlite3"
        self._lock = threading.Lock()
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            (directory / "durable").mkdir(exist_ok=True, mode=0o700)
            db = sqlite3.connect(
                self.path, timeout=10.0, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StateStoreError(f"cannot open the state store {self.path}: {exc}") from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise StateStoreError(
                    f"the state store {self.path} was written by a newer emailmw "
                    f"(schema {version}, this one knows {_SCHEMA_VERSION})"
                )
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            db.close()
            raise StateStoreError(f"cannot use the state store {self.path}: {exc}") from exc
        self._db: sqlite3.Connection | None = db
        self._inserts = 0

    def __repr__(self) -> str:
        return f"<StateStore {str(self.path)!r}>"

    def close(self) -> None:
        """Close the database. Idempotent."""
        with self._lock:
            db, self._db = self._db, None
        if db is not None:
            db.close()

    # -- durable subscriptions -------------------------------------------------------

    def claim(self, name: str, topic: str) -> tuple[DurableClaim, DurableRecord]:
        """Take the name ``name`` for a durable subscription on ``topic`` and read
        what is stored for it.

        Raises :class:`~emailmw.DurableNameInUseError` if another subscription (in
        any process) holds the name, and :class:`ValueError` if the name was used
        for another topic.
        """
        check_durable_name(name)
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        lock_path = self.directory / "durable" / f"{digest}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateStoreError(f"cannot open {lock_path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DurableNameInUseError(
                f"the durable subscription {name!r} is in use by another subscription"
                f"{holder}; each name can be used by one subscription at a time"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StateStoreError(f"cannot lock {lock_path}: {exc}") from exc
        claim = DurableClaim(self, name, fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            record = self._read(name, topic)
        except BaseException:
            claim.release()
            raise
        return claim, record

    def _read(self, name: str, topic: str) -> DurableRecord:
        with self._lock:
            db = self._open_db()
            row = db.execute(
                "SELECT topic, uidvalidity, position FROM durable WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                return DurableRecord(name, topic, None, 0, [])
            if row[0] != topic:
                raise ValueError(
                    f"the durable subscription {name!r} is on topic {row[0][:80]!r}, "
                    f"not {topic[:80]!r}; use another name (or forget this one)"
                )
            ids = db.execute(
                "SELECT message_id FROM handled WHERE name = ? ORDER BY seq DESC LIMIT ?",
                (name, HANDLED_KEPT),
            ).fetchall()
        return DurableRecord(name, topic, row[1], row[2], [i[0] for i in reversed(ids)])

    def save_position(self, name: str, topic: str, uidvalidity: int | None, position: int) -> None:
        """Store where the durable subscription ``name`` is."""
        with self._lock:
            self._write(
                "INSERT INTO durable (name, topic, uidvalidity, position) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET uidvalidity = excluded.uidvalidity, "
                "position = excluded.position",
                (name, topic, uidvalidity, position),
            )

    def add_handled(
        self, name: str, topic: str, message_id: str, uidvalidity: int | None, position: int
    ) -> None:
        """Record that ``name`` handled ``message_id``, and its position, in one commit."""
        with self._lock:
            db = self._open_db()
            try:
                with db:  # one transaction
                    db.execute("BEGIN")
                    db.execute(
                        "INSERT INTO handled (name, message_id) VALUES (?, ?)", (name, message_id)
                    )
                    db.execute(
                        "INSERT INTO durable (name, topic, uidvalidity, position) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                        "uidvalidity = excluded.uidvalidity, position = excluded.position",
                        (name, topic, uidvalidity, position),
                    )
                self._inserts += 1
                if self._inserts % 1000 == 0:  # keep the newest HANDLED_KEPT of each name
                    with db:
                        db.execute("BEGIN")
                        db.execute(
                            "DELETE FROM handled WHERE name = ? AND seq <= ("
                            "SELECT seq FROM handled WHERE name = ? ORDER BY seq DESC "
                            "LIMIT 1 OFFSET ?)",
                            (name, name, HANDLED_KEPT),
                        )
            except sqlite3.Error as exc:
                raise StateStoreError(f"cannot write the state store {self.path}: {exc}") from exc

    def forget(self, name: str) -> None:
        """Delete what is stored for the durable subscription ``name``."""
        with self._lock:
            db = self._open_db()
            try:
                with db:
                    db.execute("BEGIN")
                    db.execute("DELETE FROM handled WHERE name = ?", (name,))
                    db.execute("DELETE FROM durable WHERE name = ?", (name,))
            except sqlite3.Error as exc:
                raise StateStoreError(f"cannot write the state store {self.path}: {exc}") from exc

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        db = self._open_db()
        try:
            db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StateStoreError(f"cannot write the state store {self.path}: {exc}") from exc

    def _open_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StateStoreError(f"the state store {self.path} is closed")
        return self._db


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f" (process {pid})" if pid != os.getpid() else " in this process"
    return ""
