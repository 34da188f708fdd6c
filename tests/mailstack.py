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
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

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
