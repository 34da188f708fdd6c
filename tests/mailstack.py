"""The real local mail stack for integration tests.

``dev_server`` is a session-scoped fixture: one Dovecot + Postfix
(:class:`emailmw.devserver.DevServer`, accounts ``alice`` and ``bob``) for the
whole run. Tests keep apart by taking their own folder with
``dev_server.new_mailbox("alice")`` (or the ``dev_mailbox`` fixture).
Tests that restart or stop the server must start their own ``DevServer``.

Without the mail stack (packages not installed, or not root) these tests are
skipped with the install hint; with ``CI=true`` they fail instead, so that a
CI machine without the stack cannot go green by skipping them.

``tests/conftest.py`` makes the fixtures visible to every test file::

    from mailstack import dev_mailbox, dev_server  # noqa: F401

:func:`stored_emails` reads what the mail system stored in a folder, as the
raw bytes a receiver would get.
"""

from __future__ import annotations

import importlib.util
import os
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from imapclient import IMAPClient

from emailmw.devserver import DevServer, MailStackMissingError, ensure_installed


def on_ci() -> bool:
    """True when running on CI (``CI=true``, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def mailstack_problem() -> str | None:
    """Why the real mail stack cannot run here, or None if it can."""
    try:
        ensure_installed()
    except MailStackMissingError as exc:
        return str(exc)
    return None


def require_mailstack() -> None:
    """Skip the calling test (fail it on CI) unless Dovecot and Postfix can run here."""
    problem = mailstack_problem()
    if problem is None:
        return
    if on_ci():
        pytest.fail(f"CI=true but the mail stack cannot run: {problem}", pytrace=False)
    pytest.skip(problem)


@pytest.fixture(scope="session")
def dev_server() -> Iterator[DevServer]:
    """One running DevServer (accounts alice and bob) shared by the whole test session."""
    require_mailstack()
    with DevServer(accounts=("alice", "bob")) as server:
        yield server


@pytest.fixture
def dev_mailbox(dev_server: DevServer) -> tuple[str, str]:
    """A fresh folder of alice's: ``(folder, address)``; mail to ``address`` lands in it."""
    return dev_server.new_mailbox("alice")


def stored_emails(
    server: DevServer, folder: str, count: int, account: str = "alice", timeout: float = 30.0
) -> list[bytes]:
    """The raw bytes of every email in ``account``'s ``folder`` (UID order), once
    there are at least ``count``; fails if fewer arrive within ``timeout`` seconds."""
    acct = server.account(account)
    context = ssl.create_default_context(cafile=str(server.ca_file))
    with IMAPClient(server.host, server.imaps_port, ssl=True, ssl_context=context) as imap:
        imap.login(acct.address, acct.password)
        imap.select_folder(folder, readonly=True)
        deadline = time.monotonic() + timeout
        uids: list[int] = []
        while time.monotonic() < deadline:
            imap.noop()  # let Dovecot sync the mailbox view (SEARCH alone may not for seconds)
            uids = sorted(imap.search("ALL"))
            if len(uids) >= count:
                break
            time.sleep(0.05)  # waiting on other processes: Postfix and Dovecot deliver
        assert len(uids) >= count, f"only {len(uids)} of {count} emails arrived in {folder}"
        raw: list[bytes] = []
        for start in range(0, len(uids), 100):
            chunk = uids[start : start + 100]
            response = imap.fetch(chunk, ["BODY.PEEK[]"])
            raw.extend(response[uid][b"BODY[]"] for uid in chunk)
        return raw


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (its harness is shared with the tests)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"emailmw_benchmark_{name}", path)
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return module
