"""The transport layer: email containers, the sender/receiver interfaces and their
implementations (intraprocess, SMTP, IMAP)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients
from emailmw.transport.intra import IntraEmailReceiver, IntraEmailSender
from emailmw.transport.receiver import EmailReceiver
from emailmw.transport.sender import EmailSender

if TYPE_CHECKING:
    from emailmw.options import Options
    from emailmw.stats import StatsCounters

__all__ = [
    "EmailContent",
    "EmailData",
    "EmailHeaders",
    "EmailReceiver",
    "EmailRecipients",
    "EmailSender",
    "IntraEmailReceiver",
    "IntraEmailSender",
    "create_transport",
]


def create_transport(
    options: Options, stats: StatsCounters | None = None
) -> tuple[EmailSender, EmailReceiver]:
    """The sender and receiver that ``options`` asks for (not yet connected)."""
    if options.intraprocess:
        receiver = IntraEmailReceiver()
        return IntraEmailSender(receiver, stats=stats), receiver
    from emailmw.transport.imap import ImapEmailReceiver
    from emailmw.transport.smtp import SmtpEmailSender

    return SmtpEmailSender(options, stats), ImapEmailReceiver(options, stats)
