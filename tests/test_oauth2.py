"""OAuth2 logins (SASL XOAUTH2 and OAUTHBEARER) against the real mail stack.

The dev server runs with ``auth="oauth2"``: Dovecot's ``oauth2`` passdb checks
JWTs locally with keys the server minted, for IMAP and (through Postfix's
Dovecot SASL) for SMTP. The tests log in with valid tokens, let a token expire
mid-run, present a stale one, a revoked one and a forged one, and make the
token command fail.

Also, without a server: the config keys and the token source's checks.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from emailmw import (
    AuthenticationError,
    ConfigError,
    Context,
    Options,
    Publisher,
    Subscription,
    wait_for_message,
)
from emailmw.devserver import DevServer
from emailmw.transport.imap import ImapEmailReceiver
from emailmw.transport.oauth import SaslExchange, TokenSource, command_provider, expiry_hint
from emailmw.transport.smtp import SmtpEmailSender

pytestmark = [pytest.mark.timeout(120)]

WAIT = 20.0
MECHANISMS = ("xoauth2", "oauthbearer")


@pytest.fixture(scope="module")
def oauth_server() -> Iterator[DevServer]:
    """A dev server whose Dovecot validates OAuth2 tokens (JWTs) locally."""
    from mailstack import require_mailstack

    require_mailstack()
    with DevServer(accounts=("alice", "bob"), auth="oauth2") as server:
        yield server


def oauth_options(
    server: DevServer,
    auth: str,
    *,
    provider: Callable[[], str] | None = None,
    command: list[str] | None = None,
    folder: tuple[str, str] | None = None,
    receive_mode: str = "auto",
) -> Options:
    """Options for alice on ``server`` with ``user.auth: auth``: tokens from
    ``provider``, else from ``command``, else from the server's own token command.
    Reads and sends to a fresh folder (or ``folder``)."""
    name, address = folder or server.new_mailbox("alice")
    config = server.config("alice", mailbox=name, to=address, auth=auth, receive_mode=receive_mode)
    section = config["email"]
    if provider is not None:
        del section["user"]["token-command"]
        return Options(**section, token_provider=provider)
    if command is not None:
        section["user"]["token-command"] = command
    return Options.from_dict(config)


def round_trip(ctx: Context, texts: list[str], topic: str = "/oauth") -> list[str]:
    """Publish ``texts`` and return what a subscription of the same context got."""
    sub = Subscription(topic, context=ctx)
    pub = Publisher(topic, context=ctx)
    for text in texts:
        pub.publish(text)
    return [wait_for_message(sub, timeout=WAIT) for _ in texts]


class CountingProvider:
    """A token provider handing out the given tokens in turn (the last one again
    when they run out), counting its calls."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return self.tokens.pop(0) if len(self.tokens) > 1 else self.tokens[0]


def counting_command(server: DevServer, tmp_path: Path, lifetime: float) -> tuple[list[str], Path]:
    """The server's token command (tokens of ``lifetime`` s) behind a wrapper that
    appends a line to a file at every run: ``(argv, that file)``."""
    runs = tmp_path / "runs"
    runs.touch()
    wrapper = tmp_path / "token_command.py"
    wrapper.write_text(
        "import subprocess, sys\n"
        f"with open({str(runs)!r}, 'a') as fh:\n"
        "    fh.write('run\\n')\n"
        f"sys.exit(subprocess.call({server.token_command('alice', lifetime)!r}))\n"
    )
    return [sys.executable, str(wrapper)], runs


def run_count(runs: Path) -> int:
    return len(runs.read_text().splitlines())


# ----------------------------------------------------------------------------- valid tokens


@pytest.mark.parametrize("auth", MECHANISMS)
def test_login_with_a_valid_token_over_imap_and_smtp(oauth_server: DevServer, auth: str) -> None:
    provider = CountingProvider(oauth_server.mint_token("alice", 600))
    options = oauth_options(oauth_server, auth, provider=provider)
    assert options.user is not None and options.user.password is None
    with Context(options) as ctx:
        assert round_trip(ctx, ["one", "two"]) == ["one", "two"]
        assert ctx._sender is not None
        assert ctx._sender.probe()["authenticated"] is True  # type: ignore[attr-defined]
    assert provider.calls == 2  # one login each: SMTP and IMAP
    mechanism = auth.upper()
    log = oauth_server.log_tail(200)
    assert f"user=<alice@example.test>, method={mechanism}" in log  # Dovecot's IMAP login
    assert f"sasl_method={mechanism}, sasl_username=alice@example.test" in log  # Postfix


