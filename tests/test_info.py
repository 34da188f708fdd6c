"""Metadata: Timestamp, Gid, MessageInfo, ServiceInfo, request ids, header names."""

from __future__ import annotations

import dataclasses
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emailmw import Gid, MessageInfo, ServiceInfo, ServiceRequest, ServiceRequestId, Timestamp
from emailmw.info import (
    HEADER_CLIENT_GID,
    HEADER_PUBLISHER_GID,
    HEADER_SEQUENCE_NUMBER,
    HEADER_SOURCE_TIMESTAMP,
    METADATA_HEADERS,
    parse_sequence_number,
)

pytestmark = pytest.mark.timeout(30)

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
GID_MAX = 2**32 - 1
FAST = settings(max_examples=200, deadline=None, database=None)

JUNK = [
    "",
    " ",
    "\t",
    "abc",
    "12abc",
    "1 2",
    "1.5",
    "1e3",
    "0x10",
    "1_000",
    "--1",
    "+-1",
    "-",
    "+",
    "١٢٣",  # Arabic-Indic digits: str.isdigit() is true, not ASCII
    "²",  # superscript two: isdigit() is true
    "12\x00",
    "1\n2",
]


# -- header names --------------------------------------------------------------------


def test_header_names_are_the_reference_ones() -> None:
    assert HEADER_SOURCE_TIMESTAMP == "Source-Timestamp"
    assert HEADER_PUBLISHER_GID == "Publisher-GID"
    assert HEADER_CLIENT_GID == "Client-GID"
    assert HEADER_SEQUENCE_NUMBER == "Request-Sequence-Number"
    assert {
        "source-timestamp",
        "publisher-gid",
        "client-gid",
        "request-sequence-number",
        # emailmw's own: per-publisher order over real mail servers
        "publication-number",
        "previous-timestamp",
        "previous-number",
    } == METADATA_HEADERS
    assert not any(name.lower().startswith("x-") for name in METADATA_HEADERS)


# -- Timestamp -----------------------------------------------------------------------


def test_timestamp_now_is_wall_clock_nanoseconds() -> None:
    before = time.time_ns()
    stamp = Timestamp.now()
    after = time.time_ns()
    assert before <= stamp.nanoseconds <= after


def test_timestamp_string_round_trip() -> None:
    stamp = Timestamp.now()
    text = stamp.to_string()
    assert text == str(stamp.nanoseconds)
    assert text.isdigit()
    assert Timestamp.from_string(text) == stamp


@FAST
@given(st.integers(min_value=INT64_MIN, max_value=INT64_MAX))
def test_timestamp_round_trips_any_int64(value: int) -> None:
    assert Timestamp.from_string(Timestamp(value).to_string()) == Timestamp(value)


@pytest.mark.parametrize("text", [*JUNK, str(INT64_MAX + 1), str(INT64_MIN - 1), "9" * 30])
def test_timestamp_rejects_junk(text: str) -> None:
    assert Timestamp.from_string(text) is None


def test_timestamp_ordering_and_immutability() -> None:
    assert Timestamp(1) < Timestamp(2)
    assert Timestamp(5) == Timestamp(5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Timestamp(1).nanoseconds = 2  # type: ignore[misc]


# -- Gid -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 12345, GID_MAX])
def test_gid_accepts_unsigned_32_bit(value: int) -> None:
    gid = Gid(value)
    assert gid.value == value
    assert gid.to_string() == str(value)
    assert Gid.from_string(gid.to_string()) == gid


@pytest.mark.parametrize("value", [-1, GID_MAX + 1, 2**64])
def test_gid_constructor_rejects_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        Gid(value)


def test_gid_new_is_in_range_and_random() -> None:
    gids = {Gid.new() for _ in range(1000)}
    assert all(0 <= g.value <= GID_MAX for g in gids)
    assert len(gids) > 990  # 1000 draws from 2**32 practically never collide


@FAST
@given(st.integers(min_value=0, max_value=GID_MAX))
def test_gid_round_trips_any_u32(value: int) -> None:
    assert Gid.from_string(Gid(value).to_string()) == Gid(value)


@pytest.mark.parametrize(
    "text", [*JUNK, "-1", "-4294967295", str(GID_MAX + 1), "99999999999999999999999"]
)
def test_gid_from_string_rejects_negative_overflow_and_junk(text: str) -> None:
    assert Gid.from_string(text) is None


@FAST
@given(st.text(max_size=30))
def test_gid_from_string_never_raises(text: str) -> None:
    result = Gid.from_string(text)
    if result is not None:
        assert 0 <= result.value <= GID_MAX
        assert result.value == int(text.strip())


def test_gid_from_string_tolerates_header_folding_whitespace() -> None:
    # Header values may carry leading/trailing white space after unfolding.
    assert Gid.from_string(" 42 ") == Gid(42)


def test_gid_is_hashable_and_ordered() -> None:
    assert len({Gid(1), Gid(1), Gid(2)}) == 2
    assert Gid(1) < Gid(2)


# -- sequence numbers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"), [("1", 1), ("0", 0), ("-5", -5), (str(INT64_MAX), INT64_MAX)]
)
def test_parse_sequence_number(text: str, value: int) -> None:
    assert parse_sequence_number(text) == value


@pytest.mark.parametrize("text", [*JUNK, str(INT64_MAX + 1), str(INT64_MIN - 1)])
def test_parse_sequence_number_rejects_junk(text: str) -> None:
    assert parse_sequence_number(text) is None


# -- info records --------------------------------------------------------------------


def test_message_info_fields() -> None:
    info = MessageInfo(Timestamp(1), Timestamp(2), Gid(3))
    assert info.source_timestamp == Timestamp(1)
    assert info.received_timestamp == Timestamp(2)
    assert info.publisher_gid == Gid(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.publisher_gid = Gid(4)  # type: ignore[misc]


def test_service_info_and_request_id() -> None:
    info = ServiceInfo(Timestamp(1), Timestamp(2), Gid(3), 4)
    assert (info.client_gid, info.sequence_number) == (Gid(3), 4)
    rid = ServiceRequestId(4, Gid(3))
    assert rid == ServiceRequestId(sequence_number=4, client_gid=Gid(3))
    assert hash(rid) == hash(ServiceRequestId(4, Gid(3)))
    assert rid != ServiceRequestId(4, Gid(5))
    request = ServiceRequest(rid, "body")
    assert (request.id, request.content) == (rid, "body")
