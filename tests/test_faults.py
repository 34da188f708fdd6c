"""Faults the SMTP/IMAP transport must survive, over a real Dovecot + Postfix.

Every test here stops, restarts or silences a server, so each starts a
:class:`DevServer` of its own (never the session one). The stream tests use the
harness of ``benchmarks/faults.py`` (the benchmark prints the same runs as a
table): a publisher thread publishes a numbered stream, a fault is injected half
way, and a subscriber in another context collects. Afterwards:

* every message whose ``publish()`` returned was delivered exactly once;
* a message whose ``publish()`` raised arrived at most once;
* every ``publish()`` call returned or raised, within ``send-timeout`` plus one
  ``timeout`` (no hang).
"""

from __future__ import annotations

import collections
import glob
import importlib.util
import os
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from imapclient import IMAPClient
from mailstack import require_mailstack

import emailmw
from emailmw.devserver import DevServer
from emailmw.transport import imap as imap_module

pytestmark = [pytest.mark.timeout(180), pytest.mark.mailstack, pytest.mark.slow]


def _load_faults() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "faults.py"
    spec = importlib.util.spec_from_file_location("emailmw_benchmark_faults", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


faults = _load_faults()

#: the longest a publish() may take: send-timeout, one more network timeout, slack
PUBLISH_BOUND = faults.SEND_TIMEOUT + faults.TIMEOUT + 2.0


@pytest.fixture
def own_server() -> Iterator[DevServer]:
    """A DevServer of this test's own: it may be stopped, restarted, silenced."""
    require_mailstack()
    with DevServer(accounts=("alice",)) as server:
        yield server


def assert_exactly_once(report: Any) -> None:
    """The promise, checked on a :class:`StreamReport`."""
    assert report.publisher_finished, f"{report.fault}: a publish() call hung"
    assert report.sent + len(report.publish_errors) == report.messages, report
    assert report.lost == [], (
        f"{report.fault}: published but never delivered: {report.lost} "
        f"(their UIDs in the mailbox: {report.lost_in_mailbox})"
    )
    assert report.duplicated == 0, f"{report.fault}: {report.duplicated} duplicates delivered"
    assert report.unexpected == [], report.unexpected
    assert report.delivered >= report.sent


def connected_context(config: dict[str, Any]) -> emailmw.Context:
    return emailmw.Context(emailmw.Options.from_dict(config)).init()


def collect(sub: emailmw.Subscription, wanted: set[str], timeout: float) -> list[str]:
    """Every message the subscription gets until all of ``wanted`` came (or ``timeout``),
    then for another 0.5 s (to see a late duplicate)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while not wanted <= set(got) and time.monotonic() < deadline:
        try:
            got.append(emailmw.wait_for_message(sub, deadline - time.monotonic()))
        except emailmw.WaitTimeoutError:
            break
    quiet_until = time.monotonic() + 0.5
    while (left := quiet_until - time.monotonic()) > 0:
        try:
            got.append(emailmw.wait_for_message(sub, left))
        except emailmw.WaitTimeoutError:
            break
    return got


def duplicates(got: list[str]) -> list[str]:
    return sorted(m for m, n in collections.Counter(got).items() if n > 1)


# ---------------------------------------------------------------------- a 1000-message stream


@pytest.mark.parametrize("fault", ["dovecot-restart", "postfix-restart", "kick"])
def test_a_stream_survives_the_fault_exactly_once(fault: str) -> None:
    require_mailstack()
    report = faults.run_fault(fault, messages=1000)
    assert_exactly_once(report)
    # a restart or a kick is no reason to give up: every publish() succeeded
    assert report.publish_errors == {}
    assert report.delivered == 1000
    assert report.max_publish < PUBLISH_BOUND
    if fault in ("dovecot-restart", "kick"):
        assert report.subscriber_stats["reconnects"] >= 1
    else:
        assert report.publisher_stats["reconnects"] >= 1


@pytest.mark.parametrize("mode", ["idle", "poll"])
def test_kick_in_the_other_receive_modes(own_server: DevServer, mode: str) -> None:
    folder, address = own_server.new_mailbox("alice")
    direct = faults.stream_config(own_server, folder, address)
    subscriber = faults.stream_config(own_server, folder, address, overrides={"receive-mode": mode})
    report = faults.run_stream(
        lambda: own_server.kick("alice"),
        name=f"kick-{mode}",
        publisher_config=direct,
        subscriber_config=subscriber,
        messages=300,
        mailbox=(own_server, folder),
    )
    assert_exactly_once(report)
    assert report.publish_errors == {}
    assert report.subscriber_stats["reconnects"] >= 1


def test_postfix_down_longer_than_send_timeout_raises_and_loses_nothing() -> None:
    require_mailstack()
    report = faults.run_fault("postfix-down", messages=300)
    assert_exactly_once(report)
    assert report.publish_errors, "Postfix was down longer than send-timeout: some must raise"
    for error in report.publish_errors.values():
        assert error.startswith("SmtpError: "), error
        # the cause, with the server: refused while Postfix is down; an attempt that
        # connected while Postfix was stopping times out instead ("no answer")
        assert "127.0.0.1:" in error, error
        assert "refused" in error or "no answer within" in error, error
    assert any("refused" in error for error in report.publish_errors.values())
    # each failed publish() gave up after send-timeout, not later
    assert report.max_publish < faults.DOWN_SEND_TIMEOUT + faults.TIMEOUT + 2.0
    assert report.errored_but_delivered <= len(report.publish_errors)


def test_smtp_silent_for_a_while_delays_publish_but_loses_nothing() -> None:
    require_mailstack()
    report = faults.run_fault("smtp-silent", messages=300)
    assert_exactly_once(report)
    assert report.publish_errors == {}  # the silence was shorter than send-timeout
    assert report.max_publish < PUBLISH_BOUND
    assert report.publisher_stats["send_retries"] >= 1


def test_imap_silent_for_a_while_is_noticed_and_loses_nothing() -> None:
    require_mailstack()
    report = faults.run_fault("imap-silent", messages=300)
    assert_exactly_once(report)
    assert report.publish_errors == {}
    # messages published during the silence waited for it to end (the fault bit) ...
    assert report.recovery is not None
    assert report.recovery > 0.8 * faults.SILENCE
    # ... and came soon after: a command that got no answer timed out and the
    # receiver reconnected, or (in IDLE) the frozen connection simply went on
    assert report.recovery < faults.SILENCE + faults.TIMEOUT + 5.0


# ----------------------------------------------------------------------------- silent servers


@pytest.mark.parametrize("which", ["smtp", "imap"])
def test_init_against_a_server_that_never_answers_raises_connect_error(
    own_server: DevServer, which: str
) -> None:
    folder, address = own_server.new_mailbox("alice")
    with faults.SilentServer() as silent:
        url = f"{which}://127.0.0.1:{silent.port}"
        config = faults.stream_config(
            own_server,
            folder,
            address,
            smtp_url=url if which == "smtp" else None,
            imap_url=url if which == "imap" else None,
            overrides={"timeout": 1.0},
        )
        context = emailmw.Context(emailmw.Options.from_dict(config))
        started = time.monotonic()
        with pytest.raises(emailmw.ConnectError) as info:
            context.init()
        elapsed = time.monotonic() - started
        assert silent.connections >= 1
    assert 0.9 < elapsed < 3.0
    assert f"127.0.0.1:{silent.port}" in str(info.value)
    assert info.value.server is not None and str(silent.port) in info.value.server
    assert context.state is not emailmw.ContextState.RUNNING


def test_publish_to_a_server_gone_silent_for_good_raises_within_send_timeout(
    own_server: DevServer,
) -> None:
    folder, address = own_server.new_mailbox("alice")
    with faults.TcpProxy(own_server.smtp_port) as proxy:
        pub_config = faults.stream_config(
            own_server,
            folder,
            address,
            smtp_url=f"smtp://127.0.0.1:{proxy.port}",
            overrides={"timeout": 0.5, "send-timeout": 2.0},
        )
        sub_ctx = connected_context(faults.stream_config(own_server, folder, address))
        pub_ctx = connected_context(pub_config)
        try:
            sub = emailmw.Subscription("/silent", context=sub_ctx)
            pub = emailmw.Publisher("/silent", context=pub_ctx)
            for i in range(5):
                pub.publish(f"before {i}")
            proxy.freeze()  # the server hangs mid-session and greets no one any more
            started = time.monotonic()
            with pytest.raises(emailmw.SmtpError) as info:
                pub.publish("during")
            elapsed = time.monotonic() - started
            proxy.resume()
            pub.publish("after")
            before = {f"before {i}" for i in range(5)}
            got = collect(sub, before | {"after"}, timeout=30)
            stats = pub_ctx.stats()
        finally:
            pub_ctx.shutdown()
            sub_ctx.shutdown()
    assert 1.9 < elapsed < 2.0 + 0.5 + 1.5  # send-timeout, at most one more timeout
    message = str(info.value)
    assert f"127.0.0.1:{proxy.port}" in message and "no answer within 0.5 s" in message
    assert info.value.server == f"127.0.0.1:{proxy.port}"
    assert stats.send_retries >= 1 and stats.send_failures == 1
    assert duplicates(got) == []
    assert before | {"after"} <= set(got)
    assert set(got) <= before | {"after", "during"}  # "during" may or may not have arrived


def test_half_open_imap_connection_in_idle_is_detected_at_the_idle_rearm(
    own_server: DevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that vanished without a FIN: the IDLE connection stays silent.

    Only the IDLE re-arm (``DONE`` must be answered within ``timeout``) can find
    that out; with the default ``IDLE_REARM`` of 300 s that takes 5 minutes, so
    this test shortens it to show the mechanism recovers, losing nothing.
    """
    monkeypatch.setattr(imap_module, "IDLE_REARM", 2.0)
    folder, address = own_server.new_mailbox("alice")
    with faults.TcpProxy(own_server.imap_port) as proxy:
        sub_config = faults.stream_config(
            own_server,
            folder,
            address,
            imap_url=f"imap://127.0.0.1:{proxy.port}",
            overrides={"timeout": 1.0, "receive-mode": "idle"},
        )
        sub_ctx = connected_context(sub_config)
        pub_ctx = connected_context(faults.stream_config(own_server, folder, address))
        try:
            sub = emailmw.Subscription("/half-open", context=sub_ctx)
            pub = emailmw.Publisher("/half-open", context=pub_ctx)
            pub.publish("first")
            assert emailmw.wait_for_message(sub, 10) == "first"
            proxy.blackhole()
            started = time.monotonic()
            pub.publish("second")
            got = collect(sub, {"second"}, timeout=20)
            elapsed = time.monotonic() - started
            stats = sub_ctx.stats()
        finally:
            pub_ctx.shutdown()
            sub_ctx.shutdown()
    assert got == ["second"]
    assert stats.reconnects >= 1
    assert elapsed < 2.0 + 1.0 + 3.0  # re-arm, the DONE timeout, a reconnect


# ----------------------------------------------------------------------------- UIDVALIDITY


def _folder_dir(server: DevServer, folder: str) -> str:
    return f"{server.root}/mail/{server.domain}/alice/Maildir/.{folder}"


def test_uidvalidity_change_with_the_same_emails_delivers_none_twice(
    own_server: DevServer,
) -> None:
    """The folder's index is rebuilt while Dovecot is down (as after a restore or
    a migration): a new UIDVALIDITY, the same emails under new UIDs. Nothing
    delivered before comes again, nothing published meanwhile is lost."""
    folder, address = own_server.new_mailbox("alice")
    config = faults.stream_config(own_server, folder, address, overrides={"timeout": 1.0})
    with emailmw.Context(emailmw.Options.from_dict(config)) as ctx:
        sub = emailmw.Subscription("/uidvalidity", context=ctx)
        pub = emailmw.Publisher("/uidvalidity", context=ctx)
        first = {f"first {i}" for i in range(20)}
        for message in sorted(first):
            pub.publish(message)
        got = collect(sub, first, timeout=20)
        assert sorted(got) == sorted(first)
        own_server.stop_dovecot()
        index_files = glob.glob(f"{_folder_dir(own_server, folder)}/dovecot*")
        assert any(f.endswith("dovecot-uidlist") for f in index_files)
        for path in index_files:
            os.unlink(path)
        meanwhile = {f"meanwhile {i}" for i in range(5)}
        for message in sorted(meanwhile):
            pub.publish(message)  # accepted by Postfix, delivered once Dovecot is back
        own_server.start_dovecot()
        after = {f"after {i}" for i in range(20)}
        for message in sorted(after):
            pub.publish(message)
        got = collect(sub, meanwhile | after, timeout=30)
        stats = ctx.stats()
    assert duplicates(got) == []
    assert sorted(got) == sorted(meanwhile | after)
    assert stats.reconnects >= 1
    # the first 20, met again under new UIDs, skipped on their headers
    assert stats.dropped["resync_skipped"] == 20
    assert stats.dropped["duplicate"] == 0


def test_folder_deleted_and_recreated_while_receiving_loses_nothing(
    own_server: DevServer,
) -> None:
    """The folder is deleted under the receiver and recreated by the next delivery:
    a new UIDVALIDITY and UIDs from 1 again. The receiver must not resume at its
    old next UID (that would skip the new folder's first emails)."""
    folder, address = own_server.new_mailbox("alice")
    config = faults.stream_config(own_server, folder, address, overrides={"timeout": 1.0})
    account = own_server.account("alice")
    with emailmw.Context(emailmw.Options.from_dict(config)) as ctx:
        sub = emailmw.Subscription("/recreated", context=ctx)
        pub = emailmw.Publisher("/recreated", context=ctx)
        first = {f"first {i}" for i in range(20)}
        for message in sorted(first):
            pub.publish(message)
        assert sorted(collect(sub, first, timeout=20)) == sorted(first)
        with IMAPClient(own_server.host, own_server.imap_port, ssl=False) as imap:
            imap.starttls(ssl.create_default_context(cafile=str(own_server.ca_file)))
            imap.login(account.address, account.password)
            imap.delete_folder(folder)
        then = {f"then {i}" for i in range(20)}
        for message in sorted(then):
            pub.publish(message)  # Dovecot's LMTP creates the folder again
        got = collect(sub, then, timeout=30)
        stats = ctx.stats()
    assert duplicates(got) == []
    assert sorted(got) == sorted(then)
    assert stats.reconnects >= 1
