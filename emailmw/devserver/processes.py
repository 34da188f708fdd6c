"""Other processes and files, as the dev server watches, drives and writes them.

:class:`Proc` names a process so that a recycled pid is never mistaken for it
(pid plus start time, read from ``/proc``); :func:`descendants` lists a
master's children; :func:`listening_ports` reads a process's listening sockets
from ``/proc`` without connecting; :func:`wait_until` polls for another
process's state. Driving the daemons' masters: :func:`control` runs a control
command, :func:`await_ready` waits until a master listens,
:func:`terminate` stops one with all its children, :func:`orphan` finds one
an earlier run left behind. Plus the files: :func:`tail` of logs,
:func:`write_atomic`, user and group ids.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pathlib
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from emailmw.devserver.errors import DevServerError, MailStackMissingError, PortInUseError
from emailmw.devserver.install import INSTALL_HINT

__all__ = [
    "Proc",
    "await_ready",
    "control",
    "descendants",
    "free_ports",
    "group_id",
    "is_dovecot_log",
    "listening_ports",
    "orphan",
    "read_pid_file",
    "tail",
    "terminate",
    "user_id",
    "wait_until",
    "write_atomic",
]

logger = logging.getLogger(__name__)

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


def listening_ports(pid: int, host: str = "127.0.0.1") -> set[int]:
    """TCP ports on which process ``pid`` listens on ``host`` (an IPv4 address) or on any.

    Read from /proc without connecting (no log noise, no spawned login process);
    another process listening on the same port does not count.
    """
    wanted = {socket.inet_aton(host)[::-1].hex().upper(), "00000000"}  # /proc's byte order
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
            if fields[3] == "0A" and addr in wanted and fields[9] in inodes:
                ports.add(int(port, 16))
    return ports


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct ports of ``host`` that were free a moment ago (bound to port 0, then closed)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def read_pid_file(path: pathlib.Path) -> Proc | None:
    """The process named by the first field of a pid file, or None."""
    try:
        return Proc.of(int(path.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return None


def orphan(
    pid_file: pathlib.Path, marker: bytes, where: Literal["cmdline", "environ"]
) -> Proc | None:
    """The running process that ``pid_file`` names, if it carries ``marker``; else None.

    For a master that an earlier, crashed run left behind: ``marker`` must be
    one NUL-separated field of its ``/proc/PID/{where}`` (the config path in
    Dovecot's command line; ``MAIL_CONFIG=`` in Postfix's environment), so
    that a recycled pid is never signalled.
    """
    proc = read_pid_file(pid_file)
    if proc is None or not proc.alive():
        return None
    try:
        info = pathlib.Path(f"/proc/{proc.pid}/{where}").read_bytes()
    except OSError:
        return None
    return proc if marker in info.split(b"\0") else None


def control(argv: Sequence[str], output: pathlib.Path, log: pathlib.Path) -> None:
    """Run a daemon's control command, its output appended to ``output`` (never a pipe).

    Raises :class:`DevServerError` (:class:`PortInUseError` if the logs say a
    port is in use) with the tails of ``output`` and ``log`` if it fails.
    """
    with open(output, "ab") as out:
        rc = subprocess.call(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    if rc != 0:
        raise _start_error(f"{' '.join(argv)} failed (exit status {rc})", output, log)


def await_ready(
    what: str,
    *,
    proc: Proc | None,
    ports: Sequence[int],
    sockets: Sequence[pathlib.Path],
    logs: Sequence[pathlib.Path],
    timeout: float,
    host: str = "127.0.0.1",
) -> None:
    """Wait until ``proc`` listens on every port of ``host`` and every unix socket exists.

    Raises :class:`DevServerError` (:class:`PortInUseError` if the logs say a
    port is in use) with the tails of ``logs`` if ``proc`` exits meanwhile or
    is not ready after ``timeout`` seconds. ``what`` names it in messages.
    """

    def ready() -> bool:
        if proc is None or not proc.alive():
            raise _start_error(f"{what} exited during start", *logs)
        return set(ports) <= listening_ports(proc.pid, host) and all(p.exists() for p in sockets)

    if not wait_until(ready, timeout):
        raise DevServerError(
            f"{what} not listening on {list(ports)} after {timeout} s", tail(*logs)
        )


def terminate(
    what: str,
    master: Proc,
    *,
    log_tail: Callable[[], str],
    dovecot: bool = False,
    timeout: float = 15.0,
) -> None:
    """SIGTERM ``master``; wait until it and its children are gone (not zombies).

    A process's sockets are closed by the time it is a zombie, so its ports
    are free then (checking the ports themselves would wait forever when
    another process holds one of them).

    Children still running after the master has exited get a SIGTERM too;
    whatever still runs after ``timeout`` seconds gets a SIGKILL. If even that
    fails, raises :class:`DevServerError` with ``log_tail()``. ``what`` names
    the daemon in messages.

    ``dovecot`` works around two quirks of Dovecot 2.3's master (measured):
    it leaves imap processes that have a client behind (they notice ~10 s
    later), so every child but the log process gets SIGTERM at once (an
    imap process says ``BYE Server shutting down``); and once all else has
    stopped, it SIGQUITs its log process and sleeps a fixed second, so it
    is SIGKILLed when only the log process is left (which drains its pipes
    and exits). Stop then takes ~0.05 s instead of 1.1 s or 10 s. The kill
    can leave ``state_dir/instances.lock`` behind; ``DevServer.start_dovecot``
    removes it (a new master would wait for that dotlock to go stale).
    """
    started = time.monotonic()
    if not master.alive():  # killed from outside; its pid may be another process's now
        first: list[Proc] = []
        procs = {master}
    else:
        procs = {master, *descendants(master.pid)}
        first = [master]
    if dovecot:
        first += [p for p in procs if p != master and not is_dovecot_log(p)]
    for proc in first:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
    orphans_signalled = False

    def gone() -> bool:
        nonlocal orphans_signalled
        if master.alive():
            procs.update(descendants(master.pid))  # forked during shutdown
        children = [p for p in procs if p != master and p.alive()]
        if master.alive():
            if dovecot and all(map(is_dovecot_log, children)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(master.pid, signal.SIGKILL)
        elif children and not orphans_signalled:
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
            orphans_signalled = True
        return not children and not master.alive()

    if not wait_until(gone, timeout):
        alive = sorted(p.pid for p in procs if p.alive())
        logger.warning("%s did not stop within %.0f s; killing %s", what, timeout, alive)
        for proc in procs:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        if not wait_until(gone, 5.0):
            raise DevServerError(f"{what} processes survived SIGKILL", log_tail())
    logger.debug("%s stopped in %.3f s", what, time.monotonic() - started)


def _start_error(message: str, *logs: pathlib.Path) -> DevServerError:
    """The error for a daemon that failed to start, with the tails of ``logs``:
    a :class:`PortInUseError` if they say a port is in use."""
    log_tail = tail(*logs)
    cls = PortInUseError if "in use" in log_tail else DevServerError
    return cls(message, log_tail)


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
