"""The re-read of a folder whose UIDVALIDITY changed (emailmw/transport/imap_resync.py).

The rule in units first (no server), then against the real Dovecot + Postfix:

* a stranger's email with an ``INTERNALDATE`` 90 minutes ahead (or a forged
  emailmw email with such a ``Source-Timestamp``) in the folder, the folder
  deleted and recreated while the receiver is cut off, 5 genuine messages
  published meanwhile: all 5 are delivered, with or without a signing key, and
  every email the re-read skips is counted and logged;
* 150 old ~60 KB emails and a UIDVALIDITY change: the bytes read from the
  server during the re-read stay far below the skipped emails' size.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import random
import ssl
import string
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import pytest
from imapclient import IMAPClient
from mailstack import stored_emails

import emailmw
from emailmw.devserver import DevServer
from emailmw.options import Options
from emailmw.stats import DropReason, StatsCounters
from emailmw.transport.codec import encode_email, new_message_id
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients
from emailmw.transport.imap import ImapEmailReceiver
from emailmw.transport.imap_resync import (
    FETCH_RESYNC,
    MARGIN,
    HandledMemory,
    Resync,
    Summary,
    header_block,
    summarize,
)

pytestmark = pytest.mark.timeout(60)

SECOND = 1_000_000_000
KEY = "resync-test-signing-key-0123456789"


def _load_faults() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "faults.py"
    spec = importlib.util.spec_from_file_location("emailmw_benchmark_faults", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


faults = _load_faults()


def emailmw_raw(
    address: str,
    body: str,
    *,
    timestamp_ns: int | None = None,
    topic: str = "/resync",
    from_: str | None = None,
) -> bytes:
    """An unsigned emailmw message on ``topic`` to ``address``."""
    stamp = time.time_ns() if timestamp_ns is None else timestamp_ns
    email = EmailData(
        content=EmailContent(subject=topic, body=body),
        headers=EmailHeaders({"Publisher-GID": "4242", "Source-Timestamp": str(stamp)}),
        message_id=new_message_id("example.test"),
        from_=from_ or address,
        recipients=EmailRecipients(to=[address]),
    )
    return encode_email(email)


def foreign_raw(address: str, body: str) -> bytes:
    """Somebody's ordinary email: no emailmw header."""
    return (
        f"From: stranger@example.test\r\nTo: {address}\r\nSubject: hello\r\n"
        f"Message-ID: {new_message_id('example.test')}\r\n\r\n{body}\r\n"
    ).encode()


@pytest.fixture
def admin(dev_server: DevServer) -> Iterator[IMAPClient]:
    """A separate IMAP session of alice's (implicit TLS, straight to Dovecot)."""
    account = dev_server.account("alice")
    context = ssl.create_default_context(cafile=str(dev_server.ca_file))
    with IMAPClient(dev_server.host, dev_server.imaps_port, ssl_context=context, timeout=30) as c:
        c.login(account.address, account.password)
        yield c


def recreate(admin: IMAPClient, folder: str) -> None:
    """Delete ``folder`` and create it again: a new UIDVALIDITY, UIDs from 1."""
    admin.delete_folder(folder)
    admin.create_folder(folder)


def collect(sub: emailmw.Subscription, wanted: set[str], timeout: float) -> list[str]:
    """Every message ``sub`` gets until all of ``wanted`` came (or ``timeout``), then
    for another 0.5 s (to see a late extra one)."""
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


def resync_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("re-read of ")
    ]


# ----------------------------------------------------------------------------- the rule


def block(*lines: str) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode()


def summary(timestamp_ns: int | None, message_id: str = "<a@x>") -> Summary:
    lines = [f"Message-ID: {message_id}", "Subject: /t", "Publisher-GID: 1"]
    if timestamp_ns is not None:
        lines.append(f"Source-Timestamp: {timestamp_ns}")
    return summarize(block(*lines))


