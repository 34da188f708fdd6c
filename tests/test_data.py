"""The email containers: EmailHeaders (case-insensitive), recipients, content, data."""

from __future__ import annotations

import pytest

from emailmw.transport.data import EmailContent, EmailData, EmailHeaders, EmailRecipients

pytestmark = pytest.mark.timeout(30)


def test_headers_get_set_contains_del_ignore_case() -> None:
    headers = EmailHeaders()
    headers["Message-ID"] = "<a@b>"
    assert headers["message-id"] == "<a@b>"
    assert headers["MESSAGE-ID"] == "<a@b>"
    assert headers.get("Message-Id") == "<a@b>"
    assert "message-Id" in headers
    assert "Other" not in headers
    assert 5 not in headers
    assert headers.get("Other") is None
    assert headers.get("Other", "dflt") == "dflt"
    del headers["MESSAGE-id"]
    assert "Message-ID" not in headers
    assert len(headers) == 0
    with pytest.raises(KeyError):
        headers["Message-ID"]
    with pytest.raises(KeyError):
        del headers["Message-ID"]


def test_headers_keep_the_first_spelling() -> None:
    headers = EmailHeaders()
    headers["Publisher-GID"] = "1"
    headers["publisher-gid"] = "2"
    assert list(headers) == ["Publisher-GID"]
    assert headers["PUBLISHER-GID"] == "2"
    assert dict(headers.items()) == {"Publisher-GID": "2"}
    assert len(headers) == 1


def test_headers_keep_insertion_order() -> None:
    headers = EmailHeaders([("B", "1"), ("a", "2"), ("C", "3")])
    assert list(headers) == ["B", "a", "C"]
    assert list(headers.values()) == ["1", "2", "3"]


def test_headers_from_mapping_and_pairs() -> None:
    assert EmailHeaders({"A": "1"}) == EmailHeaders([("a", "1")])
    assert EmailHeaders([("A", "1"), ("a", "2")])["A"] == "2"


def test_headers_equality() -> None:
    a = EmailHeaders({"Subject-Like": "x", "Other": "y"})
    b = EmailHeaders({"other": "y", "SUBJECT-LIKE": "x"})
    assert a == b
    assert a == {"subject-like": "x", "other": "y"}
    assert a != EmailHeaders({"Subject-Like": "X", "Other": "y"})  # values are case-sensitive
    assert a != EmailHeaders({"Subject-Like": "x"})
    assert a != ["Subject-Like"]
    with pytest.raises(TypeError):
        hash(a)


def test_headers_copy_is_independent() -> None:
    a = EmailHeaders({"A": "1"})
    b = a.copy()
    b["a"] = "2"
    b["C"] = "3"
    assert a == {"A": "1"}
    assert b == {"A": "2", "C": "3"}
    assert list(b) == ["A", "C"]


def test_headers_repr_shows_spellings() -> None:
    assert repr(EmailHeaders({"Client-GID": "7"})) == "EmailHeaders({'Client-GID': '7'})"


def test_recipients_all_is_ordered_and_deduplicated() -> None:
    recipients = EmailRecipients(to=["a@x", "b@x"], cc=["b@x", "c@x"], bcc=["d@x", "a@x"])
    assert recipients.all() == ["a@x", "b@x", "c@x", "d@x"]
    assert EmailRecipients().all() == []


def test_recipients_defaults_are_not_shared() -> None:
    a, b = EmailRecipients(), EmailRecipients()
    a.to.append("x@y")
    assert b.to == []


def test_email_data_defaults() -> None:
    email = EmailData(EmailContent("/topic", "body"))
    assert email.content == EmailContent("/topic", "body")
    assert email.headers == EmailHeaders()
    assert email.message_id == ""
    assert email.in_reply_to is None
    assert email.from_ == ""
    assert email.recipients == EmailRecipients()
    other = EmailData(EmailContent("/topic", "body"))
    email.headers["A"] = "1"
    assert "A" not in other.headers


def test_headers_compared_with_a_mapping_of_non_str_keys() -> None:
    assert EmailHeaders({"A": "1"}) != {1: "1"}
    assert not (EmailHeaders() == {None: "x"})
