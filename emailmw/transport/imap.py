"""The IMAP receiver: reads new emails from one mailbox, by IDLE push or by polling.

:class:`ImapEmailReceiver` keeps one IMAP connection (``imaps://`` or
``imap://`` with STARTTLS whenever the server offers it), logs in, ``EXAMINE``\\s
the mailbox (read-only: nothing is ever marked read, flagged or deleted) and
starts at its ``UIDNEXT``: emails already there are not received.

Fetching
    New emails show up as an untagged ``EXISTS``: the server reports the
    mailbox's new size at the end of any command that completes after a
    delivery (RFC 3501 requires it; IDLE pushes it). The receiver watches every
    response for it, then lists the new emails in one command that also brings
    the small ones whole::

        UID FETCH <next>:<next+255> (UID RFC822.SIZE INTERNALDATE BODY.PEEK[]<0.N>)

    with ``N = min(max-message-size, 64 KiB)``.

    * An email of at most ``N`` bytes comes whole with it: from ``EXISTS`` to
      delivery is one round trip. (Listing sizes first and fetching bodies in a
      second command costs one more command per batch: on a 10 Hz stream that
      is a third of the command budget, and a round trip of latency.)
    * An email over ``max-message-size`` is skipped on its ``RFC822.SIZE``
      (logged, counted as ``too_large``): at most ``N`` bytes of it ever cross
      the wire, never the body beyond.
    * One in between is fetched whole by a second command
      (``UID FETCH <uid>,<uid>,... (UID BODY.PEEK[])``) for the batch.

    ``PEEK``: nothing is marked ``\\Seen``. The bounded range caps memory (256
    times ``N``); when more emails remain (the last sequence number listed is
    below ``EXISTS``) the receiver lists again at once. When the range comes
    back empty (a gap in the UIDs, a stale ``EXISTS``),
    ``UID FETCH <next>:* (UID RFC822.SIZE INTERNALDATE)`` looks further (``n:*``
    returns the last email even when its UID is below ``n``: results are
    filtered). The next UID moves past every email received or skipped. After
    an untagged ``NO`` (Dovecot's answer to every command once the selected
    mailbox was deleted under the session) the mailbox is EXAMINEd again.

Receive modes (``receive-mode``)
    ``poll``
        A ``NOOP`` every ``polling-period`` (at least 1 ms), waiting in between
        on an event that :meth:`~ImapEmailReceiver.interrupt` sets.
    ``idle``
        IMAP IDLE (RFC 2177): the server pushes ``EXISTS``. IDLE stays armed
        across :meth:`~ImapEmailReceiver.receive` calls and is re-armed
        (``DONE`` + ``IDLE``) every 5 minutes, well before the 29-minute limit of
        RFC 2177. The wait is a ``poll()`` on the IMAP socket and a self-pipe
        that :meth:`~ImapEmailReceiver.interrupt` writes, after checking the
        bytes that imaplib's reader (and the TLS layer) may already hold: with
        IMAPClient's own ``idle_check`` an ``EXISTS`` that arrives together
        with the ``+ idling`` continuation waits for the next packet. Dovecot
        reports changes to an IDLE session after ~0.5 s. Falls back to ``poll``
        when the server has no IDLE.
    ``auto`` (default)
        IDLE while the mailbox is quiet (an idle subscriber sends one command
        per 5 minutes), adaptive polling while emails flow (``mode`` is then
        ``adaptive``). The receiver learns the stream's period and phase from
        recent arrival times, sleeps until just before the next email is due,
        then polls with ``NOOP`` (~0.1 ms on loopback) a millisecond or two
        apart until it shows up; see :class:`_Cadence`. A steady stream thus
        sees about a busy poller's latency for a handful of commands per email,
        a burst is read back to back (each batch's completion shows the next
        ``EXISTS``), and after ``max(1 s, 3 periods)`` without traffic it goes
        back to IDLE. Falls back to ``poll`` when the server has no IDLE.

Connection trouble
    Socket errors, timeouts, ``BYE`` (``doveadm kick``, a server restart) are
    logged as a warning, counted as ``reconnects``, and the receiver reconnects
    with exponential backoff (0.1 s doubling to 5 s, with jitter), resuming at
    the last UID it handled: nothing lost, nothing received twice. While it
    cannot reconnect, :meth:`~ImapEmailReceiver.receive` still returns at its
    timeout, nothing is raised, and the cause is logged as an error every 10
    failed attempts. If ``UIDVALIDITY`` changed, the mailbox is read again from
    its first email, skipping those stored (``INTERNALDATE``) before the last
    email already handled (a 5 s margin), and dropping, as ``duplicate``, byte
    for byte copies of the last 10 000 emails received. (Only exact copies: an
    email that merely reuses a Message-ID may be a forgery, and the
    dispatcher's admission checks, not this, must judge it.)

Stats
    Drops are counted here (``not_emailmw``, ``malformed``, ``too_large``,
    ``duplicate``), and ``reconnects``. ``received`` is not: the polling
    manager counts every email :meth:`~ImapEmailReceiver.receive` returns.

Threads
    Only the thread in :meth:`~ImapEmailReceiver.receive` (or
    :meth:`~ImapEmailReceiver.receive_raw`, :meth:`~ImapEmailReceiver.connect`,
    :meth:`~ImapEmailReceiver.probe`, serialized by a lock; the last two
    interrupt a ``receive`` to take their turn) touches the IMAP connection.
    :meth:`~ImapEmailReceiver.interrupt` only sets an event and writes a byte
    to a socket pair; :meth:`~ImapEmailReceiver.close` interrupts, then logs
    out once the receiving thread has let go (or that thread does, on its way
    out). Every wait honours an interrupt within milliseconds except a
    connection attempt in progress, which takes up to ``timeout`` against a
    server that does not answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import imaplib
import ipaddress
import itertools
import logging
import math
import random
import select
import socket
import ssl
import statistics
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import imapclient
from imapclient.exceptions import LoginError
from imapclient.response_parser import parse_fetch_response

from emailmw.errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    ImapError,
    TlsError,
    TransportError,
)
from emailmw.stats import DropReason, StatsCounters
from emailmw.transport.codec import MalformedEmailError, decode_email
from emailmw.transport.data import EmailData
from emailmw.transport.receiver import EmailReceiver

if TYPE_CHECKING:
    from emailmw.options import Options, ServerAddress

__all__ = ["ImapEmailReceiver"]

_T = TypeVar("_T")

logger = logging.getLogger(__name__)

#: Re-arm IDLE (DONE + IDLE) this often (s); RFC 2177 asks for less than 29 minutes.
IDLE_REARM = 300.0
#: Emails remembered (by digest) to drop byte-identical copies.
DEDUP_WINDOW = 10_000
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0
_ERROR_EVERY = 10  # log a failing reconnect as an ERROR every this many attempts
_STABLE_AFTER = 10.0  # a connection that lived this long resets the backoff
_CLOSE_WAIT = 1.0  # how long close() waits for the receiving thread to let go
_LOGOUT_TIMEOUT = 2.0
_MIN_POLL_PERIOD = 0.001
_VERIFY_EVERY = 10.0  # check the mailbox after an untagged NO at most this often (s)
_BATCH_MESSAGES = 256  # at most this many bodies per UID FETCH ...
_BATCH_BYTES = 16 * 1024 * 1024  # ... and about this many bytes
_RESYNC_MARGIN = timedelta(seconds=5)
_PREFETCH = 64 * 1024  # with the sizes, fetch this much of each new email (or max-message-size)
_LIST_MAX = 256  # emails listed at once with their first bytes
_FETCH_LIST = b"(UID RFC822.SIZE INTERNALDATE)"
_FETCH_LIST_HEAD = b"(UID RFC822.SIZE INTERNALDATE BODY.PEEK[]<0.%d>)"
_FETCH_BODY = b"(UID BODY.PEEK[])"

# auto mode: the adaptive poller (seconds)
_DENSE_SPACING = 0.001  # the closest two polls get
_LEAD_START = -0.003  # the window opens this long before the expected arrival, at first
_LEAD_QUANTILE = 0.3  # ... then at this quantile of arrivals
_LEAD_STEP = 0.002
_EARLY = 0.004  # an email this long after its window opened: the window opened too early
_LATE_RUNS = 4  # this many windows in a row opened after the email came: learn again
_GAP_MAX = 0.002  # the first gap after the window opens, at most
_GAP_GROWTH = 1.4
_WINDOW_POLLS = 12
_SAMPLES = 16  # arrivals in the fit ...
_MIN_SAMPLES = 2  # ... at least
_LEARN_SPACING = 0.006  # polling while no period is known yet ...
_LEARN_FRACTION = 0.05  # ... growing with the time since the last arrival
_PROBE_MAX = 0.25  # the sparsest poll while traffic is recent ...
_PROBE_MIN_CAP = 0.02  # ... or (for a fast stream) 8 periods, but not below this
_QUIET_MIN = 1.0  # back to IDLE after this long without traffic ...
_QUIET_INTERVALS = 3.0  # ... or this many periods
_QUIET_MAX = 60.0
_BUSY_GAP = 2.0  # after IDLE, poll if the email came this soon after the previous one


class _ConnectionLostError(Exception):
    """The IMAP connection broke; the receiver reconnects."""


@dataclass(slots=True)
class _Listed:
    """A new email as listed: UID, RFC822.SIZE, INTERNALDATE, and its bytes if the
    listing brought them all."""

    uid: int
    size: int
    date: datetime | None
    body: bytes | None = None


def _is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _connect_error(exc: BaseException, server: str, stage: str, timeout: float) -> TransportError:
    """Translate what connecting, logging in or selecting raised."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or str(exc)
        return TlsError(f"{server}: TLS certificate verification failed: {reason}", server=server)
    if isinstance(exc, ssl.SSLError):
        return TlsError(f"{server}: TLS handshake failed: {exc.reason or exc}", server=server)
    if isinstance(exc, TimeoutError):
        return ConnectError(f"{server}: no answer within {timeout:g} s ({stage})", server=server)
    if isinstance(exc, ConnectionRefusedError):
        return ConnectError(f"{server}: connection refused", server=server)
    if isinstance(exc, socket.gaierror):
        return ConnectError(f"{server}: cannot resolve the host: {exc.strerror}", server=server)
    if isinstance(exc, LoginError):
        reason = str(exc)
        reason = reason[len("login failed: ") :] if reason.startswith("login failed: ") else reason
        return AuthenticationError(f"{server}: login failed: {reason}", server=server)
    if isinstance(exc, OSError | EOFError):
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return ConnectError(f"{server}: {reason} ({stage})", server=server)
    if isinstance(exc, imaplib.IMAP4.abort):
        return ConnectError(f"{server}: connection lost ({stage}): {exc}", server=server)
    return ImapError(f"{server}: {stage} failed: {exc}", server=server)


