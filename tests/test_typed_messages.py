"""Typed messages, requests and responses, on both transports.

A message type is ``str`` (the default, today's wire format exactly), ``bytes``
(any bytes, exactly) or anything pydantic validates (JSON bodies). A value that
is not of the declared type is refused before anything is sent; a received body
that does not validate is dropped and counted as ``invalid_message``, never
raised in the polling thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import pytest
from mailstack import stored_emails
from pydantic import BaseModel
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

import emailmw
from emailmw.devserver import DevServer
from emailmw.info import HEADER_MESSAGE_TYPE
from emailmw.security import sign_email
from emailmw.transport.data import EmailContent, EmailData, EmailHeaders

pytestmark = [pytest.mark.timeout(120)]


class Point(BaseModel):
    x: float
    y: float
    label: str = ""


@dataclasses.dataclass
class Reading:
    sensor: str
    values: list[int]


class Order(TypedDict):
    item: str
    count: int


@dataclasses.dataclass
class Bench:
    ctx: emailmw.Context
    wait: float
    stored: Any = None  # (count) -> raw emails in the mailbox (email only)


@contextlib.contextmanager
def open_bench(kind: str, request: pytest.FixtureRequest) -> Iterator[Bench]:
    if kind == "intraprocess":
        with emailmw.Context(emailmw.Options(intraprocess=True)) as ctx:
            yield Bench(ctx, 5.0)
        return
    server: DevServer = request.getfixturevalue("dev_server")
    folder, address = server.new_mailbox("alice")
    config = server.config("alice", mailbox=folder, to=address)
    with emailmw.Context(emailmw.Options.from_dict(config)) as ctx:
        yield Bench(ctx, 20.0, lambda n: stored_emails(server, folder, n, timeout=20.0))


@pytest.fixture(
    params=[
        pytest.param("intraprocess", id="intraprocess"),
        pytest.param("email", id="email", marks=pytest.mark.mailstack),
    ]
)
def bench(request: pytest.FixtureRequest) -> Iterator[Bench]:
    with open_bench(request.param, request) as b:
        yield b


ROUND_TRIPS: list[tuple[Any, Any]] = [
    (bytes, bytes(range(256)) + b"\r\n.\r\nFrom \x00"),
    (bytes, b""),
    (Point, Point(x=1.5, y=-2.0, label="café ☕")),
    (Reading, Reading("t1", [1, 2, 3])),
    (list[int], [1, 2, 3, -4]),
    (dict[str, float], {"a": 1.0, "é": 2.5}),
]


@pytest.mark.parametrize(("message_type", "value"), ROUND_TRIPS)
def test_typed_messages_round_trip_exactly(bench: Bench, message_type: Any, value: Any) -> None:
    sub = emailmw.Subscription("/typed", message_type, context=bench.ctx)
    pub = emailmw.Publisher("/typed", message_type, context=bench.ctx)
    pub.publish(value, {"Trace-Id": "abc-123"})
    got, info = emailmw.wait_for_message_with_info(sub, bench.wait)
    assert got == value
    assert type(got) is type(value)
    assert dict(info.headers) == {"Trace-Id": "abc-123"}
    with pytest.raises(TypeError):
        info.headers["x"] = "y"  # type: ignore[index]


def test_a_typed_dict_round_trips(bench: Bench) -> None:
    sub = emailmw.Subscription("/orders", Order, context=bench.ctx)
    pub = emailmw.Publisher("/orders", Order, context=bench.ctx)
    pub.publish({"item": "tea", "count": 2})
    assert emailmw.wait_for_message(sub, bench.wait) == {"item": "tea", "count": 2}


@pytest.mark.mailstack
def test_the_wire_carries_the_type_and_json(request: pytest.FixtureRequest) -> None:
    """Over email: what the mailbox stores (intraprocess has no bytes to look at)."""
    with open_bench("email", request) as bench:
        _check_the_wire(bench)


def _check_the_wire(bench: Bench) -> None:
    pub = emailmw.Publisher("/wire", Point, context=bench.ctx)
    pub.publish(Point(x=1, y=2))
    raw = bench.stored(1)[0]
    assert b"Content-Type: application/json" in raw
    assert b"Message-Type: json; type=Point" in raw


def test_str_stays_the_wire_format_it_always_was(bench: Bench) -> None:
    sub = emailmw.Subscription("/plain", context=bench.ctx)
    pub = emailmw.Publisher("/plain", context=bench.ctx)
    pub.publish("hello")
    message, info = emailmw.wait_for_message_with_info(sub, bench.wait)
    assert message == "hello"
    assert dict(info.headers) == {}
    if bench.stored is not None:
        raw = bench.stored(1)[0]
        assert b"Message-Type" not in raw
        assert b"Content-Type: text/plain" in raw


@pytest.mark.parametrize(
    ("message_type", "wrong"),
    [
        (str, 5),
        (str, b"bytes"),
        (bytes, "text"),
        (Point, {"x": 1, "y": 2}),  # a dict is not a Point: strict
        (Point, "1,2"),
        (list[int], [1, "two"]),
        (Reading, Point(x=1, y=2)),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_before_sending(
    bench: Bench, message_type: Any, wrong: Any
) -> None:
    pub = emailmw.Publisher("/wrong", message_type, context=bench.ctx)
    before = bench.ctx.stats().sent
    with pytest.raises(emailmw.InvalidMessageError) as info:
        pub.publish(wrong)
    assert isinstance(info.value, TypeError)  # MessageTypeError
    assert isinstance(info.value, ValueError)
    assert bench.ctx.stats().sent == before


def test_a_body_that_does_not_validate_is_dropped_and_counted(bench: Bench) -> None:
    """A str publisher on a Point topic: the subscriber logs, counts and goes on."""
    sub = emailmw.Subscription("/points", Point, context=bench.ctx)
    text = emailmw.Publisher("/points", context=bench.ctx)
    raw = emailmw.Publisher("/points", bytes, context=bench.ctx)
    good = emailmw.Publisher("/points", Point, context=bench.ctx)
    text.publish("not json")
    text.publish('{"x": "not a number", "y": 1}')
    raw.publish(b'{"x": 1, "y": 2}')  # valid JSON, but the wrong kind: a mismatch
    good.publish(Point(x=3, y=4))
    assert emailmw.wait_for_message(sub, bench.wait) == Point(x=3, y=4)
    deadline = time.monotonic() + bench.wait
    while bench.ctx.stats().dropped["invalid_message"] < 3:
        assert time.monotonic() < deadline, bench.ctx.stats()
        time.sleep(0.02)
    assert bench.ctx.stats().dropped["invalid_message"] == 3
    assert not sub.has_message()
    # and a str subscription on the same topic takes every body as text
    plain = emailmw.Subscription("/points", context=bench.ctx)
    text.publish("still text")
    assert emailmw.wait_for_message(plain, bench.wait) == "still text"


def test_typed_services_round_trip(bench: Bench) -> None:
    server = emailmw.ServiceServer("/area", Point, float, context=bench.ctx)
    client = emailmw.ServiceClient("/area", Point, float, context=bench.ctx)
    seq = client.send_request(Point(x=3, y=4), {"Caller": "test"})
    request, info = emailmw.wait_for_request_with_info(server, bench.wait)
    assert request.content == Point(x=3, y=4)
    assert dict(info.headers) == {"Caller": "test"}
    server.send_response(request.id, request.content.x * request.content.y, {"Unit": "m2"})
    response, response_info = emailmw.wait_for_response_with_info(seq, client, bench.wait)
    assert response == 12.0
    assert dict(response_info.headers) == {"Unit": "m2"}
    with pytest.raises(emailmw.InvalidMessageError):
        client.send_request("not a point")  # type: ignore[arg-type]


def test_an_invalid_request_is_dropped_and_the_server_goes_on(bench: Bench) -> None:
    server = emailmw.ServiceServer("/area2", Point, float, context=bench.ctx)
    text_client = emailmw.ServiceClient("/area2", context=bench.ctx)
    client = emailmw.ServiceClient("/area2", Point, float, context=bench.ctx)
    text_client.send_request("garbage")
    seq = client.send_request(Point(x=1, y=1))
    request = emailmw.wait_for_request(server, bench.wait)
    assert request.content == Point(x=1, y=1)
    server.send_response(request.id, 1.0)
    assert emailmw.wait_for_response(seq, client, bench.wait) == 1.0
    assert bench.ctx.stats().dropped["invalid_message"] == 1


def test_an_invalid_response_is_dropped_and_the_request_stays_pending(bench: Bench) -> None:
    text_server = emailmw.ServiceServer("/area3", context=bench.ctx)
    client = emailmw.ServiceClient("/area3", Point, float, context=bench.ctx)
    seq = client.send_request(Point(x=1, y=2))
    request = emailmw.wait_for_request(text_server, bench.wait)
    text_server.send_response(request.id, "not a float")
    deadline = time.monotonic() + bench.wait
    while bench.ctx.stats().dropped["invalid_message"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.get_response(seq) is None


def test_an_unsupported_type_is_a_clear_error_at_creation() -> None:
    with emailmw.Context(emailmw.Options(intraprocess=True)) as ctx:
        with pytest.raises(TypeError, match="not a message type"):
            emailmw.Publisher("/t", object(), context=ctx)


def test_the_message_type_header_is_reserved() -> None:
    with emailmw.Context(emailmw.Options(intraprocess=True)) as ctx:
        pub = emailmw.Publisher("/t", context=ctx)
        with pytest.raises(emailmw.InvalidHeaderError):
            pub.publish("x", {HEADER_MESSAGE_TYPE: "bytes"})


def test_a_signed_typed_message_round_trips_and_a_changed_type_is_refused() -> None:
    options = emailmw.Options(intraprocess=True, signing_key="k" * 32)
    with emailmw.Context(options) as ctx:
        sub = emailmw.Subscription("/signed", bytes, context=ctx)
        pub = emailmw.Publisher("/signed", bytes, context=ctx)
        pub.publish(b"\x00\x01")
        assert emailmw.wait_for_message(sub, 5.0) == b"\x00\x01"
        # the same email with its Message-Type changed no longer verifies
        headers = EmailHeaders(
            {
                "Publisher-GID": "7",
                "Source-Timestamp": str(time.time_ns()),
                HEADER_MESSAGE_TYPE: "bytes",
            }
        )
        email = EmailData(EmailContent("/signed", "AAE="), headers, message_id="<t@test>")
        sign_email(email, b"k" * 32)
        email.headers[HEADER_MESSAGE_TYPE] = "json; type=Point"
        ctx._receiver.deliver(email)  # type: ignore[union-attr]
        assert ctx.stats().dropped["bad_signature"] == 1
        assert not sub.has_message()
