"""The IMAP session layer: one logged-in connection with the mailbox EXAMINEd.

:func:`open_session` connects (``imaps://``, or ``imap://`` with STARTTLS
whenever the server offers it; plain text only to a loopback host or with
``tls.allow-insecure``), logs in (``LOGIN``, or ``AUTHENTICATE PLAIN`` for
non-ASCII credentials; ``AUTHENTICATE XOAUTH2`` or ``OAUTHBEARER`` with an
access token from the token source, asked again once when the server rejects
it) and ``EXAMINE``\\s the mailbox (read-only: nothing is
ever marked read, flagged or deleted). What goes wrong on the way is translated
into the :class:`~emailmw.errors.TransportError` subclasses (TLS, connect,
authentication, IMAP).

:class:`Session` wraps an :class:`imapclient.IMAPClient` and drives imaplib
underneath where IMAPClient falls short:

* Every response is watched for an untagged ``EXISTS`` (the server reports the
  mailbox's new size at the end of any command that completes after a
  delivery; IDLE pushes it), which sets ``new_mail`` and records when, and how
  precisely, it was detected. An untagged ``NO`` or ``BAD`` (Dovecot's answer
  to every command once the selected mailbox was deleted under the session)
  is kept as ``trouble``: :meth:`Session.verify_mailbox` EXAMINEs the mailbox
  again. ``BYE`` ends the session.
* ``UID FETCH`` with ``n:*`` ranges and arbitrary items, parsed by IMAPClient's
  response parser; ``UID SEARCH`` (the history of a topic).
* IMAP IDLE (RFC 2177) over our own wait: a ``poll()`` on the IMAP socket and
  a wake-up file descriptor, after checking the bytes that imaplib's reader
  (and the TLS layer) may already hold: with IMAPClient's own ``idle_check``
  an ``EXISTS`` that arrives together with the ``+ idling`` continuation waits
  for the next packet.

Every connection problem surfaces as :class:`ConnectionLostError`; the
receiver (:mod:`emailmw.transport.imap`) reconnects. Not thread-safe.
"""

from __future__ import annotations

import ast
import contextlib
import imaplib
import logging
import math
import re
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import imapclient
from imapclient.exceptions import LoginError
from imapclient.response_parser import parse_fetch_response

from emailmw.errors import (
    AuthenticationError,
    ConnectError,
    ConnectionLimitError,
    ImapError,
    TlsError,
    TransportError,
)
from emailmw.stats import DropReason
from emailmw.transport.oauth import SaslExchange, expiry_hint, sasl_mechanism
from emailmw.transport.tls import is_loopback

if TYPE_CHECKING:
    from emailmw.transport.settings import ImapSettings

__all__ = ["ConnectionLostError", "Listed", "Session", "is_loopback", "open_session"]

# the receiver's logger: what a session logs is the receiver's business
logger = logging.getLogger("emailmw.transport.imap")

_LOGOUT_TIMEOUT = 2.0
# a login refused for the number of the user's connections (see _connection_limit)
_LIMIT_RE = re.compile(
    r"\[LIMIT\]|maximum number of connections|too many (simultaneous |concurrent )?connections",
    re.IGNORECASE,
)
_LIMIT_VALUE_RE = re.compile(r"mail_max_userip_connections=(\d+)")
_VERIFY_EVERY = 10.0  # check the mailbox after an untagged NO at most this often (s)


class ConnectionLostError(Exception):
    """The IMAP connection broke; the receiver reconnects."""


@dataclass(slots=True)
class Listed:
    """A new email as listed: UID, RFC822.SIZE, INTERNALDATE, its bytes if the
    listing brought them all, and why it is not to be delivered if the listing
    already decided so (a re-read after a UIDVALIDITY change)."""

    uid: int
    size: int
    date: datetime | None
    body: bytes | None = None
    drop: DropReason | None = None
    why: str = ""  #: the drop in a word, for the log


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
        limited = _connection_limit(exc, server)
        if limited is not None:
            return limited
        reason = str(exc)
        reason = reason[len("login failed: ") :] if reason.startswith("login failed: ") else reason
        return AuthenticationError(f"{server}: login failed: {reason}", server=server)
    if isinstance(exc, OSError | EOFError):
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return ConnectError(f"{server}: {reason} ({stage})", server=server)
    if isinstance(exc, imaplib.IMAP4.abort):
        return ConnectError(f"{server}: connection lost ({stage}): {exc}", server=server)
    return ImapError(f"{server}: {stage} failed: {exc}", server=server)


