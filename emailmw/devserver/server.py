"""The dev server: :class:`DevServer` drives one Dovecot + Postfix instance.

It makes the root's directory tree, the test CA and server certificate
(:mod:`emailmw.devserver.certs`), the configs (:mod:`emailmw.devserver.configs`)
and the account files; starts each daemon and waits until its ports listen;
stops it and waits until its processes are gone
(:mod:`emailmw.devserver.processes`). Plus test helpers (new folders,
APPEND, ``doveadm kick``, a scripted refusal of one recipient) and the emailmw
config for an account.

An ``atexit`` hook stops every server a program leaves running.

Measured here (medians, 2 cores): start 0.11 s (0.17 s with the first
start's certificates), stop 0.04 s, ``restart_dovecot`` 0.09 s,
``restart_postfix`` 0.06 s, ``add_account`` 0.07 s, ``new_mailbox`` 0.03 s.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import imaplib
import ipaddress
import json
import logging
import os
import pathlib
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

from emailmw.devserver.certs import make_certs
from emailmw.devserver.configs import (
    MAIL_UID,
    QUEUE_DIRS,
    RMW_EMAIL_HEADER_CHECKS,
    dovecot_config,
    postfix_main_cf,
    postfix_master_cf,
)
from emailmw.devserver.errors import DevServerError, PortInUseError
from emailmw.devserver.install import DOVEADM, DOVECOT, POSTFIX, ensure_installed
from emailmw.devserver.oauth2 import TokenIssuer
from emailmw.devserver.processes import (
    Proc,
    await_ready,
    control,
    free_ports,
    group_id,
    orphan,
    read_pid_file,
    tail,
    terminate,
    user_id,
    wait_until,
    write_atomic,
)

__all__ = ["DevAccount", "DevServer"]

logger = logging.getLogger(__name__)

_PORT_NAMES = ("smtp", "smtps", "imap", "imaps")
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9._-]*[a-z0-9_-])?\Z")
_DOMAIN_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+\Z")
_FOLDER_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]*\Z")
# "450 4.2.1 text": the class of the enhanced status code must match the reply's
_REFUSAL_RE = re.compile(
    r"(?P<code>([45])\d\d) (?P<status>\2\.\d{1,3}\.\d{1,3}) (?P<text>[ -~]+)\Z"
)
_ADDRESS_RE = re.compile(r"[^\s@<>\"]+@[^\s@<>\"]+\Z")
#: The ports the reference implementation (rmw_email) hard-codes.
RMW_EMAIL_PORTS = {"imaps": 993, "smtps": 465}


@dataclass(frozen=True)
class DevAccount:
    """One mail account of a :class:`DevServer`."""

    name: str
    """Local part, e.g. ``"alice"``."""
    address: str
    """``"alice@example.test"``; also the IMAP and SMTP username."""
    password: str


def _check_rmw_email_ports() -> None:
    """Raise :class:`PortInUseError` unless 127.0.0.1:993 and :465 can be bound."""
    taken = []
    for name, port in RMW_EMAIL_PORTS.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as exc:
                taken.append(f"127.0.0.1:{port} ({name.upper()}): {exc.strerror or exc}")
    if taken:
        raise PortInUseError(
            "rmw_email nodes need IMAPS on port 993 and SMTPS on port 465 (they hard-code "
            f"them), but cannot listen on {'; '.join(taken)}; stop what listens there, "
            "or run without the fixed ports"
        )


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

    ``rmw_email_compat=True`` adds the Postfix header checks that let reference
    (rmw_email) nodes read the mail (see docs/interop.md) and turns SMTPUTF8
    off; ``rmw_email_ports=True`` puts IMAPS on 127.0.0.1:993 and SMTPS on
    127.0.0.1:465, the ports rmw_email hard-codes (:meth:`start` raises
    :class:`PortInUseError` if either is taken).
    ``auth="oauth2"``: IMAP and SMTP also offer ``XOAUTH2`` and ``OAUTHBEARER``,
    checked by Dovecot's ``oauth2`` passdb against JWTs it validates locally
    (:mod:`emailmw.devserver.oauth2`); :meth:`mint_token` makes them,
    :meth:`revoke_token` revokes one, :meth:`token_command` is a command that
    prints one. Passwords keep working (PLAIN, LOGIN).
    ``host`` is the loopback address every daemon listens on (and Postfix
    sends from); Linux routes all of 127.0.0.0/8 to ``lo``, so servers of
    different domains can each have their own address with no setup
    (:class:`~emailmw.devserver.Federation`). :meth:`relay` routes another
    domain's mail to its server.
    ``max_user_connections``: how many IMAP connections one account may have
    open from 127.0.0.1 (Dovecot's ``mail_max_userip_connections``; a login
    past it is refused with ``[LIMIT]``, see :class:`~emailmw.ConnectionLimitError`).
    """

    host: str = "127.0.0.1"
    """The IPv4 loopback address of every listener (the server certificate names it)."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        accounts: Sequence[str] = ("alice", "bob"),
        domain: str = "example.test",
        auth: str = "password",
        host: str = "127.0.0.1",
        *,
        rmw_email_compat: bool = False,
        rmw_email_ports: bool = False,
        max_user_connections: int = 1000,
    ) -> None:
        if not isinstance(max_user_connections, int) or max_user_connections < 1:
            raise ValueError(
                f"max_user_connections must be a positive int, not {max_user_connections!r}"
            )
        self._max_user_connections = max_user_connections
        if auth not in ("password", "oauth2"):
            raise ValueError(f"auth must be 'password' or 'oauth2', not {auth!r}")
        self._auth = auth
        domain = domain.lower()
        if not _DOMAIN_RE.match(domain):
            raise ValueError(f"invalid mail domain {domain!r}")
        self._domain = domain
        self._rmw_email_compat = rmw_email_compat
        self._rmw_email_ports = rmw_email_ports
        self.host = _loopback_ipv4(host)
        self._relays: dict[str, tuple[str, int]] = {}  # domain -> (host, SMTP port)
        self._lock = threading.RLock()
        self._accounts: dict[str, DevAccount] = {}
        self._refusals: dict[str, str] = {}  # address -> scripted RCPT TO reply
        for name in accounts:
            self._new_account(name)
        self._ports: dict[str, int] = {}
        self._instance = f"emailmw-{secrets.token_hex(4)}"
        self._dovecot: Proc | None = None
        self._dovecot_popen: subprocess.Popen[bytes] | None = None
        self._postfix: Proc | None = None
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
    def max_user_connections(self) -> int:
        """How many IMAP connections one account may have open from one address."""
        return self._max_user_connections

    @property
    def auth(self) -> str:
        """``password``, or ``oauth2`` (XOAUTH2 and OAUTHBEARER offered too)."""
        return self._auth

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

    @property
    def postfix_running(self) -> bool:
        """True while Postfix's master is alive (SMTP accepted)."""
        return self._postfix is not None and self._postfix.alive()

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
        dovecot_gid = group_id("dovecot")  # the auth process reads the files
        users.mkdir(exist_ok=True)
        os.chown(users, 0, dovecot_gid)
        users.chmod(0o750)
        for path in users.iterdir():
            if path.name not in self._accounts:
                path.unlink()
        for a in self._accounts.values():
            line = f"{a.address}:{{PLAIN}}{a.password}::::::\n"
            write_atomic(users / a.name, line, 0o640, group=dovecot_gid)
        vmailbox = "".join(f"{a.address} ok\n" for a in self._accounts.values())
        write_atomic(self._postfix_dir / "vmailbox", vmailbox, backdate=True)

    def _postfix_reload(self, address: str) -> None:
        started = time.monotonic()
        self._postfix_control("reload")
        if not wait_until(lambda: self._smtp_accepts(address), 10.0):
            raise DevServerError(
                f"postfix still rejects {address} 10 s after reload", tail(self._postfix_log)
            )
        logger.debug("postfix accepts %s %.3f s after reload", address, time.monotonic() - started)

    def _smtp_accepts(self, address: str) -> bool:
        reply = self._rcpt_reply(address)
        return reply is not None and reply[0] == 250

    def _rcpt_reply(self, address: str) -> tuple[int, str] | None:
        """What a new SMTP session answers to ``RCPT TO:<address>`` (None: no answer)."""
        try:
            with smtplib.SMTP(self.host, self.smtp_port, timeout=5) as smtp:
                smtp.ehlo("probe.localhost")
                smtp.mail("")
                code, text = smtp.rcpt(address)
                return code, text.decode("utf-8", "replace")
        except (OSError, smtplib.SMTPException):
            return None

    # -------------------------------------------------------------- refused recipients

    def refuse_recipient(self, address: str, reply: str = "450 4.2.1 try again later") -> None:
        """Make Postfix answer ``RCPT TO:<address>`` with ``reply`` until
        :meth:`accept_recipient`, for testing what a client does with a refused
        recipient.

        ``reply`` is a ``4xx`` (temporary) or ``5xx`` (permanent) code, an enhanced
        status code of the same class and a text, e.g. ``"550 5.7.1 not here"``;
        Postfix answers ``450 4.2.1 <address>: Recipient address rejected: try
        again later``. It is a ``check_recipient_access`` map in ``main.cf``, kept
        across restarts. While running, returns once a new SMTP session gets the
        reply (``postfix reload``); sessions opened before keep the old answer.
        (An address of the domain with no account is refused anyway: ``550 5.1.1``.)
        """
        match = _REFUSAL_RE.match(reply)
        if match is None:
            raise ValueError(
                f"invalid reply {reply!r}: want a 4xx or 5xx code, an enhanced status code "
                "of the same class and a printable ASCII text, e.g. '450 4.2.1 try again later'"
            )
        if not _ADDRESS_RE.match(address):
            raise ValueError(f"invalid recipient address {address!r}")
        with self._lock:
            self._refusals[address.lower()] = reply
            self._apply_refusals(
                f"a new SMTP session answers {reply!r} to RCPT TO:<{address}>",
                lambda got: _is_scripted(got, reply),
                address,
            )

    def accept_recipient(self, address: str) -> None:
        """Undo :meth:`refuse_recipient` for ``address`` (no-op if not refused).

        While running, returns once a new SMTP session no longer gets the scripted reply.
        """
        with self._lock:
            reply = self._refusals.pop(address.lower(), None)
            if reply is None:
                return
            self._apply_refusals(
                f"a new SMTP session no longer answers {reply!r} to RCPT TO:<{address}>",
                lambda got: got is not None and not _is_scripted(got, reply),
                address,
            )

    def _apply_refusals(
        self,
        goal: str,
        reached: Callable[[tuple[int, str] | None], bool],
        address: str,
    ) -> None:
        """Write the recipient access map; while running, reload until ``reached``."""
        if not self._postfix_dir.exists():
            return  # start() writes it
        self._write_recipient_access()
        if self._postfix is None or not self._postfix.alive():
            return
        started = time.monotonic()
        self._postfix_control("reload")
        if not wait_until(lambda: reached(self._rcpt_reply(address)), 10.0):
            raise DevServerError(
                f"10 s after postfix reload, still not true: {goal}", tail(self._postfix_log)
            )
        logger.debug("%s %.3f s after reload", goal, time.monotonic() - started)

    # -------------------------------------------------------------- relays

    def relay(self, domain: str, host: str, port: int) -> None:
        """Send mail for ``domain`` to the SMTP server at ``host:port``, as an MX
        record would (a Postfix transport map entry, no DNS): Postfix queues it
        and retries every second or two while that server is unreachable.

        Kept across restarts. While running, Postfix restarts to take it (about
        0.06 s; SMTP connections drop, the queue stays), so that the next email
        is routed by the new map.
        """
        domain = domain.lower()
        if not _DOMAIN_RE.match(domain):
            raise ValueError(f"invalid mail domain {domain!r}")
        if domain == self._domain:
            raise ValueError(f"{domain} is this server's own domain: it cannot relay to itself")
        if not 0 < port < 65536:
            raise ValueError(f"invalid SMTP port {port} for relay to {domain}")
        target = (_loopback_ipv4(host), port)
        with self._lock:
            if self._relays.get(domain) == target:
                return
            self._relays[domain] = target
            if self._postfix_dir.exists():
                self._write_transport()
            if self._postfix is not None and self._postfix.alive():
                self.restart_postfix()

    @property
    def relays(self) -> dict[str, tuple[str, int]]:
        """The domains :meth:`relay` routes: domain -> ``(host, port)`` (a copy)."""
        with self._lock:
            return dict(self._relays)

    def _write_transport(self) -> None:
        lines = "".join(f"{d} smtp:[{h}]:{p}\n" for d, (h, p) in self._relays.items())
        write_atomic(self._postfix_dir / "transport", lines, backdate=True)

    def _write_recipient_access(self) -> None:
        lines = "".join(f"{address} {reply}\n" for address, reply in self._refusals.items())
        write_atomic(self._postfix_dir / "recipient_access", lines, backdate=True)

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
            if self._rmw_email_ports:
                _check_rmw_email_ports()
            for attempt in range(3):
                if fresh_ports:
                    ports = free_ports(4, self.host)
                    self._ports = dict(zip(_PORT_NAMES, ports, strict=True))
                    if self._rmw_email_ports:
                        self._ports.update(RMW_EMAIL_PORTS)
                self._prepare()
                try:
                    self.start_dovecot(timeout)
                    self.start_postfix(timeout)
                    break
                except PortInUseError:
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
            # left by a master killed while it held it (see processes.terminate); a new one waits
            self._path("dovecot", "state", "instances.lock").unlink(missing_ok=True)
            out_path = self._path("log", "dovecot.out")
            # Never a pipe: Dovecot keeps its stdio open. -F keeps the master our own
            # child: its pid is known at once, and we reap it.
            with open(out_path, "ab") as out:
                self._dovecot_popen = subprocess.Popen(
                    [DOVECOT, "-F", "-c", str(self._dovecot_conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,  # Ctrl-C in a terminal is for us, not for it
                )
            self._dovecot = Proc.of(self._dovecot_popen.pid)
            await_ready(
                "dovecot",
                proc=self._dovecot,
                ports=(self.imap_port, self.imaps_port),
                sockets=(run / "lmtp", run / "auth-postfix"),
                logs=(out_path, self._dovecot_log),
                timeout=timeout,
                host=self.host,
            )
            if self._postfix is not None and self._postfix.alive():
                # deliver now what was deferred while Dovecot was down
                self._postfix_control("flush")

    def stop_dovecot(self) -> None:
        """Stop Dovecot: SIGTERM to this instance's master; wait until it is gone."""
        with self._lock:
            proc, self._dovecot = self._dovecot, None
            if proc is None and not self._removed:  # left running by an earlier, crashed run?
                proc = orphan(
                    self._path("dovecot", "run", "master.pid"),
                    str(self._dovecot_conf).encode(),
                    "cmdline",
                )
            try:
                if proc is not None:
                    terminate("dovecot", proc, log_tail=self.log_tail, dovecot=True)
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
            try:
                self._postfix_control("start")
            except DevServerError:
                # Seen once under heavy load: the master started ("daemon started" in
                # the log) yet the control command exited 1. Judge by the master.
                started = read_pid_file(spool / "pid" / "master.pid")
                if started is None or not started.alive():
                    time.sleep(0.2)
                    self._postfix_control("start")  # one more try, or raise
                else:
                    logger.warning("postfix start exited 1 but its master runs; using it")
            self._postfix = read_pid_file(spool / "pid" / "master.pid")
            if self._postfix is None:
                raise DevServerError("postfix exited right after start", tail(self._postfix_log))
            await_ready(
                "postfix",
                proc=self._postfix,
                ports=(self.smtp_port, self.smtps_port),
                sockets=(),
                logs=(self._postfix_log,),
                timeout=timeout,
                host=self.host,
            )

    def stop_postfix(self) -> None:
        """Stop Postfix: SIGTERM to this instance's master; wait until it is gone."""
        with self._lock:
            proc, self._postfix = self._postfix, None
            if proc is None and not self._removed:  # left running by an earlier, crashed run?
                proc = orphan(
                    self._path("postfix-spool", "pid", "master.pid"),
                    f"MAIL_CONFIG={self._postfix_dir}".encode(),
                    "environ",
                )
            if proc is not None:
                terminate("postfix", proc, log_tail=self.log_tail)

    def _postfix_control(self, command: str) -> None:
        """Run ``postfix COMMAND`` for this instance (see :func:`control`)."""
        argv = [POSTFIX, "-c", str(self._postfix_dir), command]
        control(argv, self._path("log", "postfix.out"), self._postfix_log)

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
        postfix_uid = user_id("postfix")
        owned = [("mail", MAIL_UID, MAIL_UID, 0o755), ("postfix-log", 0, 0, 0o755)]
        owned += [("postfix-data", postfix_uid, group_id("postfix"), 0o700)]
        owned += [("postfix-spool", 0, 0, 0o755)]
        # The whole queue layout, so that every start can skip Postfix's integrity checks.
        for sub, owner, group, mode in QUEUE_DIRS:
            gid = group_id(group) if group else -1
            owned.append((f"postfix-spool/{sub}", user_id(owner), gid, mode))
        for sub, uid, gid, mode in owned:
            path = self._path(sub)
            path.mkdir(exist_ok=True)
            os.chown(path, uid, gid)
            path.chmod(mode)
        make_certs(
            self._path("tls"),
            ca_name=f"emailmw dev CA {self._instance}",
            hosts=(self.host,),
        )
        if self._auth == "oauth2":
            TokenIssuer(self._root).prepare()
        self._write_dovecot_conf()
        main_cf = postfix_main_cf(
            self._root,
            instance=self._instance,
            domain=self._domain,
            host=self.host,
            rmw_email_compat=self._rmw_email_compat,
        )
        if self._rmw_email_compat:
            write_atomic(
                self._postfix_dir / "rmw_email_header_checks",
                RMW_EMAIL_HEADER_CHECKS,
                backdate=True,
            )
        write_atomic(self._postfix_dir / "main.cf", main_cf, backdate=True)
        master_cf = postfix_master_cf(
            smtp_port=self.smtp_port, smtps_port=self.smtps_port, host=self.host
        )
        write_atomic(self._postfix_dir / "master.cf", master_cf, backdate=True)
        self._write_account_files()
        self._write_recipient_access()
        self._write_transport()

    def _write_dovecot_conf(self) -> None:
        oauth2_args = TokenIssuer(self._root).settings_file if self._auth == "oauth2" else None
        dovecot_conf = dovecot_config(
            self._root,
            instance=self._instance,
            domain=self._domain,
            imap_port=self.imap_port,
            imaps_port=self.imaps_port,
            oauth2_args=oauth2_args,
            host=self.host,
            max_user_connections=self._max_user_connections,
        )
        write_atomic(self._dovecot_conf, dovecot_conf)

    # -------------------------------------------------------------- test helpers

    def set_max_user_connections(self, limit: int) -> None:
        """Change :attr:`max_user_connections` of the running server (``doveadm reload``).

        Open connections stay, even past the new limit: only logins from now on
        are checked against it.
        """
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_user_connections must be a positive int, not {limit!r}")
        with self._lock:
            self._require_prepared()
            self._max_user_connections = limit
            self._write_dovecot_conf()
            self._doveadm("reload")

    def imap_connections(self, account: DevAccount | str) -> set[int]:
        """The pids of the Dovecot ``imap`` processes serving ``account``'s open IMAP
        connections (``doveadm who``), one per connection."""
        address = self._resolve(account).address
        # "doveadm who -1": one line per connection, "username proto pid ip"
        rows = (line.split() for line in self._doveadm("who", "-1").splitlines()[1:])
        return {int(row[2]) for row in rows if len(row) >= 3 and row[0] == address}

    def drop_imap_connection(self, account: DevAccount | str, pid: int) -> None:
        """End one of ``account``'s IMAP connections: the Dovecot ``imap`` process
        ``pid`` (one of :meth:`imap_connections`) gets SIGTERM and says ``BYE``;
        return once it is gone. The account's other connections stay."""
        if pid not in self.imap_connections(account):
            raise DevServerError(f"pid {pid} serves no IMAP connection of {account}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_until(lambda: pid not in self.imap_connections(account), 5.0):
            raise DevServerError(f"IMAP connection {pid} still open after SIGTERM", self.log_tail())

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
        """Drop the account's IMAP connections (``doveadm kick``); return once they are gone.

        Only the connections open before the kick are waited for: a client that
        reconnects at once (as emailmw's receiver does) opens a new one, which
        stays.
        """
        address = self._resolve(account).address
        kicked = self.imap_connections(account)
        self._doveadm("kick", address)
        if not wait_until(lambda: not (kicked & self.imap_connections(account)), 5.0):
            raise DevServerError(f"{address} still connected after doveadm kick", self.log_tail())

    def _doveadm(self, *args: str) -> str:
        self._require_prepared()
        done = subprocess.run(  # a client, not a daemon: capturing its output is fine
            [DOVEADM, "-c", str(self._dovecot_conf), *args],
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

    # -------------------------------------------------------------- OAuth2 tokens

    def _issuer(self) -> TokenIssuer:
        if self._auth != "oauth2":
            raise DevServerError('tokens need DevServer(auth="oauth2")')
        self._require_prepared()
        return TokenIssuer(self._root)

    def mint_token(
        self, account: DevAccount | str, lifetime: float = 3600.0, *, valid: bool = True
    ) -> str:
        """A new OAuth2 access token (a JWT) for ``account``, accepted for
        ``lifetime`` seconds (negative: expired already). ``valid=False``: a
        forgery the server rejects (signed with the wrong key)."""
        return self._issuer().mint(self._resolve(account).address, lifetime, valid=valid)

    def revoke_token(self, token: str) -> None:
        """Revoke ``token``: new logins with it fail (sessions open stay open).

        Deletes its key, then reloads Dovecot (``doveadm reload``: a new auth
        process, since the old one caches the keys it has read) and Postfix (its
        ``smtpd`` processes keep their connection to the old auth process), and
        returns once a new SMTP session refuses the token (about a second)."""
        with self._lock:
            self._issuer().revoke(token)
            if self._dovecot is not None and self._dovecot.alive():
                self._doveadm("reload")
            if self._postfix is not None and self._postfix.alive():
                # its smtpd processes keep their connection to the old auth process
                self._postfix_control("reload")
                if not wait_until(lambda: not self._smtp_token_accepted(token), 10.0):
                    raise DevServerError(
                        "SMTP still accepts a revoked token 10 s after the reloads",
                        self.log_tail(),
                    )

    def _smtp_token_accepted(self, token: str) -> bool:
        """Whether a new SMTP session accepts ``token`` (AUTH XOAUTH2, any account)."""
        claims = token.split(".")[1] if token.count(".") == 2 else ""
        address = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["email"]
        initial = f"user={address}\x01auth=Bearer {token}\x01\x01"
        try:
            with smtplib.SMTP(self.host, self.smtp_port, timeout=5) as smtp:
                smtp.ehlo("probe.localhost")
                smtp.auth("XOAUTH2", lambda challenge=None: "" if challenge else initial)
                return True
        except smtplib.SMTPAuthenticationError:
            return False
        except (OSError, smtplib.SMTPException):
            return True  # no answer yet: not known to be refused

    def token_command(self, account: DevAccount | str, lifetime: float = 3600.0) -> list[str]:
        """A ``user.token-command`` that prints a new token for ``account`` each run."""
        self._issuer()  # an oauth2 server, started
        address = self._resolve(account).address
        module = "emailmw.devserver.oauth2"
        root = str(self._root)
        return [
            sys.executable,
            "-m",
            module,
            "--root",
            root,
            "--lifetime",
            f"{lifetime:g}",
            address,
        ]

    def log_tail(self, n: int = 50) -> str:
        """The last ``n`` lines of the Dovecot log and of the Postfix log."""
        return "\n".join(
            f"==> {log} <==\n{tail(log, n=n)}" for log in (self._dovecot_log, self._postfix_log)
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
        auth: str = "password",
    ) -> dict[str, Any]:
        """The content of an emailmw config file (``email.yml``) for ``account``.

        ``tls="starttls"``: ``smtp://`` and ``imap://`` URLs (STARTTLS on the
        plain ports); ``tls="implicit"``: ``smtps://`` and ``imaps://``. With a
        ``mailbox`` other than ``INBOX`` (a folder of :meth:`new_mailbox`),
        ``from`` and the default ``to`` are that folder's address, so that what
        the context sends, and the replies to it (service responses), land in it.
        On a server with ``rmw_email_compat``, the config has ``wire-format: rmw-email``.
        ``auth="xoauth2"`` or ``"oauthbearer"`` (an ``oauth2`` server): no password
        but that ``user.auth`` and :meth:`token_command` as ``user.token-command``.
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
        user: dict[str, Any] = {"url-smtp": smtp, "url-imap": imap, "username": acct.address}
        if auth == "password":
            user["password"] = acct.password
        elif auth in ("xoauth2", "oauthbearer"):
            user.update({"auth": auth, "token-command": self.token_command(acct)})
        else:
            raise ValueError(f"auth must be 'password', 'xoauth2' or 'oauthbearer', not {auth!r}")
        if self._rmw_email_compat:
            extra["wire-format"] = "rmw-email"
        return {
            "email": {
                "user": user,
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
        write_atomic(target, yaml.safe_dump(self.config(acct, **kw), sort_keys=False), 0o600)
        return target


def _is_scripted(got: tuple[int, str] | None, reply: str) -> bool:
    """Whether Postfix's answer ``got`` (code, text) is the scripted ``reply``:
    ``450 4.2.1 <address>: Recipient address rejected: try again later`` for
    ``450 4.2.1 try again later``."""
    match = _REFUSAL_RE.match(reply)
    if got is None or match is None:
        return False
    code, text = got
    return (
        code == int(match["code"])
        and text.startswith(match["status"] + " ")
        and text.endswith(": " + match["text"])
    )


def _loopback_ipv4(host: str) -> str:
    """``host`` if it is an IPv4 loopback address (127.0.0.0/8); else ValueError."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"invalid host {host!r}: want an IPv4 address in 127.0.0.0/8") from None
    if address.version != 4 or not address.is_loopback:
        raise ValueError(
            f"host {host!r} is not an IPv4 loopback address (127.0.0.0/8): "
            "the dev server never listens outside this machine"
        )
    return str(address)


def _quote(mailbox: str) -> str:
    """An IMAP quoted string (imaplib sends mailbox names as they are)."""
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ok(response: tuple[str, Any], what: str) -> None:
    if response[0] != "OK":
        raise DevServerError(f"IMAP {what} failed: {response[0]} {response[1]!r}")