@pytest.mark.parametrize("auth", MECHANISMS)
def test_login_with_the_token_command(oauth_server: DevServer, auth: str) -> None:
    """The dev server's own config: no password, a command that prints a token."""
    options = oauth_options(oauth_server, auth)
    assert options.user is not None and options.user.token_command
    with Context(options) as ctx:
        assert round_trip(ctx, ["via the command"]) == ["via the command"]


def test_a_password_only_server_does_not_offer_the_mechanism(
    dev_server: DevServer, dev_mailbox: tuple[str, str]
) -> None:
    config = dev_server.config("alice", mailbox=dev_mailbox[0])
    user = config["email"]["user"]
    del user["password"]
    options = Options(
        **{**config["email"], "user": {**user, "auth": "xoauth2"}}, token_provider=str
    )
    with pytest.raises(AuthenticationError, match="does not offer AUTH XOAUTH2"):
        SmtpEmailSender(options.smtp_settings()).connect()
    receiver = ImapEmailReceiver(options.imap_settings())
    try:
        with pytest.raises(AuthenticationError, match="does not offer AUTHENTICATE XOAUTH2"):
            receiver.connect()
    finally:
        receiver.close()


# ----------------------------------------------------------------------------- expiry


@pytest.mark.timeout(90)
def test_a_token_that_expires_mid_run_is_replaced_and_nothing_is_lost(
    oauth_server: DevServer, tmp_path: Path
) -> None:
    lifetime = 3.0
    command, runs = counting_command(oauth_server, tmp_path, lifetime)
    options = oauth_options(oauth_server, "xoauth2", command=command, receive_mode="idle")
    with Context(options) as ctx:
        sub = Subscription("/expiry", context=ctx)
        pub = Publisher("/expiry", context=ctx)
        started = time.time()
        first = [f"before {i}" for i in range(5)]
        for text in first:
            pub.publish(text)
        got = [wait_for_message(sub, timeout=WAIT) for _ in first]
        assert run_count(runs) == 2  # SMTP and IMAP logged in once each
        # Let both tokens expire (Dovecot compares whole seconds), then drop both
        # connections: each reconnect must log in with a new token.
        time.sleep(max(0.0, started + lifetime + 1.5 - time.time()))
        oauth_server.kick("alice")
        oauth_server.restart_postfix()
        second = [f"after {i}" for i in range(5)]
        for text in second:
            pub.publish(text)
        got += [wait_for_message(sub, timeout=WAIT) for _ in second]
        assert got == first + second
        stats = ctx.stats()
    assert run_count(runs) >= 4  # a new token for the SMTP and for the IMAP reconnect
    assert stats.reconnects >= 2


