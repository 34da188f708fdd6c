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
    angle brackets), or raise a :class:`~emailmw.TransportError`. A caller that
    must know the Message-ID before sending (to sign the email:
    :class:`~emailmw.transport.signing.SigningSender`) takes one from
    :meth:`new_message_id` and passes it as ``message_id``.
    """

    def connect(self) -> None:  # noqa: B027 - optional hook
        """Open connections eagerly so that configuration errors surface at ``init()``."""

    @abc.abstractmethod
    def new_message_id(self) -> str:
        """A new, unique Message-ID (with angle brackets) for an email of this sender."""

    @abc.abstractmethod
    def send(
        self,
        content: EmailContent,
        headers: EmailHeaders | None = None,
        *,
        message_id: str | None = None,
    ) -> str:
        """Send a new email to the configured recipients; return its Message-ID
        (``message_id`` if given, else a new one)."""

    @abc.abstractmethod
    def reply(
        self,
        content: EmailContent,
        original: EmailData,
        headers: EmailHeaders | None = None,
        *,
        message_id: str | None = None,
    ) -> str:
        """Send a reply to ``original`` (to its sender, ``In-Reply-To`` its Message-ID)."""

    def offers(self, extension: str) -> bool:
        """Whether what this sender sends through carries the SMTP ``extension``
        (``"8bitmime"``, ``"smtputf8"``, lower-case).

        The default, for in-memory transports, is True: they carry any email.
        """
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Idempotent."""
