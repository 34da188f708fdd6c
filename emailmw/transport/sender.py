"""The interface every email sender implements."""

from __future__ import annotations

import abc

from emailmw.security import sign_email
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders

__all__ = ["EmailSender"]


class EmailSender(abc.ABC):
    """Sends emails: new ones (messages, requests) and replies (responses).

    Implementations are safe to call from several threads at once.
    Both methods return only once the email was handed over (accepted by the
    SMTP server, or queued in memory), and return its ``Message-ID`` (with
    angle brackets), or raise a :class:`~emailmw.TransportError`.

    With a signing key set (:meth:`set_signing_key`), implementations call
    :meth:`_seal` on each email once its ``Message-ID`` is final and before it
    leaves, which adds the ``Emailmw-Signature`` header.
    """

    _signing_key: bytes | None = None

    def set_signing_key(self, key: bytes | None) -> None:
        """Sign every email sent from now on with ``key`` (``None``: stop signing)."""
        self._signing_key = key

    def _seal(self, email: EmailData) -> None:
        key = self._signing_key
        if key is not None:
            sign_email(email, key)

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
