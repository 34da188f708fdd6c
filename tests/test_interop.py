"""Wire compatibility with the reference implementation (rmw_email): issue 11.

Every email emailmw sends with ``wire-format: rmw-email`` goes through
:mod:`rmw_email_parser` (the reference's acceptance rules as measured), over the
intraprocess transport (each email encoded as the SMTP sender would write it)
and through the dev server in ``rmw_email_compat`` mode (the stored bytes, as a
reference receiver fetches them). Service round trips are run both ways with
reference-shaped requests and responses.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from fake_smtp import FakeSmtp
from imapclient import IMAPClient
from mailstack import require_mailstack, stored_emails
from rmw_email_parser import (
    REQUIRED_HEADERS,
    RejectedEmail,
    matches_response,
    message_info,
    parse,
    reference_body,
    reference_request,
    reference_response,
)

import emailmw
from emailmw.cli import main as emailmw_main
from emailmw.devserver import DevServer
from emailmw.devserver.errors import PortInUseError
from emailmw.devserver.server import RMW_EMAIL_PORTS
from emailmw.transport.codec import decode_email, encode_email
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients
from emailmw.transport.intra import IntraEmailReceiver
from emailmw.transport.settings import ServerAddress, SmtpSettings
from emailmw.transport.smtp import SmtpEmailSender

pytestmark = [pytest.mark.timeout(60)]

EMAIL_WAIT = 20.0
INTRA_WAIT = 5.0

#: Messages of every shape the raw body can carry.
MESSAGES = [
    "hello",
    "",
    "two\nlines",
    "ends with a line break\n",
    "\n\nblank lines around\n\n",
    ".\n..leading dots\n.",
    "From the start of a line\nFrom here too",
    "trailing spaces   \ttabs\t",
    "café über naïve ✓ 🙂",
    "=3D not quoted-printable =\n=?utf-8?b?YQ==?=",
    "x" * 998,
]


def rmw_email(email: EmailData) -> bytes:
    """``email`` as the SMTP sender writes it in the rmw-email format (8BITMIME and
    SMTPUTF8 offered)."""
    return encode_email(email, wire_format="rmw-email")


def new_email(subject: str = "/t", body: str = "hello", **headers: str) -> EmailData:
    return EmailData(
        EmailContent(subject, body),
        EmailHeaders({"Source-Timestamp": "1", "Publisher-GID": "7", **headers}),
        message_id="<abc@example.test>",
        from_="alice@example.test",
        recipients=EmailRecipients(to=["alice@example.test"], bcc=["secret@example.test"]),
    )


# ----------------------------------------------------------------------------- codec


@pytest.mark.parametrize("message", MESSAGES)
def test_the_reference_parser_accepts_each_body_exactly(message: str) -> None:
    raw = rmw_email(new_email(body=message))
    parsed = parse(raw)
    assert parsed.body == reference_body(message)
    assert message_info(parsed) == (1, 7)
    decoded = decode_email(raw)  # and emailmw receivers still get the message exactly
    assert decoded is not None
    assert decoded.content.body == message


def test_all_seven_headers_on_one_line_each_and_empty_where_there_is_no_value() -> None:
    raw = rmw_email(new_email())
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    for name in REQUIRED_HEADERS:
        assert sum(line.startswith(f"{name}:") for line in head.split("\r\n")) == 1, name
    parsed = parse(raw)
    assert parsed.headers["Cc"] == ""
    assert parsed.headers["Bcc"] == ""  # Bcc recipients stay in the envelope
    assert "secret" not in raw.decode()
    assert parsed.in_reply_to == ""
    assert parsed.message_id == "<abc@example.test>"
    assert b"Content-Transfer-Encoding: 7bit\r\n" in raw


def test_a_reply_carries_in_reply_to_and_references() -> None:
    email = new_email()
    email.in_reply_to = "<request@example.test>"
    parsed = parse(rmw_email(email))
    assert parsed.in_reply_to == "<request@example.test>"
    assert parsed.headers["References"] == "<request@example.test>"


def test_the_default_wire_format_is_the_one_the_reference_cannot_parse() -> None:
    """The facts of the issue: today's format (kept byte for byte) has no Cc, Bcc or
    In-Reply-To, and a quoted-printable or base64 body."""
    email = new_email(body="hello")
    default = encode_email(email)
    assert (
        default.split(b"\r\nDate: ")[0]
        == encode_email(email, wire_format="emailmw").split(b"\r\nDate: ")[0]
    )
    with pytest.raises(RejectedEmail, match="no Cc header"):
        parse(default)
    assert b"Content-Transfer-Encoding: quoted-printable" in default
    assert b"\r\n\r\nhello=\r\n" in default


def test_an_8bit_body_needs_8bitmime_and_says_so() -> None:
    email = new_email(body="café")
    raw = encode_email(email, wire_format="rmw-email", eight_bit=True)
    assert b"Content-Transfer-Encoding: 8bit\r\n" in raw
    assert parse(raw).body == "café\r\n"
    with pytest.raises(emailmw.InvalidMessageError, match=r"U\+00E9 at index 3.*8BITMIME"):
        encode_email(email, wire_format="rmw-email", eight_bit=False)
    ascii_only = encode_email(new_email(body="cafe"), wire_format="rmw-email", eight_bit=False)
    assert parse(ascii_only).body == "cafe\r\n"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("a\r\nb", "CR \\(U\\+000D\\) at index 1"),
        ("lone\rcr", "CR \\(U\\+000D\\) at index 4"),
        ("nul\0", "NUL \\(U\\+0000\\) at index 3"),
        ("ok\n" + "y" * 999, "line 2 is 999 octets"),
        ("é" * 500, "line 1 is 1000 octets"),
        ("a\ud800", "lone surrogate"),
    ],
)
def test_a_body_that_cannot_travel_raw_is_refused_with_the_reason(body: str, reason: str) -> None:
    with pytest.raises(emailmw.InvalidMessageError, match=reason):
        rmw_email(new_email(body=body))


def test_the_subject_goes_raw_and_unfolded() -> None:
    long_topic = "/interop/" + "long" * 18  # 81 characters: emailmw folds it by default
    parsed = parse(rmw_email(new_email(subject=long_topic)))
    assert parsed.subject == long_topic
    assert b"\r\n " in encode_email(new_email(subject=long_topic)).split(b"\r\nMessage-ID")[0]
    utf8 = rmw_email(new_email(subject="/interop/tøpic"))
    assert parse(utf8).subject == "/interop/tøpic"
    assert "Subject: /interop/tøpic\r\n".encode() in utf8
    decoded = decode_email(utf8)
    assert decoded is not None and decoded.content.subject == "/interop/tøpic"


def test_a_non_ascii_subject_needs_smtputf8() -> None:
    with pytest.raises(emailmw.InvalidNameError, match=r"U\+00F8 at index 10.*SMTPUTF8"):
        encode_email(
            new_email(subject="/interop/tøpic"), wire_format="rmw-email", utf8_headers=False
        )


def test_other_header_values_stay_on_one_line() -> None:
    raw = rmw_email(new_email(**{"Note": "ünïcode " * 20, "Plain": "word " * 30 + "end"}))
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"\r\n " not in head and b"\r\n\t" not in head
    decoded = decode_email(raw)
    assert decoded is not None
    assert decoded.headers["Note"] == "ünïcode " * 19 + "ünïcode "
    assert decoded.headers["Plain"] == "word " * 30 + "end"


# ----------------------------------------------------------------------------- intraprocess


@pytest.fixture
def intra(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[emailmw.Context, list[bytes]]]:
    """An intraprocess context in rmw-email mode, and every email it sends, encoded as
    the SMTP sender would write it."""
    sent: list[bytes] = []
    deliver = IntraEmailReceiver.deliver

    def spy(receiver: IntraEmailReceiver, email: EmailData) -> str:
        sent.append(rmw_email(email))
        return deliver(receiver, email)

    monkeypatch.setattr(IntraEmailReceiver, "deliver", spy)
    ctx = emailmw.Context(emailmw.Options(intraprocess=True, wire_format="rmw-email")).init()
    try:
        yield ctx, sent
    finally:
        ctx.shutdown()


def test_intraprocess_messages_pass_the_reference_parser(
    intra: tuple[emailmw.Context, list[bytes]],
) -> None:
    ctx, sent = intra
    topic = "/interop/tøpic"
    sub = emailmw.Subscription(topic, context=ctx)
    pub = emailmw.Publisher(topic, context=ctx)
    for message in MESSAGES:
        pub.publish(message)
        assert emailmw.wait_for_message(sub, INTRA_WAIT) == message
    assert len(sent) == len(MESSAGES)
    for raw, message in zip(sent, MESSAGES, strict=True):
        parsed = parse(raw)
        assert parsed.subject == topic
        assert parsed.body == reference_body(message)
        stamp, gid = message_info(parsed)
        assert gid == pub.gid.value
        assert abs(stamp - time.time_ns()) < 60 * 10**9


def test_intraprocess_refuses_what_cannot_travel_raw(
    intra: tuple[emailmw.Context, list[bytes]],
) -> None:
    ctx, sent = intra
    pub = emailmw.Publisher("/t", context=ctx)
    with pytest.raises(emailmw.InvalidMessageError, match="CR"):
        pub.publish("a\r\nb")
    assert sent == []  # nothing was handed over
    for bad in (" /leading-space", "/encoded=?word", "/trailing "):
        with pytest.raises(emailmw.InvalidNameError, match="rmw-email"):
            emailmw.Publisher(bad, context=ctx)
    # the default format takes these names
    with emailmw.Context(emailmw.Options(intraprocess=True)) as plain:
        emailmw.Publisher(" /leading-space", context=plain).close()


def test_intraprocess_services_follow_the_reference_rules(
    intra: tuple[emailmw.Context, list[bytes]],
) -> None:
    ctx, sent = intra
    server = emailmw.ServiceServer("/interop/add", context=ctx)
    client = emailmw.ServiceClient("/interop/add", context=ctx)
    with pytest.raises(emailmw.InvalidMessageError, match=r"request cannot be sent.*CR"):
        client.send_request("1\r\n+1")  # refused before it takes a sequence number
    first = client.send_request("1+1")
    second = client.send_request("2+2")
    assert (first, second) == (0, 1)  # sequence numbers start at 0, as the reference's
    for _ in range(2):
        request = emailmw.wait_for_request(server, INTRA_WAIT)
        left, _, right = request.content.partition("+")
        server.send_response(request.id, str(int(left) + int(right)))
    assert emailmw.wait_for_response(first, client, INTRA_WAIT) == "2"
    assert emailmw.wait_for_response(second, client, INTRA_WAIT) == "4"
    requests, responses = sent[:2], sent[2:]
    gid = client.gid.value
    for number, raw in enumerate(requests):
        parsed = parse(raw)
        assert parsed.in_reply_to == ""
        assert parsed.number("Client-GID") == gid
        assert parsed.number("Publisher-GID") == (gid + 1) % 2**32
        assert parsed.number("Request-Sequence-Number") == number
    request_ids = {parse(raw).message_id: n for n, raw in enumerate(requests)}
    for raw in responses:
        parsed = parse(raw)
        number = request_ids[parsed.in_reply_to]
        assert matches_response(parsed, gid, number)
        assert parsed.body == reference_body(str(2 * (number + 1)))


def test_intraprocess_server_answers_a_reference_request(
    intra: tuple[emailmw.Context, list[bytes]],
) -> None:
    ctx, sent = intra
    server = emailmw.ServiceServer("/interop/echo", context=ctx)
    raw = reference_request(
        "/interop/echo",
        "ping",
        client_gid=41,
        sequence_number=0,
        timestamp=time.time_ns(),
        to="intraprocess@localhost",
    )
    email = decode_email(raw)
    assert email is not None
    receiver = ctx._receiver
    assert isinstance(receiver, IntraEmailReceiver)
    email.message_id = receiver.new_message_id()  # as a mail server stamps it
    receiver.deliver(email)
    request, info = emailmw.wait_for_request_with_info(server, INTRA_WAIT)
    assert request.content == "ping"  # the reference's final CRLF is not part of it
    assert (info.client_gid.value, info.sequence_number) == (41, 0)
    server.send_response(request.id, "pong")
    response = parse(sent[-1])
    assert response.in_reply_to == email.message_id
    assert matches_response(response, 41, 0)
    assert response.body == "pong\r\n"


def test_intraprocess_client_takes_a_reference_response(
    intra: tuple[emailmw.Context, list[bytes]],
) -> None:
    ctx, sent = intra
    client = emailmw.ServiceClient("/interop/echo", context=ctx)
    number = client.send_request("ping")
    request = parse(sent[-1])
    raw = reference_response(
        "/interop/echo",
        "pong",
        in_reply_to=request.message_id,
        client_gid=request.number("Client-GID"),
        sequence_number=request.number("Request-Sequence-Number"),
        timestamp=time.time_ns(),
        to="intraprocess@localhost",
    )
    email = decode_email(raw)
    assert email is not None
    receiver = ctx._receiver
    assert isinstance(receiver, IntraEmailReceiver)
    email.message_id = receiver.new_message_id()
    receiver.deliver(email)
    assert number == 0
    assert emailmw.wait_for_response(number, client, INTRA_WAIT) == "pong"


# ----------------------------------------------------------------------------- dev server


@pytest.fixture(scope="module")
def compat_server() -> Iterator[DevServer]:
    """A dev server in rmw_email_compat mode (on free ports: tests run side by side)."""
    require_mailstack()
    with DevServer(accounts=("alice",), rmw_email_compat=True) as server:
        yield server


def compat_context(server: DevServer) -> tuple[emailmw.Context, str]:
    folder, address = server.new_mailbox("alice")
    config = server.config("alice", mailbox=folder, to=address)
    assert config["email"]["wire-format"] == "rmw-email"
    return emailmw.Context(emailmw.Options.from_dict(config)).init(), folder


def send_raw(server: DevServer, raw: bytes, to: str) -> None:
    account = server.account("alice")
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
        smtp.login(account.address, account.password)
        smtp.sendmail(account.address, [to], raw)


@pytest.mark.mailstack
@pytest.mark.timeout(120)
def test_messages_through_the_compat_server_pass_the_reference_parser(
    compat_server: DevServer,
) -> None:
    ctx, folder = compat_context(compat_server)
    try:
        topic = "/interop/" + "long" * 18
        sub = emailmw.Subscription(topic, context=ctx)
        pub = emailmw.Publisher(topic, context=ctx)
        for message in MESSAGES:
            pub.publish(message)
        got = [emailmw.wait_for_message(sub, EMAIL_WAIT) for _ in MESSAGES]
        assert sorted(got) == sorted(MESSAGES)
        stored = stored_emails(compat_server, folder, len(MESSAGES), timeout=EMAIL_WAIT)
    finally:
        ctx.shutdown()
    bodies = []
    for raw in stored:
        parsed = parse(raw)
        assert parsed.subject == topic
        assert message_info(parsed)[1] == pub.gid.value
        bodies.append(parsed.body)
    assert sorted(bodies) == sorted(reference_body(m) for m in MESSAGES)


@pytest.mark.mailstack
def test_the_compat_server_refuses_a_non_ascii_topic_at_creation(
    compat_server: DevServer,
) -> None:
    """Dovecot's LMTP takes no SMTPUTF8 mail, so compat mode does not offer it, and a
    non-ASCII Subject cannot go raw: refused when the entity is made, not lost later."""
    ctx, _ = compat_context(compat_server)
    try:
        with pytest.raises(emailmw.InvalidNameError, match="SMTPUTF8"):
            emailmw.Publisher("/interop/tøpic", context=ctx)
        emailmw.Publisher("/interop/topic", context=ctx).close()
    finally:
        ctx.shutdown()


REFERENCE_PUBLICATION = (
    "From: {to}\r\nTo: {to}\r\nCc: \r\nBcc: \r\nIn-Reply-To: \r\nSubject: /interop/ref\r\n"
    "Source-Timestamp: {stamp}\r\nPublisher-GID: 9\r\n\r\nfrom the reference\r\n"
)


@pytest.mark.mailstack
def test_the_compat_rules_fix_the_reference_nodes_own_mail(
    compat_server: DevServer, dev_server: DevServer
) -> None:
    """A reference node writes no Message-ID and a Bcc: stock Postfix stores
    ``Message-Id`` and drops ``Bcc``; the compat rules restore both."""
    stored = {}
    for name, server in (("stock", dev_server), ("compat", compat_server)):
        folder, address = server.new_mailbox("alice")
        raw = REFERENCE_PUBLICATION.format(to=address, stamp=time.time_ns()).encode()
        send_raw(server, raw, address)
        stored[name] = stored_emails(server, folder, 1, timeout=EMAIL_WAIT)[0]
    with pytest.raises(RejectedEmail, match=r"no Bcc header|no Message-ID header"):
        parse(stored["stock"])
    assert b"\r\nMessage-Id: <" in stored["stock"]
    parsed = parse(stored["compat"])
    assert parsed.headers["Bcc"] == ""
    assert parsed.message_id.startswith("<")
    assert parsed.body == "from the reference\r\n"


@pytest.mark.mailstack
@pytest.mark.timeout(120)
def test_emailmw_server_answers_a_reference_client_through_the_compat_server(
    compat_server: DevServer,
) -> None:
    ctx, folder = compat_context(compat_server)
    try:
        address = ctx.options.from_address
        assert address is not None
        server = emailmw.ServiceServer("/interop/echo", context=ctx)
        for number in (0, 1):
            raw = reference_request(
                "/interop/echo",
                f"ping {number}",
                client_gid=41,
                sequence_number=number,
                timestamp=time.time_ns(),
                to=address,
            )
            send_raw(compat_server, raw, address)
        for _ in range(2):
            request, info = emailmw.wait_for_request_with_info(server, EMAIL_WAIT)
            assert info.client_gid.value == 41
            assert request.content == f"ping {info.sequence_number}"
            server.send_response(request.id, f"pong {info.sequence_number}")
        stored = [parse(raw) for raw in stored_emails(compat_server, folder, 4, timeout=EMAIL_WAIT)]
    finally:
        ctx.shutdown()
    requests = {
        e.message_id: e.number("Request-Sequence-Number") for e in stored if not e.in_reply_to
    }
    responses = [e for e in stored if e.in_reply_to]
    assert sorted(requests.values()) == [0, 1]
    assert len(responses) == 2
    for response in responses:
        number = requests[response.in_reply_to]
        assert matches_response(response, 41, number)
        assert response.body == f"pong {number}\r\n"


@pytest.mark.mailstack
@pytest.mark.timeout(120)
def test_a_reference_server_answers_emailmw_client_through_the_compat_server(
    compat_server: DevServer,
) -> None:
    ctx, folder = compat_context(compat_server)
    try:
        address = ctx.options.from_address
        assert address is not None
        client = emailmw.ServiceClient("/interop/echo", context=ctx)
        future = client.call_future("ping")
        request = parse(stored_emails(compat_server, folder, 1, timeout=EMAIL_WAIT)[0])
        gid = client.gid.value
        assert request.subject == "/interop/echo"
        assert request.in_reply_to == ""
        assert request.number("Client-GID") == gid
        assert request.number("Publisher-GID") == (gid + 1) % 2**32
        assert request.number("Request-Sequence-Number") == 0
        assert request.body == "ping\r\n"
        response = reference_response(
            "/interop/echo",
            "pong",
            in_reply_to=request.message_id,
            client_gid=gid,
            sequence_number=0,
            timestamp=time.time_ns(),
            to=address,
        )
        send_raw(compat_server, response, address)
        assert future.result(EMAIL_WAIT) == "pong"
    finally:
        ctx.shutdown()


@pytest.fixture
def imaps_port_taken() -> Iterator[None]:
    """127.0.0.1:993 held (by this fixture, unless something else holds it already)."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past a TIME_WAIT
    try:
        holder.bind(("127.0.0.1", RMW_EMAIL_PORTS["imaps"]))
        holder.listen()
    except OSError:
        pass  # something else holds it already: the same error is expected
    try:
        yield
    finally:
        holder.close()


