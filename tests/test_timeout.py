"""The one timeout rule: seconds or timedelta; None/negative forever; 0 no block."""

from __future__ import annotations

import math
import time
from datetime import timedelta

import pytest

from emailmw.timeout import Deadline, to_seconds

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("timeout", "expected"),
    [
        (None, None),
        (-1, None),
        (-0.001, None),
        (timedelta(seconds=-1), None),
        (0, 0.0),
        (0.0, 0.0),
        (1, 1.0),
        (2.5, 2.5),
        (timedelta(milliseconds=250), 0.25),
        (timedelta(0), 0.0),
    ],
)
def test_to_seconds(timeout: object, expected: float | None) -> None:
    result = to_seconds(timeout)  # type: ignore[arg-type]
    assert result == expected
    if result is not None:
        assert isinstance(result, float)


@pytest.mark.parametrize("timeout", ["1", b"1", True, False, [1], object()])
def test_to_seconds_rejects_other_types(timeout: object) -> None:
    with pytest.raises(TypeError):
        to_seconds(timeout)  # type: ignore[arg-type]


def test_to_seconds_rejects_nan() -> None:
    with pytest.raises(ValueError):
        to_seconds(math.nan)


def test_deadline_forever() -> None:
    for timeout in (None, -3, timedelta(seconds=-1)):
        deadline = Deadline(timeout)
        assert deadline.forever
        assert deadline.remaining() is None
        assert not deadline.expired()


def test_deadline_zero_is_expired_at_once() -> None:
    deadline = Deadline(0)
    assert not deadline.forever
    assert deadline.remaining() == 0.0
    assert deadline.expired()


def test_deadline_counts_down() -> None:
    deadline = Deadline(timedelta(seconds=0.05))
    remaining = deadline.remaining()
    assert remaining is not None
    assert 0.0 < remaining <= 0.05
    assert not deadline.expired()
    time.sleep(0.06)
    assert deadline.expired()
    assert deadline.remaining() == 0.0
