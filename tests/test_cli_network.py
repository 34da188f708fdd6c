"""The network subcommands of the ``emailmw`` command, run as a user would
(``python -m emailmw ...`` in a subprocess) against the real dev server:
``check-config``, ``send``, ``receive``, ``publish``, ``echo`` (``--json``
too), ``call`` (answered by a server in this process) and ``hz``."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

import emailmw
from emailmw.devserver import DevServer

pytestmark = [pytest.mark.timeout(90), pytest.mark.mailstack]

COMMAND_TIMEOUT = 30.0


def environment() -> dict[str, str]:
    """This process's environment without anything that could pick another config."""
    env = dict(os.environ)
    for name in ("EMAIL_CONFIG_FILE", "EMAILMW_PASSWORD", "EMAILMW_SIGNING_KEY"):
        env.pop(name, None)
    return env


def emailmw_cli(
    cwd: Path, *args: str, timeout: float = COMMAND_TIMEOUT, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m emailmw ARGS`` to completion."""
    done = subprocess.run(
        [sys.executable, "-m", "emailmw", *args],
        cwd=cwd,
        env=environment(),
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done


class Background:
    """``python -m emailmw ARGS`` running in the background; stdout and stderr
    read line by line by threads."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emailmw", *args],
            cwd=cwd,
            env=environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._ended = 0
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            threading.Thread(target=self._read, args=(name, stream), daemon=True).start()

    def _read(self, name: str, stream: IO[str]) -> None:
        with stream:  # closed here, by the only thread that reads it
            for line in stream:
                self.lines.put((name, line))
        self.lines.put((name, None))

    def _take(self, timeout: float) -> bool:
        """Take one line (False once both streams ended)."""
        name, line = self.lines.get(timeout=timeout)
        if line is None:
            self._ended += 1
        else:
            (self.stdout if name == "stdout" else self.stderr).append(line)
        return self._ended < 2

    def wait_for(self, stream: str, text: str, timeout: float = COMMAND_TIMEOUT) -> None:
        """Wait until a line of ``stream`` contains ``text``."""
        deadline = time.monotonic() + timeout
        lines = self.stdout if stream == "stdout" else self.stderr
        while not any(text in line for line in lines):
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0 or not self._take(remaining):
                    break
            except queue.Empty:
                break
        if not any(text in line for line in lines):
            raise AssertionError(
                f"{text!r} not in {stream} within {timeout} s\n"
                f"stdout:\n{''.join(self.stdout)}\nstderr:\n{''.join(self.stderr)}"
            )

    def finish(self, timeout: float = COMMAND_TIMEOUT) -> int:
        """Wait for the exit status, collecting the rest of the output."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"still running after {timeout} s\nstdout:\n{''.join(self.stdout)}"
                f"\nstderr:\n{''.join(self.stderr)}"
            ) from None
        while self._ended < 2 and self._take(5):
            pass
        return rc

    @property
    def output(self) -> str:
        return f"stdout:\n{''.join(self.stdout)}\nstderr:\n{''.join(self.stderr)}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def background() -> Iterator[list[Background]]:
    started: list[Background] = []
    yield started
    for process in started:
        process.kill()


@pytest.fixture
def config(dev_server: DevServer, tmp_path: Path) -> tuple[Path, str]:
    """A config file for a fresh folder of alice's: ``(path, address)``."""
    folder, address = dev_server.new_mailbox("alice")
    path = dev_server.write_config("alice", tmp_path / "email.yml", mailbox=folder, to=address)
    return path, address


def edited(path: Path, target: Path, **user: Any) -> Path:
    """A copy of config ``path`` with ``email.user`` keys replaced."""
    data = yaml.safe_load(path.read_text())
    data["email"]["user"].update(user)
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------ check-config


