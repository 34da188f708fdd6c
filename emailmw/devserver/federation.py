"""Several mail domains on one machine, relaying to each other: :class:`Federation`.

One :class:`~emailmw.devserver.DevServer` (Postfix + Dovecot) per domain, each
on its own loopback address (``127.0.0.2``, ``127.0.0.3``, ...: Linux routes
all of 127.0.0.0/8 to ``lo``, so no setup is needed). Each domain's Postfix
sends mail for the other domains to their Postfix over SMTP, routed by a
transport map as MX records would route it (no DNS), with opportunistic
STARTTLS between them, and queues it while the other side is down: retried
every 1-2 s (``queue_run_delay``, ``minimal_backoff_time``,
``maximal_backoff_time``), so store-and-forward tests finish quickly.

Measured here (2 cores, shared): a federation of three domains starts in
0.6-0.9 s and stops in 0.2-0.3 s; ``stop_smtp`` 0.03 s, ``start_smtp``
0.06 s; 50 emails queued for a domain whose SMTP was down all reached its
mailbox 0.9 s after ``start_smtp`` (in another order than they were sent:
Postfix delivers a queue with parallel connections).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pathlib
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from emailmw.devserver.errors import DevServerError
from emailmw.devserver.server import DevAccount, DevServer

__all__ = ["Federation"]

logger = logging.getLogger(__name__)

# Postfix's queues that hold mail not yet delivered (maildrop: not yet picked up)
_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class Federation:
    """A Postfix + Dovecot per mail domain, each on its own loopback address,
    relaying to each other.

    ::

        with Federation(domains=("a.test", "b.test"), accounts=("alice", "bob")) as fed:
            folder, address = fed.new_mailbox("bob", "b.test")
            subscriber = fed.config("bob", "b.test", mailbox=folder)
            publisher = fed.config("alice", "a.test", to=[address])  # a.test relays it
            fed.stop_smtp("b.test")   # a.test queues what it is given meanwhile
            fed.start_smtp("b.test")  # ... and delivers it within seconds

    Every domain has the same ``accounts``; the ``n``-th domain listens on
    ``first_host`` + ``n``. ``root=None`` gives each server a temporary root
    (removed by :meth:`stop`); a given ``root`` holds one directory per domain,
    kept. Each server has its own test CA: a config of :meth:`config` trusts
    its own domain's. Requires root (see :func:`~emailmw.devserver.ensure_installed`).
    """

    def __init__(
        self,
        domains: Sequence[str] = ("a.test", "b.test", "c.test"),
        accounts: Sequence[str] = ("alice", "bob"),
        *,
        root: str | os.PathLike[str] | None = None,
        first_host: str = "127.0.0.2",
    ) -> None:
        if isinstance(domains, str):
            raise TypeError(f"domains must be a sequence of domain names, not the str {domains!r}")
        names = [d.lower() for d in domains]
        if not names:
            raise ValueError("a federation needs at least one domain")
        duplicates = sorted({d for d in names if names.count(d) > 1})
        if duplicates:
            raise ValueError(f"domains named more than once: {', '.join(duplicates)}")
        try:
            first = ipaddress.IPv4Address(first_host)
        except ValueError:
            raise ValueError(f"invalid first_host {first_host!r}: want an IPv4 address") from None
        hosts = [first + i for i in range(len(names))]
        if not all(h.is_loopback for h in hosts):
            raise ValueError(
                f"{len(names)} domains from {first_host} leave 127.0.0.0/8: "
                "every server must listen on a loopback address"
            )
        base = None if root is None else pathlib.Path(root).resolve()
        self._servers: dict[str, DevServer] = {}
        for name, host in zip(names, hosts, strict=True):
            server_root = None if base is None else base / name
            self._servers[name] = DevServer(
                root=server_root, accounts=accounts, domain=name, host=str(host)
            )

    def __repr__(self) -> str:
        hosts = " ".join(f"{d}={s.host}" for d, s in self._servers.items())
        return f"<Federation {hosts}>"

    # -------------------------------------------------------------- lifecycle

    def __enter__(self) -> Federation:
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
        """Start every domain's server and route each domain's mail to the others.

        Returns once every port listens and every Postfix has its transport
        map. On failure stops what it started and raises
        :class:`~emailmw.devserver.DevServerError` (or
        :class:`~emailmw.devserver.MailStackMissingError`).
        """
        started = time.monotonic()
        try:
            for server in self._servers.values():
                server.start(timeout)  # chooses its ports
            # The routes name the other servers' ports, known only now: set them
            # with Postfix stopped, so that no email is routed by an older map.
            for server in self._servers.values():
                server.stop_postfix()
                for other in self._servers.values():
                    if other is not server:
                        server.relay(other.domain, other.host, other.smtp_port)
                server.start_postfix(timeout)
        except BaseException:
            self.stop()
            raise
        logger.info("%r up in %.3f s", self, time.monotonic() - started)

    def stop(self) -> None:
        """Stop every server (idempotent); raises the first error after trying all."""
        errors: list[DevServerError] = []
        for server in self._servers.values():
            try:
                server.stop()
            except DevServerError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    @property
    def running(self) -> bool:
        """True while every domain's Postfix and Dovecot run."""
        return all(s.running for s in self._servers.values())

    # -------------------------------------------------------------- lookup

    @property
    def domains(self) -> list[str]:
        """The domains, in the order given."""
        return list(self._servers)

    def server(self, domain: str) -> DevServer:
        """The :class:`~emailmw.devserver.DevServer` of ``domain``; KeyError if unknown."""
        try:
            return self._servers[domain.lower()]
        except KeyError:
            raise KeyError(
                f"no domain {domain!r} in this federation (have: {', '.join(self._servers)})"
            ) from None

    def host(self, domain: str) -> str:
        """The loopback address the servers of ``domain`` listen on."""
        return self.server(domain).host

    def account(self, account: str, domain: str) -> DevAccount:
        """The account ``account`` (local part) of ``domain``."""
        return self.server(domain).account(account)

    def new_mailbox(self, account: str, domain: str, prefix: str = "t") -> tuple[str, str]:
        """A fresh folder of ``account`` at ``domain``: ``(folder, address)``
        (see :meth:`DevServer.new_mailbox <emailmw.devserver.DevServer.new_mailbox>`)."""
        return self.server(domain).new_mailbox(account, prefix)

    # -------------------------------------------------------------- emailmw config

    def config(
        self,
        account: str,
        domain: str,
        *,
        mailbox: str = "INBOX",
        to: str | Sequence[str] | None = None,
        tls: str = "starttls",
        receive_mode: str = "auto",
        polling_period_ns: int = 10_000_000,
        **overrides: Any,
    ) -> dict[str, Any]:
        """The emailmw config (``email.yml`` content) of ``account`` at ``domain``.

        It sends through and reads from that domain's servers only; mail to the
        other domains goes through its Postfix's relay. ``to`` is one address
        or a list (the recipients list; default: the account's own address, or
        its folder's). ``mailbox``, ``tls``, ``receive_mode`` and
        ``polling_period_ns`` are as in
        :meth:`DevServer.config <emailmw.devserver.DevServer.config>`; every
        other keyword sets that key of the ``email:`` section, ``_`` written
        as ``-`` (``reorder_window=10`` sets ``reorder-window``; a dict is
        merged into a dict already there).
        """
        config = self.server(domain).config(
            account,
            mailbox=mailbox,
            tls=tls,
            receive_mode=receive_mode,
            polling_period_ns=polling_period_ns,
        )
        section: dict[str, Any] = config["email"]
        if to is not None:
            section["recipients"] = {"to": [to] if isinstance(to, str) else list(to)}
        for name, value in overrides.items():
            key = name.replace("_", "-")
            if isinstance(value, dict) and isinstance(section.get(key), dict):
                section[key] = {**section[key], **value}
            else:
                section[key] = value
        return config

    def write_config(
        self,
        account: str,
        domain: str,
        path: str | os.PathLike[str] | None = None,
        **kw: Any,
    ) -> pathlib.Path:
        """Write :meth:`config` (``**kw`` passed on) as YAML; default path
        ``ROOT/<account>.yml`` under that domain's server root."""
        import yaml

        server = self.server(domain)
        target = pathlib.Path(path) if path is not None else server.root / f"{account}.yml"
        target.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(self.config(account, domain, **kw), sort_keys=False)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o600)  # it holds a password
        tmp.replace(target)
        return target

    # -------------------------------------------------------------- outages

    def stop_smtp(self, domain: str) -> None:
        """Stop ``domain``'s Postfix: it neither accepts mail (from its clients
        or the other domains) nor sends any; the others queue what is for it.
        Its queue stays on disk. Dovecot (IMAP) keeps running."""
        self.server(domain).stop_postfix()

    def start_smtp(self, domain: str, timeout: float = 15.0) -> None:
        """Start ``domain``'s Postfix again after :meth:`stop_smtp` (same ports).

        The other domains deliver what they queued for it at their next retry
        (within about 2 s); its own queue goes out at once.
        """
        self.server(domain).start_postfix(timeout)

    def smtp_running(self, domain: str) -> bool:
        """Whether ``domain``'s Postfix runs."""
        return self.server(domain).postfix_running

    def queued(self, domain: str) -> int:
        """How many emails ``domain``'s Postfix holds undelivered (in any queue:
        waiting for a retry, being delivered, or just received)."""
        spool = self.server(domain).root / "postfix-spool"
        return sum(len(files) for queue in _QUEUES for _, _, files in os.walk(spool / queue))

    def log_tail(self, n: int = 50) -> str:
        """The last ``n`` lines of every domain's Dovecot and Postfix logs."""
        return "\n".join(f"#### {d}\n{s.log_tail(n)}" for d, s in self._servers.items())
