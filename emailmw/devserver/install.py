"""What the local mail stack needs on this machine: Debian's Dovecot and Postfix
packages, ``openssl``, and root; :func:`ensure_installed` checks it all."""

from __future__ import annotations

import os
import shutil

from emailmw.devserver.errors import MailStackMissingError

__all__ = [
    "DOVEADM",
    "DOVECOT",
    "DOVECOT_DH",
    "DOVECOT_LMTP",
    "INSTALL_HINT",
    "POSTFIX",
    "POSTFIX_DAEMONS",
    "ensure_installed",
]

INSTALL_HINT = (
    "apt-get update && DEBIAN_FRONTEND=noninteractive "
    "apt-get install -y dovecot-imapd dovecot-lmtpd postfix openssl"
)

DOVECOT = "/usr/sbin/dovecot"
DOVEADM = "/usr/bin/doveadm"
DOVECOT_LMTP = "/usr/lib/dovecot/lmtp"
DOVECOT_DH = "/usr/share/dovecot/dh.pem"
POSTFIX = "/usr/sbin/postfix"
POSTFIX_DAEMONS = "/usr/lib/postfix/sbin"


def ensure_installed() -> None:
    """Raise :class:`MailStackMissingError` unless Dovecot and Postfix can run here."""
    binaries = (DOVECOT, DOVEADM, DOVECOT_LMTP, POSTFIX, f"{POSTFIX_DAEMONS}/master")
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
