"""The replay memory of signed traffic survives a restart, in the state store.

A context that verifies signatures on a mail server keeps its replay memory in
the state store's replay slot for its account and mailbox (docs/security.md,
"What survives a restart"): a signed email it accepted is refused as a replay
by the next context on the same state-dir. One context at a time holds a slot;
another one reading the same mailbox at the same time remembers in memory only
(and says so), so both accept every genuine email.

The first half drives :class:`AdmissionPolicy` and :class:`StateStore`
directly (an intraprocess context keeps nothing: its mailbox dies with it); the
second half restarts real contexts against the dev server's Dovecot + Postfix.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mailstack import stored_emails

from emailmw import (
    Context,
    DropReason,
    Options,
    Publisher,
    StateStoreError,
    Subscription,
    wait_for_message,
)
from emailmw.devserver import DevServer
from emailmw.info import HEADER_PUBLISHER_GID, HEADER_SOURCE_TIMESTAMP
from emailmw.security import MAX_CLOCK_SKEW, REPLAY_FLUSH_INTERVAL, AdmissionPolicy, sign_email
from emailmw.state_store import StateStore
from emailmw.transport.codec import encode_email, new_message_id
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients

pytestmark = [pytest.mark.timeout(60)]

KEY = b"replay store test key, long enough"
SLOT = "imap://alice%40example.test@127.0.0.1:143/INBOX"


def signed(body: str = "hello", *, at: float | None = None, key: bytes = KEY) -> EmailData:
    """A signed message on ``/replay``, stamped ``at`` (seconds since the epoch, default now)."""
    headers = EmailHeaders()
    stamp = time.time_ns() if at is None else int(at * 1e9)
    headers[HEADER_SOURCE_TIMESTAMP] = str(stamp)
    headers[HEADER_PUBLISHER_GID] = "7"
    email = EmailData(
        content=EmailContent("/replay", body),
        headers=headers,
        message_id=new_message_id("example.test"),
        from_="alice@example.test",
        recipients=EmailRecipients(to=["alice@example.test"]),
    )
    sign_email(email, key)
    return email


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """For the state file, which no emailmw wait covers: checks every 20 ms."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def stored_digests(directory: Path) -> int:
    """How many replay digests the state file in ``directory`` holds (own connection)."""
    db = sqlite3.connect(directory / "state.sqlite3")
    try:
        rows = db.execute("SELECT digests FROM replay_digests").fetchall()
    finally:
        db.close()
    return sum(len(blob) // 8 for (blob,) in rows)


def open_policy(directory: Path, **kw: Any) -> tuple[StateStore, AdmissionPolicy]:
    """A store in ``directory`` and a policy whose replay memory is kept in its slot."""
    store = StateStore(directory)
    slot = store.claim_replay(SLOT)
    assert slot is not None
    return store, AdmissionPolicy(KEY, journal=slot, **kw)


def close(store: StateStore, policy: AdmissionPolicy) -> None:
    policy.close()
    store.close()


class Clock:
    """Wall-clock seconds that move only when told."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


# ============================================================ the policy and the store


def test_an_accepted_email_is_a_replay_after_a_restart(tmp_path: Path) -> None:
    email, other = signed("accepted"), signed("never seen")
    store, policy = open_policy(tmp_path)
    assert policy.persistent
    assert policy.check(email) is None
    close(store, policy)

    store, policy = open_policy(tmp_path)
    try:
        assert policy.remembered == 1
        assert policy.check(email) is DropReason.REPLAY
        assert policy.check(other) is None  # a fresh email still passes
    finally:
        close(store, policy)
    # without the slot (a memory of its own), the same email would pass: the drop
    # above is the slot's doing
    assert AdmissionPolicy(KEY).check(email) is None


def test_digests_are_written_within_the_flush_interval_without_a_shutdown(
    tmp_path: Path,
) -> None:
    store, policy = open_policy(tmp_path)
    try:
        for index in range(5):
            assert policy.check(signed(f"m{index}")) is None
        started = time.monotonic()
        wait_until(lambda: stored_digests(tmp_path) == 5, timeout=10 * REPLAY_FLUSH_INTERVAL)
        assert time.monotonic() - started < 10 * REPLAY_FLUSH_INTERVAL
        assert policy.check(signed("m5")) is None
        wait_until(lambda: stored_digests(tmp_path) == 6, timeout=10 * REPLAY_FLUSH_INTERVAL)
    finally:
        close(store, policy)
    assert stored_digests(tmp_path) == 6  # nothing written twice at shutdown


def test_a_killed_process_leaves_its_written_digests_and_frees_the_slot(tmp_path: Path) -> None:
    """kill -9 after the digest was written: the next process takes the slot (the OS
    freed the lock) and refuses the email."""
    email = signed("accepted before the crash")
    raw = encode_email(email)
    child = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from emailmw.security import AdmissionPolicy
        from emailmw.state_store import StateStore
        from emailmw.transport.codec import decode_email
        store = StateStore(Path({str(tmp_path)!r}))
        slot = store.claim_replay({SLOT!r})
        policy = AdmissionPolicy({KEY!r}, journal=slot)
        assert policy.check(decode_email(sys.stdin.buffer.read())) is None
        print("accepted", flush=True)
        time.sleep(600)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as process:
        try:
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(raw)
            process.stdin.close()
            assert process.stdout.readline() == b"accepted\n"
            wait_until(lambda: stored_digests(tmp_path) == 1)
            busy = StateStore(tmp_path)
            assert busy.claim_replay(SLOT) is None  # the child holds it
            busy.close()
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
    store, policy = open_policy(tmp_path)
    try:
        assert policy.check(email) is DropReason.REPLAY
    finally:
        close(store, policy)


def test_a_second_claim_of_a_slot_falls_back_to_memory_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    email = signed("genuine")
    first_store, first = open_policy(tmp_path)
    second_store = StateStore(tmp_path)
    try:
        with caplog.at_level(logging.INFO, logger="emailmw.state_store"):
            assert second_store.claim_replay(SLOT) is None
        assert any(
            "in use by another context in this process" in r.getMessage()
            and "in memory only" in r.getMessage()
            for r in caplog.records
        )
        second = AdmissionPolicy(KEY)
        assert not second.persistent
        # both accept the genuine email once
        assert first.check(email) is None
        assert second.check(email) is None
        assert first.check(email) is DropReason.REPLAY
        assert second.check(email) is DropReason.REPLAY
        # another key is another slot
        other = second_store.claim_replay(SLOT + "/other")
        assert other is not None
        other.release()
    finally:
        second_store.close()
        close(first_store, first)
    # released at close: the next claim gets the slot
    store, policy = open_policy(tmp_path)
    close(store, policy)


def test_expired_digests_are_not_loaded_and_are_deleted(tmp_path: Path) -> None:
    clock = Clock()
    max_age = 60.0
    email = signed("old", at=clock.now)
    store, policy = open_policy(tmp_path, max_age=max_age, clock=clock)
    assert policy.check(email) is None
    close(store, policy)
    assert stored_digests(tmp_path) == 1

    retention = max_age + MAX_CLOCK_SKEW
    # well inside the retention: loaded
    clock.now += retention / 2
    store, policy = open_policy(tmp_path, max_age=max_age, clock=clock)
    assert policy.remembered == 1
    close(store, policy)
    # its slice is over (accepted + retention + the slice's width at most): not loaded
    clock.now += retention / 2 + max(retention / 16, 1.0) + 1.0
    store, policy = open_policy(tmp_path, max_age=max_age, clock=clock)
    try:
        assert policy.remembered == 0
        assert stored_digests(tmp_path) == 0
    finally:
        close(store, policy)


def test_loaded_digests_stay_compact_sorted_arrays(tmp_path: Path) -> None:
    """100 000 digests written in one batch load as sorted arrays no bigger than the
    hot set (capacity / 16), each one found."""
    capacity = 160_000
    store = StateStore(tmp_path)
    slot = store.claim_replay(SLOT)
    assert slot is not None
    digests = array("Q", (int.from_bytes(os.urandom(8), "big") for _ in range(100_000)))
    slot.write([(time.time() + 3600.0, digests)], time.time())
    policy = AdmissionPolicy(KEY, journal=slot, capacity=capacity)
    try:
        memory = policy._memory
        assert len(memory) == 100_000
        assert memory.slices == 10
        for _, piece in memory._frozen:
            assert len(piece) <= capacity // 16
            assert piece.typecode == "Q"
            assert all(a <= b for a, b in itertools.pairwise(piece))
        assert all(digest in memory for digest in digests[::97])
    finally:
        close(store, policy)


def test_a_write_failure_is_logged_and_the_memory_keeps_admitting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, policy = open_policy(tmp_path)
    store.close()  # every write now fails
    email = signed("accepted while the store is gone")
    with caplog.at_level(logging.WARNING, logger="emailmw.security"):
        assert policy.check(email) is None
        wait_until(
            lambda: any("cannot write the replay memory" in r.getMessage() for r in caplog.records)
        )
        assert policy.check(email) is DropReason.REPLAY  # still remembered in memory
        policy.close()
    assert any(
        r.levelno == logging.ERROR and "forgotten when this process stops" in r.getMessage()
        for r in caplog.records
    )


def test_a_damaged_batch_is_a_state_store_error_naming_the_file(tmp_path: Path) -> None:
    store, policy = open_policy(tmp_path)
    close(store, policy)
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    db.execute(
        "INSERT INTO replay_digests (key, expires, digests) VALUES (?, ?, ?)",
        (SLOT, time.time() + 3600.0, b"1234567"),
    )
    db.commit()
    db.close()
    store = StateStore(tmp_path)
    slot = store.claim_replay(SLOT)
    assert slot is not None
    with pytest.raises(StateStoreError, match=r"state\.sqlite3 is damaged"):
        AdmissionPolicy(KEY, journal=slot)
    assert store.claim_replay(SLOT) is not None  # the failed policy released the slot
    store.close()


def test_a_version_1_state_store_is_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    db.executescript(
        """
        CREATE TABLE durable (name TEXT PRIMARY KEY, topic TEXT NOT NULL,
            uidvalidity INTEGER, position INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE handled (seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
            message_id TEXT NOT NULL);
        CREATE INDEX handled_by_name ON handled (name, seq);
        INSERT INTO durable VALUES ('orders', '/orders', 7, 42);
        INSERT INTO handled (name, message_id) VALUES ('orders', '<1@example.test>');
        PRAGMA user_version = 1;
        """
    )
    db.close()
    store = StateStore(tmp_path)
    try:
        claim, record = store.claim("orders", "/orders")
        assert (record.uidvalidity, record.position, record.handled) == (
            7,
            42,
            ["<1@example.test>"],
        )
        claim.release()
    finally:
        store.close()
    store, policy = open_policy(tmp_path)
    assert policy.check(signed()) is None
    close(store, policy)
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()
    assert stored_digests(tmp_path) == 1


def test_intraprocess_contexts_keep_no_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    options = Options(intraprocess=True, signing_key=KEY.decode(), state_dir=state)
    with Context(options) as ctx:
        sub = Subscription("/t", context=ctx)
        Publisher("/t", context=ctx).publish("signed")
        assert wait_for_message(sub, timeout=5.0) == "signed"
    assert not state.exists()


def unreachable_options(state: Path) -> Options:
    """A signing config whose servers do not answer (port 9 on loopback)."""
    return Options.from_dict(
        {
            "email": {
                "user": {
                    "url-smtp": "smtp://127.0.0.1:9",
                    "url-imap": "imap://127.0.0.1:9",
                    "username": "alice@example.test",
                    "password": "secret",
                },
                "signing-key": KEY.decode(),
                "state-dir": str(state),
                "timeout": 2.0,
            }
        }
    )


def test_a_corrupt_state_store_fails_init_naming_the_file(tmp_path: Path) -> None:
    """Before anything connects: the servers here do not even answer."""
    (tmp_path / "state.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateStoreError, match=r"state\.sqlite3"):
        Context(unreachable_options(tmp_path)).init()


def test_an_unusable_state_dir_fails_init_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("not a directory")
    with pytest.raises(StateStoreError, match="a file"):
        Context(unreachable_options(blocker / "state")).init()


# ============================================================ real mail stack


def server_options(server: DevServer, folder: str, **email: Any) -> Options:
    config = server.config(
        "alice", mailbox=folder, receive_mode="poll", polling_period_ns=5_000_000
    )
    config["email"].update(email)
    return Options.from_dict(config)


def settle(server: DevServer, folder: str, ctx: Context, key: bytes = KEY) -> None:
    """Append a fresh signed sentinel and wait for it: what was appended before it has
    been judged."""
    topic = "/sentinel"
    sentinel = Subscription(topic, context=ctx)
    email = signed("sentinel")
    email.content.subject = topic
    sign_email(email, key)
    server.append("alice", encode_email(email), folder)
    assert wait_for_message(sentinel, timeout=30.0) == "sentinel"


@pytest.mark.mailstack
def test_a_replay_after_a_restart_is_dropped_over_the_mail_server(
    dev_server: DevServer, dev_mailbox: tuple[str, str], tmp_path: Path
) -> None:
    folder, _ = dev_mailbox
    options = server_options(dev_server, folder, **{"signing-key": KEY.decode()})
    with Context(options) as ctx:
        sub = Subscription("/orders", context=ctx)
        Publisher("/orders", context=ctx).publish("genuine")
        assert wait_for_message(sub, timeout=30.0) == "genuine"
        assert ctx._admission is not None and ctx._admission.persistent
    (raw,) = stored_emails(dev_server, folder, 1)

    with Context(options) as ctx:  # restarted, same state-dir
        sub = Subscription("/orders", context=ctx)
        dev_server.append("alice", raw, folder)  # the captured email, stored again
        settle(dev_server, folder, ctx)
        assert sub.get_message() is None
        dropped = {k: v for k, v in ctx.stats().dropped.items() if v}
        assert dropped == {DropReason.REPLAY.value: 1}

    # the same replay to a context with another state-dir (a memory of its own) passes:
    # the drop above came from the state store
    other = options.model_copy(update={"state_dir": tmp_path / "elsewhere"})
    with Context(other) as ctx:
        sub = Subscription("/orders", context=ctx)
        dev_server.append("alice", raw, folder)
        settle(dev_server, folder, ctx)
        assert sub.get_message() == "genuine"


@pytest.mark.mailstack
def test_two_concurrent_readers_both_accept_genuine_mail(
    dev_server: DevServer, dev_mailbox: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    folder, _ = dev_mailbox
    options = server_options(dev_server, folder, **{"signing-key": KEY.decode()})
    with caplog.at_level(logging.INFO, logger="emailmw.state_store"):
        first = Context(options).init()
        second = Context(options).init()
    try:
        assert first._admission is not None and first._admission.persistent
        assert second._admission is not None and not second._admission.persistent
        assert any(
            "is in use by another context" in r.getMessage() and "in memory only" in r.getMessage()
            for r in caplog.records
        )
        subs = [Subscription("/orders", context=c) for c in (first, second)]
        Publisher("/orders", context=first).publish("genuine")
        for sub in subs:
            assert wait_for_message(sub, timeout=30.0) == "genuine"
        assert first.stats().dropped_total == second.stats().dropped_total == 0
    finally:
        second.shutdown()
        first.shutdown()


@pytest.mark.mailstack
def test_an_unsigned_context_on_a_server_keeps_no_state(
    dev_server: DevServer, dev_mailbox: tuple[str, str], tmp_path: Path
) -> None:
    folder, _ = dev_mailbox
    state = tmp_path / "state"
    options = server_options(dev_server, folder, **{"state-dir": str(state)})
    with Context(options) as ctx:
        sub = Subscription("/orders", context=ctx)
        Publisher("/orders", context=ctx).publish("unsigned")
        assert wait_for_message(sub, timeout=30.0) == "unsigned"
    assert not state.exists()
