"""emailmw across mail domains: a real Postfix + Dovecot per domain
(:class:`emailmw.devserver.Federation`), each on its own loopback address,
relaying to each other over SMTP, with store-and-forward through an outage.

The module shares one federation of ``a.test``, ``b.test`` and ``c.test``;
each test takes its own folders. The outage test stops ``b.test``'s Postfix
and starts it again before it ends.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import smtplib
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mailstack import load_benchmark, require_mailstack, stored_emails

import emailmw
from emailmw.devserver import DevServer, Federation
from emailmw.devserver.processes import Proc, listening_ports, read_pid_file

pytestmark = [pytest.mark.timeout(120), pytest.mark.mailstack]

WAIT = 30.0  # seconds: the longest any single wait here may take
DOMAINS = ("a.test", "b.test", "c.test")


@pytest.fixture(scope="module")
def fed() -> Iterator[Federation]:
    require_mailstack()
    with Federation(domains=DOMAINS, accounts=("alice", "bob")) as federation:
        yield federation


@pytest.fixture
def contexts() -> Iterator[Callable[[dict[str, Any]], emailmw.Context]]:
    """Make running contexts from config dicts; all shut down after the test."""
    made: list[emailmw.Context] = []

    def make(config: dict[str, Any]) -> emailmw.Context:
        ctx = emailmw.Context(emailmw.Options.from_dict(config)).init()
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.shutdown()


def received_chain(raw: bytes) -> list[str]:
    """The values of the ``Received:`` headers of a stored email, newest (the last hop) first."""
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [" ".join(str(h).split()) for h in message.get_all("Received", [])]


def masters(server: DevServer) -> list[Proc]:
    """The running Postfix and Dovecot masters of ``server`` (they hold the listeners)."""
    found = [
        read_pid_file(server.root / "postfix-spool" / "pid" / "master.pid"),
        read_pid_file(server.root / "dovecot" / "run" / "master.pid"),
    ]
    assert all(p is not None and p.alive() for p in found), found
    return [p for p in found if p is not None]


def smtp_send(server: DevServer, sender: str, to: str, subject: str) -> None:
    """Send one email through ``server``'s SMTP (STARTTLS, AUTH as the sender)."""
    account = server.account(sender)
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=ssl.create_default_context(cafile=str(server.ca_file)))
        smtp.login(account.address, account.password)
        body = f"From: {account.address}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nhi\r\n"
        smtp.sendmail(account.address, [to], body.encode())


# ----------------------------------------------------------------------------- the federation


def test_each_domain_listens_on_its_own_loopback_address_only(fed: Federation) -> None:
    assert fed.domains == list(DOMAINS)
    assert [fed.host(d) for d in DOMAINS] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    for domain in DOMAINS:
        server = fed.server(domain)
        assert server.domain == domain
        assert server.running and fed.smtp_running(domain)
        assert fed.account("alice", domain).address == f"alice@{domain}"
        ports = {server.smtp_port, server.smtps_port, server.imap_port, server.imaps_port}
        for port in ports:
            socket.create_connection((server.host, port), timeout=5).close()
        on_host: set[int] = set()
        for master in masters(server):  # bound to its own address: not 127.0.0.1, no wildcard
            on_host |= listening_ports(master.pid, server.host)
            assert not ports & listening_ports(master.pid, "127.0.0.1")
        assert ports <= on_host
        others = {d: (fed.host(d), fed.server(d).smtp_port) for d in DOMAINS if d != domain}
        assert server.relays == others


