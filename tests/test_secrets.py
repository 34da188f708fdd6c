"""Secrets (the password, the signing key and OAuth2 access tokens) never show: not in
logs at any level,
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
import os
import sys
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


def encodings(secret: str | bytes, username: str | None = None) -> dict[str, str]:
    """``secret`` as it may be written: itself, hex, base64 at each of the three byte
    alignments (the stable middle part), its escaped ``repr``, and the exact AUTH
    PLAIN strings. A ``bytes`` secret also as Latin-1 text and as the text
    ``os.environ`` would give (undecodable bytes as lone surrogates)."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    text = secret if isinstance(secret, str) else raw.decode("latin-1")
    found = {"plain": text, "hex": raw.hex(), "repr(bytes)": repr(raw)[2:-1]}
    if isinstance(secret, str):
        found["repr"] = repr(secret)[1:-1]
    else:
        found["repr(surrogateescape)"] = repr(raw.decode("utf-8", "surrogateescape"))[1:-1]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw).decode("ascii")
        start = 4 if shift else 0  # the first quantum mixes in the padding bytes
        found[f"base64+{shift}"] = encoded[start : len(encoded) - 4]
    if username is not None and isinstance(secret, str):
        for plain in (f"\0{username}\0{secret}", f"{username}\0{username}\0{secret}"):
            found[f"AUTH PLAIN {plain[:1]!r}"] = base64.b64encode(plain.encode()).decode()
    assert all(len(value) >= 8 for value in found.values())
    return found


def binary_secret(core: str) -> bytes:
    """A secret that is not UTF-8, around an ASCII ``core`` that the scans also look
    for alone (a leak that decodes with replacement characters still shows it)."""
    return b"\xff\xfe\x00" + core.encode("ascii") + b"\x80\x81\xc3\n"


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


def exception_texts(exc: BaseException, *, frames: bool = False) -> Iterator[tuple[str, str]]:
    """``str``, ``repr``, ``args`` and the formatted traceback of ``exc`` and of every
    exception chained to it, through ``__cause__`` and ``__context__`` alike (a
    suppressed context is not printed, but it is still there for any error
    reporter). With ``frames``, also the variables of every frame of emailmw's in
    their tracebacks (error reporters capture those too)."""
    yield "traceback", "".join(traceback.format_exception(exc))
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        name = type(current).__name__
        yield f"str({name})", str(current)
        yield f"repr({name})", repr(current)
        yield f"{name}.args", repr(current.args)
        yield f"{name}.__dict__", repr(vars(current))
        yield f"traceback({name})", "".join(traceback.format_exception(current))
        if frames:
            tb = current.__traceback__
            while tb is not None:
                frame = tb.tb_frame
                if "/emailmw/" in frame.f_code.co_filename.replace("\\", "/"):
                    for var, value in frame.f_locals.items():
                        yield f"{frame.f_code.co_name}:{var} of {name}", repr(value)
                tb = tb.tb_next
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]


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

    receiver = ImapEmailReceiver(Options.from_dict(wrong).imap_settings())
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


# ----------------------------------------------------------------------------- secret files

BINARY_KEY = binary_secret("Kx-Binary-Key-Core-7Qm")
BINARY_PASSWORD = binary_secret("pw-Binary-Core-Zq9Lk")


def _binary_forms() -> dict[str, dict[str, str]]:
    return {
        "binary key": encodings(BINARY_KEY),
        "binary key core": {"plain": "Kx-Binary-Key-Core-7Qm"},
        "binary password": encodings(BINARY_PASSWORD),
        "binary password core": {"plain": "pw-Binary-Core-Zq9Lk"},
    }