def test_check_config_reports_both_servers_and_idle(
    config: tuple[Path, str], tmp_path: Path, dev_server: DevServer
) -> None:
    path, _ = config
    done = emailmw_cli(tmp_path, "check-config", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert f"smtp://127.0.0.1:{dev_server.smtp_port}: OK" in done.stdout
    assert f"imap://127.0.0.1:{dev_server.imap_port}: OK" in done.stdout
    assert "idle: True" in done.stdout
    assert "configuration OK" in done.stdout
    assert dev_server.account("alice").password not in done.stdout + done.stderr


def test_check_config_finds_email_yml_in_the_working_directory(
    config: tuple[Path, str], tmp_path: Path
) -> None:
    path, _ = config
    assert path == tmp_path / "email.yml"
    done = emailmw_cli(tmp_path, "check-config")
    assert done.returncode == 0, done.stderr
    assert "configuration OK" in done.stdout


def test_check_config_wrong_password(
    config: tuple[Path, str], tmp_path: Path, dev_server: DevServer
) -> None:
    path, _ = config
    wrong = "Wrong-Secret-4711"
    bad = edited(path, tmp_path / "bad.yml", password=wrong)
    started = time.monotonic()
    done = emailmw_cli(tmp_path, "check-config", "-c", str(bad))
    assert time.monotonic() - started < 15
    assert done.returncode != 0
    assert "configuration OK" not in done.stdout
    assert f"127.0.0.1:{dev_server.smtp_port}" in done.stderr
    assert "password" in done.stderr.lower() or "auth" in done.stderr.lower(), done.stderr
    assert "Traceback" not in done.stderr
    output = done.stdout + done.stderr
    assert wrong not in output
    assert dev_server.account("alice").password not in output


def test_check_config_server_down_fails_quickly(config: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = config
    down = edited(
        path,
        tmp_path / "down.yml",
        **{"url-smtp": f"smtp://127.0.0.1:{free_port()}"},
        **{"url-imap": f"imap://127.0.0.1:{free_port()}"},
    )
    started = time.monotonic()
    done = emailmw_cli(tmp_path, "check-config", "-c", str(down))
    took = time.monotonic() - started
    assert done.returncode != 0
    assert took < 5, f"took {took:.1f} s"
    assert "refused" in done.stderr, done.stderr
    assert "127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_config_missing_file(tmp_path: Path) -> None:
    done = emailmw_cli(tmp_path, "check-config", "-c", str(tmp_path / "nope.yml"))
    assert done.returncode != 0
    assert "nope.yml" in done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------ send / receive

RAW_EMAIL = (
    b"From: Someone <someone@example.test>\n"
    b"Subject: a raw test email\n"
    b"Message-ID: <raw-1@example.test>\n"
    b"\n"
    b"raw body line 1\n"
    b"raw body line 2\n"
)


def test_send_raw_file_then_receive_it(
    config: tuple[Path, str], tmp_path: Path, background: list[Background]
) -> None:
    path, _ = config
    receiver = Background(
        tmp_path, "--log-level", "INFO", "receive", "-c", str(path), "--count", "1",
        "--timeout", "20",
    )  # fmt: skip
    background.append(receiver)
    # Ready once connected: the receiver starts at the mailbox's next UID.
    receiver.wait_for("stderr", "UIDVALIDITY")
    raw_file = tmp_path / "raw.eml"
    raw_file.write_bytes(RAW_EMAIL)
    done = emailmw_cli(tmp_path, "send", "-c", str(path), str(raw_file))
    assert done.returncode == 0, done.stderr
    assert "sent" in done.stdout
    rc = receiver.finish()
    assert rc == 0, receiver.output
    out = "".join(receiver.stdout)
    assert "--- email 1 (UID" in out
    assert "Subject: a raw test email" in out
    assert "raw body line 1" in out and "raw body line 2" in out
    assert "Traceback" not in "".join(receiver.stderr)


def test_send_from_stdin(config: tuple[Path, str], tmp_path: Path, dev_server: DevServer) -> None:
    path, _ = config
    done = emailmw_cli(tmp_path, "send", "-c", str(path), stdin=RAW_EMAIL)
    assert done.returncode == 0, done.stderr
    assert f"sent {len(RAW_EMAIL)} bytes" in done.stdout


def test_receive_times_out_with_nothing(config: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = config
    started = time.monotonic()
    done = emailmw_cli(tmp_path, "receive", "-c", str(path), "--count", "1", "--timeout", "1")
    took = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert took < 10


# ------------------------------------------------------------------------ publish / echo


def test_publish_then_echo(
    config: tuple[Path, str], tmp_path: Path, background: list[Background]
) -> None:
    path, _ = config
    echo = Background(tmp_path, "echo", "/cli/topic", "-c", str(path), "--count", "1",
                      "--timeout", "20")  # fmt: skip
    background.append(echo)
    echo.wait_for("stdout", "listening on '/cli/topic'")
    message = "héllo from the CLI — 日本"
    done = emailmw_cli(tmp_path, "publish", "-c", str(path), "/cli/topic", message)
    assert done.returncode == 0, done.stderr
    assert "published" in done.stdout
    rc = echo.finish()
    assert rc == 0, echo.output
    lines = [line for line in echo.stdout if line.startswith("[")]
    assert len(lines) == 1, echo.output
    assert lines[0].rstrip("\n").endswith(f"] {message}")


def test_echo_times_out_with_nothing(config: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = config
    done = emailmw_cli(tmp_path, "echo", "/quiet", "-c", str(path), "--count", "1",
                       "--timeout", "1")  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "listening on '/quiet'" in done.stdout
    assert "Traceback" not in done.stderr


def test_publish_intraprocess_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "intra.yml"
    path.write_text("email:\n  intraprocess: true\n")
    done = emailmw_cli(tmp_path, "publish", "-c", str(path), "/t", "x")
    assert done.returncode != 0
    assert "intraprocess" in done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------ call / echo --json / hz


def _serve_once(path: Path, service: str, ready: threading.Event, answered: list[str]) -> None:
    """Answer one request to ``service`` (the sum of its numbers), from this process."""
    options = emailmw.Options.from_file(path)
    with emailmw.Context(options) as ctx:
        server = emailmw.ServiceServer(service, context=ctx)
        ready.set()
        request = emailmw.wait_for_request(server, timeout=COMMAND_TIMEOUT)
        answered.append(request.content)
        server.send_response(request.id, str(sum(int(n) for n in request.content.split())))


def test_call_prints_the_response_of_a_server(config: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = config
    ready = threading.Event()
    answered: list[str] = []
    server = threading.Thread(target=_serve_once, args=(path, "/cli/add", ready, answered))
    server.start()
    try:
        assert ready.wait(COMMAND_TIMEOUT)
        done = emailmw_cli(tmp_path, "call", "/cli/add", "40 2", "-c", str(path),
                           "--timeout", "25")  # fmt: skip
    finally:
        server.join(COMMAND_TIMEOUT + 5)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "42\n"
    assert answered == ["40 2"]
    assert "Traceback" not in done.stderr


def test_call_without_a_server_times_out(config: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = config
    started = time.monotonic()
    done = emailmw_cli(tmp_path, "call", "/cli/nobody", "hello", "-c", str(path),
                       "--timeout", "1")  # fmt: skip
    assert time.monotonic() - started < 20
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert "emailmw call: error: no response to request 1 on '/cli/nobody' within 1.0 s" in (
        done.stderr
    )
    assert "is a server for '/cli/nobody' running?" in done.stderr
    assert "Traceback" not in done.stderr


def test_echo_json_lines(
    config: tuple[Path, str], tmp_path: Path, background: list[Background]
) -> None:
    path, _ = config
    echo = Background(tmp_path, "echo", "/cli/json", "--json", "-c", str(path), "--count", "2",
                      "--timeout", "25")  # fmt: skip
    background.append(echo)
    echo.wait_for("stderr", "listening on '/cli/json'")
    texts = ["first — ✓", "second\nline"]
    with emailmw.Context(emailmw.Options.from_file(path)) as ctx:
        publisher = emailmw.Publisher("/cli/json", context=ctx)
        publisher.publish(texts[0], additional_headers={"Trace-Id": "t-1"})
        publisher.publish(texts[1])
        gid = publisher.gid.value
    rc = echo.finish()
    assert rc == 0, echo.output
    objects = [json.loads(line) for line in echo.stdout]  # every stdout line is JSON
    assert [o["message"] for o in objects] == texts
    assert [o["headers"] for o in objects] == [{"Trace-Id": "t-1"}, {}]
    for o in objects:
        assert o["topic"] == "/cli/json"
        assert o["publisher_gid"] == gid
        assert 0 < o["source_timestamp"] <= o["received_timestamp"]
    assert "Traceback" not in "".join(echo.stderr)


@pytest.mark.timeout(120)
def test_hz_measures_a_20_hz_publisher_and_stops_on_sigterm(
    config: tuple[Path, str], tmp_path: Path, background: list[Background]
) -> None:
    path, _ = config
    hz = Background(tmp_path, "hz", "/cli/rate", "-c", str(path))
    background.append(hz)
    hz.wait_for("stderr", "subscribed to '/cli/rate'")
    sent: list[float] = []
    with emailmw.Context(emailmw.Options.from_file(path)) as ctx:
        publisher = emailmw.Publisher("/cli/rate", context=ctx)
        period = 0.05  # 20 Hz
        started = time.monotonic()
        for i in range(80):  # 4 s
            delay = started + i * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the publisher
            publisher.publish(f"m{i}")
            sent.append(time.monotonic())
    achieved = (len(sent) - 1) / (sent[-1] - sent[0])
    # Once everything arrived, a report covers all 80 messages (the window is 10 000).
    hz.wait_for("stdout", "window: 80")
    hz.proc.send_signal(signal.SIGTERM)
    rc = hz.finish()
    assert rc == 0, hz.output
    text = "".join(hz.stdout)
    match = re.search(r"average rate: ([\d.]+)\n\tmin: ([\d.]+)s max: ([\d.]+)s "
                      r"std dev: ([\d.]+)s window: 80\n", text)  # fmt: skip
    assert match, hz.output
    rate = float(match[1])
    assert abs(rate - achieved) <= 0.3 * achieved, (match.group(0), achieved)
    assert float(match[2]) - 5e-4 <= 1 / rate <= float(match[3]) + 5e-4  # printed to 1 ms
    assert "Traceback" not in "".join(hz.stderr)
