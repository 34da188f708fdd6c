"""The one timeout rule used everywhere in emailmw.

A timeout is seconds as ``float``/``int`` or a :class:`datetime.timedelta`.
``None`` or a negative value waits forever; ``0`` does not block.
"""

from __future__ import annotations

import math
import threading
import time
from datetime import timedelta
from typing import TypeAlias

__all__ = ["Deadline", "Timeout", "to_seconds"]

Timeout: TypeAlias = float | int | timedelta | None


def to_seconds(timeout: Timeout) -> float | None:
    """Normalize a timeout: ``None`` means forever, otherwise seconds ``>= 0``."""
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"timeout must be seconds or a timedelta, got {type(timeout).__name__}")
    if math.isnan(seconds):
        raise ValueError("timeout must not be NaN")
    if seconds < 0 or seconds > threading.TIMEOUT_MAX:
        return None  # negative, or longer than any lock can wait: forever
    return seconds


class Deadline:
    """A point in monotonic time derived from a timeout."""

    __slots__ = ("_end",)

    def __init__(self, timeout: Timeout) -> None:
        seconds = to_seconds(timeout)
        self._end = None if seconds is None else time.monotonic() + seconds

    @property
    def forever(self) -> bool:
        """True when there is no deadline."""
        return self._end is None

    def remaining(self) -> float | None:
        """Seconds left (``>= 0``), or ``None`` for forever."""
        if self._end is None:
            return None
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self._end is not None and time.monotonic() >= self._end
