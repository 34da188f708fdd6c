"""The interface every email sender implements."""

from __future__ import annotations

import abc

from emailmw.transport.data import EmailContent, EmailData, EmailHeaders

__all__ = ["EmailSender"]


class EmailSender(abc.ABC):
    """Sends emails: new ones (messages, requests) and replies (responses).

    Implementations are safe to call from several threads at once.
    Both methods return only once the email was handed over (accepted by the
    SMTP server, or queued in memory), and return its ``Message-ID`` (with
    angle brackets), or raise a :class:`~emailmw.TransportError`.
    """

    def connect(self) -> None:  # noqa: B027 - optional hook
        """Open connections eagerly so that configuration errors surface at ``init()``."""

    @abc.abstractmethod
    def send(self, content: EmailContent, headers: EmailHeaders | None = None) -> str:
        """Send a new email to the configured recipients; return its Message-ID."""

    @abc.abstractmethod
    def reply(
        self, content: EmailContent, original: EmailData, headers: EmailHeaders | None = None
    ) -> str:
        """Send a reply to ``original`` (to its sender, ``In-Reply-To`` its Message-ID)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Idempotent."""