class _Session:
    """One logged-in IMAP connection with the mailbox EXAMINEd.

    Wraps an :class:`imapclient.IMAPClient` and drives imaplib underneath where
    IMAPClient falls short (``n:*`` fetches, IDLE over our own wait). Every
    connection problem surfaces as :class:`_ConnectionLostError`. Not thread-safe.
    """

    def __init__(self, client: Any, server: str, count: Callable[[int], None]) -> None:
        self.client = client
        self.imap: Any = client._imap
        self.server = server
        self.capabilities: frozenset[str] = frozenset()
        self.greeting = ""
        self.uidvalidity = 0
        self.uidnext = 0
        self.exists = 0
        self.new_mail = False  #: an EXISTS came: list the new emails
        self.detected_at: float | None = None  #: when new_mail was set ...
        self.detected_within = math.inf  # ... and how precisely (time since the last sync)
        self.trouble: str | None = None  #: an untagged NO or BAD: is the mailbox still there?
        self.verified_at = -math.inf
        self.idling = False
        self.idle_since = 0.0
        self.opened_at = time.monotonic()
        self.last_sync = self.opened_at  #: when the last command completed
        self._idle_tag: bytes | None = None
        self._count = count
        self._tags_counted = 0

    @property
    def has_idle(self) -> bool:
        """True if the server offers IDLE."""
        return "IDLE" in self.capabilities

    @property
    def tls_version(self) -> str | None:
        """The TLS version in use, or None over plain text."""
        sock = self.imap.sock
        return sock.version() if isinstance(sock, ssl.SSLSocket) else None

    # -- plumbing -----------------------------------------------------------------

    def count_commands(self) -> None:
        """Report the tagged commands sent since the last call."""
        tags = int(self.imap.tagnum)
        if tags != self._tags_counted:
            self._count(tags - self._tags_counted)
            self._tags_counted = tags

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except _ConnectionLostError:
            raise
        except (imaplib.IMAP4.error, OSError, EOFError, ValueError) as exc:
            raise _ConnectionLostError(f"{what}: {exc or type(exc).__name__}") from exc
        finally:
            self.count_commands()

    def _scan(self, within: float | None) -> None:
        """Look at (and drop) the untagged responses gathered so far.

        ``within``: how precisely an EXISTS found now is timed (None: measure the
        time since the previous sync).
        """
        untagged = self.imap.untagged_responses
        if "BYE" in untagged:
            raise _ConnectionLostError(f"server said BYE: {_text(untagged['BYE'][-1])}")
        for key in ("NO", "BAD"):
            if key in untagged:
                self.trouble = _text(untagged[key][-1])
        now = time.monotonic()
        if "EXISTS" in untagged:
            with contextlib.suppress(ValueError, TypeError):
                self.exists = int(untagged["EXISTS"][-1])
        elif "EXPUNGE" in untagged:
            self.exists -= len(untagged["EXPUNGE"])
        if "EXISTS" in untagged and not self.new_mail:
            self.new_mail = True
            self.detected_at = now
            self.detected_within = now - self.last_sync if within is None else within
        untagged.clear()
        if within is None:
            self.last_sync = now

    def take_detection(self) -> tuple[float | None, float]:
        """Clear ``new_mail``; return when and how precisely it was detected."""
        found = self.detected_at, self.detected_within
        self.new_mail, self.detected_at, self.detected_within = False, None, math.inf
        return found

    # -- commands -------------------------------------------------------------------

    def noop(self) -> None:
        """``NOOP``: lets the server report new emails (EXISTS)."""
        with self._guard("NOOP"):
            tag = self.imap._command("NOOP")
            self.imap._command_complete("NOOP", tag)
            self._scan(None)

    def fetch(self, uids: bytes, items: bytes) -> tuple[bool, dict[int, dict[bytes, Any]]]:
        """``UID FETCH uids items``: ``(ok, {uid: {item: value}})``; ok is False on NO."""
        with self._guard("UID FETCH"):
            tag = self.imap._command("UID", "FETCH", uids, items)
            typ, data = self.imap._command_complete("FETCH", tag)
            result: dict[int, dict[bytes, Any]] = {}
            if typ == "OK":
                _, lines = self.imap._untagged_response(typ, data, "FETCH")
                # keyed by sequence number: unsolicited FETCHes (flag changes) may lack a UID
                for item in parse_fetch_response(lines, False, False).values():
                    uid = item.get(b"UID")
                    if isinstance(uid, int):
                        result.setdefault(uid, {}).update(item)
            else:
                logger.debug("%s: UID FETCH %s: %s %s", self.server, _text(uids), typ, data)
            self._scan(None)
            return typ == "OK", result

    def verify_mailbox(self, mailbox: str) -> None:
        """After an untagged NO or BAD (Dovecot's answer to every command once the
        selected mailbox was deleted under us), EXAMINE it again: raise
        :class:`_ConnectionLostError` if it is gone or was replaced (a new
        UIDVALIDITY). At most once per 10 s."""
        reason, self.trouble = self.trouble, None
        now = time.monotonic()
        if now - self.verified_at < _VERIFY_EVERY:
            logger.debug("%s: %s", self.server, reason)
            return
        self.verified_at = now
        logger.debug("%s: %s; checking the mailbox", self.server, reason)
        with self._guard("EXAMINE"):
            info = self.client.select_folder(mailbox, readonly=True)
            self._scan(None)
        if int(info.get(b"UIDVALIDITY", 0)) != self.uidvalidity:
            raise _ConnectionLostError(f"the mailbox was replaced ({reason})")
        self.exists = int(info.get(b"EXISTS", self.exists))
        self.new_mail = True  # look again from the next UID

    def idle_start(self) -> None:
        """Send IDLE and wait for the continuation (an EXISTS may already be there)."""
        with self._guard("IDLE"):
            tag = self.imap._command("IDLE")
            while self.imap._get_response() is not None:
                done = self.imap.tagged_commands.get(tag)
                if done is not None:  # refused: poll instead
                    del self.imap.tagged_commands[tag]
                    logger.warning("%s refused IDLE (%s); polling instead", self.server, done)
                    self.capabilities = self.capabilities - {"IDLE"}
                    self._scan(None)
                    return
            self._idle_tag = tag
            self.idling = True
            self.idle_since = time.monotonic()
            self._scan(math.inf)

    def idle_wait(self, until: float, wake_fd: int) -> None:
        """Wait in IDLE until an EXISTS, ``wake_fd`` readable, or ``until`` (monotonic)."""
        with self._guard("IDLE"):
            sock = self.imap.sock
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            poller.register(wake_fd, select.POLLIN)
            while self.idling and not self.new_mail and self.trouble is None:
                if self._input_buffered():
                    self._read_idle_response()
                    continue
                remaining = until - time.monotonic()
                ready = {fd for fd, _ in poller.poll(max(0, math.ceil(remaining * 1000)))}
                if wake_fd in ready:
                    return
                if ready:
                    self._read_idle_response()
                elif remaining <= 0:
                    return

    def idle_done(self) -> None:
        """End IDLE (``DONE``) and read its completion."""
        if not self.idling:
            return
        self.idling = False
        with self._guard("DONE"):
            self.imap.send(b"DONE\r\n")
            tag = self._idle_tag
            while self.imap.tagged_commands.get(tag) is None:
                self.imap._get_response()
            del self.imap.tagged_commands[tag]
            self._scan(math.inf)
            self.last_sync = time.monotonic()

    def _read_idle_response(self) -> None:
        self.imap._get_response()
        tag = self._idle_tag
        if self.imap.tagged_commands.get(tag) is not None:  # the server ended IDLE
            del self.imap.tagged_commands[tag]
            self.idling = False
        self._scan(math.inf)

    def _input_buffered(self) -> bool:
        """True if imaplib's reader or the TLS layer already holds unread bytes.

        ``poll()`` on the socket cannot see those (the IMAPClient IDLE race).
        """
        sock = self.imap.sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        reader = getattr(self.imap, "_file", None) or self.imap.file
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            return bool(reader.peek(1))  # buffered bytes, or at most one non-blocking read
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return False
        finally:
            sock.settimeout(timeout)

    # -- the end --------------------------------------------------------------------

    def close(self, polite: bool) -> None:
        """Log out (``polite``) or just drop the connection. Never raises."""
        try:
            if polite:
                with contextlib.suppress(OSError):
                    self.imap.sock.settimeout(_LOGOUT_TIMEOUT)
                self.idle_done()
                self.client.logout()
        except Exception as exc:
            logger.debug("%s: logout failed: %s", self.server, exc)
        finally:
            with contextlib.suppress(Exception):
                self.count_commands()
            with contextlib.suppress(Exception):
                self.imap.shutdown()


