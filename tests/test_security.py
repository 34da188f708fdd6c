"""Security: message signing, replay protection, allowed senders, TLS rules.

Threat model (docs/security.md): anyone can write into the mailbox (IMAP APPEND
here stands for any sender, a compromised account or the server itself), the
mail servers may deliver a message twice or replay it later, and the network
between emailmw and its servers may be hostile.

Most tests use the real Dovecot + Postfix dev server: a genuine signed message,
request and response are sent through it and captured as raw bytes, then forged,
altered, replayed and unsigned variants are APPENDed into the folder a signing
receiver reads. Each variant is followed by a valid signed sentinel email, so the
counters' change when the sentinel arrives belongs to that variant alone.
No traffic leaves loopback: non-loopback host names are resolved to 127.0.0.1
by a patched ``socket.getaddrinfo``.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fake_smtp import FakeImap, FakeSmtp
from mailstack import stored_emails

from emailmw import (
    AuthenticationError,
    ConfigError,
    Context,
    DropReason,
    Options,
    Publisher,
    ServiceClient,
    ServiceServer,
    Subscription,
    TlsError,
    wait_for_message,
    wait_for_request,
    wait_for_response,
)
from emailmw import security as security_module
from emailmw.devserver import DevServer
from emailmw.options import SIGNING_KEY_ENV
from emailmw.security import (
    MAX_CLOCK_SKEW,
    SIGNATURE_HEADER,
    AdmissionPolicy,
    compute_signature,
    sign_email,
    verify_signature,
)
from emailmw.transport.codec import decode_email, encode_email, new_message_id
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients
from emailmw.transport.imap import ImapEmailReceiver
from emailmw.transport.signing import SigningSender
from emailmw.transport.smtp import SmtpEmailSender

pytestmark = [pytest.mark.timeout(120)]

KEY = b"correct horse battery staple 0123456789"
WRONG_KEY = b"not the key, but long enough"
HOUR_NS = 3600 * 10**9


# ============================================================================ helpers


def signed_email(
    topic: str,
    body: str,
    key: bytes | None,
    *,
    message_id: str | None = None,
    timestamp_ns: int | None = None,
    from_: str = "alice@example.test",
    gid: str = "7",
    in_reply_to: str | None = None,
) -> EmailData:
    """A message (signed with ``key`` unless None)."""
    headers = EmailHeaders()
    headers["Source-Timestamp"] = str(time.time_ns() if timestamp_ns is None else timestamp_ns)
    headers["Publisher-GID"] = gid
    email = EmailData(
        content=EmailContent(topic, body),
        headers=headers,
        message_id=message_id or new_message_id("example.test"),
        in_reply_to=in_reply_to,
        from_=from_,
        recipients=EmailRecipients(to=["alice@example.test"]),
    )
    if key is not None:
        sign_email(email, key)
    return email


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """For counters, which no emailmw wait covers: checks every 10 ms."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def raw_signed(topic: str, body: str, key: bytes | None, **kw: Any) -> bytes:
    return encode_email(signed_email(topic, body, key, **kw))


def decoded(raw: bytes) -> EmailData:
    email = decode_email(raw)
    assert email is not None
    return email


def reencoded(email: EmailData) -> bytes:
    return encode_email(email)


def strip_signature(raw: bytes) -> bytes:
    """Remove the signature header field (and its folded continuation lines)."""
    stripped, count = re.subn(rb"(?im)^emailmw-signature:.*\r?\n(?:[ \t].*\r?\n)*", b"", raw)
    assert count == 1
    return stripped


def server_options(server: DevServer, folder: str, address: str, **email: Any) -> Options:
    """Options reading ``folder`` (poll every 5 ms), publishing to and from ``address``."""
    config = server.config(
        "alice", mailbox=folder, to=address, receive_mode="poll", polling_period_ns=5_000_000
    )
    config["email"].update({"from": address, **email})
    return Options.from_dict(config)


def drain(sub: Subscription) -> list[str]:
    got = []
    while (message := sub.get_message()) is not None:
        got.append(message)
    return got


