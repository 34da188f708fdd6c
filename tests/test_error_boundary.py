"""The error boundary: no exception other than an :class:`EmailmwError` ever leaves
``publish()``, ``send_request()``, ``send_response()`` or ``init()``, whatever
configuration loads and whatever arguments of the right type they are given.

The one documented exception is :class:`TypeError` for an argument of the wrong
type (a request id that is not a ``ServiceRequestId``, options that are neither
``Options`` nor a path; a payload that is not of the declared type raises
:class:`~emailmw.MessageTypeError`, both an ``EmailmwError`` and a
``TypeError``): a programming error, raised before anything is sent. It is checked to be exactly
that, and only where it is expected.

Each test drives the four calls with hostile-but-loadable configurations (bounds
at their extremes, tiny timeouts, servers that speak another protocol or no TLS,
unknown recipients and mailboxes, non-ASCII and binary secrets) and hostile
arguments (empty, NUL, CR/LF, dot lines, non-ASCII, encoded-word look-alikes,
larger than ``max-message-size``, bad additional headers, unknown request ids),
on the intraprocess transport and against the real Dovecot + Postfix.

Payloads holding a lone surrogate (``"a\\ud800b"``) are left out: they cannot be
encoded, and how they are refused on both transports is its own piece of work.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import emailmw
from emailmw import (
    Context,
    EmailmwError,
    Options,
    Publisher,
    ServiceClient,
    ServiceServer,
    WaitTimeoutError,
    wait_for_request,
)
from emailmw.devserver import DevServer
from emailmw.info import Gid, ServiceRequestId

pytestmark = [pytest.mark.timeout(300)]

MAX_SIZE = 60_000  # max-message-size of most configurations below

PAYLOADS = [
    "",
    "x",
    "\0",
    "\0" * 100,
    "\r\n.\r\n",
    ".\r\n.\n.",
    "From the start\nFrom here",
    "\r" * 5000,
    "é" * 1000,
    "🦄 " * 200,
    "\x1b[31mred\x1b[0m\x07",
    "\u2028\u2029\ufeff\u200b",
    "=?utf-8?b?SGk=?= =?x?q?y?=",
    "x" * (MAX_SIZE + 1),  # over max-message-size once encoded
    "é" * (MAX_SIZE // 2),  # over it only once encoded
]

HEADERS: list[Any] = [
    {"X-Trace": "t"},
    {"X-Empty": ""},
    {"X-Unicode": "ünï 🦄"},
    {"X-Word": "=?utf-8?b?AA==?="},
    {"X-Long": "x" * 7999},
    {"X-Too-Long": "x" * 9000},
    {"X-Bad Name": "v"},
    {"X-A": "v\r\nBcc: mallory@evil.test"},
    {"X-A": "v\0"},
    {"From": "mallory@evil.test"},
    {"Source-Timestamp": "1"},
    {"X-A": "1", "x-a": "2"},
    {"": "v"},
    {"x" * 1000: "v"},
    {5: "v"},
    {"X-A": 5},
    "not a mapping",
    [("X-A", "v")],
]

WRONG_TYPES: list[Any] = [5, b"bytes", None, ["x"], 1.5]

BOGUS_IDS = [
    ServiceRequestId(2**63 - 1, Gid(2**32 - 1)),
    ServiceRequestId(-(2**63), Gid(0)),
    ServiceRequestId(0, Gid(1)),
]
WRONG_IDS: list[Any] = [None, 5, "id", (1, 2), ["x"]]


class Boundary:
    """Runs calls and records every exception that crosses the boundary wrongly."""

    def __init__(self) -> None:
        self.leaks: list[str] = []
        self.raised: Counter[str] = Counter()
        self.calls = 0

    def call(self, what: str, fn: Callable[[], object], *, wrong_type: bool = False) -> Any:
        """``fn()``'s result, or None if it raised (recorded)."""
        self.calls += 1
        try:
            return fn()
        except EmailmwError as exc:
            # A payload of the wrong type is a MessageTypeError: an EmailmwError
            # that is also a TypeError.
            if wrong_type and not isinstance(exc, TypeError):
                self.leaks.append(f"{what}: {type(exc).__name__} instead of TypeError")
            self.raised["TypeError" if wrong_type else type(exc).__name__] += 1
        except TypeError as exc:
            if not wrong_type:
                self.leaks.append(f"{what}: TypeError: {str(exc)[:200]}")
            self.raised["TypeError"] += 1
        except Exception as exc:
            self.leaks.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")
        else:
            if wrong_type:
                self.leaks.append(f"{what}: accepted an argument of the wrong type")
        return None