def _open_session(
    options: Options, context: ssl.SSLContext, count: Callable[[int], None]
) -> _Session:
    """Connect, secure, log in and EXAMINE; raise a :class:`TransportError` subclass."""
    assert options.user is not None
    address: ServerAddress = options.user.imap
    server = str(address)
    username = options.user.username
    password = options.resolve_password()
    if password is None:
        raise AuthenticationError(
            f"{server}: no password configured (user.password, password-file or $EMAILMW_PASSWORD)",
            server=server,
        )
    stage = "connecting"
    client: Any = None
    try:
        client = imapclient.IMAPClient(
            address.host,
            address.port,
            ssl=address.tls == "implicit",
            ssl_context=context,
            timeout=options.timeout,
        )
        client.normalise_times = False
        if address.tls == "starttls":
            stage = "STARTTLS"
            if "STARTTLS" in {c.upper() for c in client._imap.capabilities}:
                client.starttls(context)
            elif options.tls.allow_insecure or _is_loopback(address.host):
                logger.warning("%s offers no STARTTLS: logging in over plain text", server)
            else:
                raise TlsError(
                    f"{server}: the server offers no STARTTLS; refusing to send the password "
                    "in plain text (use imaps://, or set tls.allow-insecure)",
                    server=server,
                )
        stage = "logging in"
        preauth = {c.upper() for c in client._imap.capabilities}
        if username.isascii() and password.isascii() and "LOGINDISABLED" not in preauth:
            client.login(username, password)
        elif "AUTH=PLAIN" in preauth:
            client.plain_login(username, password)
        else:
            raise AuthenticationError(
                f"{server}: the server accepts neither LOGIN nor AUTHENTICATE PLAIN for "
                "these credentials",
                server=server,
            )
        session = _Session(client, server, count)
        session.greeting = _text(client.welcome or b"")
        session.capabilities = frozenset(_text(c).upper() for c in client.capabilities())
        stage = "selecting the mailbox"
        try:
            info = client.select_folder(options.mailbox, readonly=True)
        except imaplib.IMAP4.abort:
            raise
        except imaplib.IMAP4.error as exc:
            raise ImapError(
                f"{server}: cannot open mailbox {options.mailbox!r}: {exc}", server=server
            ) from exc
        if b"UIDNEXT" not in info:
            info[b"UIDNEXT"] = client.folder_status(options.mailbox, [b"UIDNEXT"])[b"UIDNEXT"]
        session.uidvalidity = int(info.get(b"UIDVALIDITY", 0))
        session.uidnext = int(info[b"UIDNEXT"])
        session.exists = int(info.get(b"EXISTS", 0))
        client._imap.untagged_responses.clear()
        session.count_commands()
        session.last_sync = time.monotonic()
        return session
    except BaseException as exc:
        if client is not None:
            with contextlib.suppress(Exception):
                client.shutdown()
        if isinstance(exc, TransportError) or not isinstance(exc, Exception):
            raise
        if isinstance(exc, UnicodeError):  # never chain: it holds the credentials
            raise ImapError(f"{server}: cannot encode the credentials", server=server) from None
        raise _connect_error(exc, server, stage, options.timeout) from exc


