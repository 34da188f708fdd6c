"""Sending over SMTP: :class:`SmtpEmailSender`.

One persistent :mod:`smtplib` connection, opened by :meth:`~SmtpEmailSender.connect`
(or the first send) and shared by every thread under a lock.

* TLS: ``smtps://`` is implicit TLS; ``smtp://`` upgrades with STARTTLS whenever
  the server offers it and stays plain otherwise. Certificates are verified
  against ``tls.ca-file`` (or the system CAs) unless ``tls.verify`` is false.
* AUTH only when a username and a password are configured, with one mechanism
  (PLAIN, else LOGIN, else whatever :mod:`smtplib` picks), and never in plain
  text to a host that is not loopback unless ``tls.allow-insecure`` is set.
  With ``user.auth`` ``xoauth2`` or ``oauthbearer``: AUTH with that mechanism
  and an access token asked from the token source on every connect; when the
  server rejects it, a new token is asked for and tried once more before
  :class:`~emailmw.AuthenticationError` is raised.
* Failures while sending: when the connection drops (server gone, reset,
  timeout, 421, any other 4xx), reconnect and re-send the very same bytes (same
  ``Message-ID``, so receivers can drop duplicates) with exponential backoff
  (50 ms doubling to 2 s, with jitter) until ``send-timeout`` has passed;
  then raise :class:`~emailmw.SmtpError`. A 5xx rejection (message too big,
  sender refused) raises at once. Each network operation is bounded by
  ``timeout``, so a send may outlast ``send-timeout`` by at most one of them.
* Refused recipients: the server answers ``RCPT TO`` for each recipient. The
  recipients it refused with a ``4xx`` get the same bytes again, alone, over a
  new connection, with the same backoff until ``send-timeout`` (the recipients
  that accepted it are not sent it again). A recipient refused with a ``5xx``,
  or still refused at ``send-timeout``, makes the send raise
  :class:`~emailmw.RecipientsRefusedError` (``.refused``: each one's code and
  text; ``.accepted``: who did get the email) once no temporary refusal is left
  to retry.
* A connection idle for more than 30 s is checked with NOOP before use (servers
  close idle clients); otherwise sending is tried directly.
* Wire format: ``settings.wire_format``. In ``rmw-email`` a non-ASCII body is
  sent with ``BODY=8BITMIME`` and a non-ASCII subject with ``SMTPUTF8``, and
  only when the server offers them (what it offered at the last EHLO; the
  first send connects to learn it); otherwise the codec raises before anything
  is sent. The default ``emailmw`` format is 7-bit and uses neither.
* Signing is not done here: the context wraps the sender in a
  :class:`~emailmw.transport.signing.SigningSender`, which passes the
  Message-ID it signed down as ``message_id``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import re
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from emailmw.errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    RecipientsRefusedError,
    SmtpError,
    TlsError,
    TransportError,
)
from emailmw.metrics import ConnectionState
from emailmw.stats import StatsCounters
from emailmw.transport.codec import encode_email, new_message_id, parse_address
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients
from emailmw.transport.oauth import SaslExchange, expiry_hint, sasl_mechanism
from emailmw.transport.sender import EmailSender
from emailmw.transport.settings import SmtpSettings
from emailmw.transport.tls import client_context
from emailmw.transport.tls import is_loopback as _is_loopback

__all__ = ["SmtpEmailSender"]

logger = logging.getLogger(__name__)

_BACKOFF_START = 0.05
_BACKOFF_MAX = 2.0
_IDLE_CHECK_AFTER = 30.0
_QUIT_TIMEOUT = 2.0
_CLOSE_WAIT = 1.0  # how long close() waits for a send in progress to let go
_MIN_STEP_TIMEOUT = 0.5  # a last attempt at the deadline still gets this long per step
_AUTH_PREFERENCE = ("PLAIN", "LOGIN")


def _retryable(exc: BaseException) -> bool:
    """Whether a failure is worth a reconnect and a retry (see the module docstring)."""
    if isinstance(exc, TransportError | ssl.SSLCertVerificationError):
        return False
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return False
    if isinstance(exc, smtplib.SMTPResponseException):
        return 400 <= exc.smtp_code < 500
    return isinstance(exc, smtplib.SMTPServerDisconnected | OSError)


def _temporary(reply: tuple[int, Any] | None) -> bool:
    """Whether a recipient's refusal is temporary (``4xx``): worth trying again."""
    return reply is not None and 400 <= reply[0] < 500