def short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def exercise(ctx: Context, boundary: Boundary, name: str, *, responses: bool) -> None:
    """The hostile arguments, through publish(), send_request() and send_response()."""
    publisher = Publisher(f"/boundary/{name}", context=ctx)
    client = ServiceClient(f"/boundary-svc/{name}", context=ctx)
    server = ServiceServer(f"/boundary-svc/{name}", context=ctx)
    for payload in PAYLOADS:
        boundary.call(f"{name} publish({short(payload)})", lambda p=payload: publisher.publish(p))
    for headers in HEADERS:
        boundary.call(
            f"{name} publish('x', {short(headers)})",
            lambda h=headers: publisher.publish("x", additional_headers=h),
        )
    for value in WRONG_TYPES:
        boundary.call(
            f"{name} publish({short(value)})",
            lambda v=value: publisher.publish(v),
            wrong_type=True,
        )
        boundary.call(
            f"{name} send_request({short(value)})",
            lambda v=value: client.send_request(v),
            wrong_type=True,
        )
    sent = 0
    for payload in PAYLOADS:
        number = boundary.call(
            f"{name} send_request({short(payload)})", lambda p=payload: client.send_request(p)
        )
        sent += number is not None
    for request_id in BOGUS_IDS:
        boundary.call(
            f"{name} send_response({request_id}, 'x')",
            lambda r=request_id: server.send_response(r, "x"),
        )
    for request_id in WRONG_IDS:
        boundary.call(
            f"{name} send_response({short(request_id)}, 'x')",
            lambda r=request_id: server.send_response(r, "x"),
            wrong_type=True,
        )
    if not responses:
        return
    # answer the requests that arrived (with queue-depth 1, only the last one), each
    # with a hostile payload, after trying wrong types on the first
    requests = []
    timeout = 30.0
    while len(requests) < sent:
        try:
            requests.append(wait_for_request(server, timeout=timeout))
        except WaitTimeoutError:
            break
        timeout = 2.0
    assert requests, "no request arrived: the responses were not exercised"
    for answer in WRONG_TYPES:
        boundary.call(
            f"{name} send_response(<request>, {short(answer)})",
            lambda a=answer: server.send_response(requests[0].id, a),
            wrong_type=True,
        )
    for request, payload in zip(requests, PAYLOADS, strict=False):
        boundary.call(
            f"{name} send_response(<request>, {short(payload)})",
            lambda r=request, p=payload: server.send_response(r.id, p),
        )
    assert sent >= 10, f"only {sent} requests could be sent: the test proves little"


def try_init(boundary: Boundary, name: str, options: Options) -> Context | None:
    ctx = Context(options)
    if boundary.call(f"{name} init()", ctx.init) is None:
        ctx.shutdown()
        return None
    return ctx


@pytest.fixture
def binary_files(tmp_path: Path) -> dict[str, Path]:
    key = tmp_path / "signing.key"
    key.write_bytes(b"\xff" + os.urandom(31))
    password = tmp_path / "password.bin"
    password.write_bytes(b"\xff\xfe-not-utf-8-\x80")
    garbage = tmp_path / "ca.pem"
    garbage.write_bytes(os.urandom(256))
    return {"key": key, "password": password, "garbage": garbage}


# ----------------------------------------------------------------------------- intraprocess


