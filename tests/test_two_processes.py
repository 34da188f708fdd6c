"""Two OS processes over the real mail stack: pub/sub and services across processes.

Each test writes small helper scripts into ``tmp_path`` and runs them with
``sys.executable``; each helper prints ``READY`` once its context is connected
(a receiver starts at the mailbox's next UID, so nothing may be sent before)
and records what it got in a JSON file that the test checks.

* one account: both processes use one fresh folder of alice's;
* two accounts: alice's process sends to a fresh folder of bob's and reads its
  own folder (service responses come back there); bob's process reads bob's.
"""

from __future__ import annotations

import itertools
import json
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from emailmw.devserver import DevServer

pytestmark = [pytest.mark.timeout(180), pytest.mark.mailstack, pytest.mark.slow]

MESSAGES = 1000
CALLS = 100
BATCH = 10
PROCESS_TIMEOUT = 120.0

SUBSCRIBER = r"""
import json, sys, time
import emailmw

config, topic, count, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
got = []
with emailmw.Context(config) as ctx:
    sub = emailmw.Subscription(topic, context=ctx)
    print("READY", flush=True)
    try:
        while len(got) < count:
            message, info = emailmw.wait_for_message_with_info(sub, 60)
            got.append([info.publisher_gid.value, message])
    except emailmw.WaitTimeoutError:
        pass
    time.sleep(1.0)  # anything arriving now is one too many (a duplicate)
    while (item := sub.get_message_with_info()) is not None:
        got.append([item[1].publisher_gid.value, item[0]])
    stats = ctx.stats()
with open(out, "w") as f:
    json.dump({"got": got, "stats": {"received": stats.received, "dropped": stats.dropped}}, f)
"""

PUBLISHER = r"""
import json, sys
import emailmw

config, topic, count, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
with emailmw.Context(config) as ctx:
    publishers = [emailmw.Publisher(topic, context=ctx) for _ in range(2)]
    for i in range(count):
        publisher = publishers[i % 2]
        publisher.publish(f"{i // 2}")   # a counter per publisher
    gids = [p.gid.value for p in publishers]
with open(out, "w") as f:
    json.dump({"gids": gids}, f)
"""

SERVER = r"""
import json, random, sys
import emailmw

config, service, count, batch, out = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:5]), sys.argv[5]
rng = random.Random(7)
answered = []
with emailmw.Context(config) as ctx:
    server = emailmw.ServiceServer(service, context=ctx)
    print("READY", flush=True)
    while len(answered) < count:
        size = min(batch, count - len(answered))
        requests = [emailmw.wait_for_request(server, 60) for _ in range(size)]
        # reversed or shuffled: never the order they came in
        order = requests[::-1] if len(answered) % 20 == 0 else rng.sample(requests, size)
        for request in order:
            server.send_response(request.id, "answer to " + request.content)
            answered.append([request.id.client_gid.value, request.id.sequence_number])
with open(out, "w") as f:
    json.dump({"answered": answered}, f)
"""

CLIENT = r"""
import json, secrets, sys
import emailmw

config, service, count, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
with emailmw.Context(config) as ctx:
    client = emailmw.ServiceClient(service, context=ctx)
    asked = {}
    for i in range(count):
        request = f"request {i} {secrets.token_hex(4)}"
        asked[client.send_request(request)] = request
    calls = []
    for seq, request in asked.items():
        response, info = emailmw.wait_for_response_with_info(seq, client, 60)
        calls.append([seq, request, response, info.sequence_number, info.client_gid.value])
    gid = client.gid.value
    left = client.has_response()
with open(out, "w") as f:
    json.dump({"gid": gid, "calls": calls, "left_over": left}, f)
"""


class Helper:
    """A helper script running in its own process, its stdout read by a thread."""

    def __init__(self, tmp_path: Path, name: str, script: str, *args: object) -> None:
        path = tmp_path / f"{name}.py"
        path.write_text(script)
        self.name = name
        self.out = tmp_path / f"{name}.json"
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(path), *map(str, args), str(self.out)],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        with stream:  # closed here, by the only thread that reads it
            for line in stream:
                self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_ready(self, timeout: float = 30.0) -> None:
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"{self.name} not ready within {timeout} s") from None
            if line is None:
                self.proc.wait(5)
                raise AssertionError(f"{self.name} exited before READY:\n" + "\n".join(self.output))
            self.output.append(line)
            if line == "READY":
                return

    def result(self, timeout: float = PROCESS_TIMEOUT) -> dict[str, Any]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not finish within {timeout} s") from None
        while (line := self._lines.get(timeout=5)) is not None:
            self.output.append(line)
        log = "\n".join(self.output)
        assert rc == 0, f"{self.name} exited {rc}:\n{log}"
        assert "Traceback" not in log, log
        data: dict[str, Any] = json.loads(self.out.read_text())
        return data

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def helpers() -> Any:
    started: list[Helper] = []
    yield started
    for helper in started:
        helper.kill()


