"""Capture every record of the ``emailmw`` loggers while a block runs (tests only)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["ListHandler", "capture_emailmw_logs"]


class ListHandler(logging.Handler):
    """Keeps every record it is given."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def capture_emailmw_logs() -> Iterator[ListHandler]:
    """Every record of the ``emailmw`` loggers, DEBUG included, while the block runs."""
    handler = ListHandler()
    logger = logging.getLogger("emailmw")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