def test_the_summary_of_an_email_equals_the_summary_of_its_listed_header_fields() -> None:
    raw = emailmw_raw("alice@example.test", "body")
    whole = summarize(header_block(raw))
    # what HEADER.FIELDS gives: the wanted fields only, another order of other fields,
    # a different case of names, folded differently
    fields = [line for line in header_block(raw).decode().split("\r\n") if line]
    wanted = [f for f in fields if f.split(":")[0].lower() in ("message-id", "subject")]
    wanted += [f for f in fields if f.split(":")[0].lower() in ("source-timestamp",)]
    wanted += [f for f in fields if f.split(":")[0].lower() == "publisher-gid"]
    wanted += [f for f in fields if f.split(":")[0].lower() in ("from", "date")]
    listed = block(*(f.upper().split(":")[0] + ":" + f.split(":", 1)[1] for f in wanted))
    assert summarize(listed) == whole
    assert whole.emailmw and whole.timestamp is not None
    folded = block("Message-ID:", "  <a@x>", "Subject: /t", "Publisher-GID: 1")
    unfolded = block("Message-ID: <a@x>", "Subject: /t", "Publisher-GID: 1")
    assert summarize(folded).key == summarize(unfolded).key


def test_the_summary_tells_fields_apart() -> None:
    assert summary(5).key != summary(6).key
    assert summary(5).key != summary(5, "<b@x>").key
    assert (
        summarize(block("Subject: a", "Message-ID: b")).key
        != summarize(block("Subject: ab", "Message-ID:")).key
    )
    foreign = summarize(block("From: x@y", "Subject: hi", "Message-ID: <c@x>"))
    assert not foreign.emailmw and foreign.timestamp is None
    twice = summarize(block("Source-Timestamp: 1", "Source-Timestamp: 2"))
    assert twice.emailmw and twice.timestamp is None  # the decoder calls it malformed
    assert summarize(b"").key == summarize(block("X-Other: 1")).key


def test_the_listing_fetches_no_body() -> None:
    assert b"BODY.PEEK[HEADER.FIELDS (" in FETCH_RESYNC
    assert b"BODY.PEEK[]" not in FETCH_RESYNC
    assert b"SOURCE-TIMESTAMP" in FETCH_RESYNC and b"MESSAGE-ID" in FETCH_RESYNC


def test_with_nothing_handled_the_receivers_start_is_the_cutoff() -> None:
    memory = HandledMemory()
    start = 1_000_000 * SECOND
    memory.start(start)
    resync = Resync.after_change(10, memory)
    assert resync.cutoff == start - MARGIN
    assert resync.decide(summary(start + SECOND), None, memory, raw=False) is None
    assert resync.decide(summary(start - MARGIN - 1), None, memory, raw=False) == (
        DropReason.RESYNC_SKIPPED,
        "published before the cut-off",
    )
    assert resync.decide(summary(None), None, memory, raw=False) is None  # the decoder judges


def test_what_was_handled_is_skipped_and_the_rest_delivered() -> None:
    memory = HandledMemory()
    start = 1_000_000 * SECOND
    memory.start(start)
    handled = summary(start + 5 * SECOND, "<handled@x>")
    memory.remember(handled, start + 6 * SECOND)
    resync = Resync.after_change(10, memory)
    assert resync.decide(handled, None, memory, raw=False) == (
        DropReason.RESYNC_SKIPPED,
        "handled before",
    )
    # published before the handled one, never handled (stored late): delivered
    late = summary(start + 4 * SECOND, "<late@x>")
    assert resync.decide(late, None, memory, raw=False) is None
    foreign = summarize(block("From: x@y", "Message-ID: <f@x>"))
    assert resync.decide(foreign, None, memory, raw=False) == (
        DropReason.NOT_EMAILMW,
        "not emailmw",
    )


