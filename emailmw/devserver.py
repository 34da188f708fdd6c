"""A real local mail stack (Dovecot + Postfix) for tests, benchmarks and development.

:class:`DevServer` starts, under one root directory (temporary by default):

* Dovecot: IMAP (plain, STARTTLS offered) and IMAPS (implicit TLS) on free
  loopback ports, LMTP on a unix socket, a passwd-file per account;
* Postfix: SMTP (STARTTLS offered, AUTH through Dovecot) and SMTPS (implicit
  TLS) on free loopback ports, delivering to Dovecot over LMTP;
* a test CA and a server certificate for ``localhost`` and ``127.0.0.1``
  (:attr:`DevServer.ca_file` is what clients should trust).

Mail for ``alice+orders@example.test`` lands in alice's folder ``orders``
(:meth:`DevServer.new_mailbox` makes such a folder per test).

Needs Debian's ``dovecot-imapd``, ``dovecot-lmtpd``, ``postfix`` and ``openssl``
packages, and root (Postfix starts only as root); :func:`ensure_installed`
checks both. Several instances can run at once: each has its own ports,
instance name, ``base_dir``, queue and data directories, and every daemon is
driven through its own ``-c`` config, never the machine's default one.

Errors::

    RuntimeError
    └── DevServerError             start, stop or admin command failed (.log_tail)
        └── MailStackMissingError  packages not installed, or not root

An ``atexit`` hook stops every server a program leaves running.

Measured here (medians, 2 cores): start 0.11 s (0.17 s with the first
start's certificates), stop 0.04 s, ``restart_dovecot`` 0.09 s,
``restart_postfix`` 0.06 s, ``add_account`` 0.07 s, ``new_mailbox`` 0.03 s.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import grp
import imaplib
import logging
import os
import pathlib
import pwd
import re
import secrets
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

__all__ = [
    "DevAccount",
    "DevServer",
    "DevServerError",
    "MailStackMissingError",
    "ensure_installed",
    "main",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "apt-get update && DEBIAN_FRONTEND=noninteractive "
    "apt-get install -y dovecot-imapd dovecot-lmtpd postfix openssl"
)

_DOVECOT = "/usr/sbin/dovecot"
_DOVEADM = "/usr/bin/doveadm"
_DOVECOT_LMTP = "/usr/lib/dovecot/lmtp"
_DOVECOT_DH = "/usr/share/dovecot/dh.pem"
_POSTFIX = "/usr/sbin/postfix"
_POSTFIX_DAEMONS = "/usr/lib/postfix/sbin"
_MAIL_UID = 5000  # Dovecot refuses root and uids below first_valid_uid (500)
_PORT_NAMES = ("smtp", "smtps", "imap", "imaps")
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9._-]*[a-z0-9_-])?\Z")
_DOMAIN_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+\Z")
_FOLDER_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]*\Z")
_POLL = 0.01  # seconds between looks at another process's state

# Postfix services besides the two SMTP listeners: Debian's master.cf with chroot
# "n" everywhere, plus postlog (there is no syslog; it writes maillog_file).
# service type private unpriv chroot wakeup maxproc command
_MASTER_CF_SERVICES = """\
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
local      unix  - n n -     - local
virtual    unix  - n n -     - virtual
lmtp       unix  - - n -     - lmtp
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
"""

# Postfix's queue layout (/etc/postfix/postfix-files): (dir, owner, group, mode).
_QUEUE_DIRS = [
    ("pid", "root", "", 0o755),
    ("maildrop", "postfix", "postdrop", 0o730),
    ("public", "postfix", "postdrop", 0o710),
    *((name, "postfix", "", 0o700) for name in ("active", "bounce", "corrupt", "defer")),
    *((name, "postfix", "", 0o700) for name in ("deferred", "flush", "hold", "incoming")),
    *((name, "postfix", "", 0o700) for name in ("private", "saved", "trace")),
]


class DevServerError(RuntimeError):
    """Starting, stopping or administering the local mail stack failed.

    ``log_tail`` holds the last lines of the relevant log(s), also appended to
    the message.
    """

    def __init__(self, message: str, log_tail: str = "") -> None:
        self.log_tail = log_tail
        super().__init__(f"{message}\n--- log tail ---\n{log_tail}" if log_tail else message)


class MailStackMissingError(DevServerError):
    """Dovecot or Postfix is not installed, or this process is not root."""


class _PortInUseError(DevServerError):
    """A daemon could not bind a port that was free a moment before."""


@dataclass(frozen=True)
class DevAccount:
    """One mail account of a :class:`DevServer`."""

    name: str
    """Local part, e.g. ``"alice"``."""
    address: str
    """``"alice@example.test"``; also the IMAP and SMTP username."""
    password: str


def ensure_installed() -> None:
    """Raise :class:`MailStackMissingError` unless Dovecot and Postfix can run here."""
    binaries = (_DOVECOT, _DOVEADM, _DOVECOT_LMTP, _POSTFIX, f"{_POSTFIX_DAEMONS}/master")
    missing = [path for path in binaries if not os.access(path, os.X_OK)]
    if shutil.which("openssl") is None:
        missing.append("openssl")
    if missing:
        raise MailStackMissingError(
            f"the local mail stack is not installed (missing: {', '.join(missing)}); as root run: "
            f"{INSTALL_HINT}  (or scripts/install-mailstack.sh); Postfix also needs root to start"
        )
    if os.geteuid() != 0:
        raise MailStackMissingError(
            "the local mail stack must run as root: Postfix refuses to start otherwise"
        )


# ------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _Proc:
    """A process identity that survives pid reuse: pid plus start time."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> _Proc | None:
        stat = _read_stat(pid)
        return None if stat is None else cls(pid, stat[2])

    def alive(self) -> bool:
        """True while the process runs. A zombie counts as gone: an orphan
        reaped by init can look alive to ``kill -0`` for seconds."""
        stat = _read_stat(self.pid)
        return stat is not None and stat[2] == self.start_time and stat[0] not in "ZX"

    def cmdline(self) -> bytes:
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


