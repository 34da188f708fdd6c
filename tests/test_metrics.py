"""Metrics and health: histograms, Context.metrics(), Context.connection_state and the
metrics-port endpoint, on the intraprocess transport and on the real mail stack."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from mailstack import require_mailstack

import emailmw
from emailmw import ConnectionState
from emailmw.devserver import DevServer
from emailmw.metrics import LATENCY_BUCKETS, Histogram

pytestmark = pytest.mark.timeout(60)


def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait (in 20 ms sleeps) until ``check()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


# -- Histogram ------------------------------------------------------------------------------


def test_buckets_are_log_spaced_from_10_us_to_100_s() -> None:
    assert LATENCY_BUCKETS[0] == pytest.approx(1e-5)
    assert LATENCY_BUCKETS[-1] == pytest.approx(100.0)
    ratios = {round(b / a, 3) for a, b in itertools.pairwise(LATENCY_BUCKETS)}
    assert ratios == {round(10**0.25, 3)}


def test_histogram_counts_each_value_in_its_bucket() -> None:
    histogram = Histogram((0.001, 0.01, 0.1))
    for value in (0.0005, 0.001, 0.002, 0.05, 0.1, 3.0, -1.0, math.nan):
        histogram.observe(value)
    snap = histogram.snapshot()
    # <= 1 ms: 0.0005, 0.001 (inclusive), and -1 and NaN counted as 0
    assert snap.counts == (4, 1, 2, 1)
    assert snap.count == 8
    assert snap.sum == pytest.approx(0.0005 + 0.001 + 0.002 + 0.05 + 0.1 + 3.0)
    assert snap.cumulative() == [(0.001, 4), (0.01, 5), (0.1, 7), (math.inf, 8)]
    assert snap.quantile(0.5) == 0.001
    assert snap.quantile(0.75) == 0.1
    assert snap.quantile(1.0) == math.inf
    assert math.isnan(Histogram().snapshot().quantile(0.5))
    with pytest.raises(ValueError, match="q must be"):
        snap.quantile(0)


def test_histogram_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="increasing"):
        Histogram((0.1, 0.1))
    with pytest.raises(ValueError, match="positive"):
        Histogram((0.0, 1.0))


def test_histogram_loses_no_count_across_threads() -> None:
    histogram = Histogram()
    per_thread, threads = 20_000, 4

    def work(value: float) -> None:
        for _ in range(per_thread):
            histogram.observe(value)

    workers = [threading.Thread(target=work, args=(0.001 * (i + 1),)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    snap = histogram.snapshot()
    assert snap.count == per_thread * threads
    assert snap.sum == pytest.approx(per_thread * 0.001 * (1 + 2 + 3 + 4))


def test_histogram_memory_is_bounded() -> None:
    histogram = Histogram()
    for i in range(10_000):
        histogram.observe(i * 1e-3)
    assert len(histogram.snapshot().counts) == len(LATENCY_BUCKETS) + 1


# -- intraprocess -----------------------------------------------------------------------------


def test_intraprocess_counters_histograms_and_state() -> None:
    ctx = emailmw.Context(emailmw.Options(intraprocess=True))
    assert ctx.connection_state is ConnectionState.DISCONNECTED
    assert ctx.metrics().histograms["send_seconds"].count == 0
    with ctx:
        assert ctx.connection_state is ConnectionState.CONNECTED
        assert ctx.connection_state == "connected"  # a str enum
        sub = emailmw.Subscription("/m", context=ctx)
        pub = emailmw.Publisher("/m", context=ctx)
        for i in range(5):
            pub.publish(f"m{i}")
        got = [emailmw.wait_for_message(sub, 5) for _ in range(5)]
        server = emailmw.ServiceServer("/s", context=ctx)
        client = emailmw.ServiceClient("/s", context=ctx)
        number = client.send_request("q")
        request = emailmw.wait_for_request(server, 5)
        server.send_response(request.id, "a")
        assert emailmw.wait_for_response(number, client, 5) == "a"
        metrics = ctx.metrics()
        assert metrics.connections == {"intraprocess": ConnectionState.CONNECTED}
    assert got == [f"m{i}" for i in range(5)]
    assert metrics.counters["sent"] == 7  # 5 messages, a request, a response
    assert metrics.counters["received"] == 7
    assert metrics.counters["delivered"] == 7
    assert metrics.counters["imap_commands"] == 0
    assert metrics.histograms["send_seconds"].count == 7
    assert metrics.histograms["delivery_seconds"].count == 7
    assert metrics.histograms["imap_command_seconds"].count == 0
    assert metrics.gauges["uptime_seconds"] > 0
    assert metrics.connection_state is ConnectionState.CONNECTED
    assert ctx.connection_state is ConnectionState.CLOSED
    assert ctx.metrics().connections == {"intraprocess": ConnectionState.CLOSED}


def test_connection_state_is_exported_from_the_package_root() -> None:
    assert emailmw.ConnectionState is ConnectionState
    assert {s.value for s in ConnectionState} >= {"connected", "reconnecting", "auth_failed"}


# -- the metrics endpoint ---------------------------------------------------------------------


def scrape(address: tuple[str, int]) -> dict[str, float]:
    """``GET /metrics``, parsed by prometheus_client's own parser: ``{sample: value}``
    where a sample is ``name{label="value",...}`` (labels sorted)."""
    from prometheus_client.parser import text_string_to_metric_families

    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_metrics_port_serves_the_prometheus_text_format() -> None:
    options = emailmw.Options(intraprocess=True, metrics_port=0)
    with emailmw.Context(options) as ctx:
        address = ctx.metrics_address
        assert address is not None and address[0] == "127.0.0.1" and address[1] > 0
        sub = emailmw.Subscription("/scraped", context=ctx)
        pub = emailmw.Publisher("/scraped", context=ctx)
        for i in range(3):
            pub.publish(str(i))
            emailmw.wait_for_message(sub, 5)
        samples = scrape(address)
        threads = {t.name for t in threading.enumerate()}
    assert samples["emailmw_sent_total"] == 3
    assert samples["emailmw_delivered_total"] == 3
    assert samples['emailmw_dropped_total{reason="duplicate"}'] == 0
    assert samples["emailmw_send_seconds_count"] == 3
    assert samples["emailmw_delivery_seconds_count"] == 3
    assert samples['emailmw_send_seconds_bucket{le="+Inf"}'] == 3
    assert samples['emailmw_connection_state{state="connected"}'] == 1
    assert samples['emailmw_connection_state{state="reconnecting"}'] == 0
    key = 'emailmw_transport_connection_state{connection="intraprocess",state="connected"}'
    assert samples[key] == 1
    assert "emailmw-metrics" in threads
    # stopped with the context: the port is free again
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=2)


def test_metrics_port_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client.exposition", None)  # not installed
    ctx = emailmw.Context(emailmw.Options(intraprocess=True, metrics_port=0))
    with pytest.raises(emailmw.ConfigError, match=r"emailmw\[metrics\]") as caught:
        ctx.init()
    assert caught.value.key == "email.metrics-port"


def test_metrics_port_in_use_is_a_config_error() -> None:
    with emailmw.Context(emailmw.Options(intraprocess=True, metrics_port=0)) as first:
        assert first.metrics_address is not None
        port = first.metrics_address[1]
        second = emailmw.Context(emailmw.Options(intraprocess=True, metrics_port=port))
        with pytest.raises(emailmw.ConfigError, match=f"127.0.0.1:{port}") as caught:
            second.init()
    assert caught.value.key == "email.metrics-port"


def test_without_metrics_port_prometheus_client_is_not_imported() -> None:
    code = (
        "import sys, emailmw\n"
        "with emailmw.Context(emailmw.Options(intraprocess=True)) as ctx:\n"
        "    emailmw.Publisher('/x', context=ctx).publish('x')\n"
        "    ctx.metrics()\n"
        "print(sorted(m for m in sys.modules if m.startswith('prometheus_client')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "[]"


# -- the real mail stack ----------------------------------------------------------------------


def options_for(server: DevServer, folder: str, **overrides: Any) -> emailmw.Options:
    config = server.config("alice", mailbox=folder)
    config["email"].update(overrides)
    return emailmw.Options.from_dict(config)


@pytest.mark.mailstack
@pytest.mark.timeout(90)
def test_dev_server_counters_and_histograms_fill(
    dev_server: DevServer, dev_mailbox: tuple[str, str]
) -> None:
    folder, _ = dev_mailbox
    with emailmw.Context(options_for(dev_server, folder, **{"metrics-port": 0})) as ctx:
        sub = emailmw.Subscription("/real", context=ctx)
        pub = emailmw.Publisher("/real", context=ctx)
        for i in range(3):
            pub.publish(f"r{i}")
        got = sorted(emailmw.wait_for_message(sub, 30) for _ in range(3))
        metrics = ctx.metrics()
        assert ctx.metrics_address is not None
        samples = scrape(ctx.metrics_address)
    assert got == ["r0", "r1", "r2"]
    assert metrics.connection_state is ConnectionState.CONNECTED
    assert metrics.connections == {
        "smtp": ConnectionState.CONNECTED,
        "imap": ConnectionState.CONNECTED,
    }
    assert metrics.counters["sent"] == 3
    assert metrics.counters["delivered"] == 3
    assert metrics.counters["imap_commands"] > 0
    assert metrics.counters["imap_bytes_received"] > 0
    send = metrics.histograms["send_seconds"]
    assert send.count == 3
    assert 0 < send.sum < 30  # each was accepted by Postfix
    delivery = metrics.histograms["delivery_seconds"]
    assert delivery.count == 3
    assert delivery.quantile(1.0) >= 1e-3  # through SMTP, LMTP and IMAP: not instant
    assert "UID FETCH" in metrics.imap_commands
    assert metrics.imap_commands["UID FETCH"].count >= 1
    merged = metrics.histograms["imap_command_seconds"]
    assert merged.count == sum(h.count for h in metrics.imap_commands.values())
    assert samples['emailmw_imap_command_seconds_count{command="UID FETCH"}'] >= 1
    assert samples['emailmw_transport_connection_state{connection="imap",state="connected"}'] == 1


@pytest.fixture
def own_server() -> Iterator[DevServer]:
    """A DevServer of this test's own: it may be stopped and kicked."""
    require_mailstack()
    with DevServer(accounts=("alice",)) as server:
        yield server