def test_a_future_dated_stranger_never_moves_the_cutoff_past_the_receivers_clock() -> None:
    """A forged emailmw email with a Source-Timestamp 90 minutes ahead, handled and then
    forgotten (the memory overflowed): the horizon moves to when it was handled, not to
    its date, and a genuine email published a second later is delivered."""
    memory = HandledMemory(size=2)
    start = 1_000_000 * SECOND
    memory.start(start)
    handled_at = start + 10 * SECOND
    forged = summary(handled_at + 90 * 60 * SECOND, "<forged@x>")
    memory.remember(forged, handled_at)
    for i in range(2):  # two more handled: the forged one is forgotten
        memory.remember(summary(handled_at + i, f"<g{i}@x>"), handled_at + i)
    assert forged.key not in memory
    assert memory.horizon == handled_at
    resync = Resync.after_change(10, memory)
    genuine = summary(handled_at + SECOND, "<new@x>")
    assert resync.decide(genuine, None, memory, raw=False) is None
    # a foreign email's INTERNALDATE is not even looked at unless receive_raw() wants it
    ahead = datetime.fromtimestamp(handled_at / SECOND, UTC) + timedelta(minutes=90)
    foreign = summarize(block("From: x@y", "Message-ID: <f@x>"))
    assert resync.decide(foreign, ahead, memory, raw=True) is None
    old = datetime.fromtimestamp(start / SECOND, UTC) - timedelta(hours=1)
    assert resync.decide(foreign, old, memory, raw=True) == (
        DropReason.RESYNC_SKIPPED,
        "stored before the cut-off",
    )


def test_the_memory_is_bounded_and_its_horizon_only_moves_forward() -> None:
    memory = HandledMemory(size=100)
    memory.start(50 * SECOND)
    for i in range(1000):
        memory.remember(summary(i * SECOND, f"<m{i}@x>"), 2000 * SECOND)
    assert len(memory) == 100
    assert memory.horizon == 899 * SECOND  # the newest forgotten
    memory.remember(summary(None, "<no-stamp@x>"), 3000 * SECOND)
    memory.remember(summary(1 * SECOND, "<very-old@x>"), 3000 * SECOND)
    assert memory.horizon == 901 * SECOND


# ----------------------------------------------------------------------------- real servers


