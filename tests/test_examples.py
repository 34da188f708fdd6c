"""Run each intraprocess example as a user would and check what it prints.

The examples that need no mail server: ``examples/*intraprocess*.py``,
``examples/waitset_guard_condition.py``, ``examples/asyncio_pubsub.py`` and
``examples/typed_pubsub.py`` (which also runs against the real dev server when
``$EMAIL_CONFIG_FILE`` is set).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from emailmw.devserver import DevServer

pytestmark = pytest.mark.timeout(60)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: Lines (substrings) each example must print. Examples not listed here must
#: still exit 0.
EXPECTED: dict[str, list[str]] = {
    "pubsub_intraprocess.py": [
        "message:            'hello #1'",
        "message:            'hello #3'",
        "publisher GID:",
        "source timestamp:",
        "received at:",
        "latency:",
        "stats: sent=3 delivered=3 dropped=0",
    ],
    "service_intraprocess.py": [
        "client: 2 + 3 = 5 (request #1)",
        "client: 40 + 2 = 42 (request #2)",
        "client: -7 + 7 = 0 (request #3)",
        "client: 1000 + 337 = 1337 (client GID",
        "sequence number 4",
        "server: context shut down, stopping",
    ],
    "typed_pubsub.py": [
        "north: 21.5 C, 40 % [] headers={}",
        "south: -3.25 C, 85 % ['frost'] headers={'Station-Firmware': '2.1'}",
        "refused: message must be a Reading, got dict",
        "stats: sent=2 delivered=2 dropped=0",
    ],
    "callbacks.py": [
        "call: 'MAKE ME LOUD'",
        "callback: 'hello #1' from publisher",
        "callback: 'hello #3' from publisher",
        "executor stopped after 3 messages",
        "callback errors: 0",
    ],
    "service_call.py": [
        "call: 12.0",
        "futures: [10.0, 2.25]",
        "refused: request must be a Rectangle, got str",
        "/area: sent=6 delivered=6",
    ],
    "asyncio_pubsub.py": [
        "received: 'hello #1'",
        "received: 'hello #3'",
        "async for ended after 3 messages",
        "aget timed out: no message on '/quiet' within 0.1 s",
        "acall: 'make me loud' -> 'MAKE ME LOUD'",
    ],
    "waitset_guard_condition.py": [
        "/temperature: 20.5 C",
        "/humidity: 50 %",
        "stop requested by the guard condition after 6 messages",
    ],
}


def _examples() -> list[Path]:
    found = {
        *EXAMPLES.glob("*intraprocess*.py"),
        EXAMPLES / "waitset_guard_condition.py",
        EXAMPLES / "typed_pubsub.py",
        EXAMPLES / "asyncio_pubsub.py",
        EXAMPLES / "callbacks.py",
        EXAMPLES / "service_call.py",
    }
    return sorted(found)


def _run(example: Path, cwd: Path, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``example`` as a user would, with ``$EMAIL_CONFIG_FILE`` set to ``config``
    (or unset)."""
    env = dict(os.environ)
    env.pop("EMAIL_CONFIG_FILE", None)
    if config is not None:
        env["EMAIL_CONFIG_FILE"] = str(config)
    return subprocess.run(
        [sys.executable, str(example)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_every_expected_example_exists() -> None:
    names = {path.name for path in _examples()}
    assert set(EXPECTED) <= names


@pytest.mark.parametrize("example", _examples(), ids=lambda path: path.name)
def test_example_runs(example: Path, tmp_path: Path) -> None:
    # Run from an empty directory so that no stray ./email.yml is picked up.
    result = _run(example, tmp_path)
    assert result.returncode == 0, (
        f"{example.name} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    for expected in EXPECTED.get(example.name, []):
        assert expected in result.stdout, (
            f"{expected!r} not in the output of {example.name}:\n{result.stdout}"
        )
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.mailstack
@pytest.mark.parametrize(
    "name", ["typed_pubsub.py", "callbacks.py", "service_call.py", "asyncio_pubsub.py"]
)
def test_the_issue_examples_run_over_a_real_mailbox(
    dev_server: DevServer, tmp_path: Path, name: str
) -> None:
    folder, address = dev_server.new_mailbox("alice")
    config = dev_server.write_config("alice", tmp_path / "alice.yml", mailbox=folder, to=address)
    result = _run(EXAMPLES / name, tmp_path, config)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    for expected in EXPECTED[name]:
        assert expected in result.stdout, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
