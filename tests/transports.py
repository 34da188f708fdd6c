"""One context per test on either transport, for the tests that run on both.

The ``transport`` fixture is parametrized: ``intraprocess`` (memory) and ``email`` (the
real Dovecot + Postfix of ``tests/mailstack.py``, marked ``mailstack``). It
yields a :class:`Transport`: the running context and how long a test should
wait for something to arrive over it. Use it in a test file with::

    from transports import Transport, transport_fixture  # noqa: F401  (the "transport" fixture)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

import emailmw
from emailmw.devserver import DevServer

__all__ = ["Transport", "transport_fixture"]


@dataclasses.dataclass
class Transport:
    """A running context and the time to allow for a delivery on it (seconds)."""

    ctx: emailmw.Context
    wait: float
    email: bool


@pytest.fixture(
    name="transport",
    params=[
        pytest.param("intraprocess", id="intraprocess"),
        pytest.param("email", id="email", marks=pytest.mark.mailstack),
    ],
)
def transport_fixture(request: pytest.FixtureRequest) -> Iterator[Transport]:
    """A running context on each transport in turn, shut down after the test."""
    if request.param == "intraprocess":
        with emailmw.Context(emailmw.Options(intraprocess=True)) as ctx:
            yield Transport(ctx, 5.0, email=False)
        return
    server: DevServer = request.getfixturevalue("dev_server")
    folder, address = server.new_mailbox("alice")
    config = server.config("alice", mailbox=folder, to=address)
    with emailmw.Context(emailmw.Options.from_dict(config)) as ctx:
        yield Transport(ctx, 20.0, email=True)
