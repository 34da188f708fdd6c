"""Other processes and files, as the dev server watches and writes them.

:class:`Proc` names a process so that a recycled pid is never mistaken for it
(pid plus start time, read from ``/proc``); :func:`descendants` lists a
master's children; :func:`listening_ports` reads a process's listening sockets
from ``/proc`` without connecting; :func:`wait_until` polls for another
process's state. Plus the files: :func:`tail` of logs, :func:`write_atomic`,
user and group ids.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pathlib
import pwd
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from emailmw.devserver.errors import MailStackMissingError
from emailmw.devserver.install import INSTALL_HINT

__all__ = [
    "Proc",
    "descendants",
    "free_ports",
    "group_id",
    "is_dovecot_log",
    "listening_ports",
    "read_pid_file",
    "tail",
    "user_id",
    "wait_until",
    "write_atomic",
]

_POLL = 0.01  # seconds between looks at another process's state


@dataclass(frozen=True)
class Proc:
    """A process identity that survives pid reuse: pid plus start time."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> Proc | None:
        """The process ``pid`` as it is now, or None if there is none."""
        stat = _read_stat(pid)
        return None if stat is None else cls(pid, stat[2])

    def alive(self) -> bool:
        """True while the process runs. A zombie counts as gone: an orphan
        reaped by init can look alive to ``kill -0`` for seconds."""
        stat = _read_stat(self.pid)
        return stat is not None and stat[2] == self.start_time and stat[0] not in "ZX"

    def cmdline(self) -> bytes:
        """The raw ``/proc/PID/cmdline`` (NUL-separated), or ``b""`` once gone."""
        try:
            return pathlib.Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return b""


def _read_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) from ``/proc/PID/stat``; None if there is no such process."""
    try:
        data = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])


def descendants(root_pid: int) -> set[Proc]:
    """Every process below ``root_pid`` (children, grandchildren, ...), from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        stat = _read_stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
    found: set[Proc] = set()
    todo = list(children.get(root_pid, ()))
    while todo:
        pid = todo.pop()
        proc = Proc.of(pid)
        if proc is not None:
            found.add(proc)
        todo.extend(children.get(pid, ()))
    return found


def is_dovecot_log(proc: Proc) -> bool:
    """True for Dovecot's ``log`` process (the one kept until the master is gone)."""
    return proc.cmdline().rstrip(b"\0").endswith(b"/log")


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll another process's state until ``predicate()`` holds; False on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(_POLL)
    return True


def listening_ports(pid: int) -> set[int]:
    """Loopback TCP ports on which process ``pid`` holds a listening socket.

    Read from /proc without connecting (no log noise, no spawned login process);
    another process listening on the same port does not count.
    """
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(fd.path)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    ports: set[int] = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            addr, port = fields[1].split(":")
            if fields[3] == "0A" and addr in ("0100007F", "00000000") and fields[9] in inodes:
                ports.add(int(port, 16))
    return ports


def free_ports(count: int) -> list[int]:
    """Distinct loopback ports that were free a moment ago (bound to port 0, then closed)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def read_pid_file(path: pathlib.Path) -> Proc | None:
    """The process named by the first field of a pid file, or None."""
    try:
        return Proc.of(int(path.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return None


def tail(*paths: pathlib.Path, n: int = 30) -> str:
    """The last ``n`` lines of each existing file."""
    parts = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 250 * n))
                lines = f.read().decode("utf-8", "replace").splitlines()[-n:]
        except OSError:
            continue
        if lines:
            parts.append("\n".join(lines))
    return "\n".join(parts)


def write_atomic(
    path: pathlib.Path, text: str, mode: int = 0o644, *, group: int = -1, backdate: bool = False
) -> None:
    """Replace ``path`` atomically.

    ``backdate``: set the modification time 10 s back. Postfix distrusts a file
    modified in the current second and re-reads it every 300 ms until the
    second is over (measured: a start or reload took up to 2 s longer).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chown(tmp, -1, group)
    tmp.chmod(mode)
    if backdate:
        past = time.time() - 10
        os.utime(tmp, (past, past))
    os.replace(tmp, path)


def user_id(name: str) -> int:
    """The uid of system user ``name`` (created by the mail stack's packages)."""
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise MailStackMissingError(f"no user {name!r}; install: {INSTALL_HINT}") from None


def group_id(name: str) -> int:
    """The gid of system group ``name`` (created by the mail stack's packages)."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise MailStackMissingError(f"no group {name!r}; install: {INSTALL_HINT}") from None