def _describe_refused(refused: dict[str, tuple[int, str]]) -> str:
    return "; ".join(f"{rcpt}: {code} {text}" for rcpt, (code, text) in refused.items())


def _reply_text(message: bytes | str) -> str:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    return " ".join(text.split())


class SmtpEmailSender(EmailSender):
    """Sends emails over one persistent SMTP connection (thread-safe).

    ``From`` is ``settings.from_address``, else the username if it is an
    address, else ``username@host``; ``Message-ID`` domains are the From
    address's domain. New emails go to ``settings.recipients`` (To and Cc
    headers; the envelope also holds Bcc); replies go to the original's
    ``From``. Stats counters: ``sent``, ``send_retries``, ``send_failures``,
    ``reconnects``. ``connection_name``: the name of this connection's state in
    ``stats.connections`` (a pool of senders gives each its own).
    """

    def __init__(
        self,
        settings: SmtpSettings,
        stats: StatsCounters | None = None,
        *,
        connection_name: str = "smtp",
    ) -> None:
        self._settings = settings
        self._stats = stats
        self._connection_name = connection_name
        self._address = settings.server
        host = f"[{self._address.host}]" if ":" in self._address.host else self._address.host
        self._server = f"{host}:{self._address.port}"
        self._label = str(self._address)
        username = settings.username
        if settings.from_address:
            self._from = settings.from_address
        elif "@" in username:
            self._from = username
        else:
            self._from = f"{username or 'emailmw'}@{self._address.host}"
        self._envelope_from = parse_address(self._from)
        self._domain = self._envelope_from.rpartition("@")[2] or "localhost"
        self._recipients = settings.recipients
        self._envelope = settings.recipients.all()
        self._hostname = socket.gethostname()
        self._context = self._tls_context(settings)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._conn: smtplib.SMTP | None = None
        self._opening: smtplib.SMTP | None = None  # a connection being opened
        self._ever_connected = False
        self._last_used = 0.0
        self._tls_mode = "none"
        self._authenticated = False
        self._extensions: frozenset[str] | None = None  # offered at the last EHLO

    # ------------------------------------------------------------------ public API

    @property
    def from_address(self) -> str:
        """The ``From`` of every email this sender sends."""
        return self._from

    def connect(self) -> None:
        """Open the connection now (STARTTLS/TLS and AUTH included).

        Raises :class:`~emailmw.ConnectError` (refused, unreachable, silent for
        ``timeout``), :class:`~emailmw.TlsError`, :class:`~emailmw.AuthenticationError`
        or :class:`~emailmw.SmtpError`, each naming the server.
        """
        with self._lock:
            self._check_open()
            if self._conn is None:
                self._connect_or_raise()

    def new_message_id(self) -> str:
        """A new Message-ID in the domain of the From address."""
        return new_message_id(self._domain)

    def offers(self, extension: str) -> bool:
        """Whether the server offered the SMTP ``extension`` (lower-case) at the last
        EHLO; connects first if this sender never did (raising as :meth:`connect`)."""
        if self._extensions is None:
            self.connect()
        extensions = self._extensions
        return extensions is not None and extension.lower() in extensions

    def _encode(self, email: EmailData) -> bytes:
        """``email`` in the configured wire format."""
        if self._settings.wire_format == "emailmw":
            return encode_email(email)
        return encode_email(
            email,
            wire_format=self._settings.wire_format,
            eight_bit=self.offers("8bitmime"),
            utf8_headers=self.offers("smtputf8"),
        )

    def send(
        self,
        content: EmailContent,
        headers: EmailHeaders | None = None,
        *,
        message_id: str | None = None,
    ) -> str:
        """Send a new email to the configured recipients; return its Message-ID.

        ``headers`` is not modified. Raises :class:`ValueError` if the content or
        headers cannot go into an email (see :func:`~emailmw.transport.codec.encode_email`).
        """
        email = EmailData(
            content=content,
            headers=headers.copy() if headers is not None else EmailHeaders(),
            message_id=message_id or new_message_id(self._domain),
            from_=self._from,
            recipients=EmailRecipients(to=list(self._recipients.to), cc=list(self._recipients.cc)),
        )
        data = self._encode(email)
        return self._deliver(data, self._envelope, email.message_id, _mail_options(data))

    def reply(
        self,
        content: EmailContent,
        original: EmailData,
        headers: EmailHeaders | None = None,
        *,
        message_id: str | None = None,
    ) -> str:
        """Reply to ``original``: to its ``From``, ``In-Reply-To``/``References`` its Message-ID."""
        to = parse_address(original.from_) if original.from_ else ""
        if not to:
            raise ValueError("cannot reply to an email that has no From address")
        email = EmailData(
            content=content,
            headers=headers.copy() if headers is not None else EmailHeaders(),
            message_id=message_id or new_message_id(self._domain),
            in_reply_to=original.message_id or None,
            from_=self._from,
            recipients=EmailRecipients(to=[to]),
        )
        data = self._encode(email)
        return self._deliver(data, [to], email.message_id, _mail_options(data))

    def send_raw(self, raw: bytes, recipients: list[str] | None = None) -> str:
        """Send an already encoded RFC 5322 email as it is (for ``emailmw send-raw``).

        Goes to ``recipients`` (default: the configured To, Cc and Bcc); line
        endings become CRLF. Returns the email's ``Message-ID`` header, or ``""``.
        Not signed. Retries and errors as for :meth:`send`.
        """
        if not raw.strip():
            raise ValueError("refusing to send an empty email")
        data = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        header_block = data.split(b"\r\n\r\n", 1)[0].decode("ascii", "replace")
        match = re.search(r"(?im)^message-id:[ \t]*(<[^<>\s]+>)", header_block)
        message_id = match.group(1) if match else ""
        envelope = list(recipients) if recipients is not None else self._envelope
        if not envelope:
            raise ValueError("no recipients: configure email.recipients or pass recipients")
        self._deliver(data, envelope, message_id or "(raw email)")
        return message_id

    def probe(self) -> dict[str, Any]:
        """Connect if needed and describe the server (for ``emailmw check-config``)."""
        with self._lock:
            self._check_open()
            conn = self._conn if self._conn is not None else self._connect_or_raise()
            sock = conn.sock
            tls_version = sock.version() if isinstance(sock, ssl.SSLSocket) else None
            cipher = sock.cipher() if isinstance(sock, ssl.SSLSocket) else None
            features = dict(conn.esmtp_features)
            size = features.get("size", "").strip()
            return {
                "server": self._label,
                "from": self._from,
                "tls": self._tls_mode,
                "tls_version": tls_version,
                "cipher": cipher[0] if cipher else None,
                "certificate_verified": tls_version is not None and self._settings.tls.verify,
                "authenticated": self._authenticated,
                "auth_mechanisms": features.get("auth", "").split(),
                "max_message_size": int(size) if size.isdigit() and int(size) > 0 else None,
                "esmtp_features": features,
            }

    def close(self) -> None:
        """Say QUIT and drop the connection. Idempotent; the sender cannot be used afterwards.

        Callable from any thread, and prompt: a send blocked on a silent server
        has its socket shut down (that send raises :class:`~emailmw.SmtpError`)
        and this waits at most a second for it to let go.
        """
        self._closing.set()
        if not self._lock.acquire(blocking=False):
            # A send or connect holds the connection: unblock it. (An idle connection
            # is left whole, so that it can still say QUIT.)
            for conn in (self._conn, self._opening):
                _abort(conn)
            if not self._lock.acquire(timeout=_CLOSE_WAIT):
                logger.debug("closing %s while a send lets go of the connection", self._label)
                return  # the sending thread sees _closing and drops the connection
        try:
            conn, self._conn = self._conn, None
            if self._stats is not None:
                self._stats.connections.close(self._connection_name)
            if conn is None:
                return
            try:
                _set_timeout(conn, min(_QUIT_TIMEOUT, self._settings.timeout))
                conn.quit()
            except (OSError, smtplib.SMTPException):
                conn.close()
            logger.debug("closed SMTP connection to %s", self._label)
        finally:
            self._lock.release()

    # ------------------------------------------------------------------ sending

    def _count(self, name: str) -> None:
        if self._stats is not None:
            self._stats.add(name)

    def _connection(self, state: ConnectionState) -> None:
        if self._stats is not None:
            self._stats.connections.set(self._connection_name, state)

    def _check_open(self) -> None:
        if self._closing.is_set():
            raise SmtpError(f"the SMTP sender for {self._label} is closed", server=self._server)

    def _fail(self, message: str) -> SmtpError:
        """Count a failed send and make its error."""
        self._count("send_failures")
        return SmtpError(message, server=self._server)

    def _deliver(
        self,
        data: bytes,
        envelope: list[str],
        message_id: str,
        options: tuple[str, ...] = (),
    ) -> str:
        """Hand ``data`` to the server with MAIL FROM parameters ``options`` (with
        retries, see the module docstring)."""
        limit = self._settings.max_message_size
        if len(data) > limit:
            raise self._fail(
                f"email of {len(data)} bytes exceeds max-message-size ({limit} bytes); "
                f"not sent to {self._label}"
            )
        start = time.monotonic()
        deadline = start + self._settings.send_timeout
        if not self._lock.acquire(timeout=self._settings.send_timeout):
            raise self._fail(
                f"sending to {self._label} timed out after {self._settings.send_timeout:g} s "
                "waiting for the connection"
            )
        try:
            self._send_with_retries(
                data, envelope, message_id, options, start=start, deadline=deadline
            )
        finally:
            self._lock.release()
        self._count("sent")
        return message_id

    def _send_with_retries(
        self,
        data: bytes,
        envelope: list[str],
        message_id: str,
        options: tuple[str, ...],
        *,
        start: float,
        deadline: float,
    ) -> None:
        delay = _BACKOFF_START
        attempts = 0
        pending = list(envelope)  # the recipients still to send to (all of them at first)
        accepted: list[str] = []  # the recipients the server took the email for
        refused: dict[str, tuple[int, str]] = {}  # each other one's last refusal
        while True:
            if self._closing.is_set():
                if refused:
                    raise self._refusal(
                        message_id,
                        refused,
                        accepted,
                        attempts=attempts,
                        start=start,
                        cause="the sender was closed",
                    )
                raise self._fail(f"the SMTP sender for {self._label} was closed; not sent")
            attempts += 1
            try:
                conn = self._usable_connection(deadline)
                try:
                    rejected = conn.sendmail(self._envelope_from, pending, data, options)
                except smtplib.SMTPRecipientsRefused as exc:
                    # Nobody got the email: every recipient was refused, or a 421 ended the
                    # session (smtplib stops there; the rest share that reply).
                    last = list(exc.recipients.values())[-1]
                    rejected = {rcpt: exc.recipients.get(rcpt, last) for rcpt in pending}
                self._last_used = time.monotonic()
            except (OSError, smtplib.SMTPException, TransportError) as exc:
                retryable = _retryable(exc)
                if retryable or _connection_lost(self._conn):
                    self._drop()
                    self._connection(ConnectionState.RECONNECTING)
                now = time.monotonic()
                if refused and (not retryable or now >= deadline):
                    # Retrying refused recipients: the error must say who did get the email.
                    if isinstance(exc, smtplib.SMTPResponseException):
                        reply = (exc.smtp_code, _reply_text(exc.smtp_error))
                        refused.update(dict.fromkeys(pending, reply))
                    cause = self._describe(exc)
                    raise self._refusal(
                        message_id, refused, accepted, attempts=attempts, start=start, cause=cause
                    ) from exc
                if not retryable:
                    error = self._translate(exc, sending=True)
                    if isinstance(error, AuthenticationError):
                        self._connection(ConnectionState.AUTH_FAILED)
                    self._count("send_failures")
                    raise error from exc
                if now >= deadline:
                    raise self._fail(
                        f"sending {message_id} to {self._label} failed after {attempts} "
                        f"attempt(s) in {now - start:.1f} s: {self._describe(exc)}"
                    ) from exc
                cause = self._describe(exc)
            else:
                for rcpt in pending:
                    if rcpt in rejected:
                        code, text = rejected[rcpt]
                        refused[rcpt] = (code, _reply_text(text))
                    elif rcpt not in accepted:
                        accepted.append(rcpt)
                        refused.pop(rcpt, None)
                # Only temporary refusals (4xx) are tried again, and only for those recipients.
                pending = [r for r in dict.fromkeys(pending) if _temporary(rejected.get(r))]
                if not refused:
                    return
                now = time.monotonic()
                if not pending or now >= deadline:
                    raise self._refusal(
                        message_id, refused, accepted, attempts=attempts, start=start
                    )
                # A new session for the retry, as for any other temporary failure.
                self._drop()
                cause = _describe_refused({r: refused[r] for r in pending})
            pause = min(delay * random.uniform(0.5, 1.5), deadline - now)
            logger.warning(
                "sending %s to %s failed (%s); retrying in %.2f s",
                message_id,
                self._label,
                cause,
                pause,
            )
            self._count("send_retries")
            self._closing.wait(pause)
            delay = min(delay * 2, _BACKOFF_MAX)

    def _refusal(
        self,
        message_id: str,
        refused: dict[str, tuple[int, str]],
        accepted: list[str],
        *,
        attempts: int,
        start: float,
        cause: str | None = None,
    ) -> RecipientsRefusedError:
        """Count a send that ended with recipients refused and make its error."""
        self._count("send_failures")
        took = f"after {attempts} attempt(s) in {time.monotonic() - start:.1f} s"
        if cause is not None:
            took += f": {cause}"
        elif any(_temporary(reply) for reply in refused.values()):
            took += f": still refused at send-timeout ({self._settings.send_timeout:g} s)"
        got_it = f"accepted for {', '.join(accepted)}" if accepted else "no recipient accepted it"
        message = (
            f"{self._label} refused {message_id} for {len(refused)} recipient(s): "
            f"{_describe_refused(refused)}; {got_it} ({took})"
        )
        return RecipientsRefusedError(
            message, refused=refused, accepted=tuple(accepted), server=self._server
        )

    def _usable_connection(self, deadline: float) -> smtplib.SMTP:
        conn = self._conn
        if conn is not None and conn.sock is not None:
            if time.monotonic() - self._last_used <= _IDLE_CHECK_AFTER:
                return conn
            try:
                code, _ = conn.noop()
                if code == 250:
                    self._last_used = time.monotonic()
                    return conn
            except (OSError, smtplib.SMTPException):
                pass
            logger.debug("idle SMTP connection to %s is gone; reconnecting", self._label)
        self._drop()
        return self._open(deadline)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # ------------------------------------------------------------------ connecting

    @staticmethod
    def _tls_context(settings: SmtpSettings) -> ssl.SSLContext:
        ca_file = settings.tls.ca_file
        try:
            context = client_context(ca_file, settings.tls.verify)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"email.tls.ca-file: cannot load CA certificates from {ca_file}: {exc}",
                key="email.tls.ca-file",
            ) from None
        if not settings.tls.verify:
            logger.warning(
                "TLS certificate verification is disabled (tls.verify: false) for %s",
                settings.server,
            )
        return context

    def _connect_or_raise(self) -> smtplib.SMTP:
        """Open the connection (lock held); translate every failure."""
        try:
            return self._open(time.monotonic() + self._settings.timeout)
        except (OSError, smtplib.SMTPException, TransportError) as exc:
            error = self._translate(exc, sending=False)
            auth = isinstance(error, AuthenticationError)
            self._connection(ConnectionState.AUTH_FAILED if auth else ConnectionState.DISCONNECTED)
            if error is exc:
                raise
            raise error from exc

    def _open(self, deadline: float) -> smtplib.SMTP:
        """Connect, greet, STARTTLS, AUTH; store and return the connection (lock held)."""

        def remaining() -> float:
            left = max(deadline - time.monotonic(), _MIN_STEP_TIMEOUT)
            return min(self._settings.timeout, left)

        address = self._address
        conn: smtplib.SMTP
        # The constructor connects and reads the greeting (SMTPConnectError unless 220).
        # Passing local_hostname keeps smtplib from a slow reverse DNS lookup (getfqdn).
        if address.tls == "implicit":
            conn = smtplib.SMTP_SSL(
                address.host,
                address.port,
                local_hostname="localhost",
                timeout=remaining(),
                context=self._context,
            )
        else:
            conn = smtplib.SMTP(
                address.host, address.port, local_hostname="localhost", timeout=remaining()
            )
        self._opening = conn  # close() can abort the steps that follow the greeting
        try:
            conn.local_hostname = self._ehlo_name(conn.sock)
            _set_timeout(conn, remaining())
            conn.ehlo_or_helo_if_needed()
            tls_mode = "implicit" if address.tls == "implicit" else "none"
            if tls_mode == "none" and conn.has_extn("starttls"):
                _set_timeout(conn, remaining())
                try:
                    conn.starttls(context=self._context)
                except smtplib.SMTPResponseException as exc:
                    raise TlsError(
                        f"{self._label} refused STARTTLS: {exc.smtp_code} "
                        f"{_reply_text(exc.smtp_error)}",
                        server=self._server,
                    ) from exc
                conn.ehlo()
                tls_mode = "starttls"
            self._authenticate(conn, tls_mode != "none", remaining)
        except BaseException:
            conn.close()
            raise
        finally:
            self._opening = None
        _set_timeout(conn, self._settings.timeout)
        if self._ever_connected:
            self._count("reconnects")
        self._ever_connected = True
        self._conn = conn
        self._extensions = frozenset(conn.esmtp_features)
        self._connection(ConnectionState.CONNECTED)
        self._tls_mode = tls_mode
        self._last_used = time.monotonic()
        logger.debug(
            "connected to %s (tls: %s, auth: %s)", self._label, tls_mode, self._authenticated
        )
        return conn

    def _authenticate(
        self, conn: smtplib.SMTP, encrypted: bool, remaining: Callable[[], float]
    ) -> None:
        if self._settings.auth != "password":
            self._authenticate_oauth(conn, encrypted, remaining)
            return
        username = self._settings.username
        password = self._settings.password()
        self._authenticated = False
        if not username or password is None:
            return
        if not encrypted and not _is_loopback(self._address.host):
            if not self._settings.tls.allow_insecure:
                raise TlsError(
                    f"refusing to send the password in plain text to {self._label}: the server "
                    "does not offer STARTTLS (use smtps://, or set tls.allow-insecure: true)",
                    server=self._server,
                )
            logger.warning("sending the SMTP password unencrypted to %s", self._label)
        if not conn.has_extn("auth"):
            raise SmtpError(
                f"{self._label} does not offer AUTH, but a username and password are "
                "configured (remove the password to send without AUTH)",
                server=self._server,
            )
        offered = conn.esmtp_features.get("auth", "").upper().split()
        _set_timeout(conn, remaining())
        # A UnicodeError holds the credentials: the AuthenticationError is raised after
        # its handler has ended, so that it is neither its cause nor its __context__.
        unencodable = ""
        for mechanism in _AUTH_PREFERENCE:
            if mechanism in offered:
                conn.user, conn.password = username, password
                try:
                    conn.auth(mechanism, getattr(conn, f"auth_{mechanism.lower()}"))
                except UnicodeError:
                    unencodable = f" with AUTH {mechanism}"
                finally:
                    conn.password = ""
                break
        else:
            try:
                conn.login(username, password)
            except UnicodeError:
                unencodable = " "
        if unencodable:
            del password  # the traceback keeps this frame's variables
            raise AuthenticationError(
                f"{self._label}: cannot send a non-ASCII username or password{unencodable}".strip(),
                server=self._server,
            )
        self._authenticated = True

    def _authenticate_oauth(
        self, conn: smtplib.SMTP, encrypted: bool, remaining: Callable[[], float]
    ) -> None:
        """AUTH XOAUTH2 or OAUTHBEARER with a token from the token source; when the
        server rejects it, once more with a new token (the first may have expired)."""
        self._authenticated = False
        source = self._settings.token
        mechanism = sasl_mechanism(self._settings.auth)
        if source is None:
            raise AuthenticationError(
                f"{self._label}: user.auth is {self._settings.auth} but no token source is set",
                server=self._server,
            )
        if not encrypted and not _is_loopback(self._address.host):
            if not self._settings.tls.allow_insecure:
                raise TlsError(
                    f"refusing to send the access token in plain text to {self._label}: the "
                    "server does not offer STARTTLS (use smtps://, or set tls.allow-insecure: "
                    "true)",
                    server=self._server,
                )
            logger.warning("sending the SMTP access token unencrypted to %s", self._label)
        offered = conn.esmtp_features.get("auth", "").upper().split()
        if mechanism not in offered:
            raise AuthenticationError(
                f"{self._label} does not offer AUTH {mechanism} (it offers: "
                f"{' '.join(offered) or 'no AUTH at all'}); check user.auth",
                server=self._server,
            )
        refusal = ""
        for attempt in (1, 2):
            token = source.token()  # run again for the second attempt: a new token
            hint = expiry_hint(token)
            exchange = SaslExchange(mechanism, self._settings.username, token)
            del token
            _set_timeout(conn, remaining())
            try:
                conn.auth(mechanism, exchange)
            except smtplib.SMTPAuthenticationError as exc:
                refusal = f"{exc.smtp_code} {_reply_text(exc.smtp_error)}{exchange.describe()}"
            else:
                self._authenticated = True
                return
            finally:
                del exchange  # holds the token
            if attempt == 1:
                logger.info(
                    "%s rejected the access token from %s (%s)%s; getting a new one",
                    self._label,
                    source.origin,
                    refusal,
                    hint,
                )
        raise AuthenticationError(
            f"{self._label} rejected the OAuth2 access token (AUTH {mechanism}) for "
            f"{self._settings.username!r}, and a new one from {source.origin} too{hint}: "
            f"the token is revoked, expired or invalid, or not for this account ({refusal})",
            server=self._server,
        )

    def _ehlo_name(self, sock: socket.socket | None) -> str:
        """A fully qualified host name, else the local address as an address literal."""
        if "." in self._hostname and self._hostname.isascii():
            return self._hostname
        try:
            local = ipaddress.ip_address(sock.getsockname()[0]) if sock else None
        except (OSError, ValueError):
            local = None
        if local is None:
            return "localhost"
        return f"[{local}]" if local.version == 4 else f"[IPv6:{local}]"

    # ------------------------------------------------------------------ errors

    def _describe(self, exc: BaseException) -> str:
        """A short cause for log lines and error messages (never a password)."""
        exc = _underlying(exc)
        if isinstance(exc, smtplib.SMTPResponseException):
            return f"{exc.smtp_code} {_reply_text(exc.smtp_error)}"
        if isinstance(exc, TimeoutError):
            return f"no answer within {self._settings.timeout:g} s"
        if isinstance(exc, ConnectionRefusedError):
            return "connection refused"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return f"certificate verification failed: {exc.verify_message or exc.reason}"
        if isinstance(exc, OSError) and exc.strerror:
            return exc.strerror
        return str(exc) or type(exc).__name__

    def _translate(self, exc: BaseException, *, sending: bool) -> TransportError:
        """The emailmw exception for a lower-level one."""
        if isinstance(exc, TransportError):
            return exc
        cause = self._describe(exc)
        exc = _underlying(exc)
        label, server = self._label, self._server
        if isinstance(exc, ssl.SSLCertVerificationError):
            return TlsError(f"TLS with {label} failed: {cause}", server=server)
        if isinstance(exc, ssl.SSLError):
            return TlsError(f"TLS handshake with {label} failed: {cause}", server=server)
        if isinstance(exc, smtplib.SMTPAuthenticationError):
            return AuthenticationError(
                f"{label} rejected the username or password: {cause}", server=server
            )
        if sending and isinstance(exc, smtplib.SMTPException):
            return SmtpError(f"{label} rejected the email: {cause}", server=server)
        if isinstance(exc, TimeoutError):
            return ConnectError(f"{label} did not answer: {cause}", server=server)
        if isinstance(exc, smtplib.SMTPServerDisconnected | smtplib.SMTPConnectError):
            return ConnectError(f"{label} closed the connection: {cause}", server=server)
        if isinstance(exc, OSError):
            return ConnectError(f"cannot connect to {label}: {cause}", server=server)
        return SmtpError(f"SMTP with {label} failed: {cause}", server=server)