@pytest.mark.mailstack
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_connection_state_follows_a_kick_and_a_dovecot_stop(own_server: DevServer) -> None:
    folder, _ = own_server.new_mailbox("alice")
    with emailmw.Context(options_for(own_server, folder, timeout=2.0)) as ctx:
        assert ctx.connection_state is ConnectionState.CONNECTED
        tracker = ctx._counters.connections
        changes = tracker.changes
        own_server.kick("alice")
        # lost (reconnecting) and back (connected): two changes, and a reconnect counted
        eventually(lambda: tracker.changes >= changes + 2, 20, "a reconnect after the kick")
        eventually(lambda: ctx.connection_state is ConnectionState.CONNECTED, 20, "connected again")
        assert ctx.stats().reconnects >= 1
        own_server.stop_dovecot()
        try:
            eventually(
                lambda: ctx.connection_state is ConnectionState.RECONNECTING,
                30,
                "reconnecting while Dovecot is down",
            )
            assert ctx.metrics().connections["imap"] is ConnectionState.RECONNECTING
        finally:
            own_server.start_dovecot()
        eventually(
            lambda: ctx.connection_state is ConnectionState.CONNECTED,
            30,
            "connected once Dovecot is back",
        )
        # and traffic flows again
        sub = emailmw.Subscription("/after", context=ctx)
        emailmw.Publisher("/after", context=ctx).publish("back")
        assert emailmw.wait_for_message(sub, 30) == "back"


@pytest.mark.mailstack
def test_wrong_password_is_auth_failed(dev_server: DevServer, dev_mailbox: tuple[str, str]) -> None:
    folder, _ = dev_mailbox
    config = dev_server.config("alice", mailbox=folder)
    config["email"]["user"]["password"] = "not-the-password"
    ctx = emailmw.Context(emailmw.Options.from_dict(config))
    with pytest.raises(emailmw.AuthenticationError):
        ctx.init()
    assert ctx.connection_state is ConnectionState.AUTH_FAILED
    assert ctx.metrics().connections["smtp"] is ConnectionState.AUTH_FAILED