@pytest.mark.mailstack
@pytest.mark.usefixtures("imaps_port_taken")
def test_the_reference_ports_give_a_clear_error_when_taken() -> None:
    require_mailstack()
    server = DevServer(accounts=("alice",), rmw_email_compat=True, rmw_email_ports=True)
    try:
        with pytest.raises(PortInUseError, match=r"127.0.0.1:993 \(IMAPS\)"):
            server.start()
    finally:
        server.stop()


@pytest.mark.mailstack
@pytest.mark.usefixtures("imaps_port_taken")
def test_dev_server_command_with_rmw_email_compat_reports_a_taken_port(
    capsys: pytest.CaptureFixture[str],
) -> None:
    require_mailstack()
    assert emailmw_main(["dev-server", "--rmw-email-compat", "--accounts", "alice"]) == 1
    error = capsys.readouterr().err
    assert "emailmw dev-server:" in error
    assert "127.0.0.1:993 (IMAPS)" in error
    assert "hard-code" in error


@pytest.mark.mailstack
def test_the_reference_ports_are_used_when_free() -> None:
    require_mailstack()
    for port in RMW_EMAIL_PORTS.values():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemons do
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                pytest.skip(f"127.0.0.1:{port} is taken on this machine")
    with DevServer(accounts=("alice",), rmw_email_compat=True, rmw_email_ports=True) as server:
        assert (server.imaps_port, server.smtps_port) == (993, 465)
        account = server.account("alice")
        context = ssl.create_default_context(cafile=str(server.ca_file))
        with IMAPClient(server.host, 993, ssl=True, ssl_context=context) as imap:
            imap.login(account.address, account.password)
        with smtplib.SMTP_SSL(server.host, 465, context=context, timeout=10) as smtp:
            smtp.login(account.address, account.password)


