"""Scripted fake mail servers on 127.0.0.1, for what a real Postfix or Dovecot cannot be
made to show on demand: a 421 after DATA, a given sequence of replies to one RCPT TO,
a refused greeting, a given set of AUTH mechanisms, a server that (as if an attacker
stripped it) never offers STARTTLS.

Everything else is tested against the real dev server (tests/mailstack.py); keep it so.

- :class:`FakeSmtp` is the scripted SMTP server (greeting, EHLO keywords, AUTH reply,
  replies to RCPT TO per recipient, replies after DATA), recording every command line,
  every message body and the recipients it accepted for each.
- :class:`FakeImap` is the IMAP counterpart for the one thing the tests need from it:
  a plain-text server that offers no STARTTLS and refuses every login.
- The ``fake_smtp`` fixture yields a default :class:`FakeSmtp` and stops it afterwards.
  Import it under its function name (``fake_smtp_fixture``), the test parameter stays
  ``fake_smtp``.

Both servers listen on 127.0.0.1 at a free port (:attr:`~_ScriptedServer.port`), serve
each connection on its own daemon thread, speak plain text only (they cannot do TLS,
so never advertise STARTTLS), and are context managers: leaving the ``with`` block, or
:meth:`~_ScriptedServer.stop`, shuts them down.
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Self

import pytest


class _ScriptedServer(socketserver.ThreadingTCPServer):
    """Plumbing shared by the fakes: a threaded TCP server on 127.0.0.1:<free port>,
    started at construction, that records every command line in :attr:`commands`.

    Subclasses set their script attributes *before* calling ``super().__init__``, which
    starts serving."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler: type[_LineHandler]) -> None:
        self.commands: list[str] = []
        super().__init__(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class _LineHandler(socketserver.StreamRequestHandler):
    """One connection: CRLF-terminated lines out, recorded command lines in."""

    server: _ScriptedServer

    def say(self, text: str) -> None:
        self.wfile.write(text.encode() + b"\r\n")

    def commands(self) -> Iterator[str]:
        """Each line the client sends, recorded on the server, until it hangs up."""
        while line := self.rfile.readline():
            command = line.decode("utf-8", "replace").strip()
            self.server.commands.append(command)
            yield command


class FakeSmtp(_ScriptedServer):
    """A scripted plain-text SMTP server on 127.0.0.1 that records what it hears.

    Scriptable (constructor arguments, or attributes set before the client acts):

    ``greeting``
        The first line sent. If it is not a ``220``, the server hangs up right after it.
    ``extensions``
        The EHLO keywords advertised, default ``AUTH PLAIN LOGIN`` and ``SIZE 100000``.
        Never STARTTLS: this server cannot do TLS.
    ``auth_reply``
        The reply to every AUTH command, whatever the credentials: ``235`` (the
        default) accepts them, a ``5xx`` such as ``535 5.7.8 no`` refuses them.
    ``data_replies``
        The replies to successive messages after DATA, used up in order, then
        ``250 ok``. A ``421`` also closes the connection, as a server going down does.
    ``rcpt_replies``
        Per recipient address (as in ``RCPT TO:<address>``), the replies to its
        successive RCPT commands: a list is used up in order, then ``250 ok``; a
        string is the reply to every one. Recipients not listed get ``250 ok``.

    ``stall_data``
        True: never answer after DATA (a server gone silent mid-send); the
        connection waits for the client to hang up. :meth:`wait_stalled` waits
        until so many sends are held.

    Fixed: MAIL, RSET and NOOP get ``250 ok``; DATA with no recipient accepted gets
    ``554``; QUIT gets ``221`` and a hang-up; any other command gets ``502``.

    Recorded, over all connections in order:

    ``commands``
        Every command line, decoded and stripped (message bodies excluded).
    ``messages``
        Every message body sent after DATA, without the final ``.`` line and with
        the dot-stuffing undone.
    ``envelopes``
        For each entry of ``messages``, the recipients whose RCPT got a ``250`` in
        that transaction, in order.
    """

    def __init__(
        self,
        *,
        greeting: str = "220 fake ESMTP",
        extensions: Iterable[str] = ("AUTH PLAIN LOGIN", "SIZE 100000"),
        auth_reply: str = "235 2.7.0 ok",
        data_replies: Iterable[str] = (),
        rcpt_replies: Mapping[str, Iterable[str] | str] | None = None,
        stall_data: bool = False,
    ) -> None:
        self.stall_data = stall_data
        self._stalled = 0
        self._stalled_changed = threading.Condition()
        self.greeting = greeting
        self.extensions = list(extensions)
        self.auth_reply = auth_reply
        self.data_replies = list(data_replies)
        self.rcpt_replies: dict[str, list[str] | str] = {
            address: replies if isinstance(replies, str) else list(replies)
            for address, replies in (rcpt_replies or {}).items()
        }
        self.messages: list[bytes] = []
        self.envelopes: list[list[str]] = []
        super().__init__(_SmtpHandler)

    def wait_stalled(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` sends are held after DATA (``stall_data``); False at timeout."""
        with self._stalled_changed:
            return self._stalled_changed.wait_for(lambda: self._stalled >= count, timeout)

    def stall(self) -> None:
        """Count a held send (called by a connection's handler)."""
        with self._stalled_changed:
            self._stalled += 1
            self._stalled_changed.notify_all()


class _SmtpHandler(_LineHandler):
    server: FakeSmtp

    def handle(self) -> None:
        self.say(self.server.greeting)
        if not self.server.greeting.startswith("220"):
            return
        self.recipients: list[str] = []  # accepted in the current transaction
        for command in self.commands():
            verb = command.split(" ", 1)[0].upper()
            if verb == "EHLO":
                self.say(self.ehlo_reply())
            elif verb == "AUTH":
                self.say(self.server.auth_reply)
            elif verb in ("MAIL", "RSET"):
                self.recipients = []
                self.say("250 ok")
            elif verb == "NOOP":
                self.say("250 ok")
            elif verb == "RCPT":
                self.say(self.rcpt_reply(command))
            elif verb == "DATA":
                if not self.recipients:
                    self.say("554 5.5.1 no valid recipients")
                elif not self.receive_message():
                    return
            elif verb == "QUIT":
                self.say("221 bye")
                return
            else:
                self.say("502 no")

    def ehlo_reply(self) -> str:
        """``250-fake`` then one line per keyword; the last line has ``250 ``, not ``250-``."""
        lines = ["fake", *self.server.extensions]
        return "\r\n".join(
            f"250{' ' if i == len(lines) - 1 else '-'}{line}" for i, line in enumerate(lines)
        )

    def rcpt_reply(self, command: str) -> str:
        """The scripted reply to ``RCPT TO:<address>``; remembers an accepted address."""
        address = command.partition("<")[2].partition(">")[0]
        script = self.server.rcpt_replies.get(address)
        if isinstance(script, str):
            answer = script
        else:
            answer = script.pop(0) if script else "250 ok"
        if answer.startswith("250"):
            self.recipients.append(address)
        return answer

    def receive_message(self) -> bool:
        """Read one message after DATA and give the scripted reply; False to hang up."""
        self.say("354 go on")
        data = b""
        while not data.endswith(b"\r\n.\r\n"):
            chunk = self.rfile.readline()
            if not chunk:
                return False
            data += chunk
        # drop the final "." line and undo dot-stuffing (RFC 5321 4.5.2)
        self.server.messages.append(data[:-3].replace(b"\r\n..", b"\r\n."))
        self.server.envelopes.append(self.recipients)
        self.recipients = []
        if self.server.stall_data:
            self.server.stall()
            while self.rfile.readline():  # no answer: wait for the client to hang up
                pass
            return False
        answer = self.server.data_replies.pop(0) if self.server.data_replies else "250 ok"
        self.say(answer)
        return not answer.startswith("421")


class FakeImap(_ScriptedServer):
    """A plain-text IMAP server on 127.0.0.1 that offers no STARTTLS and refuses every
    login, recording every command line in ``commands``.

    Not scriptable: it greets with ``* OK``, answers CAPABILITY with ``IMAP4rev1
    AUTH=PLAIN IDLE`` (so a client may try LOGIN or AUTHENTICATE PLAIN), LOGOUT with
    ``* BYE`` and a hang-up, and every other command, credentials included, with ``NO``.
    """

    def __init__(self) -> None:
        super().__init__(_ImapHandler)


class _ImapHandler(_LineHandler):
    server: FakeImap

    def handle(self) -> None:
        self.say("* OK fake IMAP ready")
        for command in self.commands():
            tag, verb = [*command.split(), "", ""][:2]
            if verb.upper() == "CAPABILITY":
                self.say("* CAPABILITY IMAP4rev1 AUTH=PLAIN IDLE")
                self.say(f"{tag} OK done")
            elif verb.upper() == "LOGOUT":
                self.say("* BYE")
                self.say(f"{tag} OK bye")
                return
            else:
                self.say(f"{tag} NO not here")


@pytest.fixture(name="fake_smtp")
def fake_smtp_fixture() -> Iterator[FakeSmtp]:
    """A default :class:`FakeSmtp` (accepts any credentials, 250 after DATA), stopped
    after the test; script it by setting its attributes before the client acts."""
    with FakeSmtp() as server:
        yield server
