"""Secrets (the password and the signing key) never show: not in logs at any level,
not in ``repr``/``str``, not in exception messages or tracebacks, not on stdout or
stderr.

Each test runs a full publish, subscribe and service round with every logger at
DEBUG (IMAPClient's protocol log included), then scans everything it captured
for the secrets and for their encodings on the wire: base64 at every alignment
(AUTH PLAIN, AUTH LOGIN and IMAP AUTHENTICATE carry base64), and hex.
"""

from __future__ import annotations

import base64
import logging
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from emailmw import (
    AuthenticationError,
    ConfigError,
    Context,
    EmailmwError,
    Options,
    Publisher,
    ServiceClient,
    ServiceServer,
    Subscription,
    wait_for_message,
    wait_for_request,
    wait_for_response,
)
from emailmw.devserver import DevServer
from emailmw.options import PASSWORD_ENV, SIGNING_KEY_ENV
from emailmw.security import sign_email
from emailmw.transport.codec import encode_email, new_message_id
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients

pytestmark = [pytest.mark.timeout(120)]

SIGNING_KEY = "sk-Qw7uZp3Lr9Tx2Vb8Nc5Md1Fh"
FAKE_PASSWORD = "pw-Jk4Ls8Qe2Rt6Yu0Io3Pa7Sd"


# ----------------------------------------------------------------------------- scanning


def encodings(secret: str, username: str | None = None) -> dict[str, str]:
    """``secret`` as it may be written: itself, hex, base64 at each of the three byte
    alignments (the stable middle part), and the exact AUTH PLAIN strings."""
    raw = secret.encode("utf-8")
    found = {"plain": secret, "hex": raw.hex()}
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw).decode("ascii")
        start = 4 if shift else 0  # the first quantum mixes in the padding bytes
        found[f"base64+{shift}"] = encoded[start : len(encoded) - 4]
    if username is not None:
        for plain in (f"\0{username}\0{secret}", f"{username}\0{username}\0{secret}"):
            found[f"AUTH PLAIN {plain[:1]!r}"] = base64.b64encode(plain.encode()).decode()
    assert all(len(value) >= 8 for value in found.values())
    return found


def scan(texts: Iterable[tuple[str, str]], secrets: dict[str, dict[str, str]]) -> list[str]:
    """Every place where one of the encodings of one of the ``secrets`` occurs."""
    leaks = []
    for where, text in texts:
        for name, forms in secrets.items():
            for form, value in forms.items():
                if value in text:
                    leaks.append(f"{name} ({form}) in {where}: ...{text[:200]!r}...")
    return leaks


_FORMATTER = logging.Formatter("%(name)s %(levelname)s %(message)s")


def record_texts(records: Iterable[logging.LogRecord]) -> Iterator[tuple[str, str]]:
    for record in records:
        text = _FORMATTER.format(record)  # message, args, exception and stack text
        yield f"log record {record.name}:{record.lineno}", text
        yield f"log record args {record.name}:{record.lineno}", repr(record.args)


def exception_texts(exc: BaseException) -> Iterator[tuple[str, str]]:
    """``str``, ``repr``, ``args`` and the formatted traceback of ``exc`` and of the
    exceptions chained to it (as a traceback would show them)."""
    yield "traceback", "".join(traceback.format_exception(exc))
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        yield f"str({name})", str(current)
        yield f"repr({name})", repr(current)
        yield f"{name}.args", repr(current.args)
        yield f"{name}.__dict__", repr(vars(current))
        # what a traceback shows: the cause, else the context unless suppressed (from None)
        if current.__cause__ is not None:
            current = current.__cause__
        elif not current.__suppress_context__:
            current = current.__context__
        else:
            current = None


