"""``emailmw ping`` (intraprocess and through the real mail stack) and the progress
output of ``emailmw prune`` / ``emailmw history``."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

import emailmw
from emailmw import commands
from emailmw._progress import ProgressReporter
from emailmw.devserver import DevServer

pytestmark = pytest.mark.timeout(60)

REPLY = re.compile(r"^reply from /emailmw/ping: seq=(\d+) time=(\d+\.\d) ms$", re.M)
SUMMARY = re.compile(r"^rtt min/avg/max/stddev = ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms$", re.M)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "emailmw", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def intra_config(tmp_path: Path) -> Path:
    path = tmp_path / "email.yml"
    path.write_text(yaml.safe_dump({"email": {"intraprocess": True}}))
    return path


def test_ping_intraprocess_prints_each_round_trip_and_a_summary() -> None:
    out = io.StringIO()
    with emailmw.Context(emailmw.Options(intraprocess=True)) as ctx:
        status = commands.run_ping(ctx, out, count=3, interval=0.0, timeout=5)
    text = out.getvalue()
    assert status == 0
    assert [int(seq) for seq, _ in REPLY.findall(text)] == [1, 2, 3]
    assert "3 requests sent, 3 replies received, 0% lost" in text
    match = SUMMARY.search(text)
    assert match is not None
    low, mean, high, _ = (float(v) for v in match.groups())
    assert low <= mean <= high


def test_ping_cli_intraprocess(tmp_path: Path) -> None:
    done = run_cli("ping", "-c", str(intra_config(tmp_path)), "--count", "2", "--interval", "0")
    assert done.returncode == 0, done.stderr
    assert len(REPLY.findall(done.stdout)) == 2
    assert "2 requests sent, 2 replies received, 0% lost" in done.stdout


def test_ping_exits_non_zero_when_nobody_answers(tmp_path: Path) -> None:
    done = run_cli(
        "ping",
        "-c",
        str(intra_config(tmp_path)),
        "--count",
        "2",
        "--interval",
        "0",
        "--timeout",
        "0.2",
        "--remote",
    )
    assert done.returncode == 1
    assert "no reply to seq=1 within 0.2 s" in done.stdout
    assert "2 requests sent, 0 replies received, 100% lost" in done.stdout
    assert "rtt" not in done.stdout


def test_ping_remote_is_answered_by_a_server_elsewhere() -> None:
    out = io.StringIO()
    with emailmw.Context(emailmw.Options(intraprocess=True)) as ctx:
        server = emailmw.ServiceServer(
            commands.PING_SERVICE, handler=lambda request: request, context=ctx
        )
        executor = emailmw.Executor(context=ctx)
        executor.add(server)
        spinner = threading.Thread(target=executor.spin, name="test-responder")
        spinner.start()
        try:
            status = commands.run_ping(ctx, out, count=2, interval=0.0, timeout=5, answer=False)
        finally:
            executor.shutdown()
            spinner.join(5)
    assert status == 0, out.getvalue()
    assert len(REPLY.findall(out.getvalue())) == 2


def test_ping_rejects_bad_arguments(tmp_path: Path) -> None:
    done = run_cli("ping", "-c", str(intra_config(tmp_path)), "--timeout", "0")
    assert done.returncode == 2
    assert "--timeout" in done.stderr and "more than 0" in done.stderr


@pytest.mark.mailstack
@pytest.mark.timeout(120)
def test_ping_through_the_dev_server(
    dev_server: DevServer, dev_mailbox: tuple[str, str], tmp_path: Path
) -> None:
    folder, _ = dev_mailbox
    config = dev_server.write_config("alice", tmp_path / "alice.yml", mailbox=folder)
    done = run_cli("ping", "-c", str(config), "--count", "2", "--interval", "0.2")
    assert done.returncode == 0, done.stdout + done.stderr
    times = [float(t) for _, t in REPLY.findall(done.stdout)]
    assert len(times) == 2
    assert all(t >= 1.0 for t in times)  # two emails through Postfix, Dovecot and IMAP
    assert "2 requests sent, 2 replies received, 0% lost" in done.stdout
    assert SUMMARY.search(done.stdout) is not None
    assert "alice@example.test" in done.stdout


@pytest.mark.mailstack
@pytest.mark.timeout(120)
def test_ping_through_the_dev_server_with_nobody_reading_the_recipient(
    dev_server: DevServer, dev_mailbox: tuple[str, str], tmp_path: Path
) -> None:
    # the requests go to bob, whom nobody reads: nothing comes back
    folder, _ = dev_mailbox
    bob = dev_server.account("bob").address
    config = dev_server.write_config("alice", tmp_path / "alice.yml", mailbox=folder, to=bob)
    done = run_cli("ping", "-c", str(config), "--count", "1", "--timeout", "3")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 requests sent, 0 replies received, 100% lost" in done.stdout


# -- progress -----------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    progress = ProgressReporter(out, "prune")
    assert not progress.terminal
    for done in range(0, 101):
        progress("listing", done, 100)
    progress("deleting", 0, 0)
    lines = out.getvalue().splitlines()
    # the start, every tenth, the end: eleven lines, not a hundred
    assert lines[0] == "prune: listing 0/100 (0%)"
    assert lines[10] == "prune: listing 100/100 (100%)"
    assert len(lines) == 12
    assert lines[11] == "prune: deleting 0/0 (100%)"
    assert "\r" not in out.getvalue()


def test_progress_bar_on_a_terminal() -> None:
    out = Terminal()
    progress = ProgressReporter(out, "history")
    assert progress.terminal
    progress("listing", 0, 4)
    progress("listing", 4, 4)
    progress("fetching", 1, 2)
    progress.close()
    text = out.getvalue()
    assert text.count("\r") == 3
    assert "history: listing   [" + "#" * 30 + "] 4/4 (100%)\n" in text
    assert "history: fetching  [" + "#" * 15 + "-" * 15 + "] 1/2 ( 50%)\n" in text
    assert text.endswith("\n")


@pytest.mark.mailstack
@pytest.mark.timeout(120)
def test_prune_and_history_report_progress(
    dev_server: DevServer, dev_mailbox: tuple[str, str]
) -> None:
    folder, _ = dev_mailbox
    options = emailmw.Options.from_dict(dev_server.config("alice", mailbox=folder))
    with emailmw.Context(options) as ctx:
        sub = emailmw.Subscription("/progress", context=ctx)
        pub = emailmw.Publisher("/progress", context=ctx)
        for i in range(4):
            pub.publish(f"p{i}")
        for _ in range(4):
            emailmw.wait_for_message(sub, 30)
    out, progress = io.StringIO(), io.StringIO()
    assert commands.run_history(options, "/progress", 2, out, progress=progress) == 0
    assert len(out.getvalue().splitlines()) == 2
    assert "history: listing 4/4 (100%)" in progress.getvalue()
    assert "history: fetching 2/2 (100%)" in progress.getvalue()
    out, progress = io.StringIO(), io.StringIO()
    with emailmw.Context(options) as ctx:
        status = commands.run_prune(ctx, out, older_than=0, progress=progress)
    assert status == 0
    assert "total: examined 4, deleted 4, kept 0" in out.getvalue()
    assert "prune: listing 4/4 (100%)" in progress.getvalue()
    assert "prune: deleting 4/4 (100%)" in progress.getvalue()