# ----------------------------------------------------------------------------- SMTP extensions


def fake_sender(server: FakeSmtp) -> SmtpEmailSender:
    settings = SmtpSettings(
        server=ServerAddress("smtp", "127.0.0.1", server.port, "starttls"),
        from_address="alice@example.test",
        recipients=EmailRecipients(to=["alice@example.test"]),
        timeout=5.0,
        send_timeout=5.0,
        wire_format="rmw-email",
    )
    return SmtpEmailSender(settings)


def mail_parameters(server: FakeSmtp) -> list[list[str]]:
    """The parameters of each MAIL FROM the server heard, but SIZE (smtplib adds it)."""
    return [
        [p for p in command.split()[2:] if not p.lower().startswith("size=")]
        for command in server.commands
        if command.upper().startswith("MAIL ")
    ]


def test_smtp_without_8bitmime_refuses_an_8bit_body_before_sending() -> None:
    """A server that offers neither 8BITMIME nor SMTPUTF8 (Postfix always offers
    8BITMIME: a scripted one)."""
    with FakeSmtp(extensions=("SIZE 100000",)) as server:
        sender = fake_sender(server)
        try:
            headers = EmailHeaders({"Source-Timestamp": "1", "Publisher-GID": "7"})
            with pytest.raises(emailmw.InvalidMessageError, match="8BITMIME"):
                sender.send(EmailContent("/t", "café"), headers)
            with pytest.raises(emailmw.InvalidNameError, match="SMTPUTF8"):
                sender.send(EmailContent("/tøpic", "cafe"), headers)
            assert not any(c.upper().startswith("MAIL ") for c in server.commands)
            sender.send(EmailContent("/t", "cafe"), headers)  # 7-bit goes, with no parameter
        finally:
            sender.close()
        assert mail_parameters(server) == [[]]
        assert parse(server.messages[0]).body == "cafe\r\n"


def test_smtp_declares_8bitmime_and_smtputf8_when_offered_and_needed() -> None:
    with FakeSmtp(extensions=("SIZE 100000", "8BITMIME", "SMTPUTF8")) as server:
        sender = fake_sender(server)
        try:
            headers = EmailHeaders({"Source-Timestamp": "1", "Publisher-GID": "7"})
            sender.send(EmailContent("/t", "ascii"), headers)
            sender.send(EmailContent("/t", "café"), headers)
            sender.send(EmailContent("/tøpic", "café"), headers)
        finally:
            sender.close()
        assert mail_parameters(server) == [[], ["BODY=8BITMIME"], ["BODY=8BITMIME", "SMTPUTF8"]]
        assert [parse(m).body for m in server.messages] == ["ascii\r\n", "café\r\n", "café\r\n"]
        assert parse(server.messages[2]).subject == "/tøpic"
