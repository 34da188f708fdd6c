"""Bad input: hostile emails in the mailbox, oversized emails, and bad headers on publish.

The hostile corpus (tests/hostile_corpus.py) is IMAP-APPENDed straight into a
fresh folder, interleaved with valid emailmw messages, while a context reads
that folder. The receiving thread must survive all of it, every valid message
must arrive (exactly, in order), and each bad email must be dropped, counted
once under its reason and logged once (by UID or Message-ID).
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hostile_corpus import CorpusEmail, corpus, expected_drops, valid_message
from imapclient import IMAPClient
from logcapture import capture_emailmw_logs

from emailmw import (
    Context,
    DropReason,
    InvalidHeaderError,
    Options,
    Publisher,
    ServiceClient,
    Subscription,
    wait_for_message,
)
from emailmw.devserver import DevServer
from emailmw.transport import imap_session

pytestmark = [pytest.mark.timeout(180), pytest.mark.mailstack]

TESTS_DIR = Path(__file__).resolve().parent
MEGABYTE = 1024 * 1024


# ----------------------------------------------------------------------------- helpers


def mailbox_options(server: DevServer, folder: str, address: str, **email: Any) -> Options:
    """Options reading ``folder`` (polling every 5 ms) and publishing to ``address``."""
    config = server.config(
        "alice", mailbox=folder, to=address, receive_mode="poll", polling_period_ns=5_000_000
    )
    config["email"].update(email)
    return Options.from_dict(config)


def folder_contents(server: DevServer, folder: str) -> dict[int, bytes]:
    """Every email in ``folder`` by UID (raw bytes, as Dovecot stores them)."""
    acct = server.account("alice")
    context = ssl.create_default_context(cafile=str(server.ca_file))
    with IMAPClient(server.host, server.imaps_port, ssl=True, ssl_context=context) as imap:
        imap.login(acct.address, acct.password)
        imap.select_folder(folder, readonly=True)
        uids = sorted(imap.search("ALL"))
        if not uids:
            return {}
        data = imap.fetch(uids, ["BODY.PEEK[]"])
        return {uid: data[uid][b"BODY[]"] for uid in uids}


def collect(sub: Subscription, count: int, timeout: float, until: str | None = None) -> list[str]:
    """Take ``count`` messages from ``sub``, or with ``until`` every message up to that
    one (fewer if ``timeout`` passes first)."""
    deadline = time.monotonic() + timeout
    got: list[str] = []
    while (len(got) < count) if until is None else (until not in got):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            got.append(wait_for_message(sub, timeout=left))
        except TimeoutError:
            break
    return got


def mentions(text: str, uid: int, message_id: str) -> bool:
    """Whether a log message names the email with this UID or Message-ID."""
    if re.search(rf"\bUID {uid}\b", text):
        return True
    return bool(message_id) and message_id in text


# ----------------------------------------------------------------------------- the corpus run


@dataclass
class Outcome:
    """What one corpus email caused: drops by reason, and messages delivered."""

    drops: dict[str, int]
    delivered: list[str]


@dataclass
class CorpusRun:
    """What happened when the corpus went through one context."""

    items: list[CorpusEmail]
    outcomes: dict[str, Outcome]
    uids: list[int]
    arrived: list[str]
    dropped: dict[str, int]
    thread_alive: bool
    after_corpus: list[str]
    logs: list[logging.LogRecord]
    seconds: float


@pytest.fixture(scope="module")
def corpus_run(dev_server: DevServer) -> CorpusRun:
    """Append the corpus to a fresh folder read by a running context; record the outcome.

    Each hostile email is followed by a valid one; once that one arrived, the
    hostile email before it was handled (one thread, mailbox order), so the
    counters' change since the previous valid email belongs to it alone.
    """
    folder, address = dev_server.new_mailbox("alice")
    topic = f"/hostile/{folder}"
    options = mailbox_options(dev_server, folder, address)
    start = time.monotonic()
    outcomes: dict[str, Outcome] = {}
    arrived: list[str] = []
    with Context(options) as ctx:
        sub = Subscription(topic, context=ctx, depth=1000)
        client = ServiceClient("/some/service", context=ctx)
        items = corpus(topic, client_gid=client.gid.value)
        with capture_emailmw_logs() as handler:
            before = dict(ctx.stats().dropped)
            pending: list[CorpusEmail] = []
            for item in items:
                dev_server.append("alice", item.raw, folder)
                if not item.valid:
                    pending.append(item)
                    continue
                assert item.body is not None
                got = collect(sub, 0, timeout=30.0, until=item.body)
                arrived += got
                now = dict(ctx.stats().dropped)
                delta = {k: now[k] - before[k] for k in now if now[k] != before[k]}
                before = now
                for hostile in pending:  # one at a time, but keep it general
                    outcomes[hostile.name] = Outcome(delta, got[:-1])
                pending = []
            dropped = dict(ctx.stats().dropped)
            thread_alive = ctx._polling_manager.running
            # and the whole path still works: a message published over SMTP arrives
            Publisher(topic, context=ctx).publish("after the corpus")
            after = collect(sub, 1, timeout=30.0)
            records = list(handler.records)
    uids = sorted(folder_contents(dev_server, folder))[: len(items)]
    return CorpusRun(
        items,
        outcomes,
        uids,
        arrived,
        dropped,
        thread_alive,
        after,
        records,
        time.monotonic() - start,
    )


def test_the_corpus_was_stored_in_order(corpus_run: CorpusRun) -> None:
    """The other tests map corpus entries to UIDs 1, 2, 3, ... (a fresh folder)."""
    assert corpus_run.uids == list(range(1, len(corpus_run.items) + 1))


def test_every_valid_email_arrives_exactly_and_in_order(corpus_run: CorpusRun) -> None:
    wanted = [item.body for item in corpus_run.items if item.expect is None]
    arrived = [body for body in corpus_run.arrived if body in wanted]
    missing = [
        item.name for item in corpus_run.items if item.expect is None and item.body not in arrived
    ]
    assert not missing, f"valid emails that did not arrive: {missing}"
    assert arrived == wanted


def test_no_bad_email_reaches_a_subscription(corpus_run: CorpusRun) -> None:
    extras = {
        item.name: [body[:60] for body in corpus_run.outcomes[item.name].delivered]
        for item in corpus_run.items
        if item.expect is not None and corpus_run.outcomes[item.name].delivered
    }
    assert not extras, f"delivered although they should have been dropped: {extras}"


def test_each_bad_email_is_counted_once_under_its_reason(corpus_run: CorpusRun) -> None:
    problems = []
    for item in corpus_run.items:
        if item.valid:
            continue
        outcome = corpus_run.outcomes[item.name]
        wanted = {} if item.expect is None else {item.expect.value: 1}
        if outcome.drops != wanted:
            problems.append(f"{item.name}: counted {outcome.drops}, expected {wanted}")
    assert not problems, "\n".join(problems)


def test_the_totals_add_up(corpus_run: CorpusRun) -> None:
    expected = {reason.value: 0 for reason in DropReason}
    for reason, count in expected_drops(corpus_run.items).items():
        expected[reason.value] = count
    assert corpus_run.dropped == expected


def test_the_receiving_thread_survives_the_corpus(corpus_run: CorpusRun) -> None:
    assert corpus_run.thread_alive
    assert corpus_run.after_corpus == ["after the corpus"]


def test_each_bad_email_is_logged_once(corpus_run: CorpusRun) -> None:
    """A log line about a dropped email names it (UID or Message-ID), exactly once."""
    problems = []
    texts = [record.getMessage() for record in corpus_run.logs]
    for uid, item in enumerate(corpus_run.items, start=1):
        if item.expect is None:
            continue
        found = [text for text in texts if mentions(text, uid, item.message_id)]
        if len(found) != 1:
            problems.append(f"{item.name} (UID {uid}, {item.expect.value}): {len(found)} records")
    assert not problems, "\n".join(problems)


def test_drop_logs_stay_short(corpus_run: CorpusRun) -> None:
    """A hostile email cannot flood the log: no record quotes megabytes of it."""
    long = [
        (record.name, len(record.getMessage()), record.getMessage()[:100])
        for record in corpus_run.logs
        if len(record.getMessage()) > 2000
    ]
    assert not long, long


def test_the_corpus_goes_through_in_reasonable_time(corpus_run: CorpusRun) -> None:
    # ~115 APPENDs (each its own IMAP login), each waited for, 3 MB of hostile headers
    # in all: seconds, not minutes
    assert corpus_run.seconds < 60


# ----------------------------------------------------------------------------- max-message-size

_APPEND_BIG = """
import imaplib, os, ssl, sys
sys.path.insert(0, os.environ["TESTS_DIR"])
from hostile_corpus import oversized_email, valid_message
item = oversized_email(os.environ["TOPIC"])
imap = imaplib.IMAP4(os.environ["HOST"], int(os.environ["PORT"]), timeout=60)
imap.starttls(ssl.create_default_context(cafile=os.environ["CA"]))
imap.login(os.environ["USER"], os.environ["PASSWORD"])
folder = '"' + os.environ["FOLDER"] + '"'
assert imap.append(folder, "", None, item.raw)[0] == "OK"
after = valid_message(os.environ["TOPIC"], "after the big one", "<after.big@example.test>")
assert imap.append(folder, "", None, after)[0] == "OK"
imap.logout()
print(len(item.raw))
"""


def _vm(name: str) -> int:
    """A ``Vm*`` line of /proc/self/status, in bytes."""
    with open("/proc/self/status", encoding="ascii") as status:
        match = re.search(rf"^{name}:\s+(\d+) kB", status.read(), re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


@pytest.mark.slow
def test_a_50_megabyte_email_is_skipped_by_size_without_fetching_it(
    dev_server: DevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Default max-message-size (25 MB): skipped on RFC822.SIZE, body never downloaded,
    memory flat, counted and logged once, and the next email still arrives."""
    folder, address = dev_server.new_mailbox("alice")
    topic = f"/big/{folder}"
    options = mailbox_options(dev_server, folder, address)
    assert options.max_message_size == 25 * MEGABYTE

    fetched: list[int] = []
    original_fetch = imap_session.Session.fetch

    def counting_fetch(
        self: Any, uids: bytes, items: bytes
    ) -> tuple[bool, dict[int, dict[bytes, Any]]]:
        ok, result = original_fetch(self, uids, items)
        for item in result.values():
            fetched.extend(len(v) for v in item.values() if isinstance(v, bytes))
        return ok, result

    monkeypatch.setattr(imap_session.Session, "fetch", counting_fetch)
    acct = dev_server.account("alice")
    with Context(options) as ctx, capture_emailmw_logs() as handler:
        sub = Subscription(topic, context=ctx)
        # the 50 MB email is built and appended by another process: this one's memory
        # must not move while the receiver deals with it
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        baseline = _vm("VmRSS")
        env = {
            **os.environ,
            "TESTS_DIR": str(TESTS_DIR),
            "TOPIC": topic,
            "HOST": dev_server.host,
            "PORT": str(dev_server.imap_port),
            "CA": str(dev_server.ca_file),
            "USER": acct.address,
            "PASSWORD": acct.password,
            "FOLDER": folder,
        }
        done = subprocess.run(
            [sys.executable, "-c", _APPEND_BIG],
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert int(done.stdout) >= 50 * MEGABYTE
        assert wait_for_message(sub, timeout=60.0) == "after the big one"
        peak = _vm("VmHWM")
        stats = ctx.stats()
    assert stats.dropped["too_large"] == 1
    assert stats.dropped_total == 1
    assert max(fetched) <= 64 * 1024 + 4096, "the receiver downloaded more than a prefix"
    assert sum(fetched) < MEGABYTE
    assert peak - baseline < 20 * MEGABYTE, (
        f"peak RSS grew by {(peak - baseline) / MEGABYTE:.1f} MB"
    )
    logs = [r for r in handler.records if re.search(r"\bUID 1\b", r.getMessage())]
    assert len(logs) == 1
    assert logs[0].levelno == logging.WARNING
    assert "max-message-size" in logs[0].getMessage()


def test_max_message_size_from_the_config_is_honoured(dev_server: DevServer) -> None:
    folder, address = dev_server.new_mailbox("alice")
    topic = f"/size/{folder}"
    options = mailbox_options(dev_server, folder, address, **{"max-message-size": 100_000})
    with Context(options) as ctx:
        sub = Subscription(topic, context=ctx)
        big = valid_message(topic, "x" * 150_000, "<big.1@example.test>")
        just_fits = valid_message(topic, "y" * 60_000, "<fits.1@example.test>")
        assert len(big) > 100_000 > len(just_fits)
        dev_server.append("alice", big, folder)
        dev_server.append("alice", just_fits, folder)
        assert wait_for_message(sub, timeout=30.0) == "y" * 60_000
        assert ctx.stats().dropped["too_large"] == 1


# ----------------------------------------------------------------------------- publishing


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Trace": "a\r\nBcc: victim@example.test"},
        {"X-Trace": "a\nb"},
        {"X-Trace": "a\rb"},
        {"X-Trace": "nul\0"},
        {"X-Bad Name": "v"},
        {"X-Bad\r\nName": "v"},
        {"Publisher-GID": "1"},
        {"SOURCE-TIMESTAMP": "1"},
        {"Request-Sequence-Number": "1"},
        {"Emailmw-Signature": "v1 hmac-sha256 AAAA"},
        {"Bcc": "victim@example.test"},
        {"Reply-To": "mallory@evil.test"},
    ],
    ids=lambda headers: repr(headers)[:40],
)
def test_bad_additional_headers_never_reach_the_smtp_server(
    dev_server: DevServer, headers: dict[str, str]
) -> None:
    """Over the real transport: the bad publish raises, Postfix never sees an email,
    and the next good one is the only email in the folder."""
    folder, address = dev_server.new_mailbox("alice")
    topic = f"/headers/{folder}"
    options = mailbox_options(dev_server, folder, address)
    with Context(options) as ctx:
        sub = Subscription(topic, context=ctx)
        publisher = Publisher(topic, context=ctx)
        with pytest.raises(InvalidHeaderError):
            publisher.publish("bad", additional_headers=headers)
        assert ctx.stats().sent == 0
        publisher.publish("good", additional_headers={"X-Trace": "ok"})
        assert wait_for_message(sub, timeout=30.0) == "good"
    stored = folder_contents(dev_server, folder)
    assert len(stored) == 1
    assert b"victim" not in next(iter(stored.values()))


def test_one_publish_is_counted_once(dev_server: DevServer) -> None:
    """``sent`` counts emails handed to the server: one publish, one email."""
    folder, address = dev_server.new_mailbox("alice")
    topic = f"/count/{folder}"
    with Context(mailbox_options(dev_server, folder, address)) as ctx:
        sub = Subscription(topic, context=ctx)
        Publisher(topic, context=ctx).publish("one")
        assert wait_for_message(sub, timeout=30.0) == "one"
        assert ctx.stats().sent == 1
