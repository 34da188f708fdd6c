"""What each transport needs to know, as small typed settings objects.

The context builds them from :class:`~emailmw.Options` (which reads files and
the environment); the transports see only these: :class:`SmtpSettings` for the
SMTP sender, :class:`ImapSettings` for the IMAP receiver. Secrets are not
stored here but read through a callable (``password``) each time a login
needs them, so a rotated password file is picked up on the next reconnect.
With ``auth`` ``xoauth2`` or ``oauthbearer`` a login takes an OAuth2 access
token from ``token`` (a :class:`~emailmw.transport.oauth.TokenSource`) instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from emailmw.transport.data import EmailRecipients
from emailmw.transport.oauth import AuthMethod, TokenSource

__all__ = ["ImapSettings", "ServerAddress", "SmtpSettings", "TlsSettings", "parse_server_url"]

_DEFAULT_PORTS = {
    "imap": (143, "starttls"),
    "imaps": (993, "implicit"),
    "smtp": (587, "starttls"),
    "smtps": (465, "implicit"),
}


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """Where a server is and how to speak TLS to it.

    ``tls`` is ``"implicit"`` (TLS from the first byte) or ``"starttls"``
    (upgrade when the server offers it).
    """

    scheme: str
    host: str
    port: int
    tls: Literal["implicit", "starttls"]

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_server_url(url: str, protocol: Literal["imap", "smtp"]) -> ServerAddress:
    """Parse ``imap[s]://host[:port]``, ``smtp[s]://host[:port]`` or a bare host.

    A bare host (the reference format) means implicit TLS on 993 or 465.
    Raises :class:`ValueError` with a readable message.
    """
    text = url.strip()
    if not text:
        raise ValueError("empty server URL")
    if "://" not in text:
        text = f"{protocol}s://{text}"
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in (protocol, protocol + "s"):
        raise ValueError(f"scheme must be {protocol}:// or {protocol}s://, got {parts.scheme}://")
    if parts.username or parts.password:
        raise ValueError("put credentials in user.username/user.password, not in the URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"unexpected path or query in server URL {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in server URL {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in server URL {url!r}") from exc
    if port == 0:
        raise ValueError(f"port 0 in server URL {url!r}")
    default_port, tls = _DEFAULT_PORTS[scheme]
    return ServerAddress(scheme, host, port or default_port, tls)  # type: ignore[arg-type]


def _no_password() -> str | None:
    return None


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """How to verify servers: a CA file (else the system CAs), whether to verify at
    all, and whether a plain-text login to a host that is not loopback is allowed."""

    ca_file: Path | None = None
    verify: bool = True
    allow_insecure: bool = False


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    """What :class:`~emailmw.transport.smtp.SmtpEmailSender` needs.

    ``from_address``: the ``From`` of new emails (None: the username if it is an
    address). ``recipients``: To, Cc and Bcc of new emails. ``timeout``: each
    network step (s); ``send_timeout``: how long a send is retried (s).
    ``wire_format``: how emails are written (see :func:`~emailmw.transport.codec.encode_email`).
    ``auth``: ``password`` (AUTH PLAIN/LOGIN with ``password``), or ``xoauth2`` /
    ``oauthbearer`` with access tokens from ``token``.
    """

    server: ServerAddress
    username: str = ""
    password: Callable[[], str | None] = field(default=_no_password, repr=False)
    auth: AuthMethod = "password"
    token: TokenSource | None = field(default=None, repr=False)
    from_address: str | None = None
    recipients: EmailRecipients = field(default_factory=EmailRecipients)
    tls: TlsSettings = field(default_factory=TlsSettings)
    timeout: float = 10.0
    send_timeout: float = 30.0
    max_message_size: int = 25 * 1024 * 1024
    wire_format: Literal["emailmw", "rmw-email"] = "emailmw"


@dataclass(frozen=True, slots=True)
class ImapSettings:
    """What :class:`~emailmw.transport.imap.ImapEmailReceiver` needs.

    ``receive_mode``: ``auto``, ``idle`` or ``poll``; ``polling_period`` in
    seconds; ``timeout``: each network step (s). ``auth``: ``password`` (LOGIN
    with ``password``), or ``xoauth2`` / ``oauthbearer`` with access tokens
    from ``token``.
    """

    server: ServerAddress
    username: str = ""
    password: Callable[[], str | None] = field(default=_no_password, repr=False)
    auth: AuthMethod = "password"
    token: TokenSource | None = field(default=None, repr=False)
    mailbox: str = "INBOX"
    receive_mode: Literal["auto", "idle", "poll"] = "auto"
    polling_period: float = 0.1
    tls: TlsSettings = field(default_factory=TlsSettings)
    timeout: float = 10.0
    max_message_size: int = 25 * 1024 * 1024