def test_nothing_but_emailmw_errors_leave_the_intraprocess_calls(
    binary_files: dict[str, Path],
) -> None:
    configs: dict[str, dict[str, Any]] = {
        "plain": {},
        "binary-key": {"signing-key-file": binary_files["key"]},
        "extremes": {
            "queue-depth": 1,
            "reorder-window": 0,
            "max-message-size": 1,
            "timeout": 1e-9,
            "send-timeout": 1e-9,
            "polling-period": 0,
        },
        "largest": {
            "queue-depth": 10_000_000,
            "reorder-window": 3600,
            "max-message-size": 1 << 30,
            "timeout": 86_400,
            "send-timeout": 86_400,
            "polling-period": 3_600_000_000_000,
            "max-age": 31_536_000,
        },
        "tiny-max-age": {"signing-key": "k" * 16, "max-age": 1e-9},
    }
    boundary = Boundary()
    for name, extra in configs.items():
        options = Options(intraprocess=True, **{k.replace("-", "_"): v for k, v in extra.items()})
        ctx = try_init(boundary, name, options)
        assert ctx is not None, boundary.leaks
        with ctx:
            exercise(ctx, boundary, name, responses=name != "tiny-max-age")
    assert boundary.leaks == []
    assert boundary.raised["InvalidHeaderError"] > 0 and boundary.raised["TypeError"] > 0


