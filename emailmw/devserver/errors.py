"""The errors of the local mail stack.

::

    RuntimeError
    └── DevServerError             start, stop or admin command failed (.log_tail)
        ├── MailStackMissingError  packages not installed, or not root
        └── PortInUseError         a daemon lost a free port to another process
"""

from __future__ import annotations

__all__ = ["DevServerError", "MailStackMissingError", "PortInUseError"]


class DevServerError(RuntimeError):
    """Starting, stopping or administering the local mail stack failed.

    ``log_tail`` holds the last lines of the relevant log(s), also appended to
    the message.
    """

    def __init__(self, message: str, log_tail: str = "") -> None:
        self.log_tail = log_tail
        super().__init__(f"{message}\n--- log tail ---\n{log_tail}" if log_tail else message)


class MailStackMissingError(DevServerError):
    """Dovecot or Postfix is not installed, or this process is not root."""


class PortInUseError(DevServerError):
    """A daemon could not bind a port that was free a moment before."""