def _descendants(root_pid: int) -> set[_Proc]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        stat = _read_stat(int(entry.name)) if entry.name.isdigit() else None
        if stat is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
    found: set[_Proc] = set()
    todo = list(children.get(root_pid, ()))
    while todo:
        pid = todo.pop()
        proc = _Proc.of(pid)
        if proc is not None:
            found.add(proc)
        todo.extend(children.get(pid, ()))
    return found


def _is_dovecot_log(proc: _Proc) -> bool:
    return proc.cmdline().rstrip(b"\0").endswith(b"/log")


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll another process's state until ``predicate()`` holds; False on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(_POLL)
    return True


def _listening_ports(pid: int) -> set[int]:
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


def _free_ports(count: int) -> list[int]:
    """Distinct loopback ports that were free a moment ago (bound to port 0, then closed)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _read_pid_file(path: pathlib.Path) -> _Proc | None:
    try:
        return _Proc.of(int(path.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return None


def _tail(*paths: pathlib.Path, n: int = 30) -> str:
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


def _write_atomic(
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


def _user_id(name: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise MailStackMissingError(f"no user {name!r}; install: {INSTALL_HINT}") from None


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise MailStackMissingError(f"no group {name!r}; install: {INSTALL_HINT}") from None


# ------------------------------------------------------------------------- at exit

_live: set[DevServer] = set()
_live_lock = threading.Lock()


def _stop_all_at_exit() -> None:
    """Safety net: stop the servers a crashed or careless program left running."""
    with _live_lock:
        servers = [s for s in _live if s._owner_pid == os.getpid()]  # not a fork's parent's
    for server in servers:
        try:
            server.stop()
        except Exception:
            logger.exception("could not stop %r at exit", server)


atexit.register(_stop_all_at_exit)


# ------------------------------------------------------------------------- server


class DevServer:
    """A real Dovecot + Postfix on free loopback ports, everything under :attr:`root`.

    ::

        with DevServer(accounts=("alice", "bob")) as server:
            folder, address = server.new_mailbox("alice")   # per-test mailbox
            config = server.config("alice", mailbox=folder, to=address)

    ``root=None`` makes a temporary directory, removed by :meth:`stop`; a given
    ``root`` is created if needed and kept (with its certificates, reused by
    the next start). Ports are chosen by the first :meth:`start` and kept by
    restarts. Thread-safe. Requires root (see :func:`ensure_installed`).
    """

    host: str = "127.0.0.1"

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        accounts: Sequence[str] = ("alice", "bob"),
        domain: str = "example.test",
    ) -> None:
        domain = domain.lower()
        if not _DOMAIN_RE.match(domain):
            raise ValueError(f"invalid mail domain {domain!r}")
        self._domain = domain
        self._lock = threading.RLock()
        self._accounts: dict[str, DevAccount] = {}
        for name in accounts:
            self._new_account(name)
        self._ports: dict[str, int] = {}
        self._instance = f"emailmw-{secrets.token_hex(4)}"
        self._dovecot: _Proc | None = None
        self._dovecot_popen: subprocess.Popen[bytes] | None = None
        self._postfix: _Proc | None = None
        self._owner_pid = os.getpid()
        self._owns_root = root is None
        self._removed = False
        if root is None:
            self._root = pathlib.Path(tempfile.mkdtemp(prefix="emailmw-dev-"))
            with _live_lock:
                _live.add(self)  # so that the temporary root goes even if never started
        else:
            self._root = pathlib.Path(root).resolve()

    def __repr__(self) -> str:
        ports = " ".join(f"{k}={v}" for k, v in self._ports.items()) or "no ports yet"
        return f"<DevServer {self._instance} {ports} root={str(self._root)!r}>"

    # -------------------------------------------------------------- properties

    @property
    def root(self) -> pathlib.Path:
        """The directory holding every config, queue, mailbox, socket and log."""
        return self._root

    @property
    def domain(self) -> str:
        """The mail domain of every account."""
        return self._domain

    @property
    def ca_file(self) -> pathlib.Path:
        """PEM file of the test CA that signed the server certificate (exists after start)."""
        return self._root / "tls" / "ca.pem"

    @property
    def accounts(self) -> list[DevAccount]:
        """The accounts in creation order (a copy)."""
        with self._lock:
            return list(self._accounts.values())

    @property
    def smtp_port(self) -> int:
        """SMTP: plain, STARTTLS offered, AUTH PLAIN/LOGIN."""
        return self._port("smtp")

    @property
    def smtps_port(self) -> int:
        """SMTP with implicit TLS."""
        return self._port("smtps")

    @property
    def imap_port(self) -> int:
        """IMAP: plain, STARTTLS offered."""
        return self._port("imap")

    @property
    def imaps_port(self) -> int:
        """IMAP with implicit TLS."""
        return self._port("imaps")

    @property
    def running(self) -> bool:
        """True while both masters are alive."""
        return all(p is not None and p.alive() for p in (self._dovecot, self._postfix))

    def _port(self, name: str) -> int:
        try:
            return self._ports[name]
        except KeyError:
            raise DevServerError("no ports yet: they are chosen by start()") from None

    def _path(self, *parts: str) -> pathlib.Path:
        return self._root.joinpath(*parts)

    @property
    def _dovecot_conf(self) -> pathlib.Path:
        return self._path("dovecot", "dovecot.conf")

    @property
    def _dovecot_log(self) -> pathlib.Path:
        return self._path("dovecot", "log", "dovecot.log")

    @property
    def _postfix_dir(self) -> pathlib.Path:
        return self._path("postfix")

    @property
    def _postfix_log(self) -> pathlib.Path:
        return self._path("postfix-log", "postfix.log")

    # -------------------------------------------------------------- accounts

    def _new_account(self, name: str) -> DevAccount:
        if not _NAME_RE.match(name):
            raise ValueError(
                f"invalid account name {name!r}: use lower-case letters, digits, '.', '_', '-'"
            )
        if name in self._accounts:
            raise ValueError(f"account {name!r} exists already")
        account = DevAccount(name, f"{name}@{self._domain}", secrets.token_urlsafe(12))
        self._accounts[name] = account
        return account

    def account(self, name: str) -> DevAccount:
        """The account ``name`` (local part or whole address); KeyError if unknown."""
        with self._lock:
            try:
                return self._accounts[name.split("@", 1)[0]]
            except KeyError:
                raise KeyError(f"no account {name!r} (have: {', '.join(self._accounts)})") from None

    def _resolve(self, account: DevAccount | str) -> DevAccount:
        return account if isinstance(account, DevAccount) else self.account(account)

    def add_account(self, name: str) -> DevAccount:
        """Add an account. While running, returns once a new SMTP session accepts
        mail for it (``postfix reload``: about 70 ms). SMTP sessions opened
        before still reject it."""
        with self._lock:
            account = self._new_account(name)
            if self._dovecot_conf.exists():
                self._write_account_files()
            if self._postfix is not None and self._postfix.alive():
                self._postfix_reload(account.address)
            return account

    def _write_account_files(self) -> None:
        # One passwd-file per account: Dovecot checks a known file for changes at
        # most once a second, so a line added to one shared file could stay unseen
        # for up to a second; a new account's file is read fresh at the first login.
        users = self._path("dovecot", "users")
        dovecot_gid = _group_id("dovecot")  # the auth process reads the files
        users.mkdir(exist_ok=True)
        os.chown(users, 0, dovecot_gid)
        users.chmod(0o750)
        for path in users.iterdir():
            if path.name not in self._accounts:
                path.unlink()
        for a in self._accounts.values():
            line = f"{a.address}:{{PLAIN}}{a.password}::::::\n"
            _write_atomic(users / a.name, line, 0o640, group=dovecot_gid)
        vmailbox = "".join(f"{a.address} ok\n" for a in self._accounts.values())
        _write_atomic(self._postfix_dir / "vmailbox", vmailbox, backdate=True)

    def _postfix_reload(self, address: str) -> None:
        started = time.monotonic()
        self._control([_POSTFIX, "-c", str(self._postfix_dir), "reload"], self._postfix_log)
        if not _wait_until(lambda: self._smtp_accepts(address), 10.0):
            raise DevServerError(
                f"postfix still rejects {address} 10 s after reload", _tail(self._postfix_log)
            )
        logger.debug("postfix accepts %s %.3f s after reload", address, time.monotonic() - started)

    def _smtp_accepts(self, address: str) -> bool:
        try:
            with smtplib.SMTP(self.host, self.smtp_port, timeout=5) as smtp:
                smtp.ehlo("probe.localhost")
                smtp.mail("")
                return smtp.rcpt(address)[0] == 250
        except (OSError, smtplib.SMTPException):
            return False

    # -------------------------------------------------------------- lifecycle

    def __enter__(self) -> DevServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 15.0) -> None:
        """Write the configs and start Dovecot and Postfix; return once every port listens.

        Makes the certificates on the first start. A no-op while running.
        Raises :class:`MailStackMissingError` or :class:`DevServerError`.
        """
        ensure_installed()
        with self._lock:
            if self._removed:
                raise DevServerError("this DevServer was stopped and its temporary root removed")
            if self.running:
                return
            started = time.monotonic()
            with _live_lock:
                _live.add(self)
            self._stop_daemons()  # left over from an earlier run on this root, if any
            fresh_ports = not self._ports
            for attempt in range(3):
                if fresh_ports:
                    self._ports = dict(zip(_PORT_NAMES, _free_ports(4), strict=True))
                self._prepare()
                try:
                    self.start_dovecot(timeout)
                    self.start_postfix(timeout)
                    break
                except _PortInUseError:
                    self._stop_daemons()
                    if not fresh_ports or attempt == 2:
                        raise
                    logger.info("a chosen port was taken meanwhile; trying new ones")
                except BaseException:
                    self._stop_daemons()
                    raise
            logger.info("%r up in %.3f s", self, time.monotonic() - started)

    def stop(self) -> None:
        """Stop both daemons and wait until their processes and ports are gone.

        Idempotent; also stops daemons an earlier, crashed run left on this
        root. Removes the root directory if this object created it.
        """
        with self._lock:
            try:
                self._stop_daemons()
            finally:
                if self._owns_root and not self._removed:
                    shutil.rmtree(self._root, ignore_errors=True)
                    self._removed = True
                with _live_lock:
                    _live.discard(self)

    def _stop_daemons(self) -> None:
        errors: list[DevServerError] = []
        for stop in (self.stop_postfix, self.stop_dovecot):
            try:
                stop()
            except DevServerError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def restart_dovecot(self) -> None:
        """Stop and start Dovecot on the same ports (every IMAP connection drops)."""
        with self._lock:
            self.stop_dovecot()
            self.start_dovecot()

    def restart_postfix(self) -> None:
        """Stop and start Postfix on the same ports (every SMTP connection drops)."""
        with self._lock:
            self.stop_postfix()
            self.start_postfix()

    def start_dovecot(self, timeout: float = 15.0) -> None:
        """Start Dovecot again after :meth:`stop_dovecot` (:meth:`start` starts both)."""
        with self._lock:
            self._require_prepared()
            if self._dovecot is not None and self._dovecot.alive():
                return
            run = self._path("dovecot", "run")
            for stale in (run / "master.pid", run / "lmtp", run / "auth-postfix"):
                stale.unlink(missing_ok=True)
            # left by a master killed while it held it (see _terminate); a new one would wait
            self._path("dovecot", "state", "instances.lock").unlink(missing_ok=True)
            out_path = self._path("log", "dovecot.out")
            # Never a pipe: Dovecot keeps its stdio open. -F keeps the master our own
            # child: its pid is known at once, and we reap it.
            with open(out_path, "ab") as out:
                self._dovecot_popen = subprocess.Popen(
                    [_DOVECOT, "-F", "-c", str(self._dovecot_conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,  # Ctrl-C in a terminal is for us, not for it
                )
            self._dovecot = _Proc.of(self._dovecot_popen.pid)
            self._await_ready(
                "dovecot",
                proc=self._dovecot,
                ports=(self.imap_port, self.imaps_port),
                sockets=(run / "lmtp", run / "auth-postfix"),
                logs=(out_path, self._dovecot_log),
                timeout=timeout,
            )
            if self._postfix is not None and self._postfix.alive():
                # deliver now what was deferred while Dovecot was down
                self._control([_POSTFIX, "-c", str(self._postfix_dir), "flush"], self._postfix_log)

    def stop_dovecot(self) -> None:
        """Stop Dovecot: SIGTERM to this instance's master; wait until it is gone."""
        with self._lock:
            proc, self._dovecot = self._dovecot, None
            if proc is None:  # left running by an earlier, crashed run?
                proc = self._orphan(
                    self._path("dovecot", "run", "master.pid"),
                    str(self._dovecot_conf).encode(),
                    "cmdline",
                )
            try:
                if proc is not None:
                    self._terminate("dovecot", proc, dovecot=True)
            finally:
                popen, self._dovecot_popen = self._dovecot_popen, None
                if popen is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        popen.wait(5.0)  # reap our child

    def start_postfix(self, timeout: float = 15.0) -> None:
        """Start Postfix again after :meth:`stop_postfix` (:meth:`start` starts both)."""
        with self._lock:
            self._require_prepared()
            if self._postfix is not None and self._postfix.alive():
                return
            spool = self._path("postfix-spool")
            (spool / "quick-start").touch()  # skip postfix-script's slow integrity checks
            # "postfix start" returns once the master is initialised (master -w).
            self._control([_POSTFIX, "-c", str(self._postfix_dir), "start"], self._postfix_log)
            self._postfix = _read_pid_file(spool / "pid" / "master.pid")
            if self._postfix is None:
                raise DevServerError("postfix exited right after start", _tail(self._postfix_log))
            self._await_ready(
                "postfix",
                proc=self._postfix,
                ports=(self.smtp_port, self.smtps_port),
                sockets=(),
                logs=(self._postfix_log,),
                timeout=timeout,
            )

    def stop_postfix(self) -> None:
        """Stop Postfix: SIGTERM to this instance's master; wait until it is gone."""
        with self._lock:
            proc, self._postfix = self._postfix, None
            if proc is None:  # left running by an earlier, crashed run?
                proc = self._orphan(
                    self._path("postfix-spool", "pid", "master.pid"),
                    f"MAIL_CONFIG={self._postfix_dir}".encode(),
                    "environ",
                )
            if proc is not None:
                self._terminate("postfix", proc)

    # -------------------------------------------------------------- process control

    def _orphan(self, pid_file: pathlib.Path, marker: bytes, where: str) -> _Proc | None:
        """A master of this root that an earlier process left running.

        Recognised by ``marker`` in its ``/proc/PID/{where}`` (the config path
        in Dovecot's command line; ``MAIL_CONFIG=`` in Postfix's environment),
        so that a recycled pid is never signalled.
        """
        proc = None if self._removed else _read_pid_file(pid_file)
        if proc is None or not proc.alive():
            return None
        try:
            info = pathlib.Path(f"/proc/{proc.pid}/{where}").read_bytes()
        except OSError:
            return None
        return proc if marker in info.split(b"\0") else None

    def _control(self, argv: list[str], log: pathlib.Path) -> None:
        """Run a daemon's control command, its output to a file (never a pipe)."""
        out_path = self._path("log", f"{pathlib.Path(argv[0]).name}.out")
        with open(out_path, "ab") as out:
            rc = subprocess.call(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        if rc != 0:
            raise _start_error(f"{' '.join(argv)} failed (exit status {rc})", out_path, log)

    def _await_ready(
        self,
        what: str,
        *,
        proc: _Proc | None,
        ports: Sequence[int],
        sockets: Sequence[pathlib.Path],
        logs: Sequence[pathlib.Path],
        timeout: float,
    ) -> None:
        def ready() -> bool:
            if proc is None or not proc.alive():
                raise _start_error(f"{what} exited during start", *logs)
            return set(ports) <= _listening_ports(proc.pid) and all(p.exists() for p in sockets)

        if not _wait_until(ready, timeout):
            raise DevServerError(
                f"{what} not listening on {list(ports)} after {timeout} s", _tail(*logs)
            )

    def _terminate(
        self,
        what: str,
        master: _Proc,
        *,
        dovecot: bool = False,
        timeout: float = 15.0,
    ) -> None:
        """SIGTERM ``master``; wait until it and its children are gone (not zombies).

        A process's sockets are closed by the time it is a zombie, so its ports
        are free then (checking the ports themselves would wait forever when
        another process holds one of them).

        Children still running after the master has exited get a SIGTERM too.
        ``dovecot`` works around two quirks of Dovecot 2.3's master (measured):
        it leaves imap processes that have a client behind (they notice ~10 s
        later), so every child but the log process gets SIGTERM at once (an
        imap process says ``BYE Server shutting down``); and once all else has
        stopped, it SIGQUITs its log process and sleeps a fixed second, so it
        is SIGKILLed when only the log process is left (which drains its pipes
        and exits). Stop then takes ~0.05 s instead of 1.1 s or 10 s. The kill
        can leave ``state_dir/instances.lock`` behind; :meth:`start_dovecot`
        removes it (a new master would wait for that dotlock to go stale).
        """
        started = time.monotonic()
        if not master.alive():  # killed from outside; its pid may be another process's now
            first: list[_Proc] = []
            procs = {master}
        else:
            procs = {master, *_descendants(master.pid)}
            first = [master]
        if dovecot:
            first += [p for p in procs if p != master and not _is_dovecot_log(p)]
        for proc in first:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        orphans_signalled = False

        def gone() -> bool:
            nonlocal orphans_signalled
            if master.alive():
                procs.update(_descendants(master.pid))  # forked during shutdown
            children = [p for p in procs if p != master and p.alive()]
            if master.alive():
                if dovecot and all(map(_is_dovecot_log, children)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(master.pid, signal.SIGKILL)
            elif children and not orphans_signalled:
                for child in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGTERM)
                orphans_signalled = True
            return not children and not master.alive()

        if not _wait_until(gone, timeout):
            alive = sorted(p.pid for p in procs if p.alive())
            logger.warning("%s did not stop within %.0f s; killing %s", what, timeout, alive)
            for proc in procs:
                if proc.alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
            if not _wait_until(gone, 5.0):
                raise DevServerError(f"{what} processes survived SIGKILL", self.log_tail())
        logger.debug("%s stopped in %.3f s", what, time.monotonic() - started)

    # -------------------------------------------------------------- files

    def _require_prepared(self) -> None:
        if not self._ports or not self._dovecot_conf.exists():
            raise DevServerError("not started: start() writes the configuration")

    def _prepare(self) -> None:
        """Make the directory tree, certificates, configs and account files."""
        for parent in self._root.parents:  # the unprivileged daemons must reach the root
            if parent.exists() and not parent.stat().st_mode & 0o001:
                raise DevServerError(
                    f"cannot use root {self._root}: {parent} is not searchable by other users "
                    "(Dovecot's and Postfix's unprivileged processes work under the root); "
                    f"pick another directory or chmod o+x {parent}"
                )
        self._root.mkdir(parents=True, exist_ok=True)
        self._root.chmod(0o755)
        for sub in ("tls", "log", "dovecot/run", "dovecot/state", "dovecot/log", "postfix"):
            self._path(sub).mkdir(parents=True, exist_ok=True)
        postfix_uid = _user_id("postfix")
        owned = [("mail", _MAIL_UID, _MAIL_UID, 0o755), ("postfix-log", 0, 0, 0o755)]
        owned += [("postfix-data", postfix_uid, _group_id("postfix"), 0o700)]
        owned += [("postfix-spool", 0, 0, 0o755)]
        # The whole queue layout, so that every start can skip Postfix's integrity checks.
        for sub, owner, group, mode in _QUEUE_DIRS:
            gid = _group_id(group) if group else -1
            owned.append((f"postfix-spool/{sub}", _user_id(owner), gid, mode))
        for sub, uid, gid, mode in owned:
            path = self._path(sub)
            path.mkdir(exist_ok=True)
            os.chown(path, uid, gid)
            path.chmod(mode)
        self._make_certs()
        _write_atomic(self._dovecot_conf, self._dovecot_config())
        _write_atomic(self._postfix_dir / "main.cf", self._postfix_main_cf(), backdate=True)
        _write_atomic(self._postfix_dir / "master.cf", self._postfix_master_cf(), backdate=True)
        self._write_account_files()

    def _make_certs(self) -> None:
        tls = self._path("tls")
        if all((tls / name).exists() for name in ("ca.pem", "cert.pem", "key.pem")):
            return
        started = time.monotonic()
        (tls / "server.ext").write_text(
            "basicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\n"
            "extendedKeyUsage = serverAuth\n"
            "subjectKeyIdentifier = hash\n"
            "authorityKeyIdentifier = keyid, issuer\n"
            "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
        )
        new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        commands = [
            ["openssl", "req", "-x509", *new_key, "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "3650", "-subj", f"/CN=emailmw dev CA {self._instance}",
             "-addext", "basicConstraints = critical, CA:TRUE",
             "-addext", "keyUsage = critical, keyCertSign, cRLSign"],
            ["openssl", "req", *new_key, "-keyout", "key.pem", "-out", "server.csr",
             "-subj", "/CN=localhost"],
            ["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-set_serial", str(secrets.randbits(63)), "-days", "825",
             "-extfile", "server.ext", "-out", "cert.pem"],
        ]  # fmt: skip
        for argv in commands:
            done = subprocess.run(
                argv, cwd=tls, stdin=subprocess.DEVNULL, capture_output=True, check=False
            )
            if done.returncode != 0:
                raise DevServerError(
                    f"{' '.join(argv[:3])} failed", done.stderr.decode("utf-8", "replace")
                )
        for name in ("ca.key", "key.pem"):
            (tls / name).chmod(0o600)
        logger.debug("test CA and server certificate made in %.3f s", time.monotonic() - started)

    def _dovecot_config(self) -> str:
        r = self._root
        return f"""\
# generated by emailmw.devserver; rewritten by every start()
instance_name = {self._instance}
base_dir = {r}/dovecot/run
state_dir = {r}/dovecot/state
protocols = imap lmtp
listen = 127.0.0.1
log_path = {r}/dovecot/log/dovecot.log
info_log_path = {r}/dovecot/log/dovecot.log
debug_log_path = {r}/dovecot/log/dovecot.log
ssl = yes
ssl_cert = <{r}/tls/cert.pem
ssl_key = <{r}/tls/key.pem
ssl_dh = <{_DOVECOT_DH}
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = no
auth_mechanisms = plain login
# tests log in wrongly on purpose: failures answered within 0.5 s (Dovecot checks
# its queue of delayed failures every 500 ms), not after 2 s ...
auth_failure_delay = 0
first_valid_uid = 500
mail_location = maildir:~/Maildir
mail_fsync = never
recipient_delimiter = +
lmtp_save_to_detail_mailbox = yes
lda_mailbox_autocreate = yes
lda_mailbox_autosubscribe = yes
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {r}/dovecot/users/%n
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {r}/dovecot/users/%n
  default_fields = uid={_MAIL_UID} gid={_MAIL_UID} home={r}/mail/%d/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
service auth {{
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
service anvil {{
  # ... and no growing penalty (up to 15 s) for 127.0.0.1 after failures
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
protocol imap {{
  # many test clients log in as one user from 127.0.0.1 (default: 10)
  mail_max_userip_connections = 1000
}}
protocol lmtp {{
  postmaster_address = postmaster@{self._domain}
}}
"""

    def _postfix_main_cf(self) -> str:
        r = self._root
        return f"""\
# generated by emailmw.devserver; rewritten by every start()
compatibility_level = 3.6
queue_directory = {r}/postfix-spool
data_directory = {r}/postfix-data
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
daemon_directory = {_POSTFIX_DAEMONS}
command_directory = /usr/sbin
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-{self._instance}
maillog_file = {r}/postfix-log/postfix.log
maillog_file_prefixes = /var, /dev/stdout, {r}
myhostname = mail.{self._domain}
mydomain = {self._domain}
myorigin = $mydomain
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
local_transport = error:local delivery is disabled
default_transport = error:outbound mail is disabled
relay_transport = error:outbound mail is disabled
virtual_mailbox_domains = {self._domain}
virtual_mailbox_maps = texthash:{r}/postfix/vmailbox
virtual_transport = lmtp:unix:{r}/dovecot/run/lmtp
recipient_delimiter = +
smtp_dns_support_level = disabled
lmtp_host_lookup = native
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
smtpd_sasl_type = dovecot
smtpd_sasl_path = {r}/dovecot/run/auth-postfix
smtpd_sasl_auth_enable = yes
smtpd_tls_cert_file = {r}/tls/cert.pem
smtpd_tls_key_file = {r}/tls/key.pem
smtpd_tls_security_level = may
in_flow_delay = 0
smtpd_peername_lookup = no
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_recipient_rate_limit = 0
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 1000
smtpd_hard_error_limit = 1000
message_size_limit = 104857600
# mail deferred while Dovecot was down is retried within seconds, not minutes
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"""

    def _postfix_master_cf(self) -> str:
        return (
            "# generated by emailmw.devserver; rewritten by every start()\n"
            f"127.0.0.1:{self.smtp_port} inet n - n - - smtpd\n"
            f"127.0.0.1:{self.smtps_port} inet n - n - - smtpd\n"
            "  -o smtpd_tls_wrappermode=yes\n"
            "  -o smtpd_tls_security_level=encrypt\n" + _MASTER_CF_SERVICES
        )

    # -------------------------------------------------------------- test helpers

    def new_mailbox(self, account: DevAccount | str, prefix: str = "t") -> tuple[str, str]:
        """Create a fresh folder for ``account``; return ``(folder, address)``.

        Mail to ``address`` (``name+folder@domain``) is filed into ``folder``,
        which exists (IMAP CREATE, subscribed) when this returns.
        """
        if not _FOLDER_PREFIX_RE.match(prefix):
            raise ValueError(f"folder prefix {prefix!r}: only letters, digits, '_' and '-'")
        acct = self._resolve(account)
        folder = f"{prefix}{secrets.token_hex(4)}"
        with self._imap(acct) as imap:
            _ok(imap.create(_quote(folder)), f"CREATE {folder}")
            _ok(imap.subscribe(_quote(folder)), f"SUBSCRIBE {folder}")
        return folder, f"{acct.name}+{folder}@{self._domain}"

    def append(self, account: DevAccount | str, raw: bytes, mailbox: str = "INBOX") -> None:
        """IMAP APPEND ``raw`` (a whole RFC 5322 message) to ``mailbox`` of ``account``."""
        with self._imap(self._resolve(account)) as imap:
            _ok(imap.append(_quote(mailbox), "", None, raw), f"APPEND to {mailbox}")

    def kick(self, account: DevAccount | str) -> None:
        """Drop the account's IMAP connections (``doveadm kick``); return once they are gone."""
        address = self._resolve(account).address

        def connected() -> bool:
            who = self._doveadm("who", "-1").splitlines()
            return any(line.split()[:1] == [address] for line in who)

        self._doveadm("kick", address)
        if not _wait_until(lambda: not connected(), 5.0):
            raise DevServerError(f"{address} still connected after doveadm kick", self.log_tail())

    def _doveadm(self, *args: str) -> str:
        self._require_prepared()
        done = subprocess.run(  # a client, not a daemon: capturing its output is fine
            [_DOVEADM, "-c", str(self._dovecot_conf), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            timeout=30,
        )
        if done.returncode not in (0, 68):  # 68 (EX_NOUSER): nobody to kick
            raise DevServerError(
                f"doveadm {' '.join(args)} failed (exit status {done.returncode})",
                done.stderr.decode("utf-8", "replace"),
            )
        return done.stdout.decode("utf-8", "replace")

    @contextlib.contextmanager
    def _imap(self, account: DevAccount) -> Iterator[imaplib.IMAP4]:
        imap = imaplib.IMAP4(self.host, self.imap_port, timeout=30)
        try:
            imap.starttls(ssl.create_default_context(cafile=str(self.ca_file)))
            imap.login(account.address, account.password)
            yield imap
        finally:
            with contextlib.suppress(OSError, imaplib.IMAP4.error):
                imap.logout()

    def log_tail(self, n: int = 50) -> str:
        """The last ``n`` lines of the Dovecot log and of the Postfix log."""
        return "\n".join(
            f"==> {log} <==\n{_tail(log, n=n)}" for log in (self._dovecot_log, self._postfix_log)
        )

    # -------------------------------------------------------------- emailmw config

    def config(
        self,
        account: DevAccount | str,
        *,
        mailbox: str = "INBOX",
        to: str | None = None,
        tls: str = "starttls",
        receive_mode: str = "auto",
        polling_period_ns: int = 10_000_000,
    ) -> dict[str, Any]:
        """The content of an emailmw config file (``email.yml``) for ``account``.

        ``tls="starttls"``: ``smtp://`` and ``imap://`` URLs (STARTTLS on the
        plain ports); ``tls="implicit"``: ``smtps://`` and ``imaps://``. With a
        ``mailbox`` other than ``INBOX`` (a folder of :meth:`new_mailbox`),
        ``from`` and the default ``to`` are that folder's address, so that what
        the context sends, and the replies to it (service responses), land in it.
        """
        acct = self._resolve(account)
        own = acct.address if mailbox == "INBOX" else f"{acct.name}+{mailbox}@{self._domain}"
        extra = {} if own == acct.address else {"from": own}
        if tls == "starttls":
            smtp = f"smtp://{self.host}:{self.smtp_port}"
            imap = f"imap://{self.host}:{self.imap_port}"
        elif tls == "implicit":
            smtp = f"smtps://{self.host}:{self.smtps_port}"
            imap = f"imaps://{self.host}:{self.imaps_port}"
        else:
            raise ValueError(f"tls must be 'starttls' or 'implicit', not {tls!r}")
        user = {"url-smtp": smtp, "url-imap": imap, "username": acct.address}
        return {
            "email": {
                "user": {**user, "password": acct.password},
                **extra,
                "recipients": {"to": to or own},
                "polling-period": polling_period_ns,
                "receive-mode": receive_mode,
                "mailbox": mailbox,
                "tls": {"ca-file": str(self.ca_file)},
            }
        }

    def write_config(
        self,
        account: DevAccount | str,
        path: str | os.PathLike[str] | None = None,
        **kw: Any,
    ) -> pathlib.Path:
        """Write :meth:`config` (``**kw`` passed on) as YAML; default path ``ROOT/<name>.yml``."""
        import yaml

        acct = self._resolve(account)
        target = pathlib.Path(path) if path is not None else self._root / f"{acct.name}.yml"
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(target, yaml.safe_dump(self.config(acct, **kw), sort_keys=False), 0o600)
        return target


def _start_error(message: str, *logs: pathlib.Path) -> DevServerError:
    tail = _tail(*logs)
    cls = _PortInUseError if "in use" in tail else DevServerError
    return cls(message, tail)


def _quote(mailbox: str) -> str:
    """An IMAP quoted string (imaplib sends mailbox names as they are)."""
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ok(response: tuple[str, Any], what: str) -> None:
    if response[0] != "OK":
        raise DevServerError(f"IMAP {what} failed: {response[0]} {response[1]!r}")


# ------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``emailmw dev-server``: run a local mail stack until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="emailmw dev-server",
        description="Run a real Dovecot + Postfix for emailmw on free loopback ports (as root).",
    )
    parser.add_argument("--accounts", default="alice,bob", help="comma-separated names")
    parser.add_argument("--domain", default="example.test", help="mail domain")
    parser.add_argument("--root", help="state directory (default: temporary, removed at exit)")
    parser.add_argument("--config-dir", help="where to write <account>.yml (default: the root)")
    parser.add_argument("--tls", choices=("starttls", "implicit"), default="starttls")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.accounts.split(",") if n.strip()]
    if not names:
        parser.error("--accounts needs at least one name")

    stop = threading.Event()
    handlers = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    server: DevServer | None = None
    try:
        server = DevServer(args.root, accounts=names, domain=args.domain)
        server.start()
        config_dir = pathlib.Path(args.config_dir) if args.config_dir else server.root
        paths = [
            server.write_config(a, config_dir / f"{a.name}.yml", tls=args.tls)
            for a in server.accounts
        ]
        h = server.host
        lines = [
            f"emailmw dev mail server running; root {server.root}",
            f"  SMTP {h}:{server.smtp_port} (STARTTLS)  SMTPS {h}:{server.smtps_port}",
            f"  IMAP {h}:{server.imap_port} (STARTTLS)  IMAPS {h}:{server.imaps_port}",
            f"  CA   {server.ca_file}",
            *(
                f"  {a.address}  password {a.password}  config {p}"
                for a, p in zip(server.accounts, paths, strict=True)
            ),
            f"try:  EMAIL_CONFIG_FILE={paths[0]} python examples/sub.py",
            "Ctrl-C stops it.",
        ]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        stop.wait()
        sys.stdout.write("stopping\n")
        return 0
    except (DevServerError, ValueError) as exc:
        sys.stderr.write(f"emailmw dev-server: {exc}\n")
        return 1
    finally:
        if server is not None:
            server.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
