"""The ``emailmw`` command's demo, in-process and as a real subprocess."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from emailmw.cli import build_parser, main
from emailmw.demo import run_demo

pytestmark = pytest.mark.timeout(60)

EXPECTED_LINES = [
    "emailmw demo (intraprocess: no mail server needed)",
    "published   'hello #1'",
    "client sent request #1: '2 3'",
    "client sent request #2: '40 2'",
    "client got response to #2: 42",
    "client got response to #1: 5",
    "done",
]


def check_transcript(text: str, messages: int = 3) -> None:
    for line in EXPECTED_LINES:
        assert line in text, f"{line!r} missing from:\n{text}"
    for i in range(1, messages + 1):
        assert f"published   'hello #{i}'" in text
        assert re.search(rf"received    'hello #{i}' from publisher \d+ \(\d+ us", text), text
    assert re.search(r"server answered request #1 of client \d+: 5", text)
    assert re.search(r"server answered request #2 of client \d+: 42", text)
    sent = messages + 4  # messages, two requests, two responses
    assert f"stats: sent={sent} received={sent} delivered={sent} dropped=0" in text


def test_run_demo_in_process() -> None:
    out = io.StringIO()
    assert run_demo(out) == 0
    check_transcript(out.getvalue())


def test_run_demo_more_messages() -> None:
    out = io.StringIO()
    assert run_demo(out, messages=5) == 0
    check_transcript(out.getvalue(), messages=5)
    assert "hello #6" not in out.getvalue()


def test_parser_knows_the_subcommands() -> None:
    parser = build_parser()
    args = parser.parse_args(["demo", "--messages", "2"])
    assert (args.command, args.messages) == ("demo", 2)
    for command in ("check-config", "send", "receive"):
        assert parser.parse_args([command]).command == command
    assert parser.parse_args(["publish", "/t", "m"]).command == "publish"
    assert parser.parse_args(["echo", "/t"]).command == "echo"


def test_main_without_a_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("EMAIL_CONFIG_FILE", None)
    env["PYTHONWARNINGS"] = "error"
    return env


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=30, env=_env(), cwd=cwd, check=False
    )


def test_python_dash_m_demo(tmp_path: Path) -> None:
    result = run([sys.executable, "-m", "emailmw", "demo"], tmp_path)
    assert result.returncode == 0, result.stderr
    check_transcript(result.stdout)
    assert result.stderr == ""


def test_console_script_demo(tmp_path: Path) -> None:
    script = shutil.which("emailmw", path=str(Path(sys.executable).parent))
    argv = (
        [script]
        if script
        else [sys.executable, "-c", "import sys; from emailmw.cli import main; sys.exit(main())"]
    )
    result = run([*argv, "demo", "--messages", "2"], tmp_path)
    assert result.returncode == 0, result.stderr
    check_transcript(result.stdout, messages=2)
    assert "hello #3" not in result.stdout


def test_help(tmp_path: Path) -> None:
    result = run([sys.executable, "-m", "emailmw", "--help"], tmp_path)
    assert result.returncode == 0
    assert "demo" in result.stdout


def test_unknown_command_fails(tmp_path: Path) -> None:
    result = run([sys.executable, "-m", "emailmw", "no-such-command"], tmp_path)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_bad_log_level_is_a_usage_error(tmp_path: Path) -> None:
    result = run([sys.executable, "-m", "emailmw", "--log-level", "bogus", "demo"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "log-level" in result.stderr
