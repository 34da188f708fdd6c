"""Load: 4 publisher processes x 4 subscriber processes x 2500 messages each, one account.

Each subscriber process must get all 10,000 messages exactly once (no loss, no
duplicate, no ``queue_full``), each publisher's messages in the order they were
published (Postfix stores them out of order; the dispatcher's reorder buffer
puts them back, see docs/architecture.md#order), every publish() must succeed,
and each subscriber's memory must stay flat: peak RSS under 200 MB, and little
growth between the first 2,500 messages and the end. The measured numbers
(duration, peak RSS, RSS growth, messages out of their publisher's order) are
printed and recorded as test properties; docs/guarantees.md quotes them.

The processes are this file run as a script (``python test_load.py subscriber
CONFIG`` / ``publisher CONFIG``); each prints ``ready``, then one JSON line with
its results.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from typing import Any

import pytest

PUBLISHERS = 4
SUBSCRIBERS = 4
PER_PUBLISHER = 2500
TOPIC = "/load"
PEAK_RSS_LIMIT_MB = 200.0
RSS_GROWTH_LIMIT_MB = 40.0
DEADLINE = 300.0  # seconds for the whole run, from the first publish


# ----------------------------------------------------------------------------- the processes


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    # VmHWM, the high-water mark of this process's own memory. Not
    # getrusage().ru_maxrss: Linux carries that across fork and exec, so a child
    # of a large pytest process reports the parent's size, not its own.
    return _status_mb("VmHWM")


def subscriber_main(config: dict[str, Any]) -> dict[str, Any]:
    import emailmw

    expected = PUBLISHERS * PER_PUBLISHER
    counts: dict[str, int] = {}
    last_index = [-1] * PUBLISHERS
    out_of_order = 0
    late: list[list[float]] = []
    max_latency = 0.0
    longest_gap = 0.0
    rss: dict[int, float] = {}
    with emailmw.Context(emailmw.Options.from_dict(config)) as ctx:
        sub = emailmw.Subscription(TOPIC, context=ctx)
        rss[0] = _rss_mb()
        print("ready", flush=True)
        started = time.monotonic()
        deadline = started + DEADLINE
        first_at = last_at = 0.0
        while len(counts) < expected and time.monotonic() < deadline:
            try:
                message, info = emailmw.wait_for_message_with_info(sub, deadline - time.monotonic())
            except emailmw.WaitTimeoutError:
                break
            now = time.monotonic()
            if last_at:
                longest_gap = max(longest_gap, now - last_at)
            last_at = now
            first_at = first_at or last_at
            counts[message] = counts.get(message, 0) + 1
            publisher, _, index = message.partition(":")
            p, i = int(publisher), int(index)
            latency = (
                info.received_timestamp.nanoseconds - info.source_timestamp.nanoseconds
            ) / 1e9
            max_latency = max(max_latency, latency)
            if i < last_index[p]:
                out_of_order += 1
                if len(late) < 10:  # publisher, index, the highest index before it, latency
                    late.append([p, i, last_index[p], round(latency, 2)])
            last_index[p] = max(last_index[p], i)
            if len(counts) % 2500 == 0 and counts[message] == 1:
                rss[len(counts)] = _rss_mb()
        quiet_until = time.monotonic() + 1.0  # only to see whether a late duplicate comes
        while (left := quiet_until - time.monotonic()) > 0:
            try:
                message = emailmw.wait_for_message(sub, left)
            except emailmw.WaitTimeoutError:
                break
            counts[message] = counts.get(message, 0) + 1
        stats = ctx.stats()
    wanted = {f"{p}:{i}" for p in range(PUBLISHERS) for i in range(PER_PUBLISHER)}
    return {
        "received": len(counts),
        "missing": sorted(wanted - counts.keys())[:50],
        "missing_count": len(wanted - counts.keys()),
        "duplicates": sum(n - 1 for n in counts.values()),
        "unexpected": sorted(counts.keys() - wanted)[:50],
        "out_of_order": out_of_order,
        "out_of_order_examples": late,
        "max_latency": max_latency,
        "longest_gap": longest_gap,
        "receive_seconds": last_at - first_at,
        "rss_mb": rss,
        "peak_rss_mb": _peak_rss_mb(),
        "dropped": {k: v for k, v in stats.dropped.items() if v},
        "reconnects": stats.reconnects,
    }


def publisher_main(config: dict[str, Any], publisher: int) -> dict[str, Any]:
    import emailmw

    errors: list[str] = []
    with emailmw.Context(emailmw.Options.from_dict(config)) as ctx:
        pub = emailmw.Publisher(TOPIC, context=ctx)
        print("ready", flush=True)
        sys.stdin.readline()  # "go"
        started = time.monotonic()
        for i in range(PER_PUBLISHER):
            try:
                pub.publish(f"{publisher}:{i}")
            except emailmw.EmailmwError as exc:
                errors.append(f"{i}: {exc}")
        elapsed = time.monotonic() - started
        stats = ctx.stats()
    return {
        "errors": errors[:20],
        "error_count": len(errors),
        "publish_seconds": elapsed,
        "send_retries": stats.send_retries,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _child(argv: list[str]) -> None:
    role, config = argv[0], json.loads(argv[1])
    if role == "subscriber":
        result = subscriber_main(config)
    else:
        result = publisher_main(config, int(argv[2]))
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- the test


def _stored_at(server: Any, folder: str) -> dict[str, float]:
    """When each message was stored in the mailbox (INTERNALDATE, 1 s resolution)."""
    import ssl

    from imapclient import IMAPClient

    account = server.account("alice")
    context = ssl.create_default_context(cafile=str(server.ca_file))
    stored: dict[str, float] = {}
    with IMAPClient(server.host, server.imaps_port, ssl=True, ssl_context=context) as imap:
        imap.login(account.address, account.password)
        imap.select_folder(folder, readonly=True)
        uids = imap.search("ALL")
        for start in range(0, len(uids), 1000):
            items = imap.fetch(uids[start : start + 1000], ["INTERNALDATE", "BODY.PEEK[TEXT]"])
            for item in items.values():
                body = item[b"BODY[TEXT]"].decode("ascii", "replace").replace("=\r\n", "")
                stored[body.strip()] = item[b"INTERNALDATE"].timestamp()
    return stored


class Child:
    """One process running this file as a script."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_ready(self, timeout: float) -> None:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise AssertionError(f"child not ready within {timeout} s")
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", line + self.error_output()

    def error_output(self) -> str:
        if self.proc.poll() is None:
            return ""
        assert self.proc.stderr is not None
        return self.proc.stderr.read()[-3000:]

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err[-3000:]
        data: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return data

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.mark.timeout(DEADLINE + 120)
@pytest.mark.mailstack
@pytest.mark.slow
def test_four_publishers_four_subscribers_one_account(
    dev_server: Any, record_property: Any
) -> None:
    folder, address = dev_server.new_mailbox("alice")
    config = dev_server.config("alice", mailbox=folder, to=address)
    sub_config = json.dumps(config)
    # a publish-only process: its receiver polls once an hour, i.e. never during the run
    config["email"].update({"receive-mode": "poll", "polling-period": 3600 * 10**9})
    pub_config = json.dumps(config)

    children: list[Child] = []
    try:
        subscribers = [Child("subscriber", sub_config) for _ in range(SUBSCRIBERS)]
        children += subscribers
        publishers = [Child("publisher", pub_config, str(p)) for p in range(PUBLISHERS)]
        children += publishers
        for child in children:
            child.wait_ready(60)
        started = time.monotonic()
        for publisher in publishers:
            publisher.go()
        pub_results = [p.result(DEADLINE) for p in publishers]
        published = time.monotonic() - started
        sub_results = [s.result(DEADLINE) for s in subscribers]
        total = time.monotonic() - started
    finally:
        for child in children:
            child.kill()

    summary = {
        "publish_seconds": round(published, 1),
        "total_seconds": round(total, 1),
        "publish_rate": round(PUBLISHERS * PER_PUBLISHER / published),
        "subscribers": [
            {
                "received": r["received"],
                "duplicates": r["duplicates"],
                "out_of_order": r["out_of_order"],
                "out_of_order_examples": r["out_of_order_examples"],
                "max_latency_s": round(r["max_latency"], 2),
                "longest_gap_s": round(r["longest_gap"], 2),
                "peak_rss_mb": round(r["peak_rss_mb"], 1),
                "rss_mb": {k: round(v, 1) for k, v in r["rss_mb"].items()},
                "dropped": r["dropped"],
            }
            for r in sub_results
        ],
        "publishers": [
            {
                "seconds": round(r["publish_seconds"], 1),
                "errors": r["error_count"],
                "retries": r["send_retries"],
                "peak_rss_mb": round(r["peak_rss_mb"], 1),
            }
            for r in pub_results
        ],
    }
    if any(r["out_of_order"] for r in sub_results):
        # how much later did the mail system store each overtaken message?
        stored = _stored_at(dev_server, folder)
        summary["mailbox_delays_s"] = [
            [
                stored[f"{p}:{i}"] - stored[f"{p}:{highest}"]
                for p, i, highest, _ in r["out_of_order_examples"]
            ]
            for r in sub_results
        ]
    record_property("load", summary)
    print(json.dumps(summary, indent=1))

    for r in pub_results:
        assert r["error_count"] == 0, r["errors"]
    for r in sub_results:
        assert r["missing_count"] == 0, f"lost {r['missing_count']}: {r['missing']}"
        assert r["duplicates"] == 0
        assert r["unexpected"] == []
        assert r["out_of_order"] == 0, f"{r['out_of_order']} messages out of publisher order"
        assert "queue_full" not in r["dropped"]
        assert r["peak_rss_mb"] < PEAK_RSS_LIMIT_MB
        samples = {int(k): v for k, v in r["rss_mb"].items()}
        growth = samples[PUBLISHERS * PER_PUBLISHER] - samples[PER_PUBLISHER]
        assert growth < RSS_GROWTH_LIMIT_MB, f"RSS grew {growth:.1f} MB: {samples}"


if __name__ == "__main__":
    _child(sys.argv[1:])