class _Cadence:
    """When to poll next in ``auto`` mode, learnt from recent arrival times.

    Each detection gives an arrival estimate: halfway between the completions
    of the previous command and of the one that saw the ``EXISTS``. Emails are
    counted, and a robust line fit over the last 16 estimates (Theil-Sen: median
    of pairwise slopes, median intercept) gives the period and the phase,
    unbothered by the odd email that the mail system delays: the next email is
    expected at ``phase + count * period``.

    A window of polls opens at ``expected + lead``, where ``lead`` tracks the
    30th percentile of arrivals (stochastic quantile tracking): an email already
    there at the window's first poll moves it 1.4 ms earlier (and is no sample:
    only a bound), one found later moves it 0.6 ms later; steps double, up to
    four times, while the misses go the same way. Polls then follow at growing
    gaps (x1.4), the first a third of the typical wait after the window opened
    (1 to 2 ms): dense where emails arrive, sparse after. A window that passes
    empty is followed by probes at doubling intervals (up to 8 periods, 20 ms
    to 0.25 s), and one
    poll as each later window opens. An email seen through IDLE starts polling
    only if it came with others or within 2 s of the previous one (sporadic
    traffic stays on IDLE). While no
    period is known (the first two emails after IDLE), polls go every 6 ms,
    sparser as time goes by (5% of the time since the last email); the first
    window opens early enough to cover that uncertainty. Four windows in a row
    that open after the email, or three emails off the line by a quarter
    period, and the pace is learnt again.
    In a simulation of a 10 Hz stream with +-1 ms of delivery jitter and
    0.3 ms round trips this takes 2.2 polls per email (the detecting one
    included), and the email is in hand a median 1.6 ms after it arrived.
    """

    def __init__(self) -> None:
        self._samples: deque[tuple[int, float]] = deque(maxlen=_SAMPLES)  # (number, time)
        self._waits: deque[float] = deque(maxlen=_SAMPLES)  # arrival - window opening
        self._withins: deque[float] = deque(maxlen=_SAMPLES)  # how precise the samples are
        self._last: float | None = None  # the last detection (any kind)
        self._lead = _LEAD_START
        self._late_run = 0  # windows in a row that opened after the email came
        self._early_run = 0  # ... or well before it
        self._misfits = 0
        self._number = 0  # emails counted since the samples began
        self._fit: tuple[float, float] | None = None  # period, phase
        self._points: list[float] = []  # poll times of the current window
        self._previous: float | None = None  # the last detection, even before a reset
        self._learn_quiet = _QUIET_MIN

    def reset(self) -> None:
        """Forget everything (back in IDLE)."""
        self._samples.clear()
        self._waits.clear()
        self._withins.clear()
        self._last = None
        self._lead = _LEAD_START
        self._late_run = 0
        self._early_run = 0
        self._misfits = 0
        self._number = 0
        self._fit = None
        self._points = []
        self._learn_quiet = _QUIET_MIN

    @property
    def period(self) -> float | None:
        """The stream's period, once known."""
        return self._fit[0] if self._fit is not None else None

    def arrival(self, at: float, within: float, count: int) -> None:
        """``count`` emails detected by a command that completed at ``at`` (monotonic),
        ``within`` seconds after the previous one (``inf``: through IDLE)."""
        gap = at - self._previous if self._previous is not None else math.inf
        self._previous = at
        self._last = at
        if math.isinf(within):  # through IDLE: no timing; poll only if traffic looks busy
            self.reset()
            if count > 1 or gap < _BUSY_GAP:
                self._last = at
                self._learn_quiet = min(max(_QUIET_MIN, 1.5 * gap), _QUIET_MAX)
            return
        estimate = at - within / 2  # it came between the previous sync and this one
        self._number += count
        fit = self._fit
        if fit is not None:
            period, phase = fit
            if within > max(4 * _DENSE_SPACING, 0.3 * period):
                # there before the window opened: open earlier, faster each time in a row
                self._late_run += 1
                self._early_run = 0
                if self._late_run >= _LATE_RUNS:  # lost the beat: learn it again
                    self.reset()
                    self._last = at
                    return
                step = 2.0 ** min(self._late_run - 1, 2)
                self._lead -= _LEAD_STEP * (1 - _LEAD_QUANTILE) * step
                self._lead = max(self._lead, -period / 2)
                self._points = self._window()
                return  # only a bound on the arrival time: not a sample
            self._late_run = 0
            wait = estimate - self._points[0]
            step = _LEAD_STEP * _LEAD_QUANTILE
            if wait > _EARLY:  # the window opened well before the email: later, faster each time
                self._early_run += 1
                step = min(step * 2.0 ** min(self._early_run - 1, 2), wait / 2)
            else:
                self._early_run = 0
            self._lead = min(self._lead + step, period / 4)
            if wait >= 0:
                self._waits.append(wait)
            misfit = abs(estimate - (phase + self._number * period)) > period / 4
            self._misfits = self._misfits + 1 if misfit else 0
            if self._misfits >= 3:  # the stream changed pace: learn it again
                self.reset()
                self._last = at
        self._samples.append((self._number, estimate))
        self._withins.append(within)
        self._fit = self._refit()
        if fit is None and self._fit is not None:  # first fit: open wide enough for its error
            self._lead = min(_LEAD_START, -max(self._withins))
        self._points = self._window() if self._fit is not None else []

    def _refit(self) -> tuple[float, float] | None:
        samples = self._samples
        if len(samples) < _MIN_SAMPLES:
            return None
        pairs = itertools.combinations(samples, 2)
        period = statistics.median((tb - ta) / (nb - na) for (na, ta), (nb, tb) in pairs)
        if period <= 0:
            return None
        return period, statistics.median(t - n * period for n, t in samples)

    def _window(self) -> list[float]:
        """Poll times for the next email."""
        assert self._fit is not None
        period, phase = self._fit
        opened = phase + (self._number + 1) * period + self._lead
        wait = statistics.median(self._waits) if self._waits else 0.0
        gap = min(max(_DENSE_SPACING, wait / 3), _GAP_MAX)
        points = [opened]
        while points[-1] < opened + period / 2 and len(points) < _WINDOW_POLLS:
            points.append(points[-1] + gap)
            gap *= _GAP_GROWTH
        return points

    def next_poll(self, now: float, last_sync: float) -> float | None:
        """When to poll next (monotonic), or None to go back to IDLE."""
        last = self._last
        if last is None:
            return None
        period = self.period
        quiet = self._learn_quiet if period is None else _QUIET_INTERVALS * period
        if now - last > min(max(quiet, _QUIET_MIN), _QUIET_MAX):
            return None
        if period is None:  # learning: dense at first, sparser as time goes by
            spacing = min(max(_LEARN_SPACING, _LEARN_FRACTION * (now - last)), _PROBE_MAX)
            return last_sync + spacing
        points = self._points
        missed = max(0, math.floor((last_sync - points[0]) / period))
        if missed == 0:
            for point in points:
                if point > last_sync:
                    return max(point, last_sync + _DENSE_SPACING)
        # the window passed empty (a late email, or the stream stopped): probe at
        # growing intervals, and once at the opening of each later window
        cap = min(max(_PROBE_MIN_CAP, 8 * period), _PROBE_MAX)  # a fast stream: probe faster
        spacing = min(max(_DENSE_SPACING, last_sync - points[-1]), cap)
        return min(points[0] + (missed + 1) * period, last_sync + spacing)


