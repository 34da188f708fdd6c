"""The transport layer: email containers, the sender/receiver interfaces, their
settings, and their implementations (intraprocess, SMTP, IMAP). The context
assembles a sender and a receiver from its options."""

from __future__ import annotations

from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients
from emailmw.transport.intra import IntraEmailReceiver, IntraEmailSender
from emailmw.transport.receiver import EmailReceiver
from emailmw.transport.sender import EmailSender
from emailmw.transport.settings import ImapSettings, SmtpSettings

__all__ = [
    "EmailContent",
    "EmailData",
    "EmailHeaders",
    "EmailReceiver",
    "EmailRecipients",
    "EmailSender",
    "ImapSettings",
    "IntraEmailReceiver",
    "IntraEmailSender",
    "SmtpSettings",
]