def test_mail_for_another_domain_travels_through_both_postfixes(fed: Federation) -> None:
    a, b = fed.server("a.test"), fed.server("b.test")
    folder, address = b.new_mailbox("bob")
    subject = f"relay {uuid.uuid4()}"
    smtp_send(a, "alice", address, subject)
    (raw,) = stored_emails(b, folder, 1, account="bob", timeout=WAIT)
    assert subject.encode() in raw
    hops = received_chain(raw)
    # newest first: Dovecot's LMTP, then b.test's Postfix from a.test's (over TLS,
    # from a.test's own address), then a.test's Postfix from the client
    relay_hop = next(h for h in hops if h.startswith("from mail.a.test"))
    assert "[127.0.0.2]" in relay_hop and "by mail.b.test (Postfix) with ESMTPS" in relay_hop
    assert any("by mail.a.test (Postfix) with ESMTPSA" in h for h in hops), hops
    assert fed.queued("a.test") == 0


def test_the_server_certificate_names_the_domains_own_address(fed: Federation) -> None:
    server = fed.server("c.test")
    context = ssl.create_default_context(cafile=str(server.ca_file))
    with (
        socket.create_connection((server.host, server.imaps_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server.host) as tls,
    ):
        assert tls.version() is not None
    other = ssl.create_default_context(cafile=str(fed.server("a.test").ca_file))
    with (
        socket.create_connection((server.host, server.imaps_port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        other.wrap_socket(raw, server_hostname=server.host)  # each domain its own CA


def test_config_reaches_only_its_own_domains_servers(fed: Federation) -> None:
    config = fed.config(
        "alice",
        "a.test",
        to=["bob@b.test", "bob@c.test"],
        reorder_window=7.5,
        recipients={"cc": ["alice@c.test"]},
    )
    section = config["email"]
    a = fed.server("a.test")
    assert section["user"]["url-smtp"] == f"smtp://127.0.0.2:{a.smtp_port}"
    assert section["user"]["url-imap"] == f"imap://127.0.0.2:{a.imap_port}"
    assert section["user"]["username"] == "alice@a.test"
    assert section["recipients"] == {"to": ["bob@b.test", "bob@c.test"], "cc": ["alice@c.test"]}
    assert section["reorder-window"] == 7.5
    assert section["tls"] == {"ca-file": str(a.ca_file)}
    assert fed.config("bob", "c.test", to="x@a.test")["email"]["recipients"] == {"to": ["x@a.test"]}
    with pytest.raises(KeyError, match=r"no domain 'd\.test'.*a\.test, b\.test, c\.test"):
        fed.config("alice", "d.test")


def test_write_config_writes_yaml_that_emailmw_loads(fed: Federation, tmp_path: Path) -> None:
    path = fed.write_config("bob", "b.test", tmp_path / "bob.yml", to="alice@a.test")
    assert path.stat().st_mode & 0o777 == 0o600  # it holds a password
    options = emailmw.Options.from_file(path)
    b = fed.server("b.test")
    assert (options.user.smtp.host, options.user.smtp.port) == ("127.0.0.3", b.smtp_port)
    assert (options.user.imap.host, options.user.imap.port) == ("127.0.0.3", b.imap_port)
    assert options.recipients.to == ["alice@a.test"]
    assert options.resolve_password() == b.account("bob").password
    default = fed.write_config("alice", "c.test")
    assert default == fed.server("c.test").root / "alice.yml"
    assert emailmw.Options.from_file(default).recipients.to == ["alice@c.test"]


def test_bad_federations_are_refused_with_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"domains named more than once: a\.test"):
        Federation(domains=("a.test", "A.test"))
    with pytest.raises(ValueError, match="at least one domain"):
        Federation(domains=())
    with pytest.raises(TypeError, match="not the str"):
        Federation(domains="a.test")
    with pytest.raises(ValueError, match=r"leave 127\.0\.0\.0/8"):
        Federation(domains=("a.test", "b.test"), first_host="127.255.255.255")
    with pytest.raises(ValueError, match="not an IPv4 loopback address"):
        DevServer(host="192.0.2.1")
    with pytest.raises(ValueError, match="invalid mail domain"):
        Federation(domains=("a.test", "no_domain"))


# ----------------------------------------------------------------------------- emailmw across it


def test_a_publisher_on_a_reaches_subscriptions_in_b_and_c(
    fed: Federation, contexts: Callable[[dict[str, Any]], emailmw.Context]
) -> None:
    b_folder, b_address = fed.new_mailbox("bob", "b.test")
    c_folder, c_address = fed.new_mailbox("alice", "c.test")
    own_folder, _ = fed.new_mailbox("alice", "a.test")
    on_b = contexts(fed.config("bob", "b.test", mailbox=b_folder))
    on_c = contexts(fed.config("alice", "c.test", mailbox=c_folder))
    on_a = contexts(fed.config("alice", "a.test", mailbox=own_folder, to=[b_address, c_address]))
    sub_b = emailmw.Subscription("/federated", context=on_b)
    sub_c = emailmw.Subscription("/federated", context=on_c)
    pub = emailmw.Publisher("/federated", context=on_a)
    messages = [f"message {i} from a.test" for i in range(10)]
    for message in messages:
        pub.publish(message)
    for sub in (sub_b, sub_c):
        got = [emailmw.wait_for_message(sub, WAIT) for _ in messages]
        assert got == messages
    # each came across a relay: a.test's Postfix handed it to the other domain's
    for server, folder, account in (
        (fed.server("b.test"), b_folder, "bob"),
        (fed.server("c.test"), c_folder, "alice"),
    ):
        stored = stored_emails(server, folder, len(messages), account=account)
        assert len(stored) == len(messages)
        for raw in stored:
            assert any(h.startswith("from mail.a.test") for h in received_chain(raw))
    assert on_b.stats().delivered == on_c.stats().delivered == len(messages)


def test_a_client_on_a_calls_a_server_on_b_and_the_response_comes_back(
    fed: Federation, contexts: Callable[[dict[str, Any]], emailmw.Context]
) -> None:
    server_folder, server_address = fed.new_mailbox("bob", "b.test")
    client_folder, client_address = fed.new_mailbox("alice", "a.test")
    on_b = contexts(fed.config("bob", "b.test", mailbox=server_folder))
    on_a = contexts(fed.config("alice", "a.test", mailbox=client_folder, to=server_address))
    seen: list[str] = []

    def double(request: str, info: emailmw.ServiceInfo) -> str:
        seen.append(request)
        return request * 2

    server = emailmw.ServiceServer("/double", handler=double, context=on_b)
    executor = emailmw.Executor(context=on_b)
    executor.add(server)
    spinner = threading.Thread(target=executor.spin, name="test-spin", daemon=True)
    spinner.start()
    try:
        client = emailmw.ServiceClient("/double", context=on_a)
        for word in ("ab", "ünï", "x y"):
            assert client.call(word, timeout=WAIT) == word * 2
    finally:
        executor.shutdown(5.0)
        spinner.join(5.0)
    assert seen == ["ab", "ünï", "x y"]
    # the requests crossed a.test -> b.test, the responses b.test -> a.test
    responses = stored_emails(fed.server("a.test"), client_folder, 3, account="alice")
    for raw in responses:
        assert any(h.startswith("from mail.b.test") for h in received_chain(raw))
        assert b"In-Reply-To:" in raw or b"In-reply-to:" in raw
    assert client_address.endswith("@a.test")


# ----------------------------------------------------------------------------- store and forward


OUTAGE = 30.0  # seconds b.test's SMTP stays down
PUBLISHES = 100
PUBLISH_BOUND = 2.0  # seconds: generous; a publish to a.test's Postfix takes ~5 ms here


@pytest.mark.timeout(240)
def test_store_and_forward_through_a_30_s_outage_of_the_receiving_domain(
    fed: Federation, contexts: Callable[[dict[str, Any]], emailmw.Context]
) -> None:
    b_folder, b_address = fed.new_mailbox("bob", "b.test")
    own_folder, _ = fed.new_mailbox("alice", "a.test")
    on_b = contexts(fed.config("bob", "b.test", mailbox=b_folder))
    on_a = contexts(fed.config("alice", "a.test", mailbox=own_folder, to=b_address))
    sub = emailmw.Subscription("/outage", context=on_b)
    pub = emailmw.Publisher("/outage", context=on_a)
    pub.publish("before")  # the route works
    assert emailmw.wait_for_message(sub, WAIT) == "before"

    messages = [f"queued {i:03d}" for i in range(PUBLISHES)]
    durations: list[float] = []
    fed.stop_smtp("b.test")
    down_at = time.monotonic()
    try:
        assert not fed.smtp_running("b.test")
        for message in messages:
            started = time.monotonic()
            pub.publish(message)
            durations.append(time.monotonic() - started)
        # a.test's Postfix holds every one of them (plus nothing else)
        deadline = time.monotonic() + WAIT
        while fed.queued("a.test") < PUBLISHES and time.monotonic() < deadline:
            time.sleep(0.1)  # Postfix's cleanup and qmgr write the queue files
        assert fed.queued("a.test") == PUBLISHES
        assert sub.get_message() is None  # nothing got through meanwhile
        remaining = OUTAGE - (time.monotonic() - down_at)
        assert remaining > 0, f"publishing took longer than the outage ({OUTAGE} s)"
        time.sleep(remaining)  # the outage itself
        assert fed.queued("a.test") == PUBLISHES
        assert sub.get_message() is None
    finally:
        fed.start_smtp("b.test")
    up_at = time.monotonic()

    assert max(durations) < PUBLISH_BOUND, (
        f"publish() blocked on the outage: slowest {max(durations):.3f} s "
        f"(median {sorted(durations)[len(durations) // 2]:.4f} s)"
    )
    got: list[str] = []
    deadline = up_at + 60.0
    while len(got) < PUBLISHES:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(got)} of {PUBLISHES} arrived within 60 s after the outage"
        got.append(emailmw.wait_for_message(sub, left))
    assert got == messages  # all, in publication order
    # none duplicated: once a.test's queue is empty, exactly one stored email per
    # publish, each its own Message-ID, and nothing more for the subscription
    deadline = time.monotonic() + WAIT
    while fed.queued("a.test") and time.monotonic() < deadline:
        time.sleep(0.1)  # Postfix removes a queue file after the delivery
    assert fed.queued("a.test") == 0
    stored = stored_emails(fed.server("b.test"), b_folder, PUBLISHES + 1, account="bob")
    assert len(stored) == PUBLISHES + 1
    ids = [
        email.message_from_bytes(raw, policy=email.policy.compat32)["Message-ID"] for raw in stored
    ]
    assert len(set(ids)) == len(ids)
    assert sub.get_message() is None
    stats = on_b.stats()
    assert stats.delivered == PUBLISHES + 1
    assert sum(stats.dropped.values()) == 0, stats.dropped


# ----------------------------------------------------------------------------- the benchmark


@pytest.mark.timeout(180)
def test_the_federation_benchmark_measures_every_row(fed: Federation) -> None:
    bench = load_benchmark("federation")
    for path, domain in bench.PATHS.items():
        row = bench.latency(fed, domain, "poll-10ms", 6, 20.0)
        assert (row["received"], row["in_order"], row["dropped"]) == (6, True, 0), (path, row)
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"]
        burst = bench.throughput(fed, domain, 20)
        assert (burst["received"], burst["in_order"]) == (20, True), (path, burst)
        assert burst["publish_per_s"] > 0 and burst["end_to_end_per_s"] > 0
    outage = bench.store_and_forward(fed, 5, 1.0)
    assert (outage["received"], outage["in_order"]) == (5, True), outage
    assert outage["queued_on_a_after_publishing"] == 5
    assert 0 < outage["first_after_up_s"] <= outage["last_after_up_s"]
    assert fed.smtp_running("b.test")
    assert bench.parse_mode("poll-25ms") == ("poll", 25_000_000)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown mode 'fast'"):
        bench.parse_mode("fast")