class _WakePipe:
    """A socket pair: :meth:`wake` from any thread makes the read end readable."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._lock = threading.Lock()
        self._closed = False

    def fileno(self) -> int:
        """The read end, for poll()."""
        return self._reader.fileno()

    def wake(self) -> None:
        """Make the read end readable (thread-safe; never blocks)."""
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):
                    self._writer.send(b"\0")

    def drain(self) -> None:
        """Consume pending wake-ups."""
        with contextlib.suppress(OSError):
            while self._reader.recv(4096):
                pass

    def close(self) -> None:
        """Close both ends. Idempotent."""
        with self._lock:
            self._closed = True
            self._reader.close()
            self._writer.close()


class ImapEmailReceiver(EmailReceiver):
    """Receives the emails that arrive in one IMAP mailbox (see the module docstring).

    ``options.user.imap`` says where and how (``imaps://`` implicit TLS, or
    ``imap://`` with STARTTLS whenever offered; a plain-text login is refused
    unless the host is loopback or ``tls.allow-insecure`` is set);
    ``options.mailbox``, ``receive_mode``, ``polling_period``, ``timeout`` and
    ``max_message_size`` shape the rest. Drops and reconnects are counted in
    ``stats``.
    """

    def __init__(self, options: Options, stats: StatsCounters | None = None) -> None:
        if options.user is None:
            raise ConfigError("the IMAP receiver needs email.user", key="email.user")
        self._options = options
        self._stats = stats if stats is not None else StatsCounters()
        self._server = str(options.user.imap)
        self._io_lock = threading.Lock()  # held by the thread using the connection
        self._turnstile = threading.Lock()
        self._state_lock = threading.Lock()
        self._wakeup = threading.Event()
        self._pipe = _WakePipe()
        weakref.finalize(self, self._pipe.close)  # if never closed
        self._closed = False
        self._finalized = False
        self._context: ssl.SSLContext | None = None
        self._session: _Session | None = None
        self._mode = "disconnected"
        self._commands_sent = 0
        # where we are in the mailbox
        self._uidvalidity: int | None = None
        self._next_uid = 1
        self._pending: deque[_Listed] = deque()
        self._last_date: datetime | None = None  # INTERNALDATE of the last email handled
        self._first_connect_date: datetime | None = None
        self._resync_below = 0  # while re-reading after a UIDVALIDITY change ...
        self._resync_cutoff: datetime | None = None  # ... skip emails stored before this
        self._seen: OrderedDict[bytes, None] = OrderedDict()  # digests of emails received
        self._cadence = _Cadence()
        # reconnecting
        self._failures = 0  # recent failures: the backoff grows with them
        self._attempts = 0  # failed attempts since the last connection
        self._retry_at = 0.0
        self._idle_fallback_logged = False

    # -- public -----------------------------------------------------------------------

    @property
    def commands_sent(self) -> int:
        """Tagged IMAP commands sent so far, over every connection (thread-safe read)."""
        return self._commands_sent

    @property
    def mode(self) -> str:
        """What the receiver does now: ``idle``, ``poll``, ``adaptive`` (auto mode
        polling a stream), ``disconnected`` or ``closed``."""
        return self._mode

    def connect(self) -> None:
        """Connect, log in, EXAMINE the mailbox and start at its UIDNEXT.

        Raises :class:`ConnectError`, :class:`TlsError`, :class:`AuthenticationError`
        or :class:`ImapError` (naming the server and the cause). A no-op when
        already connected.
        """
        with self._using(cut_in=True):
            if self._closed:
                raise ImapError(f"{self._server}: the receiver is closed", server=self._server)
            if self._session is None:
                self._session = self._open()

    def receive(self, timeout: float | None) -> list[EmailData]:
        """Wait up to ``timeout`` s (None or negative: no limit) for new emails; oldest first.

        Returns ``[]`` on timeout, after :meth:`interrupt`, or once closed. Never
        raises for what the emails hold or for connection trouble (reconnects).
        """
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        with self._using():
            if self._closed:
                return []
            return self._receive(deadline, self._decode_all)

    def receive_raw(self, timeout: float | None) -> list[tuple[int, bytes]]:
        """Like :meth:`receive`, but every new email (emailmw's or not) as ``(UID, bytes)``,
        undecoded (for ``emailmw receive``). Emails over ``max-message-size`` are still
        skipped."""
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        with self._using():
            if self._closed:
                return []
            return self._receive(deadline, self._raw_all)

    def interrupt(self) -> None:
        """Make a blocked (or the next) :meth:`receive` return promptly. Thread-safe."""
        self._wakeup.set()
        self._pipe.wake()

    def close(self) -> None:
        """Log out and release the connection. Idempotent; callable from any thread.

        Interrupts a :meth:`receive` in progress; if that thread does not let go
        within a second, it logs out itself when its call returns.
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        self.interrupt()
        if self._io_lock.acquire(timeout=_CLOSE_WAIT):
            try:
                self._finalize()
            finally:
                self._io_lock.release()

    def probe(self) -> dict[str, Any]:
        """What the server and the mailbox look like (connects if needed), for
        ``emailmw check-config``: server, greeting, capabilities, IDLE support,
        TLS mode and version, mailbox, UIDVALIDITY, UIDNEXT, EXISTS, modes."""
        with self._using(cut_in=True):
            if self._closed:
                raise ImapError(f"{self._server}: the receiver is closed", server=self._server)
            if self._session is None:
                self._session = self._open()
            session = self._session
            assert self._options.user is not None
            return {
                "server": self._server,
                "greeting": session.greeting,
                "capabilities": sorted(session.capabilities),
                "idle": session.has_idle,
                "tls": "implicit"
                if self._options.user.imap.tls == "implicit"
                else ("starttls" if session.tls_version else "none"),
                "tls_version": session.tls_version,
                "mailbox": self._options.mailbox,
                "uidvalidity": session.uidvalidity,
                "uidnext": session.uidnext,
                "exists": session.exists,
                "next_uid": self._next_uid,
                "receive_mode": self._options.receive_mode,
                "mode": self._mode,
            }

    @contextlib.contextmanager
    def _using(self, cut_in: bool = False) -> Iterator[None]:
        """Hold the connection (``cut_in``: interrupt a :meth:`receive` holding it);
        if :meth:`close` came meanwhile, log out on the way out."""
        with self._turnstile:  # a receive() loop cannot take it back before a cut-in
            if not self._io_lock.acquire(blocking=False):
                if cut_in:
                    self.interrupt()
                self._io_lock.acquire()
        try:
            yield
        finally:
            try:
                if self._closed:
                    self._finalize()
            finally:
                self._io_lock.release()

    # -- connecting -----------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        if self._context is None:
            tls = self._options.tls
            try:
                context = ssl.create_default_context(
                    cafile=str(tls.ca_file) if tls.ca_file is not None else None
                )
            except (OSError, ssl.SSLError) as exc:
                raise TlsError(
                    f"{self._server}: cannot load tls.ca-file {tls.ca_file}: {exc}",
                    server=self._server,
                ) from exc
            if not tls.verify:
                logger.warning(
                    "TLS certificate verification is off for %s (tls.verify: false)", self._server
                )
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._context = context
        return self._context

    def _count(self, commands: int) -> None:
        self._commands_sent += commands

    def _open(self) -> _Session:
        """Open a session and place the receiver in the mailbox (first or later connection)."""
        session = _open_session(self._options, self._ssl_context(), self._count)
        if self._uidvalidity is None:
            self._uidvalidity = session.uidvalidity
            self._next_uid = session.uidnext
            self._first_connect_date = datetime.now(UTC)
        elif session.uidvalidity != self._uidvalidity:
            logger.warning(
                "UIDVALIDITY of %r on %s changed from %d to %d: reading the mailbox again, "
                "skipping emails stored before the last one received and duplicates",
                self._options.mailbox,
                self._server,
                self._uidvalidity,
                session.uidvalidity,
            )
            self._uidvalidity = session.uidvalidity
            self._resync_below = session.uidnext
            base = self._last_date or self._first_connect_date
            self._resync_cutoff = base - _RESYNC_MARGIN if base is not None else None
            self._next_uid = 1
            session.new_mail = session.exists > 0
        elif session.uidnext > self._next_uid:
            session.new_mail = True  # emails came while we were away
        self._pending.clear()
        self._cadence.reset()
        logger.info(
            "IMAP %s: mailbox %r, UIDVALIDITY %d, next UID %d, IDLE %s, %s",
            self._server,
            self._options.mailbox,
            session.uidvalidity,
            self._next_uid,
            "yes" if session.has_idle else "no",
            session.tls_version or "plain text",
        )
        return session

    def _lose(self, session: _Session, exc: BaseException) -> None:
        logger.warning("IMAP connection to %s lost (%s); reconnecting", self._server, exc)
        self._stats.add("reconnects")
        session.close(polite=False)
        self._session = None
        self._mode = "disconnected"
        self._pending.clear()
        now = time.monotonic()
        self._failures = 0 if now - session.opened_at >= _STABLE_AFTER else self._failures + 1
        self._retry_at = now + self._backoff(self._failures)

    @staticmethod
    def _backoff(failures: int) -> float:
        delay = min(_BACKOFF_FIRST * 2.0 ** min(failures, 16), _BACKOFF_MAX)
        return delay * random.uniform(0.8, 1.2)

    def _reconnect(self, deadline: float | None) -> None:
        """Wait for the next attempt (interruptibly, up to ``deadline``), then try once."""
        now = time.monotonic()
        if now < self._retry_at:
            until = self._retry_at if deadline is None else min(self._retry_at, deadline)
            if until > now:
                self._wakeup.wait(until - now)
            if time.monotonic() < self._retry_at:
                return
        first = self._uidvalidity is None
        try:
            self._session = self._open()
        except TransportError as exc:
            self._failures += 1
            self._attempts += 1
            delay = self._backoff(self._failures)
            self._retry_at = time.monotonic() + delay
            if self._attempts % _ERROR_EVERY == 0:
                logger.error(
                    "still cannot connect to %s after %d attempts: %s",
                    self._server,
                    self._attempts,
                    exc,
                )
            elif self._attempts == 1:
                logger.warning("cannot connect to %s: %s; retrying with backoff", self._server, exc)
            else:
                logger.debug(
                    "connect attempt %d to %s failed: %s", self._attempts, self._server, exc
                )
        else:
            self._attempts = 0
            if not first:
                logger.info("reconnected to %s; resuming at UID %d", self._server, self._next_uid)

    # -- receiving ------------------------------------------------------------------------

    def _take_interrupt(self) -> bool:
        if not self._wakeup.is_set():
            return False
        self._wakeup.clear()
        self._pipe.drain()
        return True

    def _receive(
        self, deadline: float | None, convert: Callable[[list[tuple[int, bytes | None]]], list[_T]]
    ) -> list[_T]:
        while True:
            if self._take_interrupt():
                return []
            session = self._session
            if session is None:
                self._mode = "disconnected"
                self._reconnect(deadline)
            else:
                try:
                    fetched = self._step(session, deadline)
                except _ConnectionLostError as exc:
                    self._lose(session, exc)
                    continue
                results = convert(fetched)
                if results:
                    return results
            if deadline is not None and time.monotonic() >= deadline:
                return []

    def _choose_mode(self, session: _Session, now: float) -> str:
        wanted = self._options.receive_mode
        if wanted == "poll":
            return "poll"
        if not session.has_idle:
            if not self._idle_fallback_logged:
                self._idle_fallback_logged = True
                level = logging.WARNING if wanted == "idle" else logging.INFO
                logger.log(level, "%s has no IDLE: polling instead", self._server)
            return "poll"
        if wanted == "idle":
            return "idle"
        return "idle" if self._cadence.next_poll(now, session.last_sync) is None else "adaptive"

    def _step(self, session: _Session, deadline: float | None) -> list[tuple[int, bytes | None]]:
        """One move: fetch what is known to be new, or wait/poll/IDLE for news."""
        if session.trouble is not None:
            session.idle_done()
            session.verify_mailbox(self._options.mailbox)
        if self._pending or session.new_mail:
            return self._fetch_new(session)
        now = time.monotonic()
        mode = self._choose_mode(session, now)
        self._mode = mode
        if mode == "idle":
            if not session.idling:
                session.idle_start()
                self._cadence.reset()
                return []
            rearm_at = session.idle_since + IDLE_REARM
            until = rearm_at if deadline is None else min(rearm_at, deadline)
            session.idle_wait(until, self._pipe.fileno())
            if not self._wakeup.is_set():
                self._pipe.drain()  # a stale wake-up byte would make the next wait spin
            if session.idling and not session.new_mail and time.monotonic() >= rearm_at:
                session.idle_done()  # the next step arms it again
            return []
        if session.idling:
            session.idle_done()
            return []
        if mode == "poll":
            period = max(self._options.polling_period / 1e9, _MIN_POLL_PERIOD)
            due: float | None = session.last_sync + period
        else:
            due = self._cadence.next_poll(now, session.last_sync)
        if due is not None and due > now:
            until = due if deadline is None else min(due, deadline)
            if until > now:
                self._wakeup.wait(until - now)
            return []
        session.noop()
        return []

    def _fetch_new(self, session: _Session) -> list[tuple[int, bytes | None]]:
        """List new emails (unless some are pending), fetch one batch of bodies, decode."""
        session.idle_done()
        if not self._pending:
            detected_at, within = session.take_detection()
            listed = self._list(session)
            if not listed:
                return []
            at = detected_at if detected_at is not None else session.last_sync
            self._cadence.arrival(at, within, len(listed))
            self._pending.extend(listed)
        batch: list[_Listed] = []
        wanted: list[int] = []
        size = 0
        limit = self._options.max_message_size
        while self._pending and len(batch) < _BATCH_MESSAGES and size < _BATCH_BYTES:
            item = self._pending.popleft()
            batch.append(item)
            if item.body is None and item.size <= limit and not self._before_cutoff(item):
                wanted.append(item.uid)
                size += item.size
        bodies = self._fetch_bodies(session, wanted)
        for item in batch:
            if item.body is not None:
                bodies[item.uid] = item.body
        return self._settle(batch, bodies)

    def _list(self, session: _Session) -> list[_Listed]:
        """The new emails (from the next UID on): sizes, dates, and the whole bytes of
        those that fit in the prefix fetched along (see the module docstring)."""
        start = self._next_uid
        limit = self._options.max_message_size
        head = min(limit, _PREFETCH)
        _, found = session.fetch(b"%d:%d" % (start, start + _LIST_MAX - 1), _FETCH_LIST_HEAD % head)
        ranged = bool(found)
        if not ranged:  # a stale EXISTS, or a gap in the UIDs: look further, sizes only
            _, found = session.fetch(b"%d:*" % start, _FETCH_LIST)
        listed: list[_Listed] = []
        last_seq = 0
        for uid in sorted(found):
            if uid < start:  # "n:*" gives the last email even when its UID is below n
                continue
            item = found[uid]
            size = int(item.get(b"RFC822.SIZE") or 0)
            body = item.get(b"BODY[]<0>")
            whole = (
                isinstance(body, bytes)
                and size <= limit
                and (len(body) < head or len(body) >= size)
            )
            listed.append(_Listed(uid, size, item.get(b"INTERNALDATE"), body if whole else None))
            last_seq = max(last_seq, int(item.get(b"SEQ") or 0))
        if ranged and (len(found) >= _LIST_MAX or last_seq < session.exists):
            session.new_mail = True  # more beyond the range listed
        return listed

    def _fetch_bodies(self, session: _Session, uids: list[int]) -> dict[int, bytes | None]:
        """Bodies by UID (None: the server could not give it); missing: expunged meanwhile."""
        if not uids:
            return {}
        ok, found = session.fetch(b",".join(b"%d" % uid for uid in uids), _FETCH_BODY)
        bodies: dict[int, bytes | None] = {}
        if ok:
            for uid, item in found.items():
                body = item.get(b"BODY[]")
                if isinstance(body, bytes):
                    bodies[uid] = body
            return bodies
        for uid in uids:  # one failed: find which, one by one
            ok, found = session.fetch(b"%d" % uid, _FETCH_BODY)
            body = found.get(uid, {}).get(b"BODY[]")
            if not ok:
                bodies[uid] = None
            elif isinstance(body, bytes):
                bodies[uid] = body
        return bodies

    def _before_cutoff(self, item: _Listed) -> bool:
        cutoff = self._resync_cutoff
        if cutoff is None or item.uid >= self._resync_below:
            return False
        return item.date is not None and item.date < cutoff

    def _settle(
        self, batch: list[_Listed], bodies: dict[int, bytes | None]
    ) -> list[tuple[int, bytes | None]]:
        """Move past ``batch``: skip what is too large (or before a resync cutoff) and
        return ``(uid, bytes)`` for the rest, in order (None: the server failed it)."""
        fetched: list[tuple[int, bytes | None]] = []
        limit = self._options.max_message_size
        for item in batch:
            uid, length, date = item.uid, item.size, item.date
            self._next_uid = max(self._next_uid, uid + 1)
            if date is not None and (self._last_date is None or date > self._last_date):
                self._last_date = date
            if length > limit:
                logger.warning(
                    "skipping email UID %d in %r: %d bytes is over max-message-size (%d)",
                    uid,
                    self._options.mailbox,
                    length,
                    limit,
                )
                self._stats.drop(DropReason.TOO_LARGE)
            elif self._before_cutoff(item):
                logger.debug("skipping email UID %d: stored before the resync cutoff", uid)
            elif uid not in bodies:
                logger.debug("email UID %d vanished before its body was fetched", uid)
            else:
                fetched.append((uid, bodies[uid]))
        if self._resync_cutoff is not None and self._next_uid >= self._resync_below:
            self._resync_cutoff = None
        return fetched

    def _decode_all(self, fetched: list[tuple[int, bytes | None]]) -> list[EmailData]:
        return [email for uid, raw in fetched if (email := self._decode(uid, raw)) is not None]

    @staticmethod
    def _raw_all(fetched: list[tuple[int, bytes | None]]) -> list[tuple[int, bytes]]:
        return [(uid, raw) for uid, raw in fetched if raw is not None]

    def _decode(self, uid: int, raw: bytes | None) -> EmailData | None:
        if raw is None:
            logger.warning("skipping email UID %d: the server could not return it", uid)
            self._stats.drop(DropReason.MALFORMED)
            return None
        try:
            email = decode_email(raw)
        except MalformedEmailError as exc:
            logger.warning("skipping malformed emailmw email UID %d: %s", uid, exc)
            self._stats.drop(DropReason.MALFORMED)
            return None
        except Exception as exc:  # the receiving thread never dies on content
            logger.warning("skipping email UID %d: cannot decode it (%r)", uid, exc)
            self._stats.drop(DropReason.MALFORMED)
            return None
        if email is None:
            logger.debug("skipping email UID %d: not an emailmw message", uid)
            self._stats.drop(DropReason.NOT_EMAILMW)
            return None
        # only byte-identical copies: a forgery that reuses a genuine Message-ID must not
        # shadow the genuine email (the dispatcher's admission checks judge those)
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        if digest in self._seen:
            logger.debug("dropping a copy of %s (UID %d)", email.message_id, uid)
            self._stats.drop(DropReason.DUPLICATE)
            return None
        self._seen[digest] = None
        if len(self._seen) > DEDUP_WINDOW:
            self._seen.popitem(last=False)
        return email

    # -- closing --------------------------------------------------------------------------

    def _finalize(self) -> None:
        """Log out and release everything (io lock held). Runs once."""
        if self._finalized:
            return
        self._finalized = True
        session, self._session = self._session, None
        if session is not None:
            session.close(polite=True)
        self._mode = "closed"
        self._pipe.close()
