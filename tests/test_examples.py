"""Run each intraprocess example as a user would and check what it prints.

Only the examples that need no mail server: ``examples/*intraprocess*.py``,
``examples/waitset_guard_condition.py`` and ``examples/asyncio_pubsub.py``
(intraprocess unless ``EMAIL_CONFIG_FILE`` is set, which these runs unset).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
        EXAMPLES / "asyncio_pubsub.py",
    }
    return sorted(found)


def test_every_expected_example_exists() -> None:
    names = {path.name for path in _examples()}
    assert set(EXPECTED) <= names


@pytest.mark.parametrize("example", _examples(), ids=lambda path: path.name)
def test_example_runs(example: Path, tmp_path: Path) -> None:
    # Run from an empty directory so that no stray ./email.yml is picked up.
    result = subprocess.run(
        [sys.executable, str(example)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={name: value for name, value in os.environ.items() if name != "EMAIL_CONFIG_FILE"},
    )
    assert result.returncode == 0, (
        f"{example.name} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    for expected in EXPECTED.get(example.name, []):
        assert expected in result.stdout, (
            f"{expected!r} not in the output of {example.name}:\n{result.stdout}"
        )
    assert "Traceback" not in result.stderr, result.stderr
