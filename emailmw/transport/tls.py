"""TLS pieces shared by the SMTP sender and the IMAP receiver."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

__all__ = ["client_context", "is_loopback"]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1).

    Credentials may go in plain text only to such a host (unless
    ``tls.allow-insecure`` says otherwise).
    """
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def client_context(ca_file: Path | None, verify: bool) -> ssl.SSLContext:
    """A client TLS context: trust ``ca_file`` (else the system's CAs), verify
    certificates and host names unless ``verify`` is False.

    Raises :class:`OSError` or :class:`ssl.SSLError` if ``ca_file`` cannot be
    loaded; callers translate that into their own error.
    """
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