def write_config(
    server: DevServer, account: str, path: Path, *, from_: str | None = None, **kw: Any
) -> Path:
    """The dev server's config file for ``account`` (``kw``: mailbox, to, receive_mode)
    with ``from`` set, so that replies come back to the right folder."""
    server.write_config(account, path, **kw)
    if from_ is not None:
        data = yaml.safe_load(path.read_text())
        data["email"]["from"] = from_
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def configs(
    server: DevServer, tmp_path: Path, accounts: str, receive_mode: str
) -> tuple[Path, Path]:
    """Config files ``(alice's process, bob's process)`` for the layout ``accounts``.

    ``one``: both read one folder of alice's and send to it. ``two``: alice's
    process sends to a folder of bob's and reads one of her own; bob's process
    reads his folder and replies to alice's.
    """
    alice_folder, alice_address = server.new_mailbox("alice")
    if accounts == "one":
        common = {"mailbox": alice_folder, "to": alice_address, "receive_mode": receive_mode}
        first = write_config(server, "alice", tmp_path / "a.yml", from_=alice_address, **common)
        second = write_config(server, "alice", tmp_path / "b.yml", from_=alice_address, **common)
        return first, second
    bob_folder, bob_address = server.new_mailbox("bob")
    alice = write_config(
        server,
        "alice",
        tmp_path / "alice.yml",
        from_=alice_address,
        mailbox=alice_folder,
        to=bob_address,
        receive_mode=receive_mode,
    )
    bob = write_config(
        server,
        "bob",
        tmp_path / "bob.yml",
        from_=bob_address,
        mailbox=bob_folder,
        to=bob_address,
        receive_mode=receive_mode,
    )
    return alice, bob


LAYOUTS = [
    pytest.param("one", "auto", id="one-account-auto"),
    pytest.param("one", "poll", id="one-account-poll"),
    pytest.param("two", "auto", id="two-accounts-auto"),
]


@pytest.mark.parametrize(("accounts", "receive_mode"), LAYOUTS)
def test_pubsub_1000_messages_exactly_once_in_order(
    dev_server: DevServer, tmp_path: Path, helpers: list[Helper], accounts: str, receive_mode: str
) -> None:
    publisher_config, subscriber_config = configs(dev_server, tmp_path, accounts, receive_mode)
    subscriber = Helper(tmp_path, "subscriber", SUBSCRIBER, subscriber_config, "/load", MESSAGES)
    helpers.append(subscriber)
    subscriber.wait_ready()
    publisher = Helper(tmp_path, "publisher", PUBLISHER, publisher_config, "/load", MESSAGES)
    helpers.append(publisher)
    gids = publisher.result()["gids"]
    result = subscriber.result()
    got: list[tuple[int, str]] = [(gid, text) for gid, text in result["got"]]

    per_publisher: dict[int, list[int]] = {gid: [] for gid in gids}
    for gid, text in got:
        assert gid in per_publisher, f"message {text!r} from unknown publisher {gid}"
        per_publisher[gid].append(int(text))
    half = MESSAGES // 2
    for gid, counters in per_publisher.items():
        missing = sorted(set(range(half)) - set(counters))
        duplicates = sorted({c for c in counters if counters.count(c) > 1})
        assert not missing and not duplicates and len(counters) == half, (
            f"publisher {gid}: {len(counters)} messages, missing {missing[:20]}, "
            f"duplicated {duplicates[:20]}"
        )
    assert result["stats"]["dropped"].get("duplicate", 0) == 0
    for gid, counters in per_publisher.items():
        inversions = [(a, b) for a, b in itertools.pairwise(counters) if b < a]
        assert not inversions, (
            f"publisher {gid}: {len(inversions)} messages arrived before an earlier one "
            f"of the same publisher, e.g. {inversions[:5]}"
        )


@pytest.mark.parametrize(
    ("accounts", "receive_mode"),
    [pytest.param("one", "auto", id="one-account-auto"), LAYOUTS[2]],
)
def test_service_100_calls_answered_out_of_order(
    dev_server: DevServer, tmp_path: Path, helpers: list[Helper], accounts: str, receive_mode: str
) -> None:
    client_config, server_config = configs(dev_server, tmp_path, accounts, receive_mode)
    server = Helper(tmp_path, "server", SERVER, server_config, "/svc", CALLS, BATCH)
    helpers.append(server)
    server.wait_ready()
    client = Helper(tmp_path, "client", CLIENT, client_config, "/svc", CALLS)
    helpers.append(client)
    client_result = client.result()
    answered = server.result()["answered"]

    gid = client_result["gid"]
    calls = client_result["calls"]
    assert len(calls) == CALLS
    assert sorted(seq for seq, *_ in calls) == list(range(1, CALLS + 1))
    for seq, request, response, info_seq, info_gid in calls:
        assert response == f"answer to {request}", (seq, request, response)
        assert (info_seq, info_gid) == (seq, gid)
    assert not client_result["left_over"]
    # The server really answered out of order, and each request exactly once.
    order = [seq for client_gid, seq in answered if client_gid == gid]
    assert sorted(order) == list(range(1, CALLS + 1))
    assert order != sorted(order)