def test_init_raises_nothing_but_emailmw_errors(
    tmp_path: Path, binary_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``emailmw.init()`` given files that are not configurations, or secrets that
    cannot be used."""
    boundary = Boundary()
    not_utf8 = tmp_path / "binary.yml"
    not_utf8.write_bytes(b"email:\n  intraprocess: true\n  mailbox: \xff\xfe\n")
    huge = tmp_path / "huge.yml"
    huge.write_text("email:\n  intraprocess: true\n  timeout: 1e400\n", encoding="utf-8")
    nested = tmp_path / "nested.yml"
    nested.write_text("email: " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    key_env = {"EMAILMW_SIGNING_KEY": os.fsdecode(b"\xff" * 8)}
    cases: list[tuple[str, Any, dict[str, str]]] = [
        ("missing file", tmp_path / "missing.yml", {}),
        ("directory", tmp_path, {}),
        ("binary file", binary_files["key"], {}),
        ("not UTF-8", not_utf8, {}),
        ("infinite timeout", huge, {}),
        ("deep nesting", nested, {}),
        ("str path", str(tmp_path / "missing.yml"), {}),
        ("no file found", None, {"EMAIL_CONFIG_FILE": str(not_utf8)}),
        ("short binary key in the environment", Options(intraprocess=True), key_env),
        (
            "binary password file",
            Options(
                user={"url-smtp": "smtp://127.0.0.1:1", "url-imap": "imap://127.0.0.1:1"},  # type: ignore[arg-type]
                password_file=binary_files["password"],
            ),
            {},
        ),
    ]
    for name, argument, env in cases:
        with monkeypatch.context() as patch:
            for var, value in env.items():
                patch.setenv(var, value)
            boundary.call(f"init({name})", lambda a=argument: emailmw.init(a))
            emailmw.shutdown()
    for value in (5, b"email.yml", ["email.yml"]):
        boundary.call(f"init({value!r})", lambda v=value: emailmw.init(v), wrong_type=True)
    # twice
    emailmw.init(Options(intraprocess=True))
    try:
        boundary.call("init() twice", lambda: emailmw.init(Options(intraprocess=True)))
    finally:
        emailmw.shutdown()
    assert boundary.leaks == []
    assert boundary.raised["ConfigError"] >= len(cases) - 1


# ----------------------------------------------------------------------------- real servers


def server_configs(
    server: DevServer, folder: str, address: str, files: dict[str, Path]
) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """``(name, config, whether the full argument suite runs)`` for hostile configs."""
    domain = address.rpartition("@")[2]

    def config(**email: Any) -> dict[str, Any]:
        base = server.config("alice", mailbox=folder, to=address)
        user = email.pop("user", {})
        base["email"]["user"].update(user)
        base["email"].update({"max-message-size": MAX_SIZE, "send-timeout": 10, **email})
        return base

    yield "signed", config(**{"signing-key-file": str(files["key"])}), True
    yield (
        "unknown-recipients",
        config(
            recipients={"to": [address, f"nobody-here@{domain}"], "bcc": [f"ghost@{domain}"]},
            **{"reorder-window": 0},
        ),
        False,
    )
    yield (
        "largest",
        config(
            timeout=86_400,
            **{
                "queue-depth": 10_000_000,
                "reorder-window": 3600,
                "max-age": 31_536_000,
                "signing-key": "k" * 16,
            },
        ),
        False,
    )
    yield "tiny-timeout", config(timeout=1e-9), False
    yield "tiny-send-timeout", config(**{"send-timeout": 1e-9}), False
    yield "tiny-max-age", config(**{"signing-key": "k" * 16, "max-age": 1e-9}), False
    yield "non-ascii-password", config(user={"password": "pässwörd-секрет"}), False
    yield (
        "non-ascii-username",
        config(user={"username": "ālice@example.test"}, **{"from": address}),
        False,
    )
    yield (
        "binary-password-file",
        _without_password(config(**{"password-file": str(files["password"])})),
        False,
    )
    smtp, imap = server.smtp_port, server.imap_port
    yield (
        "crossed-ports",
        config(
            user={
                "url-smtp": f"smtp://{server.host}:{imap}",
                "url-imap": f"imap://{server.host}:{smtp}",
            }
        ),
        False,
    )
    yield (
        "implicit-tls-on-plain-ports",
        config(
            user={
                "url-smtp": f"smtps://{server.host}:{smtp}",
                "url-imap": f"imaps://{server.host}:{imap}",
            }
        ),
        False,
    )
    yield "nothing-listening", config(user={"url-smtp": "smtp://127.0.0.1:1"}), False
    yield "missing-mailbox", config(mailbox="does-not-exist-ü/*%"), False
    yield "garbage-ca-file", config(tls={"ca-file": str(files["garbage"])}), False
    # these once loaded and then failed every publish() (refused at load now)
    yield "non-ascii-recipient", config(recipients={"to": [f"jürgen@{domain}"]}), False
    yield "non-ascii-from", config(**{"from": f"ālice@{domain}"}), False
    yield "timeout-1e10", config(timeout=1e10, **{"send-timeout": 1e10}), False


def _without_password(config: dict[str, Any]) -> dict[str, Any]:
    del config["email"]["user"]["password"]
    return config


def publish_and_request(ctx: Context, boundary: Boundary, name: str) -> None:
    """A short round of calls, for configurations that are hostile themselves."""
    publisher = Publisher(f"/boundary/{name}", context=ctx)
    for payload in ("x", "é" * 10, "x" * (MAX_SIZE + 1)):
        boundary.call(f"{name} publish({short(payload)})", lambda p=payload: publisher.publish(p))
    client = ServiceClient(f"/boundary-svc/{name}", context=ctx)
    boundary.call(f"{name} send_request('x')", lambda: client.send_request("x"))


@pytest.mark.mailstack
def test_nothing_but_emailmw_errors_leave_the_calls_against_the_mail_servers(
    dev_server: DevServer, binary_files: dict[str, Path]
) -> None:
    folder, address = dev_server.new_mailbox("alice")
    boundary = Boundary()
    initialized = []
    for name, config, full in server_configs(dev_server, folder, address, binary_files):
        options = boundary.call(f"{name} load", lambda c=config: Options.from_dict(c))
        if options is None:
            continue
        ctx = try_init(boundary, name, options)
        if ctx is None:
            continue
        initialized.append(name)
        with ctx:
            if full:
                exercise(ctx, boundary, name, responses=True)
            else:
                publish_and_request(ctx, boundary, name)
    assert boundary.leaks == []
    # the configurations meant to work did, and those meant to fail did fail
    assert {"signed", "unknown-recipients", "largest", "tiny-max-age"} <= set(initialized)
    assert not {"nothing-listening", "binary-password-file", "garbage-ca-file"} & set(initialized)
    assert boundary.raised["ConfigError"] >= 5
