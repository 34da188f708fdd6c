"""Every exception emailmw raises, in one place.

The tree::

    EmailmwError
    ├── ConfigError                  bad or missing configuration (names the key)
    ├── ContextError                 context not initialized, or already shut down
    ├── InvalidNameError             (also ValueError) bad topic/service name
    ├── InvalidHeaderError           (also ValueError) bad additional header
    ├── InvalidMessageError          (also ValueError) payload that cannot be sent or read
    │   └── MessageTypeError         (also TypeError) a value not of the declared type
    ├── GuardConditionInUseError     guard condition already in another wait set
    ├── DurableNameInUseError        a durable subscription's name is taken by another one
    ├── StateStoreError              the local state store (state-dir) cannot be used
    ├── WaitTimeoutError             (also TimeoutError) a wait_for_* timed out
    ├── UnknownRequestError          (also KeyError) response to an unknown request id
    └── TransportError               the mail servers could not do what was asked
        ├── SmtpError                sending failed
        │   └── RecipientsRefusedError  the server refused some recipients (.refused, .accepted)
        ├── ImapError                receiving failed
        ├── AuthenticationError      (also Smtp/Imap by server) wrong credentials
        ├── TlsError                 TLS handshake or certificate verification failed
        └── ConnectError             server unreachable, refused or silent
            └── ConnectionLimitError the server refused one more connection for the user (.limit)

Lower-level exceptions (``smtplib``, ``imapclient``, ``OSError``, ``ssl``) are
translated inside the transport layer and chained with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "ConnectError",
    "ConnectionLimitError",
    "ContextError",
    "DurableNameInUseError",
    "EmailmwError",
    "GuardConditionInUseError",
    "ImapError",
    "InvalidHeaderError",
    "InvalidMessageError",
    "InvalidNameError",
    "MessageTypeError",
    "RecipientsRefusedError",
    "SmtpError",
    "StateStoreError",
    "TlsError",
    "TransportError",
    "UnknownRequestError",
    "WaitTimeoutError",
]


class EmailmwError(Exception):
    """Root of every exception raised by emailmw."""


class ConfigError(EmailmwError):
    """The configuration is missing or invalid.

    ``key`` is the dotted YAML key at fault (for example
    ``email.user.url-imap``) when one is known, ``path`` the file it came from.
    """

    def __init__(self, message: str, *, key: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.path = path


class ContextError(EmailmwError):
    """A context was used before ``init()`` or after ``shutdown()``."""


class InvalidNameError(EmailmwError, ValueError):
    """A topic or service name is not valid (empty, control characters, too long)."""


class InvalidHeaderError(EmailmwError, ValueError):
    """An additional header name or value is not valid or is reserved."""


class InvalidMessageError(EmailmwError, ValueError):
    """A message, request or response cannot be sent as given.

    Raised before anything is sent, by every transport alike: the text holds a
    lone surrogate (``"a\\ud800b"``), which UTF-8, and so the wire format,
    cannot carry.
    """


class MessageTypeError(InvalidMessageError, TypeError):
    """A message, request or response is not a value of the type its publisher,
    client or server was made with (``str`` unless given). Also a
    :class:`TypeError`."""


class GuardConditionInUseError(EmailmwError):
    """A guard condition was added to a second wait set."""


class DurableNameInUseError(EmailmwError):
    """A durable subscription's name is in use by another subscription, in this
    process or another one (see ``Subscription(..., durable=NAME)``)."""


class StateStoreError(EmailmwError):
    """The local state store (config key ``state-dir``) cannot be opened or written;
    the message names the file."""


class WaitTimeoutError(EmailmwError, TimeoutError):
    """A ``wait_for_*`` call timed out before anything arrived."""


class UnknownRequestError(EmailmwError, KeyError):
    """``send_response`` was given a request id this server never received (or already answered)."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the plain message
        return str(self.args[0]) if self.args else ""


class TransportError(EmailmwError):
    """The mail transport failed. ``server`` names the server (``host:port``) when known."""

    def __init__(self, message: str, *, server: str | None = None) -> None:
        super().__init__(message)
        self.server = server


class SmtpError(TransportError):
    """Sending an email over SMTP failed (after any retries)."""


class RecipientsRefusedError(SmtpError):
    """The server refused one or more recipients of an email, for good (``5xx``) or
    for longer than ``send-timeout`` (``4xx``).

    ``refused`` maps each recipient that did not get the email to the server's last
    reply to its ``RCPT TO`` (code and text); ``accepted`` lists the recipients the
    server did take the email for (in envelope order; empty if none did).
    """

    def __init__(
        self,
        message: str,
        *,
        refused: dict[str, tuple[int, str]],
        accepted: tuple[str, ...] = (),
        server: str | None = None,
    ) -> None:
        super().__init__(message, server=server)
        self.refused = dict(refused)
        self.accepted = tuple(accepted)


class ImapError(TransportError):
    """Receiving over IMAP failed."""


class AuthenticationError(TransportError):
    """The server rejected the username or password."""


class TlsError(TransportError):
    """TLS could not be set up: handshake failure or certificate verification failure."""


class ConnectError(TransportError):
    """The server could not be reached: refused, unreachable, or did not answer in time."""


class ConnectionLimitError(ConnectError):
    """The server refused a new connection because the user has as many open as it
    allows (Dovecot: ``NO [LIMIT] Maximum number of connections from user+IP
    exceeded``, set by its ``mail_max_userip_connections``).

    ``limit`` is that maximum when the server said it, else None. Not a wrong
    password: the same login works once another connection of the user closes.
    """

    def __init__(
        self, message: str, *, limit: int | None = None, server: str | None = None
    ) -> None:
        super().__init__(message, server=server)
        self.limit = limit