def object_texts(**objects: Any) -> Iterator[tuple[str, str]]:
    for name, obj in objects.items():
        yield f"repr({name})", repr(obj)
        yield f"str({name})", str(obj)
        if isinstance(obj, Options):
            yield f"{name}.model_dump()", repr(obj.model_dump())
            yield f"{name}.model_dump_json()", obj.model_dump_json()
            yield f"{name}.user", repr(obj.user)


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every logger at DEBUG, captured."""
    caplog.set_level(logging.DEBUG)
    for name in ("emailmw", "imapclient", "imapclient.imaplib"):
        caplog.set_level(logging.DEBUG, logger=name)
    yield caplog


def full_round(ctx: Context, topic: str, service: str) -> None:
    """Publish, subscribe and a service request/response, through ``ctx``."""
    sub = Subscription(topic, context=ctx)
    server = ServiceServer(service, context=ctx)
    client = ServiceClient(service, context=ctx)
    Publisher(topic, context=ctx).publish("hello", additional_headers={"X-Trace": "t"})
    assert wait_for_message(sub, timeout=30.0) == "hello"
    seq = client.send_request("question")
    request = wait_for_request(server, timeout=30.0)
    server.send_response(request.id, "answer")
    assert wait_for_response(seq, client, timeout=30.0) == "answer"


# ----------------------------------------------------------------------------- intraprocess


def test_intraprocess_round_shows_no_secret(
    debug_logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    options = Options.from_dict(
        {
            "email": {
                "intraprocess": True,
                "signing-key": SIGNING_KEY,
                "user": {
                    "url-smtp": "smtp://127.0.0.1:1",
                    "url-imap": "imap://127.0.0.1:1",
                    "username": "alice@example.test",
                    "password": FAKE_PASSWORD,
                },
            }
        }
    )
    with Context(options) as ctx:
        full_round(ctx, "/secret/intra", "/secret/svc")
        texts = [*object_texts(options=options, context=ctx, sender=ctx._sender)]
    out, err = capfd.readouterr()
    texts += [*record_texts(debug_logs.records), ("stdout", out), ("stderr", err)]
    secrets = {"password": encodings(FAKE_PASSWORD), "signing key": encodings(SIGNING_KEY)}
    assert debug_logs.records, "nothing was logged: the scan would prove nothing"
    assert scan(texts, secrets) == []


def test_configuration_errors_show_no_secret(tmp_path: Path) -> None:
    """Errors about the file next to the secrets quote neither secret."""
    bad_files = [
        f"email:\n  intraprocess: true\n  signing-key: {SIGNING_KEY}\n  max-age: never\n",
        f"email:\n  intraprocess: true\n  signing-key: [{SIGNING_KEY}]\n",
        f"email:\n  intraprocess: true\n  signing-key: {{k: {SIGNING_KEY}}}\n",
        f"email:\n  intraprocess: true\n  signing-key: {SIGNING_KEY}\n  nonsense: 1\n",
        f"email:\n  intraprocess: true\n  signing-key: {SIGNING_KEY}\n  allowed-senders: 5\n",
        f'email:\n  intraprocess: true\n  signing-key: "{SIGNING_KEY}\n',
        f"email:\n  intraprocess: true\n  signing-key: {SIGNING_KEY}\n   bad: [\n",
    ]
    secrets = {"signing key": encodings(SIGNING_KEY)}
    leaks = []
    for index, text in enumerate(bad_files):
        path = tmp_path / f"bad{index}.yml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as info:
            Options.from_file(path)
        leaks += scan(exception_texts(info.value), secrets)
    assert leaks == []


def test_secrets_from_files_and_environment_show_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, debug_logs: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "signing.key"
    key_file.write_text(SIGNING_KEY + "\n", encoding="utf-8")
    monkeypatch.setenv(PASSWORD_ENV, FAKE_PASSWORD)
    options = Options(intraprocess=True, signing_key_file=key_file)
    with Context(options) as ctx:
        full_round(ctx, "/secret/file", "/secret/file-svc")
        texts = [*object_texts(options=options, context=ctx)]
    assert options.resolve_signing_key() == SIGNING_KEY.encode()
    monkeypatch.delenv(PASSWORD_ENV)
    monkeypatch.setenv(SIGNING_KEY_ENV, SIGNING_KEY)
    env_options = Options(intraprocess=True)
    with Context(env_options) as ctx:
        full_round(ctx, "/secret/env", "/secret/env-svc")
        texts += [*object_texts(env_options=env_options, context=ctx)]
    texts += [*record_texts(debug_logs.records)]
    secrets = {"password": encodings(FAKE_PASSWORD), "signing key": encodings(SIGNING_KEY)}
    assert scan(texts, secrets) == []


# ----------------------------------------------------------------------------- real servers


def _server_options(server: DevServer, folder: str, address: str, **email: Any) -> Options:
    config = server.config("alice", mailbox=folder, to=address, receive_mode="auto")
    config["email"].update({"from": address, **email})
    return Options.from_dict(config)


@pytest.mark.mailstack
@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_a_round_over_the_mail_servers_shows_no_secret(
    dev_server: DevServer,
    debug_logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    tls: str,
) -> None:
    acct = dev_server.account("alice")
    folder, address = dev_server.new_mailbox("alice")
    config = dev_server.config("alice", mailbox=folder, to=address, tls=tls)
    config["email"].update({"from": address, "signing-key": SIGNING_KEY})
    options = Options.from_dict(config)
    texts: list[tuple[str, str]] = []
    with Context(options) as ctx:
        full_round(ctx, f"/secret/{folder}", f"/secret-svc/{folder}")
        # a forged email too, so that the drop path logs
        forged = EmailData(
            content=EmailContent(f"/secret/{folder}", "forged"),
            headers=EmailHeaders({"Source-Timestamp": "1", "Publisher-GID": "1"}),
            message_id=new_message_id("evil.test"),
            from_="mallory@evil.test",
            recipients=EmailRecipients(to=[address]),
        )
        sign_email(forged, b"another key")
        dev_server.append("alice", encode_email(forged), folder)
        sub = Subscription(f"/secret/{folder}/after", context=ctx)
        Publisher(f"/secret/{folder}/after", context=ctx).publish("after")
        assert wait_for_message(sub, timeout=30.0) == "after"
        assert ctx.stats().dropped["bad_signature"] == 1
        texts += object_texts(
            options=options,
            user=options.user,
            context=ctx,
            sender=ctx._sender,
            receiver=ctx._receiver,
            polling_manager=ctx._polling_manager,
        )
    # and the failures: a wrong password, for each server
    wrong = dev_server.config("alice", mailbox=folder, tls=tls)
    wrong["email"]["user"]["password"] = FAKE_PASSWORD
    with pytest.raises(AuthenticationError) as info:
        Context(Options.from_dict(wrong)).init()
    texts += exception_texts(info.value)
    from emailmw.transport.imap import ImapEmailReceiver

    receiver = ImapEmailReceiver(Options.from_dict(wrong))
    try:
        with pytest.raises(AuthenticationError) as imap_info:
            receiver.connect()
    finally:
        receiver.close()
    texts += exception_texts(imap_info.value)
    out, err = capfd.readouterr()
    texts += [*record_texts(debug_logs.records), ("stdout", out), ("stderr", err)]
    assert any(r.name.startswith("imapclient") for r in debug_logs.records), (
        "IMAPClient's protocol log was not captured: the scan would miss it"
    )
    secrets = {
        "password": encodings(acct.password, acct.address),
        "wrong password": encodings(FAKE_PASSWORD, acct.address),
        "signing key": encodings(SIGNING_KEY),
    }
    assert scan(texts, secrets) == []


@pytest.mark.mailstack
def test_non_ascii_password_failure_shows_no_secret(
    dev_server: DevServer, debug_logs: pytest.LogCaptureFixture
) -> None:
    """A non-ASCII password goes through AUTHENTICATE PLAIN (IMAP) and AUTH PLAIN
    (SMTP): a rejected one is not echoed anywhere either."""
    password = "pässwörd-Ünïcode-секрет"
    config = dev_server.config("alice")
    config["email"]["user"]["password"] = password
    with pytest.raises(Exception) as info:  # which one: checked below
        Context(Options.from_dict(config)).init()
    texts = [*exception_texts(info.value), *record_texts(debug_logs.records)]
    secrets = {"password": encodings(password, dev_server.account("alice").address)}
    assert scan(texts, secrets) == []
    assert isinstance(info.value, EmailmwError), repr(type(info.value))
