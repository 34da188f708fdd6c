"""Message types: how a typed message, request or response becomes an email body.

A type is one of:

* ``str`` (the default): the body is the text, exactly; no ``Message-Type``
  header, so the wire format is the one every emailmw (and the reference
  design) has always used;
* ``bytes``: any bytes, exactly; the body is their base64 text and
  ``Message-Type: bytes``;
* anything pydantic can validate (a ``BaseModel`` subclass, a dataclass, a
  ``TypedDict``, ``list[int]``, ...): the body is JSON (``Content-Type:
  application/json``) and ``Message-Type: json; type=<name of the type>``.

:func:`serializer_for` gives the :class:`Serializer` of a type. Its
:meth:`~Serializer.dump` raises :class:`~emailmw.InvalidMessageError` before
anything is sent when a value is not of the type; :meth:`~Serializer.load`
raises it when a received body does not validate (the subscription drops such
an email and counts it as ``invalid_message``). A body whose ``Message-Type``
names another kind (``bytes`` where JSON is expected) is a *mismatch* and says
so; a body of the right kind that does not validate is *invalid*.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
from typing import Any, Generic, TypeVar, cast

from pydantic import BaseModel, TypeAdapter, ValidationError

from emailmw.errors import InvalidMessageError, MessageTypeError
from emailmw.info import HEADER_MESSAGE_TYPE
from emailmw.validation import validate_payload

__all__ = [
    "HEADER_MESSAGE_TYPE",
    "JSON_MEDIA_TYPE",
    "TEXT_MEDIA_TYPE",
    "Serializer",
    "serializer_for",
]

T = TypeVar("T")

TEXT_MEDIA_TYPE = "text/plain"
JSON_MEDIA_TYPE = "application/json"


class Serializer(Generic[T]):
    """Turns values of one type into email bodies and back (see the module docstring)."""

    #: the ``Message-Type`` header value (None: no header, the ``str`` format)
    header: str | None = None
    #: the body's media type
    media_type: str = TEXT_MEDIA_TYPE
    #: what the type is called in errors
    name: str = "str"

    def dump(self, value: T, what: str) -> str:
        """The body for ``value``; raises :class:`InvalidMessageError` if it is not one."""
        raise NotImplementedError

    def load(self, body: str, header: str | None) -> T:
        """The value in ``body`` (sent with ``Message-Type: header``); raises
        :class:`InvalidMessageError` if it is not one."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Serializer {self.name}>"


class _Text(Serializer[str]):
    def dump(self, value: str, what: str) -> str:
        if type(value) is str and value.isascii():  # the usual case, and always encodable
            return value
        if not isinstance(value, str):
            raise MessageTypeError(f"{what} must be a str, got {type(value).__name__}")
        return validate_payload(value, what)

    def load(self, body: str, header: str | None) -> str:
        return body  # any body is text


class _Bytes(Serializer[bytes]):
    header = "bytes"
    name = "bytes"

    def dump(self, value: bytes, what: str) -> str:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise MessageTypeError(f"{what} must be bytes, got {type(value).__name__}")
        return base64.b64encode(value).decode("ascii")

    def load(self, body: str, header: str | None) -> bytes:
        if _kind(header) != "bytes":
            raise InvalidMessageError(f"type mismatch: the body is {_describe(header)}, not bytes")
        try:
            return base64.b64decode(body.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
            raise InvalidMessageError(f"the body is not valid base64: {exc}") from None


class _Json(Serializer[T]):
    media_type = JSON_MEDIA_TYPE

    def __init__(self, tp: Any) -> None:
        self._adapter: TypeAdapter[T] = TypeAdapter(tp)
        self.name = getattr(tp, "__name__", None) or repr(tp)
        self.header = f"json; type={_token(self.name)}"
        # A model or dataclass type takes its instances only (not a dict that would
        # validate into one); other types (TypedDict, list[int], ...) are validated.
        is_class = isinstance(tp, type) and (
            issubclass(tp, BaseModel) or dataclasses.is_dataclass(tp)
        )
        self._instance_of: type | None = tp if is_class else None

    def dump(self, value: T, what: str) -> str:
        if self._instance_of is not None and not isinstance(value, self._instance_of):
            raise MessageTypeError(f"{what} must be a {self.name}, got {type(value).__name__}")
        try:
            checked = self._adapter.validate_python(value, strict=True)
            return self._adapter.dump_json(checked).decode("utf-8")
        except ValidationError as exc:
            raise MessageTypeError(
                f"{what} is not a valid {self.name}: {_first_error(exc)}"
            ) from None
        except Exception as exc:  # a value pydantic cannot serialize
            raise InvalidMessageError(f"{what} cannot be sent as {self.name}: {exc}") from None

    def load(self, body: str, header: str | None) -> T:
        kind = _kind(header)
        if kind not in ("json", None):
            raise InvalidMessageError(
                f"type mismatch: the body is {_describe(header)}, not JSON for {self.name}"
            )
        try:
            return self._adapter.validate_json(body)
        except ValidationError as exc:
            raise InvalidMessageError(f"not a valid {self.name}: {_first_error(exc)}") from None


_TEXT = _Text()
_BYTES = _Bytes()


def serializer_for(tp: Any) -> Serializer[Any]:
    """The serializer of ``tp`` (``str``, ``bytes`` or a type pydantic can validate).

    Raises :class:`TypeError` for something pydantic cannot build a validator for.
    """
    if tp is str:
        return _TEXT
    if tp is bytes:
        return _BYTES
    try:
        return _json_serializer(tp)
    except TypeError:  # unhashable: build one each time
        pass
    return _build_json(tp)


@functools.lru_cache(maxsize=256)
def _json_serializer(tp: Any) -> Serializer[Any]:
    return _build_json(tp)


def _build_json(tp: Any) -> Serializer[Any]:
    try:
        return cast(Serializer[Any], _Json(tp))
    except Exception as exc:
        raise TypeError(f"not a message type emailmw can carry: {tp!r} ({exc})") from None


def _kind(header: str | None) -> str | None:
    if header is None:
        return None
    return header.split(";", 1)[0].strip().lower() or None


def _describe(header: str | None) -> str:
    kind = _kind(header)
    return "text (no Message-Type)" if kind is None else repr(kind)


def _token(name: str) -> str:
    """``name`` made safe for a header parameter (printable ASCII, no ``;``)."""
    safe = "".join(c if 32 < ord(c) < 127 and c not in ';"\\' else "_" for c in name)
    return safe[:200] or "_"


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    if not errors:
        return str(exc)
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "value"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', '')}{more}"