@pytest.mark.mailstack
@pytest.mark.timeout(120)
@pytest.mark.parametrize("signing", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("stranger", ["foreign", "forged"])
def test_a_future_dated_stranger_costs_no_genuine_message_in_a_resync(
    dev_server: DevServer,
    admin: IMAPClient,
    caplog: pytest.LogCaptureFixture,
    signing: bool,
    stranger: str,
) -> None:
    """A stranger APPENDs an email dated 90 minutes ahead (``foreign``: ordinary mail;
    ``forged``: an emailmw email whose Source-Timestamp is 90 minutes ahead too); the
    receiver handles it. Then, while the receiver is cut off, the folder is deleted and
    recreated, the emails handled before and the stranger's are put back, with an
    emailmw email from an hour before the receiver started, and 5 genuine messages are
    published. Once the receiver is back: all 5 are delivered, nothing else is, and
    every email the re-read skipped is counted and logged."""
    folder, address = dev_server.new_mailbox("alice")
    ahead = datetime.now(UTC) + timedelta(minutes=90)
    if stranger == "foreign":
        stranger_raw = foreign_raw(address, "from the future")
    else:
        stranger_raw = emailmw_raw(
            address,
            "forged",
            timestamp_ns=int(ahead.timestamp() * SECOND),
            from_="mallory@example.test",
        )
    with faults.TcpProxy(dev_server.imap_port) as proxy:
        overrides: dict[str, object] = {"timeout": 1.0}
        if signing:
            overrides["signing-key"] = KEY
        config = faults.stream_config(
            dev_server,
            folder,
            address,
            imap_url=f"imap://127.0.0.1:{proxy.port}",
            overrides=overrides,
        )
        started = time.time_ns()
        with emailmw.Context(Options.from_dict(config)) as ctx:
            sub = emailmw.Subscription("/resync", context=ctx)
            pub = emailmw.Publisher("/resync", context=ctx)
            pub.publish("before 0")
            pub.publish("before 1")
            admin.append(folder, stranger_raw, msg_time=ahead)
            pub.publish("before 2")  # a higher UID: handled after the stranger's email
            before = {"before 0", "before 1", "before 2"}
            forged_delivered = stranger == "forged" and not signing
            wanted = before | ({"forged"} if forged_delivered else set())
            assert sorted(collect(sub, wanted, timeout=20)) == sorted(wanted)
            dropped = ctx.stats().dropped
            assert dropped["not_emailmw"] == (1 if stranger == "foreign" else 0)
            assert dropped["unsigned"] == (1 if stranger == "forged" and signing else 0)
            copies = stored_emails(dev_server, folder, 4)

            proxy.freeze()  # the receiver is cut off from here ...
            recreate(admin, folder)
            for raw in copies:  # a restore puts back what was there
                admin.append(folder, raw, msg_time=ahead if raw == stranger_raw else None)
            old = started - 3600 * SECOND
            admin.append(folder, emailmw_raw(address, "from an hour ago", timestamp_ns=old))
            meanwhile = {f"meanwhile {i}" for i in range(5)}
            for message in sorted(meanwhile):
                pub.publish(message)
            stored_emails(dev_server, folder, len(copies) + 1 + len(meanwhile))
            proxy.resume()  # ... to here

            got = collect(sub, meanwhile, timeout=40)
            stats = ctx.stats()
    assert sorted(got) == sorted(meanwhile)
    # handled before: the 3 genuine (and the forged one); older than the receiver: 1
    skipped = 3 + 1 + (1 if stranger == "forged" else 0)
    expected = {"resync_skipped": skipped}
    if stranger == "foreign":
        expected["not_emailmw"] = 2  # the original and its copy
    if stranger == "forged" and signing:
        expected["unsigned"] = 1  # the original only: its copy was never downloaded
    assert {k: v for k, v in stats.dropped.items() if v} == expected
    assert stats.reconnects >= 1
    not_delivered = skipped + (1 if stranger == "foreign" else 0)
    warnings = resync_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert f": {not_delivered} emails skipped (" in warnings[0]


def sized_raw(address: str, label: str, size: int, timestamp_ns: int | None = None) -> bytes:
    """An emailmw email of about ``size`` bytes (random letters, so it does not shrink)."""
    rng = random.Random(label)
    words = "".join(rng.choices(string.ascii_letters, k=size - 600))
    body = "\n".join(words[i : i + 70] for i in range(0, len(words), 70))
    return emailmw_raw(address, f"{label}\n{body}", timestamp_ns=timestamp_ns)


@pytest.mark.mailstack
@pytest.mark.timeout(180)
def test_a_resync_downloads_the_bodies_only_of_what_it_delivers(
    dev_server: DevServer, admin: IMAPClient, caplog: pytest.LogCaptureFixture
) -> None:
    """150 old ~60 KB emails (100 handled before, 50 from before the receiver started)
    and 2 new ones in a recreated folder: the re-read delivers the 2 and reads from the
    server less than 5 % of the 150's size on top of the 2 bodies."""
    folder, address = dev_server.new_mailbox("alice")
    config = dev_server.config("alice", mailbox=folder, receive_mode="poll")
    stats = StatsCounters()
    receiver = ImapEmailReceiver(Options.from_dict(config).imap_settings(), stats)
    try:
        receiver.connect()
        started = time.time_ns()
        handled = [sized_raw(address, f"handled {i}", 60_000) for i in range(100)]
        for raw in handled:
            admin.append(folder, raw)
        got: list[EmailData] = []
        deadline = time.monotonic() + 60
        while len(got) < 100 and time.monotonic() < deadline:
            got += receiver.receive(1.0)
        assert len(got) == 100
        assert receiver.bytes_received >= sum(len(raw) for raw in handled)  # it counts

        recreate(admin, folder)  # the receiver is between two receive() calls: away
        old = [
            sized_raw(address, f"old {i}", 60_000, timestamp_ns=started - 3600 * SECOND)
            for i in range(50)
        ]
        new = [sized_raw(address, f"new {i}", 60_000) for i in range(2)]
        for raw in handled + old + new:
            admin.append(folder, raw)
        before = receiver.bytes_received
        delivered: list[EmailData] = []
        deadline = time.monotonic() + 60
        while len(delivered) < 2 and time.monotonic() < deadline:
            delivered += receiver.receive(1.0)
        assert receiver.receive(0.5) == []
        read = receiver.bytes_received - before
    finally:
        receiver.close()
    assert [e.content.body[:5] for e in delivered] == ["new 0", "new 1"]
    dropped = {k: v for k, v in stats.snapshot().dropped.items() if v}
    assert dropped == {"resync_skipped": 150}
    skipped_size = sum(len(raw) for raw in handled + old)
    new_size = sum(len(raw) for raw in new)
    assert skipped_size > 9_000_000
    assert new_size <= read < new_size + 0.05 * skipped_size, (read, new_size, skipped_size)
    warnings = resync_warnings(caplog)
    assert len(warnings) == 1 and ": 150 emails skipped (" in warnings[0], warnings
    assert "100 handled before" in warnings[0]
    assert "50 published before the cut-off" in warnings[0]
    assert "2 fetched" in warnings[0]


def test_counts_are_kept_per_reason() -> None:
    resync = Resync(below=5, cutoff=None)
    for why in ("fetched", "handled before", "handled before", "too large"):
        resync.note(why)
    assert resync.skipped == 3
    assert resync.describe() == "1 fetched, 2 handled before, 1 too large"
    assert resync.counts == collections.Counter({"fetched": 1, "handled before": 2, "too large": 1})


class _RefusingSession:
    """Answers the re-read listing of a range with NO, and single UIDs from a script."""

    def __init__(self, script: dict[int, tuple[bool, dict[bytes, object]]]) -> None:
        self.script = script
        self.trouble: str | None = None
        self.new_mail = False
        self.asked: list[bytes] = []

    def fetch(self, uids: bytes, items: bytes) -> tuple[bool, dict[int, dict[bytes, object]]]:
        assert items == FETCH_RESYNC
        self.asked.append(uids)
        if b":" in uids:
            return False, {}
        ok, item = self.script.get(int(uids), (True, {}))
        return ok, ({int(uids): item} if item else {})


def test_a_failed_listing_is_listed_one_by_one_and_nothing_is_skipped_unseen(
    dev_server: DevServer,
) -> None:
    """The server refuses the listing of a range: the receiver lists its UIDs one at a
    time; one it cannot list at all is kept for its body to be fetched, never skipped."""
    config = dev_server.config("alice", mailbox="INBOX", receive_mode="poll")
    receiver = ImapEmailReceiver(Options.from_dict(config).imap_settings(), StatsCounters())
    memory = HandledMemory()
    memory.start(time.time_ns())
    foreign = block("From: x@y", "Message-ID: <f@x>")
    script: dict[int, tuple[bool, dict[bytes, object]]] = {
        1: (True, {b"UID": 1, b"RFC822.SIZE": 100, b"BODY[HEADER.FIELDS (FROM)]": foreign}),
        2: (False, {}),
    }
    session = _RefusingSession(script)
    resync = Resync.after_change(4, memory)
    try:
        listed = receiver._list_again(session, resync)  # type: ignore[arg-type]
    finally:
        receiver.close()
    assert session.asked == [b"1:3", b"1", b"2", b"3"]
    assert [(i.uid, i.drop) for i in listed] == [(1, DropReason.NOT_EMAILMW), (2, None)]
    assert session.new_mail