class Session:
    """One logged-in IMAP connection with the mailbox EXAMINEd.

    Wraps an :class:`imapclient.IMAPClient` and drives imaplib underneath where
    IMAPClient falls short (``n:*`` fetches, IDLE over our own wait). Every
    connection problem surfaces as :class:`ConnectionLostError`. Not thread-safe.
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
        #: told each command's round trip (command, seconds); None: not measured
        self.observe: Callable[[str, float], None] | None = None
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
    def _guard(self, what: str, timed: bool = True) -> Iterator[None]:
        """Translate connection problems; report the round trip of a command that
        completed (``timed``) to :attr:`observe`."""
        started = time.perf_counter()
        try:
            yield
        except ConnectionLostError:
            raise
        except (imaplib.IMAP4.error, OSError, EOFError, ValueError) as exc:
            raise ConnectionLostError(f"{what}: {exc or type(exc).__name__}") from exc
        else:
            if timed and self.observe is not None:
                self.observe(what, time.perf_counter() - started)
        finally:
            self.count_commands()

    def _scan(self, within: float | None) -> None:
        """Look at (and drop) the untagged responses gathered so far.

        ``within``: how precisely an EXISTS found now is timed (None: measure the
        time since the previous sync).
        """
        untagged = self.imap.untagged_responses
        if "BYE" in untagged:
            raise ConnectionLostError(f"server said BYE: {_text(untagged['BYE'][-1])}")
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

    def search(self, criteria: list[str | bytes]) -> tuple[bool, list[int]]:
        """``UID SEARCH CHARSET UTF-8 criteria`` (IMAPClient quotes each item):
        ``(ok, UIDs)``; ok is False on NO or BAD."""
        with self._guard("UID SEARCH"):
            try:
                found = self.client.search(criteria, charset="UTF-8")
            except imaplib.IMAP4.abort:
                raise
            except imaplib.IMAP4.error as exc:  # NO or BAD: the session is fine
                logger.debug("%s: UID SEARCH: %s", self.server, exc)
                self._scan(None)
                return False, []
            self._scan(None)
            return True, sorted(int(uid) for uid in found)

    def verify_mailbox(self, mailbox: str) -> None:
        """After an untagged NO or BAD (Dovecot's answer to every command once the
        selected mailbox was deleted under us), EXAMINE it again: raise
        :class:`ConnectionLostError` if it is gone or was replaced (a new
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
            raise ConnectionLostError(f"the mailbox was replaced ({reason})")
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
        with self._guard("IDLE", timed=False):
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

    def abort(self) -> None:
        """Shut the socket down; callable from any thread. A read blocked on it
        returns at once and the session is lost (:class:`ConnectionLostError`)."""
        sock = getattr(self.imap, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

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


def _count_reads(imap: Any, count_bytes: Callable[[int], None]) -> None:
    """Report every byte imaplib reads from the server (its ``read`` and ``readline``,
    through which all of its input passes, before and after STARTTLS)."""
    read, readline = imap.read, imap.readline

    def counted_read(size: int) -> bytes:
        data: bytes = read(size)
        count_bytes(len(data))
        return data

    def counted_readline() -> bytes:
        line: bytes = readline()
        count_bytes(len(line))
        return line

    imap.read, imap.readline = counted_read, counted_readline


def _oauth_login(client: Any, settings: ImapSettings, offered: set[str], server: str) -> None:
    """AUTHENTICATE XOAUTH2 or OAUTHBEARER with a token from the token source;
    when the server rejects it, once more with a new token (the first may have
    expired). Raises :class:`AuthenticationError` (never quoting a token)."""
    source = settings.token
    mechanism = sasl_mechanism(settings.auth)
    if source is None:
        raise AuthenticationError(
            f"{server}: user.auth is {settings.auth} but no token source is set", server=server
        )
    if f"AUTH={mechanism}" not in offered:
        mechanisms = sorted(c[5:] for c in offered if c.startswith("AUTH="))
        raise AuthenticationError(
            f"{server}: the server does not offer AUTHENTICATE {mechanism} (it offers: "
            f"{' '.join(mechanisms) or 'no SASL mechanism'}); check user.auth",
            server=server,
        )
    refusal = ""
    for attempt in (1, 2):
        token = source.token()  # asked again for the second attempt: a new token
        hint = expiry_hint(token)
        exchange = SaslExchange(mechanism, settings.username, token)
        del token
        try:
            client.sasl_login(mechanism, exchange)
        except LoginError as exc:
            limited = _connection_limit(exc, server)
            if limited is not None:
                raise limited from exc
            refusal = f"{_login_reason(exc)}{exchange.describe()}"
        else:
            return
        finally:
            del exchange  # holds the token
        if attempt == 1:
            logger.info(
                "%s rejected the access token from %s (%s)%s; getting a new one",
                server,
                source.origin,
                refusal,
                hint,
            )
    raise AuthenticationError(
        f"{server}: the server rejected the OAuth2 access token (AUTHENTICATE {mechanism}) "
        f"for {settings.username!r}, and a new one from {source.origin} too{hint}: the token "
        f"is revoked, expired or invalid, or not for this account ({refusal})",
        server=server,
    )


def _connection_limit(exc: LoginError, server: str) -> ConnectionLimitError | None:
    """The :class:`ConnectionLimitError` for a login the server refused because the
    user has too many connections open, else None.

    Dovecot answers ``NO [LIMIT] Maximum number of connections from user+IP
    exceeded (mail_max_userip_connections=N)``; ``[LIMIT]`` is RFC 5530's
    response code for an implementation limit, and some servers say it in words
    only (Gmail: ``Too many simultaneous connections``).
    """
    reply = _login_reason(exc)
    if reply[:2] in ("b'", 'b"') and reply[-1:] == reply[1]:
        with contextlib.suppress(ValueError, SyntaxError):
            reply = _text(ast.literal_eval(reply))  # imapclient quotes the reply's bytes
    if not _LIMIT_RE.search(reply):
        return None
    match = _LIMIT_VALUE_RE.search(reply)
    limit = int(match.group(1)) if match else None
    return ConnectionLimitError(
        f"{server}: the server refused one more IMAP connection for this user, who has as "
        f"many open as it allows ({reply}); close another client of this account, raise "
        "the server's limit (Dovecot: mail_max_userip_connections), or spread the "
        "readers over more accounts (see docs/deployment.md, Scale-out)",
        limit=limit,
        server=server,
    )


def _login_reason(exc: BaseException) -> str:
    reason = str(exc)
    return reason[len("login failed: ") :] if reason.startswith("login failed: ") else reason


def open_session(
    settings: ImapSettings,
    context: ssl.SSLContext,
    count: Callable[[int], None],
    count_bytes: Callable[[int], None] | None = None,
) -> Session:
    """Connect, secure, log in and EXAMINE; raise a :class:`TransportError` subclass.

    ``count`` is told the tagged commands sent, ``count_bytes`` the bytes read
    from the server (after the greeting)."""
    address = settings.server
    server = str(address)
    username = settings.username
    oauth = settings.auth != "password"
    password = "" if oauth else settings.password()
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
            timeout=settings.timeout,
        )
        client.normalise_times = False
        if count_bytes is not None:
            _count_reads(client._imap, count_bytes)
        if address.tls == "starttls":
            stage = "STARTTLS"
            if "STARTTLS" in {c.upper() for c in client._imap.capabilities}:
                client.starttls(context)
            elif settings.tls.allow_insecure or is_loopback(address.host):
                logger.warning("%s offers no STARTTLS: logging in over plain text", server)
            else:
                secret = "access token" if oauth else "password"
                raise TlsError(
                    f"{server}: the server offers no STARTTLS; refusing to send the {secret} "
                    "in plain text (use imaps://, or set tls.allow-insecure)",
                    server=server,
                )
        stage = "logging in"
        preauth = {c.upper() for c in client._imap.capabilities}
        if oauth:
            _oauth_login(client, settings, preauth, server)
        elif username.isascii() and password.isascii() and "LOGINDISABLED" not in preauth:
            client.login(username, password)
        elif "AUTH=PLAIN" in preauth:
            client.plain_login(username, password)
        else:
            raise AuthenticationError(
                f"{server}: the server accepts neither LOGIN nor AUTHENTICATE PLAIN for "
                "these credentials",
                server=server,
            )
        session = Session(client, server, count)
        session.greeting = _text(client.welcome or b"")
        session.capabilities = frozenset(_text(c).upper() for c in client.capabilities())
        stage = "selecting the mailbox"
        try:
            info = client.select_folder(settings.mailbox, readonly=True)
        except imaplib.IMAP4.abort:
            raise
        except imaplib.IMAP4.error as exc:
            raise ImapError(
                f"{server}: cannot open mailbox {settings.mailbox!r}: {exc}", server=server
            ) from exc
        if b"UIDNEXT" not in info:
            info[b"UIDNEXT"] = client.folder_status(settings.mailbox, [b"UIDNEXT"])[b"UIDNEXT"]
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
        if not isinstance(exc, UnicodeError):
            raise _connect_error(exc, server, stage, settings.timeout) from exc
    # A UnicodeError holds the credentials: raised here, after its handler, the
    # ImapError has neither a cause nor a __context__ that could show them.
    del password  # the traceback keeps this frame's variables
    raise ImapError(f"{server}: cannot encode the credentials", server=server)
