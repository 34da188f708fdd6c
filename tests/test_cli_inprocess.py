"""``emailmw call``, ``echo --json`` and ``hz`` in-process, over an intraprocess
context (the commands' ``run_*`` functions, which the CLI runs with a context
from the config file), and their arguments. The same commands against the real
dev server, as subprocesses: tests/test_cli_network.py."""

from __future__ import annotations

import io
import json
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import emailmw
from emailmw import commands
from emailmw.cli import DEFAULT_CALL_TIMEOUT, DEFAULT_HZ_WINDOW, build_parser, main

pytestmark = pytest.mark.timeout(60)


class Lines(io.TextIOBase):
    """A text stream that several threads may write to; complete lines are kept
    in order and can be waited for."""

    def __init__(self) -> None:
        super().__init__()
        self._partial = ""
        self._lock = threading.Lock()
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        with self._lock:
            *complete, self._partial = (self._partial + text).split("\n")
            for line in complete:
                self.lines.put(line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self.flushes += 1

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        """The next line (from those not taken yet) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                raise AssertionError(f"no such line within {timeout} s; saw {self.seen}") from None
            self.seen.append(line)
            if predicate(line):
                return line


class Runner:
    """A command function running in a thread; its return value or exception kept."""

    def __init__(self, target: Callable[[], int]) -> None:
        self.result: int | None = None
        self.error: BaseException | None = None
        self._target = target
        self.thread = threading.Thread(target=self._run, name="cli-command")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self._target()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 10.0) -> int | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the command did not stop"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def intra() -> Iterator[emailmw.Context]:
    context = emailmw.Context(emailmw.Options(intraprocess=True))
    context.init()
    try:
        yield context
    finally:
        context.shutdown()


# ------------------------------------------------------------------------ arguments


def test_parser_knows_call_hz_and_echo_json() -> None:
    parser = build_parser()
    args = parser.parse_args(["call", "/add", "2 3", "--timeout", "1.5", "-c", "x.yml"])
    assert (args.command, args.service, args.request, args.timeout, args.config) == (
        "call",
        "/add",
        "2 3",
        1.5,
        "x.yml",
    )
    assert parser.parse_args(["call", "/add", "2 3"]).timeout == DEFAULT_CALL_TIMEOUT
    args = parser.parse_args(["hz", "/t", "--window", "50"])
    assert (args.command, args.topic, args.window) == ("hz", "/t", 50)
    assert parser.parse_args(["hz", "/t"]).window == DEFAULT_HZ_WINDOW
    assert parser.parse_args(["hz", "/t"]).clock == "source"
    assert parser.parse_args(["hz", "/t", "--clock", "received"]).clock == "received"
    assert parser.parse_args(["echo", "/t", "--json"]).json is True
    assert parser.parse_args(["echo", "/t"]).json is False


@pytest.mark.parametrize("window", ["1", "0", "-3", "ten"])
def test_hz_bad_window_is_a_usage_error(window: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["hz", "/t", "--window", window])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--window" in err and window in err


def test_call_without_arguments_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["call", "/add"])
    assert info.value.code == 2
    assert "request" in capsys.readouterr().err


def test_call_with_an_intraprocess_config_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "intra.yml"
    path.write_text("email:\n  intraprocess: true\n")
    assert main(["call", "/add", "2 3", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert "emailmw call: error:" in err and "intraprocess" in err


# ------------------------------------------------------------------------ call


def _adder(server: emailmw.ServiceServer[str, str], answered: list[str]) -> None:
    try:
        while True:
            request = emailmw.wait_for_request(server, timeout=10.0)
            answered.append(request.content)
            total = sum(int(part) for part in request.content.split())
            server.send_response(request.id, str(total))
    except (emailmw.ContextError, emailmw.WaitTimeoutError):
        pass


def test_call_prints_the_response(intra: emailmw.Context) -> None:
    server = emailmw.ServiceServer("/add", context=intra)
    answered: list[str] = []
    thread = threading.Thread(target=_adder, args=(server, answered))
    thread.start()
    out = io.StringIO()
    assert commands.run_call(intra, "/add", "2 3 37", 5.0, out) == 0
    assert out.getvalue().splitlines() == ["42"]
    assert commands.run_call(intra, "/add", "-1 1", 5.0, out) == 0
    assert out.getvalue().splitlines() == ["42", "0"]
    intra.shutdown()
    thread.join(5.0)
    assert answered == ["2 3 37", "-1 1"]


def test_call_times_out_with_a_clear_error(intra: emailmw.Context) -> None:
    out = io.StringIO()
    started = time.monotonic()
    with pytest.raises(emailmw.WaitTimeoutError) as info:
        commands.run_call(intra, "/nobody", "hello", 0.3, out)
    assert 0.25 <= time.monotonic() - started < 5
    message = str(info.value)
    assert "'/nobody'" in message and "0.3 s" in message and "server" in message
    assert out.getvalue() == ""


# ------------------------------------------------------------------------ echo --json


def test_echo_json_prints_one_object_per_message(intra: emailmw.Context) -> None:
    out, err = Lines(), Lines()
    runner = Runner(lambda: commands.run_echo(intra, "/json", 3, 10.0, out, as_json=True, err=err))
    err.wait_for(lambda line: "listening on '/json'" in line)
    publisher = emailmw.Publisher("/json", context=intra)
    before = time.time_ns()
    texts = ["plain", 'quo"te\\ and\nnew line', "日本 — ✓"]
    publisher.publish(texts[0])
    publisher.publish(texts[1], additional_headers={"Trace-Id": "abc-123", "Unit": "°C"})
    publisher.publish(texts[2])
    after = time.time_ns()
    assert runner.join() == 0
    objects = [json.loads(out.wait_for(lambda line: True)) for _ in texts]
    assert out.lines.empty()  # nothing else on stdout: only JSON
    assert out.flushes >= 3  # flushed per line
    assert [o["message"] for o in objects] == texts
    for o in objects:
        assert set(o) == {
            "topic",
            "message",
            "source_timestamp",
            "received_timestamp",
            "publisher_gid",
            "headers",
        }
        assert o["topic"] == "/json"
        assert o["publisher_gid"] == publisher.gid.value
        assert before <= o["source_timestamp"] <= o["received_timestamp"] <= after
    assert [o["headers"] for o in objects] == [{}, {"Trace-Id": "abc-123", "Unit": "°C"}, {}]


def test_echo_plain_output_is_unchanged(intra: emailmw.Context) -> None:
    out = Lines()
    runner = Runner(lambda: commands.run_echo(intra, "/plain", 1, 10.0, out))
    out.wait_for(lambda line: "listening on '/plain'" in line)
    publisher = emailmw.Publisher("/plain", context=intra)
    publisher.publish("hi")
    assert runner.join() == 0
    line = out.wait_for(lambda line: line.startswith("["))
    assert re.fullmatch(rf"\[{publisher.gid.value} \+\d+\.\d ms\] hi", line), line


# ------------------------------------------------------------------------ hz


def test_hz_report_numbers() -> None:
    assert commands.hz_report([]) == ""
    assert commands.hz_report([5]) == ""
    stamps = [1_000_000_000, 1_100_000_000, 1_300_000_000]  # intervals 0.1 s, 0.2 s
    assert commands.hz_report(stamps) == (
        "average rate: 6.667\n\tmin: 0.100s max: 0.200s std dev: 0.05000s window: 3"
    )


REPORT = re.compile(
    r"average rate: (?P<rate>[\d.]+)\n\tmin: (?P<min>[\d.]+)s max: (?P<max>[\d.]+)s "
    r"std dev: (?P<std>[\d.]+)s window: (?P<window>\d+)"
)


@pytest.mark.parametrize("clock", ["source", "received"])
def test_hz_reports_the_rate_every_second_and_stops_with_the_context(
    intra: emailmw.Context, clock: str
) -> None:
    out, err = Lines(), Lines()
    runner = Runner(lambda: commands.run_hz(intra, "/rate", 30, out, err, clock=clock))
    err.wait_for(lambda line: "subscribed to '/rate'" in line)
    publisher = emailmw.Publisher("/rate", context=intra)
    period = 0.02  # 50 Hz
    sent: list[float] = []
    started = time.monotonic()
    for i in range(120):  # 2.4 s
        delay = started + i * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing the publisher
        publisher.publish(f"m{i}")
        sent.append(time.monotonic())
    achieved = (len(sent) - 1) / (sent[-1] - sent[0])
    # The report after publishing ended covers the last 30 messages (the window).
    out.wait_for(lambda line: line.startswith("average rate:"))
    out.wait_for(lambda line: line == "no new messages", timeout=5.0)
    reports = [
        match
        for match in REPORT.finditer("\n".join(out.seen))
        if int(match["window"]) == 30  # full windows only
    ]
    assert reports, out.seen
    last = reports[-1]
    assert abs(float(last["rate"]) - achieved) <= 0.3 * achieved, (last.group(0), achieved)
    # The mean interval lies between the shortest and longest (printed to 1 ms).
    assert float(last["min"]) - 5e-4 <= 1 / float(last["rate"]) <= float(last["max"]) + 5e-4
    assert float(last["std"]) >= 0
    intra.shutdown()
    assert runner.join() == 0


def test_hz_prints_nothing_before_two_messages(intra: emailmw.Context) -> None:
    out, err = Lines(), Lines()
    runner = Runner(lambda: commands.run_hz(intra, "/one", 10, out, err))
    err.wait_for(lambda line: "subscribed to '/one'" in line)
    emailmw.Publisher("/one", context=intra).publish("only one")
    # The next second's report: one message gives no rate, and then there is nothing new.
    out.wait_for(lambda line: line == "no new messages", timeout=5.0)
    assert not any(line.startswith("average rate") for line in out.seen), out.seen
    intra.shutdown()
    assert runner.join() == 0


def test_hz_window_must_hold_two_messages(intra: emailmw.Context) -> None:
    with pytest.raises(ValueError, match="window"):
        commands.run_hz(intra, "/t", 1, io.StringIO(), io.StringIO())
    with pytest.raises(ValueError, match="clock must be one of source, received"):
        commands.run_hz(intra, "/t", 10, io.StringIO(), io.StringIO(), clock="wall")


def test_hz_report_sorts_the_stamps() -> None:
    # Messages are delivered in publication order, which need not be receive order.
    in_order = commands.hz_report([0, 100_000_000, 300_000_000])
    assert commands.hz_report([100_000_000, 300_000_000, 0]) == in_order
    assert "min: 0.100s" in in_order