@contextlib.contextmanager
def resolve_to_loopback(*names: str) -> Iterator[None]:
    """Make ``names`` resolve to 127.0.0.1 (nothing ever leaves loopback)."""
    real = socket.getaddrinfo

    def fake(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.lower() in names:
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    socket.getaddrinfo = fake
    try:
        yield
    finally:
        socket.getaddrinfo = real


# ============================================================================ options


def test_signing_key_sources_and_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    assert Options(intraprocess=True).resolve_signing_key() is None
    monkeypatch.setenv(SIGNING_KEY_ENV, "from-env-0123456789")
    assert Options(intraprocess=True).resolve_signing_key() == b"from-env-0123456789"
    key_file = tmp_path / "key.txt"
    key_file.write_text("  from-file-0123456789\n", encoding="utf-8")
    config = tmp_path / "email.yml"
    config.write_text(
        "email:\n  intraprocess: true\n  signing-key-file: key.txt\n  max-age: 60\n"
        "  allowed-senders: bob@example.test\n",
        encoding="utf-8",
    )
    options = Options.from_file(config)
    assert options.resolve_signing_key() == b"from-file-0123456789"  # relative to the config file
    assert options.max_age == 60
    assert options.allowed_senders == ["bob@example.test"]
    inline = Options.from_dict(
        {"email": {"intraprocess": True, "signing-key": "inline-key-0123456789"}}
    )
    assert inline.resolve_signing_key() == b"inline-key-0123456789"
    both = Options(
        intraprocess=True, signing_key="inline-key-0123456789", signing_key_file=key_file
    )
    assert both.resolve_signing_key() == b"inline-key-0123456789"


def test_unreadable_signing_key_file_is_a_config_error(tmp_path: Path) -> None:
    options = Options(intraprocess=True, signing_key_file=tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="signing-key-file"):
        Context(options).init()


@pytest.mark.mailstack
def test_a_bad_signing_key_file_fails_before_anything_connects(
    dev_server: DevServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Configuration errors surface before any connection is opened (and so none is
    left open behind the error)."""
    config = dev_server.config("alice")
    config["email"]["signing-key-file"] = str(tmp_path / "missing.key")
    options = Options.from_dict(config)
    opened: list[object] = []
    real = socket.create_connection

    def spy(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        opened.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", spy)
    context = Context(options)
    with pytest.raises(ConfigError, match="signing-key-file"):
        context.init()
    assert opened == []


@pytest.mark.parametrize("max_age", [0, -1, "soon"])
def test_max_age_must_be_positive(max_age: object) -> None:
    with pytest.raises(ConfigError, match="max-age"):
        Options.from_dict({"email": {"intraprocess": True, "max-age": max_age}})


# ============================================================================ the policy, unit


def test_unsigned_and_badly_signed_emails_are_refused() -> None:
    policy = AdmissionPolicy(KEY)
    assert policy.check(signed_email("/t", "x", None)) is DropReason.UNSIGNED
    assert policy.check(signed_email("/t", "x", WRONG_KEY)) is DropReason.BAD_SIGNATURE
    email = signed_email("/t", "x", KEY)
    email.headers[SIGNATURE_HEADER] = "v1 hmac-sha256 !!!not base64!!!"
    assert policy.check(email) is DropReason.BAD_SIGNATURE
    email.headers[SIGNATURE_HEADER] = ""
    assert policy.check(email) is DropReason.BAD_SIGNATURE
    assert policy.check(signed_email("/t", "x", KEY)) is None


@pytest.mark.parametrize(
    "change",
    [
        "subject",
        "body",
        "Source-Timestamp",
        "Publisher-GID",
        "add Client-GID",
        "add Request-Sequence-Number",
        "add Publication-Number",
        "add Previous-Timestamp",
        "add Previous-Number",
        "message_id",
        "add in_reply_to",
    ],
)
def test_every_signed_field_is_covered(change: str) -> None:
    email = signed_email("/t", "body", KEY)
    if change == "subject":
        email.content.subject = "/other"
    elif change == "body":
        email.content.body = "body!"
    elif change == "message_id":
        email.message_id = "<other@example.test>"
    elif change == "add in_reply_to":
        email.in_reply_to = "<request@example.test>"
    elif change.startswith("add "):
        email.headers[change[4:]] = "1"
    else:
        email.headers[change] = str(int(email.headers[change]) + 1)
    assert verify_signature(email, KEY) is False
    assert AdmissionPolicy(KEY).check(email) is DropReason.BAD_SIGNATURE


def test_what_the_signature_does_not_cover() -> None:
    """From, To and user headers are outside the MAC (docs/security.md says so)."""
    email = signed_email("/t", "body", KEY)
    email.from_ = "mallory@evil.test"
    email.recipients = EmailRecipients(to=["someone@else.test"])
    email.headers["Priority"] = "urgent"
    assert verify_signature(email, KEY) is True


def test_signature_format() -> None:
    email = signed_email("/t", "body", KEY)
    value = email.headers[SIGNATURE_HEADER]
    assert value == compute_signature(email, KEY)
    assert re.fullmatch(r"v1 hmac-sha256 [A-Za-z0-9+/]{43}=", value)


def test_replays_are_refused() -> None:
    policy = AdmissionPolicy(KEY, max_age=600)
    email = signed_email("/t", "x", KEY)
    assert policy.check(email) is None
    assert policy.check(email) is DropReason.REPLAY  # the same Message-ID again
    now = time.time_ns()
    old = signed_email("/t", "x", KEY, timestamp_ns=now - 601 * 10**9)
    assert policy.check(old) is DropReason.REPLAY
    skew = int(MAX_CLOCK_SKEW * 10**9)
    future = signed_email("/t", "x", KEY, timestamp_ns=now + skew + 60 * 10**9)
    assert policy.check(future) is DropReason.REPLAY
    slightly_ahead = signed_email("/t", "x", KEY, timestamp_ns=now + skew // 2)
    assert policy.check(slightly_ahead) is None
    nearly_too_old = signed_email("/t", "x", KEY, timestamp_ns=now - 590 * 10**9)
    assert policy.check(nearly_too_old) is None
    no_id = signed_email("/t", "x", KEY)
    no_id.message_id = ""
    sign_email(no_id, KEY)
    assert policy.check(no_id) is DropReason.REPLAY


def test_a_refused_forgery_does_not_burn_the_genuine_message_id() -> None:
    policy = AdmissionPolicy(KEY)
    genuine = signed_email("/t", "genuine", KEY)
    forged = signed_email("/t", "forged", WRONG_KEY, message_id=genuine.message_id)
    assert policy.check(forged) is DropReason.BAD_SIGNATURE
    assert policy.check(genuine) is None


class FakeClock:
    """Wall-clock seconds that move only when a test says so."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def ns(self, offset: float = 0.0) -> int:
        """The clock, plus ``offset`` seconds, in nanoseconds (a Source-Timestamp)."""
        return int((self.now + offset) * 10**9)


class Stream:
    """Signed emails with fresh Message-IDs, built fast (one email re-stamped and
    re-signed: the policy keeps only a digest of each Message-ID)."""

    def __init__(self) -> None:
        self.email = signed_email("/stream", "x", KEY)
        self.count = 0

    def next(self, timestamp_ns: int) -> EmailData:
        self.count += 1
        self.email.message_id = f"<{self.count}.{time.time_ns()}@example.test>"
        self.email.headers["Source-Timestamp"] = str(timestamp_ns)
        sign_email(self.email, KEY)
        return self.email


@pytest.mark.timeout(300)
def test_fresh_mail_is_never_refused_once_the_old_memory_size_is_exceeded() -> None:
    """One sender 2 minutes fast (inside the allowed skew) among correct clocks, at
    500 emails/s for longer than the former 200 000-id memory spanned (~400 s):
    every fresh email is accepted, and so is a genuine email delayed 10 minutes."""
    clock = FakeClock()
    policy = AdmissionPolicy(KEY, max_age=3600, clock=clock)
    stream = Stream()
    refused = []
    accepted_ids = []
    for index in range(250_000):
        clock.now += 0.002
        fast = index % 5 == 0
        email = stream.next(clock.ns(120.0 if fast else 0.0))
        reason = policy.check(email)
        if reason is not None:
            refused.append((index, fast, reason))
        elif index % 1000 == 0:
            accepted_ids.append(email.message_id)
    assert refused == []
    assert policy.remembered == 250_000  # nothing older than max-age yet: all remembered
    delayed = signed_email("/t", "delayed", KEY, timestamp_ns=clock.ns(-600.0))
    assert policy.check(delayed) is None
    assert policy.check(signed_email("/t", "fresh", KEY, timestamp_ns=clock.ns())) is None
    # and every sampled accepted email replayed now is refused
    replay = signed_email("/t", "x", KEY)
    for message_id in accepted_ids:
        replay.message_id = message_id
        sign_email(replay, KEY)
        assert policy.check(replay) is DropReason.REPLAY


def test_a_genuine_email_delayed_10_minutes_is_accepted() -> None:
    clock = FakeClock()
    policy = AdmissionPolicy(KEY, max_age=3600, clock=clock)
    stream = Stream()
    for _ in range(1000):
        clock.now += 1.0
        assert policy.check(stream.next(clock.ns())) is None
    delayed = signed_email("/t", "late", KEY, timestamp_ns=clock.ns(-600.0))
    assert policy.check(delayed) is None
    assert policy.check(delayed) is DropReason.REPLAY


def test_a_replay_of_any_accepted_email_inside_max_age_is_refused() -> None:
    """Emails stamped anywhere in the accepted range (max-age old to MAX_CLOCK_SKEW
    ahead) over many memory slices; each one replayed at random later times, up to
    and past the moment it is forgotten, is always refused."""
    rng = random.Random(8)
    max_age = 600.0
    clock = FakeClock()
    policy = AdmissionPolicy(KEY, max_age=max_age, clock=clock)
    accepted: list[tuple[str, int]] = []
    replays = 0
    for _ in range(3000):
        clock.now += rng.uniform(0.0, 2.0)
        offset = rng.uniform(-max_age + 0.001, MAX_CLOCK_SKEW - 0.001)
        email = signed_email("/t", "x", KEY, timestamp_ns=clock.ns(offset))
        assert policy.check(email) is None
        accepted.append((email.message_id, int(email.headers["Source-Timestamp"])))
        for message_id, stamp in rng.sample(accepted, min(3, len(accepted))):
            again = signed_email("/t", "x", KEY, message_id=message_id, timestamp_ns=stamp)
            assert policy.check(again) is DropReason.REPLAY
            replays += 1
    assert replays > 8000
    # the newest email, stamped as far ahead as allowed: refused right up to the
    # moment it ages out, and after
    newest = signed_email("/t", "x", KEY, timestamp_ns=clock.ns(MAX_CLOCK_SKEW - 0.001))
    assert policy.check(newest) is None
    stamp_s = int(newest.headers["Source-Timestamp"]) / 1e9
    for at in (stamp_s + max_age - 1.0, stamp_s + max_age - 0.01, stamp_s + max_age + 0.01):
        clock.now = at
        assert policy.check(newest) is DropReason.REPLAY
    clock.now += max_age * 3  # long after: everything is forgotten, and too old anyway
    assert policy.check(signed_email("/t", "x", KEY, timestamp_ns=clock.ns())) is None
    assert policy.remembered == 1
    for message_id, stamp in accepted[-50:]:
        again = signed_email("/t", "x", KEY, message_id=message_id, timestamp_ns=stamp)
        assert policy.check(again) is DropReason.REPLAY


def test_the_replay_memory_stays_bounded_and_refuses_new_mail_when_full(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="emailmw.security")
    clock = FakeClock()
    policy = AdmissionPolicy(KEY, max_age=60, capacity=1000, clock=clock)
    stream = Stream()
    accepted = []
    outcomes: dict[DropReason | None, int] = {}
    for _ in range(5000):
        clock.now += 0.001
        email = stream.next(clock.ns())
        reason = policy.check(email)
        outcomes[reason] = outcomes.get(reason, 0) + 1
        if reason is None:
            accepted.append(email.message_id)
        assert policy.remembered <= 1000
    assert outcomes == {None: 1000, DropReason.REPLAY_MEMORY_FULL: 4000}
    full = [r for r in caplog.records if "replay memory is full" in r.getMessage()]
    assert len(full) == 1 and full[0].levelno == logging.WARNING  # not one line per email
    # a replay of a remembered id is still a replay, full or not
    replay = signed_email("/t", "x", KEY, message_id=accepted[0], timestamp_ns=clock.ns())
    assert policy.check(replay) is DropReason.REPLAY
    # once the oldest ids are older than max-age (+ skew, + one slice), they go, and
    # new mail is accepted again
    clock.now += 60 + MAX_CLOCK_SKEW + (60 + MAX_CLOCK_SKEW) / 16 + 1
    assert policy.check(stream.next(clock.ns())) is None
    assert policy.remembered == 1
    room = [r for r in caplog.records if "has room again" in r.getMessage()]
    assert len(room) == 1 and "4000" in room[0].getMessage()


def test_a_steady_stream_keeps_the_memory_at_rate_times_max_age() -> None:
    """100 emails/s for 20 minutes with max-age 60 s: the memory holds about
    100 x (60 + 300) ids, never the whole stream."""
    clock = FakeClock()
    policy = AdmissionPolicy(KEY, max_age=60, clock=clock)
    stream = Stream()
    peak = 0
    for _ in range(120_000):
        clock.now += 0.01
        assert policy.check(stream.next(clock.ns())) is None
        peak = max(peak, policy.remembered)
    retention = 60 + MAX_CLOCK_SKEW
    assert 100 * retention <= peak <= 100 * (retention + 2 * retention / 16) + 1
    assert policy.remembered <= peak


def test_a_full_replay_memory_is_counted_by_the_context(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(security_module, "REPLAY_MEMORY_CAPACITY", 2)
    with Context(Options(intraprocess=True, signing_key=KEY.decode())) as ctx:
        sub = Subscription("/full", context=ctx)
        pub = Publisher("/full", context=ctx)
        for body in ("one", "two", "three"):
            pub.publish(body)
        assert wait_for_message(sub, timeout=10.0) == "one"
        assert wait_for_message(sub, timeout=10.0) == "two"
        wait_until(lambda: ctx.stats().dropped["replay_memory_full"] == 1)
        assert sub.get_message() is None


@pytest.mark.parametrize(
    ("allowed", "sender", "admitted"),
    [
        (["bob@example.test"], "bob@example.test", True),
        (["bob@example.test"], "BOB@Example.Test", True),
        (["bob@example.test"], "alice@example.test", False),
        (["example.test"], "alice@example.test", True),
        (["@example.test"], "alice@EXAMPLE.test", True),
        (["example.test"], "alice@sub.example.test", False),
        (["example.test"], "alice@example.test.evil.test", False),
        (["example.test"], "example.test@evil.test", False),
        (["bob@example.test"], "", False),
        ([" Bob@Example.Test "], "bob@example.test", True),
    ],
)
def test_allowed_senders(allowed: list[str], sender: str, admitted: bool) -> None:
    policy = AdmissionPolicy(None, allowed_senders=allowed)
    email = signed_email("/t", "x", None, from_=sender)
    assert policy.check(email) is (None if admitted else DropReason.SENDER_NOT_ALLOWED)


def test_allowed_senders_are_checked_before_the_signature() -> None:
    policy = AdmissionPolicy(KEY, allowed_senders=["bob@example.test"])
    email = signed_email("/t", "x", KEY, from_="alice@example.test")
    assert policy.check(email) is DropReason.SENDER_NOT_ALLOWED
    assert policy.check(signed_email("/t", "x", KEY, from_="bob@example.test")) is None


def test_no_key_and_no_senders_admits_everything() -> None:
    assert not AdmissionPolicy(None).active
    assert AdmissionPolicy(KEY).active
    assert AdmissionPolicy(None, allowed_senders=["x.test"]).active


# ============================================================================ intraprocess


def test_intraprocess_signed_traffic_flows_and_injections_are_dropped() -> None:
    options = Options(intraprocess=True, signing_key=KEY.decode())
    with Context(options) as ctx:
        sub = Subscription("/t", context=ctx)
        server = ServiceServer("/s", context=ctx)
        client = ServiceClient("/s", context=ctx)
        Publisher("/t", context=ctx).publish("signed")
        assert wait_for_message(sub, timeout=5.0) == "signed"
        seq = client.send_request("question")
        request = wait_for_request(server, timeout=5.0)
        server.send_response(request.id, "answer")
        assert wait_for_response(seq, client, timeout=5.0) == "answer"
        receiver = ctx._receiver
        assert hasattr(receiver, "deliver")
        unsigned = signed_email("/t", "unsigned", None)
        receiver.deliver(unsigned)
        receiver.deliver(signed_email("/t", "wrong key", WRONG_KEY))
        genuine = signed_email("/t", "genuine", KEY)
        receiver.deliver(genuine)
        receiver.deliver(genuine)  # replayed
        Publisher("/t", context=ctx).publish("after")
        assert wait_for_message(sub, timeout=5.0) == "genuine"
        assert wait_for_message(sub, timeout=5.0) == "after"
        dropped = ctx.stats().dropped
    assert (dropped["unsigned"], dropped["bad_signature"], dropped["replay"]) == (1, 1, 1)


# ============================================================================ real mail stack


@dataclass
class Captured:
    """A genuine signed message, request and response, as Dovecot stored them."""

    topic: str
    service: str
    message: bytes
    request: bytes
    response: bytes


@pytest.fixture(scope="module")
def captured(dev_server: DevServer) -> Captured:
    """Send a signed message, request and response through Postfix; keep their bytes."""
    folder, address = dev_server.new_mailbox("alice")
    topic, service = f"/sec/{folder}", f"/svc/{folder}"
    options = server_options(dev_server, folder, address, **{"signing-key": KEY.decode()})
    with Context(options) as ctx:
        sub = Subscription(topic, context=ctx)
        server = ServiceServer(service, context=ctx)
        client = ServiceClient(service, context=ctx)
        Publisher(topic, context=ctx).publish("genuine message")
        assert wait_for_message(sub, timeout=30.0) == "genuine message"
        seq = client.send_request("genuine request")
        request = wait_for_request(server, timeout=30.0)
        server.send_response(request.id, "genuine response")
        assert wait_for_response(seq, client, timeout=30.0) == "genuine response"
        assert ctx.stats().dropped_total == 0
    raws = stored_emails(dev_server, folder, 3)
    kinds: dict[str, bytes] = {}
    for raw in raws:
        email = decoded(raw)
        assert verify_signature(email, KEY) is True
        if "Publisher-GID" in email.headers:
            kinds["message"] = raw
        elif email.in_reply_to:
            kinds["response"] = raw
        else:
            kinds["request"] = raw
    return Captured(topic, service, kinds["message"], kinds["request"], kinds["response"])


class Victim:
    """A signing receiver on a fresh folder; :meth:`inject` appends one email, then a
    valid sentinel, and reports what the email alone caused."""

    def __init__(self, server: DevServer, topics: list[str], **email: Any) -> None:
        self.server = server
        self.folder, self.address = server.new_mailbox("alice")
        self.options = server_options(server, self.folder, self.address, **email)
        self.sentinel_key = self.options.resolve_signing_key()
        self.ctx = Context(self.options).init()
        self.subs = {topic: Subscription(topic, context=self.ctx) for topic in topics}
        self.sentinel_topic = f"/sentinel/{self.folder}"
        self.sentinel = Subscription(self.sentinel_topic, context=self.ctx)
        self.count = 0
        self.before = dict(self.ctx.stats().dropped)

    def append(self, raw: bytes) -> None:
        self.server.append("alice", raw, self.folder)

    def inject(self, raw: bytes, *, sentinel_from: str = "alice@example.test") -> Any:
        """Append ``raw``; return ``(drops caused, messages delivered on our topics)``."""
        self.append(raw)
        return self.settle(sentinel_from=sentinel_from)

    def settle(self, *, sentinel_from: str = "alice@example.test") -> Any:
        self.count += 1
        body = f"sentinel {self.count}"
        self.append(raw_signed(self.sentinel_topic, body, self.sentinel_key, from_=sentinel_from))
        assert wait_for_message(self.sentinel, timeout=30.0) == body
        now = dict(self.ctx.stats().dropped)
        drops = {k: now[k] - self.before[k] for k in now if now[k] != self.before[k]}
        self.before = now
        delivered = [m for sub in self.subs.values() for m in drain(sub)]
        return drops, delivered

    def close(self) -> None:
        self.ctx.shutdown()


@pytest.fixture
def victim_factory(dev_server: DevServer) -> Iterator[Any]:
    victims: list[Victim] = []

    def make(topics: list[str], **email: Any) -> Victim:
        victim = Victim(dev_server, topics, **email)
        victims.append(victim)
        return victim

    yield make
    for victim in victims:
        victim.close()


def _with(raw: bytes, **changes: Any) -> bytes:
    """Decode, change fields, encode again; the signature header is kept as it was."""
    email = decoded(raw)
    for name, value in changes.items():
        if name == "topic":
            email.content.subject = value
        elif name == "body":
            email.content.body = value
        elif name in ("message_id", "in_reply_to", "from_"):
            setattr(email, name, value)
        else:
            email.headers[name.replace("_", "-")] = value
    return reencoded(email)


def _resigned(raw: bytes, key: bytes, **changes: Any) -> bytes:
    """Like :func:`_with`, then signed again with ``key`` (a new Message-ID unless given)."""
    changes.setdefault("message_id", new_message_id("example.test"))
    email = decoded(_with(raw, **changes))
    sign_email(email, key)
    return reencoded(email)


@pytest.mark.mailstack
def test_signed_traffic_flows_over_the_mail_servers(captured: Captured) -> None:
    """The fixture sent a message, a request and a response with a key, and a signing
    receiver took all three; here: every stored email carries a valid signature."""
    for raw in (captured.message, captured.request, captured.response):
        email = decoded(raw)
        assert email.headers[SIGNATURE_HEADER].startswith("v1 hmac-sha256 ")
        assert verify_signature(email, KEY) is True
        assert verify_signature(email, WRONG_KEY) is False


@pytest.mark.mailstack
def test_forged_altered_replayed_and_unsigned_emails_are_dropped(
    captured: Captured, victim_factory: Any
) -> None:
    other_topic = captured.topic + "/other"
    victim: Victim = victim_factory(
        [captured.topic, other_topic, captured.service], **{"signing-key": KEY.decode()}
    )
    message = captured.message
    now = time.time_ns()
    skew_ns = int(MAX_CLOCK_SKEW * 10**9)
    cases: list[tuple[str, bytes, dict[str, int], list[str]]] = [
        ("genuine, first time", message, {}, ["genuine message"]),
        ("body altered (re-encoded)", _with(message, body="forged"), {"bad_signature": 1}, []),
        (
            "body altered (bytes)",
            message.replace(b"genuine message", b"GENUINE MESSAGE"),
            {"bad_signature": 1},
            [],
        ),
        ("topic altered", _with(message, topic=other_topic), {"bad_signature": 1}, []),
        ("Publisher-GID altered", _with(message, Publisher_GID="12345"), {"bad_signature": 1}, []),
        (
            "Source-Timestamp refreshed",
            _with(message, Source_Timestamp=str(now)),
            {"bad_signature": 1},
            [],
        ),
        (
            "Message-ID changed to dodge replay detection",
            _with(message, message_id=new_message_id("example.test")),
            {"bad_signature": 1},
            [],
        ),
        (
            "In-Reply-To added",
            _with(message, in_reply_to="<r@example.test>"),
            {"bad_signature": 1},
            [],
        ),
        ("signature removed", strip_signature(message), {"unsigned": 1}, []),
        (
            "signature garbled",
            _with(message, Emailmw_Signature="v1 hmac-sha256 AAAA"),
            {"bad_signature": 1},
            [],
        ),
        (
            "a new message signed with a wrong key",
            _resigned(message, WRONG_KEY, body="wrong key", Source_Timestamp=str(now)),
            {"bad_signature": 1},
            [],
        ),
        (
            "an old message re-signed with the right key (older than max-age)",
            _resigned(message, KEY, body="too old", Source_Timestamp=str(now - 25 * HOUR_NS)),
            {"replay": 1},
            [],
        ),
        (
            "from the future, beyond the clock-skew allowance",
            _resigned(message, KEY, body="future", Source_Timestamp=str(now + 2 * skew_ns)),
            {"replay": 1},
            [],
        ),
        (
            "control: re-signed with the right key, fresh id and time",
            _resigned(message, KEY, body="re-signed", Source_Timestamp=str(time.time_ns())),
            {},
            ["re-signed"],
        ),
        ("request altered", _with(captured.request, body="forged"), {"bad_signature": 1}, []),
        (
            "response altered",
            _with(captured.response, body="forged answer"),
            {"bad_signature": 1},
            [],
        ),
        (
            "response re-pointed to another request",
            _with(captured.response, in_reply_to="<other@example.test>"),
            {"bad_signature": 1},
            [],
        ),
        (
            "response turned into a request",
            _with(captured.response, in_reply_to=None),
            {"bad_signature": 1},
            [],
        ),
    ]
    leaked, miscounted = [], []
    for name, raw, drops, delivered in cases:
        got_drops, got_delivered = victim.inject(raw)
        if got_delivered != delivered:
            leaked.append(f"{name}: delivered {got_delivered}, expected {delivered}")
        if got_drops != drops:
            miscounted.append(f"{name}: counted {got_drops}, expected {drops}")
    # the genuine bytes again: a replay (the IMAP receiver may already call it a duplicate)
    got_drops, got_delivered = victim.inject(message)
    if got_delivered:
        leaked.append(f"replayed bytes: delivered {got_delivered}")
    if got_drops not in ({"replay": 1}, {"duplicate": 1}):
        miscounted.append(f"replayed bytes: counted {got_drops}")
    assert not leaked, "\n".join(leaked)
    # each drop is counted under what is wrong with the email (forged copies that keep
    # the genuine Message-ID are bad signatures, not harmless duplicates)
    assert not miscounted, "\n".join(miscounted)
    assert victim.ctx._polling_manager.running


@pytest.mark.mailstack
def test_a_forgery_arriving_first_does_not_suppress_the_genuine_email(
    captured: Captured, victim_factory: Any
) -> None:
    """A forged copy that carries the genuine Message-ID (an attacker on the path saw
    it) is dropped, and must not make the genuine email look like a duplicate."""
    victim: Victim = victim_factory([captured.topic], **{"signing-key": KEY.decode()})
    victim.append(_with(captured.message, body="forged first"))
    drops, delivered = victim.inject(captured.message)
    assert drops == {"bad_signature": 1}
    assert delivered == ["genuine message"]


@pytest.mark.mailstack
def test_old_but_valid_replay_window_follows_max_age(
    captured: Captured, victim_factory: Any
) -> None:
    """max-age from the config: a re-signed message 2 minutes old passes with the
    default (24 h) and is a replay with max-age 60 s."""
    topic = captured.topic
    two_minutes_ago = str(time.time_ns() - 120 * 10**9)
    lenient: Victim = victim_factory([topic], **{"signing-key": KEY.decode()})
    strict: Victim = victim_factory([topic], **{"signing-key": KEY.decode(), "max-age": 60})
    raw = _resigned(captured.message, KEY, body="two minutes old", Source_Timestamp=two_minutes_ago)
    assert lenient.inject(raw) == ({}, ["two minutes old"])
    assert strict.inject(raw) == ({"replay": 1}, [])


@pytest.mark.mailstack
def test_a_receiver_with_a_key_drops_mail_from_senders_without_one(
    dev_server: DevServer, victim_factory: Any
) -> None:
    victim: Victim = victim_factory([], **{"signing-key": KEY.decode()})
    topic = f"/unsigned/{victim.folder}"
    sub = Subscription(topic, context=victim.ctx)
    plain = server_options(dev_server, victim.folder, victim.address)
    wrong = server_options(
        dev_server, victim.folder, victim.address, **{"signing-key": WRONG_KEY.decode()}
    )
    for options in (plain, wrong):
        plain_sender = SmtpEmailSender(options.smtp_settings())
        key = options.resolve_signing_key()
        sender = plain_sender if key is None else SigningSender(plain_sender, key)
        try:
            sender.connect()
            email = signed_email(topic, "not for you", None)
            sender.send(email.content, email.headers)
        finally:
            sender.close()
    stored_emails(dev_server, victim.folder, 2)  # both stored: the sentinel comes after them
    drops, _ = victim.settle()
    assert drops == {"unsigned": 1, "bad_signature": 1}
    assert sub.get_message() is None


@pytest.mark.mailstack
def test_allowed_senders_without_signing_are_spoofable(
    dev_server: DevServer, victim_factory: Any
) -> None:
    """allowed-senders alone stops honest mistakes only: a forged From passes."""
    victim: Victim = victim_factory(["/t"], **{"allowed-senders": ["bob@example.test"]})
    from_alice = raw_signed("/t", "from alice", None, from_="alice@example.test")
    from_bob = raw_signed("/t", "from bob", None, from_="bob@example.test")
    spoofed = raw_signed("/t", "mallory as bob", None, from_="Bob <bob@example.test>")
    assert victim.inject(from_alice, sentinel_from="bob@example.test") == (
        {"sender_not_allowed": 1},
        [],
    )
    assert victim.inject(from_bob, sentinel_from="bob@example.test") == ({}, ["from bob"])
    assert victim.inject(spoofed, sentinel_from="bob@example.test") == ({}, ["mallory as bob"])


@pytest.mark.mailstack
def test_allowed_senders_with_signing_stop_spoofing(
    dev_server: DevServer, victim_factory: Any
) -> None:
    victim: Victim = victim_factory(
        ["/t"], **{"allowed-senders": ["example.test"], "signing-key": KEY.decode()}
    )
    spoofed = raw_signed("/t", "mallory", None, from_="bob@example.test")
    outsider = raw_signed("/t", "outsider", KEY, from_="carol@other.test")
    insider = raw_signed("/t", "insider", KEY, from_="bob@example.test")
    assert victim.inject(spoofed) == ({"unsigned": 1}, [])
    assert victim.inject(outsider) == ({"sender_not_allowed": 1}, [])
    assert victim.inject(insider) == ({}, ["insider"])


@pytest.mark.mailstack
def test_allowed_senders_over_smtp(dev_server: DevServer, victim_factory: Any) -> None:
    """Mail really sent by bob (his account, his From) passes; alice's is dropped."""
    victim: Victim = victim_factory(["/t"], **{"allowed-senders": "bob@example.test"})
    for account in ("alice", "bob"):
        sender = SmtpEmailSender(
            Options.from_dict(dev_server.config(account, to=victim.address)).smtp_settings()
        )
        try:
            email = signed_email("/t", f"from {account}", None)
            sender.send(email.content, email.headers)
        finally:
            sender.close()
    stored_emails(dev_server, victim.folder, 2)  # both stored: the sentinel comes after them
    drops, delivered = victim.settle(sentinel_from="bob@example.test")
    assert drops == {"sender_not_allowed": 1}
    assert delivered == ["from bob"]


# ============================================================================ TLS


@pytest.mark.mailstack
@pytest.mark.parametrize("tls", ["starttls", "implicit"])
@pytest.mark.parametrize("part", ["smtp", "imap"])
def test_certificates_are_verified_by_default(dev_server: DevServer, tls: str, part: str) -> None:
    """No ca-file: the system CAs do not know the dev server's CA, so nothing connects."""
    config = dev_server.config("alice", tls=tls)
    del config["email"]["tls"]
    options = Options.from_dict(config)
    assert options.tls.verify is True
    transport = (
        SmtpEmailSender(options.smtp_settings())
        if part == "smtp"
        else ImapEmailReceiver(options.imap_settings())
    )
    try:
        with pytest.raises(TlsError, match=r"certificate verify|verification"):
            transport.connect()
    finally:
        transport.close()


@pytest.mark.mailstack
@pytest.mark.parametrize("part", ["smtp", "imap"])
def test_host_names_are_verified(dev_server: DevServer, part: str) -> None:
    """A trusted certificate for another name (127.0.0.1/localhost, not
    mail.example.test) is refused."""
    config = dev_server.config("alice")
    user = config["email"]["user"]
    user["url-smtp"] = f"smtp://mail.example.test:{dev_server.smtp_port}"
    user["url-imap"] = f"imap://mail.example.test:{dev_server.imap_port}"
    options = Options.from_dict(config)
    with resolve_to_loopback("mail.example.test"):
        transport = (
            SmtpEmailSender(options.smtp_settings())
            if part == "smtp"
            else ImapEmailReceiver(options.imap_settings())
        )
        try:
            with pytest.raises(TlsError, match=r"mail\.example\.test|[Hh]ostname|match"):
                transport.connect()
        finally:
            transport.close()


@pytest.fixture
def fake_server(request: pytest.FixtureRequest) -> Iterator[FakeSmtp | FakeImap]:
    """A plain-text SMTP or IMAP server on 127.0.0.1 that offers no STARTTLS (as if an
    attacker stripped it), refuses every credential and records every line it hears."""
    server = FakeSmtp(auth_reply="535 5.7.8 no") if request.param == "smtp" else FakeImap()
    with server:
        yield server


def _fake_options(fake: FakeSmtp | FakeImap, host: str, **tls: Any) -> Options:
    port = fake.port
    return Options.from_dict(
        {
            "email": {
                "user": {
                    "url-smtp": f"smtp://{host}:{port}",
                    "url-imap": f"imap://{host}:{port}",
                    "username": "alice@example.test",
                    "password": "hunter2-secret",
                },
                "recipients": {"to": "alice@example.test"},
                "timeout": 5,
                "tls": tls,
            }
        }
    )


def _connect(fake: FakeSmtp | FakeImap, options: Options) -> None:
    transport = (
        SmtpEmailSender(options.smtp_settings())
        if isinstance(fake, FakeSmtp)
        else ImapEmailReceiver(options.imap_settings())
    )
    try:
        transport.connect()
    finally:
        transport.close()


def _credentials_sent(fake: FakeSmtp | FakeImap) -> bool:
    return any(
        re.search(r"\b(LOGIN|AUTHENTICATE|AUTH)\b", line, re.IGNORECASE) for line in fake.commands
    )


@pytest.mark.parametrize("fake_server", ["smtp", "imap"], indirect=True)
def test_no_credentials_in_plain_text_to_a_remote_host(fake_server: FakeSmtp | FakeImap) -> None:
    """The server is loopback, but the name we dial is not: the code must treat it as
    remote, see no STARTTLS, and refuse before any credential leaves."""
    options = _fake_options(fake_server, "mail.example.test")
    with resolve_to_loopback("mail.example.test"), pytest.raises(TlsError) as info:
        _connect(fake_server, options)
    assert "plain text" in str(info.value)
    assert "allow-insecure" in str(info.value)
    assert "hunter2-secret" not in str(info.value)
    assert fake_server.commands, "it never even connected"
    assert not _credentials_sent(fake_server), fake_server.commands


@pytest.mark.parametrize("fake_server", ["smtp", "imap"], indirect=True)
def test_allow_insecure_permits_plain_text_credentials(fake_server: FakeSmtp | FakeImap) -> None:
    options = _fake_options(fake_server, "mail.example.test", **{"allow-insecure": True})
    with resolve_to_loopback("mail.example.test"), pytest.raises(AuthenticationError):
        _connect(fake_server, options)  # the fake refuses them, but they were sent
    assert _credentials_sent(fake_server)


@pytest.mark.parametrize("fake_server", ["smtp", "imap"], indirect=True)
def test_plain_text_credentials_to_loopback_are_allowed(fake_server: FakeSmtp | FakeImap) -> None:
    """Documented exception: loopback never leaves the machine."""
    with pytest.raises(AuthenticationError):
        _connect(fake_server, _fake_options(fake_server, "127.0.0.1"))
    assert _credentials_sent(fake_server)
