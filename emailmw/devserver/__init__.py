"""A real local mail stack (Dovecot + Postfix) for tests, benchmarks and development.

:class:`DevServer` starts, under one root directory (temporary by default):

* Dovecot: IMAP (plain, STARTTLS offered) and IMAPS (implicit TLS) on free
  loopback ports, LMTP on a unix socket, a passwd-file per account;
* Postfix: SMTP (STARTTLS offered, AUTH through Dovecot) and SMTPS (implicit
  TLS) on free loopback ports, delivering to Dovecot over LMTP;
* a test CA and a server certificate for ``localhost`` and ``127.0.0.1``
  (:attr:`DevServer.ca_file` is what clients should trust);
* with ``DevServer(auth="oauth2")``, OAuth2 logins too (``XOAUTH2``,
  ``OAUTHBEARER``): Dovecot validates JWTs the dev server mints
  (:meth:`DevServer.mint_token`, :meth:`DevServer.revoke_token`).

Mail for ``alice+orders@example.test`` lands in alice's folder ``orders``
(:meth:`DevServer.new_mailbox` makes such a folder per test).

:class:`Federation` runs one such server per mail domain, each on its own
loopback address (``127.0.0.2``, ``127.0.0.3``, ...), relaying to each other
through Postfix transport maps (no DNS) and queueing while one is down.

Needs Debian's ``dovecot-imapd``, ``dovecot-lmtpd``, ``postfix`` and ``openssl``
packages, and root (Postfix starts only as root); :func:`ensure_installed`
checks both. Several instances can run at once: each has its own ports,
instance name, ``base_dir``, queue and data directories, and every daemon is
driven through its own ``-c`` config, never the machine's default one.

Errors::

    RuntimeError
    └── DevServerError             start, stop or admin command failed (.log_tail)
        ├── MailStackMissingError  packages not installed, or not root
        └── PortInUseError         a daemon lost a free port to another process

An ``atexit`` hook stops every server a program leaves running.

Modules: :mod:`~emailmw.devserver.server` (:class:`DevServer`),
:mod:`~emailmw.devserver.federation` (:class:`Federation`),
:mod:`~emailmw.devserver.configs` (the daemons' config files),
:mod:`~emailmw.devserver.certs` (the test CA and server certificate),
:mod:`~emailmw.devserver.oauth2` (OAuth2 tokens and Dovecot's local validation),
:mod:`~emailmw.devserver.processes` (processes, ports and files),
:mod:`~emailmw.devserver.install` (:func:`ensure_installed`),
:mod:`~emailmw.devserver.errors`, :mod:`~emailmw.devserver.cli` (:func:`main`).
Standard library only: no other emailmw module.
"""

from __future__ import annotations

from emailmw.devserver.cli import main
from emailmw.devserver.errors import DevServerError, MailStackMissingError, PortInUseError
from emailmw.devserver.federation import Federation
from emailmw.devserver.install import INSTALL_HINT, ensure_installed
from emailmw.devserver.server import DevAccount, DevServer

__all__ = [
    "INSTALL_HINT",
    "DevAccount",
    "DevServer",
    "DevServerError",
    "Federation",
    "MailStackMissingError",
    "PortInUseError",
    "ensure_installed",
    "main",
]