def test_a_binary_signing_key_file_is_a_key_and_never_shows(
    tmp_path: Path, debug_logs: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """``head -c 32 /dev/urandom > key`` makes a valid key: the file's exact bytes
    (a trailing newline byte included: the file is not text)."""
    key_file = tmp_path / "signing.key"
    key_file.write_bytes(BINARY_KEY)
    options = Options(intraprocess=True, signing_key_file=key_file)
    assert options.resolve_signing_key() == BINARY_KEY
    with Context(options) as ctx:
        full_round(ctx, "/secret/binary", "/secret/binary-svc")
        texts = [*object_texts(options=options, context=ctx, sender=ctx._sender)]
    random_key = tmp_path / "urandom.key"
    random_key.write_bytes(b"\xff" + os.urandom(31))  # \xff: never valid UTF-8
    assert Options(intraprocess=True, signing_key_file=random_key).resolve_signing_key() == (
        random_key.read_bytes()
    )
    out, err = capfd.readouterr()
    texts += [*record_texts(debug_logs.records), ("stdout", out), ("stderr", err)]
    assert debug_logs.records
    assert scan(texts, _binary_forms()) == []


@pytest.mark.parametrize(
    "content", ["text-key-0123456789\n", "text-key-0123456789\r\n", "  text-key-0123456789  \n"]
)
def test_a_text_key_file_is_stripped_as_before(tmp_path: Path, content: str) -> None:
    """``echo key > file`` keeps working: a UTF-8 text file loses the white space
    around it, and gives the same key as ``signing-key: key``."""
    key_file = tmp_path / "signing.key"
    key_file.write_bytes(content.encode())
    from_file = Options(intraprocess=True, signing_key_file=key_file).resolve_signing_key()
    inline = Options(intraprocess=True, signing_key="text-key-0123456789").resolve_signing_key()
    assert from_file == inline == b"text-key-0123456789"
    key_file.write_text("schlüssel-ünïcode-ключ\n", encoding="utf-8")
    assert Options(intraprocess=True, signing_key_file=key_file).resolve_signing_key() == (
        "schlüssel-ünïcode-ключ".encode()
    )


SHORT_KEY = "Sh0rt-Key-15byt"  # 15 bytes


@pytest.mark.parametrize(
    ("source", "value"),
    [
        ("email.signing-key", SHORT_KEY),
        ("email.signing-key", ""),
        ("email.signing-key-file", SHORT_KEY + "\n"),
        ("email.signing-key-file", ""),
        ("email.signing-key-file", "   \n"),
        ("email.signing-key-file", b"\xff" * 15),
        ("$EMAILMW_SIGNING_KEY", SHORT_KEY),
        ("$EMAILMW_SIGNING_KEY", ""),
    ],
)
def test_an_empty_or_short_signing_key_is_a_config_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    debug_logs: pytest.LogCaptureFixture,
    source: str,
    value: str | bytes,
) -> None:
    """An empty HMAC key lets anyone sign: under 16 bytes is refused, from any source,
    at init() before anything connects, without quoting the key."""
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    kwargs: dict[str, Any] = {"intraprocess": True}
    if source == "email.signing-key":
        kwargs["signing_key"] = value
    elif source == "email.signing-key-file":
        key_file = tmp_path / "short.key"
        key_file.write_bytes(value if isinstance(value, bytes) else value.encode())
        kwargs["signing_key_file"] = key_file
    else:
        assert isinstance(value, str)
        monkeypatch.setenv(SIGNING_KEY_ENV, value)
    options = Options(**kwargs)
    with pytest.raises(ConfigError) as info:
        Context(options).init()
    assert info.value.key == source
    assert source in str(info.value)
    texts = [*exception_texts(info.value, frames=True), *record_texts(debug_logs.records)]
    assert scan(texts, {"short key": encodings(SHORT_KEY)}) == []


def test_sixteen_bytes_is_long_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIGNING_KEY_ENV, "k" * 16)
    assert Options(intraprocess=True).resolve_signing_key() == b"k" * 16


def test_a_binary_signing_key_in_the_environment_is_a_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # os.environ carries undecodable bytes as lone surrogates; the key is the bytes
    monkeypatch.setenv(SIGNING_KEY_ENV, os.fsdecode(BINARY_KEY.rstrip(b"\n").replace(b"\0", b"")))
    expected = BINARY_KEY.rstrip(b"\n").replace(b"\0", b"")
    assert Options(intraprocess=True).resolve_signing_key() == expected


def _user_options(**email: Any) -> Options:
    return Options(
        user={"url-smtp": "smtp://127.0.0.1:1", "url-imap": "imap://127.0.0.1:1", "username": "u"},
        **email,
    )


def test_a_password_file_that_is_not_utf8_is_a_config_error_naming_the_file(
    tmp_path: Path, debug_logs: pytest.LogCaptureFixture
) -> None:
    password_file = tmp_path / "password.bin"
    password_file.write_bytes(BINARY_PASSWORD)
    options = _user_options(password_file=password_file)
    with pytest.raises(ConfigError) as info:
        options.resolve_password()
    assert info.value.key == "email.password-file"
    assert str(password_file) in str(info.value)
    assert "not UTF-8" in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None
    texts = [*exception_texts(info.value, frames=True), *record_texts(debug_logs.records)]
    texts += object_texts(options=options)
    assert scan(texts, _binary_forms()) == []


def test_a_password_in_the_environment_that_is_not_utf8_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, os.fsdecode(BINARY_PASSWORD.replace(b"\0", b"")))
    with pytest.raises(ConfigError) as info:
        _user_options().resolve_password()
    assert info.value.key == "$EMAILMW_PASSWORD"
    assert info.value.__cause__ is None and info.value.__context__ is None
    forms = {
        "password": encodings(BINARY_PASSWORD.replace(b"\0", b"")),
        "core": {"plain": "pw-Binary-Core-Zq9Lk"},
    }
    assert scan(exception_texts(info.value, frames=True), forms) == []


def test_an_oversized_secret_file_is_refused(tmp_path: Path) -> None:
    """A secret is a few bytes: a 1 MiB file (or /dev/zero) is a mistake, not read whole."""
    big = tmp_path / "big"
    big.write_bytes(b"k" * (1 << 20))
    with pytest.raises(ConfigError, match="signing-key-file"):
        Options(intraprocess=True, signing_key_file=big).resolve_signing_key()
    with pytest.raises(ConfigError, match="password-file"):
        _user_options(password_file=Path("/dev/zero")).resolve_password()