def test_a_stale_token_is_replaced_when_the_server_rejects_it(
    oauth_server: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider that first hands out an expired token (a stale cache) is asked
    again when the server rejects it: the login goes through with the new one."""
    caplog.set_level(logging.INFO, logger="emailmw")
    stale = oauth_server.mint_token("alice", -30)
    provider = CountingProvider(
        stale, oauth_server.mint_token("alice", 600), oauth_server.mint_token("alice", 600)
    )
    options = oauth_options(oauth_server, "oauthbearer", provider=provider)
    with Context(options) as ctx:
        assert round_trip(ctx, ["fresh"]) == ["fresh"]
    assert provider.calls == 3  # stale + new one for SMTP, one for IMAP
    rejected = [r.getMessage() for r in caplog.records if "getting a new one" in r.getMessage()]
    assert len(rejected) == 1
    assert "it expired" in rejected[0] and "invalid_token" in rejected[0]


def test_the_receiver_asks_for_a_new_token_after_a_rejection(oauth_server: DevServer) -> None:
    stale = oauth_server.mint_token("alice", -30)
    provider = CountingProvider(stale, oauth_server.mint_token("alice", 600))
    options = oauth_options(oauth_server, "xoauth2", provider=provider)
    receiver = ImapEmailReceiver(options.imap_settings())
    try:
        receiver.connect()
        assert receiver.probe()["mode"] != "closed"
    finally:
        receiver.close()
    assert provider.calls == 2


# ----------------------------------------------------------------------------- refused


@pytest.mark.parametrize("auth", MECHANISMS)
def test_a_revoked_token_gives_an_authentication_error_that_says_so(
    oauth_server: DevServer, auth: str
) -> None:
    token = oauth_server.mint_token("alice", 600)
    provider = CountingProvider(token)
    options = oauth_options(oauth_server, auth, provider=provider)
    with Context(options) as ctx:  # accepted before the revocation
        assert round_trip(ctx, ["still good"]) == ["still good"]
    oauth_server.revoke_token(token)
    with pytest.raises(AuthenticationError, match="revoked") as smtp_error:
        Context(options).init()
    receiver = ImapEmailReceiver(options.imap_settings())
    try:
        with pytest.raises(AuthenticationError, match="revoked") as imap_error:
            receiver.connect()
    finally:
        receiver.close()
    for error in (smtp_error.value, imap_error.value):
        assert "a new one from token_provider too" in str(error)
        assert token not in str(error)
    assert f"AUTH {auth.upper()}" in str(smtp_error.value)
    assert f"AUTHENTICATE {auth.upper()}" in str(imap_error.value)


def test_a_forged_token_is_refused(oauth_server: DevServer) -> None:
    forged = oauth_server.mint_token("alice", 600, valid=False)
    options = oauth_options(oauth_server, "xoauth2", provider=lambda: forged)
    with pytest.raises(AuthenticationError, match="revoked, expired or invalid") as error:
        Context(options).init()
    assert '"status":"401"' in str(error.value)  # the server's XOAUTH2 error challenge


def test_a_token_for_another_account_is_refused(oauth_server: DevServer) -> None:
    bobs = oauth_server.mint_token("bob", 600)
    options = oauth_options(oauth_server, "oauthbearer", provider=lambda: bobs)
    with pytest.raises(AuthenticationError, match="not for this account"):
        Context(options).init()


# ----------------------------------------------------------------------------- the command


def test_a_failing_token_command_gives_a_clear_error(oauth_server: DevServer) -> None:
    command = [
        sys.executable,
        "-c",
        "import sys; print('tok-PRINTED-BEFORE-FAILING'); "
        "sys.stderr.write('no refresh token: sign in first\\n'); sys.exit(3)",
    ]
    options = oauth_options(oauth_server, "xoauth2", command=command)
    with pytest.raises(AuthenticationError) as error:
        Context(options).init()
    message = str(error.value)
    assert "user.token-command" in message and "failed (exit status 3)" in message
    assert "no refresh token: sign in first" in message
    assert "tok-PRINTED-BEFORE-FAILING" not in message
    assert error.value.__cause__ is None and error.value.__context__ is None


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["/nonexistent/emailmw-token"], "no such program: /nonexistent/emailmw-token"),
        ([sys.executable, "-c", "pass"], "gave no usable token: the output is empty"),
        ([sys.executable, "-c", "print('two words')"], "it holds white space"),
        ([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"], "killed by signal 9"),
        ([sys.executable, "-c", "import sys; sys.exit(2)"], "printed nothing on standard error"),
    ],
)
def test_token_command_problems_are_named(command: list[str], expected: str) -> None:
    source = TokenSource(command_provider(command), "user.token-command")
    with pytest.raises(AuthenticationError, match=expected):
        source.token()


def test_a_slow_token_command_is_stopped() -> None:
    provider = command_provider([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    with pytest.raises(AuthenticationError, match=r"no token within 0\.5 s"):
        TokenSource(provider, "user.token-command").token()


def test_token_command_as_a_string_is_split_without_a_shell(tmp_path: Path) -> None:
    script = tmp_path / "my token.py"
    script.write_text("import sys; print('tok-' + sys.argv[1])\n")
    command = f"{sys.executable} '{script}' '$HOME;x'"  # a shell would expand and split
    assert TokenSource(command_provider(command), "t").token() == "tok-$HOME;x"


def test_a_provider_that_raises_is_reported_by_type() -> None:
    def provider() -> str:
        raise RuntimeError("secret-in-message")

    with pytest.raises(AuthenticationError, match="token_provider failed: RuntimeError") as error:
        TokenSource(provider, "token_provider").token()
    assert "secret-in-message" not in str(error.value)


def test_a_provider_that_returns_no_string() -> None:
    with pytest.raises(AuthenticationError, match="returned a int, not a token"):
        TokenSource(lambda: 42, "token_provider").token()  # type: ignore[arg-type,return-value]


# ----------------------------------------------------------------------------- SASL messages


def test_sasl_exchange_messages() -> None:
    xoauth2 = SaslExchange("XOAUTH2", "a@b.example", "tok")
    assert xoauth2() == "user=a@b.example\x01auth=Bearer tok\x01\x01"
    assert xoauth2(b'{"status":"401"}') == ""  # the client's answer to the error challenge
    assert xoauth2.describe() == '; the server said {"status":"401"}'
    bearer = SaslExchange("OAUTHBEARER", "a,=b@c.example", "tok")
    assert bearer(b"") == "n,a=a=2C=3Db@c.example,\x01auth=Bearer tok\x01\x01"
    assert bearer(b'{"status":"invalid_token"}') == "\x01"
    assert "tok" not in repr(bearer) and repr(TokenSource(str, "x")) == "<TokenSource from x>"


def test_expiry_hint_reads_the_exp_claim_only_of_a_jwt(oauth_server: DevServer) -> None:
    assert "it expired" in expiry_hint(oauth_server.mint_token("alice", -100))
    assert expiry_hint(oauth_server.mint_token("alice", 100)) == ""
    assert expiry_hint("opaque-token") == expiry_hint("a.b.c") == ""


# ----------------------------------------------------------------------------- config

_USER = {"url-smtp": "smtp://127.0.0.1:1", "url-imap": "imap://127.0.0.1:1", "username": "a@b.c"}


@pytest.mark.parametrize(
    ("user", "extra", "key", "text"),
    [
        ({"auth": "xoauth2"}, {}, "email.user.auth", "needs user.token-command"),
        ({"auth": "saml"}, {}, "email.user.auth", "'password', 'xoauth2' or 'oauthbearer'"),
        ({"token-command": "get-token"}, {}, "email.user.token-command", "only used with"),
        ({}, {"token_provider": str}, "email.token_provider", "only used with"),
        ({"auth": "xoauth2", "token-command": "a 'b"}, {}, "email.user.token-command", "quot"),
        ({"auth": "xoauth2", "token-command": []}, {}, "email.user.token-command", "empty"),
        (
            {"auth": "xoauth2", "token-command": "t"},
            {"token_provider": str},
            "email.user.token-command",
            "not both",
        ),
        (
            {"auth": "oauthbearer", "token-command": "t", "password": "pw"},
            {},
            "email.user.password",
            "not used with user.auth: oauthbearer",
        ),
        ({"auth": "xoauth2"}, {"token_provider": "not callable"}, "email.token_provider", "call"),
    ],
)
def test_bad_oauth_configuration(
    user: dict[str, Any], extra: dict[str, Any], key: str, text: str
) -> None:
    with pytest.raises(ConfigError) as error:
        Options(user={**_USER, **user}, **extra)
    assert error.value.key == key
    assert text in str(error.value)


def test_oauth_configuration_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "email.yml"
    path.write_text(
        "email:\n  user:\n    url-smtp: smtps://smtp.example.com\n"
        "    url-imap: imaps://imap.example.com\n    username: me@example.com\n"
        "    auth: oauthbearer\n    token-command: [get-token, --account, me@example.com]\n"
    )
    options = Options.from_file(path)
    assert options.user is not None and options.user.auth == "oauthbearer"
    assert options.imap_settings().auth == options.smtp_settings().auth == "oauthbearer"
    source = options.smtp_settings().token
    assert source is not None and source.origin == "user.token-command"
    assert "token" not in options.model_dump()  # a provider is not configuration data
    assert Options(user=_USER).smtp_settings().token is None  # auth: password
