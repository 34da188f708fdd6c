"""What publishers, subscriptions, service clients and service servers share: a
validated name, a context, a GID, a close that is idempotent, a repr, and use
as a context manager.

:class:`Entity` is a mixin: each entity class calls :meth:`Entity._setup`
first, which sets ``_name``, ``_context``, ``_gid`` and ``_closed``.
"""

from __future__ import annotations

from types import TracebackType
from typing import ClassVar, Literal, Self

from emailmw.context import Context, resolve_context
from emailmw.info import Gid
from emailmw.validation import validate_name
from emailmw.waitable import Waitable

__all__ = ["Entity", "check_depth"]


class Entity:
    """Base of the four entity classes (see the module docstring)."""

    #: What the name names, for validation and errors: "topic" or "service".
    _kind: ClassVar[Literal["topic", "service"]]
    _name: str
    _context: Context
    _gid: Gid
    _closed: bool

    def _setup(self, name: str, context: Context | None) -> None:
        """Validate ``name`` and take the context (the global one if ``None``)."""
        self._name = validate_name(name, self._kind)
        self._context = resolve_context(context)
        self._gid = Gid.new()
        self._closed = False

    @property
    def gid(self) -> Gid:
        """This entity's unique id."""
        return self._gid

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Stop receiving (waiting items can still be taken). Idempotent."""
        if not self._closed:
            self._closed = True
            self._unregister()
            if isinstance(self, Waitable):
                self._wake()  # an iteration over this entity ends

    def _unregister(self) -> None:
        """Unregister from the context's delivery core (called once, by :meth:`close`)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name!r} gid={self._gid.value}>"


def check_depth(depth: int | None, context: Context) -> int:
    """``depth`` validated, or the context's ``queue-depth`` when ``None``."""
    if depth is None:
        return context.options.queue_depth
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    return depth