def _underlying(exc: BaseException) -> BaseException:
    """smtplib turns a socket error while reading a reply into SMTPServerDisconnected;
    the socket error (a timeout, a reset) says more."""
    if isinstance(exc, smtplib.SMTPServerDisconnected) and isinstance(exc.__context__, OSError):
        return exc.__context__
    return exc


def _abort(conn: smtplib.SMTP | None) -> None:
    """Shut a connection's socket down from another thread: a read blocked on it
    returns at once (the owner of the connection then drops it)."""
    sock = None if conn is None else conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _mail_options(data: bytes) -> tuple[str, ...]:
    """MAIL FROM parameters for ``data``: none for 7-bit mail (every email of the
    ``emailmw`` wire format); ``BODY=8BITMIME`` for an 8-bit body, plus
    ``SMTPUTF8`` for 8-bit headers (the ``rmw-email`` format, whose encoder
    checked that the server offers them)."""
    if data.isascii():
        return ()
    header_block = data.split(b"\r\n\r\n", 1)[0]
    return ("BODY=8BITMIME", "SMTPUTF8") if not header_block.isascii() else ("BODY=8BITMIME",)


def _set_timeout(conn: smtplib.SMTP, seconds: float) -> None:
    if conn.sock is not None:
        conn.sock.settimeout(seconds)


def _connection_lost(conn: smtplib.SMTP | None) -> bool:
    return conn is not None and conn.sock is None