@pytest.mark.mailstack
def test_a_non_utf8_password_file_fails_init_cleanly_against_the_servers(
    dev_server: DevServer, tmp_path: Path, debug_logs: pytest.LogCaptureFixture
) -> None:
    """Through the real SMTP login and IMAP login: a ConfigError naming the file,
    which carries nothing of the file, and no log line that does."""
    password_file = tmp_path / "password.bin"
    password_file.write_bytes(BINARY_PASSWORD)
    config = dev_server.config("alice")
    del config["email"]["user"]["password"]
    config["email"]["password-file"] = str(password_file)
    options = Options.from_dict(config)
    with pytest.raises(ConfigError) as info:
        Context(options).init()
    texts = [*exception_texts(info.value, frames=True)]
    from emailmw.transport.imap import ImapEmailReceiver

    receiver = ImapEmailReceiver(options.imap_settings())
    try:
        with pytest.raises(ConfigError) as imap_info:
            receiver.connect()
    finally:
        receiver.close()
    for error in (info.value, imap_info.value):
        assert error.key == "email.password-file"
        assert str(password_file) in str(error)
    texts += [*exception_texts(imap_info.value, frames=True), *record_texts(debug_logs.records)]
    assert scan(texts, _binary_forms()) == []


# ----------------------------------------------------------------------------- OAuth2 tokens


@pytest.fixture(scope="module")
def oauth_server() -> Iterator[DevServer]:
    """A dev server that takes OAuth2 tokens (XOAUTH2, OAUTHBEARER)."""
    from mailstack import require_mailstack

    require_mailstack()
    with DevServer(accounts=("alice",), auth="oauth2") as server:
        yield server


def token_forms(token: str) -> dict[str, str]:
    """A token's encodings, and its signature alone (the rest of a JWT is no secret)."""
    return {**encodings(token), "signature": token.rsplit(".", 1)[-1]}


@pytest.mark.mailstack
@pytest.mark.parametrize("auth", ["xoauth2", "oauthbearer"])
def test_oauth_rounds_and_failures_show_no_token(
    oauth_server: DevServer,
    debug_logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
    auth: str,
) -> None:
    """A round with tokens from a provider (the first one stale: rejected, logged,
    replaced), then a revoked token, a forged one, and a token command that prints
    a token and fails: no token shows in logs, reprs, errors or their frames."""
    stale = oauth_server.mint_token("alice", -60)
    good = [oauth_server.mint_token("alice", 600) for _ in range(3)]
    revoked = oauth_server.mint_token("alice", 600)
    forged = oauth_server.mint_token("alice", 600, valid=False)
    printed = oauth_server.mint_token("alice", 600)
    handed_out = [stale, *good]

    def provider() -> str:
        return handed_out.pop(0) if len(handed_out) > 1 else handed_out[0]

    folder, address = oauth_server.new_mailbox("alice")
    config = oauth_server.config("alice", mailbox=folder, to=address, auth=auth)
    section = config["email"]
    del section["user"]["token-command"]
    options = Options(**section, token_provider=provider)
    texts: list[tuple[str, str]] = []
    with Context(options) as ctx:
        full_round(ctx, f"/secret/{folder}", f"/secret-svc/{folder}")
        texts += object_texts(
            options=options,
            user=options.user,
            smtp_settings=options.smtp_settings(),
            imap_settings=options.imap_settings(),
            token_source=options.token_source(),
            context=ctx,
            sender=ctx._sender,
            receiver=ctx._receiver,
        )
    assert any("getting a new one" in r.getMessage() for r in debug_logs.records)
    oauth_server.revoke_token(revoked)
    from emailmw.transport.imap import ImapEmailReceiver

    for bad in (revoked, forged):
        bad_options = Options(**section, token_provider=lambda bad=bad: bad)
        with pytest.raises(AuthenticationError) as info:
            Context(bad_options).init()
        texts += exception_texts(info.value, frames=True)
        receiver = ImapEmailReceiver(bad_options.imap_settings())
        try:
            with pytest.raises(AuthenticationError) as imap_info:
                receiver.connect()
        finally:
            receiver.close()
        texts += exception_texts(imap_info.value, frames=True)
    script = tmp_path / "prints_then_fails.py"
    script.write_text(f"import sys\nprint({printed!r})\nsys.exit(4)\n")
    failing = dict(
        section, user={**section["user"], "token-command": [sys.executable, str(script)]}
    )
    with pytest.raises(AuthenticationError, match="exit status 4") as info:
        Context(Options(**failing)).init()
    texts += exception_texts(info.value, frames=True)
    out, err = capfd.readouterr()
    texts += [*record_texts(debug_logs.records), ("stdout", out), ("stderr", err)]
    assert any(r.name.startswith("imapclient") for r in debug_logs.records)
    secrets = {
        f"token {i}": token_forms(token)
        for i, token in enumerate([stale, *good, revoked, forged, printed])
    }
    assert scan(texts, secrets) == []
