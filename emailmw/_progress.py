"""Progress output for long commands (``emailmw prune``, ``emailmw history``).

:class:`ProgressReporter` is a :data:`~emailmw.transport.mailbox.Progress`
callable: on a terminal it redraws one bar per phase in place (``\\r``, at most
ten times a second, and always at the end of a phase); elsewhere (a file, a
pipe, a log) it prints plain lines, one each time a phase starts, passes
another tenth of its total, and ends.
"""

from __future__ import annotations

import time
from typing import TextIO

__all__ = ["ProgressReporter"]

_BAR_WIDTH = 30
_REDRAW_EVERY = 0.1  # seconds between redraws of a bar


class ProgressReporter:
    """Writes ``progress(phase, done, total)`` calls to ``stream`` (see the module
    docstring). ``label`` starts every line (the command's name)."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self._stream = stream
        self._label = label
        isatty = getattr(stream, "isatty", None)
        self._terminal = bool(isatty()) if callable(isatty) else False
        self._phase: str | None = None
        self._tenth = -1  # the last tenth printed (plain lines)
        self._drawn_at = 0.0
        self._open_bar = False  # a bar is on the screen without its newline

    @property
    def terminal(self) -> bool:
        """True if the stream is a terminal (bars), False for plain lines."""
        return self._terminal

    def __call__(self, phase: str, done: int, total: int) -> None:
        new_phase = phase != self._phase
        if new_phase:
            self._end_bar()
            self._phase, self._tenth = phase, -1
        finished = done >= total
        if self._terminal:
            now = time.monotonic()
            if new_phase or finished or now - self._drawn_at >= _REDRAW_EVERY:
                self._drawn_at = now
                self._draw(phase, done, total)
                if finished:
                    self._end_bar()
            return
        tenth = 10 if finished else (10 * done // total if total else 0)
        if tenth > self._tenth:
            self._tenth = tenth
            percent = 100 if finished else 100 * done // total
            self._stream.write(f"{self._label}: {phase} {done}/{total} ({percent}%)\n")
            self._stream.flush()

    def close(self) -> None:
        """End a bar left open (an operation that stopped early)."""
        self._end_bar()

    def _draw(self, phase: str, done: int, total: int) -> None:
        fraction = 1.0 if total <= 0 else min(done / total, 1.0)
        filled = round(fraction * _BAR_WIDTH)
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        self._stream.write(
            f"\r{self._label}: {phase:<9} [{bar}] {done}/{total} ({fraction * 100:3.0f}%)"
        )
        self._stream.flush()
        self._open_bar = True

    def _end_bar(self) -> None:
        if self._open_bar:
            self._stream.write("\n")
            self._stream.flush()
            self._open_bar = False
