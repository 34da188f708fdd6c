"""Shared fixtures: an intraprocess context per test, and (from tests/mailstack.py)
the real Dovecot + Postfix dev server for the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mailstack import dev_mailbox, dev_server  # noqa: F401  (fixtures)

import emailmw


@pytest.fixture(scope="session", autouse=True)
def _session_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The same for module- and session-scoped fixtures, which run before the
    per-test one below (a signing context on a mail server opens the state store
    for its replay memory)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("session-state")))
        yield


@pytest.fixture(autouse=True)
def _state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Durable subscriptions keep their state under a fresh $XDG_STATE_HOME, never in
    the home directory of whoever runs the tests."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def ctx() -> Iterator[emailmw.Context]:
    """A running intraprocess context, shut down after the test."""
    context = emailmw.Context(emailmw.Options(intraprocess=True))
    context.init()
    try:
        yield context
    finally:
        context.shutdown()


@pytest.fixture
def global_ctx() -> Iterator[emailmw.Context]:
    """The global context, initialized intraprocess for one test."""
    context = emailmw.init(emailmw.Options(intraprocess=True))
    try:
        yield context
    finally:
        emailmw.shutdown()
